"""The columns of the tables the modules hand each other, one home for each list.

Every table of the study is a DataFrame or a CSV; the modules that write a table and those that
read it take its columns from here. Imports nothing heavy (no torch, no pandas): the task
registry only, for the scorer names.
"""
from __future__ import annotations

from collections.abc import Iterable

from .tasks import SCORERS

#: Task name of the per-domain macro-average rows (the authors' "Average" column).
AVERAGE = "Average"

# --------------------------------------------------------------------------- one evaluation
#: The per-task table of one evaluation (`evaluate`'s return, a cell's accuracy.csv). `accuracy`
#: holds the task's metric (`metric`: accuracy, or rougeL for text tasks; `correct` is empty then).
TASK_SCORE_COLUMNS = ("task", "domain", "scorer", "metric", "n", "correct", "accuracy", "ci_low", "ci_high",
                      "truncated")

# --------------------------------------------------------------------------- results.csv
#: An evaluated model and the configuration that made it: the leading columns of results.csv.
MODEL_COLUMNS = ("model", "kind", "student", "teacher", "method", "temperature", "noise", "teacher_kind", "seed")

#: results.csv, one row per model and task. accuracy (and its interval) is the study's main
#: scorer's, named in `scorer`; accuracy_<name> holds each scorer's that the evaluation ran
#: (evaluation.scorer and extra_scorers), empty otherwise. Cells evaluated before the scorer was
#: recorded in their metrics used the default, generate. `metric` names what accuracy (and every
#: gain computed from it) measures for the row's task: accuracy, or rougeL (ROUGE-L F1, the
#: instruction domain); cells evaluated before it was recorded measured accuracy.
RESULT_COLUMNS = [*MODEL_COLUMNS, "task", "domain", "n", "scorer", "metric", "accuracy", "ci_low", "ci_high",
                  "student_params", "teacher_params", "cell_id", *(f"accuracy_{s}" for s in SCORERS)]

#: The results columns a gain table reads: all but the bookkeeping (sample size, interval, scorer
#: names and per-scorer accuracies, cell id), which the authors' published tables lack.
_BOOKKEEPING = ("n", "scorer", "metric", "ci_low", "ci_high", "cell_id")
GAIN_INPUT_COLUMNS = tuple(c for c in RESULT_COLUMNS if c not in _BOOKKEEPING and not c.startswith("accuracy_"))

# --------------------------------------------------------------------------- fidelity.csv
#: What one fidelity row compares: a student model, its teacher, a task.
FIDELITY_KEYS = ("model", "teacher", "task")

#: fidelity.csv, one row per student model, teacher and task.
FIDELITY_COLUMNS = [*FIDELITY_KEYS, "agreement", "agreement_teacher_correct", "agreement_teacher_wrong",
                    "bleu", "chrf", "rougeL", "n"]

#: The fidelity columns a gain table carries: answer agreement and rationale BLEU (the only two
#: the authors published).
GAIN_FIDELITY_COLUMNS = (*FIDELITY_KEYS, "agreement", "bleu")

# --------------------------------------------------------------------------- gains, hypotheses
#: The configuration of a gain row (the temperature is aggregated away).
GAIN_KEYS = ["teacher", "student", "method", "noise", "teacher_kind", "seed", "task", "domain"]

#: Columns of every hypothesis table.
HYPOTHESIS_COLUMNS = [
    "hypothesis", "method", "task", "domain", "test", "statistic", "p_value", "n",
    "estimate", "ci_low", "ci_high", "effect", "effect_name", "p_holm", "p_bh", "p_holm_pairs",
]


def require_columns(table, columns: Iterable[str], what: str) -> None:
    """Raise ValueError naming the ``columns`` that ``table`` (a DataFrame) lacks."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}")
