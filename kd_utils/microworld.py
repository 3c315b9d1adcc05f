"""The micro world of the CPU micro-study: 15 procedural tasks and a generic corpus.

Everything is deterministic from a seed. Tasks mirror the paper's three domains:
seven arithmetic-reasoning tasks whose outputs are a short rationale ending in
"The answer is N.", seven multiple-choice tasks answered with the paper's option
tokens ("the correct answer is answer3"), and one instruction-following task
(`micro_instruct`: rewrite, list, describe) with free-form answers scored by ROUGE-L. Files are written in the LLM-Adapters JSON
format ({"instruction", "input", "output", "answer"}), so the paper's prompt template
and answer extraction serve both worlds. The tasks are the registry's (kd_utils.tasks, suite
"micro"): task micro_<x> is written by `gen_<x>` here (`GENERATORS`).

The generic pretraining corpus shares the world (names, objects, number facts, the
animal almanac that `micro_arc` and `micro_obqa` quiz) but contains no task item.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .tasks import TASKS

NAMES = ["Tom", "Mia", "Sam", "Ana", "Leo", "Ivy", "Max", "Zoe", "Ben", "Eva", "Jon", "Amy",
         "Kai", "Liz", "Ned", "Ola", "Pat", "Rex", "Sue", "Ted"]
THINGS = ["apples", "pens", "coins", "books", "cards", "eggs", "shells", "stamps", "rocks", "cups"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "baskets", "crates"]
# Made-up animals with made-up facts: knowledge only the generic corpus teaches.
ANIMALS = ["blick", "dorn", "fep", "glim", "hask", "jorp", "kib", "lunt", "mave", "nork",
           "plib", "quon", "rask", "sorn", "tib", "vusk", "wem", "yarl", "zet", "brom",
           "crill", "drex", "flon", "grub"]
HOMES = ["river", "desert", "forest", "cave", "hill"]
FOODS = ["fish", "seeds", "grass", "bugs", "fruit"]
COLORS = ["red", "blue", "green", "white", "black"]
# winogrande-style relations: (adjective, its opposite, what the first gets, what the second gets)
RELATIONS = [
    ("taller", "shorter", "reached the top shelf", "could not reach the top shelf"),
    ("faster", "slower", "won the race", "lost the race"),
    ("older", "younger", "could vote", "could not vote yet"),
    ("richer", "poorer", "bought the car", "could not buy the car"),
    ("stronger", "weaker", "lifted the box", "could not lift the box"),
    ("hungrier", "less hungry", "ate more", "ate less"),
]


@dataclass(frozen=True)
class Almanac:
    """The fictional facts of the micro world: where each animal lives, what it eats, its color."""

    home: dict[str, str]
    food: dict[str, str]
    color: dict[str, str]

    @classmethod
    def build(cls, seed: int) -> "Almanac":
        rng = random.Random(f"almanac-{seed}")
        return cls(
            home={a: rng.choice(HOMES) for a in ANIMALS},
            food={a: rng.choice(FOODS) for a in ANIMALS},
            color={a: rng.choice(COLORS) for a in ANIMALS},
        )

    def sentences(self) -> list[str]:
        out = []
        for a in ANIMALS:
            out += [f"The {a} lives in the {self.home[a]}.", f"The {a} eats {self.food[a]}.",
                    f"The {a} is {self.color[a]}."]
        return out


def _item(instruction: str, output: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": output, "answer": answer}


def _text(instruction: str, output: str) -> dict:
    """A free-form item: the reference response is the answer (scored by ROUGE-L)."""
    return _item(instruction, output, output)


def _math(instruction: str, steps: list[str], answer: int) -> dict:
    return _item(instruction, " ".join(steps + [f"The answer is {answer}."]), str(answer))


def _choice(question: str, label: str, options: list[str], correct: int, rationale: str,
            fmt_sep: str = ", ") -> dict:
    """A multiple-choice item with the paper's option tokens and "Answer format" line. Options
    are listed as "value (token)" and the reference output is a short rationale, then "the
    correct answer is value (token)": the option lookup is a copy a tiny model can learn.
    Extraction is the paper's: the first option token in the output."""
    tokens = [f"{label}{i + 1}" for i in range(len(options))]
    listed = fmt_sep.join(f"{o} ({t})" for t, o in zip(tokens, options))
    instruction = f"{question}\n\n{listed}\n\nAnswer format: {'/'.join(tokens)}"
    return _item(instruction, f"{rationale} the correct answer is {options[correct]} ({tokens[correct]})",
                 tokens[correct])


