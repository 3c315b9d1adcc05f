"""The report's opening summary: the study's findings on the paper's questions, each with its
effect, 95% CI over seeds, n, and whether it matches the paper.

Every effect is on the *overall* accuracy of a run: the mean over domains of its mean over the
domain's tasks (the authors' "Average" column, domains weighted equally). Differences are
paired: the two runs of one difference share student, method and seed, so seed noise shared by
both cancels. The interval is Student's t over those pairs (none with fewer than two).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from .schema import AVERAGE

# The paper's findings the summary is checked against (../shared/MISSION.md; arXiv 2505.15442).
PAPER = {
    "h1": "small students gain up to ~10 points on average",
    "h3": "gains fall with student size (~10 points for small students, ~1.3 for large)",
    "h2": "teacher accuracy barely predicts gains (a 1.5B student learns best from the 7B teacher, not the 14B)",
    "tau": "tau = 5 collapses small students",
    "noise": "sigma = 5 noise on the teacher's logits destroys KD",
    "base": "a base (not task-SFT'd) teacher gives large drops",
    "h5": "KD raises accuracy without keeping the teacher's reasoning (gains barely follow fidelity)",
}
RUN_KEYS = ["teacher", "student", "method", "noise", "teacher_kind", "seed"]


@dataclass(frozen=True)
class Finding:
    """One summary line and the numbers behind it (`matches`: None when not testable)."""
    key: str
    text: str
    estimate: float
    ci_low: float
    ci_high: float
    n: int
    matches: bool | None


def mean_ci(values) -> tuple[float, float, float, int]:
    """Mean, 95% t-interval (NaN below two values) and n of `values` (NaNs dropped)."""
    x = np.asarray(pd.Series(values, dtype=float).dropna())
    n = len(x)
    if n < 2:
        return (float(x[0]) if n else np.nan), np.nan, np.nan, n
    if x.std(ddof=1) == 0:
        return float(x[0]), float(x[0]), float(x[0]), n
    low, high = sps.t.interval(0.95, n - 1, loc=x.mean(), scale=x.std(ddof=1) / np.sqrt(n))
    return float(x.mean()), float(low), float(high), n


def _effect(mean: float, low: float, high: float, n: int, unit: str = "seeds") -> str:
    ci = f"95% CI {low:+.1f} to {high:+.1f}, " if not np.isnan(low) else "no CI, "
    return f"{mean:+.1f} points ({ci}{n} {unit if n != 1 else unit[:-1]})"


def run_averages(results: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated model: its keys and `overall` accuracy (mean over domains of the
    mean over each domain's tasks)."""
    keys = ["model", "kind", *RUN_KEYS, "temperature", "student_params", "teacher_params"]
    per_domain = results.groupby(["model", "domain"], dropna=False)["accuracy"].mean().rename("acc").reset_index()
    overall = per_domain.groupby("model")["acc"].mean().rename("overall")
    first = results.drop_duplicates("model").set_index("model")
    out = first[[k for k in keys if k != "model"]].join(overall).reset_index()
    out["noise"] = out["noise"].fillna(0.0)
    return out


def gain_averages(gains: pd.DataFrame) -> pd.DataFrame:
    """One row per KD run of a gain table: its keys, `gain` and `fidelity` (when present) as the
    mean over the domains' Average rows, and the teacher's overall accuracy."""
    avg = gains[gains["task"] == AVERAGE]
    values = ["gain", "teacher_accuracy", "student_params", "teacher_params"]
    return avg.groupby(RUN_KEYS, dropna=False)[values].mean().reset_index()


def _main(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["teacher_kind"] == "sft") & (frame["noise"].fillna(0.0) == 0.0)]


def _verdict(matches: bool | None) -> str:
    return {True: "as the paper", False: "not as the paper", None: "not testable here"}[matches]


def h1_smallest_student(runs: pd.DataFrame) -> Finding | None:
    """KD vs SFT for the smallest student from its largest teacher, per method over seeds."""
    main = _main(runs)
    if main.empty:
        return None
    student = main.loc[main["student_params"].idxmin(), "student"]
    mine = main[main["student"] == student]
    teacher = mine.loc[mine["teacher_params"].idxmax(), "teacher"]
    mine = mine[mine["teacher"] == teacher]
    parts, best, reproduced = [], None, []
    for method, rows in mine.groupby("method", sort=False):
        m, lo, hi, n = mean_ci(rows["gain"])
        parts.append(f"{method} {_effect(m, lo, hi, n)}")
        if best is None or m > best[0]:
            best = (m, lo, hi, n)
        if lo > 0:
            reproduced.append(method)
    testable = best[3] > 1
    matches = bool(reproduced) if testable else None
    beyond = (f"beats SFT beyond seed noise: {', '.join(reproduced)}" if reproduced
              else "no method beats SFT beyond seed noise")
    text = (f"KD vs SFT for the smallest student, {student} <- {teacher}: {'; '.join(parts)}. {beyond[0].upper()}{beyond[1:]}; "
            f"the paper: {PAPER['h1']} ({_verdict(matches)}).")
    return Finding("h1", text, *best, matches)


