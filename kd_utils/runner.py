"""Cell execution: run a DAG of parameterized notebooks with papermill, never losing finished work.

A *cell* is one notebook run with one set of parameters. Layout of a study directory:

    <study>/<stage>/<cell.id>/            complete result: the notebook's files, metrics.json, notebook.ipynb
    <study>/<stage>/<cell.id>.failed/     last failure: error.txt, notebook.ipynb (partial), log.txt, partial files
    <study>/<stage>/.tmp-<cell.id>-<r>/   a cell being executed (never read; removed by the next run)
    <study>/logs/<cell.id>.log            kernel stdout/stderr of every attempt
    <study>/.locks/                       flock files: study.lock (one per runner) and <cell.id>.lock
    <study>/.slurm/                       submitit's folder for the SLURM executor

A notebook receives its parameters plus ``cell_dir`` (a temporary directory), writes its files there
and ``metrics.json`` last. The engine then renames the directory into place atomically: a cell is
complete iff ``<study>/<stage>/<cell.id>/metrics.json`` exists. Its kernel gets ``KD_THREADS``,
``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` set to the threads allotted to it, and this package on
``PYTHONPATH``.
"""
from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import getpass
import graphlib
import hashlib
import json
import math
import multiprocessing.connection
import os
import pickle
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pandas as pd
from tqdm import tqdm

from . import provenance, warm_kernels

if TYPE_CHECKING:
    import submitit

RESOURCE_KEYS = ("cpus", "gpus", "mem_gb", "time_min")
EXECUTORS = ("local", "slurm")
STATUSES = ("ran", "done", "failed", "blocked", "locked")
SLURM_DEFAULT_TIME_MIN = 60

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
_STAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED_STAGES = {"logs"}
_LEFTOVER_RE = re.compile(r"\.(tmp|trash|replaced)-([0-9a-f]{12})-[0-9a-f]+")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SOCKETS_PREFIX = "kd-kernel-"  # + cell id: a kernel's Unix sockets, in the temp dir (short paths)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class Cell:
    """One notebook run: ``parameters`` go to the notebook's "parameters" cell.

    ``id`` is the first 12 hex digits of the SHA-256 of (stage, notebook file name, parameters as
    canonical JSON): stable across runs, machines and dict order. ``deps`` are ids of cells that must
    be complete first; ``resources`` may give cpus, gpus, mem_gb and time_min.
    """

    stage: str
    name: str
    notebook: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)
    deps: tuple[str, ...] = ()
    resources: Mapping[str, float] = field(default_factory=dict)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"cell name must be a non-empty string, got {self.name!r}")
        if (
            not isinstance(self.stage, str)
            or not _STAGE_RE.fullmatch(self.stage)
            or self.stage in _RESERVED_STAGES
        ):
            raise ValueError(
                f"cell {self.name!r}: stage {self.stage!r} must be a folder name of letters, digits, "
                f"'_', '-', '.' (not starting with '.', not {sorted(_RESERVED_STAGES)})"
            )
        notebook = Path(self.notebook)
        if notebook.suffix != ".ipynb":
            raise ValueError(f"cell {self.name!r}: notebook {str(notebook)!r} is not an .ipynb file")
        if not isinstance(self.parameters, Mapping):
            raise TypeError(f"cell {self.name!r}: parameters must be a mapping, got {type(self.parameters).__name__}")
        if "cell_dir" in self.parameters:
            raise ValueError(f"cell {self.name!r}: parameter 'cell_dir' is reserved (the engine sets it)")
        try:
            canonical = _canonical_json(dict(self.parameters))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cell {self.name!r}: parameters are not JSON-able: {exc}") from exc
        if isinstance(self.deps, str) or not all(isinstance(d, str) for d in self.deps):
            raise TypeError(f"cell {self.name!r}: deps must be a sequence of cell ids, got {self.deps!r}")
        unknown = set(self.resources) - set(RESOURCE_KEYS)
        if unknown:
            raise ValueError(f"cell {self.name!r}: unknown resources {sorted(unknown)}; allowed: {RESOURCE_KEYS}")
        for key, value in self.resources.items():
            least, kind = (1, int) if key == "cpus" else (0, int) if key == "gpus" else (0, (int, float))
            if isinstance(value, bool) or not isinstance(value, kind) or value < least:
                raise ValueError(f"cell {self.name!r}: resource {key}={value!r} must be a number >= {least}"
                                 + (" (an integer)" if kind is int else ""))
        digest = hashlib.sha256(_canonical_json([self.stage, notebook.name, json.loads(canonical)]).encode())
        object.__setattr__(self, "notebook", notebook)
        object.__setattr__(self, "parameters", json.loads(canonical))
        object.__setattr__(self, "deps", tuple(self.deps))
        object.__setattr__(self, "resources", dict(self.resources))
        object.__setattr__(self, "id", digest.hexdigest()[:12])

    def __hash__(self) -> int:
        return hash(self.id)

    def output_dir(self, study_dir: str | Path) -> Path:
        """The cell's final directory, ``<study>/<stage>/<id>``."""
        return Path(study_dir) / self.stage / self.id

    def is_complete(self, study_dir: str | Path) -> bool:
        """Whether the cell's final directory holds metrics.json."""
        return _stamp(self.output_dir(study_dir)) is not None


