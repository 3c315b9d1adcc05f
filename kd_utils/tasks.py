"""The task registry (declarative, like lm-evaluation-harness task files) and answer scoring.

A task is data: a `Task` entry in `TASKS`. Adding a task is adding an entry; groups
("paper_math", "micro", ...) follow from each entry's suite and domain.

Prompt and scoring mirror the LLM-Adapters code the paper's authors evaluated with
(evaluate.py for math, commomsense_evaluate.py for commonsense):

- prompt: their `generate_prompt` with the 16-space source indentation of each line removed
  (see `PROMPT_NO_INPUT` / `PROMPT_WITH_INPUT`, which keep their "request. " trailing space);
- number tasks: commas are deleted, the last match of ``-?\\d+\\.?\\d*`` is the answer, and it
  is correct when ``abs(pred - float(label)) <= 0.001`` (`ANSWER_TOLERANCE`). So "1,000" -> 1000,
  "$5" -> 5, "5." -> 5, "-3" -> -3, and (deliberately, as theirs) "3/4" -> 4 and "10-3" -> -3;
- letter tasks (AQuA): the first character A-E anywhere in the output (their regex
  ``A|B|C|D|E``, case-sensitive, no word boundary: a capital "A"/"E" in a rationale counts);
- choice tasks: the first occurrence of any of the task's option tokens (case-sensitive,
  their regex; longer tokens are tried first so a token that prefixes another never wins).
No answer found -> `extract_answer` gives None and the item is incorrect.

Text tasks (instruction following: MiniLLM's Dolly, SelfInst, Vicuna, S-NI, UnNI) have free-form
references and are scored by ROUGE-L F1 (`rouge_l`, MiniLLM's rouge_metric.py): the best over an
item's references, 0-100. Each task's metric (`METRICS`) names what `evaluate` reports.

Log-likelihood scoring (`loglik_requests`) follows lm-evaluation-harness instead: each option's
content, not its label, is the continuation, as each task's `Continuations` declares next to its
source (see `Continuations` for where ours differs from lm-eval's task files).
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

DOMAINS = ("math", "commonsense", "instruction")
ANSWER_KINDS = ("number", "letter", "choice", "text")
# What a task's score means, by answer kind (the per-item score is 100 * correct or ROUGE-L F1).
METRICS = {"number": "accuracy", "letter": "accuracy", "choice": "accuracy", "text": "rougeL"}
SUITES = ("paper", "micro")

# How `evaluate` scores an item (one home for the names: the params' `scorer` is one of these).
SCORERS = {
    "generate": "decode, then extract the stated answer (the paper's metric)",
    "loglik": "the option whose content is the most likely continuation (lm-evaluation-harness acc)",
    "loglik_norm": "the same per character of the option (lm-evaluation-harness acc_norm)",
    "loglik_label": "the option whose label token (answer1, true, ...) is the most likely after "
                    "'the correct answer is ': the trained format of an SFT'd model, not its knowledge",
}

# The generation budget (new tokens) of a domain's tasks: a `Task` without its own `max_new_tokens`
# takes its domain's (LLM-Adapters: 256 for math, 32 for commonsense; 256 for instruction following).
# `generation_budget` is how evaluation reads a task's budget; the params' `evaluation.max_new_tokens`
# overrides it per domain.
MAX_NEW_TOKENS = {"math": 256, "commonsense": 32, "instruction": 256}

# A number answer is correct within this distance of the label (LLM-Adapters' evaluate.py); the
# fidelity agreement of two number answers uses the same tolerance.
ANSWER_TOLERANCE = 0.001

# How a reference response states the label (the format of the LLM-Adapters outputs).
ANSWER_FORMATS = {"number": "The answer is {}.", "letter": "The answer is ({}).",
                  "choice": "the correct answer is {}"}

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)

_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_FORMAT_LINE = re.compile(r"Answer format: (\S+)\s*$")
_REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Continuations:
    """How log-likelihood scoring reads a choice item, after an lm-evaluation-harness task file
    (`source`, under lm_eval/tasks/): the context is `context` with the item's question, each
    option's continuation is `delimiter` + its text (`texts`, one per option token, replaces the
    listed texts: BoolQ's yes/no). `partial` is WinoGrande's partial scoring: the option fills the
    blank of the question in the context, and the continuation is the rest of the sentence.
    `preprocess` names a rewrite of question and texts in `PREPROCESSORS`."""

    context: str
    source: str
    delimiter: str = " "
    texts: tuple[str, ...] = ()
    partial: bool = False
    preprocess: str | None = None


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    suite "paper" reads `<data root>/<local_dir>/<test_file>` (the test split; the data root is
    `default_data_root(data_home)` by default), suite "micro" `<study data root>/<local_dir>/<split>.json`.
    A `.jsonl` test file holds one record per line (MiniLLM's format). `hf_dataset` (+ config,
    split, data files, and a named converter from `CONVERTERS`) is the fallback source when no
    local file exists; without a converter the hub records must already be LLM-Adapters items.
    `loglik` declares the log-likelihood scorers' continuations (None: generation scoring only).
    `max_new_tokens` is the task's generation budget (None: its domain's, `MAX_NEW_TOKENS`).
    """

    name: str
    domain: str
    answer_kind: str
    options: tuple[str, ...] = ()
    suite: str = "paper"
    local_dir: str = ""  # defaults to `name`
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "test"
    hf_converter: str | None = None
    hf_files: str | None = None
    data_home: str = "llm_adapters"
    test_file: str = "test.json"
    loglik: Continuations | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"task {self.name!r}: domain {self.domain!r} not in {DOMAINS}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.answer_kind not in ANSWER_KINDS:
            raise ValueError(f"task {self.name!r}: answer_kind {self.answer_kind!r} not in {ANSWER_KINDS}")
        if self.suite not in SUITES:
            raise ValueError(f"task {self.name!r}: suite {self.suite!r} not in {SUITES}")
        if (self.answer_kind in ("letter", "choice")) != bool(self.options):
            raise ValueError(f"task {self.name!r}: {self.answer_kind} tasks "
                             f"{'take no' if self.options else 'need'} options")
        if self.hf_converter is not None and self.hf_converter not in CONVERTERS:
            raise ValueError(f"task {self.name!r}: unknown converter {self.hf_converter!r}; "
                             f"known: {sorted(CONVERTERS)}")
        if self.loglik is not None:
            if self.answer_kind != "choice":
                raise ValueError(f"task {self.name!r}: only choice tasks declare log-likelihood continuations")
            if self.loglik.texts and len(self.loglik.texts) != len(self.options):
                raise ValueError(f"task {self.name!r}: {len(self.loglik.texts)} continuation texts "
                                 f"for {len(self.options)} options")
            if self.loglik.preprocess is not None and self.loglik.preprocess not in PREPROCESSORS:
                raise ValueError(f"task {self.name!r}: unknown preprocess {self.loglik.preprocess!r}; "
                                 f"known: {sorted(PREPROCESSORS)}")
        if not self.local_dir:
            object.__setattr__(self, "local_dir", self.name)
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", MAX_NEW_TOKENS[self.domain])

    @property
    def answer_format(self) -> str:
        return ANSWER_FORMATS[self.answer_kind]

    @property
    def metric(self) -> str:
        return METRICS[self.answer_kind]


