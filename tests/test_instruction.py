"""The instruction-following domain: ROUGE-L as MiniLLM computes it, MiniLLM's test sets and Dolly
training split (local JSONL or the hub, converters on records in the hub schema), clear errors on bad
input, evaluation of text tasks on a tiny model, results/statistics/fidelity on mixed domains, and a
real instruction-tuned LM (SmolLM2-135M-Instruct) far above a random one."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch


from kd_utils.config import EvalConfig, EvalJob, load_study
from kd_utils.evaluate_run import run_evaluation
from kd_utils.evaluation import evaluate
from kd_utils.fidelity import fidelity_table
from kd_utils.gains import gain_table
from kd_utils.hypotheses import all_hypotheses
from kd_utils.microworld import write_world
from kd_utils.prose import describe_hypotheses
from kd_utils.results import collect_results, save_metrics
from kd_utils.schema import AVERAGE
from kd_utils.tasks import (DOMAIN_METRICS, GROUPS, TASKS, get_task, is_correct, item_score, load_items,
                            load_training_items, rouge_l)

INSTRUCTION = ["dolly", "self_inst", "vicuna", "sinst", "uinst"]


def _jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")


def _minillm(instruction: str, output, input: str = "") -> dict:
    """A record of MiniLLM's released files: the pre-rendered prompt beside instruction/input/output."""
    return {"instruction": instruction, "prompt": f"### Instruction:\n{instruction}\n\n### Response:\n",
            "input": input, "output": output}


# --- ROUGE-L, by hand ---------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, refs, expected", [
    ("the cat sat on the mat", "the cat is on the mat", 100 * 5 / 6),   # LCS the cat on the mat: P = R = 5/6
    ("the cat", "the cat sat on the mat", 100 * 2 * (1 * 2 / 6) / (1 + 2 / 6)),  # P 1, R 1/3 -> F 1/2
    ("Cats RUNNING!", "cat runs", 100.0),                                 # lowercased, punctuation split, stemmed
    ("mat the on", "the cat sat on the mat", 100 * 2 * (2 / 3 * 2 / 6) / (2 / 3 + 2 / 6)),  # order matters
    ("", "the cat", 0.0),                                                 # empty output
    ("the cat", "", 0.0),                                                 # empty reference
    ("   ", "the cat", 0.0),
    ("Café au lait", "cafe au lait", 100 * 2 / 3),                       # MiniLLM's tokenizer drops non-ASCII: "caf"
    ("猫が好き", "猫が好き", 0.0),                                          # ... so a non-Latin text has no token
    ("naïve idea", "na ve idea", 100.0),                                  # "naïve" -> "na ve"
    ("a dog", ["the cat", "a dog barks"], 100 * 2 * (1 * 2 / 3) / (1 + 2 / 3)),  # the best reference counts
])
def test_rouge_l_matches_hand_computed_values(prediction, refs, expected):
    assert rouge_l(prediction, refs) == pytest.approx(expected)


def test_text_items_score_rouge_l_and_are_correct_only_when_perfect():
    task = get_task("dolly")
    item = {"references": ["Paris is the capital of France."], "answer": "Paris is the capital of France."}
    # LCS "the capital of france": P = R = 4/6
    assert item_score(task, "The capital of France is Paris.", item) == pytest.approx(100 * 4 / 6)
    assert is_correct(task, "paris is the capital of france", item["answer"])
    assert not is_correct(task, "Paris.", item["answer"])
    assert item_score("gsm8k", "The answer is 4.", {"answer": "4"}) == 100.0


# --- the registry --------------------------------------------------------------------------------

def test_the_five_instruction_tasks_are_one_domain_scored_by_rouge_l():
    assert GROUPS["paper_instruction"] == tuple(INSTRUCTION)
    assert GROUPS["micro_instruction"] == ("micro_instruct",)
    assert not set(GROUPS["paper"]) & set(INSTRUCTION) and "micro_instruct" not in GROUPS["micro"]
    assert DOMAIN_METRICS == {"math": "accuracy", "commonsense": "accuracy", "instruction": "rougeL"}
    assert {TASKS[n].hf_dataset for n in INSTRUCTION} == {
        "MiniLLM/dolly", "MiniLLM/self-inst", "MiniLLM/Vicuna", "MiniLLM/sinst", "MiniLLM/uinst"}


