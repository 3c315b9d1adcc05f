"""Exclusive file locks (``flock``) that name their holder.

One implementation for every lock of the package: the runner takes its study and cell locks
without waiting (a held lock is reported with :func:`holder`), the teacher cache and the SeqKD
store wait for theirs (:func:`locked`), so parallel cells build a cache once. The lock lives with
the open file: a process that dies releases it, and the file's text (the holder's name, written
once the lock is taken) is only a label.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

__all__ = ["acquire", "holder", "locked", "process_owner", "release"]

_UNKNOWN = "pid unknown"


def process_owner() -> str:
    """This process as a lock holder is named: its pid and host."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def acquire(path: str | Path, owner: str | None = None, wait: bool = False) -> int | None:
    """Take the exclusive lock on ``path`` (created, with its folders, if needed) and write
    ``owner`` (default :func:`process_owner`) into it. Returns the file descriptor that holds the
    lock until :func:`release`; without ``wait``, None when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:  # interrupted while waiting
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, (owner or process_owner()).encode(), 0)
    return fd


def release(fd: int) -> None:
    """Release a lock taken by :func:`acquire` (and close its file descriptor)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder(path: str | Path) -> str:
    """Who holds (or last held) the lock on ``path``, as its holder wrote it."""
    try:
        return Path(path).read_text().strip() or _UNKNOWN
    except OSError:
        return _UNKNOWN


@contextlib.contextmanager
def locked(path: str | Path, owner: str | None = None) -> Iterator[None]:
    """Hold the exclusive lock on ``path`` for the block, waiting for it if another holds it."""
    fd = acquire(path, owner, wait=True)
    assert fd is not None  # a waiting acquire returns only once it holds the lock
    try:
        yield
    finally:
        release(fd)