# --- Hugging Face converters: hub record -> LLM-Adapters item -------------------------------

def _item(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
            "answer": answer}


def _listed(prefix: str, texts: Iterable[str]) -> tuple[str, str]:
    texts = list(texts)
    listed = " ".join(f"{prefix.capitalize()}{i}: {t}" for i, t in enumerate(texts, 1))
    return listed, "/".join(f"{prefix}{i}" for i in range(1, len(texts) + 1))


def convert_boolq(r: dict) -> dict:
    """google/boolq: question, answer (bool)."""
    return _item(f"Please answer the following question with true or false, question: {r['question']}?"
                 f"\n\nAnswer format: true/false", "true" if r["answer"] else "false")


def convert_hellaswag(r: dict) -> dict:
    """Rowan/hellaswag: activity_label, ctx, endings (4), label ("0"-"3")."""
    listed, fmt = _listed("ending", r["endings"])
    return _item(f"Please choose the correct ending to complete the given sentence: "
                 f"{r['activity_label']}: {r['ctx']}\n\n{listed}\n\nAnswer format: {fmt}",
                 f"ending{int(r['label']) + 1}")


def convert_winogrande(r: dict) -> dict:
    """allenai/winogrande: sentence, option1, option2, answer ("1"/"2")."""
    return _item(f"Please choose the correct answer to fill in the blank to complete the given sentence: "
                 f"{r['sentence']}\n\nOption1: {r['option1']} Option2: {r['option2']} "
                 f"Answer format: option1/option2", f"option{r['answer']}")


