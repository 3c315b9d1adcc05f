"""Zero-shot evaluation: batched decoding, multiple-choice log-likelihood, per-task accuracy.

Prompts are `tasks.build_prompt(instruction, input)`; outputs are scored with
`tasks.item_score`: the LLM-Adapters extraction rules (accuracy), or ROUGE-L F1 for the text
(instruction-following) tasks. Log-likelihood scoring follows
lm-evaluation-harness on the requests `tasks.loglik_requests` builds (`loglik_choice`). Decoding is exactly what the
arguments say: sampling knobs, top-k and repetition penalty are passed explicitly, so a
checkpoint's own generation defaults (e.g. top_k=20, repetition_penalty=1.05) never leak in.
Note: LLM-Adapters decoded with num_beams=4 (do_sample unset, so beam search); the default
here is greedy, `num_beams=4` reproduces theirs.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
from pathlib import Path
from typing import Mapping, Iterator, Sequence

import pandas as pd
import torch
from scipy import stats as scipy_stats
from statsmodels.stats.proportion import proportion_confint
from tqdm import tqdm

from kd_utils.chunking import budget_bytes, rows_within
from kd_utils.data import fit_left, left_pad, pad_id_of
from kd_utils.schema import TASK_SCORE_COLUMNS
from kd_utils.tasks import (SCORERS, LoglikRequest, Task, build_prompt, extract_answer, format_answer,
                            generation_budget, item_options, item_score, load_items, loglik_requests, resolve_tasks)

PREDICTION_FIELDS = ("task", "item_id", "prompt_hash", "output", "extracted", "label", "correct")


def prompt_hash(prompt: str) -> str:
    """12 hex digits of the prompt's sha1: ties a prediction to the exact text the model saw."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


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
    special = set(getattr(tokenizer, "all_special_ids", ()))
    encoded = [fit_left(ids, window - max_new_tokens, special) if window else list(ids) for ids in raw]
    if truncated is not None:
        truncated[:] = [len(e) < len(r) for e, r in zip(encoded, raw)]
    pad, eos = pad_id_of(tokenizer), _eos_ids(model, tokenizer)
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
            ids, mask = left_pad([encoded[i] for i in batch], pad)
            width = ids.shape[1]
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


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    return next((k for k in range(n) if any(s[k] != seqs[0][k] for s in seqs)), n)


