"""Tests of kd_utils.engine with the tiny notebook tests/notebooks/cell.ipynb (local executor)."""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import nbformat
import pytest

from kd_utils import provenance
from kd_utils.engine import schedule
from kd_utils.engine.cells import Cell, RunSummary
from kd_utils.engine.plan import format_plan, plan
from kd_utils.engine.schedule import run

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(__file__).parent / "notebooks" / "cell.ipynb"


def make(stage: str, name: str, value: int, deps: tuple[Cell, ...] = (), **params) -> Cell:
    return Cell(stage, name, NOTEBOOK, {"value": value, **params}, deps=tuple(d.id for d in deps))


def executions(counter: Path) -> Counter[int]:
    """How often each cell (by value) was executed: the notebook appends its value to counter."""
    return Counter(int(line) for line in counter.read_text().split()) if counter.exists() else Counter()


def statuses(summary: RunSummary) -> dict[str, str]:
    return {r.cell.name: r.status for r in summary.results}


def quiet(cells, study, **kwargs) -> tuple[RunSummary, list[str]]:
    messages: list[str] = []
    kwargs.setdefault("progress", False)
    return run(cells, study, log=messages.append, **kwargs), messages


def leftovers(study: Path) -> list[str]:
    return sorted(p.name for p in study.glob("*/.*") if p.name.startswith((".tmp-", ".trash-", ".replaced-")))