@dataclass(frozen=True)
class CellResult:
    """What happened to one cell in a run: status is one of STATUSES."""

    cell: Cell
    status: str
    seconds: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class RunSummary:
    """The outcome of `run`: one result per selected cell, grouped by stage in dependency order."""

    results: tuple[CellResult, ...]

    @property
    def counts(self) -> dict[str, int]:
        counts = Counter(r.status for r in self.results)
        return {s: counts[s] for s in STATUSES if counts[s]}

    @property
    def ok(self) -> bool:
        """True iff every selected cell is complete (nothing failed, blocked or locked)."""
        return all(r.status in ("done", "ran") for r in self.results)

    def with_status(self, status: str) -> list[CellResult]:
        return [r for r in self.results if r.status == status]

    def format(self) -> str:
        """One line per cell (stage, name, status, seconds, message), then the counts."""
        stage_w = max((len(r.cell.stage) for r in self.results), default=0)
        name_w = max((len(r.cell.name) for r in self.results), default=0)
        lines = [
            f"{r.cell.stage:<{stage_w}}  {r.cell.name:<{name_w}}  {r.status:<7}  {r.seconds:7.1f} s"
            + (f"  {r.message}" if r.message else "")
            for r in self.results
        ]
        counts = ", ".join(f"{n} {s}" for s, n in self.counts.items()) or "no cells"
        return "\n".join([*lines, f"total: {counts}"])


# ---------------------------------------------------------------- the DAG and the plan


def _validate(cells: Sequence[Cell]) -> list[Cell]:
    """Check ids and deps; return the cells in a topological order."""
    by_id: dict[str, Cell] = {}
    for cell in cells:
        if not isinstance(cell, Cell):
            raise TypeError(f"expected Cell objects, got {type(cell).__name__}: {cell!r}")
        if cell.id in by_id:
            raise ValueError(
                f"cells {by_id[cell.id].name!r} and {cell.name!r} have the same id {cell.id} "
                "(same stage, notebook and parameters)"
            )
        by_id[cell.id] = cell
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for cell in cells:
        for dep in cell.deps:
            if dep not in by_id:
                raise ValueError(f"cell {cell.name!r} depends on unknown cell id {dep!r}")
        sorter.add(cell.id, *cell.deps)
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = " -> ".join(by_id[i].name for i in exc.args[1])
        raise ValueError(f"dependency cycle: {cycle}") from None
    return [by_id[i] for i in order]


def _stage_order(cells: Sequence[Cell]) -> list[Cell]:
    """Group topologically ordered cells by stage; a stage comes after the stages its cells need."""
    stage_of = {c.id: c.stage for c in cells}
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for cell in cells:
        sorter.add(cell.stage, *(stage_of[d] for d in cell.deps if stage_of.get(d, cell.stage) != cell.stage))
    try:
        stages = list(sorter.static_order())
    except graphlib.CycleError:  # stages needing each other: order of first appearance
        stages = list(dict.fromkeys(c.stage for c in cells))
    rank = {stage: i for i, stage in enumerate(stages)}
    return sorted(cells, key=lambda c: rank[c.stage])


def _status(cell: Cell, study: Path) -> str:
    if cell.is_complete(study):
        return "stale" if provenance.is_stale(cell.output_dir(study), cell.notebook) else "done"
    return "failed-before" if (study / cell.stage / f"{cell.id}.failed").is_dir() else "todo"


