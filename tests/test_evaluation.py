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
from kd_utils.schema import TASK_SCORE_COLUMNS
from kd_utils.tasks import (GROUPS, SCORERS, TASKS, build_prompt, format_answer, item_options, load_items,
                            loglik_requests)

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


def _direct_greedy(model, tokenizer, context: str, continuation: str) -> bool:
    stripped = context.rstrip()
    ctx = tokenizer(stripped)["input_ids"]
    whole = tokenizer(stripped + context[len(stripped):] + continuation)["input_ids"]
    with torch.no_grad():
        argmax = model(torch.tensor([whole])).logits[0].argmax(-1)
    return all(argmax[t - 1] == whole[t] for t in range(len(ctx), len(whole)))


LOGLIK_ITEMS = [  # shared contexts, options with a common start, WinoGrande-like partial scoring,
    # requests that share no token, one-request items
    [(p + "the correct answer is ", o) for o in ("answer1", "answer2", "answer3")] for p in PROMPTS[:2]] + [
    [(PROMPTS[3], " The answer is 5."), (PROMPTS[3], " The answer is 12."), (PROMPTS[3], " x")],
    [("Sam has 12 apples so Sam", " buys 7 more"), ("Sam has 12 apples so Tom", " buys 7 more")],
    [("true", " false"), ("Is the sky", " green? true")],
    [(PROMPTS[2], "the correct answer is solution1")],
]


def test_loglik_matches_a_direct_sum_of_token_logprobs_at_any_batch_size(model, tokenizer):
    direct = [[_direct_loglik(model, tokenizer, c, x) for c, x in item] for item in LOGLIK_ITEMS]
    greedy = [[_direct_greedy(model, tokenizer, c, x) for c, x in item] for item in LOGLIK_ITEMS]
    for batch_size in (1, 2, 8):
        scored = E.loglik_choice(model, tokenizer, LOGLIK_ITEMS, batch_size=batch_size, progress=False)
        for s, d, g in zip(scored, direct, greedy):
            assert s["logliks"] == pytest.approx(d, abs=1e-4)
            assert s["is_greedy"] == g and s["truncated"] is False
    with pytest.raises(ValueError, match="no requests"):
        E.loglik_choice(model, tokenizer, [[("a", " b")], []], progress=False)


def test_loglik_in_chunks_of_continuation_tokens_equals_one_chunk(model, tokenizer, monkeypatch):
    whole = E.loglik_choice(model, tokenizer, LOGLIK_ITEMS, batch_size=8, progress=False)
    monkeypatch.setattr(E, "rows_within", lambda *args: 2)  # the head on 2 continuation tokens at a time
    chunked = E.loglik_choice(model, tokenizer, LOGLIK_ITEMS, batch_size=8, progress=False, chunk_mb=1)
    for c, w in zip(chunked, whole):
        assert c["logliks"] == pytest.approx(w["logliks"], abs=1e-5) and c["is_greedy"] == w["is_greedy"]


@pytest.mark.parametrize("lengths, batch_size", [([10, 3, 7, 2, 5], 2), ([4] * 5, 2), ([1, 9, 1, 1, 8, 2, 30], 3)])
def test_packed_batches_fill_rows_up_to_their_batch_width(lengths, batch_size):
    batches = E._packed_batches(lengths, batch_size)
    assert sorted(i for b in batches for row in b for i in row) == list(range(len(lengths)))
    for b in batches:
        width = lengths[b[0][0]]
        assert len(b) <= batch_size and width == max(lengths[i] for row in b for i in row)
        assert all(sum(lengths[i] for i in row) <= width for row in b)
    assert E._packed_batches([10, 3, 7, 2, 5], 2) == [[[0], [2, 3]], [[4], [1]]]


def test_a_context_longer_than_the_window_loses_its_left_and_is_counted(model, tokenizer):
    window = model.config.max_position_embeddings
    long_context = "Sam has 12 apples " * 120 + "How many apples"
    ids = tokenizer(long_context)["input_ids"]
    options = [" The answer is 5.", " The answer is 12."]
    assert len(ids) > window
    scored = E.loglik_choice(model, tokenizer, [[(long_context, o) for o in options], [(PROMPTS[3], " x")]],
                             progress=False)
    assert [s["truncated"] for s in scored] == [True, False]
    for o, ll in zip(options, scored[0]["logliks"]):
        cont = tokenizer(long_context + o)["input_ids"][len(ids):]
        with torch.no_grad():
            kept = torch.tensor([(ids + cont)[-(window + 1):-1]])
            logprobs = torch.log_softmax(model(kept).logits[0].double(), -1)
        targets = (ids + cont)[-len(cont):]
        assert ll == pytest.approx(sum(logprobs[window - len(cont) + j, t].item() for j, t in enumerate(targets)),
                                   abs=1e-4)
    with pytest.raises(ValueError, match="longer than the model's window"):
        E.loglik_choice(model, tokenizer, [[("Sam", " has 12 apples" * 200)]], progress=False)


