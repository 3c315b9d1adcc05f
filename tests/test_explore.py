"""The explore API (kd_utils.explore) on the quick study's outputs, its side-by-side logic on
hand-made predictions, and its one-sentence messages before a study or a cell has run."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kd_utils.evaluation import prompt_hash
from kd_utils.explore import (OTHER_RATIONALE, STUDENT_ONLY, StudyNotReady, at_repo_root, browser, open_study,
                              repo_path, rerun_parameters, select, side_by_side)
from kd_utils.tasks import build_prompt

REPO = Path(__file__).resolve().parents[1]
KD = "kd/micro-xs<-micro-s/fkl/t2/n0/sft/s0"


@pytest.fixture(scope="module")
def study(quick_study):
    return open_study(quick_study)


def test_the_plan_lists_every_cell_with_its_status(study):
    plan = study.plan
    assert len(plan) == 17 and (plan["status"] == "done").all()
    assert list(plan["stage"].unique()) == ["prepare", "distill", "evaluate", "fidelity", "statistics"]
    assert open_study(study.dir).plan.equals(plan)  # a path and the study's own params give the same cells


def test_tables_are_the_studys_csvs(study):
    assert study.results.equals(pd.read_csv(study.dir / "results.csv"))
    assert study.fidelity.equals(pd.read_csv(study.dir / "fidelity.csv"))
    fid = study.cell("fidelity")
    assert study.gains().equals(pd.read_csv(fid.dir / "gains.csv"))
    assert study.gains(fid.dir).equals(study.gains())


def test_a_cell_is_found_by_name_id_model_name_or_glob(study):
    cell = study.cell(KD)
    assert study.cell(cell.id).name == KD and study.cell("kd/*/fkl/*").name == KD
    assert study.cell("micro-xs/sft/s0").name == "sft/micro-xs/s0"  # results.csv's model -> its training cell
    assert study.cell("kd/*/rkl/*").parameters["method"] == "rkl"
    with pytest.raises(KeyError, match="did you mean"):
        study.cell("kd/micro-xs<-micro-s/fkl/t1/n0/sft/s0")


def test_a_cell_gives_parameters_metrics_history_predictions_and_model(study):
    cell = study.cell(KD)
    assert cell.parameters["method"] == "fkl" and cell.parameters["temperature"] == 2.0
    assert cell.status == "done" and cell.notebook.is_file()
    history = cell.history
    assert len(history) == cell.metrics["steps"] == 40 and history["loss"].notna().all()
    evaluation = cell.evaluation
    assert evaluation.name == f"evaluate/{KD}" and evaluation.evaluation is evaluation
    assert len(cell.predictions) == 14 * 10 and cell.predictions.equals(evaluation.predictions)
    model, tokenizer = cell.load_model()
    assert sum(p.numel() for p in model.parameters()) == cell.metrics["student_params"]
    assert evaluation.model_path == cell.model_path
    with pytest.raises(ValueError, match="no loss history"):
        evaluation.history


def test_teachers_are_those_fidelity_csv_pairs(study):
    assert study.teacher_of(KD).name == "evaluate/micro-s/sft/s0"
    assert study.teacher_of("micro-xs/sft/s0").name == "evaluate/micro-s/sft/s0"  # an SFT student: its KD teacher
    with pytest.raises(ValueError, match="distilled from no teacher"):
        study.teacher_of("micro-s/sft/s0")


def test_compare_agrees_with_the_fidelity_table(study):
    fidelity = study.fidelity
    for model in fidelity["model"].unique():
        items = study.compare(model)
        assert len(items) == 140 and items.attrs == {"student": model, "teacher": "micro-s/sft/s0"}
        preds = study.cell(model).predictions
        assert (items["student_output"] == preds["output"].fillna("")).all()
        assert ((items["right"].isin(["both", "student"])) == preds["correct"]).all()
        agreement = items.groupby("task")["agree"].mean() * 100
        expected = fidelity[fidelity["model"] == model].set_index("task")["agreement"]
        assert agreement.sort_index().to_numpy() == pytest.approx(expected.sort_index().to_numpy())
        assert items["bleu"].between(0, 100).all()
        assert items["prompt"].str.len().gt(0).all()


def test_pairs_summarise_every_student_beside_its_teacher(study):
    pairs = study.pairs()
    fidelity, results = study.fidelity, study.results
    assert set(pairs.index) == set(fidelity["model"]) and (pairs["teacher"] == "micro-s").all()
    assert pairs["agreement"].to_dict() == pytest.approx(fidelity.groupby("model")["agreement"].mean().to_dict())
    teacher = results[results["model"] == "micro-s/sft/s0"]["accuracy"].mean()
    assert pairs["teacher_accuracy"].eq(teacher).all()
    assert pairs.loc[KD, "method"] == "fkl" and pairs.loc[KD, "items"] == 140
    items = study.compare(KD)
    assert pairs.loc[KD, STUDENT_ONLY] == (items["paradox"] == STUDENT_ONLY).sum()


def _preds(rows):
    prompts = {i: build_prompt(f"question {i}") for i in range(len(rows))}
    return pd.DataFrame([{"task": "micro_addsub", "item_id": i, "prompt_hash": prompt_hash(prompts[i]), "output": out,
                          "extracted": ext, "label": "7", "correct": ok} for i, (out, ext, ok) in enumerate(rows)])


def test_side_by_side_names_the_paradox_cases():
    items = {("micro_addsub", i): {"instruction": f"question {i}", "input": ""} for i in range(4)}
    because = "3 and 4 make 7. The answer is 7."
    teacher = _preds([("So 9. The answer is 9.", "9", False), (because, "7", True), (because, "7", True),
                      ("The answer is 5.", "5", False)])
    student = _preds([(because, "7", True), ("Seven, since 10 minus 3 is 7", "7", True), (because, "7", True),
                      ("The answer is 6.", "6", False)])
    out = side_by_side(student, teacher, items)
    assert list(out["right"]) == ["student", "both", "both", "neither"]
    assert list(out["agree"]) == [False, True, True, False]
    assert list(out["paradox"]) == [STUDENT_ONLY, OTHER_RATIONALE, "", ""]
    assert out.loc[2, "bleu"] == pytest.approx(100) and out.loc[1, "bleu"] < 50
    assert list(out["prompt"]) == [f"question {i}" for i in range(4)] and (out["gold"] == "7").all()
    assert list(side_by_side(student, teacher, items, other_rationale_below=0)["paradox"]) == [STUDENT_ONLY, "", "", ""]
    assert list(select(out, "paradox")["item_id"]) == [0, 1]
    assert list(select(out, OTHER_RATIONALE)["item_id"]) == [1]
    assert len(select(out, "all")) == 4 and select(out, "all", task="micro_gsm").empty
    with pytest.raises(ValueError, match="show="):
        select(out, "everything")
    moved = {("micro_addsub", i): {"instruction": f"question {i + 1}", "input": ""} for i in range(4)}
    with pytest.raises(ValueError, match="not those"):
        side_by_side(student, teacher, moved)


def test_before_any_study_one_sentence_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_OUTPUTS", str(tmp_path))
    with pytest.raises(StudyNotReady) as err:
        open_study("micro")
    assert str(err.value) == f"There is no study at {tmp_path / 'micro'} yet: run `make study` first."
    assert err.value._render_traceback_() == [f"StudyNotReady: {err.value}"]  # what IPython shows: no traceback
    with pytest.raises(StudyNotReady, match=r"run `python -m kd_utils.grid run params/micro_full.yaml` first\.$"):
        rerun_parameters(tmp_path / "micro_full", "prepare/world")


def test_a_cell_that_has_not_run_says_so(study, tmp_path):
    fresh = tmp_path / "micro_quick"
    fresh.mkdir()
    (fresh / "params.resolved.json").write_text((study.dir / "params.resolved.json").read_text())
    with pytest.raises(StudyNotReady, match=r"^Cell prepare/world of .* has not run yet: run `python -m kd_utils"):
        rerun_parameters(fresh, "prepare/world")
    with pytest.raises(StudyNotReady, match="has no results.csv yet"):
        open_study(fresh).results
    assert (open_study(fresh).plan["status"] == "todo").all()


def test_rerun_parameters_are_the_cells(study, capsys):
    params = rerun_parameters(study.dir, "kd/micro-xs<-*/fkl/*")
    assert params == study.cell(KD).parameters and "cell_dir" not in params
    assert KD in capsys.readouterr().out


def test_paths_resolve_against_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_path("outputs/micro") == REPO / "outputs" / "micro" and repo_path(tmp_path) == tmp_path
    assert at_repo_root(tmp_path / "new" / "cell") == str(tmp_path / "new" / "cell")
    assert Path.cwd() == REPO and (tmp_path / "new" / "cell").is_dir()


def test_the_browser_offers_every_pair(study, capsys):
    pairs = study.pairs()
    pair, show, task, _ = browser(study, pairs).children
    assert [v for _, v in pair.options] == list(zip(pairs.index, pairs["teacher"]))
    assert show.value == "paradox" and len(task.options) == 15
    capsys.readouterr()
    pair.value, show.value = pair.options[-1][1], "all"  # without a kernel, the view prints
    assert "140 of 140 items" in capsys.readouterr().out
