"""The task registry, prompt template, data loading and answer extraction."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from kd_utils import tasks as T
from kd_utils.tasks import (GROUPS, TASKS, Continuations, Task, build_prompt, extract_answer, format_answer,
                            get_task, is_correct, item_options, load_items, loglik_requests, option_texts,
                            resolve_tasks)

SHARED = Path(os.environ.get("KD_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
PAPER_DATA = SHARED / "data" / "llm_adapters"
needs_paper_data = pytest.mark.skipif(not PAPER_DATA.is_dir(), reason=f"no shared test sets at {PAPER_DATA}")


def _wrong_response(task: Task, item: dict) -> str:
    """A response stating a wrong label: label + 1, or the next option of the item."""
    if task.answer_kind == "number":
        return format_answer(task, str(float(item["answer"]) + 1))
    opts = item_options(task, item)
    return format_answer(task, opts[(opts.index(item["answer"]) + 1) % len(opts)])


# --- the paper's test sets ------------------------------------------------------------------------

@needs_paper_data
@pytest.mark.parametrize("name", GROUPS["paper"])
def test_gold_answers_score_100_and_wrong_answers_0_on_every_item(name):
    task = TASKS[name]
    items = load_items(task, data_root=PAPER_DATA)
    assert len(items) > 200 and [it["id"] for it in items] == list(range(len(items)))
    assert all(is_correct(task, format_answer(task, it["answer"]), it["answer"]) for it in items)
    assert not any(is_correct(task, _wrong_response(task, it), it["answer"]) for it in items)


@needs_paper_data
@pytest.mark.parametrize("name", GROUPS["paper_commonsense"])
def test_reference_outputs_are_the_answer_format(name):
    task = TASKS[name]
    for it in load_items(task, data_root=PAPER_DATA):
        assert it["output"] == format_answer(task, it["answer"])
        assert it["answer"] in item_options(task, it)


@needs_paper_data
@pytest.mark.parametrize("name, statement", [("AQuA", r"The answer is \(([A-E])\)\.$"),
                                             ("gsm8k", r"The answer is (\d+)\.$")])
def test_format_answer_writes_what_the_reference_rationales_write(name, statement):
    found = [re.search(statement, it["output"].strip()) for it in load_items(name, data_root=PAPER_DATA)]
    found = [m for m in found if m]
    assert len(found) > 200
    assert all(format_answer(TASKS[name], m[1]) == m[0] for m in found)


@needs_paper_data
def test_arc_items_with_three_or_five_options():
    items = load_items("ARC-Easy", data_root=PAPER_DATA)
    sizes = {len(item_options(TASKS["ARC-Easy"], it)) for it in items}
    assert sizes == {3, 4, 5}


@needs_paper_data
def test_default_data_root_finds_shared_data(monkeypatch):
    monkeypatch.delenv("KD_DATA_ROOT", raising=False)
    monkeypatch.setenv("KD_SHARED_DIR", str(SHARED))
    assert T.default_data_root() == PAPER_DATA
    assert load_items("gsm8k", limit=3)[0]["answer"] == load_items("gsm8k", data_root=PAPER_DATA)[0]["answer"]


# --- log-likelihood requests: lm-evaluation-harness's zero-shot definitions on the shared items -------

@needs_paper_data
@pytest.mark.parametrize("name", GROUPS["paper_commonsense"])
def test_every_shared_item_lists_parsable_options(name):
    task = TASKS[name]
    markers = re.compile(r"(Answer|Solution|Ending|Option)\d: |Answer format")
    for it in load_items(task, data_root=PAPER_DATA):
        question, texts = option_texts(task, it)
        requests = loglik_requests(task, it)
        assert question.strip() and "\n\n" not in question and not markers.search(question)
        assert len(requests) == len(item_options(task, it))
        assert len(texts) == (0 if name == "boolq" else len(requests))
        assert all(t.strip() and not markers.search(t) for t in texts)
        assert all(r.context and r.continuation.startswith(" ") and r.choice for r in requests)
        if name == "winogrande":
            assert question.count("_") == 1


# The first shared item of each task, as lm-eval 0.4.13's task files turn the hub record it came from
# into (context, continuation) requests (doc_to_text, target_delimiter " ", doc_to_choice).
LM_EVAL_FIRST_REQUESTS = {
    "boolq": ("Question: does ethanol take more energy make that produces?\nAnswer:", [" yes", " no"]),
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             [" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
              "will also need to supply it with a water bottle and a food dish.",
              " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
              "will also need to supply it with a water bottle and a food dish."]),
    "social_i_qa": ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
                    "before this?\nA:", [" make a new plan", " Go home and see Riley", " Find somewhere to go"]),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He",  # ctx_b "he" capitalized
                  [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                   " is holding a rubik's cube.", " starts pulling up roofing on a roof."]),
    "ARC-Easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food "
                 "webs?\nAnswer:", [" Sunlight is the source of energy for nearly all ecosystems.",
                                     " Most ecosystems are found on land instead of in water.",
                                     " Carbon dioxide is more available than other gases.",
                                     " The producers in all ecosystems are plants."]),
    "openbookqa": ("A person wants to start saving money so that they can afford a nice vacation at the end of the "
                   "year. After looking over their budget and expenses, they decide the best way to save money is to",
                   [" make more phone calls", " quit eating lunch out", " buy less with monopoly money",
                    " have lunch with friends"]),
}


@needs_paper_data
@pytest.mark.parametrize("name", sorted(LM_EVAL_FIRST_REQUESTS))
def test_requests_are_lm_evals(name):
    context, continuations = LM_EVAL_FIRST_REQUESTS[name]
    requests = loglik_requests(name, load_items(name, data_root=PAPER_DATA, limit=1)[0])
    assert [(r.context, r.continuation) for r in requests] == [(context, c) for c in continuations]


@needs_paper_data
def test_winogrande_partial_scoring_and_hellaswag_wikihow_cleaning():
    wino = loglik_requests("winogrande", load_items("winogrande", data_root=PAPER_DATA, limit=1)[0])
    assert [tuple(r) for r in wino] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.",
         "Sarah was a much better surgeon than Maria so Sarah"),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.",
         "Sarah was a much better surgeon than Maria so Maria")]
    item = {"instruction": "Please choose the correct ending to complete the given sentence: Home: [header] How to "
                           "paint [title] Buy paint. [step] Go to a store.\n\nEnding1: [substeps] Pick a color. "
                           "Ending2: Leave.\n\nAnswer format: ending1/ending2"}
    assert [tuple(r) for r in loglik_requests("hellaswag", item)] == [  # lm-eval's hellaswag/utils.py preprocess
        ("Home: How to paint. Buy paint. Go to a store.", "  Pick a color.", " Pick a color."),
        ("Home: How to paint. Buy paint. Go to a store.", " Leave.", "Leave.")]


def test_requests_of_micro_items_and_errors():
    item = {"instruction": "Please choose the correct solution to the question: How do I turn 6 into 20?\n\n"
                           "add 14 (solution1)\n\nadd 12 (solution2)\n\nAnswer format: solution1/solution2"}
    assert [(r.context, r.continuation) for r in loglik_requests("micro_piqa", item)] == [
        ("Question: How do I turn 6 into 20?\nAnswer:", " add 14"), ("Question: How do I turn 6 into 20?\nAnswer:", " add 12")]
    with pytest.raises(ValueError, match=r"micro_arc.*\(answer1\) not found"):
        loglik_requests("micro_arc", {"id": 3, "instruction": "Q?\n\nno options\n\nAnswer format: answer1/answer2"})
    with pytest.raises(ValueError, match="scorer='generate'"):
        loglik_requests("AQuA", {"instruction": "(A) 1 (B) 2"})
    assert all((TASKS[n].loglik is not None) == (TASKS[n].answer_kind == "choice") for n in TASKS)


# --- Hugging Face converters: rebuild the shared items from hub-shaped records --------------------

def _hub_record(task: str, it: dict) -> dict:
    """The hub record an LLM-Adapters item was made from (parsed back from its instruction)."""
    body = it["instruction"].split(": ", 1)[1]
    n = int(it["answer"][-1]) if task != "boolq" else None
    if task == "boolq":
        return {"question": body.split("?\n\nAnswer format")[0], "answer": it["answer"] == "true"}
    if task == "winogrande":
        m = re.fullmatch(r"(.*)\n\nOption1: (.*) Option2: (.*) Answer format: .*", body, re.S)
        return {"sentence": m[1], "option1": m[2], "option2": m[3], "answer": str(n)}
    head, listed, _ = body.split("\n\n")
    prefix = "Ending" if task == "hellaswag" else "Answer"
    texts = re.split(rf" ?{prefix}\d: ", listed)[1:]
    if task == "hellaswag":
        label, ctx = head.split(": ", 1)
        return {"activity_label": label, "ctx": ctx, "endings": texts, "label": str(n - 1)}
    keys = "ABCDE"[:len(texts)]
    return {"question_stem" if task == "openbookqa" else "question": head,
            "choices": {"text": texts, "label": list(keys)}, "answerKey": keys[n - 1]}


@needs_paper_data
@pytest.mark.parametrize("name", [n for n in GROUPS["paper"] if TASKS[n].hf_converter])
def test_hub_converter_reproduces_the_shared_items(name, monkeypatch, tmp_path):
    task = TASKS[name]
    shared = load_items(task, data_root=PAPER_DATA)
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [_hub_record(task.name, it) for it in shared]

    import datasets
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("KD_DATA_ROOT", str(tmp_path))  # no local files: the hub path is taken
    rebuilt = load_items(task)
    assert calls == [(task.hf_dataset, task.hf_config, task.hf_split)]
    assert rebuilt == shared


def test_hub_failure_is_a_clear_error(monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("KD_DATA_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"Rowan/hellaswag.*ConnectionError"):
        load_items("hellaswag")
    with pytest.raises(FileNotFoundError, match="piqa"):  # no hub source declared
        load_items("piqa")


# --- prompt -----------------------------------------------------------------------------------------

# LLM-Adapters commomsense_evaluate.py / evaluate.py `generate_prompt`, as indented in their source.
_THEIRS_NO_INPUT = """Below is an instruction that describes a task. Write a response that appropriately completes the request. 

                ### Instruction:
                {instruction}

                ### Response:
                """  # noqa: W291
_THEIRS_INPUT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

                ### Instruction:
                {instruction}

                ### Input:
                {input}

                ### Response:
                """