# --- evaluate() over a micro data root written here ---------------------------------------------------

@pytest.fixture
def data_root(tmp_path):
    """Items in the micro world's format: options listed as "text (token)"."""
    for name in ("micro_addsub", "micro_boolq", "micro_arc"):
        task = TASKS[name]
        items = []
        for i in range(7):
            if task.answer_kind == "number":
                items.append({"instruction": f"What is {i} + 3?", "input": "",
                              "output": f"The answer is {i + 3}.", "answer": str(i + 3)})
            else:
                label = task.options[i % len(task.options)]
                listed = "" if name == "micro_boolq" else ", ".join(
                    f"{w} (answer{j})" for j, w in enumerate(["sky", "apples", "true answer", "x"][:len(task.options)], 1)
                ) + "\n\n"
                items.append({"instruction": f"Pick one: Question {i}?\n\n{listed}Answer format: {'/'.join(task.options)}",
                              "input": "", "output": f"the correct answer is {label}", "answer": label})
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.json").write_text(json.dumps(items))
    return tmp_path


def test_evaluate_writes_predictions_and_wilson_intervals(model, tokenizer, data_root, tmp_path):
    out = tmp_path / "run"
    res = E.evaluate(model, tokenizer, ["micro_addsub", "micro_boolq"], data_root=data_root, out_dir=out,
                     limit=5, max_new_tokens=6, progress=False)
    assert list(res.columns) == list(TASK_SCORE_COLUMNS)
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
    assert saved[0] == ",".join(TASK_SCORE_COLUMNS) and len(saved) == 3


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


def test_the_params_budget_overrides_named_domains_and_keeps_each_tasks_own(monkeypatch, data_root):
    from kd_utils.config import EvalConfig

    budgets = {}

    def fake(model, tokenizer, prompts, max_new_tokens, desc, **kwargs):
        budgets[desc] = max_new_tokens
        return [""] * len(prompts)

    monkeypatch.setattr(E, "generate", fake)
    tasks = ["micro_addsub", "micro_boolq"]
    for given, expected in (({}, [256, 32]), ({"math": 40}, [40, 32]), ({"math": 40, "commonsense": 8}, [40, 8])):
        E.evaluate(None, None, tasks, data_root=data_root, max_new_tokens=EvalConfig(max_new_tokens=given).max_new_tokens,
                   progress=False)
        assert [budgets[t] for t in tasks] == expected == [TASKS[t].max_new_tokens if TASKS[t].domain not in given
                                                           else given[TASKS[t].domain] for t in tasks]
    assert EvalConfig().max_new_tokens == {}
    with pytest.raises(ValueError, match="unknown domain 'maths'.*did you mean 'math'"):
        EvalConfig(max_new_tokens={"maths": 40})
    with pytest.raises(ValueError, match="at least 1"):
        EvalConfig(max_new_tokens={"math": 0})


@pytest.mark.skipif(not PAPER_DATA.is_dir(), reason=f"no shared test sets at {PAPER_DATA}")
def test_gold_outputs_score_100_on_the_paper_tasks(monkeypatch):
    tasks = [TASKS[n] for n in GROUPS["paper"]]
    gold, _ = _gold_and_wrong(tasks, PAPER_DATA, limit=40)
    monkeypatch.setattr(E, "generate", _fake_generate(gold))
    res = E.evaluate(None, None, "paper", data_root=PAPER_DATA, limit=40, progress=False)
    assert len(res) == 14 and (res["accuracy"] == 100.0).all() and (res["n"] == 40).all()
    assert set(res["domain"]) == {"math", "commonsense"}