def test_unknown_task_name_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"unknown task or group 'doly'; did you mean 'dolly'"):
        load_items("doly")
    with pytest.raises(ValueError, match=r"did you mean 'self_inst'"):
        EvalConfig(tasks=["paper_instruction", "self-inst"])


# --- MiniLLM's files: local JSONL, hub converters, errors ------------------------------------------

def test_local_jsonl_in_minillms_layout(tmp_path):
    _jsonl(tmp_path / "sinst" / "11_" / "valid.jsonl", [
        _minillm("Translate to French.", ["Bonjour", "Salut"], input="Hello"), "",
        _minillm("Name a color.", "Blue.")])
    items = load_items("sinst", data_root=tmp_path)
    assert [it["references"] for it in items] == [["Bonjour", "Salut"], ["Blue."]]
    assert items[0]["input"] == "Hello" and items[0]["answer"] == "Bonjour" and items[1]["id"] == 1


def test_hub_records_in_minillms_schema_are_converted(monkeypatch, tmp_path):
    import datasets
    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, split, data_files))
        return [_minillm("Give a synonym of big.", "large"), _minillm("Sum 2 and 3.", ["5", "five"], input="2, 3")]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("KD_DATA_ROOT", str(tmp_path))  # no local files: the hub path is taken
    items = load_items("uinst")
    assert calls == [("MiniLLM/uinst", "train", "11_/valid.jsonl")]
    assert items[1] == {"id": 1, "instruction": "Sum 2 and 3.", "input": "2, 3", "output": "5", "answer": "5",
                        "references": ["5", "five"]}
    train = load_training_items(None, "dolly", data_root=tmp_path)  # 2 records, 1000 held out: none left
    assert calls[-1] == ("MiniLLM/dolly", "train", "raw.jsonl") and train == []


