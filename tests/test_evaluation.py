"""Decoding and scoring with a tiny random Qwen2 model and a tokenizer trained here."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from kd_utils import evaluation as E
from kd_utils.tasks import GROUPS, TASKS, build_prompt, format_answer, item_options, load_items

SHARED = Path(os.environ.get("KD_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
PAPER_DATA = SHARED / "data" / "llm_adapters"

PROMPTS = [build_prompt("Add 2 and 3."),  # different lengths and endings, so outputs differ
           "Sam has 12 apples and buys 7 more, then gives 4 to a friend. How many apples",
           build_prompt("Pick one.", "the correct answer is answer1 or answer2"),
           "Is the sky green? true"]



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Byte-level BPE over ASCII seen in a small corpus (every token decodes to ASCII); no pad token."""
    corpus = PROMPTS + [format_answer(TASKS["gsm8k"], str(i)) for i in range(30)] + \
        [format_answer(TASKS["ARC-Easy"], o) for o in TASKS["ARC-Easy"].options] + ["true false solution1 ending4"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=260, special_tokens=["<|eos|>"]))
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>").save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id)
    return Qwen2ForCausalLM(config).eval()


def test_batched_greedy_equals_one_by_one_in_input_order(model, tokenizer):
    assert tokenizer.pad_token is None  # padding falls back to eos
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)
    single = [E.generate(model, tokenizer, [p], max_new_tokens=10, progress=False)[0] for p in PROMPTS]
    assert len(set(single)) == len(PROMPTS)  # distinct outputs, so order errors would show
    for batch_size in (2, 4):
        assert E.generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=batch_size,
                          progress=False) == single
    assert E.generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=10, progress=False) == single[::-1]
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"  # caller's tokenizer untouched
    assert E.generate(model, tokenizer, [], progress=False) == []


def test_model_mode_is_restored(model, tokenizer):
    model.train()
    try:
        a = E.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=5, progress=False)
        assert model.training
        model.eval()
        assert E.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=5, progress=False) == a
    finally:
        model.eval()


def test_sampling_is_reproducible_by_seed(model, tokenizer):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, batch_size=2, progress=False)
    a = E.generate(model, tokenizer, PROMPTS, seed=1, **kw)
    assert a == E.generate(model, tokenizer, PROMPTS, seed=1, **kw)
    assert a != E.generate(model, tokenizer, PROMPTS, seed=2, **kw)
    assert a != E.generate(model, tokenizer, PROMPTS, max_new_tokens=12, progress=False)


def test_stop_strings_truncate(model, tokenizer):
    full = E.generate(model, tokenizer, PROMPTS, max_new_tokens=16, progress=False)
    stops = [next(t[i:i + 2] for i in range(4, len(t) - 2) if t[i:i + 2].strip() == t[i:i + 2]) for t in full]
    for prompt, text, stop in zip(PROMPTS, full, stops):
        cut = E.generate(model, tokenizer, [prompt], max_new_tokens=16, stop_strings=[stop], progress=False)[0]
        assert cut == text[:text.index(stop)]
    # in a batch, each row stops at its own string; absent strings change nothing
    assert E.generate(model, tokenizer, PROMPTS, max_new_tokens=16, stop_strings=["\x00never"],
                      progress=False) == full
    with pytest.raises(ValueError, match="stop_strings"):
        E.generate(model, tokenizer, PROMPTS, stop_strings="###", progress=False)


def test_a_prompt_longer_than_the_window_loses_its_left_and_is_flagged(model, tokenizer):
    long_prompt = "Sam has 12 apples " * 120 + "How many apples"
    n = len(tokenizer(long_prompt)["input_ids"])
    window = model.config.max_position_embeddings
    assert n + 8 > window
    flags: list[bool] = []
    out = E.generate(model, tokenizer, [long_prompt, PROMPTS[0]], max_new_tokens=8, progress=False, truncated=flags)
    assert flags == [True, False]
    kept = tokenizer.decode(tokenizer(long_prompt)["input_ids"][n - (window - 8):])
    assert out[0] == E.generate(model, tokenizer, [kept], max_new_tokens=8, progress=False)[0]
    with pytest.raises(ValueError, match="leaves no room"):
        E.generate(model, tokenizer, [PROMPTS[0]], max_new_tokens=window, progress=False)