def _table(cells: Sequence[Cell], study: Path, cost: Callable[[Cell], Any] | None = None) -> pd.DataFrame:
    ordered = _stage_order(cells)
    frame = pd.DataFrame(
        {
            "stage": [c.stage for c in ordered],
            "name": [c.name for c in ordered],
            "id": [c.id for c in ordered],
            "status": [_status(c, study) for c in ordered],
        }
    )
    if cost is not None:
        frame["cost"] = [cost(c) for c in ordered]
    return frame


def plan(cells: Sequence[Cell], study_dir: str | Path, cost: Callable[[Cell], Any] | None = None) -> pd.DataFrame:
    """One row per cell: stage, name, id, status (done; stale: complete but made by other code, see
    kd_utils.provenance; todo; failed-before) and, given ``cost``, cost(cell).

    Raises ValueError on duplicate ids, unknown deps or cycles.
    """
    return _table(_validate(cells), Path(study_dir), cost)


def format_plan(table: pd.DataFrame, max_rows: int = 20) -> str:
    """Per stage: the counts by status (and total cost), then the cells that would run (at most max_rows)."""
    lines = []
    for stage, rows in table.groupby("stage", sort=False):
        counts = rows["status"].value_counts()
        summary = ", ".join(f"{counts[s]} {s}" for s in ("done", "stale", "todo", "failed-before") if s in counts)
        cost = f", cost {rows['cost'].sum():g}" if "cost" in rows else ""
        lines.append(f"{stage}: {len(rows)} cell{'s' * (len(rows) != 1)} ({summary}{cost})")
        pending = rows[~rows["status"].isin(["done", "stale"])]
        for row in pending.head(max_rows).itertuples():
            extra = f"  cost {row.cost:g}" if "cost" in rows else ""
            lines.append(f"  {row.status:<13} {row.id}  {row.name}{extra}")
        if len(pending) > max_rows:
            lines.append(f"  ... and {len(pending) - max_rows} more")
    return "\n".join(lines)


def _matches(cell: Cell, pattern: str) -> bool:
    fields = (cell.name, cell.id, cell.stage)
    if any(ch in pattern for ch in "*?["):
        return any(fnmatch.fnmatchcase(f, pattern) for f in fields)
    return any(pattern in f for f in fields)


def select_cells(cells: list[Cell], only: Sequence[str] | None) -> list[Cell]:
    """The cells whose name, id or stage matches a pattern of `only` (substring or glob); all when None."""
    if only is None:
        return cells
    if isinstance(only, str):
        raise TypeError(f"only must be a list of patterns, got the string {only!r}")
    unmatched = [p for p in only if not any(_matches(c, p) for c in cells)]
    if unmatched:
        raise ValueError(f"only: patterns {unmatched} match no cell name, id or stage")
    return [c for c in cells if any(_matches(c, p) for p in only)]


# ---------------------------------------------------------------- files and locks


def _stamp(final: Path) -> tuple[int, int] | None:
    """Identity of a complete result (inode and mtime of metrics.json), None if incomplete."""
    try:
        st = os.stat(final / "metrics.json")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_mtime_ns)


def _lock_path(study: Path, name: str) -> Path:
    return study / ".locks" / f"{name}.lock"


