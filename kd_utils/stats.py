"""The hypothesis tests of the paper, on the tidy results / fidelity tables.

Pipeline: :func:`gain_table` turns results (+ fidelity) into one row per KD configuration and
task with ``gain = KD accuracy - the student's SFT accuracy``, aggregating over the
temperature by a named choice; :func:`all_hypotheses` runs the paper's tests (H1-H5, method
differences) with effect sizes, CIs and Holm / Benjamini-Hochberg corrections;
:func:`describe_hypotheses` turns the table into sentences; :func:`mixed_model` is a
random-intercept view beyond the paper. :func:`load_kd_generalization` parses the authors'
published tables and ``python -m kd_utils.stats reproduce`` reruns their analysis.

Conventions. Accuracies, agreement and BLEU are percentages. ``accuracy`` is each row's metric
(results.csv's ``metric``: accuracy, or ROUGE-L F1 in the instruction domain); every test runs
per task and domain, so a domain's gains are in its own metric's points. The main tests (everything but
the teacher-expertise test) use the standard condition: an SFT'd teacher
(``teacher_kind != "base"``) and no teacher-logit noise (``noise == 0``). A family of tests,
for the multiple-comparison corrections, is one (hypothesis, test, method) across all its
tasks, the "Average" rows included.
"""
from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pingouin as pg
import statsmodels.formula.api as smf
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from .tasks import DOMAIN_METRICS

__all__ = [
    "AVERAGE",
    "TABLE_COLUMNS",
    "adjust_pvalues",
    "all_hypotheses",
    "describe_hypotheses",
    "gain_table",
    "h1_kd_vs_sft",
    "h2_teacher_expertise",
    "h2_teacher_performance",
    "h3_student_sft",
    "h3_student_size",
    "h4_agreement",
    "h5_fidelity",
    "load_kd_generalization",
    "main",
    "method_differences",
    "mixed_model",
]

#: Task name of the per-domain macro-average rows.
AVERAGE = "Average"

#: Columns of every hypothesis table.
TABLE_COLUMNS = [
    "hypothesis", "method", "task", "domain", "test", "statistic", "p_value", "n",
    "estimate", "ci_low", "ci_high", "effect", "effect_name", "p_holm", "p_bh", "p_holm_pairs",
]

#: A correction family: same hypothesis, test and method, different tasks.
FAMILY = ("hypothesis", "test", "method")

RESULT_COLUMNS = (
    "model", "kind", "student", "teacher", "method", "temperature", "noise", "teacher_kind",
    "seed", "task", "domain", "accuracy", "student_params", "teacher_params",
)
FIDELITY_COLUMNS = ("model", "teacher", "task", "agreement", "bleu")

#: Configuration of a gain row (the temperature is aggregated away).
GAIN_KEYS = ["teacher", "student", "method", "noise", "teacher_kind", "seed", "task", "domain"]
_MODEL_KEYS = ["model", "kind", "student", "teacher", "method", "temperature", "noise",
               "teacher_kind", "seed", "domain"]
_TAU_NAMES = ("max", "mean")

_HYPOTHESIS_ORDER = [
    "H1", "methods", "H2_teacher_accuracy", "H2_teacher_expertise", "H3_student_size",
    "H3_student_sft", "H4_agreement", "H5_fidelity",
]


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}")


# --------------------------------------------------------------------------- gain table
def _check_tau(tau: str | float) -> str | float:
    if isinstance(tau, str):
        if tau not in _TAU_NAMES:
            raise ValueError(f"unknown tau aggregation {tau!r}; use one of {_TAU_NAMES} or a number")
        return tau
    if isinstance(tau, (int, float)) and not isinstance(tau, bool) and np.isfinite(tau) and tau > 0:
        return float(tau)
    raise ValueError(f"tau must be 'max', 'mean' or a positive number, got {tau!r}")


