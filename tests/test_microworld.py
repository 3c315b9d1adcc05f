"""The procedural micro world: determinism, train/test separation, and that every reference
item is right -- by the project's scorer, by arithmetic, and by an independent oracle that
re-derives each answer from the question text alone."""
from __future__ import annotations

import hashlib
import json
import operator
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kd_utils import microworld as mw
from kd_utils.microworld import GENERATORS, Almanac, generate_task, generic_corpus, write_world
from kd_utils.tasks import TASKS, is_correct, item_options

ALL = sorted(GENERATORS)
MATH = [t for t in ALL if TASKS[t].domain == "math"]
CHOICE = [t for t in ALL if TASKS[t].domain == "commonsense"]
N_ITEMS = 300


def test_task_lists_cover_the_registry_micro_suite():
    assert set(GENERATORS) == {t.name for t in TASKS.values() if t.suite == "micro"}
    assert len(MATH) == 7 and len(CHOICE) == 7


def test_unknown_task_name_raises_value_error_listing_known_tasks():
    with pytest.raises(ValueError, match="micro_gsm"):
        generate_task("micro_gsm9k", 5, seed=0)


# --- determinism ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", ALL)
def test_generate_task_is_a_function_of_the_seed(task):
    assert generate_task(task, 40, seed=3) == generate_task(task, 40, seed=3)
    assert generate_task(task, 40, seed=3) != generate_task(task, 40, seed=4)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.json"))}


def test_write_world_same_seed_gives_identical_files_other_seed_different(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_world(tmp_path / name, n_train=30, n_test=10, seed=seed)
    a, b, c = (_tree_digest(tmp_path / n) for n in "abc")
    assert len(a) == 2 * len(GENERATORS)
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a), "another seed must change every file"


def test_write_world_is_identical_across_processes_with_different_hash_seeds(tmp_path):
    """No set/dict-order or hash() dependence: PYTHONHASHSEED must not change the world."""
    code = ("import sys; from kd_utils.microworld import write_world, generic_corpus; "
            "write_world(sys.argv[1], 30, 10, 5); open(sys.argv[1] + '/corpus.txt', 'w').write("
            "'\\n'.join(generic_corpus(300, 5)))")
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        out.mkdir()
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=60,
                       env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"})
    assert _tree_digest(tmp_path / "1") == _tree_digest(tmp_path / "2")
    assert (tmp_path / "1" / "corpus.txt").read_text() == (tmp_path / "2" / "corpus.txt").read_text()


def test_generic_corpus_is_a_function_of_the_seed():
    assert generic_corpus(200, 0) == generic_corpus(200, 0)
    assert generic_corpus(200, 0) != generic_corpus(200, 1)
    assert len(generic_corpus(123, 0)) == 123


# --- distinctness and train/test separation --------------------------------------------------

@pytest.mark.parametrize("task", ALL)
def test_generated_instructions_are_distinct_and_avoid_exclude(task):
    first = generate_task(task, 100, seed=0)
    assert len({it["instruction"] for it in first}) == 100
    excluded = {it["instruction"] for it in first[:50]}
    again = generate_task(task, 100, seed=0, exclude=excluded)
    assert not excluded & {it["instruction"] for it in again}


def test_train_and_test_instructions_are_disjoint_in_the_written_world(tmp_path):
    counts = write_world(tmp_path, n_train=300, n_test=100, seed=0)
    for task in GENERATORS:
        train = json.loads((tmp_path / task / "train.json").read_text())
        test = json.loads((tmp_path / task / "test.json").read_text())
        assert counts[task] == {"train": 300, "test": 100} == {"train": len(train), "test": len(test)}
        assert not {t["instruction"] for t in train} & {t["instruction"] for t in test}, task


@pytest.mark.parametrize("task", ALL)
def test_every_task_can_fill_the_default_world_size(task):
    """WorldConfig's defaults (2000 train + 200 test items per task) must be producible."""
    from kd_utils.config import WorldConfig

    w = WorldConfig()
    test = generate_task(task, w.n_test, seed=1)
    train = generate_task(task, w.n_train, seed=0, exclude={t["instruction"] for t in test})
    assert len(train) == w.n_train


def test_asking_for_more_items_than_a_task_has_raises_value_error():
    with pytest.raises(ValueError, match="distinct"):
        generate_task("micro_piqa", 4000, seed=0)  # at most 380 (a, target) pairs x 4 distractors x 2 orders


