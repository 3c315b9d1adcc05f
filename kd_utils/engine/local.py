"""The local executor: long-lived ``python -c`` worker processes on this machine, each executing one
cell at a time, in a pool that replaces a dying worker (which fails only its cell)."""
from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import pickle
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

from .cells import Cell
from .kernels import stop_warm_server
from .worker import PACKAGE_ROOT, Outcome, Task, execute, short_error


def local_shape(cells: Sequence[Cell], max_workers: int | None, threads: int | None) -> tuple[int, int]:
    """Workers and threads per worker such that workers x threads <= cores (unless both are given)."""
    cores = len(os.sched_getaffinity(0))
    if threads is None:
        wanted = cores // max_workers if max_workers else max(int(c.resources.get("cpus", 1)) for c in cells)
        threads = max(1, min(wanted, cores))
    if max_workers is None:
        max_workers = max(1, cores // threads)
        mem_gb = max(c.resources.get("mem_gb", 0) for c in cells)
        if mem_gb:
            total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            max_workers = max(1, min(max_workers, int(total_gb // mem_gb)))
    return min(max_workers, len(cells)), threads


def serve() -> None:
    """Worker loop of the local executor: pickled `Task`s in on stdin, `Outcome`s out on stdout."""
    tasks = sys.stdin.buffer
    outcomes = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the outcome stream
    while True:
        try:
            task = pickle.load(tasks)
        except EOFError:
            stop_warm_server()
            return
        try:
            outcome = execute(task)
        except Exception as exc:
            traceback.print_exc()
            outcome = Outcome("failed", 0.0, f"worker error: {short_error(exc)}")
        pickle.dump(outcome, outcomes)
        outcomes.flush()


class _Worker:
    """A long-lived ``python -c`` worker process running one cell at a time (see `serve`).

    Not a multiprocessing child, so the caller's ``__main__`` is never re-imported.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from kd_utils.engine.local import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=PACKAGE_ROOT,
        )
        self.cell_id: str | None = None
        self.started = 0.0

    def send(self, task: Task) -> None:
        assert self.process.stdin is not None
        pickle.dump(task, self.process.stdin)
        self.process.stdin.flush()
        self.cell_id, self.started = task.cell.id, time.monotonic()

    def receive(self) -> Outcome:
        try:
            outcome = pickle.load(self.process.stdout)
        except (EOFError, pickle.UnpicklingError):
            code = self.process.wait()
            outcome = Outcome("failed", time.monotonic() - self.started, f"worker process died (exit code {code})")
        self.cell_id = None
        return outcome

    def stop(self) -> None:
        if self.cell_id is not None:
            self.process.terminate()
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        self.process.wait()


class LocalPool:
    """Worker processes on this machine; a dying worker fails only its cell and is replaced."""

    def __init__(self, workers: int) -> None:
        self._size = workers
        self._workers: list[_Worker] = []

    @property
    def busy(self) -> int:
        return sum(w.cell_id is not None for w in self._workers)

    @property
    def free(self) -> int:
        return self._size - self.busy

    def submit(self, task: Task) -> None:
        self._workers = [w for w in self._workers if w.cell_id is not None or w.process.poll() is None]
        worker = next((w for w in self._workers if w.cell_id is None), None)
        if worker is None:
            worker = _Worker()
            self._workers.append(worker)
        worker.send(task)

    def wait(self) -> list[tuple[str, Outcome]]:
        busy = {w.process.stdout: w for w in self._workers if w.cell_id is not None}
        finished = []
        for stream in multiprocessing.connection.wait(list(busy), timeout=1.0):
            worker = busy[stream]
            cell_id = worker.cell_id
            assert cell_id is not None
            finished.append((cell_id, worker.receive()))
        return finished

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