def _paired(runs: pd.DataFrame, pair_on: list[str], side: str, first, second) -> pd.Series:
    """Per `pair_on` group: value of `side`==first minus `side`==second (`gain` column)."""
    a = runs[runs[side] == first].set_index(pair_on)["gain"]
    b = runs[runs[side] == second].set_index(pair_on)["gain"]
    return (a - b).dropna()


def _several(main: pd.DataFrame, key: str, other: str) -> pd.DataFrame:
    """The rows whose `key` (a teacher or student) comes with more than one `other`."""
    return main[main.groupby(key)[other].transform("nunique") > 1]


def h3_student_size(runs: pd.DataFrame) -> Finding | None:
    """Gain of the smallest minus the largest student of one teacher, paired by method and seed."""
    main = _main(runs)
    candidates = _several(main, "teacher", "student")
    if candidates.empty:
        return None
    teacher = candidates.sort_values("teacher_params").iloc[-1]["teacher"]
    mine = main[main["teacher"] == teacher]
    sizes = mine.groupby("student")["student_params"].first().sort_values()
    small, large = sizes.index[0], sizes.index[-1]
    m, lo, hi, n = mean_ci(_paired(mine, ["method", "seed"], "student", small, large))
    matches = None if np.isnan(lo) else bool(lo > 0)
    text = (f"Gains and student size, teacher {teacher}: {small} gains {_effect(m, lo, hi, n, 'method x seed pairs')} "
            f"more than {large}; the paper: {PAPER['h3']} ({_verdict(matches)}).")
    return Finding("h3", text, m, lo, hi, n, matches)


def h2_teacher_accuracy(runs: pd.DataFrame) -> Finding | None:
    """Gain from a student's more accurate teacher minus from its less accurate one."""
    main = _main(runs)
    candidates = _several(main, "student", "teacher")
    if candidates.empty:
        return None
    student = candidates.sort_values("student_params").iloc[0]["student"]
    mine = main[main["student"] == student]
    acc = mine.groupby("teacher")["teacher_accuracy"].mean().sort_values()
    weak, strong = acc.index[0], acc.index[-1]
    m, lo, hi, n = mean_ci(_paired(mine, ["method", "seed"], "teacher", strong, weak))
    matches = None if np.isnan(lo) else bool(lo <= 0 <= hi or abs(m) < 1.0)
    text = (f"Teacher accuracy, student {student}: its more accurate teacher {strong} ({acc[strong]:.1f}%) gives "
            f"{_effect(m, lo, hi, n, 'method x seed pairs')} of gain over {weak} ({acc[weak]:.1f}%); "
            f"the paper: {PAPER['h2']} ({_verdict(matches)}).")
    return Finding("h2", text, m, lo, hi, n, matches)


def _ablation(runs: pd.DataFrame, axis: str, treated, control, key: str, what: str) -> Finding | None:
    """Overall accuracy of runs at axis==treated minus the same runs at axis==control, per seed."""
    kd = runs[runs["kind"] == "kd"]
    other = {"temperature": ["noise", "teacher_kind"], "noise": ["temperature", "teacher_kind"],
             "teacher_kind": ["temperature", "noise"]}[axis]
    fixed = {"temperature": {"noise": 0.0, "teacher_kind": "sft"}, "noise": {"teacher_kind": "sft"},
             "teacher_kind": {"noise": 0.0}}[axis]
    for column, value in fixed.items():
        kd = kd[kd[column] == value]
    treated_rows = kd[kd[axis] == treated]
    if treated_rows.empty:
        return None
    pair_on = ["teacher", "student", "method", "seed"] + [c for c in other if c not in fixed]
    a = treated_rows.set_index(pair_on)["overall"]
    b = kd[kd[axis] == control].set_index(pair_on)["overall"]
    diff = (a - b).dropna()
    if diff.empty:
        return None
    m, lo, hi, n = mean_ci(diff)
    matches = None if np.isnan(hi) else bool(hi < 0)
    runs_named = ", ".join(sorted({f"{t}->{s} {me}" for t, s, me, *_ in diff.index}))
    shown = f"{control:g}" if isinstance(control, float) else control
    text = (f"{what} ({runs_named}): overall accuracy {_effect(m, lo, hi, n, 'seeds')} against "
            f"{axis.replace('_', ' ')} {shown}; the paper: {PAPER[key]} ({_verdict(matches)}).")
    return Finding(key, text, m, lo, hi, n, matches)