# --- reference items are right ------------------------------------------------------------------

@pytest.fixture(scope="module")
def items() -> dict[str, list[dict]]:
    return {t: generate_task(t, N_ITEMS, seed=0) for t in ALL}


@pytest.mark.parametrize("task", ALL)
def test_every_reference_output_scores_correct_with_the_project_scorer(task, items):
    wrong = [it for it in items[task] if not is_correct(task, it["output"], it["answer"])]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("task", ALL)
def test_items_have_the_llm_adapters_fields(task, items):
    for it in items[task]:
        assert set(it) == {"instruction", "input", "output", "answer"}
        assert all(isinstance(v, str) for v in it.values())
        assert it["input"] == "" and it["instruction"] and it["output"]


_STEP = re.compile(r"(?:([a-z]) = )?(\d+) ([-+*/]) (\d+) = (\d+)\.")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _steps(output: str) -> tuple[list[tuple], int]:
    """Parse 'step step ... The answer is N.' into (a, op, b, c) steps and N; every character
    of the rationale must belong to a parsed step."""
    m = re.fullmatch(r"(.*) The answer is (\d+)\.", output)
    assert m, f"no final answer sentence in {output!r}"
    body, answer = m.group(1), int(m.group(2))
    found = list(_STEP.finditer(body))
    assert " ".join(f.group(0) for f in found) == body, f"unparsed rationale text in {output!r}"
    return [(int(f.group(2)), f.group(3), int(f.group(4)), int(f.group(5))) for f in found], answer


@pytest.mark.parametrize("task", MATH)
def test_every_math_rationale_step_is_true_arithmetic(task, items):
    for it in items[task]:
        steps, answer = _steps(it["output"])
        assert steps, it
        for a, op, b, c in steps:
            if op == "/":
                assert b != 0 and a == b * c, it["output"]
            else:
                assert _OPS[op](a, b) == c, it["output"]
        assert steps[-1][3] == answer == int(it["answer"]), it


@pytest.mark.parametrize("task", MATH)
def test_multi_step_rationales_chain_each_result_into_the_next_step(task, items):
    for it in items[task]:
        steps, _ = _steps(it["output"])
        for prev, nxt in zip(steps, steps[1:]):
            assert nxt[0] == prev[3], it["output"]


@pytest.mark.parametrize("task", ALL)
def test_every_arithmetic_statement_in_any_output_is_true(task, items):
    """Rationales of multiple-choice items too: every "a op b = c" they state holds."""
    for it in items[task]:
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", it["output"]):
            a, b, c = int(a), int(b), int(c)
            assert (a == b * c) if op == "/" else _OPS[op](a, b) == c, it["output"]


# An oracle per task: the answer derived from the question text only (not from the generator).
# It parses the current phrasing; a rephrased generator needs its parser here updated.

def _options(task: str, item: dict) -> dict[str, str]:
    """{option token: option text} of a multiple-choice item, for either listing style:
    "3 (answer1), 4 (answer2)" or "Answer1: 3 Answer2: 4"."""
    ins, out = item["instruction"], {}
    for token in item_options(TASKS[task], item):
        after = re.search(rf"(?:^|\n|, |\) )([^\n(),]+?) \({token}\)", ins)
        before = re.search(rf"\b{token.capitalize()}: (.+?)(?=\s+[A-Z][a-z]+\d+: |\s+Answer format)", ins)
        assert (after is None) != (before is None), f"cannot find the text of {token} in {ins!r}"
        out[token] = (after or before).group(1)
    return out


def _only(options: dict[str, str], good) -> str:
    hits = [k for k, v in options.items() if good(v)]
    assert len(hits) == 1, (options, hits)
    return hits[0]


def _find(pattern: str, text: str) -> re.Match:
    m = re.search(pattern, text)
    assert m, f"oracle cannot parse {text!r} with {pattern!r}"
    return m