@pytest.mark.parametrize("line, message", [
    ({"instruction": "x"}, r"valid.jsonl:2 lacks \['output'\]"),
    ({"output": "y"}, r"valid.jsonl:2 lacks \['instruction'\]"),
    ({"instruction": "x", "output": "  "}, r"valid.jsonl:2: empty reference output"),
    ({"instruction": "x", "output": []}, r"valid.jsonl:2: empty reference output"),
    ("{not json", r"valid.jsonl:2: not a JSON line"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    _jsonl(tmp_path / "dolly" / "valid.jsonl", [_minillm("ok", "fine"), line])
    with pytest.raises(ValueError, match=message):
        load_items("dolly", data_root=tmp_path)


def test_dolly_training_is_minillms_split_from_a_local_file(tmp_path):
    records = [_minillm(f"Question {i}?", f"Answer {i}.") for i in range(1003)]
    _jsonl(tmp_path / "dolly" / "raw.jsonl", records)
    items = load_training_items(None, "dolly", data_root=tmp_path)
    assert [it["instruction"] for it in items] == ["Question 1000?", "Question 1001?", "Question 1002?"]
    assert load_training_items(None, "dolly", data_root=tmp_path, limit=1)[0]["output"] == "Answer 1000."
    _jsonl(tmp_path / "mine.jsonl", [_minillm("a", "b"), {"instruction": "c"}])
    with pytest.raises(ValueError, match=r"mine.jsonl:2 lacks \['output'\]"):
        load_training_items(None, str(tmp_path / "mine.jsonl"))


def test_instruction_presets_select_dolly_and_the_five_sets():
    for name in ("qwen", "llama"):
        for variant, decoding, seeds in (("", "sample", [10, 20, 30, 40, 50]), ("_honest", "greedy", None)):
            cfg = load_study(f"params/paper_{name}_instruction{variant}.yaml")
            assert cfg.training.train_data == "dolly" and cfg.evaluation.tasks == "paper_instruction"
            assert cfg.evaluation.decoding == decoding
            if seeds:
                assert cfg.evaluation.sample_seeds == seeds and cfg.evaluation.temperature == 1.0


# --- evaluation on a tiny model --------------------------------------------------------------------

def test_text_tasks_through_an_evaluation_run(micro, tmp_path):
    data = tmp_path / "data"
    write_world(data, n_train=5, n_test=4, seed=0, tasks=["micro_instruct"])
    _jsonl(data / "dolly" / "valid.jsonl", [_minillm("Name a fruit.", "An apple."), _minillm("Say hi.", "Hi!")])
    job = EvalJob(model="t", model_path=str(micro.teacher_dir), kind="sft", student="t", data_root=str(data),
                  evaluation=EvalConfig(tasks=["micro_instruct", "dolly", "micro_addsub"], limit=4, decoding="sample",
                                        sample_seeds=[1, 2], max_new_tokens={"instruction": 12, "math": 8}))
    (data / "micro_addsub").mkdir()
    (data / "micro_addsub" / "test.json").write_text((micro.data_root / "micro_addsub" / "test.json").read_text())
    table, metrics = run_evaluation(job, tmp_path / "cell", progress=False)
    assert list(table["metric"]) == ["rougeL", "rougeL", "accuracy"] and list(table["n"]) == [4, 2, 4]
    assert ((table["ci_low"] <= table["accuracy"]) & (table["accuracy"] <= table["ci_high"])).all()
    preds = [json.loads(line) for line in (tmp_path / "cell" / "predictions.jsonl").read_text().splitlines()]
    text = [p for p in preds if p["task"] != "micro_addsub"]
    assert all(p["correct"] is None and p["extracted"] is None for p in text)
    assert [p["score"] for p in text] == pytest.approx([rouge_l(p["output"], p["label"]) for p in text])
    seed_means = [pd.read_csv(tmp_path / "cell" / sub / "accuracy.csv").set_index("task").loc["micro_instruct", "accuracy"]
                  for sub in ("", "sample-2")]
    assert table.set_index("task").loc["micro_instruct", "accuracy"] == pytest.approx(np.mean(seed_means))
    assert metrics["tasks"][0]["metric"] == "rougeL"


def test_a_copy_of_the_reference_scores_100_and_the_t_interval_is_degenerate(tmp_path, monkeypatch):
    import kd_utils.evaluation as E
    data = tmp_path / "data"
    write_world(data, n_train=5, n_test=6, seed=0, tasks=["micro_instruct"])
    refs = [it["output"] for it in load_items("micro_instruct", data)]

    def echo(model, tokenizer, prompts, truncated, **kw):  # a model that answers with the reference
        truncated[:] = [False] * len(prompts)
        return refs[:len(prompts)]

    monkeypatch.setattr(E, "generate", echo)
    res = evaluate(None, None, "micro_instruct", data_root=data, out_dir=tmp_path / "out", progress=False)
    assert [json.loads(line)["score"] for line in (tmp_path / "out" / "predictions.jsonl").open()] == [100.0] * 6
    row = res.iloc[0]
    assert (row["metric"], row["accuracy"], row["ci_low"], row["ci_high"]) == ("rougeL", 100.0, 100.0, 100.0)
    assert pd.isna(row["correct"])


# --- results, statistics and fidelity across domains --------------------------------------------------

def _mixed_results() -> pd.DataFrame:
    """SFT and KD rows of 4 students x 2 methods on a math task (accuracy) and an instruction task (ROUGE-L)."""
    rng = np.random.default_rng(0)
    rows = []
    for s, size in enumerate([0.5e9, 1e9, 2e9, 4e9]):
        for task, domain, metric, base, gain in (("gsm8k", "math", "accuracy", 30.0, 8.0),
                                                 ("dolly", "instruction", "rougeL", 20.0, 2.0)):
            common = dict(student=f"s{s}", teacher="T", noise=0.0, teacher_kind="sft", seed=0, task=task,
                          domain=domain, metric=metric, student_params=size, teacher_params=8e9)
            rows.append(dict(model=f"s{s}-sft", kind="sft", method="sft", temperature=np.nan,
                             accuracy=base + s, **{**common, "teacher": ""}))
            for m, method in enumerate(("fkl", "rkl")):
                rows.append(dict(model=f"s{s}-{method}", kind="kd", method=method, temperature=1.0,
                                 accuracy=base + s + gain / (s + 1) + m + rng.normal(0, 0.1), **common))
    rows += [dict(model="T-sft", kind="sft", method="sft", student="T", teacher="", temperature=np.nan, noise=0.0,
                  teacher_kind="", seed=0, task=t, domain=d, metric=mt, accuracy=a, student_params=8e9,
                  teacher_params=np.nan)
             for t, d, mt, a in (("gsm8k", "math", "accuracy", 60.0), ("dolly", "instruction", "rougeL", 30.0))]
    return pd.DataFrame(rows)


def test_statistics_run_per_domain_in_each_domains_metric():
    results = _mixed_results()
    gains = gain_table(results)
    avg = gains[gains["task"] == AVERAGE].groupby("domain")["gain"].mean()
    assert set(avg.index) == {"math", "instruction"} and avg["math"] > avg["instruction"] > 0
    dolly = gains[(gains["task"] == "dolly")]
    assert (dolly["teacher_accuracy"] == 30.0).all() and (dolly["sft_accuracy"] < 25).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = all_hypotheses(gains)
    assert {"math", "instruction"} <= set(table.loc[table["hypothesis"] == "H1", "domain"])
    lines = describe_hypotheses(table)
    assert any(line.startswith("H1 (KD > SFT), instruction: mean gain +") and "rougeL points" in line for line in lines)
    assert any(line.startswith("H1 (KD > SFT), math: mean gain +") and "rougeL" not in line for line in lines)


def test_results_csv_carries_the_metric_of_each_task(tmp_path):
    for name, kind, tasks in (("s-sft", "sft", [("gsm8k", "math", "accuracy"), ("dolly", "instruction", "rougeL")]),
                              ("old", "sft", [("gsm8k", "math", None)])):
        save_metrics(tmp_path / "evaluate" / name, {
            "model": name, "kind": kind, "student": name, "teacher": "", "method": "", "temperature": None,
            "noise": 0.0, "teacher_kind": "", "seed": 0, "params": 1, "scorer": "generate",
            "tasks": [{"task": t, "domain": d, "n": 2, "accuracy": 50.0, "ci_low": 40.0, "ci_high": 60.0,
                       **({"metric": m} if m else {})} for t, d, m in tasks]})
    table = collect_results(tmp_path)
    assert list(zip(table["model"], table["task"], table["metric"])) == [
        ("old", "gsm8k", "accuracy"), ("s-sft", "gsm8k", "accuracy"), ("s-sft", "dolly", "rougeL")]


def test_fidelity_of_text_tasks_is_output_similarity_without_agreement(tmp_path):
    def preds(name, outputs):
        path = tmp_path / name / "predictions.jsonl"
        _jsonl(path, [{"task": "dolly", "item_id": i, "prompt_hash": f"h{i}", "output": o, "extracted": None,
                       "label": "ref", "correct": None, "score": 10.0} for i, o in enumerate(outputs)]
               + [{"task": "gsm8k", "item_id": 0, "prompt_hash": "g", "output": "The answer is 4.",
                   "extracted": "4", "label": "4", "correct": True}])
        return path
    files = {"s": preds("s", ["the cat sat", "a dog"]), "t": preds("t", ["the cat sat", "one bird"])}
    table = fidelity_table(files, [("s", "t")]).set_index("task")
    assert table.loc["dolly", "rougeL"] == pytest.approx(50.0) and np.isnan(table.loc["dolly", "agreement"])
    assert table.loc["gsm8k", "agreement"] == 100.0 and table.loc["gsm8k", "rougeL"] == 100.0


# --- a real instruction-tuned LM --------------------------------------------------------------------

# Dolly-style items written for this test: short factual instructions with one-sentence references.
DOLLY_STYLE = [
    _minillm("What is the capital of France?", "The capital of France is Paris."),
    _minillm("Name the largest planet in the solar system.", "Jupiter is the largest planet in the solar system."),
    _minillm("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    _minillm("How many days are there in a week?", "There are seven days in a week."),
    _minillm("What do bees make?", "Bees make honey."),
]


def test_smollm2_scores_far_above_a_random_model_on_dolly_style_items(smollm2, tmp_path):
    """The real instruction-tuned model against a random one of its vocabulary (a tiny Llama: what a
    random model scores does not depend on its size, and a tiny one generates in no time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tok = smollm2
    _jsonl(tmp_path / "data" / "dolly" / "valid.jsonl", DOLLY_STYLE)
    kw = dict(data_root=tmp_path / "data", max_new_tokens=20, batch_size=5, progress=False)
    real = evaluate(model, tok, "dolly", **kw).iloc[0]
    torch.manual_seed(0)
    random = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    noise = evaluate(random, tok, "dolly", **kw).iloc[0]
    print(f"SmolLM2-135M-Instruct ROUGE-L {real['accuracy']:.1f} [{real['ci_low']:.1f}, {real['ci_high']:.1f}]; "
          f"random init {noise['accuracy']:.1f}")
    assert real["accuracy"] >= 25.0 and noise["accuracy"] <= 5.0
    assert real["accuracy"] >= noise["accuracy"] + 20.0