def _dedent(template: str) -> str:
    return "\n".join(line.lstrip(" ") for line in template.split("\n"))


def test_prompt_is_the_llm_adapters_template_without_indentation():
    assert build_prompt("Add 2 and 3.") == _dedent(_THEIRS_NO_INPUT).format(instruction="Add 2 and 3.")
    assert build_prompt("Add.", "2 and 3") == _dedent(_THEIRS_INPUT).format(instruction="Add.", input="2 and 3")
    assert build_prompt("{braces} stay", "").endswith("### Instruction:\n{braces} stay\n\n### Response:\n")


def test_training_pairs_are_the_prompt_and_the_reference_output_as_the_study_trains_on_them():
    items = [{"instruction": "Add 2 and 3.", "input": "", "output": "\nA: 2 + 3 = 5. The answer is 5.\n"},
             {"instruction": "Add.", "output": "5"}]
    prompts, responses = T.training_pairs(iter(items))
    assert prompts == [build_prompt("Add 2 and 3."), build_prompt("Add.")]
    assert responses == ["\nA: 2 + 3 = 5. The answer is 5.\n", "5"]  # as distill loads them: not stripped


# --- generation budgets ----------------------------------------------------------------------------------

def test_each_task_carries_its_generation_budget_its_domains_unless_it_declares_one():
    assert all(t.max_new_tokens == T.MAX_NEW_TOKENS[t.domain] for t in TASKS.values())
    assert (TASKS["gsm8k"].max_new_tokens, TASKS["boolq"].max_new_tokens, TASKS["dolly"].max_new_tokens) == (256, 32, 256)
    assert Task("custom", "math", "number", max_new_tokens=12).max_new_tokens == 12
    with pytest.raises(ValueError, match="max_new_tokens"):
        Task("custom", "math", "number", max_new_tokens=0)