def convert_multiple_choice(r: dict) -> dict:
    """allenai/ai2_arc and allenai/openbookqa: question (or question_stem), choices{text,label}, answerKey."""
    question = r["question"] if "question" in r else r["question_stem"]
    listed, fmt = _listed("answer", r["choices"]["text"])
    correct = list(r["choices"]["label"]).index(r["answerKey"]) + 1
    return _item(f"Please choose the correct answer to the question: {question}\n\n{listed}\n\n"
                 f"Answer format: {fmt}", f"answer{correct}")


def convert_minillm(r: dict) -> dict:
    """MiniLLM's instruction sets (MiniLLM/dolly, self-inst, Vicuna, sinst, uinst): instruction,
    input (may be empty), output (one reference or a list), and a pre-rendered prompt, dropped:
    `build_prompt` renders the same Alpaca template."""
    return {k: r[k] for k in ("instruction", "input", "output") if k in r}


CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "boolq": convert_boolq, "hellaswag": convert_hellaswag, "winogrande": convert_winogrande,
    "multiple_choice": convert_multiple_choice, "minillm": convert_minillm,
}


# --- log-likelihood preprocessing: (question, option texts) -> (question, option texts) ----------

def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag/utils.py `preprocess`: WikiHow's [tags] out, as theirs."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a HellaSwag context ctx_a + " " + ctx_b, which is all the items keep:
    ActivityNet contexts (no [tags]) end with ctx_b, the words after their last ". "; WikiHow
    contexts have an empty ctx_b."""
    if "[" in ctx or ". " not in ctx:
        return ctx, ""
    head, tail = ctx.rsplit(". ", 1)
    return head + ".", tail


def preprocess_hellaswag(question: str, texts: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """lm-eval's hellaswag/utils.py: query preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()) (ctx_a and ctx_b from `split_hellaswag_context`), endings preprocessed."""
    label, ctx = question.split(": ", 1)
    ctx_a, ctx_b = split_hellaswag_context(ctx)
    return _hellaswag_clean(f"{label}: {ctx_a} {ctx_b.capitalize()}"), tuple(_hellaswag_clean(t) for t in texts)


PREPROCESSORS: dict[str, Callable[[str, tuple[str, ...]], tuple[str, tuple[str, ...]]]] = {
    "hellaswag": preprocess_hellaswag,
}


# --- the registry -----------------------------------------------------------------------------