def test_cell_id_is_stable_and_content_addressed(tmp_path):
    a = Cell("distill", "x", NOTEBOOK, {"lr": 0.1, "seed": 1, "nested": {"b": 2, "a": 1}})
    b = Cell("distill", "another name", tmp_path / "cell.ipynb", {"nested": {"a": 1, "b": 2}, "seed": 1, "lr": 0.1})
    assert a.id == b.id and len(a.id) == 12 and int(a.id, 16) >= 0
    assert a.id == "5e68b73549ee"  # pinned: ids must not change across versions or machines
    assert Cell("distill", "x", NOTEBOOK, {"lr": 0.1, "seed": 2, "nested": {"a": 1, "b": 2}}).id != a.id
    assert Cell("evaluate", "x", NOTEBOOK, dict(a.parameters)).id != a.id
    assert Cell("distill", "x", "other.ipynb", dict(a.parameters)).id != a.id
    assert a.output_dir(tmp_path) == tmp_path / "distill" / a.id
    assert hash(a) == hash(b) and a == Cell("distill", "x", NOTEBOOK, dict(b.parameters))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"parameters": {"cell_dir": "x"}}, "cell_dir.*reserved"),
        ({"parameters": {"s": {1, 2}}}, "not JSON-able"),
        ({"parameters": {"x": float("nan")}}, "not JSON-able"),
        ({"resources": {"cpu": 2}}, "unknown resources"),
        ({"resources": {"cpus": 0}}, "cpus=0"),
        ({"resources": {"gpus": 0.5}}, "gpus=0.5 must be a number >= 0 \\(an integer\\)"),
        ({"stage": "logs"}, "stage 'logs'"),
        ({"stage": "a/b"}, "stage 'a/b'"),
        ({"notebook": "nb.py"}, "not an .ipynb"),
        ({"deps": "abc"}, "deps must be a sequence"),
    ],
)
def test_bad_cells_are_rejected(kwargs, match):
    args = {"stage": "s", "name": "bad-cell", "notebook": NOTEBOOK, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        Cell(**args)


def test_graph_errors_are_raised_before_anything_runs(tmp_path):
    study = tmp_path / "study"
    a = make("prep", "a", 1)
    with pytest.raises(ValueError, match="'b' depends on unknown cell id 'feedfeedfeed'"):
        run([a, Cell("prep", "b", NOTEBOOK, {"value": 2}, deps=("feedfeedfeed",))], study)
    x = Cell("prep", "x", NOTEBOOK, {"value": 3}, deps=(make("prep", "y", 4).id,))
    y = Cell("prep", "y", NOTEBOOK, {"value": 4}, deps=(x.id,))
    with pytest.raises(ValueError, match="dependency cycle: .*x.*y|dependency cycle: .*y.*x"):
        run([a, x, y], study)
    with pytest.raises(ValueError, match="same id"):
        plan([a, make("prep", "a-again", 1)], study)
    with pytest.raises(ValueError, match=r"\['nothing\*'\] match no cell"):
        run([a], study, only=["nothing*"])
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        run([Cell("prep", "m", tmp_path / "missing.ipynb", {})], study)
    with pytest.raises(ValueError, match="executor"):
        run([a], study, executor="dask")
    assert not study.exists()


def test_a_cell_made_by_other_code_is_stale_in_the_plan_and_rerun_stale_redoes_only_it(tmp_path):
    study, counter = tmp_path / "study", tmp_path / "counter.txt"
    a, b = make("prep", "prep/a", 1, counter=str(counter)), make("prep", "prep/b", 2, counter=str(counter))
    quiet([a, b], study)
    recorded = json.loads((a.output_dir(study) / "provenance.json").read_text())
    assert recorded == {"code": provenance.code_version(NOTEBOOK)}
    (a.output_dir(study) / "provenance.json").write_text(json.dumps({"code": "another"}))
    table = plan([a, b], study)
    assert dict(zip(table["name"], table["status"])) == {"prep/a": "stale", "prep/b": "done"}
    assert "prep: 2 cells (1 done, 1 stale)" in format_plan(table)
    kept, _ = quiet([a, b], study)
    assert statuses(kept) == {"prep/a": "done", "prep/b": "done"}, "stale cells stay unless asked"
    redone, messages = quiet([a, b], study, rerun_stale=True)
    assert statuses(redone) == {"prep/a": "ran", "prep/b": "done"} and executions(counter) == Counter({1: 2, 2: 1})
    assert "rerun-stale: re-running 1 complete cells" in messages
    assert set(plan([a, b], study)["status"]) == {"done"}


def test_runs_selected_cells_in_dependency_order_then_has_nothing_to_do(tmp_path):
    study, counter = tmp_path / "study", tmp_path / "counter.txt"
    a = make("prep", "prep/a", 1, counter=str(counter))
    b = make("distill", "distill/b<-a", 2, (a,), counter=str(counter))
    c = make("other", "other/c", 3, counter=str(counter))
    cells = [b, c, a]
    before = plan(cells, study, cost=lambda cell: cell.parameters["value"])
    assert list(before.columns) == ["stage", "name", "id", "status", "cost"]
    assert list(before["stage"]) == ["prep", "other", "distill"]
    assert set(before["status"]) == {"todo"}
    assert "prep: 1 cell (1 todo, cost 1)" in format_plan(before)

    only_b, _ = quiet(cells, study, only=[b.id])
    assert statuses(only_b) == {"distill/b<-a": "blocked"}
    assert "needs prep/a (incomplete, not selected)" in only_b.results[0].message
    only_c, _ = quiet(cells, study, only=["other/*"])
    assert statuses(only_c) == {"other/c": "ran"} and executions(counter) == Counter({3: 1})

    summary, messages = quiet(cells, study, max_workers=2, progress=True)
    assert summary.ok and statuses(summary) == {"prep/a": "ran", "distill/b<-a": "ran", "other/c": "done"}
    assert counter.read_text().split() == ["3", "1", "2"]
    metrics = json.loads((a.output_dir(study) / "metrics.json").read_text())
    kernel = {k: metrics.pop(k) for k in ("pid", "preloaded", "torch_threads")}  # tests/test_warm_kernels.py
    assert kernel["preloaded"] and kernel["torch_threads"] == 1
    assert metrics == {"value": 1, "threads": "1", "omp": "1", "cwd": str(NOTEBOOK.parent), "python": sys.executable,
                       "transport": "ipc"}  # Unix sockets: no TCP port races between workers' kernels
    assert (a.output_dir(study) / "out.txt").read_text() == "1\n"
    executed = nbformat.read(a.output_dir(study) / "notebook.ipynb", as_version=4)
    assert any("injected-parameters" in cell.metadata.get("tags", []) for cell in executed.cells)
    assert "value=1 threads=1" in (study / "logs" / f"{a.id}.log").read_text()
    assert "distill: 1 cell (1 todo)" in messages[0] and "2 worker processes x 1 threads" in messages[1]
    assert "total: 2 ran, 1 done" in messages[-1] and "distill/b<-a" in messages[-1]

    assert set(plan(cells, study)["status"]) == {"done"}
    again, _ = quiet(cells, study)
    assert again.ok and again.counts == {"done": 3}
    assert executions(counter) == Counter({1: 1, 2: 1, 3: 1})
    assert leftovers(study) == []


def test_failure_is_recorded_isolated_and_retried(tmp_path):
    study, counter, flag = tmp_path / "study", tmp_path / "counter.txt", tmp_path / "fail-now"
    flag.touch()
    good = make("prep", "good", 1, counter=str(counter))
    bad = make("prep", "bad", 2, counter=str(counter), fail_if=str(flag))
    after = make("evaluate", "after-bad", 3, (bad,), counter=str(counter))
    cells = [good, bad, after]

    summary, messages = quiet(cells, study)
    assert not summary.ok
    assert statuses(summary) == {"good": "ran", "bad": "failed", "after-bad": "blocked"}
    assert summary.counts == {"ran": 1, "failed": 1, "blocked": 1}
    assert "needs bad (failed)" in summary.with_status("blocked")[0].message
    assert any(m.startswith("FAILED: prep bad") and "asked to fail (value=2)" in m for m in messages)
    record = study / "prep" / f"{bad.id}.failed"
    assert "RuntimeError: asked to fail (value=2)" in (record / "error.txt").read_text()
    assert "value=2" in (record / "log.txt").read_text()
    partial = nbformat.read(record / "notebook.ipynb", as_version=4)
    assert any(o.get("output_type") == "error" for cell in partial.cells for o in cell.get("outputs", []))
    assert not bad.output_dir(study).exists()
    assert dict(zip(plan(cells, study)["name"], plan(cells, study)["status"])) == {
        "good": "done", "bad": "failed-before", "after-bad": "todo"
    }

    flag.unlink()
    rerun, _ = quiet(cells, study)
    assert rerun.ok and statuses(rerun) == {"good": "done", "bad": "ran", "after-bad": "ran"}
    assert executions(counter) == Counter({1: 1, 2: 2, 3: 1})
    assert not record.exists() and leftovers(study) == []


def test_force_replaces_a_result_only_when_the_new_run_succeeds(tmp_path):
    study, flag = tmp_path / "study", tmp_path / "fail-now"
    cell = make("distill", "forced", 1, fail_if=str(flag))
    metrics = cell.output_dir(study) / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"value": "old"}')

    flag.touch()
    failed, messages = quiet([cell], study, force=True)
    assert statuses(failed) == {"forced": "failed"} and "force: re-running 1 complete cells" in messages
    assert metrics.read_text() == '{"value": "old"}'
    assert (study / "distill" / f"{cell.id}.failed" / "error.txt").exists()

    flag.unlink()
    forced, _ = quiet([cell], study, force=True, max_workers=1)
    assert statuses(forced) == {"forced": "ran"}
    assert json.loads(metrics.read_text())["threads"] == str(len(os.sched_getaffinity(0)))
    assert not (study / "distill" / f"{cell.id}.failed").exists() and leftovers(study) == []