def _direct_loglik(model, tokenizer, context: str, continuation: str) -> float:
    stripped = context.rstrip()
    ctx = tokenizer(stripped)["input_ids"]
    whole = tokenizer(stripped + context[len(stripped):] + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logprobs[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def test_loglik_matches_a_direct_sum_of_token_logprobs(model, tokenizer):
    contexts = [p + "the correct answer is " for p in PROMPTS[:3]] + [PROMPTS[3]] * 2
    choices = [["answer1", "answer2", "answer3"], ["true", "false"], ["solution1", "solution2", "ending4", "x"],
               ["The answer is 5.", "The answer is 12."],
               [" x", " appropriately completes the request"]]  # few tokens vs. few tokens per byte
    scored = E.loglik_choice(model, tokenizer, contexts, choices, batch_size=3, progress=False)
    assert scored[-1]["pred"] != scored[-1]["pred_norm"]  # so acc and acc_norm are both checked
    for ctx, opts, s in zip(contexts, choices, scored):
        direct = [_direct_loglik(model, tokenizer, ctx, c) for c in opts]
        assert s["logliks"] == pytest.approx(direct, abs=1e-4)
        assert s["num_bytes"] == [len(c.encode()) for c in opts]
        assert s["pred"] == max(range(len(opts)), key=direct.__getitem__)
        assert s["pred_norm"] == max(range(len(opts)), key=lambda j: direct[j] / len(opts[j]))
        assert all(ll < 0 for ll in s["logliks"]) and len(s["is_greedy"]) == len(opts)
    with pytest.raises(ValueError, match="choice lists"):
        E.loglik_choice(model, tokenizer, contexts, choices[:2], progress=False)


# --- evaluate() over a micro data root written here ---------------------------------------------------

@pytest.fixture
def data_root(tmp_path):
    for name in ("micro_addsub", "micro_boolq", "micro_arc"):
        task = TASKS[name]
        items = []
        for i in range(7):
            if task.answer_kind == "number":
                items.append({"instruction": f"What is {i} + 3?", "input": "",
                              "output": f"The answer is {i + 3}.", "answer": str(i + 3)})
            else:
                label = task.options[i % len(task.options)]
                items.append({"instruction": f"Question {i}?\n\nAnswer format: {'/'.join(task.options)}",
                              "input": "", "output": f"the correct answer is {label}", "answer": label})
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.json").write_text(json.dumps(items))
    return tmp_path


def test_evaluate_writes_predictions_and_wilson_intervals(model, tokenizer, data_root, tmp_path):
    out = tmp_path / "run"
    res = E.evaluate(model, tokenizer, ["micro_addsub", "micro_boolq"], data_root=data_root, out_dir=out,
                     limit=5, max_new_tokens=6, progress=False)
    assert list(res.columns) == list(E.RESULT_COLUMNS)
    assert list(res["task"]) == ["micro_addsub", "micro_boolq"] and list(res["n"]) == [5, 5]
    assert ((res["ci_low"] <= res["accuracy"]) & (res["accuracy"] <= res["ci_high"])).all()
    assert ((res["ci_low"] >= 0) & (res["ci_high"] <= 100) & (res["ci_high"] > res["ci_low"])).all()
    preds = E.load_predictions(out)
    assert len(preds) == 10 and set(E.PREDICTION_FIELDS) <= set(preds.columns)
    items = load_items("micro_addsub", data_root=data_root, limit=5)
    first = preds[preds.task == "micro_addsub"].reset_index(drop=True)
    assert list(first["item_id"]) == [0, 1, 2, 3, 4]
    assert list(first["label"]) == [it["answer"] for it in items] and first["label"].map(type).eq(str).all()
    expected_hash = hashlib.sha1(build_prompt(items[0]["instruction"]).encode()).hexdigest()[:12]
    assert first["prompt_hash"][0] == expected_hash
    outputs = E.generate(model, tokenizer, [build_prompt(it["instruction"]) for it in items], max_new_tokens=6,
                         progress=False)
    assert list(first["output"]) == outputs
    assert preds.groupby("task")["correct"].sum().to_dict() == dict(zip(res["task"], res["correct"]))
    saved = (out / "accuracy.csv").read_text().splitlines()
    assert saved[0] == ",".join(E.RESULT_COLUMNS) and len(saved) == 3


def _fake_generate(answer_of):
    def fake(model, tokenizer, prompts, **kwargs):
        return [answer_of[p] for p in prompts]
    return fake


def _gold_and_wrong(tasks, data_root, limit=None):
    gold, wrong = {}, {}
    for task in tasks:
        for it in load_items(task, data_root=data_root, limit=limit):
            p = build_prompt(it["instruction"], it["input"])
            gold[p] = "Let me think.\n" + format_answer(task, it["answer"])
            if task.answer_kind == "number":
                wrong[p] = format_answer(task, str(float(it["answer"]) - 1))
            else:
                opts = item_options(task, it)
                wrong[p] = format_answer(task, opts[opts.index(it["answer"]) - 1])
    return gold, wrong


def test_a_model_that_outputs_the_gold_answer_scores_100(monkeypatch, data_root):
    tasks = [TASKS[n] for n in ("micro_addsub", "micro_boolq", "micro_arc")]
    gold, wrong = _gold_and_wrong(tasks, data_root)
    monkeypatch.setattr(E, "generate", _fake_generate(gold))
    res = E.evaluate(None, None, tasks, data_root=data_root, progress=False)
    assert list(res["accuracy"]) == [100.0] * 3 and list(res["n"]) == [7] * 3
    monkeypatch.setattr(E, "generate", _fake_generate(wrong))
    assert list(E.evaluate(None, None, tasks, data_root=data_root, progress=False)["accuracy"]) == [0.0] * 3


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason=f"no shared test sets at {PAPER_DATA}")
def test_gold_outputs_score_100_on_the_paper_tasks(monkeypatch):
    tasks = [TASKS[n] for n in GROUPS["paper"]]
    gold, _ = _gold_and_wrong(tasks, PAPER_DATA, limit=40)
    monkeypatch.setattr(E, "generate", _fake_generate(gold))
    res = E.evaluate(None, None, "paper", data_root=PAPER_DATA, limit=40, progress=False)
    assert len(res) == 14 and (res["accuracy"] == 100.0).all() and (res["n"] == 40).all()
    assert set(res["domain"]) == {"math", "commonsense"}


def test_loglik_scorer(model, tokenizer, data_root, tmp_path):
    res = E.evaluate(model, tokenizer, ["micro_boolq", "micro_arc"], data_root=data_root, scorer="loglik",
                     out_dir=tmp_path, progress=False)
    assert list(res["n"]) == [7, 7] and set(res["scorer"]) == {"loglik"}
    preds = E.load_predictions(tmp_path)
    arc = preds[preds.task == "micro_arc"]
    assert set(arc["extracted"]) <= set(TASKS["micro_arc"].options)
    assert (arc["output"] == "the correct answer is " + arc["extracted"]).all()
    assert (arc["correct"] == (arc["extracted"] == arc["label"])).all()
    assert arc["logliks"].map(len).eq(4).all()
    with pytest.raises(ValueError, match="numeric answers"):
        E.evaluate(model, tokenizer, ["micro_addsub"], data_root=data_root, scorer="loglik", progress=False)


def test_bad_arguments(model, tokenizer, data_root, tmp_path):
    with pytest.raises(ValueError, match="scorer"):
        E.evaluate(model, tokenizer, ["micro_boolq"], data_root=data_root, scorer="bleu")
    with pytest.raises(ValueError, match="batch_size"):
        E.generate(model, tokenizer, PROMPTS, batch_size=0, progress=False)
    with pytest.raises(FileNotFoundError, match="predictions"):
        E.load_predictions(tmp_path / "missing")
    (tmp_path / "predictions.jsonl").write_text('{"task": "x"}\n')
    with pytest.raises(ValueError, match="missing fields"):
        E.load_predictions(tmp_path)