def _domain_averages(rows: pd.DataFrame, values: list[str],
                     tasks_of: Mapping[str, frozenset]) -> pd.DataFrame:
    """Per model and domain, the mean of ``values`` over the domain's tasks ``tasks_of``
    (as the authors' "Average" column). Models lacking some of them get no Average (warned)."""
    out, incomplete = [], []
    for key, grp in rows.groupby(_MODEL_KEYS, dropna=False, sort=False):
        tasks = tasks_of.get(key[_MODEL_KEYS.index("domain")], frozenset())
        grp = grp[grp["task"].isin(tasks)]
        if frozenset(grp["task"]) != tasks:
            incomplete.append(key[0])
            continue
        row = dict(zip(_MODEL_KEYS, key))
        row.update({v: grp[v].mean(skipna=False) for v in values})
        row.update(task=AVERAGE, student_params=grp["student_params"].iloc[0],
                   teacher_params=grp["teacher_params"].iloc[0])
        out.append(row)
    if incomplete:
        warnings.warn(f"no {AVERAGE} row for models missing some of their domain's tasks: "
                      f"{sorted(set(map(str, incomplete)))}", stacklevel=3)
    return pd.DataFrame(out, columns=list(rows.columns))


def _aggregate_tau(kd: pd.DataFrame, tau: str | float, values: list[str]) -> pd.DataFrame:
    """One row per GAIN_KEYS: the max-accuracy temperature, the mean over temperatures, or
    the given temperature (rows without a temperature, methods that have none, are kept)."""
    groups = kd.sort_values("temperature").groupby(GAIN_KEYS, dropna=False, sort=False)
    if tau == "max":
        out = kd.loc[groups["accuracy"].idxmax()].copy()
        out["tau_used"] = out["temperature"]
    elif tau == "mean":
        out = groups.agg({**{v: "mean" for v in values}, "student_params": "first",
                          "teacher_params": "first"}).reset_index()
        out["tau_used"] = "mean"
    else:
        keep = np.isclose(kd["temperature"], tau) | kd["temperature"].isna()
        dropped = groups.ngroups - kd[keep].groupby(GAIN_KEYS, dropna=False).ngroups
        if dropped:
            warnings.warn(f"{dropped} KD configurations have no run at tau={tau:g}; they are "
                          "left out of the gain table", stacklevel=3)
        out = kd[keep].copy()
        out["tau_used"] = out["temperature"]
    return out


def _teacher_accuracy(sft: pd.DataFrame, teachers: Iterable[str]) -> pd.DataFrame:
    """The teacher's own SFT accuracy per task: SFT rows whose model (else whose size name)
    is the teacher, averaged over seeds."""
    parts = []
    for t in teachers:
        rows = sft[sft["model"] == t]
        if rows.empty:
            rows = sft[sft["student"] == t]
        if rows.empty:
            warnings.warn(f"no SFT row for teacher {t!r}: its teacher_accuracy is NaN", stacklevel=3)
            continue
        acc = rows.groupby(["task", "domain"])["accuracy"].mean().rename("teacher_accuracy").reset_index()
        parts.append(acc.assign(teacher=t))
    if not parts:
        return pd.DataFrame(columns=["teacher", "task", "domain", "teacher_accuracy"])
    return pd.concat(parts, ignore_index=True)


def _sft_accuracy(gains: pd.DataFrame, sft: pd.DataFrame) -> pd.Series:
    """The student's SFT accuracy, same seed, task and domain (each domain has its own Average);
    else the mean over seeds (warned)."""
    same = sft.groupby(["student", "seed", "task", "domain"])["accuracy"].mean().rename("sft_accuracy")
    acc = gains.join(same, on=["student", "seed", "task", "domain"])["sft_accuracy"]
    missing = acc.isna()
    if missing.any():
        mean = sft.groupby(["student", "task", "domain"])["accuracy"].mean().rename("sft_accuracy")
        fallback = gains[missing].join(mean, on=["student", "task", "domain"])["sft_accuracy"]
        filled = fallback.notna()
        if filled.any():
            which = gains.loc[fallback[filled].index, ["student", "seed"]].drop_duplicates()
            warnings.warn("no SFT run with the same seed for (student, seed) "
                          f"{list(map(tuple, which.to_numpy()))}: using the student's SFT "
                          "accuracy averaged over seeds", stacklevel=3)
        if (~filled).any():
            lost = sorted(set(gains.loc[fallback[~filled].index, "student"]))
            warnings.warn(f"no SFT row at all for students {lost}: their gain is NaN", stacklevel=3)
        acc = acc.fillna(fallback)
    return acc