def test_partial_outputs_are_never_complete(tmp_path):
    study = tmp_path / "study"
    silent = make("prep", "no-metrics", 1, write_metrics=False)
    cell = make("prep", "stale", 2)
    stale = cell.output_dir(study)
    stale.mkdir(parents=True)
    (stale / "out.txt").write_text("stale\n")
    killed = study / "prep" / f".tmp-{cell.id}-0badcafe"  # a killed run's temp dir, even with metrics.json
    killed.mkdir()
    (killed / "metrics.json").write_text("{}")
    assert set(plan([silent, cell], study)["status"]) == {"todo"}

    summary, _ = quiet([silent, cell], study)
    assert statuses(summary) == {"no-metrics": "failed", "stale": "ran"}
    assert "notebook did not write metrics.json" in summary.with_status("failed")[0].message
    assert not silent.output_dir(study).exists()
    assert (stale / "out.txt").read_text() == "2\n"
    assert leftovers(study) == []


def test_a_kernel_killed_by_a_signal_is_reported_with_its_cause(tmp_path):
    """SIGKILL, as the out-of-memory killer sends it: the message names the signal, says it was
    likely out of memory and gives the kernel's last measured peak resident memory."""
    study = tmp_path / "study"
    cell = make("prep", "oom", 1, hold_mb=200, sleep=1.5, kill_signal=int(signal.SIGKILL))
    summary, messages = quiet([cell], study)
    assert statuses(summary) == {"oom": "failed"}
    error = (study / "prep" / f"{cell.id}.failed" / "error.txt").read_text()
    for text in (summary.results[0].message, error, next(m for m in messages if m.startswith("FAILED"))):
        assert "killed by signal SIGKILL" in text and "likely out of memory" in text
    peak = float(re.search(r"peak resident memory was ([\d.]+) GB", error).group(1))
    assert 0.2 <= peak < 4


