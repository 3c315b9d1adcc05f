"""End to end: the quick micro grid through every stage and notebook, then a resume.

Checks the products a user reads (the tidy tables and the rendered report), not just exit
codes. Budget: about 3 minutes on 2 cores (the notebooks' kernel starts dominate).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kd_utils.schema import RESULT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "params" / "micro_quick.yaml"


def grid(*args: str, outputs: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd_utils.grid", *args, str(QUICK), "--outputs", str(outputs)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)


@pytest.fixture(scope="module")
def study(quick_study):
    return quick_study


def test_results_table_has_every_model_and_task(study):
    path = study
    results = pd.read_csv(path / "results.csv")
    assert list(results.columns) == RESULT_COLUMNS
    # 2 SFT models + 3 KD students (fkl, rkl, gkd) on the 14 micro tasks
    assert results["model"].nunique() == 5
    assert results.groupby("model")["task"].nunique().eq(14).all()
    assert set(results["kind"]) == {"sft", "kd"}
    assert results["accuracy"].between(0, 100).all()
    kd = results[results["kind"] == "kd"]
    assert set(kd["method"]) == {"fkl", "rkl", "gkd"} and (kd["teacher"] == "micro-s").all()
    assert (kd["teacher_params"] > kd["student_params"]).all()


def test_every_prediction_is_kept(study):
    path = study
    evals = sorted((path / "evaluate").glob("*/predictions.jsonl"))
    assert len(evals) == 5
    lines = [json.loads(x) for x in evals[0].read_text().splitlines()]
    assert len(lines) == 14 * 10  # limit 10 per task
    assert {"task", "item_id", "prompt_hash", "output", "extracted", "label", "correct"} <= set(lines[0])


def test_fidelity_table_pairs_students_with_their_teacher(study):
    path = study
    fid = pd.read_csv(path / "fidelity.csv")
    assert set(fid["teacher"]) == {"micro-s"}
    assert fid["model"].nunique() == 4  # 3 KD students + the SFT student vs the teacher
    assert fid["agreement"].between(0, 100).all()


def test_report_has_its_sections_and_figures(study):
    path = study
    html = (path / "report.html").read_text()
    for title in ("Accuracy and fidelity", "Ablations", "Statistics: which factors make KD work"):
        assert title in html
    assert html.count("<img") >= 3  # accuracy heatmap and the fidelity figures at least
    assert "Temperature aggregation" in html or "temperature aggregation" in html
    assert "Traceback" not in html


def test_each_cached_run_used_the_cache_only_where_its_probe_matched_the_live_teacher(study):
    path = study
    runs = [json.loads(m.read_text()) for m in (path / "distill").glob("*/metrics.json")]
    kd = {r["method"]: r for r in runs if r["method"] != "sft"}
    for method, cached in (("fkl", "CachedTeacher"), ("rkl", "CachedTeacher"), ("gkd", "OnPolicyTeacher")):
        probe = kd[method]["cache_probe"]
        assert set(probe) >= {"loss_error", "grad_cosine", "served"}
        assert kd[method]["teacher_signal"] == (cached if probe["served"] else "LiveTeacher")
        passes = kd[method]["teacher_forward_passes"]
        # one live pass per step; with the cache, none (off-policy) or one per on-policy batch (gkd)
        assert passes == (0 if cached == "CachedTeacher" else kd[method]["on_policy_batches"]) if probe["served"] \
            else passes == kd[method]["steps"]
    assert kd["gkd"]["on_policy_batches"] > 0


def test_a_rerun_does_nothing(study):
    path = study
    proc = grid("plan", outputs=path.parent)
    assert proc.returncode == 0
    assert " todo " not in proc.stdout and "done" in proc.stdout
