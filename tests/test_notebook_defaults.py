"""Every notebook runs as opened: papermill with the notebook's own defaults (what "Run All" does in
JupyterLab), the kernel started in notebooks/ (as `make lab` starts it), pointed only at the quick
study (`study_dir`) and, to leave the repository's outputs/ alone, at a scratch `cell_dir`.
Before any study, a notebook that needs one stops at its first cell with one sentence (checked on one
notebook of each kind: one that re-runs a cell, an analysis, the explorer)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import papermill
import pytest
from traitlets.config import Config


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
NEED_A_STUDY = [nb for nb in ALL if "study_dir" in papermill.inspect_notebook(nb)]
ONE_OF_EACH_KIND = [NOTEBOOKS / f"{name}.ipynb" for name in ("10_distill", "50_statistics", "60_explore")]


def execute(notebook: Path, out: Path, **parameters) -> dict:
    """Run `notebook` from notebooks/ with these parameters only; the executed notebook as JSON.
    Kernels talk over Unix sockets (TCP ports race with other kernels on a busy machine)."""
    with tempfile.TemporaryDirectory(prefix="kd-nb-") as sockets:
        papermill.execute_notebook(notebook, out, parameters=parameters, kernel_name="python3", cwd=NOTEBOOKS,
                                   progress_bar=False,
                                   config=Config({"KernelManager": {"transport": "ipc", "ip": f"{sockets}/k"}}))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def quick(quick_study) -> Path:
    return quick_study


def test_every_notebook_declares_its_parameters():
    assert [nb.stem for nb in ALL] == ["00_world", "01_pretrain", "02_model", "05_teacher_cache", "10_distill",
                                       "20_evaluate", "30_fidelity", "40_ablation", "50_statistics", "60_explore"]
    assert {nb.stem for nb in ALL} - {nb.stem for nb in NEED_A_STUDY} == {"00_world", "02_model"}


@pytest.mark.parametrize("notebook", ALL, ids=lambda nb: nb.stem)
def test_a_notebook_runs_with_its_defaults(notebook, quick, tmp_path):
    declared = papermill.inspect_notebook(notebook)
    parameters = {"cell_dir": str(tmp_path / "cell")} if "cell_dir" in declared else {}
    if "study_dir" in declared:
        parameters["study_dir"] = str(quick)
    executed = execute(notebook, tmp_path / "out.ipynb", **parameters)
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    if "cell_dir" in declared:
        assert (tmp_path / "cell" / "metrics.json").is_file()
    else:  # 60_explore: its first table, one row per student and teacher
        assert "kd/micro-xs&lt;-micro-s/fkl/t2/n0/sft/s0" in "".join(outputs[0]["data"]["text/html"])


@pytest.mark.parametrize("notebook", ONE_OF_EACH_KIND, ids=lambda nb: nb.stem)
def test_before_a_study_the_first_cell_says_what_to_run(notebook, tmp_path):
    missing = tmp_path / "micro_quick"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        execute(notebook, tmp_path / "out.ipynb", study_dir=str(missing),
                **({"cell_dir": str(tmp_path / "cell")} if "cell_dir" in papermill.inspect_notebook(notebook) else {}))
    sentence = f"There is no study at {missing} yet: run `python -m kd_utils.grid run params/micro_quick.yaml` first."
    assert err.value.ename == "StudyNotReady" and err.value.evalue == sentence
    assert err.value.traceback == [f"StudyNotReady: {sentence}"]  # no traceback from inside a library
    first_code = next(c for c in json.loads((tmp_path / "out.ipynb").read_text())["cells"] if c["cell_type"] == "code"
                      and not {"parameters", "injected-parameters"} & set(c["metadata"].get("tags", [])))
    assert any(o["output_type"] == "error" for o in first_code["outputs"])