def _shuffled_options(rng: random.Random, correct: str, wrong: list[str]) -> tuple[list[str], int]:
    options = [correct] + wrong
    rng.shuffle(options)
    return options, options.index(correct)


def _distractors(rng: random.Random, value: int, n: int, spread: int = 9) -> list[str]:
    out: set[int] = set()
    while len(out) < n:
        d = value + rng.randint(-spread, spread)
        if d != value and d >= 0:
            out.add(d)
    return [str(d) for d in sorted(out)]


# --- math: rationale + "The answer is N." ------------------------------------------------
# Operands are small: each rationale step is a fact a tiny model can learn; tasks differ
# in how many steps they chain and in distractors, which grades their difficulty.

def gen_addsub(rng: random.Random, w: "Almanac") -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(1, 9)
    if rng.random() < 0.5:
        return _math(f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?",
                     [f"{a} + {b} = {a + b}."], a + b)
    a = a + b
    return _math(f"{name} has {a} {thing}. {name} gives away {b}. How many {thing} does {name} have now?",
                 [f"{a} - {b} = {a - b}."], a - b)


def gen_singleeq(rng: random.Random, w: "Almanac") -> dict:
    x, b = rng.randint(1, 15), rng.randint(1, 9)
    v = rng.choice("xyznab")
    ask = rng.choice(["If {eq}, what is {v}?", "Solve {eq} for {v}.", "Find {v} when {eq}."])
    if rng.random() < 0.5:
        return _math(ask.format(eq=f"{v} + {b} = {x + b}", v=v), [f"{v} = {x + b} - {b} = {x}."], x)
    return _math(ask.format(eq=f"{v} - {b} = {x}", v=v), [f"{v} = {x} + {b} = {x + b}."], x + b)


def gen_multiarith(rng: random.Random, w: "Almanac") -> dict:
    n, k, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 9)
    box, thing = rng.choice(CONTAINERS), rng.choice(THINGS)
    if rng.random() < 0.5:
        return _math(f"There are {n} {box} with {k} {thing} each. Then {c} more {thing} are added. "
                     f"How many {thing} are there?", [f"{n} * {k} = {n * k}.", f"{n * k} + {c} = {n * k + c}."],
                     n * k + c)
    c = min(c, n * k - 1)
    return _math(f"There are {n} {box} with {k} {thing} each. Then {c} of the {thing} are lost. "
                 f"How many {thing} are left?", [f"{n} * {k} = {n * k}.", f"{n * k} - {c} = {n * k - c}."],
                 n * k - c)


def gen_svamp(rng: random.Random, w: "Almanac") -> dict:
    """Add/subtract with an irrelevant number to ignore (SVAMP's distractors)."""
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b, d = rng.randint(2, 20), rng.randint(1, 9), rng.randint(2, 20)
    distract = f"{other} has {d} {thing}."
    if rng.random() < 0.5:
        return _math(f"{name} has {a} {thing}. {distract} {name} finds {b} more. How many {thing} does {name} have?",
                     [f"{a} + {b} = {a + b}."], a + b)
    return _math(f"{name} has {a + b} {thing}. {distract} {name} loses {b}. How many {thing} does {name} have?",
                 [f"{a + b} - {b} = {a}."], a)


