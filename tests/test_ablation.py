"""Ablation views of a results table, on a synthetic grid with known structure."""
from __future__ import annotations

import pandas as pd

from kd_utils.ablation import ablation_tables


def _row(student, teacher, method, tau, noise=0.0, kind="sft", acc=50.0, task="t1"):
    return {"model": f"{student}<-{teacher}/{method}/{tau}/{noise}/{kind}", "kind": "kd", "student": student,
            "teacher": teacher, "method": method, "temperature": tau, "noise": noise, "teacher_kind": kind,
            "seed": 0, "task": task, "accuracy": acc}


def results():
    rows = []
    for task in ("t1", "t2"):
        rows += [_row("xs", "l", "fkl", tau, acc=40 + 10 * (tau == 2.0), task=task) for tau in (1.0, 2.0, 5.0)]
        rows += [_row("xs", "m", "fkl", 1.0, acc=35, task=task), _row("xs", "l", "rkl", 1.0, acc=30, task=task)]
        rows += [_row("xs", "l", "fkl", 1.0, noise=s, acc=40 - 5 * s, task=task) for s in (1.0, 5.0)]
        rows += [_row("xs", "l", "fkl", 1.0, kind="base", acc=10, task=task)]
    return pd.DataFrame(rows)


def test_temperature_view_keeps_only_runs_swept_over_temperature():
    t = ablation_tables(results())
    assert set(map(tuple, t["temperature"][["teacher", "method"]].drop_duplicates().values)) == {("l", "fkl")}
    assert "temperature 2" in t["notes"]["temperature"]


def test_noise_view_includes_the_noise_free_reference():
    noise = ablation_tables(results())["noise"]
    assert sorted(noise["noise"].unique()) == [0.0, 1.0, 5.0]
    assert noise.groupby("noise")["accuracy"].mean().is_monotonic_decreasing


def test_base_teacher_view_pairs_base_and_sft_runs():
    t = ablation_tables(results())
    kinds = t["teacher_kind"].groupby("teacher_kind")["accuracy"].mean()
    assert kinds["sft"] > kinds["base"]
    assert "base teacher" in t["notes"]["teacher expertise"]


def test_size_gap_view_compares_teachers_of_one_student():
    t = ablation_tables(results())
    assert set(t["size_gap"]["teacher"]) == {"l", "m"}
    assert "xs: l" in t["notes"]["teacher size gap"]


def test_no_ablation_axes_give_empty_views_and_no_notes():
    r = results()
    plain = r[(r["noise"] == 0) & (r["teacher_kind"] == "sft") & (r["temperature"] == 1.0) & (r["teacher"] == "l")]
    t = ablation_tables(plain)
    assert all(len(t[k]) == 0 for k in ("temperature", "noise", "teacher_kind", "size_gap"))
    assert t["notes"] == {}
