"""Teacher-student fidelity: answer agreement and rationale similarity from saved
predictions, and distribution fidelity (top-1 agreement, forward KL) from the models.

Predictions are JSONL files, one per evaluated model, one line per item with fields task,
item_id, prompt_hash, output (raw generated text), extracted (str or null), label, correct.
Student and teacher items are matched by (task, item_id) and must carry the same prompt_hash.
Items of text tasks (instruction following) have a null ``correct`` and ``extracted``: there is no
answer to agree on, so their agreement is NaN and their fidelity is the similarity of the outputs
(BLEU, chrF, ROUGE-L).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import sacrebleu
import torch

from kd_utils.evaluation import check_predictions, load_predictions
from kd_utils.losses import kd_loss
from kd_utils.schema import FIDELITY_COLUMNS
from kd_utils.tasks import ANSWER_TOLERANCE, rouge_l

__all__ = [
    "agreement",
    "distribution_fidelity",
    "fidelity_table",
    "rationale_similarity",
    "same_answer",
]

Predictions = pd.DataFrame | str | Path


def _as_predictions(preds: Predictions, name: str) -> pd.DataFrame:
    """A model's predictions, validated: a frame as given, else its predictions.jsonl (or folder)."""
    if isinstance(preds, pd.DataFrame):
        return check_predictions(preds, name)
    return load_predictions(preds)


def _paired(student_preds: Predictions, teacher_preds: Predictions) -> pd.DataFrame:
    """Items of both models, matched by (task, item_id): columns *_s (student), *_t (teacher).
    Items present for one model only are left out (warned); a prompt_hash mismatch raises."""
    s = _as_predictions(student_preds, "student")
    t = _as_predictions(teacher_preds, "teacher")
    both = s.merge(t, on=["task", "item_id"], suffixes=("_s", "_t"), how="inner")
    if both.empty:
        raise ValueError("student and teacher predictions share no (task, item_id)")
    if len(both) < max(len(s), len(t)):
        warnings.warn(f"only {len(both)} items are common to the student ({len(s)}) and the "
                      f"teacher ({len(t)}); fidelity uses those", stacklevel=3)
    bad = both["prompt_hash_s"] != both["prompt_hash_t"]
    if bad.any():
        first = both.loc[bad, ["task", "item_id"]].iloc[0].tolist()
        raise ValueError(f"{int(bad.sum())} items have different prompt_hash for student and "
                         f"teacher (e.g. {first}): they were evaluated on different prompts")
    return both


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def same_answer(a: object, b: object, tol: float = ANSWER_TOLERANCE) -> bool:
    """Whether two extracted answers agree: numbers within ``tol`` (commas ignored, as the
    task scoring), other strings equal after strip. A null answer agrees with nothing, another
    null included: two failed extractions are no evidence the models reason alike."""
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (
            isinstance(b, float) and math.isnan(b)):
        return False
    a, b = str(a).strip(), str(b).strip()
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return abs(x - y) <= tol
    return a == b


def _percent(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.astype(float).mean() * 100.0) if len(values) else float("nan")


def agreement(student_preds: Predictions, teacher_preds: Predictions) -> pd.DataFrame:
    """Per task, the share (percent) of items where student and teacher extracted the same
    answer (:func:`same_answer`), overall and on the items the teacher got right / wrong
    (NaN when there are none, and for text tasks, whose items have no answer), with the item
    counts n, n_teacher_correct, n_teacher_wrong."""
    both = _paired(student_preds, teacher_preds)
    answered = both["correct_t"].notna()
    both["agree"] = [same_answer(a, b) if k else None
                     for a, b, k in zip(both["extracted_s"], both["extracted_t"], answered)]
    both["agree"] = both["agree"].astype("boolean")
    rows = []
    for task, d in both.groupby("task", sort=True):
        right, wrong = d[d["correct_t"].fillna(False)], d[~d["correct_t"].fillna(True)]
        rows.append(dict(task=task, agreement=_percent(d["agree"]),
                         agreement_teacher_correct=_percent(right["agree"]),
                         agreement_teacher_wrong=_percent(wrong["agree"]), n=len(d),
                         n_teacher_correct=len(right), n_teacher_wrong=len(wrong)))
    return pd.DataFrame(rows)