def _tokens(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


_ABCDE = ("A", "B", "C", "D", "E")
_TF = ("true", "false")

# lm-evaluation-harness 0.4.13's zero-shot definitions (doc_to_text, doc_to_choice, target_delimiter),
# read on the LLM-Adapters items: question = the instruction's text after its lead-in, texts = the
# options it lists.
# BoolQ: theirs is "{passage}\nQuestion: {question}?\nAnswer:"; the LLM-Adapters items carry no passage.
_BOOLQ = Continuations("Question: {question}\nAnswer:", "super_glue/boolq/default.yaml", texts=("yes", "no"))
_PIQA = Continuations("Question: {question}\nAnswer:", "piqa/piqa.yaml")
_SIQA = Continuations("Q: {question}\nA:", "siqa/siqa.yaml")  # the items' question is "{context} {question}"
_HELLASWAG = Continuations("{question}", "hellaswag/hellaswag.yaml + utils.py", preprocess="hellaswag")
_MICRO_HELLASWAG = Continuations("{question}", "hellaswag/hellaswag.yaml")  # no activity label or [tags] to clean
_WINOGRANDE = Continuations("{question}", "winogrande/preprocess_winogrande.py", partial=True)
_ARC = Continuations("Question: {question}\nAnswer:", "arc/arc_easy.yaml")
_OBQA = Continuations("{question}", "openbookqa/openbookqa.yaml")  # the bare question_stem, no "Answer:"

def _minillm(name: str, hub: str, file: str = "valid.jsonl") -> Task:
    """A MiniLLM instruction test set: `<root>/<name>/<file>` (their evaluate_main.py reads the
    "valid" split; S-NI and UnNI from the 11_ subfolder their eval scripts name), else the same
    file of the hub dataset."""
    return Task(name, "instruction", "text", data_home="minillm", test_file=file,
                hf_dataset=hub, hf_files=file, hf_split="train", hf_converter="minillm")


_ENTRIES = [
    # the paper's 14 zero-shot test sets (LLM-Adapters format)
    Task("gsm8k", "math", "number"),
    Task("SVAMP", "math", "number"),
    Task("MultiArith", "math", "number"),
    Task("SingleEq", "math", "number"),
    Task("AddSub", "math", "number"),
    Task("AQuA", "math", "letter", _ABCDE),
    Task("boolq", "commonsense", "choice", _TF,
         hf_dataset="google/boolq", hf_split="validation", hf_converter="boolq", loglik=_BOOLQ),
    Task("piqa", "commonsense", "choice", _tokens("solution", 2), loglik=_PIQA),
    # answer1-5 for these four: the authors' regex (ARC has 3- to 5-option items)
    Task("social_i_qa", "commonsense", "choice", _tokens("answer", 5), loglik=_SIQA),
    Task("hellaswag", "commonsense", "choice", _tokens("ending", 4),
         hf_dataset="Rowan/hellaswag", hf_split="validation", hf_converter="hellaswag", loglik=_HELLASWAG),
    Task("winogrande", "commonsense", "choice", _tokens("option", 2),
         hf_dataset="allenai/winogrande", hf_config="winogrande_xl", hf_split="validation",
         hf_converter="winogrande", loglik=_WINOGRANDE),
    Task("ARC-Easy", "commonsense", "choice", _tokens("answer", 5),
         hf_dataset="allenai/ai2_arc", hf_config="ARC-Easy", hf_converter="multiple_choice", loglik=_ARC),
    Task("ARC-Challenge", "commonsense", "choice", _tokens("answer", 5),
         hf_dataset="allenai/ai2_arc", hf_config="ARC-Challenge", hf_converter="multiple_choice", loglik=_ARC),
    Task("openbookqa", "commonsense", "choice", _tokens("answer", 5),
         hf_dataset="allenai/openbookqa", hf_config="main", hf_converter="multiple_choice", loglik=_OBQA),
    # the micro world of the CPU study: the one list of its tasks (kd_utils.microworld's gen_<x> writes micro_<x>)
    *(Task(f"micro_{n}", "math", "number", suite="micro")
      for n in ("addsub", "singleeq", "multiarith", "svamp", "gsm", "aqua", "mawps")),
    Task("micro_boolq", "commonsense", "choice", _TF, suite="micro", loglik=_BOOLQ),
    Task("micro_piqa", "commonsense", "choice", _tokens("solution", 2), suite="micro", loglik=_PIQA),
    Task("micro_siqa", "commonsense", "choice", _tokens("answer", 3), suite="micro", loglik=_SIQA),
    Task("micro_hellaswag", "commonsense", "choice", _tokens("ending", 4), suite="micro", loglik=_MICRO_HELLASWAG),
    Task("micro_winogrande", "commonsense", "choice", _tokens("option", 2), suite="micro", loglik=_WINOGRANDE),
    Task("micro_arc", "commonsense", "choice", _tokens("answer", 4), suite="micro", loglik=_ARC),
    Task("micro_obqa", "commonsense", "choice", _tokens("answer", 5), suite="micro", loglik=_OBQA),
    Task("micro_instruct", "instruction", "text", suite="micro"),
    # instruction following: MiniLLM's test sets, each downloaded into <root>/<task name>
    # (huggingface-cli download MiniLLM/<set> --repo-type dataset --local-dir <root>/<name>)
    *(_minillm(*spec) for spec in (("dolly", "MiniLLM/dolly"), ("self_inst", "MiniLLM/self-inst"),
                                   ("vicuna", "MiniLLM/Vicuna"), ("sinst", "MiniLLM/sinst", "11_/valid.jsonl"),
                                   ("uinst", "MiniLLM/uinst", "11_/valid.jsonl"))),
]
TASKS: dict[str, Task] = {t.name: t for t in _ENTRIES}
# The metric of each domain's scores (gains are in its points); a domain has one metric.
DOMAIN_METRICS: dict[str, str] = {t.domain: t.metric for t in _ENTRIES}
assert all(t.metric == DOMAIN_METRICS[t.domain] for t in _ENTRIES), "a domain mixes metrics"


# The domains a suite's own group ("paper", "micro") holds: the paper's reasoning study. Instruction
# following trains on other data (Dolly), so its tasks are only in "<suite>_instruction".
SUITE_DOMAINS = ("math", "commonsense")


def _groups(tasks: dict[str, Task]) -> dict[str, tuple[str, ...]]:
    groups: dict[str, list[str]] = {}
    for t in tasks.values():
        for key in ((t.suite,) if t.domain in SUITE_DOMAINS else ()) + (f"{t.suite}_{t.domain}",):
            groups.setdefault(key, []).append(t.name)
    return {k: tuple(v) for k, v in groups.items()}


GROUPS: dict[str, tuple[str, ...]] = _groups(TASKS)


def _unknown(name: str) -> ValueError:
    known = {k.lower(): k for k in [*TASKS, *GROUPS]}
    close = [known[k] for k in difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown task or group {name!r}{hint} (groups: {', '.join(sorted(GROUPS))})")


def get_task(task: Task | str) -> Task:
    """A task by name (a `Task` passes through); unknown names raise with a suggestion."""
    if isinstance(task, Task):
        return task
    if task in GROUPS:
        raise ValueError(f"{task!r} is a group of tasks {GROUPS[task]}, not one task")
    if task not in TASKS:
        raise _unknown(task)
    return TASKS[task]


def resolve_tasks(names: str | Task | Iterable[str | Task]) -> list[Task]:
    """Task names, group names and `Task`s -> tasks (in order, without repeats)."""
    if isinstance(names, (str, Task)):
        names = [names]
    out: dict[str, Task] = {}
    for name in names:
        if isinstance(name, Task):
            out.setdefault(name.name, name)
        elif name in GROUPS:
            out.update((n, TASKS[n]) for n in GROUPS[name] if n not in out)
        elif name in TASKS:
            out.setdefault(name, TASKS[name])
        else:
            raise _unknown(name)
    if not out:
        raise ValueError("no task given")
    return list(out.values())


def generation_budget(task: Task | str, max_new_tokens: int | Mapping[str, int] | None = None) -> int:
    """How many new tokens `task` is decoded with: `max_new_tokens` as an int (every task), as a dict
    per domain (an entry overrides the task's budget for its domain's tasks; a domain not named keeps
    them), or None: the task's own `Task.max_new_tokens` (its domain's `MAX_NEW_TOKENS` unless it
    declares one). The params' `evaluation.max_new_tokens` is such a dict."""
    task = get_task(task)
    if isinstance(max_new_tokens, Mapping):
        return int(max_new_tokens.get(task.domain, task.max_new_tokens))
    return int(max_new_tokens or task.max_new_tokens)


# --- data -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSet:
    """A named training set (`training.train_data: <name>`): `<data root>/<local_dir>/<file>`, else
    that file of the hub dataset; the first `held_out` records are left out (the source's own
    validation split)."""

    name: str
    local_dir: str
    file: str
    data_home: str
    hf_dataset: str
    hf_converter: str
    held_out: int = 0


# MiniLLM's Dolly-15K: raw.jsonl, whose first 1000 records their process_data_dolly.sh (--dev-num 1000)
# keeps for validation; the test set is the separate valid.jsonl (task "dolly").
TRAIN_SETS: dict[str, TrainSet] = {s.name: s for s in [
    TrainSet("dolly", "dolly", "raw.jsonl", "minillm", "MiniLLM/dolly", "minillm", held_out=1000),
]}


def default_data_root(data_home: str = "llm_adapters") -> Path:
    """Where the shared test sets of a collection live: $KD_DATA_ROOT, else
    $KD_SHARED_DIR/data/<data_home>, else ../shared/data/<data_home> beside the repository
    (LLM-Adapters' sets in llm_adapters, MiniLLM's in minillm; the path may not exist)."""
    if os.environ.get("KD_DATA_ROOT"):
        return Path(os.environ["KD_DATA_ROOT"])
    shared = Path(os.environ.get("KD_SHARED_DIR") or _REPO.parent / "shared")
    return shared / "data" / data_home


def local_test_file(task: Task | str, data_root: str | Path | None = None) -> Path:
    """The file the task's test items are read from when it exists (else the hub is tried)."""
    task = get_task(task)
    root = Path(data_root) if data_root is not None else default_data_root(task.data_home)
    return root / task.local_dir / (task.test_file if task.suite == "paper" else "test.json")


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) of a JSON list (where = "file: item i") or a JSONL file ("file:line")."""
    if path.suffix != ".jsonl":
        return [(f"{path}: item {i}", r) for i, r in enumerate(_read_json(path))]
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
    return out


def _load_hub(dataset: str, config: str | None, split: str, files: str | None, what: str, hint: str) -> list:
    from datasets import load_dataset  # heavy import, only on this path

    try:
        return load_dataset(dataset, config, split=split, **({"data_files": files} if files else {}))
    except Exception as e:  # offline, missing dataset, bad config: all surface the same way
        raise FileNotFoundError(
            f"{what}: no local data and the hub dataset {dataset!r} (config {config!r}, split {split!r}, "
            f"files {files!r}) could not be loaded ({type(e).__name__}: {e}); {hint}") from e


def _from_hub(task: Task) -> list[tuple[str, dict]]:
    records = _load_hub(task.hf_dataset, task.hf_config, task.hf_split, task.hf_files, f"task {task.name!r}",
                        f"pass data_root= a folder with {task.local_dir}/{task.test_file} or set KD_DATA_ROOT")
    convert = CONVERTERS[task.hf_converter] if task.hf_converter else dict
    return [(f"{task.hf_dataset}: record {i}", convert(r)) for i, r in enumerate(records)]


def references(record: dict, where: str) -> list[str]:
    """The reference responses of a text item: its output, one string or a list (MiniLLM's
    format); a missing or empty one raises, naming `where`."""
    if "output" not in record:
        raise ValueError(f"{where} lacks ['output'] (the reference response)")
    refs = record["output"] if isinstance(record["output"], list) else [record["output"]]
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise ValueError(f"{where}: empty reference output {record['output']!r}")
    return refs


def _task_item(task: Task, i: int, where: str, r: dict) -> dict:
    required = ("instruction",) if task.answer_kind == "text" else ("instruction", "answer")
    missing = [k for k in required if not isinstance(r, dict) or k not in r]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    item = {"id": i, "instruction": r["instruction"], "input": r.get("input") or ""}
    if task.answer_kind == "text":
        refs = references(r, where)
        return {**item, "output": refs[0], "answer": refs[0], "references": refs}
    return {**item, "output": r.get("output", ""), "answer": str(r["answer"])}


def load_items(task: Task | str, data_root: str | Path | None = None, split: str = "test",
               limit: int | None = None) -> list[dict]:
    """Items of a task: dicts with id (index in the file), instruction, input, output, answer,
    and for text tasks references (all reference responses; output and answer are the first).

    data_root None: paper tasks use `default_data_root(task.data_home)`, then the task's hub
    dataset (test split only); micro tasks need the study's data root.
    """
    task = get_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    if data_root is None and task.suite == "micro":
        raise ValueError(f"micro task {task.name!r} needs data_root (the study's data folder)")
    path = local_test_file(task, data_root)
    if split != "test":
        path = path.parent / f"{split}.json"
    if path.is_file():
        raw = _records(path)
    elif data_root is None and task.hf_dataset and split == "test":
        raw = _from_hub(task)
    else:
        raise FileNotFoundError(f"task {task.name!r}: {path} does not exist")
    return [_task_item(task, i, where, r) for i, (where, r) in enumerate(raw[:limit])]


def load_training_items(train_tasks, train_data: str | None = None, data_root: str | Path | None = None,
                        limit: int | None = None) -> list[dict]:
    """Training items (instruction, input, output) of `train_data` when given: a named set
    (`TRAIN_SETS`: dolly), an LLM-Adapters JSON file (Math10K, Commonsense15K), a JSONL file in
    MiniLLM's format, or a hub dataset id with instruction/input/output columns; else the training
    splits of the named tasks. `limit` keeps the first items of each task (or of the data)."""
    if train_data:
        return _read_training_data(train_data, data_root)[:limit]
    return [it for task in resolve_tasks(train_tasks) for it in load_items(task, data_root, split="train", limit=limit)]


def training_data_file(train_data: str, data_root: str | Path | None = None) -> Path:
    """The local file `train_data` names (a path, or where a named set is looked for first)."""
    if train_data in TRAIN_SETS:
        ts = TRAIN_SETS[train_data]
        root = Path(data_root) if data_root is not None else default_data_root(ts.data_home)
        return root / ts.local_dir / ts.file
    return Path(train_data)


def _training_item(where: str, r: dict) -> dict:
    missing = [k for k in ("instruction", "output") if not isinstance(r, dict) or k not in r]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    return {**r, "input": r.get("input") or "", "output": references(r, where)[0]}


def _read_training_data(train_data: str, data_root: str | Path | None = None) -> list[dict]:
    path = training_data_file(train_data, data_root)
    named = TRAIN_SETS.get(train_data)
    if path.is_file():
        records = _records(path)
    elif named is not None:
        rows = _load_hub(named.hf_dataset, None, "train", named.file, f"training data {train_data!r}",
                         f"put MiniLLM's {named.file} at {path}")
        records = [(f"{named.hf_dataset}/{named.file}: record {i}", CONVERTERS[named.hf_converter](r))
                   for i, r in enumerate(rows)]
    elif path.suffix in (".json", ".jsonl") or path.exists():
        raise FileNotFoundError(f"training data file {train_data!r} does not exist")
    else:
        from datasets import load_dataset

        try:
            rows = load_dataset(train_data, split="train")
        except Exception as err:  # datasets raises several types for a missing/unreachable dataset
            raise FileNotFoundError(f"training data {train_data!r} is neither a local JSON file, a named set "
                                    f"{sorted(TRAIN_SETS)}, nor a loadable hub dataset ({err.__class__.__name__}); "
                                    "give a local LLM-Adapters JSON path") from err
        missing = {"instruction", "output"} - set(rows.column_names)
        if missing:
            raise ValueError(f"hub dataset {train_data!r} lacks columns {sorted(missing)}")
        records = [(f"{train_data}: record {i}", r) for i, r in enumerate(rows)]
    if named is not None:
        records = records[named.held_out:]
    return [_training_item(where, r) for where, r in records]


# --- prompts and reference responses ------------------------------------------------------------

def build_prompt(instruction: str, input: str = "") -> str:
    """The LLM-Adapters prompt (dedented `generate_prompt`); the response follows its final newline."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def training_pairs(items: Iterable[dict]) -> tuple[list[str], list[str]]:
    """(prompts, target responses) of training items, as the study trains on them: `build_prompt` of
    each item's instruction and input, and its reference output as it stands."""
    items = list(items)
    return [build_prompt(it["instruction"], it.get("input", "")) for it in items], [it["output"] for it in items]


def format_answer(task: Task, label: str) -> str:
    """A response stating `label` the way the reference outputs do ("The answer is 576.")."""
    if task.answer_kind == "number":
        value = _label_value(task, label)
        label = str(int(value)) if value.is_integer() else label.strip()
    return task.answer_format.format(label)


def item_options(task: Task, item: dict) -> tuple[str, ...]:
    """The option tokens of one item: its "Answer format: a/b/c" line when present, else the task's."""
    if task.answer_kind == "number":
        raise ValueError(f"task {task.name!r} has numeric answers, not options")
    m = _ANSWER_FORMAT_LINE.search(item["instruction"])
    if m:
        listed = tuple(m.group(1).split("/"))
        if not set(listed) <= set(task.options):
            raise ValueError(f"task {task.name!r} item {item.get('id')}: answer format {listed} "
                             f"is not within the task's options {task.options}")
        return listed
    return task.options


# --- log-likelihood requests ------------------------------------------------------------------------

class LoglikRequest(NamedTuple):
    """One option of an item: the context, the continuation scored after it, and the option's
    text as lm-eval's doc_to_choice gives it (acc_norm divides by its length in characters)."""

    context: str
    continuation: str
    choice: str


def _cut(text: str, end: int, seps: tuple[str, ...]) -> str:
    """text[:end] without the one separator that ends it."""
    span = text[:end]
    return next((span[:-len(s)] for s in seps if span.endswith(s)), span)


def _listed_after_label(body: str, labels: tuple[str, ...]) -> tuple[str, list[str]]:
    """LLM-Adapters: "question\n\nAnswer1: text Answer2: text\n\nAnswer format: ..." (PIQA's
    options are separated by blank lines, WinoGrande's "Answer format" follows on the same line)."""
    marks = [f"{label.capitalize()}: " for label in labels]
    starts, at = [], 0
    for mark in marks:
        at = body.find(mark, at)
        if at < 0:
            raise ValueError(f"option marker {mark!r} not found")
        starts.append(at)
        at += len(mark)
    ends = starts[1:] + [body.rindex("Answer format:")]
    texts = [_cut(body[s + len(m):], e - s - len(m), ("\n\n", " ")) for s, e, m in zip(starts, ends, marks)]
    return _cut(body, starts[0], ("\n\n",)), texts


def _listed_before_label(body: str, labels: tuple[str, ...]) -> tuple[str, list[str]]:
    """The micro world (microworld._choice): "question\n\ntext (answer1), text (answer2)\n\nAnswer format: ..."."""
    question, _, listed = body.partition("\n\n")
    texts, at = [], 0
    for label in labels:
        end = listed.find(f" ({label})", at)
        if end < 0:
            raise ValueError(f"option ({label}) not found")
        texts.append(listed[at:end].lstrip(", \n"))
        at = end + len(label) + 3
    return question, texts


# How each suite's items list their options.
LISTINGS: dict[str, Callable[[str, tuple[str, ...]], tuple[str, list[str]]]] = {
    "paper": _listed_after_label, "micro": _listed_before_label,
}


def option_texts(task: Task | str, item: dict) -> tuple[str, tuple[str, ...]]:
    """The question an item asks (its instruction after the lead-in, up to the options) and the
    texts of its options (in `item_options` order; none listed for true/false items)."""
    task = get_task(task)
    labels = item_options(task, item)
    lead, blank, rest = item["instruction"].partition("\n\n")  # the lead-in ends at the first paragraph's ": "
    body = lead.split(": ", 1)[-1] + blank + rest
    if task.options == _TF:
        return _cut(body, body.rindex("Answer format:"), ("\n\n",)), ()
    try:
        question, texts = LISTINGS[task.suite](body, labels)
    except ValueError as e:
        raise ValueError(f"task {task.name!r} item {item.get('id')}: {e} in its instruction") from None
    return question, tuple(texts)


def loglik_requests(task: Task | str, item: dict) -> list[LoglikRequest]:
    """One request per option of the item (`item_options` order), as `task.loglik` declares."""
    task = get_task(task)
    spec = task.loglik
    if spec is None:
        raise ValueError(f"task {task.name!r} declares no log-likelihood continuations: "
                         f"score it with scorer='generate'")
    question, texts = option_texts(task, item)
    if spec.texts:
        texts = tuple(dict(zip(task.options, spec.texts))[label] for label in item_options(task, item))
    if spec.preprocess:
        question, texts = PREPROCESSORS[spec.preprocess](question, texts)
    if spec.partial:  # lm-eval winogrande: contexts sentence[:blank] + option, target the rest, stripped
        blank = question.index("_")
        rest = spec.delimiter + question[blank + 1:].strip()
        return [LoglikRequest(spec.context.format(question=question[:blank] + t), rest, question[:blank] + t)
                for t in texts]
    context = spec.context.format(question=question)
    return [LoglikRequest(context, spec.delimiter + t, t) for t in texts]


def can_score(task: Task | str, scorer: str) -> bool:
    """Whether `scorer` (one of `SCORERS`) applies to `task`: log-likelihood scoring needs options,
    and for loglik/loglik_norm declared continuations."""
    task = get_task(task)
    if scorer in ("loglik", "loglik_norm"):
        return task.loglik is not None
    return scorer == "generate" or bool(task.options)


# --- scoring ------------------------------------------------------------------------------------

def _label_value(task: Task, label: str) -> float:
    try:
        return float(str(label).replace(",", ""))
    except ValueError:
        raise ValueError(f"task {task.name!r}: label {label!r} is not a number") from None


def _option_regex(options: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(o) for o in sorted(options, key=len, reverse=True)))


