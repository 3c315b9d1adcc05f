"""One typed job per notebook (kd_utils.config.NOTEBOOK_JOBS), declared once: a notebook's `parameters`
cell declares exactly its job's fields plus the job's `notebook_only` names (cell_dir; study_dir and rerun
where opening the notebook re-runs a study's cell), its defaults validate into the job, every cell the grid
makes is its notebook's job, and in a kernel a parameter that is not a field is an error, not dropped."""
from __future__ import annotations

import ast
import tempfile
from pathlib import Path

import nbformat
import papermill
import pytest
from traitlets.config import Config

from kd_utils.config import NOTEBOOK_JOBS, RERUN_NAMES, job_from_namespace, job_params, load_study
from kd_utils.grid import NB, expand

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
#: the names a parameters cell may declare that are no field of its job (documented on NotebookJob)
NOTEBOOK_ONLY = {"cell_dir", *RERUN_NAMES}


def parameters_cell(notebook: Path) -> dict:
    """The names and default values of a notebook's `parameters` cell (one `name = literal` per line)."""
    cells = [c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{notebook.name}: {len(cells)} cells tagged 'parameters'"
    values = {}
    for stmt in ast.parse(cells[0].source).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), (
            f"{notebook.name}: the parameters cell holds only `name = value` lines, not {ast.unparse(stmt)!r}")
        name = stmt.targets[0].id
        assert name not in values, f"{notebook.name}: {name} is assigned twice"
        values[name] = ast.literal_eval(stmt.value)
    return values


def test_every_notebook_has_one_job():
    assert sorted(NOTEBOOK_JOBS) == [nb.stem for nb in ALL]
    assert {Path(p).stem for p in NB.values()} <= set(NOTEBOOK_JOBS)  # every notebook the grid runs


@pytest.mark.parametrize("notebook", ALL, ids=lambda nb: nb.stem)
def test_a_parameters_cell_declares_its_jobs_fields_and_nothing_else(notebook):
    job = NOTEBOOK_JOBS[notebook.stem]
    fields, own = set(job.model_fields), set(job.notebook_only)
    assert own <= NOTEBOOK_ONLY and not own & fields
    declared = set(parameters_cell(notebook))
    missing, extra = sorted((fields | own) - declared), sorted(declared - fields - own)
    assert not missing and not extra, (f"{notebook.name} and {job.__name__} disagree: the cell lacks {missing}, "
                                       f"the job has no field {extra}")
    if {"study_dir", "rerun"} <= own:  # as opened, the notebook re-runs a study's cell: its path parameter is ""
        assert any(v == "" for k, v in parameters_cell(notebook).items() if k.endswith(("_path", "_dir")))


@pytest.mark.parametrize("notebook", ALL, ids=lambda nb: nb.stem)
def test_a_parameters_cells_defaults_validate_into_its_job(notebook):
    declared = parameters_cell(notebook)
    job_from_namespace(NOTEBOOK_JOBS[notebook.stem], declared, f"{notebook.name} parameters", names=declared)


@pytest.mark.parametrize("params", ["micro.yaml", "micro_instruction.yaml", "paper_qwen_math.yaml"])
def test_every_cell_of_the_grid_is_its_notebooks_job(params, tmp_path, monkeypatch):
    """The grid's parameter dicts are the jobs' dumps: each validates into its notebook's job and dumps back
    unchanged, so a dict key cannot drift from the job (nor from the notebook's parameters cell)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    grid = expand(load_study(REPO / "params" / params), tmp_path)
    for cell in grid.cells:
        job = NOTEBOOK_JOBS[cell.notebook.stem]
        assert job_params(job_from_namespace(job, cell.parameters, cell.name, names=cell.parameters)) == \
            cell.parameters, cell.name
    stems = {cell.notebook.stem for cell in grid.cells}
    assert stems >= {"05_teacher_cache", "10_distill", "20_evaluate", "30_fidelity", "40_ablation", "50_statistics"}
    if params.startswith("micro"):
        assert {"00_world", "01_pretrain"} <= stems


def test_a_kernel_refuses_a_parameter_its_job_does_not_have(tmp_path):
    """papermill only warns about a parameter the notebook does not declare; the job refuses it, and a
    typo in the parameters cell, naming both with the closest parameter."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('cell_dir = "x"\nmodel = "m"\ngguf = "a.gguf"\nsource_path = None\n'
                                          'keep = None\nrul = "even"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from kd_utils.config import ModelJob, job_from_namespace\n"
                                          "job = job_from_namespace(ModelJob, globals(), 'probe parameters')")]
    nbformat.write(nb, tmp_path / "probe.ipynb")
    with tempfile.TemporaryDirectory(prefix="kd-nb-") as sockets, \
            pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(tmp_path / "probe.ipynb", tmp_path / "out.ipynb", parameters={"kepp": 3},
                                   kernel_name="python3", cwd=REPO, progress_bar=False,
                                   config=Config({"KernelManager": {"transport": "ipc", "ip": f"{sockets}/k"}}))
    assert err.value.ename == "ValueError"
    assert "invalid params in probe parameters:" in err.value.evalue
    assert "kepp: unknown parameter (did you mean 'keep'?)" in err.value.evalue
    assert "rul: unknown parameter (did you mean 'rule'?)" in err.value.evalue