def test_generation_budget_an_int_for_all_a_dict_per_domain_or_the_tasks_own():
    own = Task("custom", "math", "number", max_new_tokens=12)
    assert T.generation_budget("gsm8k") == 256 and T.generation_budget("boolq", None) == 32
    assert T.generation_budget(own) == 12 and T.generation_budget(own, 7) == 7
    assert T.generation_budget("boolq", {"math": 40}) == 32  # a domain not named keeps the task's
    assert T.generation_budget("boolq", {"math": 40, "commonsense": 8}) == 8
    assert T.generation_budget(own, {"commonsense": 8}) == 12 and T.generation_budget(own, {"math": 3}) == 3


# --- extraction unit cases -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The answer is 576.", "576"),
    ("So 1,000 + 234 = 1,234. The answer is 1,234.", "1234"),
    ("It costs $5. The answer is $5", "5"),
    ("The temperature fell to -3 degrees.", "-3"),
    ("Each gets 2.75 pounds", "2.75"),
    ("The answer is 0.6666666666666666.", "0.6666666666666666"),
    ("He ate 3/4 of the pie", "4"),          # as LLM-Adapters: the last number, no fractions
    ("x = 10-3", "-3"),                     # as LLM-Adapters: a hyphen before digits is a sign
    ("no digits here", None),
    ("", None),
])
def test_number_extraction(text, expected):
    assert extract_answer("gsm8k", text) == expected


