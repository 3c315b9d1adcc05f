"""One evaluation run (kd_utils.evaluate_run): the params' stop strings reach the decoder, so a
model that keeps generating is scored on its answer only (the authors split on "### Response:")."""
from __future__ import annotations

import json

from kd_utils.config import EvalConfig, EvalJob
from kd_utils.evaluate_run import run_evaluation


def _outputs(micro, tmp_path, **evaluation) -> list[str]:
    job = EvalJob(model="t", model_path=str(micro.teacher_dir), kind="sft", student="t", data_root=str(micro.data_root),
                  evaluation=EvalConfig(tasks=["micro_addsub"], limit=3, max_new_tokens={"math": 24}, **evaluation))
    run_evaluation(job, tmp_path, progress=False)
    return [json.loads(line)["output"] for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]


def test_stop_strings_from_the_params_cut_every_output(micro, tmp_path):
    full = _outputs(micro, tmp_path / "full")
    stop = full[0][len(full[0]) // 2:][:3]  # a string the first output contains after its start
    assert stop.strip() and stop in full[0][1:]
    cut = _outputs(micro, tmp_path / "cut", stop_strings=[stop])
    for whole, part in zip(full, cut):
        assert part == whole[:whole.index(stop)] if stop in whole else part == whole
    assert len(cut[0]) < len(full[0])
