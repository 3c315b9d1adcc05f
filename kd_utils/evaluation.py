"""Zero-shot evaluation: batched decoding, multiple-choice log-likelihood, per-task accuracy.

Prompts are `tasks.build_prompt(instruction, input)`; outputs are scored with
`tasks.is_correct` (the LLM-Adapters extraction rules). Decoding is exactly what the
arguments say: sampling knobs, top-k and repetition penalty are passed explicitly, so a
checkpoint's own generation defaults (e.g. top_k=20, repetition_penalty=1.05) never leak in.
Note: LLM-Adapters decoded with num_beams=4 (do_sample unset, so beam search); the default
here is greedy, `num_beams=4` reproduces theirs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Mapping, Iterator, Sequence

import pandas as pd
import torch
from statsmodels.stats.proportion import proportion_confint
from tqdm import tqdm

from kd_utils.tasks import (MAX_NEW_TOKENS, Task, build_prompt, extract_answer, format_answer,
                            is_correct, item_options, load_items, resolve_tasks)

SCORERS = ("generate", "loglik", "loglik_norm")
PREDICTION_FIELDS = ("task", "item_id", "prompt_hash", "output", "extracted", "label", "correct")
RESULT_COLUMNS = ("task", "domain", "scorer", "n", "correct", "accuracy", "ci_low", "ci_high")


def prompt_hash(prompt: str) -> str:
    """12 hex digits of the prompt's sha1: ties a prediction to the exact text the model saw."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
    return pad


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the caller's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, longest first (similar lengths share a batch; an OOM shows up at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[:min(cuts)] if cuts else text