def rationale_similarity(student_preds: Predictions, teacher_preds: Predictions) -> pd.DataFrame:
    """Per task, similarity (0-100) of the student's raw output to the teacher's output as the
    reference: corpus BLEU (``bleu``), corpus chrF (``chrf``, both sacrebleu) and mean ROUGE-L F1
    (``rougeL``, :func:`kd_utils.tasks.rouge_l`), with n. Null outputs count as "". Per-item sentence
    BLEU is in the side-by-side view of :mod:`kd_utils.explore`."""
    both = _paired(student_preds, teacher_preds)
    rows = []
    for task, d in both.groupby("task", sort=True):
        hyp = d["output_s"].fillna("").astype(str).tolist()
        ref = d["output_t"].fillna("").astype(str).tolist()
        rows.append(dict(task=task, bleu=sacrebleu.corpus_bleu(hyp, [ref]).score,
                         chrf=sacrebleu.corpus_chrf(hyp, [ref]).score,
                         rougeL=sum(map(rouge_l, hyp, ref)) / len(hyp), n=len(d)))
    return pd.DataFrame(rows)


def fidelity_table(pred_files: Mapping[str, str | Path],
                   pairs: Iterable[tuple[str, str]]) -> pd.DataFrame:
    """fidelity.csv: one row per (model, teacher, task) for each (model, teacher) pair, with
    agreement (overall, teacher right, teacher wrong), corpus BLEU, chrF, ROUGE-L and n."""
    pairs = list(pairs)
    unknown = sorted({m for pair in pairs for m in pair if m not in pred_files})
    if unknown:
        raise ValueError(f"no predictions file for models {unknown}")
    cache: dict[str, pd.DataFrame] = {}

    def preds(model: str) -> pd.DataFrame:
        if model not in cache:
            cache[model] = load_predictions(pred_files[model])
        return cache[model]

    parts = []
    for model, teacher in pairs:
        agree = agreement(preds(model), preds(teacher))
        sim = rationale_similarity(preds(model), preds(teacher))[["task", "bleu", "chrf", "rougeL"]]
        parts.append(agree.merge(sim, on="task").assign(model=model, teacher=teacher))
    if not parts:
        return pd.DataFrame(columns=FIDELITY_COLUMNS)
    return pd.concat(parts, ignore_index=True)[FIDELITY_COLUMNS]


_MASK_KEYS = ("labels", "attention_mask")


@torch.no_grad()
def distribution_fidelity(student: torch.nn.Module, teacher: torch.nn.Module,
                          batches: Iterable[Mapping[str, torch.Tensor]],
                          mask_key: str = "labels") -> dict[str, float | int]:
    """Token-level fidelity of a causal LM student to its teacher on held-out batches (dicts
    with input_ids, attention_mask, labels; -100 marks ignored label positions).

    The next-token distributions at positions 0..T-2 are compared where the predicted token
    counts: ``labels[:, 1:] != -100`` (``mask_key="labels"``) or ``attention_mask[:, 1:]``
    (``mask_key="attention_mask"``). Returns top1_agreement (fraction of those positions
    where both argmax tokens agree), kl (mean forward KL(P_T || P_S) in nats per token, via
    ``kd_loss(objective="fkl", temperature=1)``) and n_tokens. Both models run in eval mode;
    their training flags are restored afterwards.
    """
    if mask_key not in _MASK_KEYS:
        raise ValueError(f"unknown mask_key {mask_key!r}; use one of {_MASK_KEYS}")
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    agree, kl_sum, n_tokens = 0, 0.0, 0
    try:
        for i, batch in enumerate(batches):
            missing = [k for k in ("input_ids", "attention_mask", mask_key) if k not in batch]
            if missing:
                raise ValueError(f"batch {i} is missing keys {missing}")
            ids, attn = batch["input_ids"], batch["attention_mask"]
            s_logits = student(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            t_logits = teacher(input_ids=ids.to(teacher_device),
                               attention_mask=attn.to(teacher_device)).logits.to(device)
            if s_logits.shape != t_logits.shape:
                raise ValueError(f"student logits {tuple(s_logits.shape)} and teacher logits "
                                 f"{tuple(t_logits.shape)} differ (vocabularies must match)")
            key = batch[mask_key].to(device)[:, 1:]
            mask = key != -100 if mask_key == "labels" else key != 0
            s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
            agree += int(((s_logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum())
            kl_sum += float(kd_loss(s_logits, t_logits, mask=mask, objective="fkl",
                                    temperature=1.0, reduction="sum"))
            n_tokens += int(mask.sum())
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    if n_tokens == 0:
        raise ValueError("no target positions in the batches (all masked)")
    return {"top1_agreement": agree / n_tokens, "kl": kl_sum / n_tokens, "n_tokens": n_tokens}
