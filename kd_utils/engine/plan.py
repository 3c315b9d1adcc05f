"""The plan: the cells' DAG checked and ordered, a status table (done, stale, todo, failed-before)
and the cells selected by name, id or stage patterns."""
from __future__ import annotations

import fnmatch
import graphlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .. import provenance
from .cells import Cell


def validate(cells: Sequence[Cell]) -> list[Cell]:
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


def stage_order(cells: Sequence[Cell]) -> list[Cell]:
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


def status_table(cells: Sequence[Cell], study: Path, cost: Callable[[Cell], Any] | None = None) -> pd.DataFrame:
    """`plan`'s table of cells already validated."""
    ordered = stage_order(cells)
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
    return status_table(validate(cells), Path(study_dir), cost)


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
