"""Executing one cell under its lock (in a local worker or a SLURM job): papermill into a temporary
folder, the kernel's chatter into the cell's log, then the result installed, or the failure kept."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from .. import locks, provenance, warm_kernels
from .cells import Cell, canonical_json, stamp
from .files import SOCKETS_PREFIX, aside, install, lock_path, tidy_cell
from .kernels import KernelWatch, kernel_config, warm_server

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # put on the kernels' PYTHONPATH
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Task:
    """What executing one cell needs; pickled to a local worker or into a SLURM job."""

    cell: Cell
    notebook: str
    study_dir: str
    cwd: str
    kernel_name: str
    threads: int
    warm: bool  # fork the kernel from a warm server (kd_utils.warm_kernels) instead of starting it cold
    seen: tuple[int, int] | None  # the result present when planned (force), None if none
    owner: str


@dataclass(frozen=True)
class Outcome:
    """How executing one cell ended."""

    status: str  # ran | failed | done | locked
    seconds: float
    message: str = ""


@contextlib.contextmanager
def _fds_redirected(stream: IO[str]) -> Iterator[None]:
    """Point file descriptors 1 and 2 of this process at stream (kernel and papermill chatter)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def short_error(exc: BaseException) -> str:
    """The first line of an error, without terminal colours."""
    if hasattr(exc, "ename") and hasattr(exc, "evalue"):  # papermill's PapermillExecutionError
        text = f"{exc.ename}: {exc.evalue}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _ANSI_RE.sub("", text).strip().splitlines()[0]


def execute(task: Task) -> Outcome:
    """Run one cell under its lock; entry point of local workers and SLURM jobs."""
    cell, study = task.cell, Path(task.study_dir)
    lock = lock_path(study, cell.id)
    fd = locks.acquire(lock, task.owner)
    if fd is None:
        return Outcome("locked", 0.0, f"cell {cell.name} is being run by another runner ({locks.holder(lock)})")
    try:
        tidy_cell(study / cell.stage, cell.id)
        present = stamp(cell.output_dir(study))
        if present is not None and present != task.seen:
            return Outcome("done", 0.0, "completed by another runner meanwhile")
        return _run_notebook(task)
    finally:
        locks.release(fd)


def _run_notebook(task: Task) -> Outcome:
    import papermill  # only workers need it (slow to import)

    start = time.monotonic()
    cell, study = task.cell, Path(task.study_dir)
    final = cell.output_dir(study)
    failed = final.parent / f"{cell.id}.failed"
    tmp = aside(final, "tmp", cell.id)
    tmp.mkdir(parents=True)
    log_path = study / "logs" / f"{cell.id}.log"
    log_path.parent.mkdir(exist_ok=True)
    threads = str(task.threads)
    os.environ.update(KD_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if PACKAGE_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, *paths) if p)
    warm = task.warm and warm_server(task.threads)
    with open(log_path, "a") as log, _fds_redirected(log):
        log.write(
            f"==== {datetime.now().isoformat(timespec='seconds')} {cell.stage} {cell.name} [{cell.id}] "
            f"{locks.process_owner()}, {threads} threads{', warm kernel' if warm else ''}\n"
        )
        log.flush()
        offset = log_path.stat().st_size
        sockets = tempfile.mkdtemp(prefix=f"{SOCKETS_PREFIX}{cell.id}-")
        os.environ[warm_kernels.PID_FILE_ENV] = os.path.join(sockets, "kernel.pid")
        watch = KernelWatch()
        try:
            papermill.execute_notebook(
                task.notebook,
                str(tmp / "notebook.ipynb"),
                parameters={**cell.parameters, "cell_dir": str(tmp)},
                kernel_name=task.kernel_name,
                cwd=task.cwd,
                progress_bar=False,
                log_output=False,
                stdout_file=log,
                stderr_file=log,
                config=kernel_config(Path(sockets), watch, warm),
            )
            if not (tmp / "metrics.json").is_file():
                raise RuntimeError("notebook did not write metrics.json")
        except Exception as exc:
            log.flush()
            cause = watch.cause()
            error = short_error(exc) + (f" ({cause})" if cause else "")
            (tmp / "error.txt").write_text(
                f"cell: {cell.name}\nstage: {cell.stage}\nid: {cell.id}\nnotebook: {task.notebook}\n"
                f"parameters: {canonical_json(cell.parameters)}\nerror: {error}\n\n"
                + _ANSI_RE.sub("", traceback.format_exc())
            )
            with open(log_path, "rb") as whole:
                whole.seek(offset)
                (tmp / "log.txt").write_bytes(whole.read())
            install(tmp, failed, cell.id, result=False)
            return Outcome("failed", time.monotonic() - start, f"{error} (see {failed})")
        finally:
            watch.stopped.set()
            shutil.rmtree(sockets, ignore_errors=True)
    provenance.record(tmp, task.notebook)
    install(tmp, final, cell.id, result=True)
    shutil.rmtree(failed, ignore_errors=True)
    return Outcome("ran", time.monotonic() - start)
