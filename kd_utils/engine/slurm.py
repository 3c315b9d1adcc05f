"""The SLURM executor: one submitit job per cell (its cpus, gpus, mem_gb and time_min), followed
through squeue; submitit is imported only when a job is submitted."""
from __future__ import annotations

import getpass
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cells import stamp
from .worker import PACKAGE_ROOT, Outcome, Task, execute

if TYPE_CHECKING:
    import submitit

SLURM_DEFAULT_TIME_MIN = 60


class SlurmQueue:
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
        self._jobs: dict[str, tuple[submitit.Job[Outcome], Task, float]] = {}
        self._gone: dict[str, float] = {}
        self._started = time.monotonic()

    @property
    def free(self) -> int:
        return sys.maxsize if self._max_jobs is None else self._max_jobs - len(self._jobs)

    @property
    def busy(self) -> int:
        return len(self._jobs)

    def submit(self, task: Task) -> None:
        resources = task.cell.resources
        options = dict(self._options)
        setup = [f"export PYTHONPATH={shlex.quote(PACKAGE_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}", *options.pop("setup", [])]
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
        job = executor.submit(execute, task)
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

    def wait(self) -> list[tuple[str, Outcome]]:
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
        self, job: submitit.Job[Outcome], task: Task, submitted: float, queued: set[str] | None
    ) -> Outcome | None:
        elapsed = time.monotonic() - submitted
        if job.paths.result_pickle.exists():  # not job.done(): its sacct fallback needs accounting storage
            try:
                return job.result()
            except Exception as exc:  # execute raised, or submitit could not read the result
                last = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
                return Outcome("failed", elapsed, f"SLURM job {job.job_id} failed: {last[0]} (see {job.paths.stderr})")
        if queued is not None and job.job_id not in queued:
            gone = self._gone.setdefault(job.job_id, time.monotonic())
            if time.monotonic() - gone > self.GONE_GRACE_S:
                present = stamp(task.cell.output_dir(task.study_dir))
                if present is not None and present != task.seen:
                    return Outcome("ran", elapsed, f"SLURM job {job.job_id} left no result, but the cell is complete")
                return Outcome(
                    "failed", elapsed,
                    f"SLURM job {job.job_id} left the queue without a result (cancelled, timed out or killed); "
                    f"see {job.paths.stderr}",
                )
        if self._timeout_s is not None and elapsed > self._timeout_s:
            job.cancel(check=False)
            message = f"SLURM job {job.job_id} not finished after {self._timeout_s:g} s: cancelled"
            return Outcome("failed", elapsed, message)
        return None

    def close(self) -> None:
        if self._jobs:
            ids = ", ".join(job.job_id for job, _, _ in self._jobs.values())
            self._log(f"left {len(self._jobs)} SLURM jobs running ({ids}); a rerun counts the cells they complete")