def test_result_moved_aside_by_a_killed_replacement_is_restored(tmp_path):
    study = tmp_path / "study"
    cell = make("prep", "restored", 1)
    aside = study / "prep" / f".replaced-{cell.id}-12ab34cd"
    aside.mkdir(parents=True)
    (aside / "metrics.json").write_text('{"value": 1}')
    summary, _ = quiet([cell], study)
    assert statuses(summary) == {"restored": "done"}
    assert (cell.output_dir(study) / "metrics.json").read_text() == '{"value": 1}'
    assert leftovers(study) == []


def test_a_cell_removes_its_own_leftovers_when_it_executes(tmp_path, monkeypatch):
    """A killed worker can hold its cell's lock while the next run tidies; the cell then tidies itself."""
    study = tmp_path / "study"
    cell, other = make("prep", "rerun", 1), make("prep", "untouched", 2)
    stale = [study / "prep" / f".tmp-{cell.id}-0badcafe", study / "prep" / f".trash-{cell.id}-1badcafe"]
    foreign = study / "prep" / f".tmp-{other.id}-2badcafe"
    for path in (*stale, foreign):
        path.mkdir(parents=True)
        (path / "partial.txt").write_text("killed\n")
    monkeypatch.setattr(schedule, "tidy", lambda *args: None)  # as if every lock were still held
    summary, _ = quiet([cell], study)
    assert statuses(summary) == {"rerun": "ran"}
    assert not any(path.exists() for path in stale)
    assert foreign.is_dir()  # another cell's leftovers wait for that cell or for a later tidy


def test_cells_locked_by_another_runner_are_skipped(tmp_path):
    study = tmp_path / "study"
    held = make("prep", "held", 1)
    after = make("evaluate", "after-held", 3, (held,))
    locks = study / ".locks"
    locks.mkdir(parents=True)
    handles = []
    for name in (held.id, "study"):
        handle = open(locks / f"{name}.lock", "w")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("pid 4242 on elsewhere")
        handle.flush()
        handles.append(handle)
    try:
        summary, messages = quiet([held, after], study)
    finally:
        for handle in handles:
            handle.close()
    assert "another runner (pid 4242 on elsewhere) is running study" in messages[0]
    assert statuses(summary) == {"held": "locked", "after-held": "blocked"}
    assert "cell held is being run by another runner (pid 4242 on elsewhere)" in summary.results[0].message
    assert not (study / "logs" / f"{held.id}.log").exists()


RUNNER_SCRIPT = """
import json, sys
from kd_utils.engine.cells import Cell
from kd_utils.engine.schedule import run
args = json.loads(sys.argv[1])
cells = [Cell(**cell) for cell in args.pop("cells")]
summary = run(cells, args.pop("study"), progress=False, **args)
print("STATUSES " + json.dumps({r.cell.name: r.status for r in summary.results}))
"""


def start_runner(cells: list[Cell], study: Path, **kwargs) -> subprocess.Popen[str]:
    """A runner in its own process group; its processes (kernels too) carry KD_TEST_RUNNER=<study>."""
    spec = [{"stage": c.stage, "name": c.name, "notebook": str(c.notebook), "parameters": c.parameters} for c in cells]
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER_SCRIPT, json.dumps({"cells": spec, "study": str(study), **kwargs})],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "KD_TEST_RUNNER": str(study)},
    )


