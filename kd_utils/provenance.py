"""Which code made a cell: a hash of the package's sources and the cell's notebook, written as
`provenance.json` beside each complete cell's `metrics.json`. Cell ids hash parameters only, so a
cell made by other code keeps its id; `plan` marks it "stale" and `run --rerun-stale` redoes it."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
FILE = "provenance.json"


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def code_version(notebook: str | Path) -> str:
    """12 hex digits of sha256 over the package's sources and `notebook`'s bytes."""
    h = hashlib.sha256(_package_digest().encode())
    h.update(Path(notebook).read_bytes())
    return h.hexdigest()[:12]


def record(cell_dir: str | Path, notebook: str | Path) -> None:
    """Write the cell's provenance (call before the cell is installed in place)."""
    (Path(cell_dir) / FILE).write_text(json.dumps({"code": code_version(notebook)}) + "\n")


def is_stale(cell_dir: str | Path, notebook: str | Path) -> bool:
    """Whether a complete cell was made by other code than the current (or before provenance was
    recorded)."""
    path = Path(cell_dir) / FILE
    if not path.is_file():
        return True
    return json.loads(path.read_text()).get("code") != code_version(notebook)