def gen_gsm(rng: random.Random, w: "Almanac") -> dict:
    """Three steps: buy, give away, find."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c, d = rng.randint(2, 12), rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    s1 = a + b
    c = min(c, s1 - 1)
    s2, s3 = s1 - c, s1 - c + d
    return _math(f"{name} has {a} {thing}. {name} buys {b} more, gives {c} to a friend, and then finds {d}. "
                 f"How many {thing} does {name} have?",
                 [f"{a} + {b} = {s1}.", f"{s1} - {c} = {s2}.", f"{s2} + {d} = {s3}."], s3)


def gen_aqua(rng: random.Random, w: "Almanac") -> dict:
    """Multiplication and division facts in words."""
    k, n = rng.randint(2, 9), rng.randint(2, 9)
    box, thing = rng.choice(CONTAINERS), rng.choice(THINGS)
    if rng.random() < 0.5:
        return _math(f"One of the {box} holds {k} {thing}. How many {thing} are in {n} {box}?",
                     [f"{n} * {k} = {n * k}."], n * k)
    return _math(f"{n * k} {thing} are shared equally among {n} {box}. How many {thing} are in each?",
                 [f"{n * k} / {n} = {k}."], k)


def gen_mawps(rng: random.Random, w: "Almanac") -> dict:
    """Number phrases: "8 more than twice 7"."""
    x, c = rng.randint(1, 12), rng.randint(1, 9)
    m, word = rng.choice([(2, "twice"), (2, "double"), (3, "three times"), (3, "triple")])
    ask = rng.choice(["What number is {p}?", "Find the number that is {p}.", "Which number is {p}?"])
    if rng.random() < 0.5:
        return _math(ask.format(p=f"{c} more than {word} {x}"),
                     [f"{m} * {x} = {m * x}.", f"{m * x} + {c} = {m * x + c}."], m * x + c)
    c = min(c, m * x - 1)
    return _math(ask.format(p=f"{c} less than {word} {x}"),
                 [f"{m} * {x} = {m * x}.", f"{m * x} - {c} = {m * x - c}."], m * x - c)


# --- multiple choice: "the correct answer is <option token>" ------------------------------

def gen_boolq(rng: random.Random, w: "Almanac") -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.sample(range(0, 31), 2)
        word, bigger = rng.choice([("larger", True), ("bigger", True), ("smaller", False), ("less", False)])
        q, ans = f"is {a} {word} than {b}?", (a > b) == bigger
        why = f"{max(a, b)} is larger than {min(a, b)}."
    elif kind == 1:
        a, parity = rng.randint(1, 30), rng.choice(["even", "odd"])
        q, ans = f"is {a} an {parity} number?", (a % 2 == 0) == (parity == "even")
        why = f"{a} is {'even' if a % 2 == 0 else 'odd'}."
    else:
        animal = rng.choice(ANIMALS)
        home = w.home[animal] if rng.random() < 0.5 else rng.choice(HOMES)
        q, ans = f"does the {animal} live in the {home}?", w.home[animal] == home
        why = f"The {animal} lives in the {w.home[animal]}."
    label = "true" if ans else "false"
    return _item(f"Please answer the following question with true or false, question: {q}\n\n"
                 f"Answer format: true/false", f"{why} the correct answer is {label}", label)


def _step_phrase(d: int) -> str:
    return f"add {d}" if d > 0 else f"take away {-d}"


def gen_piqa(rng: random.Random, w: "Almanac") -> dict:
    a, target = rng.sample(range(1, 21), 2)
    diff = target - a
    wrong_d = diff + rng.choice([-2, -1, 1, 2])
    options, correct = _shuffled_options(rng, _step_phrase(diff), [_step_phrase(wrong_d) if wrong_d else "add 10"])
    why = f"{target} - {a} = {diff}." if diff > 0 else f"{a} - {target} = {-diff}."
    return _choice(f"Please choose the correct solution to the question: How do I turn {a} into {target}?",
                   "solution", options, correct, f"{why} So {_step_phrase(diff)}.", fmt_sep="\n\n")


def gen_siqa(rng: random.Random, w: "Almanac") -> dict:
    giver, taker = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a = rng.randint(3, 12)
    b = rng.randint(1, a - 1)
    value = a - b
    q = f"{giver} had {a} {thing} and gave {b} to {taker}. How many {thing} does {giver} have now?"
    options, correct = _shuffled_options(rng, str(value), _distractors(rng, value, 2, spread=3))
    return _choice(f"Please choose the correct answer to the question: {q}", "answer", options, correct,
                   f"{a} - {b} = {value}.")


def gen_hellaswag(rng: random.Random, w: "Almanac") -> dict:
    start, step = rng.randint(1, 20), rng.randint(1, 5)
    seq = [start + i * step for i in range(4)]
    nxt = start + 4 * step
    options, correct = _shuffled_options(rng, str(nxt), [str(nxt + d) for d in rng.sample([-2, -1, 1, 2, 3], 3)])
    return _choice(f"Please choose the correct ending to complete the given sentence: The numbers "
                   f"{', '.join(map(str, seq))} go on with", "ending", options, correct,
                   f"{seq[-1]} + {step} = {nxt}.")


def gen_winogrande(rng: random.Random, w: "Almanac") -> dict:
    """Who gets the outcome: depends on the adjective's direction, the outcome's polarity and
    the order of the options (which need not follow the sentence)."""
    a, b = rng.sample(NAMES, 2)
    adj, weak_adj, win, lose = rng.choice(RELATIONS)
    strong_first, outcome_win = rng.random() < 0.5, rng.random() < 0.5
    sentence = f"{a} is {adj if strong_first else weak_adj} than {b}, so _ {win if outcome_win else lose}."
    answer = a if strong_first == outcome_win else b
    strong = a if strong_first else b
    why = f"{strong} is {adj}, so _ is {answer}."
    options = [a, b] if rng.random() < 0.5 else [b, a]
    return _choice(f"Please choose the correct answer to fill in the blank to complete the given sentence: {sentence}",
                   "option", options, options.index(answer), why, fmt_sep=" ")


def gen_arc(rng: random.Random, w: "Almanac") -> dict:
    animal = rng.choice(ANIMALS)
    if rng.random() < 0.5:
        q, right, pool = f"Where does the {animal} live?", w.home[animal], HOMES
        why = f"The {animal} lives in the {right}."
    else:
        q, right, pool = f"What does the {animal} eat?", w.food[animal], FOODS
        why = f"The {animal} eats {right}."
    options, correct = _shuffled_options(rng, right, rng.sample([p for p in pool if p != right], 3))
    return _choice(f"Please choose the correct answer to the question: {q}", "answer", options, correct, why)


def gen_obqa(rng: random.Random, w: "Almanac") -> dict:
    values = rng.sample(range(1, 31), 5)
    largest = rng.random() < 0.5
    target = max(values) if largest else min(values)
    q = f"Which number is the {'largest' if largest else 'smallest'}?"
    return _choice(f"Please choose the correct answer to the question: {q}", "answer",
                   [str(v) for v in values], values.index(target),
                   f"The {'largest' if largest else 'smallest'} is {target}.")


# (present, past) of the verbs the rewrite instructions put in the past tense
VERBS = [("buys", "bought"), ("finds", "found"), ("sells", "sold"), ("makes", "made"), ("loses", "lost"),
         ("gives away", "gave away"), ("keeps", "kept"), ("brings", "brought")]
_FACTS = {"home": ("where it lives", "It lives in the {}."), "food": ("what it eats", "It eats {}."),
          "color": ("its color", "It is {}.")}


def gen_instruct(rng: random.Random, w: "Almanac") -> dict:
    """Instruction following with a free-form answer: rewrite a sentence in the past tense, list
    numbers counting by a step, or describe an animal of the almanac (two or three facts, in the
    asked order)."""
    kind = rng.randrange(3)
    if kind == 0:
        name, (now, past), n, thing = rng.choice(NAMES), rng.choice(VERBS), rng.randint(2, 20), rng.choice(THINGS)
        return _text(f"Rewrite the sentence in the past tense: {name} {now} {n} {thing}.", f"{name} {past} {n} {thing}.")
    if kind == 1:
        start, step, count = rng.randint(0, 60), rng.randint(1, 9), rng.randint(3, 6)
        numbers = [str(start + i * step) for i in range(count)]
        return _text(f"List {count} numbers, starting at {start} and counting by {step}.",
                     f"The numbers are {', '.join(numbers[:-1])} and {numbers[-1]}.")
    animal = rng.choice(ANIMALS)
    facts = rng.sample(list(_FACTS), rng.choice([2, 3]))
    asked = [_FACTS[f][0] for f in facts]
    values = {"home": w.home[animal], "food": w.food[animal], "color": w.color[animal]}
    return _text(f"Describe the {animal}: {', '.join(asked[:-1])} and {asked[-1]}.",
                 f"The {animal} is an animal. " + " ".join(_FACTS[f][1].format(values[f]) for f in facts))


def _generators() -> dict[str, Callable[[random.Random, Almanac], dict]]:
    """The generator of each micro task of the registry (`kd_utils.tasks`, suite "micro"), in its
    order: task micro_<x> is written by `gen_<x>`."""
    out = {}
    for task in (t for t in TASKS.values() if t.suite == "micro"):
        gen = globals().get(f"gen_{task.name.removeprefix('micro_')}")
        if gen is None:
            raise ImportError(f"micro task {task.name!r} of kd_utils.tasks has no generator here")
        out[task.name] = gen
    return out


#: The micro tasks (the registry's suite "micro") and the function that writes each one's items.
GENERATORS: dict[str, Callable[[random.Random, Almanac], dict]] = _generators()


def generate_task(name: str, n: int, seed: int, exclude: set[str] = frozenset(), split: str = "train") -> list[dict]:
    """n distinct items of task `name` (distinct instructions, none in `exclude`) in the world
    of `seed`; `split` names an independent random stream over the same world (same almanac)."""
    if name not in GENERATORS:
        raise ValueError(f"unknown micro task {name!r}; known: {sorted(GENERATORS)}")
    rng, world = random.Random(f"{name}-{split}-{seed}"), Almanac.build(seed)
    items, seen = [], set(exclude)
    for _ in range(50 * n):
        item = GENERATORS[name](rng, world)
        if item["instruction"] not in seen:
            seen.add(item["instruction"])
            items.append(item)
            if len(items) == n:
                return items
    raise ValueError(f"micro task {name!r} cannot produce {n} distinct items (got {len(items)})")


def generic_corpus(n_lines: int, seed: int) -> list[str]:
    """Pretraining text: number facts, counting, small stories and the almanac (no task items)."""
    rng, world = random.Random(f"corpus-{seed}"), Almanac.build(seed)
    facts = world.sentences()
    out = []
    for _ in range(n_lines):
        kind = rng.randrange(6)
        if kind == 0:
            a, b = rng.randint(0, 60), rng.randint(0, 40)
            out.append(rng.choice([f"{a} plus {b} is {a + b}.", f"{a} + {b} = {a + b}.",
                                   f"{a + b} minus {b} is {a}.", f"{a + b} - {b} = {a}."]))
        elif kind == 1:
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            out.append(rng.choice([f"{a} times {b} is {a * b}.", f"{a} * {b} = {a * b}.",
                                   f"{a * b} / {a} = {b}."]))
        elif kind == 2:
            s, d = rng.randint(0, 30), rng.randint(1, 9)
            out.append("Counting: " + ", ".join(str(s + i * d) for i in range(rng.randint(4, 7))) + ".")
        elif kind == 3:
            a, b = rng.sample(range(0, 100), 2)
            out.append(f"{max(a, b)} is more than {min(a, b)}." if rng.random() < 0.5
                       else f"{min(a, b)} is less than {max(a, b)}.")
        elif kind == 4:
            name, thing = rng.choice(NAMES), rng.choice(THINGS)
            adj, _, win, _ = rng.choice(RELATIONS)
            other = rng.choice([n for n in NAMES if n != name])
            out.append(rng.choice([f"{name} likes {thing}. {name} keeps the {thing} in {rng.choice(CONTAINERS)}.",
                                   f"{name} is {adj} than {other}, so {name} {win}."]))
        else:
            out.append(" ".join(rng.sample(facts, 3)))
    return out


def write_world(data_root: str | Path, n_train: int, n_test: int, seed: int,
                tasks: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Write `<data_root>/<task>/{train,test}.json` for the micro tasks; returns item counts.

    Test items never share an instruction with training items.
    """
    root = Path(data_root)
    counts = {}
    for name in tasks or list(GENERATORS):
        test = generate_task(name, n_test, seed, split="test")
        train = generate_task(name, n_train, seed, exclude={t["instruction"] for t in test})
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, items in (("train", train), ("test", test)):
            (root / name / f"{split}.json").write_text(json.dumps(items, indent=1))
        counts[name] = {"train": len(train), "test": len(test)}
    return counts