@pytest.mark.parametrize("text, label, correct", [
    ("The answer is 576.", "576.0", True),
    ("The answer is 576.0004", "576.0", True),
    ("The answer is 576.01", "576.0", False),
    ("It is -10.", "-10.0", True),
    ("The answer is 10.", "-10.0", False),
    ("The answer is 1,000.", "1000", True),
    ("I am not sure.", "3.0", False),
    ("9" * 400, "3.0", False),             # overflow to inf: incorrect, not an exception
])
def test_number_scoring(text, label, correct):
    assert is_correct("SVAMP", text, label) is correct


def test_bad_number_label_is_a_clear_error():
    with pytest.raises(ValueError, match="'seven' is not a number"):
        is_correct("gsm8k", "The answer is 7.", "seven")


@pytest.mark.parametrize("text, expected", [
    ("The answer is (C).", "C"),
    ("\nRationale: 2 + 2 = 4. The answer is (D).", "D"),
    ("Answer: (B)", "A"),                   # the authors' regex: the first capital A-E anywhere
    ("the answer is b", None),
])
def test_letter_extraction_mirrors_llm_adapters(text, expected):
    assert extract_answer("AQuA", text) == expected


def test_choice_extraction_takes_the_first_option_and_prefers_longer_tokens():
    assert extract_answer("ARC-Easy", "the correct answer is answer2, not answer1") == "answer2"
    assert extract_answer("boolq", "that is false; true would be wrong") == "false"
    assert extract_answer("boolq", "True") is None  # case-sensitive, as the authors' regex
    ten = Task("ten", "commonsense", "choice", tuple(f"answer{i}" for i in range(1, 11)))
    assert extract_answer(ten, "the correct answer is answer10") == "answer10"
    assert is_correct(ten, "the correct answer is answer10", "answer10")
    assert not is_correct(ten, "the correct answer is answer10", "answer1")


@pytest.mark.parametrize("name", ["gsm8k", "AQuA", "piqa", "micro_obqa"])
def test_no_answer_is_incorrect_not_an_error(name):
    label = "1.0" if TASKS[name].answer_kind == "number" else TASKS[name].options[0]
    assert extract_answer(name, "") is None
    assert is_correct(name, "", label) is False
    assert is_correct(name, None, label) is False


# --- registry ----------------------------------------------------------------------------------------

def test_registry_entries_and_groups():
    assert len(GROUPS["paper"]) == len(GROUPS["micro"]) == 14
    assert GROUPS["paper"] == GROUPS["paper_math"] + GROUPS["paper_commonsense"]
    assert set(GROUPS["paper_math"]) == {"gsm8k", "SVAMP", "MultiArith", "SingleEq", "AddSub", "AQuA"}
    assert set(GROUPS["micro_math"]) == {f"micro_{n}" for n in
                                         ("addsub", "singleeq", "multiarith", "svamp", "gsm", "aqua", "mawps")}
    assert all(TASKS[n].answer_kind == "number" for n in GROUPS["micro_math"])
    assert TASKS["micro_obqa"].options == tuple(f"answer{i}" for i in range(1, 6))
    assert TASKS["micro_siqa"].options == ("answer1", "answer2", "answer3")
    assert TASKS["AQuA"].answer_kind == "letter" and TASKS["AQuA"].options == tuple("ABCDE")
    assert all(t.local_dir == t.name for t in TASKS.values())


def test_resolve_tasks_expands_groups_in_order_without_repeats():
    got = resolve_tasks(["gsm8k", "paper_math", "micro_arc"])
    assert [t.name for t in got] == list(GROUPS["paper_math"]) + ["micro_arc"]
    assert [t.name for t in resolve_tasks("micro")] == list(GROUPS["micro"])
    custom = Task("custom", "math", "number")
    assert resolve_tasks([custom, "AddSub"]) == [custom, TASKS["AddSub"]]


@pytest.mark.parametrize("name, suggestion", [("gsm8", "gsm8k"), ("arc-easy", "ARC-Easy"),
                                              ("micro_commonsens", "micro_commonsense")])
