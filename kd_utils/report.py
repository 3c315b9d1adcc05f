"""The study report: the executed analysis notebooks gathered into one HTML page
(code hidden), with the date and machine it was rendered on."""
from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter


def _machine() -> str:
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:  # pragma: no cover - torch is a dependency
        gpu = "unknown accelerator"
    import os
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}"


def _without_stderr(cell):
    """Progress bars and warnings stay in the executed notebooks and logs, not in the report."""
    if cell.cell_type == "code":
        cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    return cell


def _contamination_section(grid) -> list:
    """The train/test overlap per task, checked before compute (kd_utils.contamination)."""
    import json

    import pandas as pd

    table = grid.contamination
    if table is None:
        worlds = [c.output_dir(grid.study_dir) / "metrics.json" for c in grid.by_notebook("world")]
        records = [json.loads(p.read_text()).get("contamination") for p in worlds if p.exists()]
        table = pd.DataFrame(records[0]) if records and records[0] else None
    if table is None:
        return []
    hit = int(table["n_overlap"].sum())
    summary = ("No test item appears in the training data." if hit == 0 else
               f"{hit} test items appear in the training data (normalized instruction match).")
    return [nbformat.v4.new_markdown_cell(f"## Train/test contamination\n\n{summary}\n\n"
                                          + table.to_markdown(index=False, floatfmt=".4f"))]


def _anchor(heading: str) -> str:
    """The id nbconvert gives a markdown heading."""
    return heading.strip().replace(" ", "-")


def _headings(cells) -> list[tuple[int, str]]:
    """(level, text) of the level-1 and level-2 markdown headings of `cells`, in order."""
    found = []
    for cell in cells:
        if cell.cell_type == "markdown":
            found += [(len(m.group(1)), m.group(2)) for m in re.finditer(r"^(#{1,2}) (.+)$", cell.source, re.M)]
    return found


def _cells_section(grid) -> list:
    """Every cell of the grid with a link to its executed notebook (relative to the report)."""
    rows = [f"| {c.stage} | {c.name} | [{c.id}]({c.stage}/{c.id}/notebook.ipynb) |" for c in grid.cells
            if (c.output_dir(grid.study_dir) / "notebook.ipynb").exists()]
    return [nbformat.v4.new_markdown_cell("# Every cell's executed notebook\n\n| stage | cell | notebook |\n|---|---|---|\n"
                                          + "\n".join(rows))]


REPORT_NOTEBOOKS = ("fidelity", "ablation", "statistics")  # gathered, in this order, into report.html


def render_report(grid) -> Path:
    """Write `<study>/report.html`: a title, the statistics notebook's summary (cells tagged
    "summary"), a table of contents, the contamination check, the executed fidelity, ablation and
    statistics notebooks, and a link to every cell's executed notebook."""
    study = grid.study_dir
    executed = []
    for key in REPORT_NOTEBOOKS:
        for cell in grid.by_notebook(key):
            path = cell.output_dir(study) / "notebook.ipynb"
            if not path.exists():
                raise FileNotFoundError(f"{key} has not run yet ({path} is missing): run the grid first")
            executed.append(nbformat.read(path, as_version=4))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = nbformat.v4.new_markdown_cell(
        f"# Knowledge distillation study `{grid.cfg.study}`\n\n"
        f"Rendered {stamp} on {_machine()}. Tables: `results.csv`, `fidelity.csv` beside this page; "
        f"every number links back to an executed notebook (the last section lists them all).")
    tags = lambda c: set(c.metadata.get("tags", []))  # noqa: E731
    cells = [_without_stderr(c) for nb in executed for c in nb.cells
             if not {"parameters", "injected-parameters"} & tags(c)]
    summary = [c for c in cells if "summary" in tags(c)]
    body = _contamination_section(grid) + [c for c in cells if "summary" not in tags(c)] + _cells_section(grid)
    toc = nbformat.v4.new_markdown_cell("## Contents\n\n" + "\n".join(
        f"{'  ' * (level - 1)}- [{text}](#{_anchor(text)})" for level, text in _headings(body)))
    merged = nbformat.v4.new_notebook()
    merged.metadata = executed[0].metadata if executed else {}
    merged.cells = [title] + summary + [toc] + body
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(merged)
    out = study / "report.html"
    out.write_text(body, encoding="utf-8")
    return out
