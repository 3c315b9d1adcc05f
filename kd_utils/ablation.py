"""The ablation views of a results table: temperature, teacher noise, base vs SFT teacher,
and teacher size gap, each with a one-line finding generated from the numbers."""
from __future__ import annotations

import pandas as pd


def _kd(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["kind"] == "kd"]


def _best(frame: pd.DataFrame, by: str, axis: str) -> str:
    means = frame.groupby([by, axis])["accuracy"].mean()
    parts = []
    for key, sub in means.groupby(level=0):
        best = sub.idxmax()[1]
        parts.append(f"{key}: {axis} {best:g} ({sub.max():.1f}%)" if isinstance(best, float)
                     else f"{key}: {best} ({sub.max():.1f}%)")
    return "; ".join(parts)


def ablation_tables(results: pd.DataFrame) -> dict:
    """Per-task KD accuracies for each ablation axis present in the grid, plus notes."""
    kd = _kd(results)
    main = kd[(kd["teacher_kind"] == "sft") & (kd["noise"] == 0)]
    notes: dict[str, str] = {}

    runs = ["student", "teacher", "method"]
    swept = main[main["method"] != "seqkd"].groupby(runs)["temperature"].transform("nunique") > 1
    temperature = main[main["method"] != "seqkd"][swept]
    if temperature.empty:
        temperature = temperature.iloc[0:0]
    else:
        notes["temperature"] = "best temperature per student (mean accuracy over tasks): " + _best(
            temperature, "student", "temperature")

    noisy = kd[(kd["teacher_kind"] == "sft") & (kd["noise"] > 0)]
    noise = kd.iloc[0:0]
    if len(noisy):
        combos = noisy[["student", "teacher", "method", "temperature"]].drop_duplicates()
        noise = kd[kd["teacher_kind"] == "sft"].merge(combos, on=list(combos.columns))
        m = noise.groupby("noise")["accuracy"].mean()
        notes["noise"] = "mean accuracy by teacher noise sigma: " + ", ".join(f"{s:g}: {a:.1f}%" for s, a in m.items())

    base = kd[kd["teacher_kind"] == "base"]
    teacher_kind = kd.iloc[0:0]
    if len(base):
        combos = base[["student", "teacher", "method", "temperature", "noise"]].drop_duplicates()
        teacher_kind = kd.merge(combos, on=list(combos.columns))
        m = teacher_kind.groupby("teacher_kind")["accuracy"].mean()
        notes["teacher expertise"] = (f"students distilled from the SFT'd teacher average {m.get('sft', float('nan')):.1f}% "
                                      f"vs {m.get('base', float('nan')):.1f}% from the base teacher")

    multi = main.groupby("student")["teacher"].nunique()
    size_gap = main[main["student"].isin(multi[multi > 1].index)]
    if len(size_gap):
        notes["teacher size gap"] = "best teacher per student: " + _best(size_gap, "student", "teacher")
    return {"temperature": temperature, "noise": noise, "teacher_kind": teacher_kind, "size_gap": size_gap,
            "notes": notes}