def _try_lock(path: Path, owner: str) -> int | None:
    """Take a non-blocking exclusive flock on path and write owner into it; None if held elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "pid unknown"
    except OSError:
        return "pid unknown"


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _aside(path: Path, kind: str, cell_id: str) -> Path:
    return path.parent / f".{kind}-{cell_id}-{secrets.token_hex(4)}"


def _install(src: Path, dest: Path, cell_id: str, result: bool) -> None:
    """Rename directory src to dest atomically; a previous dest is moved aside first, then removed.

    For results (``result``), a complete previous one is moved to ``.replaced-*``, so a crash before
    the rename leaves it recoverable (see `_tidy`).
    """
    old = None
    if dest.exists():
        old = _aside(dest, "replaced" if result and _stamp(dest) else "trash", cell_id)
        os.rename(dest, old)
    os.rename(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tidy(study: Path, stages: set[str], owner: str) -> None:
    """Remove leftovers of killed runs whose cell lock is free; restore a result lost mid-replacement.

    A cell whose lock is still held (its killed worker not yet gone) is tidied when it next executes.
    """
    for stage in sorted(stages):
        stage_dir = study / stage
        if not stage_dir.is_dir():
            continue
        ids = {m[2] for m in map(_LEFTOVER_RE.fullmatch, (e.name for e in stage_dir.iterdir())) if m}
        for cell_id in sorted(ids):
            fd = _try_lock(_lock_path(study, cell_id), owner)
            if fd is None:
                continue
            try:
                _tidy_cell(stage_dir, cell_id)
            finally:
                os.close(fd)


def _tidy_cell(stage_dir: Path, cell_id: str) -> None:
    """With the cell's lock held: restore a complete result moved aside, remove the other leftovers
    (and the kernel socket folders that killed runs of the cell left in this machine's temp dir)."""
    for sockets in Path(tempfile.gettempdir()).glob(f"{_SOCKETS_PREFIX}{cell_id}-*"):
        shutil.rmtree(sockets, ignore_errors=True)
    final = stage_dir / cell_id
    for entry in sorted(stage_dir.glob(f".*-{cell_id}-*")):
        if not _LEFTOVER_RE.fullmatch(entry.name):
            continue
        if entry.name.startswith(".replaced-") and _stamp(final) is None and _stamp(entry):
            if final.exists():
                trash = _aside(final, "trash", cell_id)
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(entry, final)
        else:
            shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------- executing one cell (in a worker)


@dataclass(frozen=True)
class _Task:
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
class _Outcome:
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


def _short_error(exc: BaseException) -> str:
    if hasattr(exc, "ename") and hasattr(exc, "evalue"):  # papermill's PapermillExecutionError
        text = f"{exc.ename}: {exc.evalue}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _ANSI_RE.sub("", text).strip().splitlines()[0]


def _execute(task: _Task) -> _Outcome:
    """Run one cell under its lock; entry point of local workers and SLURM jobs."""
    cell, study = task.cell, Path(task.study_dir)
    lock = _lock_path(study, cell.id)
    fd = _try_lock(lock, task.owner)
    if fd is None:
        return _Outcome("locked", 0.0, f"cell {cell.name} is being run by another runner ({_holder(lock)})")
    try:
        _tidy_cell(study / cell.stage, cell.id)
        stamp = _stamp(cell.output_dir(study))
        if stamp is not None and stamp != task.seen:
            return _Outcome("done", 0.0, "completed by another runner meanwhile")
        return _run_notebook(task)
    finally:
        os.close(fd)


class _KernelWatch:
    """A cell's kernel process: its exit status and its peak resident memory (VmHWM of
    /proc/<pid>/status, read every half second while it runs; Linux only), to say why it died."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.peak = 0  # bytes
        self.stopped = threading.Event()

    def start(self, process: subprocess.Popen) -> None:
        self.process = process
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        pid_file = os.environ.get(warm_kernels.PID_FILE_ENV, "")
        pid = self.process.pid
        while not self.stopped.is_set():
            if pid == self.process.pid and os.path.isfile(pid_file):  # a warm kernel: its client names it
                with contextlib.suppress(OSError, ValueError):
                    pid = int(Path(pid_file).read_text())
            try:
                hwm = next((line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                            if line.startswith("VmHWM:")), None)
            except OSError:
                return
            if hwm is None:  # a zombie: it has exited
                return
            self.peak = max(self.peak, int(hwm.split()[1]) * 1024)
            self.stopped.wait(0.5)

    def cause(self) -> str:
        """Why the kernel died, when a signal killed it ("" otherwise)."""
        if self.process is None:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):  # a warm kernel's client ends just after it
            self.process.wait(timeout=3)
        code = self.process.poll()
        if code is None or code >= 0:
            return ""
        text = f"the kernel was killed by signal {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            text += " (likely out of memory: the Linux OOM killer sends SIGKILL)"
        if self.peak:
            text += f"; its last measured peak resident memory was {self.peak / 2**30:.2f} GB"
        return text


def _kernel_config(folder: Path, watch: _KernelWatch, warm: bool) -> Any:
    """Kernel channels as Unix sockets in a private folder, not TCP ports, and a kernel manager
    that hands the kernel's process to ``watch`` (and, when ``warm``, forks it from the worker's
    warm-kernel server).

    Over TCP the kernel manager picks free ports and the kernel binds them later; meanwhile another
    worker's kernel or connection can take one, and the kernel dies ("Address already in use").
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets.config import Config

    class WatchedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            await super().start_kernel(**kw)
            watch.start(self.provisioner.process)

        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            if warm:
                return warm_kernels.kernel_command(self.connection_file)
            return super().format_kernel_cmd(extra_arguments)

    return Config({"NotebookClient": {"kernel_manager_class": WatchedKernelManager},
                   "KernelManager": {"transport": "ipc", "ip": str(folder / "kernel")}})