def gain_table(results: pd.DataFrame, fidelity: pd.DataFrame | None = None,
               tau: str | float = "max", average: bool = True) -> pd.DataFrame:
    """KD gains over SFT, one row per (teacher, student, method, noise, teacher_kind, seed, task).

    ``tau`` names the aggregation over the KD temperature: "max" (the authors' choice: the
    best temperature per configuration and task, chosen on the test accuracy, so optimistic),
    "mean" over temperatures, or a fixed temperature. Columns: the keys, domain, tau_used,
    accuracy, sft_accuracy, teacher_accuracy, gain, student_params, teacher_params, and, with
    ``fidelity``, agreement and fidelity (BLEU) of the KD model vs its teacher, carried with the
    chosen temperature's row (averaged with "mean"). ``average`` adds per-domain
    ``task="Average"`` rows, averaged per model over the domain's KD tasks before the
    aggregation (the authors' "Average" column); results that already hold Average rows need
    ``average=False``. The aggregation is stored in ``attrs["tau"]``.
    """
    _require(results, RESULT_COLUMNS, "results")
    tau = _check_tau(tau)
    kd = results[results["kind"] == "kd"].reset_index(drop=True)
    sft = results[results["kind"] == "sft"].reset_index(drop=True)
    if kd.empty:
        raise ValueError("results have no kd rows")
    if kd["accuracy"].isna().any():
        raise ValueError(f"kd rows with NaN accuracy: {kd.loc[kd['accuracy'].isna(), 'model'].unique().tolist()}")
    dup = kd.duplicated(GAIN_KEYS + ["temperature"], keep=False)
    if dup.any():
        raise ValueError(f"duplicate kd rows for the same configuration and temperature: "
                         f"{kd.loc[dup, 'model'].unique().tolist()}")
    values = ["accuracy"]
    if fidelity is not None:
        _require(fidelity, FIDELITY_COLUMNS, "fidelity")
        fid = fidelity[["model", "teacher", "task", "agreement", "bleu"]].rename(columns={"bleu": "fidelity"})
        if fid.duplicated(["model", "teacher", "task"]).any():
            raise ValueError("fidelity has duplicate (model, teacher, task) rows")
        kd = kd.merge(fid, on=["model", "teacher", "task"], how="left")
        values += ["agreement", "fidelity"]
    if average:
        if (results["task"] == AVERAGE).any():
            raise ValueError(f"results already contain {AVERAGE!r} rows; pass average=False")
        tasks_of = kd.groupby("domain")["task"].agg(frozenset).to_dict()
        kd = pd.concat([kd, _domain_averages(kd, values, tasks_of)], ignore_index=True)
        sft = pd.concat([sft, _domain_averages(sft, ["accuracy"], tasks_of)], ignore_index=True)

    out = _aggregate_tau(kd, tau, values).reset_index(drop=True)
    out["sft_accuracy"] = _sft_accuracy(out, sft)
    out = out.merge(_teacher_accuracy(sft, out["teacher"].unique()), on=["teacher", "task", "domain"], how="left")
    out["gain"] = out["accuracy"] - out["sft_accuracy"]
    columns = GAIN_KEYS + ["tau_used", "accuracy", "sft_accuracy", "teacher_accuracy", "gain"]
    columns += values[1:] + ["student_params", "teacher_params"]
    out = out[columns].sort_values(GAIN_KEYS, ignore_index=True)
    out.attrs["tau"] = tau
    return out


