"""The gain table: KD accuracy minus the student's SFT accuracy, one row per KD configuration and
task, from the tidy results (+ fidelity) tables; every statistic of the study reads it.

Accuracies, agreement and BLEU are percentages. ``accuracy`` is each row's metric (results.csv's
``metric``: accuracy, or ROUGE-L F1 in the instruction domain), so a domain's gains are in its own
metric's points. The temperature is aggregated away by a named choice (:data:`TAU_AGGREGATIONS`
or a fixed temperature). :func:`main_condition` is the paper's standard setting, the rows its
main tests use.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from .schema import (AVERAGE, FIDELITY_KEYS, GAIN_FIDELITY_COLUMNS, GAIN_INPUT_COLUMNS, GAIN_KEYS, MODEL_COLUMNS,
                     require_columns)

__all__ = ["TAU_AGGREGATIONS", "check_tau", "gain_table", "main_condition", "parse_tau"]

#: Named aggregations over the KD temperature (else a fixed temperature).
TAU_AGGREGATIONS = ("max", "mean")
#: One evaluated model in one domain: the rows of a domain's Average.
_MODEL_DOMAIN = [*MODEL_COLUMNS, "domain"]


def check_tau(tau: str | float) -> str | float:
    """``tau`` if it names an aggregation or is a positive temperature (then as a float)."""
    if isinstance(tau, str):
        if tau not in TAU_AGGREGATIONS:
            raise ValueError(f"unknown tau aggregation {tau!r}; use one of {TAU_AGGREGATIONS} or a number")
        return tau
    if isinstance(tau, (int, float)) and not isinstance(tau, bool) and np.isfinite(tau) and tau > 0:
        return float(tau)
    raise ValueError(f"tau must be 'max', 'mean' or a positive number, got {tau!r}")


def parse_tau(value: str | float) -> str | float:
    """A tau aggregation as written in a parameter or on a command line: a name, or a number."""
    return check_tau(value if value in TAU_AGGREGATIONS else float(value))


def main_condition(gains: pd.DataFrame) -> pd.DataFrame:
    """The standard setting: SFT'd teacher, no teacher-logit noise."""
    return gains[(gains["teacher_kind"] != "base") & (gains["noise"].fillna(0.0) == 0.0)]


def _domain_averages(rows: pd.DataFrame, values: list[str],
                     tasks_of: Mapping[str, frozenset]) -> pd.DataFrame:
    """Per model and domain, the mean of ``values`` over the domain's tasks ``tasks_of``
    (as the authors' "Average" column). Models lacking some of them get no Average (warned)."""
    out, incomplete = [], []
    for key, grp in rows.groupby(_MODEL_DOMAIN, dropna=False, sort=False):
        tasks = tasks_of.get(key[_MODEL_DOMAIN.index("domain")], frozenset())
        grp = grp[grp["task"].isin(tasks)]
        if frozenset(grp["task"]) != tasks:
            incomplete.append(key[0])
            continue
        row = dict(zip(_MODEL_DOMAIN, key))
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
    require_columns(results, GAIN_INPUT_COLUMNS, "results")
    tau = check_tau(tau)
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
        require_columns(fidelity, GAIN_FIDELITY_COLUMNS, "fidelity")
        fid = fidelity[list(GAIN_FIDELITY_COLUMNS)].rename(columns={"bleu": "fidelity"})
        if fid.duplicated(list(FIDELITY_KEYS)).any():
            raise ValueError("fidelity has duplicate (model, teacher, task) rows")
        kd = kd.merge(fid, on=list(FIDELITY_KEYS), how="left")
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
