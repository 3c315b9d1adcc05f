"""The hypothesis table (:mod:`kd_utils.hypotheses`) in plain English: one sentence per
hypothesis and domain, generated from the numbers."""
from __future__ import annotations

import pandas as pd

from .hypotheses import HYPOTHESIS_ORDER
from .schema import AVERAGE, HYPOTHESIS_COLUMNS, require_columns
from .tasks import DOMAIN_METRICS

__all__ = ["describe_hypotheses"]


def _p(p: float) -> str:
    return f"{p:.2g}"


_CORRELATES = {
    "H2_teacher_accuracy": ("H2 (gain vs teacher accuracy)", "teacher accuracy"),
    "H3_student_size": ("H3 (gain vs student size)", "student size"),
    "H3_student_sft": ("H3 (gain vs student SFT accuracy)", "the student's SFT accuracy"),
    "H4_agreement": ("H4 (gain vs teacher-student agreement)", "agreement"),
    "H5_fidelity": ("H5 (gain vs rationale fidelity)", "fidelity"),
}
_HEADLINE_TEST = {"H1": "ttest", "methods": "anova", "H2_teacher_expertise": "ttest"}


def _headline(hypothesis: str, rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series] | None:
    """The pooled rows of one hypothesis and domain and the row its sentence reports: the Average
    when tested, else the task with the smallest p."""
    pooled = rows[(rows["method"] == "all") & (rows["test"] == _HEADLINE_TEST.get(hypothesis, "spearman"))]
    if pooled.empty:
        return None
    avg = pooled[pooled["task"] == AVERAGE]
    tasks = pooled[pooled["task"] != AVERAGE]
    return pooled, (avg.iloc[0] if len(avg) else tasks.loc[tasks["p_value"].idxmin()])


def _points(domain: str) -> str:
    metric = DOMAIN_METRICS.get(domain, "accuracy")
    return "points" if metric == "accuracy" else f"{metric} points"


def _sentence(hypothesis: str, domain: str, rows: pd.DataFrame, alpha: float) -> str | None:
    found = _headline(hypothesis, rows)
    if found is None:
        return None
    pooled, head = found
    tasks = pooled[pooled["task"] != AVERAGE]
    count = f"significant on {(tasks['p_holm'] < alpha).sum()} of {len(tasks)} tasks after Holm"
    avg = pooled[pooled["task"] == AVERAGE]
    where = "the Average" if len(avg) else f"{head['task']}, its strongest task"
    stats = f"p={_p(head['p_value'])}, n={head['n']}"
    if hypothesis == "H1":
        return (f"H1 (KD > SFT), {domain}: mean gain {head['estimate']:+.2f} {_points(domain)} on {where} "
                f"(t={head['statistic']:.2f}, {stats}, d={head['effect']:.2f}); {count}.")
    if hypothesis == "methods":
        return (f"Method differences, {domain}: one-way ANOVA over methods on {where} "
                f"F={head['statistic']:.2f} ({stats}, partial eta2={head['effect']:.2f}); {count}.")
    if hypothesis == "H2_teacher_expertise":
        return (f"H2 (SFT'd vs base teacher), {domain}: distilling from the SFT'd teacher gives "
                f"{head['estimate']:+.2f} {_points(domain)} vs the base teacher on {where} "
                f"(t={head['statistic']:.2f}, {stats}); {count}.")
    label, predictor = _CORRELATES[hypothesis]
    if head["p_holm"] < alpha:
        trend = f"the gain {'rises' if head['statistic'] > 0 else 'falls'} with {predictor}"
    else:
        trend = f"no significant relation between the gain and {predictor}"
    return (f"{label}, {domain}: {trend} on {where} "
            f"(Spearman rho={head['statistic']:.2f}, {stats}); {count}.")


def describe_hypotheses(table: pd.DataFrame, alpha: float = 0.05, collapse: bool = False) -> list[str]:
    """One plain-English sentence per hypothesis and domain, from the pooled ("all") rows:
    the Average when tested (else the task with the smallest p), then how many tasks stay
    significant after Holm at ``alpha``. With ``collapse``, those whose reported row is not
    significant after Holm share one closing line instead."""
    require_columns(table, HYPOTHESIS_COLUMNS, "hypothesis table")
    lines, quiet = [], []
    for hypothesis in HYPOTHESIS_ORDER:
        rows = table[table["hypothesis"] == hypothesis]
        for domain, d in rows.groupby("domain", sort=True):
            line = _sentence(hypothesis, domain, d, alpha)
            if line and collapse and not _headline(hypothesis, d)[1]["p_holm"] < alpha:
                head = _headline(hypothesis, d)[1]
                quiet.append(f"{line.split(':')[0]} (p={_p(head['p_value'])}, n={head['n']})")
            elif line:
                lines.append(line)
    if quiet:
        lines.append(f"Not significant after Holm at {alpha:g}: {'; '.join(quiet)}.")
    return lines