def test_unknown_names_get_a_suggestion(name, suggestion):
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        resolve_tasks([name])


def test_get_task_rejects_groups_and_unknown_names():
    assert get_task("boolq") is TASKS["boolq"]
    with pytest.raises(ValueError, match="group"):
        get_task("paper_math")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nonsense_xyz")
    with pytest.raises(ValueError, match="no task"):
        resolve_tasks([])


@pytest.mark.parametrize("kwargs, message", [
    (dict(domain="physics", answer_kind="number"), "domain"),
    (dict(domain="math", answer_kind="float"), "answer_kind"),
    (dict(domain="math", answer_kind="number", options=("a",)), "take no options"),
    (dict(domain="commonsense", answer_kind="choice"), "need options"),
    (dict(domain="math", answer_kind="number", suite="other"), "suite"),
    (dict(domain="math", answer_kind="number", hf_converter="nope"), "converter"),
    (dict(domain="math", answer_kind="number", loglik=Continuations("{question}", "x")), "only choice tasks"),
    (dict(domain="commonsense", answer_kind="choice", options=("a", "b"),
          loglik=Continuations("{question}", "x", texts=("yes",))), "1 continuation texts for 2 options"),
    (dict(domain="commonsense", answer_kind="choice", options=("a", "b"),
          loglik=Continuations("{question}", "x", preprocess="nope")), "unknown preprocess"),
])
def test_task_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Task("bad", **kwargs)


# --- micro tasks from a data root written here ------------------------------------------------------------

def _micro_item(task: Task, i: int) -> dict:
    if task.answer_kind == "number":
        return {"instruction": f"What is {i} + 2?", "input": "", "output": f"{i} + 2 = {i + 2}. The answer is {i + 2}.",
                "answer": str(i + 2)}
    opts = task.options
    label = opts[i % len(opts)]
    return {"instruction": f"Pick one for item {i}.\n\nAnswer format: {'/'.join(opts)}", "input": "",
            "output": f"the correct answer is {label}", "answer": label}


@pytest.fixture
def micro_root(tmp_path):
    for name in GROUPS["micro"]:
        for split, n in (("train", 6), ("test", 4)):
            (tmp_path / name).mkdir(exist_ok=True)
            items = [_micro_item(TASKS[name], i + (100 if split == "train" else 0)) for i in range(n)]
            (tmp_path / name / f"{split}.json").write_text(json.dumps(items))
    return tmp_path


@pytest.mark.parametrize("name", GROUPS["micro"])
def test_micro_tasks_load_and_score(name, micro_root):
    task = TASKS[name]
    items = load_items(task, data_root=micro_root)
    assert [it["id"] for it in items] == [0, 1, 2, 3]
    assert set(items[0]) == {"id", "instruction", "input", "output", "answer"}
    assert len(load_items(name, data_root=micro_root, split="train")) == 6
    assert len(load_items(name, data_root=micro_root, limit=2)) == 2
    assert all(is_correct(task, it["output"], it["answer"]) for it in items)
    assert not any(is_correct(task, _wrong_response(task, it), it["answer"]) for it in items)


def test_load_items_errors(micro_root, tmp_path):
    with pytest.raises(ValueError, match="needs data_root"):
        load_items("micro_gsm")
    with pytest.raises(FileNotFoundError, match="validation.json"):
        load_items("micro_gsm", data_root=micro_root, split="validation")
    with pytest.raises(ValueError, match="limit"):
        load_items("micro_gsm", data_root=micro_root, limit=0)
    (micro_root / "micro_gsm" / "test.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_items("micro_gsm", data_root=micro_root)
    (micro_root / "micro_gsm" / "test.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match=r"item 0 lacks \['answer'\]"):
        load_items("micro_gsm", data_root=micro_root)
    with pytest.raises(ValueError, match="did you mean 'micro_gsm'"):
        load_items("micro_gsn", data_root=micro_root)


def test_item_options():
    boolq = TASKS["boolq"]
    assert item_options(boolq, {"instruction": "q?\n\nAnswer format: true/false"}) == ("true", "false")
    assert item_options(TASKS["AQuA"], {"instruction": "(A) 1 (B) 2"}) == tuple("ABCDE")
    with pytest.raises(ValueError, match="not within"):
        item_options(boolq, {"id": 7, "instruction": "q?\n\nAnswer format: yes/no"})
    with pytest.raises(ValueError, match="numeric"):
        item_options(TASKS["gsm8k"], {"instruction": "q"})