def _fit_left(ids: Sequence[int], limit: int, tokenizer) -> list[int]:
    """`ids` cut from the left to `limit` tokens, keeping the leading special tokens (a BOS)."""
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    special = set(getattr(tokenizer, "all_special_ids", ()))
    prefix = min(next((j for j, t in enumerate(ids) if t not in special), len(ids)), limit - 1)
    return ids[:prefix] + ids[len(ids) - (limit - prefix):]


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_beams: int = 1, seed: int = 0, stop_strings: Sequence[str] | None = None,
             progress: bool = True, desc: str = "generate", truncated: list[bool] | None = None) -> list[str]:
    """Continuations of `prompts` (new text only, special tokens dropped), in input order.

    Batches are left-padded (pad token, else eos) and sorted by length; each continuation ends
    at the first eos and before the first stop string. A prompt longer than the model's window
    (max_position_embeddings) minus `max_new_tokens` loses tokens from its left, after its
    special-token prefix; `truncated`, when given, gets one flag per prompt. Sampling
    (`do_sample`; top_k=0 means no top-k) is reproducible: the torch RNG is seeded with `seed`
    before the first batch, so the same prompts, batch size and device give the same samples.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if stop_strings is not None and (isinstance(stop_strings, str) or not all(stop_strings)):
        raise ValueError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}")
    if not prompts:
        return []
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window and window - max_new_tokens < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's window of {window}")
    raw = tokenizer(list(prompts))["input_ids"]
    encoded = [_fit_left(ids, window - max_new_tokens, tokenizer) if window else list(ids) for ids in raw]
    if truncated is not None:
        truncated[:] = [len(e) < len(r) for e, r in zip(encoded, raw)]
    pad, eos = _pad_id(tokenizer), _eos_ids(model, tokenizer)
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                   repetition_penalty=1.0, pad_token_id=pad, eos_token_id=sorted(eos) or None)
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if stop_strings:
        options.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    outputs: list[str] = [""] * len(encoded)
    if do_sample:
        torch.manual_seed(seed)
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress)
    with _eval_mode(model):
        for batch in _length_batches([len(e) for e in encoded], batch_size):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **options)
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                new = new[:next((k for k, t in enumerate(new) if t in eos), len(new))]
                text = tokenizer.decode(new, skip_special_tokens=True)
                outputs[i] = _cut_at_stop(text, stop_strings) if stop_strings else text
            bar.update(len(batch))
    bar.close()
    return outputs


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context go to the continuation, and the
    continuation tokens are those of context+continuation past the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    if not ctx:
        raise ValueError(f"context {context!r} encodes to no tokens")
    if not whole[len(ctx):]:
        raise ValueError(f"continuation {continuation!r} adds no token to its context")
    return ctx, whole[len(ctx):]


def loglik_choice(model, tokenizer, prompts: Sequence[str], choices_per_prompt: Sequence[Sequence[str]],
                  batch_size: int = 32, progress: bool = True, desc: str = "loglik") -> list[dict]:
    """Multiple-choice scoring as lm-evaluation-harness defines acc and acc_norm.

    For each prompt (the context) and each of its choices (the continuation, scored as given):
    logliks[j] = sum of the continuation tokens' log-probabilities, is_greedy[j] = every such token
    is the argmax, num_bytes[j] = UTF-8 length of the continuation; pred = argmax loglik (acc),
    pred_norm = argmax loglik / num_bytes (acc_norm).
    """
    if len(prompts) != len(choices_per_prompt):
        raise ValueError(f"{len(prompts)} prompts but {len(choices_per_prompt)} choice lists")
    pairs = []  # (prompt index, context ids, continuation ids)
    for p, (prompt, choices) in enumerate(zip(prompts, choices_per_prompt)):
        if not choices:
            raise ValueError(f"prompt {p} has no choices")
        pairs += [(p, *_encode_pair(tokenizer, prompt, c)) for c in choices]
    pad = _pad_id(tokenizer)
    scores: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    bar = tqdm(total=len(pairs), desc=desc, disable=not progress)
    with _eval_mode(model):
        for batch in _length_batches([len(c) + len(t) for _, c, t in pairs], batch_size):
            seqs = [pairs[i][1] + pairs[i][2] for i in batch]
            width = max(len(s) for s in seqs) - 1
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, s in enumerate(seqs):  # right-padded inputs: the last token is only a target
                ids[row, :len(s) - 1] = torch.tensor(s[:-1])
                mask[row, :len(s) - 1] = 1
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                _, ctx, cont = pairs[i]
                span = logprobs[row, len(ctx) - 1:len(ctx) - 1 + len(cont)]
                target = torch.tensor(cont)
                scores[i] = (span.gather(1, target[:, None]).sum().item(),
                             bool((span.argmax(-1) == target).all()))
            bar.update(len(batch))
    bar.close()
    results, k = [], 0
    for choices in choices_per_prompt:
        logliks = [scores[k + j][0] for j in range(len(choices))]
        nbytes = [len(c.encode("utf-8")) for c in choices]
        normed = [ll / b for ll, b in zip(logliks, nbytes)]
        results.append({"logliks": logliks, "is_greedy": [scores[k + j][1] for j in range(len(choices))],
                        "num_bytes": nbytes, "pred": max(range(len(choices)), key=logliks.__getitem__),
                        "pred_norm": max(range(len(choices)), key=normed.__getitem__)})
        k += len(choices)
    return results


def _loglik_inputs(task: Task, items: list[dict], prompts: list[str]) -> tuple[list[str], list[tuple[str, ...]]]:
    """Context = prompt + the reference response up to the label ("the correct answer is "),
    continuation = the option token."""
    if task.answer_kind == "number":
        raise ValueError(f"task {task.name!r} has numeric answers: score it with scorer='generate'")
    prefix = task.answer_format.split("{}")[0]
    return [p + prefix for p in prompts], [item_options(task, it) for it in items]


def _summary(task: Task, scorer: str, flags: list[bool]) -> dict:
    n, k = len(flags), sum(flags)
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    return {"task": task.name, "domain": task.domain, "scorer": scorer, "n": n, "correct": k,
            "accuracy": 100.0 * k / n, "ci_low": 100.0 * low, "ci_high": 100.0 * high}


def _budget(max_new_tokens: int | Mapping[str, int] | None, domain: str) -> int:
    """New-token budget of a domain: an int for all, a per-domain dict, or the registry default."""
    if isinstance(max_new_tokens, Mapping):
        return int(max_new_tokens.get(domain, MAX_NEW_TOKENS[domain]))
    return int(max_new_tokens or MAX_NEW_TOKENS[domain])


def evaluate(model, tokenizer, tasks, data_root: str | Path | None = None, out_dir: str | Path | None = None,
             limit: int | None = None, batch_size: int = 32, max_new_tokens: int | Mapping[str, int] | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_beams: int = 1, seed: int = 0, stop_strings: Sequence[str] | None = None,
             scorer: str = "generate", progress: bool = True) -> pd.DataFrame:
    """Zero-shot accuracy per task (names, groups or `Task`s), with a 95% Wilson interval.

    Returns one row per task: task, domain, scorer, n, correct, accuracy, ci_low, ci_high
    (percentages 0-100). `limit` keeps each task's first items; `max_new_tokens` is an int,
    a dict per domain, or None, which uses
    `tasks.MAX_NEW_TOKENS[domain]`. scorer "generate" decodes and extracts the answer;
    "loglik"/"loglik_norm" pick the option with the highest log-likelihood (acc/acc_norm).
    With `out_dir`, writes predictions.jsonl (one line per item) and accuracy.csv.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer {scorer!r} not in {SCORERS}")
    rows, predictions = [], []
    for task in resolve_tasks(tasks):
        items = load_items(task, data_root=data_root, limit=limit)
        prompts = [build_prompt(it["instruction"], it["input"]) for it in items]
        if scorer == "generate":
            truncated: list[bool] = []
            outputs = generate(model, tokenizer, prompts, batch_size=batch_size,
                               max_new_tokens=_budget(max_new_tokens, task.domain),
                               do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                               num_beams=num_beams, seed=seed, stop_strings=stop_strings,
                               progress=progress, desc=task.name, truncated=truncated)
            extracted = [extract_answer(task, o) for o in outputs]
            flags = [is_correct(task, o, it["answer"]) for o, it in zip(outputs, items)]
            extra = [{"prompt_truncated": t} for t in truncated]
        else:
            contexts, choices = _loglik_inputs(task, items, prompts)
            scored = loglik_choice(model, tokenizer, contexts, choices, batch_size=batch_size,
                                   progress=progress, desc=task.name)
            key = "pred" if scorer == "loglik" else "pred_norm"
            extracted = [c[s[key]] for c, s in zip(choices, scored)]
            outputs = [format_answer(task, e) for e in extracted]
            flags = [e == it["answer"] for e, it in zip(extracted, items)]
            extra = [{"logliks": s["logliks"]} for s in scored]
        rows.append(_summary(task, scorer, flags))
        predictions += [{"task": task.name, "item_id": it["id"], "prompt_hash": prompt_hash(p), "output": o,
                         "extracted": e, "label": it["answer"], "correct": f, **x}
                        for it, p, o, e, f, x in zip(items, prompts, outputs, extracted, flags, extra)]
    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        results.to_csv(out / "accuracy.csv", index=False)
    return results


def load_predictions(path: str | Path) -> pd.DataFrame:
    """predictions.jsonl (or a folder holding it) as a DataFrame; labels and outputs stay strings."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no predictions file at {path}")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
    frame = pd.DataFrame.from_records(records)
    missing = [c for c in PREDICTION_FIELDS if c not in frame.columns]
    if records and missing:
        raise ValueError(f"{path}: missing fields {missing}")
    return frame if records else pd.DataFrame(columns=list(PREDICTION_FIELDS))
