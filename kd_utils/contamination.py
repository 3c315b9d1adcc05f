"""Train/test contamination: how many of each evaluation task's test items appear in the
training data, matched on the normalized instruction (and input), before any compute.

Normalization: Unicode NFKC, lower case, every run of whitespace and sentence punctuation
(.,;:!?, quotes, brackets) collapsed to one space; arithmetic signs (+ - * / =) are kept, since
"x + 3 = 8" and "x - 3 = 8" are different problems.
A test item counts as contaminated when its normalized instruction+input equals a training
item's. The authors' `math_data.json` (about 80% test items of the six math sets) and the public
MAWPS training split (most of AddSub, SingleEq and MultiArith) are the known traps.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable

import pandas as pd

from .tasks import load_items, local_test_file, resolve_tasks

COLUMNS = ["task", "n_test", "n_overlap", "share"]
_NON_WORD = re.compile(r"[\s.,;:!?\"'`()\[\]{}]+")


def normalize(instruction: str, input: str = "") -> str:
    """The text two items are matched on."""
    text = unicodedata.normalize("NFKC", f"{instruction} {input}").lower()
    return _NON_WORD.sub(" ", text).strip()


def overlap_table(train_items: Iterable[dict], test_items: dict[str, list[dict]]) -> pd.DataFrame:
    """Per task: test items, how many also appear in the training items, and their share."""
    seen = {normalize(it["instruction"], it.get("input") or "") for it in train_items}
    rows = []
    for task, items in test_items.items():
        hits = sum(normalize(it["instruction"], it.get("input") or "") in seen for it in items)
        rows.append({"task": task, "n_test": len(items), "n_overlap": hits, "share": hits / max(len(items), 1)})
    return pd.DataFrame(rows, columns=COLUMNS)


def task_overlap(train_items: list[dict], tasks, data_root=None) -> pd.DataFrame:
    """:func:`overlap_table` against every test item of the named tasks that has a local test file
    (the check never downloads; a task without one is left out)."""
    local = [t for t in resolve_tasks(tasks) if local_test_file(t, data_root).is_file()]
    return overlap_table(train_items, {t.name: load_items(t, data_root) for t in local})


def refuse_above(table: pd.DataFrame, max_share: float, allow: bool, source: str) -> None:
    """Raise when a task's overlap share exceeds `max_share`, unless `allow`."""
    over = table[table["share"] > max_share]
    if len(over) and not allow:
        listed = ", ".join(f"{r.task} {r.n_overlap}/{r.n_test} ({100 * r.share:.1f}%)" for r in over.itertuples())
        raise ValueError(f"training data {source} contains test items of {listed}, above "
                         f"training.contamination.max_share={max_share:g}; use other training data, or set "
                         "training.contamination.allow: true to run anyway (the overlap is reported)")


def describe(table: pd.DataFrame) -> str:
    """One line for `plan` and `run`."""
    hit = table[table["n_overlap"] > 0]
    if hit.empty:
        return f"contamination: no test item of the {len(table)} evaluation tasks is in the training data"
    return "contamination: test items in the training data: " + ", ".join(
        f"{r.task} {r.n_overlap}/{r.n_test}" for r in hit.itertuples())
