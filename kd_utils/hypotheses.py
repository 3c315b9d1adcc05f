"""The hypothesis tests of the paper on a gain table (:mod:`kd_utils.gains`), with effect sizes,
CIs and Holm / Benjamini-Hochberg corrections: H1 KD > SFT, method differences, H2 teacher
performance and expertise, H3 student size and SFT accuracy, H4 agreement, H5 fidelity;
:func:`all_hypotheses` runs every one whose inputs exist.

Every test runs per task and domain, so a domain's gains are in its own metric's points. The main
tests (everything but the teacher-expertise test) use the standard condition
(:func:`~kd_utils.gains.main_condition`: an SFT'd teacher, no teacher-logit noise). A family of
tests, for the multiple-comparison corrections, is one (hypothesis, test, method) across all its
tasks, the "Average" rows included. Every table has the columns
:data:`~kd_utils.schema.HYPOTHESIS_COLUMNS`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pingouin as pg

from .gains import main_condition
from .schema import GAIN_KEYS, HYPOTHESIS_COLUMNS, require_columns

__all__ = [
    "FAMILY",
    "HYPOTHESIS_ORDER",
    "adjust_pvalues",
    "all_hypotheses",
    "h1_kd_vs_sft",
    "h2_teacher_expertise",
    "h2_teacher_performance",
    "h3_student_size",
    "h3_student_sft",
    "h4_agreement",
    "h5_fidelity",
    "method_differences",
]

#: A correction family: same hypothesis, test and method, different tasks.
FAMILY = ("hypothesis", "test", "method")

#: The hypotheses in the order of a table (and of its sentences).
HYPOTHESIS_ORDER = [
    "H1", "methods", "H2_teacher_accuracy", "H2_teacher_expertise", "H3_student_size",
    "H3_student_sft", "H4_agreement", "H5_fidelity",
]


# --------------------------------------------------------------------------- test helpers
def _slices(gains: pd.DataFrame):
    """(method label, task, domain, rows): pooled over methods ("all") and per method."""
    for (task, domain), rows in gains.groupby(["task", "domain"], sort=True):
        yield "all", task, domain, rows
        for method, mrows in rows.groupby("method", sort=True):
            yield method, task, domain, mrows


def _row(hypothesis: str, method: str, task: str, domain: str, test: str, statistic: float,
         p_value: float, n: int, estimate: float = np.nan, ci: Sequence[float] = (np.nan, np.nan),
         effect: float = np.nan, effect_name: str = "", p_holm_pairs: float = np.nan) -> dict:
    return dict(hypothesis=hypothesis, method=method, task=task, domain=domain, test=test,
                statistic=float(statistic), p_value=float(p_value), n=int(n),
                estimate=float(estimate), ci_low=float(ci[0]), ci_high=float(ci[1]),
                effect=float(effect), effect_name=effect_name, p_holm_pairs=float(p_holm_pairs))


def _table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=[c for c in HYPOTHESIS_COLUMNS if c not in ("p_holm", "p_bh")])
    return adjust_pvalues(table)[HYPOTHESIS_COLUMNS]


def _location_tests(hypothesis: str, x: pd.Series, method: str, task: str, domain: str,
                    alternative: str) -> list[dict]:
    """One-sample t-test (Cohen's d, CI of the mean) and Wilcoxon signed-rank of ``x`` vs 0."""
    x = x.dropna().astype(float)
    if len(x) < 3 or x.std() == 0:
        return []
    tt = pg.ttest(x.to_numpy(), 0, alternative=alternative).iloc[0]
    d = float(np.sign(x.mean())) * abs(float(tt["cohen_d"]))  # pingouin reports |d|; keep the gain's sign
    rows = [_row(hypothesis, method, task, domain, "ttest", tt["T"], tt["p_val"], len(x),
                 x.mean(), tt["CI95"], d, "cohen_d")]
    wx = pg.wilcoxon(x.to_numpy(), alternative=alternative).iloc[0]
    rows.append(_row(hypothesis, method, task, domain, "wilcoxon", wx["W_val"], wx["p_val"],
                     len(x), x.median(), effect=wx["RBC"], effect_name="rank_biserial"))
    return rows


def _spearman(hypothesis: str, gains: pd.DataFrame, x: str) -> pd.DataFrame:
    require_columns(gains, GAIN_KEYS + ["gain", x], "gains")
    rows = []
    for method, task, domain, d in _slices(main_condition(gains)):
        d = d[["gain", x]].dropna()
        if len(d) < 3 or d["gain"].nunique() < 2 or d[x].nunique() < 2:
            continue
        c = pg.corr(d["gain"], d[x], method="spearman").iloc[0]
        rows.append(_row(hypothesis, method, task, domain, "spearman", c["r"], c["p_val"],
                         len(d), c["r"], c["CI95"], c["r"], "rho"))
    return _table(rows)


def adjust_pvalues(table: pd.DataFrame, family: Sequence[str] = FAMILY) -> pd.DataFrame:
    """Add ``p_holm`` and ``p_bh`` (Benjamini-Hochberg), corrected within each family of
    rows sharing ``family`` (default: same hypothesis, test and method, across tasks)."""
    require_columns(table, list(family) + ["p_value"], "hypothesis table")
    out = table.copy()
    out["p_holm"] = np.nan
    out["p_bh"] = np.nan
    for _, idx in out.groupby(list(family), sort=False).groups.items():
        p = out.loc[idx, "p_value"].to_numpy(dtype=float)
        out.loc[idx, "p_holm"] = pg.multicomp(p, method="holm")[1]
        out.loc[idx, "p_bh"] = pg.multicomp(p, method="fdr_bh")[1]
    return out


# --------------------------------------------------------------------------- hypotheses
def h1_kd_vs_sft(gains: pd.DataFrame) -> pd.DataFrame:
    """H1 KD > SFT: one-sided one-sample t-test of the gains vs 0 (Cohen's d, one-sided CI of
    the mean gain) and the Wilcoxon signed-rank test, pooled and per method, per task."""
    require_columns(gains, GAIN_KEYS + ["gain"], "gains")
    rows = []
    for method, task, domain, d in _slices(main_condition(gains)):
        rows += _location_tests("H1", d["gain"], method, task, domain, "greater")
    return _table(rows)


def _method_subjects(d: pd.DataFrame) -> pd.DataFrame:
    """Gains per (teacher->student subject, method), seeds averaged; complete subjects only."""
    d = d.assign(subject=d["teacher"].astype(str) + "->" + d["student"].astype(str))
    d = d.groupby(["subject", "method"], as_index=False)["gain"].mean().dropna()
    n_methods = d["method"].nunique()
    complete = d.groupby("subject")["method"].nunique() == n_methods
    return d[d["subject"].isin(complete[complete].index)]


def method_differences(gains: pd.DataFrame) -> pd.DataFrame:
    """Do KD methods differ? Per task: one-way ANOVA over methods on the gains (the paper;
    effect: partial eta squared), and the repeated-measures view with (teacher, student) pairs
    as subjects: ``rm_anova`` (Greenhouse-Geisser p with 3+ methods; effect: generalized eta
    squared) and paired ``pairwise_tests`` (raw p in p_value, Holm over the task's contrasts in
    ``p_holm_pairs``, Hedges g; estimate = mean of A - B)."""
    require_columns(gains, GAIN_KEYS + ["gain"], "gains")
    rows = []
    for (task, domain), d in main_condition(gains).groupby(["task", "domain"], sort=True):
        d = d.dropna(subset=["gain"])
        k = d["method"].nunique()
        if k < 2 or len(d) < 3 or len(d) <= k:
            continue
        if d.groupby("method")["gain"].var(ddof=0).sum() == 0:
            continue  # no variance within methods: F is undefined (pingouin leaves it out)
        a = pg.anova(data=d, dv="gain", between="method").iloc[0]
        rows.append(_row("methods", "all", task, domain, "anova", a["F"], a["p_unc"], len(d),
                         effect=a["np2"], effect_name="partial_eta2"))
        s = _method_subjects(d)
        n_subj = s["subject"].nunique()
        if n_subj < 3:
            continue
        correct = k > 2 and n_subj > k
        r = pg.rm_anova(data=s, dv="gain", within="method", subject="subject",
                        correction=correct).iloc[0]
        if "F" not in r:
            continue
        rows.append(_row("methods", "all", task, domain, "rm_anova", r["F"],
                         r["p_GG_corr"] if correct else r["p_unc"], n_subj,
                         effect=r["ng2"], effect_name="generalized_eta2"))
        wide = s.pivot(index="subject", columns="method", values="gain")
        pw = pg.pairwise_tests(data=s, dv="gain", within="method", subject="subject", padjust="holm")
        for _, c in pw.iterrows():
            rows.append(_row("methods", f"{c['A']} vs {c['B']}", task, domain, "pairwise_ttest",
                             c["T"], c["p_unc"], n_subj, (wide[c["A"]] - wide[c["B"]]).mean(),
                             effect=c["hedges"], effect_name="hedges_g",
                             p_holm_pairs=c["p_corr"] if k > 2 else c["p_unc"]))
    return _table(rows)


def h2_teacher_performance(gains: pd.DataFrame) -> pd.DataFrame:
    """H2: Spearman correlation of the gain with the teacher's own SFT accuracy on the task."""
    return _spearman("H2_teacher_accuracy", gains, "teacher_accuracy")


def h2_teacher_expertise(gains: pd.DataFrame) -> pd.DataFrame:
    """Teacher task expertise: the same (teacher, student, method, seed) distilled from the
    SFT'd vs the base teacher; two-sided paired t-test and Wilcoxon on
    ``accuracy(SFT'd teacher) - accuracy(base teacher)`` (estimate: mean / median difference).
    Both sides are aggregated over temperature the same way (see ``gains.attrs["tau"]``)."""
    require_columns(gains, GAIN_KEYS + ["accuracy"], "gains")
    keys = [k for k in GAIN_KEYS if k != "teacher_kind"]
    d = gains[gains["noise"].fillna(0.0) == 0.0]
    d = d[d["teacher_kind"].isin(["sft", "base"])]
    wide = d.pivot_table(index=keys, columns="teacher_kind", values="accuracy", dropna=False)
    if not {"sft", "base"} <= set(wide.columns):
        return _table([])
    diff = (wide["sft"] - wide["base"]).dropna().rename("diff").reset_index()
    rows = []
    for method, task, domain, x in _slices(diff):
        rows += _location_tests("H2_teacher_expertise", x["diff"], method, task, domain, "two-sided")
    return _table(rows)


def h3_student_size(gains: pd.DataFrame) -> pd.DataFrame:
    """H3: Spearman correlation of the gain with the student's parameter count."""
    return _spearman("H3_student_size", gains, "student_params")


def h3_student_sft(gains: pd.DataFrame) -> pd.DataFrame:
    """H3 (second view): Spearman correlation of the gain with the student's SFT accuracy."""
    return _spearman("H3_student_sft", gains, "sft_accuracy")


def h4_agreement(gains: pd.DataFrame) -> pd.DataFrame:
    """H4: Spearman correlation of the gain with teacher-student answer agreement."""
    return _spearman("H4_agreement", gains, "agreement")


def h5_fidelity(gains: pd.DataFrame) -> pd.DataFrame:
    """H5: Spearman correlation of the gain with rationale fidelity (BLEU vs the teacher)."""
    return _spearman("H5_fidelity", gains, "fidelity")


def all_hypotheses(gains: pd.DataFrame) -> pd.DataFrame:
    """Every test whose inputs exist (slices with n < 3 or constant inputs record nothing),
    concatenated in the order H1, methods, H2, H3, H4, H5."""
    require_columns(gains, GAIN_KEYS + ["gain", "accuracy"], "gains")
    tests = [h1_kd_vs_sft, method_differences, h2_teacher_expertise, h3_student_size]
    optional = [("teacher_accuracy", h2_teacher_performance), ("sft_accuracy", h3_student_sft),
                ("agreement", h4_agreement), ("fidelity", h5_fidelity)]
    tests += [fn for column, fn in optional if column in gains.columns and gains[column].notna().any()]
    parts = [t for t in (fn(gains) for fn in tests) if not t.empty]
    if not parts:
        return pd.DataFrame(columns=HYPOTHESIS_COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    order = {h: i for i, h in enumerate(HYPOTHESIS_ORDER)}
    return table.sort_values("hypothesis", key=lambda s: s.map(order), kind="stable",
                             ignore_index=True)