# --------------------------------------------------------------------------- test helpers
def _main_condition(gains: pd.DataFrame) -> pd.DataFrame:
    """The standard setting: SFT'd teacher, no teacher-logit noise."""
    return gains[(gains["teacher_kind"] != "base") & (gains["noise"].fillna(0.0) == 0.0)]


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
    table = pd.DataFrame(rows, columns=[c for c in TABLE_COLUMNS if c not in ("p_holm", "p_bh")])
    return adjust_pvalues(table)[TABLE_COLUMNS]


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
    _require(gains, GAIN_KEYS + ["gain", x], "gains")
    rows = []
    for method, task, domain, d in _slices(_main_condition(gains)):
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
    _require(table, list(family) + ["p_value"], "hypothesis table")
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
    _require(gains, GAIN_KEYS + ["gain"], "gains")
    rows = []
    for method, task, domain, d in _slices(_main_condition(gains)):
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
    _require(gains, GAIN_KEYS + ["gain"], "gains")
    rows = []
    for (task, domain), d in _main_condition(gains).groupby(["task", "domain"], sort=True):
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
    _require(gains, GAIN_KEYS + ["accuracy"], "gains")
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
    _require(gains, GAIN_KEYS + ["gain", "accuracy"], "gains")
    tests = [h1_kd_vs_sft, method_differences, h2_teacher_expertise, h3_student_size]
    optional = [("teacher_accuracy", h2_teacher_performance), ("sft_accuracy", h3_student_sft),
                ("agreement", h4_agreement), ("fidelity", h5_fidelity)]
    tests += [fn for column, fn in optional if column in gains.columns and gains[column].notna().any()]
    parts = [t for t in (fn(gains) for fn in tests) if not t.empty]
    if not parts:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    order = {h: i for i, h in enumerate(_HYPOTHESIS_ORDER)}
    return table.sort_values("hypothesis", key=lambda s: s.map(order), kind="stable",
                             ignore_index=True)


# --------------------------------------------------------------------------- sentences
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
    _require(table, TABLE_COLUMNS, "hypothesis table")
    lines, quiet = [], []
    for hypothesis in _HYPOTHESIS_ORDER:
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


# --------------------------------------------------------------------------- mixed model
def mixed_model(gains: pd.DataFrame) -> pd.DataFrame:
    """Beyond the paper: ``gain ~ log(student_params) + teacher_accuracy + C(method)`` with a
    random intercept per task (statsmodels MixedLM, REML), on the per-task rows of the main
    condition. Terms that do not vary are dropped (warned). A singular or non-converged fit
    (task-intercept variance ~0, the usual case with few tasks) is warned about: its fixed
    effects are then close to OLS. Returns term, coef, std_err, z, p_value, ci_low, ci_high
    (the last row, "task Var", is the random-intercept variance)."""
    _require(gains, GAIN_KEYS + ["gain", "student_params", "teacher_accuracy"], "gains")
    d = _main_condition(gains)
    d = d[d["task"] != AVERAGE].dropna(subset=["gain", "student_params", "teacher_accuracy"])
    d = d.assign(log_student_params=np.log(d["student_params"].astype(float)))
    candidates = {"log_student_params": "log_student_params",
                  "teacher_accuracy": "teacher_accuracy", "method": "C(method)"}
    terms = [t for c, t in candidates.items() if d[c].nunique() > 1]
    dropped = [c for c, t in candidates.items() if t not in terms]
    if dropped:
        warnings.warn(f"mixed_model: {dropped} do not vary and are left out", stacklevel=2)
    if not terms:
        raise ValueError("mixed_model: no predictor varies in the gains")
    if d["task"].nunique() < 2:
        raise ValueError("mixed_model: a random intercept per task needs at least 2 tasks")
    formula = "gain ~ " + " + ".join(terms)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = smf.mixedlm(formula, d, groups=d["task"]).fit(reml=True)
        except np.linalg.LinAlgError as err:
            raise ValueError(f"mixed_model: singular design for {formula!r} ({err})") from err
    variance = float(np.asarray(fit.cov_re)[0, 0])
    singular = (not fit.converged or variance < 1e-8 * max(float(fit.scale), 1e-12)
                or any(issubclass(w.category, ConvergenceWarning) for w in caught))
    if singular:
        warnings.warn(f"mixed_model: singular or non-converged fit (task-intercept variance "
                      f"{variance:.3g}); the task random effect is not identified and the fixed "
                      "effects are close to an OLS fit", RuntimeWarning, stacklevel=2)
    ci = fit.conf_int()
    out = pd.DataFrame({"term": fit.params.index.str.replace("Group Var", "task Var"),
                        "coef": fit.params.to_numpy(), "std_err": fit.bse.to_numpy(),
                        "z": fit.tvalues.to_numpy(), "p_value": fit.pvalues.to_numpy(),
                        "ci_low": ci[0].to_numpy(), "ci_high": ci[1].to_numpy()})
    out.attrs.update(formula=formula, n=len(d), n_tasks=int(d["task"].nunique()), singular=singular)
    return out