def _run_notebook(task: _Task) -> _Outcome:
    import papermill  # only workers need it (slow to import)

    start = time.monotonic()
    cell, study = task.cell, Path(task.study_dir)
    final = cell.output_dir(study)
    failed = final.parent / f"{cell.id}.failed"
    tmp = _aside(final, "tmp", cell.id)
    tmp.mkdir(parents=True)
    log_path = study / "logs" / f"{cell.id}.log"
    log_path.parent.mkdir(exist_ok=True)
    threads = str(task.threads)
    os.environ.update(KD_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if _PACKAGE_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, *paths) if p)
    warm = task.warm and _warm_server(task.threads)
    with open(log_path, "a") as log, _fds_redirected(log):
        log.write(
            f"==== {datetime.now().isoformat(timespec='seconds')} {cell.stage} {cell.name} [{cell.id}] "
            f"{_owner()}, {threads} threads{', warm kernel' if warm else ''}\n"
        )
        log.flush()
        offset = log_path.stat().st_size
        sockets = tempfile.mkdtemp(prefix=f"{_SOCKETS_PREFIX}{cell.id}-")
        os.environ[warm_kernels.PID_FILE_ENV] = os.path.join(sockets, "kernel.pid")
        watch = _KernelWatch()
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
                config=_kernel_config(Path(sockets), watch, warm),
            )
            if not (tmp / "metrics.json").is_file():
                raise RuntimeError("notebook did not write metrics.json")
        except Exception as exc:
            log.flush()
            cause = watch.cause()
            error = _short_error(exc) + (f" ({cause})" if cause else "")
            (tmp / "error.txt").write_text(
                f"cell: {cell.name}\nstage: {cell.stage}\nid: {cell.id}\nnotebook: {task.notebook}\n"
                f"parameters: {_canonical_json(cell.parameters)}\nerror: {error}\n\n"
                + _ANSI_RE.sub("", traceback.format_exc())
            )
            with open(log_path, "rb") as whole:
                whole.seek(offset)
                (tmp / "log.txt").write_bytes(whole.read())
            _install(tmp, failed, cell.id, result=False)
            return _Outcome("failed", time.monotonic() - start, f"{error} (see {failed})")
        finally:
            watch.stopped.set()
            shutil.rmtree(sockets, ignore_errors=True)
    provenance.record(tmp, task.notebook)
    _install(tmp, final, cell.id, result=True)
    shutil.rmtree(failed, ignore_errors=True)
    return _Outcome("ran", time.monotonic() - start)


_warm: dict[str, Any] = {}  # this worker's warm-kernel server: process, folder, threads