def h5_fidelity(gains: pd.DataFrame) -> Finding | None:
    """Spearman correlation of per-task gains with rationale fidelity (BLEU), main condition."""
    if "fidelity" not in gains:
        return None
    d = _main(gains[gains["task"] != AVERAGE])[["gain", "fidelity"]].dropna()
    if len(d) < 3 or d["gain"].nunique() < 2 or d["fidelity"].nunique() < 2:
        return None
    rho, p = sps.spearmanr(d["gain"], d["fidelity"])
    matches = bool(p >= 0.05 or abs(rho) < 0.3)
    text = (f"Accuracy vs fidelity: per-task gains and rationale BLEU to the teacher correlate with Spearman "
            f"rho = {rho:.2f} (p = {p:.2g}, n = {len(d)} run x task rows); the paper: {PAPER['h5']} "
            f"({_verdict(matches)}).")
    return Finding("h5", text, float(rho), np.nan, np.nan, len(d), matches)


def collapses(models: pd.DataFrame, answered: Callable[[str], float] | None = None,
              below: float = 0.5) -> list[Finding]:
    """KD runs of the main condition whose overall accuracy is under `below` x their student's SFT of
    the same seed, one line per (teacher, student, method) with the measured share of test items
    whose output carries an extractable answer (`answered(model)`, 0-1), against the SFT's."""
    kd = _main(models[models["kind"] == "kd"])
    sft = models[models["kind"] == "sft"].set_index(["student", "seed"])
    kd = kd.assign(sft=[sft["overall"].get((s, seed), np.nan) for s, seed in zip(kd["student"], kd["seed"])],
                   sft_model=[sft["model"].get((s, seed)) for s, seed in zip(kd["student"], kd["seed"])])
    out = []
    for (teacher, student, method), rows in kd.groupby(["teacher", "student", "method"], sort=False):
        down = rows[rows["overall"] < below * rows["sft"]]
        if down.empty:
            continue
        m, lo, hi, n = mean_ci(down["overall"] - down["sft"])
        why = ""
        if answered is not None:
            kd_share = np.mean([answered(x) for x in down["model"]])
            sft_share = np.mean([answered(x) for x in down["sft_model"]])
            why = (f"; its outputs carry an extractable answer on {100 * kd_share:.0f}% of test items against "
                   f"{100 * sft_share:.0f}% for SFT: it stops producing the answer format")
        text = (f"Collapse: {method} for {student} <- {teacher} ({len(down)} of {len(rows)} seeds) averages "
                f"{down['overall'].mean():.1f}% against SFT {down['sft'].mean():.1f}% "
                f"({_effect(m, lo, hi, n)}){why}; the paper reports no collapse.")
        out.append(Finding(f"collapse {method} {teacher}->{student}", text, m, lo, hi, n, False))
    return out


def findings(results: pd.DataFrame, gains: pd.DataFrame,
             answered: Callable[[str], float] | None = None) -> list[Finding]:
    """The summary's findings that this study's grid can test, in the paper's order, then any
    collapsed KD runs (see `collapses`)."""
    runs = gain_averages(gains)
    models = run_averages(results)
    kd_temps = models[models["kind"] == "kd"]["temperature"]
    high_tau = kd_temps.max() if len(kd_temps) else np.nan
    noises = models["noise"][models["noise"] > 0]
    found = [
        h1_smallest_student(runs),
        h3_student_size(runs),
        h2_teacher_accuracy(runs),
        _ablation(models, "temperature", high_tau, 1.0, "tau", f"Temperature {high_tau:g}") if high_tau > 1 else None,
        _ablation(models, "noise", noises.max(), 0.0, "noise", f"Teacher noise sigma {noises.max():g}")
        if len(noises) else None,
        _ablation(models, "teacher_kind", "base", "sft", "base", "Base teacher"),
        h5_fidelity(gains),
    ]
    return [f for f in found if f is not None] + collapses(models, answered)