def extract_answer(task: Task | str, text: str) -> str | None:
    """The answer a model output states (see the module docstring), or None (always for text
    tasks: a free-form response is scored whole, by `item_score`)."""
    task = get_task(task)
    text = (text or "").strip()
    if task.answer_kind == "text":
        return None
    if task.answer_kind == "number":
        found = _NUMBER.findall(text.replace(",", ""))
        return found[-1].rstrip(".") if found else None  # "5." (sentence end) -> "5"
    m = _option_regex(task.options).search(text)
    return m.group(0) if m else None


def is_correct(task: Task | str, text: str, label: str) -> bool:
    """Whether the model output `text` states the gold `label` (for text tasks: matches the
    reference `label` in every ROUGE-L token, F1 100)."""
    task = get_task(task)
    if task.answer_kind == "text":
        return rouge_l(text, label) == 100.0
    pred = extract_answer(task, text)
    if pred is None:
        return False
    if task.answer_kind == "number":
        return abs(float(pred) - _label_value(task, label)) <= ANSWER_TOLERANCE
    return pred == str(label).strip()


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imports nltk: only when text is scored

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, refs: str | Sequence[str]) -> float:
    """ROUGE-L F1 (0-100) of `prediction` against the best of `refs`, as MiniLLM's rouge_metric.py:
    Google's rouge-score, rougeL, Porter stemmer, its default tokenizer (lowercase, every run of
    characters other than a-z and 0-9 is a separator, so non-ASCII letters are dropped). An empty
    prediction or reference scores 0."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(target=r, prediction=prediction or "")["rougeL"].fmeasure for r in refs)


def item_score(task: Task | str, text: str, item: dict) -> float:
    """The score of one output on one item (0-100): ROUGE-L for text tasks, else 100 * correct."""
    task = get_task(task)
    if task.answer_kind == "text":
        return rouge_l(text, item["references"])
    return 100.0 * is_correct(task, text, item["answer"])