@pytest.mark.parametrize("scorer", ["loglik", "loglik_norm", "loglik_label"])
def test_loglik_scorers_pick_the_most_likely_option(model, tokenizer, data_root, tmp_path, scorer):
    res = E.evaluate(model, tokenizer, ["micro_boolq", "micro_arc"], data_root=data_root, scorer=scorer,
                     out_dir=tmp_path, progress=False)
    assert list(res["n"]) == [7, 7] and set(res["scorer"]) == {scorer} and list(res["truncated"]) == [0, 0]
    preds = E.load_predictions(tmp_path)
    for name in ("micro_boolq", "micro_arc"):
        task, rows = TASKS[name], preds[preds.task == name]
        for it, (_, row) in zip(load_items(task, data_root=data_root), rows.iterrows()):
            options = item_options(task, it)
            if scorer == "loglik_label":
                requests = [(build_prompt(it["instruction"]) + "the correct answer is ", o, o) for o in options]
            else:
                requests = loglik_requests(task, it)
                assert [r.continuation for r in requests] == (
                    [" yes", " no"] if name == "micro_boolq" else [" sky", " apples", " true answer", " x"])
            direct = [_direct_loglik(model, tokenizer, c, x) for c, x, _ in requests]
            assert row["logliks"] == pytest.approx(direct, abs=1e-4)
            per = [d / len(r[2]) for d, r in zip(direct, requests)] if scorer == "loglik_norm" else direct
            assert row["extracted"] == options[per.index(max(per))]
            assert row["output"] == "the correct answer is " + row["extracted"]
            assert row["correct"] == (row["extracted"] == it["answer"]) and row["prompt_truncated"] is False
    with pytest.raises(ValueError, match="numeric answers|generate"):
        E.evaluate(model, tokenizer, ["micro_addsub"], data_root=data_root, scorer=scorer, progress=False)


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


# --- an evaluate cell's run: the main scorer and extra views -------------------------------------------

def test_run_evaluation_adds_each_extra_scorer_beside_the_main_one(model, tokenizer, data_root, tmp_path):
    from kd_utils.config import EvalConfig, EvalJob
    from kd_utils.evaluate_run import run_evaluation

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    tasks = ["micro_addsub", "micro_boolq", "micro_arc"]
    config = EvalConfig(tasks=tasks, batch_size=4, max_new_tokens={"math": 4, "commonsense": 4},
                        extra_scorers=["loglik", "loglik_label"])
    job = EvalJob(model="m", model_path=str(tmp_path / "model"), kind="sft", student="m", evaluation=config,
                  data_root=str(data_root))
    table, metrics = run_evaluation(job, tmp_path / "cell", progress=False)
    assert metrics["scorer"] == "generate" and list(table["task"]) == tasks
    for scorer in ("generate", "loglik", "loglik_label"):
        alone = E.evaluate(model, tokenizer, tasks[1:] if scorer != "generate" else tasks, data_root=data_root,
                           scorer=scorer, batch_size=4, max_new_tokens={"math": 4, "commonsense": 4}, progress=False)
        column = table["accuracy" if scorer == "generate" else f"accuracy_{scorer}"]
        assert list(column.iloc[-len(alone):]) == list(alone["accuracy"])
    assert table[["accuracy_loglik", "accuracy_loglik_label"]].iloc[0].isna().all()  # no options: generation only
    assert (tmp_path / "cell" / "predictions.jsonl").is_file()
    assert len(E.load_predictions(tmp_path / "cell" / "scorer-loglik")) == 14
    with pytest.raises(ValueError, match="repeat a scorer"):
        EvalConfig(extra_scorers=["generate"])
    with pytest.raises(ValueError, match="loglik_norm"):
        EvalConfig(scorer="bleu")
    with pytest.raises(ValueError, match=r"scorer 'loglik' cannot score \['gsm8k'.*'AQuA'\]"):
        EvalConfig(scorer="loglik", tasks="paper")
    assert EvalConfig(scorer="loglik", tasks="paper_commonsense").scorer == "loglik"


@pytest.mark.parametrize("scorer", list(SCORERS))
def test_the_params_scorer_selects_each_scorer_of_the_registry(model, tokenizer, data_root, tmp_path, scorer):
    from kd_utils.config import EvalConfig, EvalJob
    from kd_utils.evaluate_run import run_evaluation

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    tasks = ["micro_boolq", "micro_arc"]
    config = EvalConfig(tasks=tasks, batch_size=4, max_new_tokens={"commonsense": 4}, scorer=scorer)
    job = EvalJob(model="m", model_path=str(tmp_path / "model"), kind="sft", student="m", evaluation=config,
                  data_root=str(data_root))
    table, metrics = run_evaluation(job, tmp_path / "cell", progress=False)
    alone = E.evaluate(model, tokenizer, tasks, data_root=data_root, scorer=scorer, batch_size=4,
                       max_new_tokens={"commonsense": 4}, progress=False)
    assert metrics["scorer"] == scorer and set(alone["scorer"]) == {scorer}
    assert list(table["accuracy"]) == list(alone["accuracy"]) and list(table["n"]) == [7, 7]