def wait_for_exit_of_processes_from(study: Path, group: int, timeout: float = 20.0) -> None:
    """Wait for the killed runner's process group (its workers) and its kernels to be gone.

    Kernels live in their own sessions, carry KD_TEST_RUNNER=<study> and exit within about 1 s of
    their worker's death. A dying process loses its environment before its files (and flocks), so
    processes are followed by pid, once seen, until they are gone or zombies.
    """
    marker = f"KD_TEST_RUNNER={study}".encode()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        for proc in Path("/proc").glob("[0-9]*"):
            stat = process_stat(proc.name)
            try:
                if (stat and stat[1] == group) or marker in (proc / "environ").read_bytes().split(b"\0"):
                    seen.add(proc.name)
            except OSError:
                continue
        alive = [pid for pid in sorted(seen) if (stat := process_stat(pid)) and stat[0] not in ("Z", "X")]
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes {alive} outlived their runner"
        time.sleep(0.2)


def process_stat(pid: str) -> tuple[str, int] | None:
    """(state letter, process group) from /proc/<pid>/stat; None if there is no such process."""
    try:
        stat = (Path("/proc") / pid / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[2])


def runner_statuses(output: str) -> dict[str, str]:
    line = next(line for line in output.splitlines() if line.startswith("STATUSES "))
    return json.loads(line.removeprefix("STATUSES "))


def test_kill_mid_grid_loses_no_finished_work(tmp_path):
    study, counter = tmp_path / "study", tmp_path / "counter.txt"
    cells = [make("distill", f"sleepy-{i}", i, counter=str(counter), sleep=0.5) for i in range(6)]
    runner = start_runner(cells, study, max_workers=2)
    deadline = time.monotonic() + 120
    while True:
        done = {c.name for c in cells if (c.output_dir(study) / "metrics.json").exists()}
        running = list((study / "distill").glob(".tmp-*")) if (study / "distill").is_dir() else []
        if done and running:
            break
        assert runner.poll() is None and time.monotonic() < deadline, "the runner ended before it could be killed"
        time.sleep(0.05)
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait()
    wait_for_exit_of_processes_from(study, group=runner.pid)
    assert len(done) < 6
    stamps = {c.name: os.stat(c.output_dir(study) / "metrics.json").st_ino for c in cells if c.name in done}
    table = plan(cells, study)
    assert set(table.loc[table["status"] == "done", "name"]) == set(stamps)

    summary, messages = quiet(cells, study, max_workers=2)
    assert summary.ok, "\n".join(messages)
    assert {name for name, status in statuses(summary).items() if status == "done"} == set(stamps)
    assert {c.name: os.stat(c.output_dir(study) / "metrics.json").st_ino for c in cells if c.name in done} == stamps
    counts = executions(counter)
    assert all(counts[c.parameters["value"]] == 1 for c in cells if c.name in done)
    assert all(counts[c.parameters["value"]] in (1, 2) for c in cells)
    assert leftovers(study) == []
    assert not [p for c in cells for p in Path(tempfile.gettempdir()).glob(f"kd-kernel-{c.id}-*")]


def test_two_runners_on_one_study_execute_each_cell_once(tmp_path):
    study, counter = tmp_path / "study", tmp_path / "counter.txt"
    cells = [make("distill", f"shared-{i}", i, counter=str(counter), sleep=0.5) for i in range(4)]
    runners = [start_runner(cells, study, max_workers=1) for _ in range(2)]
    outputs = [r.communicate(timeout=180)[0] for r in runners]
    results = [runner_statuses(out) for out in outputs]
    assert executions(counter) == Counter(range(4))
    assert all(c.is_complete(study) for c in cells)
    for cell in cells:
        seen = sorted(result[cell.name] for result in results)
        assert seen in (["done", "ran"], ["locked", "ran"]), (cell.name, seen)
    assert any("another runner (pid" in out for out in outputs)
    assert any("is being run by another runner" in out or "completed by another runner" in out for out in outputs)
    assert leftovers(study) == []
