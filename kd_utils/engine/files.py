"""A study's files: the study and cell locks (kd_utils.locks), results installed by an atomic
rename, and the leftovers of killed runs tidied (a result lost mid-replacement restored)."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from .. import locks
from .cells import stamp

LEFTOVER_RE = re.compile(r"\.(tmp|trash|replaced)-([0-9a-f]{12})-[0-9a-f]+")
SOCKETS_PREFIX = "kd-kernel-"  # + cell id: a kernel's Unix sockets, in the temp dir (short paths)


def lock_path(study: Path, name: str) -> Path:
    """The lock file of the study (name "study") or of a cell (its id)."""
    return study / ".locks" / f"{name}.lock"


def aside(path: Path, kind: str, cell_id: str) -> Path:
    """A fresh ``.<kind>-<cell id>-<random>`` name beside path (kind: tmp, trash or replaced)."""
    return path.parent / f".{kind}-{cell_id}-{secrets.token_hex(4)}"


def install(src: Path, dest: Path, cell_id: str, result: bool) -> None:
    """Rename directory src to dest atomically; a previous dest is moved aside first, then removed.

    For results (``result``), a complete previous one is moved to ``.replaced-*``, so a crash before
    the rename leaves it recoverable (see `tidy`).
    """
    old = None
    if dest.exists():
        old = aside(dest, "replaced" if result and stamp(dest) else "trash", cell_id)
        os.rename(dest, old)
    os.rename(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def tidy(study: Path, stages: set[str], owner: str) -> None:
    """Remove leftovers of killed runs whose cell lock is free; restore a result lost mid-replacement.

    A cell whose lock is still held (its killed worker not yet gone) is tidied when it next executes.
    """
    for stage in sorted(stages):
        stage_dir = study / stage
        if not stage_dir.is_dir():
            continue
        ids = {m[2] for m in map(LEFTOVER_RE.fullmatch, (e.name for e in stage_dir.iterdir())) if m}
        for cell_id in sorted(ids):
            fd = locks.acquire(lock_path(study, cell_id), owner)
            if fd is None:
                continue
            try:
                tidy_cell(stage_dir, cell_id)
            finally:
                locks.release(fd)


def tidy_cell(stage_dir: Path, cell_id: str) -> None:
    """With the cell's lock held: restore a complete result moved aside, remove the other leftovers
    (and the kernel socket folders that killed runs of the cell left in this machine's temp dir)."""
    for sockets in Path(tempfile.gettempdir()).glob(f"{SOCKETS_PREFIX}{cell_id}-*"):
        shutil.rmtree(sockets, ignore_errors=True)
    final = stage_dir / cell_id
    for entry in sorted(stage_dir.glob(f".*-{cell_id}-*")):
        if not LEFTOVER_RE.fullmatch(entry.name):
            continue
        if entry.name.startswith(".replaced-") and stamp(final) is None and stamp(entry):
            if final.exists():
                trash = aside(final, "trash", cell_id)
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(entry, final)
        else:
            shutil.rmtree(entry, ignore_errors=True)