def _warm_server(threads: int) -> bool:
    """Have a warm-kernel server for kernels of `threads` threads running in this worker (started
    on first use, restarted if it died or the thread count changed); False if it cannot start."""
    server = _warm.get("process")
    if server is not None and server.poll() is None and _warm["threads"] == threads:
        return True
    _stop_warm_server()
    folder = tempfile.mkdtemp(prefix="kd-warm-")
    try:
        _warm.update(process=warm_kernels.start_server(folder), folder=folder, threads=threads)
    except RuntimeError as exc:
        print(f"{exc}; kernels start cold", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    return True


def _stop_warm_server() -> None:
    if _warm:
        _warm["process"].terminate()
        _warm["process"].wait()
        shutil.rmtree(_warm["folder"], ignore_errors=True)
        _warm.clear()


# ---------------------------------------------------------------- executors


def _serve() -> None:
    """Worker loop of the local executor: pickled `_Task`s in on stdin, `_Outcome`s out on stdout."""
    tasks = sys.stdin.buffer
    outcomes = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the outcome stream
    while True:
        try:
            task = pickle.load(tasks)
        except EOFError:
            _stop_warm_server()
            return
        try:
            outcome = _execute(task)
        except Exception as exc:
            traceback.print_exc()
            outcome = _Outcome("failed", 0.0, f"worker error: {_short_error(exc)}")
        pickle.dump(outcome, outcomes)
        outcomes.flush()


class _Worker:
    """A long-lived ``python -c`` worker process running one cell at a time (see `_serve`).

    Not a multiprocessing child, so the caller's ``__main__`` is never re-imported.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from kd_utils.runner import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_PACKAGE_ROOT,
        )
        self.cell_id: str | None = None
        self.started = 0.0

    def send(self, task: _Task) -> None:
        assert self.process.stdin is not None
        pickle.dump(task, self.process.stdin)
        self.process.stdin.flush()
        self.cell_id, self.started = task.cell.id, time.monotonic()

    def receive(self) -> _Outcome:
        try:
            outcome = pickle.load(self.process.stdout)
        except (EOFError, pickle.UnpicklingError):
            code = self.process.wait()
            outcome = _Outcome("failed", time.monotonic() - self.started, f"worker process died (exit code {code})")
        self.cell_id = None
        return outcome

    def stop(self) -> None:
        if self.cell_id is not None:
            self.process.terminate()
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        self.process.wait()


class _LocalPool:
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

    def submit(self, task: _Task) -> None:
        self._workers = [w for w in self._workers if w.cell_id is not None or w.process.poll() is None]
        worker = next((w for w in self._workers if w.cell_id is None), None)
        if worker is None:
            worker = _Worker()
            self._workers.append(worker)
        worker.send(task)

    def wait(self) -> list[tuple[str, _Outcome]]:
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


class _SlurmQueue:
    """One submitit job per cell; a job is finished when submitit has its result, or once it left squeue.

    Job states come from squeue, not sacct (which needs accounting storage); a job gone from the
    queue for GONE_GRACE_S without a result is judged by the cell's own outputs.
    """

    GONE_GRACE_S = 10.0

    def __init__(
        self, folder: Path, options: Mapping[str, Any], max_jobs: int | None, timeout_s: float | None,
        log: Callable[[str], None],
    ) -> None:
        self._folder = folder
        self._options = dict(options)
        self._max_jobs = max_jobs
        self._timeout_s = timeout_s
        self._log = log
        self._jobs: dict[str, tuple[submitit.Job[_Outcome], _Task, float]] = {}
        self._gone: dict[str, float] = {}
        self._started = time.monotonic()

    @property
    def free(self) -> int:
        return sys.maxsize if self._max_jobs is None else self._max_jobs - len(self._jobs)

    @property
    def busy(self) -> int:
        return len(self._jobs)

    def submit(self, task: _Task) -> None:
        resources = task.cell.resources
        options = dict(self._options)
        setup = [f"export PYTHONPATH={shlex.quote(_PACKAGE_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}", *options.pop("setup", [])]
        params: dict[str, Any] = {
            "name": f"{task.cell.stage}-{task.cell.id}",
            "cpus_per_task": task.threads,
            "timeout_min": math.ceil(resources.get("time_min", SLURM_DEFAULT_TIME_MIN)),
            "slurm_setup": setup,
            **{f"slurm_{key}": value for key, value in options.items()},
        }
        if resources.get("gpus"):
            params["gpus_per_node"] = int(resources["gpus"])
        if resources.get("mem_gb"):
            params["mem_gb"] = resources["mem_gb"]
        import submitit  # only the SLURM executor needs it

        executor = submitit.AutoExecutor(folder=self._folder, cluster="slurm")
        executor.update_parameters(**params)
        job = executor.submit(_execute, task)
        self._jobs[task.cell.id] = (job, task, time.monotonic())

    def _queued(self) -> set[str] | None:
        try:
            out = subprocess.run(
                ["squeue", "--noheader", "--format=%i", f"--user={getpass.getuser()}"],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return set(out.split())

    def wait(self) -> list[tuple[str, _Outcome]]:
        time.sleep(min(30.0, 1.0 + 0.05 * (time.monotonic() - self._started)))
        queued = self._queued()
        finished = []
        for cell_id, (job, task, submitted) in list(self._jobs.items()):
            outcome = self._check(job, task, submitted, queued)
            if outcome is not None:
                del self._jobs[cell_id]
                finished.append((cell_id, outcome))
        return finished

    def _check(
        self, job: submitit.Job[_Outcome], task: _Task, submitted: float, queued: set[str] | None
    ) -> _Outcome | None:
        elapsed = time.monotonic() - submitted
        if job.paths.result_pickle.exists():  # not job.done(): its sacct fallback needs accounting storage
            try:
                return job.result()
            except Exception as exc:  # _execute raised, or submitit could not read the result
                last = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
                return _Outcome("failed", elapsed, f"SLURM job {job.job_id} failed: {last[0]} (see {job.paths.stderr})")
        if queued is not None and job.job_id not in queued:
            gone = self._gone.setdefault(job.job_id, time.monotonic())
            if time.monotonic() - gone > self.GONE_GRACE_S:
                stamp = _stamp(task.cell.output_dir(task.study_dir))
                if stamp is not None and stamp != task.seen:
                    return _Outcome("ran", elapsed, f"SLURM job {job.job_id} left no result, but the cell is complete")
                return _Outcome(
                    "failed", elapsed,
                    f"SLURM job {job.job_id} left the queue without a result (cancelled, timed out or killed); "
                    f"see {job.paths.stderr}",
                )
        if self._timeout_s is not None and elapsed > self._timeout_s:
            job.cancel(check=False)
            message = f"SLURM job {job.job_id} not finished after {self._timeout_s:g} s: cancelled"
            return _Outcome("failed", elapsed, message)
        return None

    def close(self) -> None:
        if self._jobs:
            ids = ", ".join(job.job_id for job, _, _ in self._jobs.values())
            self._log(f"left {len(self._jobs)} SLURM jobs running ({ids}); a rerun counts the cells they complete")


# ---------------------------------------------------------------- the run


def _local_shape(cells: Sequence[Cell], max_workers: int | None, threads: int | None) -> tuple[int, int]:
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


def _say(log: Callable[[str], None], bar: tqdm) -> Callable[[str], None]:
    if log is print and not bar.disable:
        return bar.write
    return log


def run(
    cells: Sequence[Cell],
    study_dir: str | Path,
    executor: str = "local",
    max_workers: int | None = None,
    only: Sequence[str] | None = None,
    force: bool = False,
    rerun_stale: bool = False,
    threads_per_worker: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    *,
    cwd: str | Path | None = None,
    kernel_name: str = "python3",
    slurm: Mapping[str, Any] | None = None,
    wait_timeout_s: float | None = None,
    warm: bool = True,
) -> RunSummary:
    """Execute the incomplete cells of the grid (all selected ones with ``force``) in dependency order.

    only: substrings or glob patterns matched against cell names, ids and stages; deps outside the
        selection must already be complete, else the cell is reported "blocked".
    force: re-run selected complete cells; an old result is replaced only by a successful new one.
    rerun_stale: re-run, the same way, the selected complete cells made by other code (plan: "stale").
    executor: "local": max_workers worker processes x threads_per_worker threads, by default as many
        workers as fit the cores (and memory, given cells' mem_gb) with threads = the largest
        resources["cpus"] (default 1). "slurm": one submitit job per cell with the cell's cpus, gpus,
        mem_gb and time_min (default SLURM_DEFAULT_TIME_MIN); ``slurm`` holds submitit's slurm_*
        parameters without the prefix, e.g. {"partition": "gpu", "additional_parameters": {...}};
        max_workers caps the jobs in flight; wait_timeout_s cancels jobs unfinished that long after
        submission. The local executor ignores ``slurm`` and ``wait_timeout_s``.
    cwd: the kernel's working directory; default the notebook's folder (as in Jupyter).
    warm: local workers fork each kernel from a server that has imported the study's modules
        (kd_utils.warm_kernels; Linux and macOS, kernel "python3" only), instead of a cold start.
    Failed cells leave ``<stage>/<id>.failed/``; cells depending on them are "blocked";
    a cell held by another live runner is "locked". Returns the summary; ``summary.ok`` is False
    unless every selected cell is complete.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    for label, value in (("max_workers", max_workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    ordered = _validate(cells)
    selected = select_cells(ordered, only)
    for cell in selected:
        if not cell.notebook.is_file():
            raise FileNotFoundError(f"cell {cell.name!r}: notebook {cell.notebook} does not exist")
    study = Path(study_dir).resolve()
    study.mkdir(parents=True, exist_ok=True)
    owner = _owner()
    study_lock = _lock_path(study, "study")
    study_fd = _try_lock(study_lock, owner)
    try:
        if study_fd is None:
            log(
                f"WARNING: another runner ({_holder(study_lock)}) is running study {study}; "
                "cells it is executing will be reported as locked"
            )
        _tidy(study, {c.stage for c in ordered}, owner)
        log(format_plan(_table(selected, study)))
        def redo(c: Cell) -> bool:
            return force or (rerun_stale and provenance.is_stale(c.output_dir(study), c.notebook))

        results = {c.id: CellResult(c, "done") for c in selected if c.is_complete(study) and not redo(c)}
        to_run = [c for c in selected if c.id not in results]
        rerun = sum(c.is_complete(study) for c in to_run)
        if rerun:
            log(f"{'force' if force else 'rerun-stale'}: re-running {rerun} complete cells")
        if to_run:
            seen = {c.id: _stamp(c.output_dir(study)) for c in to_run}
            backend: _LocalPool | _SlurmQueue
            if executor == "local":
                workers, threads = _local_shape(to_run, max_workers, threads_per_worker)
                backend = _LocalPool(workers)
                log(f"running {len(to_run)} cells: {workers} worker processes x {threads} threads")
            else:
                threads = 0  # per cell: its resources["cpus"]
                backend = _SlurmQueue(study / ".slurm", slurm or {}, max_workers, wait_timeout_s, log)
                log(f"running {len(to_run)} cells as SLURM jobs (submitit folder {study / '.slurm'})")

            def task_for(cell: Cell) -> _Task:
                notebook = cell.notebook.resolve()
                return _Task(
                    cell=cell, notebook=str(notebook), study_dir=str(study),
                    cwd=str(Path(cwd).resolve() if cwd is not None else notebook.parent), kernel_name=kernel_name,
                    threads=threads or int(cell.resources.get("cpus", threads_per_worker or 1)),
                    warm=warm and executor == "local" and kernel_name == "python3" and hasattr(os, "fork"),
                    seen=seen[cell.id], owner=owner,
                )

            results.update(_schedule(ordered, to_run, study, backend, task_for, progress, log))
    finally:
        if study_fd is not None:
            os.close(study_fd)
    summary = RunSummary(tuple(results[c.id] for c in _stage_order(selected)))
    log(summary.format())
    return summary


def _schedule(
    ordered: list[Cell], to_run: list[Cell], study: Path, backend: _LocalPool | _SlurmQueue,
    task_for: Callable[[Cell], _Task], progress: bool, log: Callable[[str], None],
) -> dict[str, CellResult]:
    """Submit cells whose deps are complete, record outcomes, block dependents of failures."""
    scheduled = {c.id for c in to_run}
    ok = {c.id for c in ordered if c.id not in scheduled and c.is_complete(study)}
    bad: dict[str, str] = {}
    by_id = {c.id: c for c in ordered}
    results: dict[str, CellResult] = {}
    pending = list(to_run)
    bar = tqdm(total=len(to_run), unit="cell", disable=not progress, dynamic_ncols=True)
    say = _say(log, bar)
    try:
        while pending or backend.busy:
            for cell in list(pending):
                missing = [d for d in cell.deps if d in bad or (d not in ok and d not in scheduled)]
                if missing:
                    reasons = ", ".join(
                        f"{by_id[d].name} ({bad.get(d, 'incomplete, not selected')})" for d in missing
                    )
                    results[cell.id] = CellResult(cell, "blocked", message=f"needs {reasons}")
                    bad[cell.id] = "blocked"
                    pending.remove(cell)
                    bar.update()
                elif backend.free and all(d in ok for d in cell.deps):
                    backend.submit(task_for(cell))
                    pending.remove(cell)
            if not backend.busy:
                continue
            for cell_id, outcome in backend.wait():
                cell = by_id[cell_id]
                results[cell_id] = CellResult(cell, outcome.status, outcome.seconds, outcome.message)
                if outcome.status in ("ran", "done"):
                    ok.add(cell_id)
                else:
                    bad[cell_id] = outcome.status
                    say(f"{outcome.status.upper()}: {cell.stage} {cell.name} [{cell_id}]: {outcome.message}")
                bar.update()
                bar.set_postfix_str(f"last: {cell.name}", refresh=False)
    finally:
        bar.close()
        backend.close()
    return results
