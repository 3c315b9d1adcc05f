"""Cells: one notebook run with one set of parameters (its id, its completion), and the outcome
of a run (CellResult per cell, RunSummary)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESOURCE_KEYS = ("cpus", "gpus", "mem_gb", "time_min")
STATUSES = ("ran", "done", "failed", "blocked", "locked")

_STAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED_STAGES = {"logs"}


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def stamp(final: Path) -> tuple[int, int] | None:
    """Identity of a complete result (inode and mtime of metrics.json), None if incomplete."""
    try:
        st = os.stat(final / "metrics.json")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_mtime_ns)


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
            canonical = canonical_json(dict(self.parameters))
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
        digest = hashlib.sha256(canonical_json([self.stage, notebook.name, json.loads(canonical)]).encode())
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
        return stamp(self.output_dir(study_dir)) is not None


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

