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


# What each notebook writes to metrics.json as opened on the quick study (recorded 2026-11-30 on the
# 2-core development machine; the quick study's 40-step models get no test item right, hence the zeros).
# Counts are exact; losses carry 1% for float summation order on other CPUs.
LOSS = dict(rel=1e-2)
PINNED = {
    "00_world": {"corpus_lines": 60000, "vocab_size": 1024, "task_tokens_max": 54,
                 "task_tokens_mean": pytest.approx(32.9444, rel=1e-4),
                 "tasks": {t: {"train": 2000, "test": 200} for t in (
                     "micro_addsub", "micro_singleeq", "micro_multiarith", "micro_svamp", "micro_gsm", "micro_aqua",
                     "micro_mawps", "micro_boolq", "micro_piqa", "micro_siqa", "micro_hellaswag", "micro_winogrande",
                     "micro_arc", "micro_obqa")}},
    "01_pretrain": {"model": "micro-xs", "params": 41248, "steps": 20, "tokens": 40320,
                    "final_loss": pytest.approx(5.7610, **LOSS)},
    "02_model": {"model": "smollm2", "source": "gguf", "params": 134515008,
                 "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    "05_teacher_cache": {"teacher": "micro-s", "k": 16, "examples": 2000, "target_tokens": 31575,
                         "teacher_forward_passes": 0},
    "10_distill": {"student": "micro-xs", "teacher": "micro-s", "method": "fkl", "steps": 40, "best_step": 40,
                   "target_tokens": 10115, "student_params": 41248, "teacher_params": 131648,
                   "teacher_forward_passes": 40, "best_val_loss": pytest.approx(3.9879, **LOSS)},
    "20_evaluate": {"model": "kd/micro-xs<-micro-s/fkl/t2/n0/sft/s0", "params": 41248,
                    "accuracy": {t: 0.0 for t in (
                        "micro_addsub", "micro_singleeq", "micro_multiarith", "micro_svamp", "micro_gsm", "micro_aqua",
                        "micro_mawps", "micro_boolq", "micro_piqa", "micro_siqa", "micro_hellaswag",
                        "micro_winogrande", "micro_arc", "micro_obqa")}},
    "30_fidelity": {"models": 5, "pairs": 4, "tau": "max", "scorer": "generate"},
    "40_ablation": {"temperature": 0, "noise": 0, "teacher_kind": 0, "size_gap": 0},
    "50_statistics": {"tests": 0},
}


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
        metrics = json.loads((tmp_path / "cell" / "metrics.json").read_text())
        for key, value in PINNED[notebook.stem].items():
            assert metrics[key] == value, (notebook.stem, key)
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
