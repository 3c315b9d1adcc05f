"""Train/test contamination: normalized instruction matching, the per-task table, and the grid
refusing (before any compute) training data that holds test items, unless params allow it."""
from __future__ import annotations

import json

import pytest
import yaml

from kd_utils.config import load_study
from kd_utils.contamination import normalize, overlap_table, refuse_above
from kd_utils.grid import expand


def test_normalization_ignores_case_spacing_and_punctuation_but_not_arithmetic():
    assert normalize("Is the SKY blue?\n\nAnswer format: true/false") == \
        normalize("is the sky blue  answer format true/false")
    assert normalize("If x + 3 = 8, what is x?") != normalize("If x - 3 = 8, what is x?")
    assert normalize("Solve", "for x") == normalize("solve for x")


def test_overlap_table_counts_each_tasks_test_items_found_in_training():
    train = [{"instruction": "What is 2 + 2?"}, {"instruction": "Name a colour.", "input": "Sky"}]
    tests = {"a": [{"instruction": "what is 2 + 2"}, {"instruction": "What is 3 + 3?"}],
             "b": [{"instruction": "Name a colour.", "input": "sky"}], "c": []}
    table = overlap_table(train, tests).set_index("task")
    assert table.loc["a", "n_overlap"] == 1 and table.loc["a", "share"] == 0.5
    assert table.loc["b", "share"] == 1.0 and table.loc["c", "n_test"] == 0
    with pytest.raises(ValueError, match=r"a 1/2 \(50.0%\), b 1/1"):
        refuse_above(table.reset_index(), 0.01, False, "train.json")
    refuse_above(table.reset_index(), 0.01, True, "train.json")  # allowed: no error


def _study(tmp_path, train_items, **training):
    data = tmp_path / "data"
    test = [{"instruction": f"Question {i}: is {i} even?", "input": "", "output": "the correct answer is true",
             "answer": "true"}
            for i in range(50)]
    (data / "boolq").mkdir(parents=True)
    (data / "boolq" / "test.json").write_text(json.dumps(test))
    (tmp_path / "train.json").write_text(json.dumps(train_items(test)))
    (tmp_path / "model").mkdir()
    params = {"study": "leak", "models": {"t": {"path": str(tmp_path / "model")}, "s": {"path": str(tmp_path / "model")}},
              "teachers": ["t"], "students": ["s"],
              "training": {"train_data": str(tmp_path / "train.json"), "steps": 2, **training},
              "evaluation": {"tasks": ["boolq"], "data_root": str(data)}}
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_study(path)


def test_the_grid_refuses_training_data_that_holds_test_items_before_any_compute(tmp_path):
    leaked = lambda test: test[:10] + [{"instruction": "Other?", "output": "x"}]  # noqa: E731
    cfg = _study(tmp_path, leaked)
    with pytest.raises(ValueError, match=r"boolq 10/50 \(20.0%\).*contamination.allow"):
        expand(cfg, tmp_path / "out")


def test_allowed_contamination_runs_and_is_reported_per_task(tmp_path):
    cfg = _study(tmp_path, lambda test: test[:1] + [{"instruction": "Other?", "output": "x"}],
                 contamination={"allow": True})
    grid = expand(cfg, tmp_path / "out")
    assert grid.contamination.set_index("task").loc["boolq", "n_overlap"] == 1
    assert "contamination: test items in the training data: boolq 1/50" in grid.notes


def test_clean_training_data_passes_with_a_note(tmp_path):
    grid = expand(_study(tmp_path, lambda test: [{"instruction": "Other?", "output": "x"}]), tmp_path / "out")
    assert grid.contamination["n_overlap"].sum() == 0
    assert any(n.startswith("contamination: no test item") for n in grid.notes)
