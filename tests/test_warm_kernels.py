"""Tests of kd_utils.warm_kernels: kernels forked from a server that has imported the study's modules."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from jupyter_client.connect import write_connection_file

from kd_utils import warm_kernels
from kd_utils.engine.cells import Cell
from kd_utils.engine.schedule import run

NOTEBOOK = Path(__file__).parent / "notebooks" / "cell.ipynb"

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="warm kernels fork")


def metrics_of(study: Path, cells: list[Cell]) -> list[dict]:
    return [json.loads((c.output_dir(study) / "metrics.json").read_text()) for c in cells]


def test_warm_kernels_are_fresh_processes_with_the_modules_imported(tmp_path):
    cells = [Cell("s", f"c{i}", NOTEBOOK, {"value": i}) for i in range(3)]
    summary = run(cells, tmp_path, max_workers=1, threads_per_worker=1, progress=False, log=lambda _: None)
    assert summary.ok
    found = metrics_of(tmp_path, cells)
    assert [m["value"] for m in found] == [0, 1, 2]
    assert all(m["preloaded"] and m["torch_threads"] == 1 and m["threads"] == "1" for m in found)
    assert len({m["pid"] for m in found}) == 3  # one process per cell: nothing leaks between cells
    assert all(m["transport"] == "ipc" and m["cwd"] == str(NOTEBOOK.parent) for m in found)
    log = (tmp_path / "logs" / f"{cells[0].id}.log").read_text()
    assert "warm kernel" in log


def test_cold_kernels_when_asked(tmp_path):
    cell = Cell("s", "cold", NOTEBOOK, {"value": 7})
    summary = run([cell], tmp_path, max_workers=1, progress=False, log=lambda _: None, warm=False)
    assert summary.ok
    (found,) = metrics_of(tmp_path, [cell])
    assert found["value"] == 7 and not found["preloaded"]
    assert "warm kernel" not in (tmp_path / "logs" / f"{cell.id}.log").read_text()


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_kernel_does_not_outlive_its_client(tmp_path, monkeypatch):
    """jupyter_client kills an unresponsive kernel by killing its process: here the client."""
    monkeypatch.setenv(warm_kernels.SERVER_ENV, "")  # start_server sets it; restored afterwards
    server = warm_kernels.start_server(tmp_path)
    try:
        connection, _ = write_connection_file(str(tmp_path / "kernel.json"), transport="ipc",
                                              ip=str(tmp_path / "k"))
        pid_file = tmp_path / "kernel.pid"
        client = subprocess.Popen(warm_kernels.kernel_command(connection), cwd=tmp_path,
                                  env={**os.environ, warm_kernels.PID_FILE_ENV: str(pid_file)})
        assert _wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 30)
        kernel = int(pid_file.read_text())
        assert kernel != client.pid and _running(kernel)
        client.kill()
        client.wait()
        assert _wait_for(lambda: not _running(kernel), 10)
    finally:
        server.terminate()
        server.wait()
    assert not (tmp_path / "server").exists()


def test_the_client_needs_a_server(monkeypatch):
    monkeypatch.delenv(warm_kernels.SERVER_ENV, raising=False)
    assert warm_kernels.connect(["-f", "unused.json"]) == 2
