"""`run`: execute a study's incomplete cells in dependency order on an executor (local workers or
SLURM jobs) under the study's lock, blocking the dependents of failures, and summarise the run."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import locks, provenance
from .cells import Cell, CellResult, RunSummary, stamp
from .files import lock_path, tidy
from .local import LocalPool, local_shape
from .plan import format_plan, select_cells, stage_order, status_table, validate
from .slurm import SlurmQueue
from .worker import Task

EXECUTORS = ("local", "slurm")


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
        mem_gb and time_min (default kd_utils.engine.slurm.SLURM_DEFAULT_TIME_MIN); ``slurm`` holds
        submitit's slurm_* parameters without the prefix, e.g. {"partition": "gpu",
        "additional_parameters": {...}};
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
    ordered = validate(cells)
    selected = select_cells(ordered, only)
    for cell in selected:
        if not cell.notebook.is_file():
            raise FileNotFoundError(f"cell {cell.name!r}: notebook {cell.notebook} does not exist")
    study = Path(study_dir).resolve()
    study.mkdir(parents=True, exist_ok=True)
    owner = locks.process_owner()
    study_lock = lock_path(study, "study")
    study_fd = locks.acquire(study_lock, owner)
    try:
        if study_fd is None:
            log(
                f"WARNING: another runner ({locks.holder(study_lock)}) is running study {study}; "
                "cells it is executing will be reported as locked"
            )
        tidy(study, {c.stage for c in ordered}, owner)
        log(format_plan(status_table(selected, study)))
        def redo(c: Cell) -> bool:
            return force or (rerun_stale and provenance.is_stale(c.output_dir(study), c.notebook))

        results = {c.id: CellResult(c, "done") for c in selected if c.is_complete(study) and not redo(c)}
        to_run = [c for c in selected if c.id not in results]
        rerun = sum(c.is_complete(study) for c in to_run)
        if rerun:
            log(f"{'force' if force else 'rerun-stale'}: re-running {rerun} complete cells")
        if to_run:
            seen = {c.id: stamp(c.output_dir(study)) for c in to_run}
            backend: LocalPool | SlurmQueue
            if executor == "local":
                workers, threads = local_shape(to_run, max_workers, threads_per_worker)
                backend = LocalPool(workers)
                log(f"running {len(to_run)} cells: {workers} worker processes x {threads} threads")
            else:
                threads = 0  # per cell: its resources["cpus"]
                backend = SlurmQueue(study / ".slurm", slurm or {}, max_workers, wait_timeout_s, log)
                log(f"running {len(to_run)} cells as SLURM jobs (submitit folder {study / '.slurm'})")

            def task_for(cell: Cell) -> Task:
                notebook = cell.notebook.resolve()
                return Task(
                    cell=cell, notebook=str(notebook), study_dir=str(study),
                    cwd=str(Path(cwd).resolve() if cwd is not None else notebook.parent), kernel_name=kernel_name,
                    threads=threads or int(cell.resources.get("cpus", threads_per_worker or 1)),
                    warm=warm and executor == "local" and kernel_name == "python3" and hasattr(os, "fork"),
                    seen=seen[cell.id], owner=owner,
                )

            results.update(_schedule(ordered, to_run, study, backend, task_for, progress, log))
    finally:
        if study_fd is not None:
            locks.release(study_fd)
    summary = RunSummary(tuple(results[c.id] for c in stage_order(selected)))
    log(summary.format())
    return summary


def _schedule(
    ordered: list[Cell], to_run: list[Cell], study: Path, backend: LocalPool | SlurmQueue,
    task_for: Callable[[Cell], Task], progress: bool, log: Callable[[str], None],
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
