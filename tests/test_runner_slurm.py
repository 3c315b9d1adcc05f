"""kd_utils.engine's SLURM executor against a real one-node cluster (tests/slurm_cluster.py).

Skipped unless slurm-wlm and munge are installed (`.ci/install_slurm.sh`) and we are root.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from slurm_cluster import local_cluster, missing_requirements

from kd_utils.engine.cells import Cell
from kd_utils.engine.schedule import run

NOTEBOOK = Path(__file__).parent / "notebooks" / "cell.ipynb"


@pytest.fixture(scope="session")
def slurm_env():
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    previous = os.environ.get("SLURM_CONF")
    with tempfile.TemporaryDirectory(prefix="kd-slurm-") as root, local_cluster(Path(root)) as env:
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]
        try:
            yield env
        finally:
            if previous is None:
                del os.environ["SLURM_CONF"]
            else:
                os.environ["SLURM_CONF"] = previous


def submissions(study: Path) -> list[Path]:
    return sorted((study / ".slurm").glob("*_submission.sh"))


def test_grid_runs_as_slurm_jobs_and_resumes(slurm_env, tmp_path):
    study, counter = tmp_path / "study", tmp_path / "counter.txt"
    a = Cell("prep", "slurm/a", NOTEBOOK, {"value": 1, "counter": str(counter)}, resources={"time_min": 5})
    b = Cell(
        "distill", "slurm/b<-a", NOTEBOOK, {"value": 2, "counter": str(counter)}, deps=(a.id,),
        resources={"cpus": 2, "mem_gb": 1, "time_min": 5},
    )
    bad = Cell("distill", "slurm/bad", NOTEBOOK, {"value": 3, "fail": True, "counter": str(counter)})
    messages: list[str] = []
    summary = run([a, b, bad], study, executor="slurm", progress=False, log=messages.append,
                  slurm={"partition": "debug"}, wait_timeout_s=300)
    assert {r.cell.name: r.status for r in summary.results} == {
        "slurm/a": "ran", "slurm/b<-a": "ran", "slurm/bad": "failed"
    }, summary.format()
    assert "running 3 cells as SLURM jobs" in messages[1]
    assert json.loads((b.output_dir(study) / "metrics.json").read_text())["threads"] == "2"
    assert "asked to fail" in (study / "distill" / f"{bad.id}.failed" / "error.txt").read_text()
    scripts = [path.read_text() for path in submissions(study)]
    assert len(scripts) == 3
    assert all(sys.executable in script and "--partition=debug" in script for script in scripts)
    assert any("--cpus-per-task=2" in script and "--mem=1GB" in script for script in scripts)

    again = run([a, b], study, executor="slurm", progress=False, log=messages.append)
    assert again.ok and again.counts == {"done": 2}
    assert len(submissions(study)) == 3
    assert Counter(counter.read_text().split()) == Counter({"1": 1, "2": 1, "3": 1})


def test_a_job_that_dies_without_a_result_fails_its_cell(slurm_env, tmp_path):
    study = tmp_path / "study"
    cell = Cell("prep", "slurm/dies", NOTEBOOK, {"value": 4})
    summary = run([cell], study, executor="slurm", progress=False, log=lambda _: None,
                  slurm={"setup": ["exit 3"]}, wait_timeout_s=120)  # the job script ends before python starts
    result = summary.results[0]
    assert result.status == "failed" and "left the queue without a result" in result.message, result.message
    assert not cell.is_complete(study) and not list((study / "prep").glob(".tmp-*"))