# --------------------------------------------------------------------------- the authors' tables
#: Items per math test set (the authors' tables hold accuracies only).
MATH_TASK_SIZES = {"gsm8k": 1319, "SVAMP": 1000, "MultiArith": 600, "SingleEq": 508,
                   "AddSub": 395, "AQuA": 254}
_AUTHOR_METHOD = re.compile(r"^student_(KD|RevKD|GKD)(_base_teacher)?_temp_(\d+(?:\.\d+)?)$")
_AUTHOR_NAMES = {"KD": "SeqKD", "RevKD": "RevKD", "GKD": "GKD"}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)B$")


def _size_b(name: str) -> float:
    m = _SIZE.search(name)
    if not m:
        raise ValueError(f"cannot read a size in billions from model name {name!r}")
    return float(m.group(1))


def _parse_results_table(df: pd.DataFrame, source: str) -> pd.DataFrame:
    _require(df, ["Teacher", "Student", "Method", AVERAGE], source)
    tasks = [c for c in df.columns if c not in ("Teacher", "Student", "Method")]
    rows = []
    for _, r in df.iterrows():
        student, method = str(r["Student"]), str(r["Method"])
        teacher, temperature, teacher_kind = "", np.nan, ""
        if method == "BaseModel":
            kind, name, model = "base", "base", f"{student} (base)"
        elif method == "SFT":
            kind, name, model = "sft", "sft", student
        else:
            m = _AUTHOR_METHOD.match(method)
            if not m:
                raise ValueError(f"{source}: unknown Method {method!r}")
            kind, name, temperature = "kd", _AUTHOR_NAMES[m.group(1)], float(m.group(3))
            teacher = str(r["Teacher"]).split("_")[0]
            teacher_kind = "base" if m.group(2) else "sft"
            model = f"{student}-{name}-tau{temperature:g}-from-{teacher}" + (
                "-base-teacher" if m.group(2) else "")
        for task in tasks:
            rows.append(dict(
                model=model, kind=kind, student=student, teacher=teacher, method=name,
                temperature=temperature, noise=0.0, teacher_kind=teacher_kind, seed=0, task=task,
                domain="math", n=MATH_TASK_SIZES.get(task), accuracy=float(r[task]),
                ci_low=np.nan, ci_high=np.nan, student_params=int(round(_size_b(student) * 1e9)),
                teacher_params=_size_b(teacher) * 1e9 if teacher else np.nan,
                cell_id=f"kd_generalization/{source}"))
    out = pd.DataFrame(rows)
    out["n"] = out["n"].astype("Int64")
    return out


def _parse_pair_table(df: pd.DataFrame, source: str, column: str, results: pd.DataFrame) -> pd.DataFrame:
    """The authors' per-pair table: SFT rows are the SFT student vs the teacher; the one KD row
    per pair is attached, as in their notebook, to every KD model of that pair."""
    _require(df, ["Teacher", "Student", "Method"], source)
    tasks = [c for c in df.columns if c not in ("Teacher", "Student", "Pair", "Method")]
    kd = results[(results["kind"] == "kd") & (results["teacher_kind"] == "sft")]
    kd_models = kd.groupby(["teacher", "student"])["model"].unique()
    rows = []
    for _, r in df.iterrows():
        teacher, student, method = str(r["Teacher"]), str(r["Student"]), str(r["Method"])
        if method == "SFT":
            models = [student]
        elif method == "KD":
            if (teacher, student) not in kd_models.index:
                raise ValueError(f"{source}: no KD results for the pair {teacher} -> {student}")
            models = list(kd_models[(teacher, student)])
        else:
            raise ValueError(f"{source}: unknown Method {method!r} (expected SFT or KD)")
        rows += [dict(model=m, teacher=teacher, task=t, value=float(r[t]),
                      n=MATH_TASK_SIZES.get(t)) for m in models for t in tasks]
    return pd.DataFrame(rows).rename(columns={"value": column})