def _prefix_groups(pairs: Sequence[tuple[int, list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """(prefix ids, request indices): the requests of an item share the longest common prefix of
    their inputs (context + continuation but its last token), which may reach into the
    continuations (PIQA's solutions often differ only at the end); an item whose inputs share no
    token is split into one group per request (prefix = its context)."""
    by_item: dict[int, list[int]] = {}
    for k, (item, _, _) in enumerate(pairs):
        by_item.setdefault(item, []).append(k)
    groups = []
    for ks in by_item.values():
        inputs = [pairs[k][1] + pairs[k][2][:-1] for k in ks]
        n = _common_prefix(inputs)
        groups += [(inputs[0][:n], ks)] if n else [(pairs[k][1], [k]) for k in ks]
    return groups


def _packed_batches(lengths: Sequence[int], batch_size: int) -> list[list[list[int]]]:
    """Batches of at most `batch_size` rows of indices, each row as wide as its batch's longest
    entry: a row starts with the longest entry left and takes the shortest ones left while they fit."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    left = collections.deque(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    batches = []
    while left:
        width, batch = lengths[left[0]], []
        while left and len(batch) < batch_size:
            row = [left.popleft()]
            used = lengths[row[0]]
            while left and used + lengths[left[-1]] <= width:
                row.append(left.pop())
                used += lengths[row[-1]]
            batch.append(row)
        batches.append(batch)
    return batches


#: [rows, V] float32 tensors one chunk of log-likelihood scoring holds (logits, float copy, logsumexp's work).
_SCORE_COPIES = 3


def _token_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, rows: int) -> tuple[list[float], list[bool]]:
    """log p(target) of each row of hidden states and whether the target is the argmax, ``rows`` at
    a time: only the targets' log-probabilities are kept, never a full log_softmax."""
    chosen, hits = [], []
    for h, t in zip(hidden.split(rows), targets.split(rows)):
        logits = head(h).float()
        chosen += (logits.gather(1, t[:, None])[:, 0] - logits.logsumexp(-1)).cpu().tolist()
        hits += (logits.argmax(-1) == t).cpu().tolist()
    return chosen, hits


def loglik_choice(model, tokenizer, requests: Sequence[Sequence[tuple[str, str]]], batch_size: int = 32,
                  progress: bool = True, desc: str = "loglik", chunk_mb: int | None = None) -> list[dict]:
    """Log-likelihoods of each item's (context, continuation) requests, as lm-evaluation-harness's
    HFLM.loglikelihood computes them: `logliks[j]` = sum of the continuation tokens' log-probabilities
    (same token split, see `_encode_pair`), `is_greedy[j]` = each of them is the argmax.

    Faster than its one sequence per request: an item is one sequence, its requests' common prefix
    (the context, and any common start of the options) once, then each request's remainder, which
    attends to the prefix's keys and values and to itself only (a tree-shaped attention mask, the
    position ids of each remainder continuing the prefix's). Short items share a row with a long one
    (`batch_size` rows per forward, `_packed_batches`), and the output head runs only where a
    continuation token is predicted. A request longer than the model's window (max_position_embeddings) + 1 loses context
    tokens from the left as in lm-eval (which drops a leading BOS too; ours keeps leading special
    tokens); `truncated` flags such items. Assumes the model's logits are its output embeddings applied to its decoder's last
    hidden states (true of the Llama, Qwen2 and Mistral families). The head's logits are made for
    chunks of continuation tokens within ``chunk_mb`` (kd_utils.chunking).
    """
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    pairs, truncated = [], [False] * len(requests)  # pairs: (item, context ids, continuation ids)
    for i, item in enumerate(requests):
        if not item:
            raise ValueError(f"item {i} has no requests")
        for context, continuation in item:
            ctx, cont = _encode_pair(tokenizer, context, continuation)
            if window and len(ctx) + len(cont) > window + 1:
                if len(cont) > window:
                    raise ValueError(f"continuation {continuation[:40]!r}... is {len(cont)} tokens, "
                                     f"longer than the model's window of {window}")
                ctx, truncated[i] = fit_left(ctx, window + 1 - len(cont), set(getattr(tokenizer, "all_special_ids", ()))), True
            pairs.append((i, ctx, cont))
    groups = _prefix_groups(pairs)
    rests = {k: (pairs[k][1] + pairs[k][2])[len(prefix):-1] for prefix, ks in groups for k in ks}
    lengths = [len(prefix) + sum(len(rests[k]) for k in ks) for prefix, ks in groups]
    pad, device, dtype = pad_id_of(tokenizer), model.device, model.dtype
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    rows = rows_within(budget_bytes(chunk_mb, device), head.weight.shape[0], _SCORE_COPIES)
    scores: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    bar = tqdm(total=len(groups), desc=desc, disable=not progress)
    with _eval_mode(model):
        for batch in _packed_batches(lengths, batch_size):
            width = max(sum(lengths[g] for g in row) for row in batch)
            blocked = torch.finfo(dtype).min
            causal = torch.full((width, width), blocked, dtype=dtype).triu(1)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            positions = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.full((len(batch), 1, width, width), blocked, dtype=dtype)
            where: dict[int, list[int]] = {}  # request -> flat (row * width + column) of its predicting positions
            for row, packed in enumerate(batch):
                at = 0
                for g in packed:
                    prefix, ks = groups[g]
                    start, p = at, len(prefix)
                    ids[row, at:at + p], positions[row, at:at + p] = torch.tensor(prefix), torch.arange(p)
                    mask[row, 0, at:at + p, at:at + p] = causal[:p, :p]
                    at += p
                    for k in ks:
                        rest, (_, ctx, cont) = rests[k], pairs[k]
                        n = len(rest)
                        ids[row, at:at + n] = torch.tensor(rest, dtype=torch.long)
                        positions[row, at:at + n] = torch.arange(p, p + n)
                        mask[row, 0, at:at + n, start:start + p] = 0
                        mask[row, 0, at:at + n, at:at + n] = causal[:n, :n]
                        in_prefix = max(0, p - len(ctx) + 1)  # continuation tokens predicted inside the prefix
                        cols = [*range(start + p - in_prefix, start + p), *range(at + n - (len(cont) - in_prefix), at + n)]
                        where[k] = [row * width + c for c in cols]
                        at += n
                mask[row, 0, range(at, width), range(at, width)] = 0  # padding attends to itself
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=False).last_hidden_state
            flat = [c for k in where for c in where[k]]
            picked = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(flat, device=device)]
            targets = torch.tensor([t for k in where for t in pairs[k][2]], device=device)
            chosen, hits = _token_logprobs(head, picked, targets, rows)
            at = 0
            for k, cols in where.items():
                scores[k] = (sum(chosen[at:at + len(cols)]), all(hits[at:at + len(cols)]))
                at += len(cols)
            bar.update(sum(map(len, batch)))
    bar.close()
    results, k = [], 0
    for i, item in enumerate(requests):
        results.append({"logliks": [scores[k + j][0] for j in range(len(item))],
                        "is_greedy": [scores[k + j][1] for j in range(len(item))], "truncated": truncated[i]})
        k += len(item)
    return results


def _label_requests(task: Task, prompt: str, options: Sequence[str]) -> list[LoglikRequest]:
    """scorer "loglik_label": context = prompt + the reference response up to the label ("the correct
    answer is "), continuation = the option token."""
    if task.answer_kind == "number":
        raise ValueError(f"task {task.name!r} has numeric answers: score it with scorer='generate'")
    prefix = task.answer_format.split("{}")[0]
    return [LoglikRequest(prompt + prefix, o, o) for o in options]


def _summary(task: Task, scorer: str, scores: list[float], truncated: list[bool]) -> dict:
    """The task's row: accuracy with a 95% Wilson interval, or a mean score (ROUGE-L) with a 95%
    t-interval over items, clipped to 0-100 (NaN for one item)."""
    n, mean = len(scores), sum(scores) / len(scores)
    if task.metric == "accuracy":
        k = round(mean * n / 100.0)
        low, high = (100.0 * b for b in proportion_confint(k, n, alpha=0.05, method="wilson"))
    else:
        k = None
        sem = scipy_stats.sem(scores) if n > 1 else float("nan")
        low, high = (mean, mean) if sem == 0 else scipy_stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
        low, high = max(low, 0.0), min(high, 100.0)
    return {"task": task.name, "domain": task.domain, "scorer": scorer, "metric": task.metric, "n": n,
            "correct": k, "accuracy": mean, "ci_low": float(low), "ci_high": float(high), "truncated": sum(truncated)}


def evaluate(model, tokenizer, tasks, data_root: str | Path | None = None, out_dir: str | Path | None = None,
             limit: int | None = None, batch_size: int = 32, max_new_tokens: int | Mapping[str, int] | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_beams: int = 1, seed: int = 0, stop_strings: Sequence[str] | None = None,
             scorer: str = "generate", progress: bool = True, chunk_mb: int | None = None) -> pd.DataFrame:
    """Zero-shot score per task (names, groups or `Task`s) in the task's metric: accuracy with a 95%
    Wilson interval, or for text tasks the mean ROUGE-L F1 with a 95% t-interval over items.

    Returns one row per task: task, domain, scorer, metric, n, correct (empty for text tasks),
    accuracy (the metric), ci_low, ci_high (0-100) and truncated (items whose prompt or context lost tokens to fit the model's
    window). `limit` keeps each task's first items; `max_new_tokens` is an int, a dict per domain,
    or None, which uses each task's own budget (`tasks.generation_budget`). `scorer` is one of `tasks.SCORERS`:
    "generate" decodes and extracts the answer; "loglik"/"loglik_norm" pick the option whose content
    (`tasks.loglik_requests`) is the most likely continuation (lm-eval's acc/acc_norm);
    "loglik_label" the option whose label token is. With `out_dir`, writes predictions.jsonl (one
    line per item, with its score 0-100) and accuracy.csv. ``chunk_mb``: the memory budget of log-likelihood scoring.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer {scorer!r} not in {tuple(SCORERS)}")
    rows, predictions = [], []
    for task in resolve_tasks(tasks):
        items = load_items(task, data_root=data_root, limit=limit)
        prompts = [build_prompt(it["instruction"], it["input"]) for it in items]
        truncated: list[bool] = []
        if scorer == "generate":
            outputs = generate(model, tokenizer, prompts, batch_size=batch_size,
                               max_new_tokens=generation_budget(task, max_new_tokens),
                               do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                               num_beams=num_beams, seed=seed, stop_strings=stop_strings,
                               progress=progress, desc=task.name, truncated=truncated)
            extracted = [extract_answer(task, o) for o in outputs]
            scores = [item_score(task, o, it) for o, it in zip(outputs, items)]
            flags = [None if task.metric != "accuracy" else s == 100.0 for s in scores]
            extra = [{"score": s, "prompt_truncated": t} for s, t in zip(scores, truncated)]
        else:
            options = [item_options(task, it) for it in items]
            requests = [_label_requests(task, p, o) if scorer == "loglik_label" else loglik_requests(task, it)
                        for it, p, o in zip(items, prompts, options)]
            scored = loglik_choice(model, tokenizer, [[(r.context, r.continuation) for r in rs] for rs in requests],
                                   batch_size=batch_size, progress=progress, desc=task.name, chunk_mb=chunk_mb)
            per = [[ll / len(r.choice) for ll, r in zip(s["logliks"], rs)] if scorer == "loglik_norm" else s["logliks"]
                   for s, rs in zip(scored, requests)]
            extracted = [o[max(range(len(o)), key=v.__getitem__)] for o, v in zip(options, per)]
            outputs = [format_answer(task, e) for e in extracted]
            flags = [e == it["answer"] for e, it in zip(extracted, items)]
            scores = [100.0 * f for f in flags]
            truncated = [s["truncated"] for s in scored]
            extra = [{"score": c, "logliks": s["logliks"], "prompt_truncated": s["truncated"]}
                     for c, s in zip(scores, scored)]
        rows.append(_summary(task, scorer, scores, truncated))
        predictions += [{"task": task.name, "item_id": it["id"], "prompt_hash": prompt_hash(p), "output": o,
                         "extracted": e, "label": it["answer"], "correct": f, **x}
                        for it, p, o, e, f, x in zip(items, prompts, outputs, extracted, flags, extra)]
    results = pd.DataFrame(rows, columns=list(TASK_SCORE_COLUMNS))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        results.to_csv(out / "accuracy.csv", index=False)
    return results


def check_predictions(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Predictions (a frame of predictions.jsonl) validated: every field of `PREDICTION_FIELDS`, each
    (task, item_id) once, and a ``correct`` on every item with an answer (text tasks' items have
    neither); ``correct`` becomes a nullable boolean column."""
    missing = [f for f in PREDICTION_FIELDS if f not in frame.columns]
    if missing:
        raise ValueError(f"predictions {source} are missing fields {missing}")
    dup = frame.duplicated(["task", "item_id"])
    if dup.any():
        first = frame.loc[dup, ["task", "item_id"]].iloc[0].tolist()
        raise ValueError(f"predictions {source} repeat (task, item_id), e.g. {first}")
    answered = frame["correct"].notna() | frame["extracted"].notna()
    if (frame["correct"].isna() & answered).any():
        raise ValueError(f"predictions {source} have items with a null 'correct'")
    return frame.assign(correct=frame["correct"].astype("boolean"))


def load_predictions(path: str | Path) -> pd.DataFrame:
    """predictions.jsonl (or a folder holding it) as a DataFrame, validated (`check_predictions`);
    labels and outputs stay strings."""
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
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=list(PREDICTION_FIELDS))
    return check_predictions(frame, str(path))