def _oracle(task: str, item: dict, world: Almanac) -> str:
    ins = item["instruction"]
    num = lambda p: [int(x) for x in _find(p, ins).groups()]  # noqa: E731
    if task == "micro_addsub":
        if "more" in ins:
            a, b = num(r"has (\d+) \w+\. \w+ gets (\d+) more")
            return str(a + b)
        a, b = num(r"has (\d+) \w+\. \w+ gives away (\d+)")
        return str(a - b)
    if task == "micro_singleeq":
        v, sign, b, c = _find(r"([a-z]) ([+-]) (\d+) = (\d+)", ins).groups()
        return str(int(c) - int(b) if sign == "+" else int(c) + int(b))
    if task == "micro_multiarith":
        n, k, c = num(r"There are (\d+) \w+ with (\d+) \w+ each\. Then (\d+)")
        return str(n * k + c if "added" in ins else n * k - c)
    if task == "micro_svamp":
        m = _find(r"^(\w+) has (\d+) \w+\. (\w+) has \d+ \w+\. \1 (finds|loses) (\d+)", ins)
        a, b = int(m.group(2)), int(m.group(5))
        return str(a + b if m.group(4) == "finds" else a - b)
    if task == "micro_gsm":
        a, b, c, d = num(r"has (\d+) \w+\. \w+ buys (\d+) more, gives (\d+) to a friend, and then finds (\d+)\.")
        return str(a + b - c + d)
    if task == "micro_aqua":
        if "holds" in ins:
            k, n = num(r"holds (\d+) \w+\. How many \w+ are in (\d+)")
            return str(n * k)
        total, n = num(r"^(\d+) \w+ are shared equally among (\d+)")
        assert total % n == 0, ins
        return str(total // n)
    if task == "micro_mawps":
        c, rel, word, x = _find(r"(\d+) (more|less) than (twice|double|three times|triple) (\d+)", ins).groups()
        base = {"twice": 2, "double": 2, "three times": 3, "triple": 3}[word] * int(x)
        return str(base + int(c) if rel == "more" else base - int(c))
    if task == "micro_boolq":
        q = _find(r"question: (.*)\?\n", ins).group(1)
        if m := re.fullmatch(r"is (\d+) (larger|bigger|smaller|less) than (\d+)", q):
            a, word, b = int(m.group(1)), m.group(2), int(m.group(3))
            truth = a > b if word in ("larger", "bigger") else a < b
        elif m := re.fullmatch(r"is (\d+) an (even|odd) number", q):
            truth = (int(m.group(1)) % 2 == 0) == (m.group(2) == "even")
        else:
            animal, home = _find(r"^does the (\w+) live in the (\w+)$", q).groups()
            truth = world.home[animal] == home
        return "true" if truth else "false"
    opts = _options(task, item)
    if task == "micro_piqa":
        a, target = num(r"How do I turn (\d+) into (\d+)\?")

        def lands(phrase: str) -> bool:
            verb, n = _find(r"^(add|take away) (\d+)$", phrase).groups()
            return a + (int(n) if verb == "add" else -int(n)) == target
        return _only(opts, lands)
    if task == "micro_siqa":
        a, b = num(r"had (\d+) \w+ and gave (\d+) to")
        return _only(opts, lambda v: int(v) == a - b)
    if task == "micro_hellaswag":
        seq = [int(x) for x in _find(r"The numbers ([\d, ]+) go on with", ins).group(1).split(", ")]
        assert len({y - x for x, y in zip(seq, seq[1:])}) == 1, ins
        return _only(opts, lambda v: int(v) == seq[-1] + seq[1] - seq[0])
    if task == "micro_winogrande":
        a, adj, b, outcome = _find(r": (\w+) is (.+?) than (\w+), so _ (.+?)\.\n", ins).groups()
        assert sorted(opts.values()) == sorted((a, b)), ins
        for strong, weak, win, lose in mw.RELATIONS:
            if adj in (strong, weak) and outcome in (win, lose):
                winner = a if (adj == strong) == (outcome == win) else b
                return _only(opts, lambda v: v == winner)
        raise AssertionError(f"unknown relation in {ins!r}")
    if task == "micro_arc":
        if m := re.search(r"Where does the (\w+) live\?", ins):
            return _only(opts, lambda v: v == world.home[m.group(1)])
        animal = _find(r"What does the (\w+) eat\?", ins).group(1)
        return _only(opts, lambda v: v == world.food[animal])
    if task == "micro_obqa":
        values = [int(v) for v in opts.values()]
        pick = max(values) if "largest" in ins else min(values)
        return _only(opts, lambda v: int(v) == pick)
    if task == "micro_instruct":
        return _instruct_oracle(ins, world)
    raise AssertionError(f"no oracle for {task}")


def _instruct_oracle(ins: str, world: Almanac) -> str:
    """The response each instruction kind asks for, recomputed from the instruction alone."""
    past = dict(mw.VERBS)
    m = re.match(r"Rewrite the sentence in the past tense: (\w+) (.+) (\d+) (\w+)\.$", ins)
    if m:
        name, verb, n, thing = m.groups()
        return f"{name} {past[verb]} {n} {thing}."
    m = re.match(r"List (\d+) numbers, starting at (\d+) and counting by (\d+)\.$", ins)
    if m:
        count, start, step = map(int, m.groups())
        numbers = [str(start + i * step) for i in range(count)]
        return f"The numbers are {', '.join(numbers[:-1])} and {numbers[-1]}."
    m = re.match(r"Describe the (\w+): (.+)\.$", ins)
    assert m, ins
    animal, asked = m.groups()
    facts = {"where it lives": f"It lives in the {world.home[animal]}.", "what it eats": f"It eats {world.food[animal]}.",
             "its color": f"It is {world.color[animal]}."}
    return " ".join([f"The {animal} is an animal."] + [facts[a] for a in re.split(r", | and ", asked)])


@pytest.mark.parametrize("task", ALL)
def test_every_reference_answer_is_what_the_question_asks(task, items):
    world = Almanac.build(0)
    wrong = [it for it in items[task] if _oracle(task, it, world) != it["answer"]]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("task", CHOICE)
def test_multiple_choice_answer_is_one_of_the_items_option_tokens(task, items):
    for it in items[task]:
        options = item_options(TASKS[task], it)
        assert it["answer"] in options, it
        assert len(set(options)) == len(options)
        if task != "micro_boolq":
            listed = _options(task, it)
            assert len(set(listed.values())) == len(listed), f"repeated option text: {it['instruction']!r}"


@pytest.mark.parametrize("task", CHOICE)
def test_correct_option_position_has_no_learnable_bias(task):
    """On 2000 items each option position is the answer within 10 points of uniform."""
    gen = generate_task(task, 2000, seed=0)
    counts = Counter(it["answer"] for it in gen)
    options = item_options(TASKS[task], gen[0])
    for opt in options:
        share = counts[opt] / len(gen)
        assert abs(share - 1 / len(options)) <= 0.10, (opt, dict(counts))


# --- the generic corpus and the almanac ------------------------------------------------------------

def test_generic_corpus_contains_no_task_instruction_or_reference_output():
    text = "\n".join(generic_corpus(5000, 0))
    for task in ALL:
        for it in generate_task(task, 100, seed=0) + generate_task(task, 100, seed=1):
            assert it["instruction"] not in text, (task, it["instruction"])
            assert it["output"] not in text, (task, it["output"])
    assert "The answer is" not in text and "Answer format" not in text


def test_generic_corpus_teaches_the_almanac_of_its_seed():
    world, facts = Almanac.build(3), 0
    for line in generic_corpus(3000, 3):
        for animal, home in re.findall(r"The (\w+) lives in the (\w+)\.", line):
            assert world.home[animal] == home, line
            facts += 1
        for animal, food in re.findall(r"The (\w+) eats (\w+)\.", line):
            assert world.food[animal] == food, line
    assert facts > 50, "the corpus should state many almanac facts"


def test_almanac_is_deterministic_and_covers_every_animal():
    a, b = Almanac.build(0), Almanac.build(0)
    assert a == b and a != Almanac.build(1)
    assert set(a.home) == set(a.food) == set(a.color) == set(mw.ANIMALS)
    assert len(a.sentences()) == 3 * len(mw.ANIMALS)


@pytest.mark.parametrize("split", ["train", "test"])
def test_written_almanac_questions_use_the_worlds_almanac(tmp_path, split):
    """micro_arc and micro_boolq quiz the facts the generic corpus of the same seed teaches."""
    seed = 0
    write_world(tmp_path, n_train=200, n_test=200, seed=seed, tasks=["micro_arc", "micro_boolq"])
    world = Almanac.build(seed)
    for task in ("micro_arc", "micro_boolq"):
        items = json.loads((tmp_path / task / f"{split}.json").read_text())
        wrong = [it for it in items if _oracle(task, it, world) != it["answer"]]
        assert not wrong, (task, len(wrong), wrong[:2])