def load_kd_generalization(files: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Parse the authors' published math tables into (results, fidelity) frames of this
    repository's shapes.

    Result tables (Teacher, Student, Method, tasks..., Average): teacher checkpoint suffixes
    after the first underscore are stripped; ``student_{KD|RevKD|GKD}_temp_{t}`` becomes a kd
    row with method SeqKD / RevKD / GKD (their names; "SeqKD" is their code's token-level
    forward KL) and temperature t; ``..._base_teacher_...`` rows keep teacher_kind="base";
    BaseModel rows are kind="base". Their published "Average" column is kept as task
    "Average" (it was computed before rounding; use ``gain_table(average=False)``). Student
    size = the billions in the model name. One EM*.csv (agreement) and/or one BLEU*.csv (BLEU)
    file give the fidelity frame (None without them); its chrF and teacher-correct/-wrong
    splits are NaN (not published).
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no files given")
    result_parts, pair_files = [], {}
    for path in paths:
        df = pd.read_csv(path)
        if "Pair" in df.columns:
            kind = next((k for k in ("EM", "BLEU") if path.name.upper().startswith(k)), None)
            if kind is None:
                raise ValueError(f"{path}: a per-pair table must be named EM*.csv or BLEU*.csv")
            if kind in pair_files:
                raise ValueError(f"two {kind} tables given ({pair_files[kind][0]}, {path.name}); pass one")
            pair_files[kind] = (path.name, df)
        else:
            result_parts.append(_parse_results_table(df, path.name))
    if not result_parts:
        raise ValueError("no result table (Teacher, Student, Method, ..., Average) among the files")
    results = pd.concat(result_parts, ignore_index=True)
    if not pair_files:
        return results, None
    frames = [_parse_pair_table(df, name, "agreement" if kind == "EM" else "bleu", results)
              for kind, (name, df) in pair_files.items()]
    fidelity = frames[0]
    for other in frames[1:]:
        fidelity = fidelity.merge(other.drop(columns="n"), on=["model", "teacher", "task"], how="outer")
    for column in ("agreement", "agreement_teacher_correct", "agreement_teacher_wrong", "bleu", "chrf"):
        if column not in fidelity.columns:
            fidelity[column] = np.nan
    fidelity["n"] = fidelity["n"].astype("Int64")
    return results, fidelity[["model", "teacher", "task", "agreement", "agreement_teacher_correct",
                              "agreement_teacher_wrong", "bleu", "chrf", "n"]]


# --------------------------------------------------------------------------- CLI
def _parse_tau(value: str) -> str | float:
    try:
        return _check_tau(value if value in _TAU_NAMES else float(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _reproduce(args: argparse.Namespace) -> int:
    results, fidelity = load_kd_generalization(args.kd_generalization)
    gains = gain_table(results, fidelity, tau=args.tau, average=False)
    table = all_hypotheses(gains)
    args.out.mkdir(parents=True, exist_ok=True)
    gains.to_csv(args.out / "gains.csv", index=False)
    table.to_csv(args.out / "hypotheses.csv", index=False)
    n = len(_main_condition(gains).query("task == @AVERAGE"))
    print(f"kd_generalization: {n} KD configurations (SFT'd teacher), tau aggregation "
          f"{gains.attrs['tau']!r}; {len(table)} tests -> {args.out / 'hypotheses.csv'}")
    for line in describe_hypotheses(table):
        print(" ", line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kd_utils.stats reproduce --kd-generalization FILE... --out DIR [--tau max]``"""
    parser = argparse.ArgumentParser(prog="python -m kd_utils.stats", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="rerun the authors' tests on their published tables")
    rep.add_argument("--kd-generalization", nargs="+", required=True, metavar="FILE",
                     help="their CSVs: math_results_main.csv, llama_math_results.csv, EM1.csv, BLEU.csv")
    rep.add_argument("--out", type=Path, required=True, help="output folder (hypotheses.csv, gains.csv)")
    rep.add_argument("--tau", type=_parse_tau, default="max",
                     help="aggregation over temperature: max (theirs), mean, or a value")
    args = parser.parse_args(argv)
    return _reproduce(args)


if __name__ == "__main__":
    raise SystemExit(main())
