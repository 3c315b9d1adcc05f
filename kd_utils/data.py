"""Training data: tokenised (prompt, response) examples, packed corpora, batches.

An example keeps its prompt and response ids apart, so on-policy methods can replace the
response with a student sample and SeqKD with a teacher generation. Labels are -100 on
the prompt by default: losses are computed on response tokens only. The paper's authors'
code puts the prompt tokens in the loss too (LLM-Adapters' `train_on_inputs=True`; their KD
losses mask with the attention mask): `loss_on_prompt=True` reproduces that.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # ends with eos
    index: int  # position in its dataset: the key of the teacher cache
    loss_on_prompt: bool = False  # the authors' code: prompt tokens are targets too (train_on_inputs)

    @property
    def n_targets(self) -> int:
        """Target positions: the response's tokens, or every token after the first (loss_on_prompt)."""
        if self.loss_on_prompt:
            return len(self.prompt_ids) + len(self.response_ids) - 1
        return len(self.response_ids)


TRUNCATION_RULES = ("left", "skip")


def fit_left(ids: Sequence[int], limit: int, special: set[int]) -> list[int]:
    """`ids` cut from the left to `limit` tokens, keeping their leading special tokens (a BOS)."""
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    prefix = min(next((j for j, t in enumerate(ids) if t not in special), len(ids)), limit - 1)
    return ids[:prefix] + ids[len(ids) - (limit - prefix):]


def tokenize_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                   truncation: str = "left", loss_on_prompt: bool = False,
                   report: dict | None = None) -> list[Example]:
    """Tokenise (prompt, response) pairs into examples of at most `max_length` tokens.

    The prompt gets the tokenizer's special tokens (a BOS for Llama), as at evaluation time; the
    response gets eos. A pair that does not fit is, by `truncation`:
    - "left": the response is kept whole when the prompt can keep at least half the window, and the
      prompt loses tokens from its left (after its special-token prefix): a long HellaSwag context
      keeps its end, next to the question. A response longer than that is cut from its end and the
      prompt keeps min(its length, half the window).
    - "skip": the pair is left out (its index is not used).
    `report`, when given, is filled with counts: examples, prompt_truncated, response_truncated, skipped.
    Example.index is the pair's position in the input, skipped or not (the teacher cache's key).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if truncation not in TRUNCATION_RULES:
        raise ValueError(f"unknown truncation rule {truncation!r}; known: {', '.join(TRUNCATION_RULES)}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token")
    special = set(getattr(tokenizer, "all_special_ids", ()))
    p_ids = tokenizer(list(prompts))["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    counts = {"examples": 0, "prompt_truncated": 0, "response_truncated": 0, "skipped": 0}
    out = []
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        p, r = list(p), list(r) + [eos]
        if len(p) + len(r) > max_length:
            if truncation == "skip":
                counts["skipped"] += 1
                continue
            keep_p = max(max_length - len(r), min(len(p), max_length // 2))
            if keep_p < len(p):
                p = fit_left(p, keep_p, special)
                counts["prompt_truncated"] += 1
            if len(p) + len(r) > max_length:
                r = r[: max_length - len(p)]
                counts["response_truncated"] += 1
        out.append(Example(tuple(p), tuple(r), i, loss_on_prompt))
    counts["examples"] = len(out)
    if report is not None:
        report.update(counts)
    if not out:
        raise ValueError(f"no example fits max_length={max_length} (all {len(prompts)} skipped)")
    return out


def pack_corpus(tokenizer, texts: Sequence[str], block: int) -> torch.Tensor:
    """Concatenate texts (eos-separated) and cut them into [n_blocks, block] token ids."""
    ids: list[int] = []
    for t in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(t)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block
    if n == 0:
        raise ValueError(f"corpus has {len(ids)} tokens, fewer than one block of {block}")
    return torch.tensor(ids[: n * block]).view(n, block)


def pad_id_of(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
    return pad


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences as a left-padded [n, longest] batch for decoding: (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long, device=device)
        mask[row, width - len(s):] = 1
    return ids, mask


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding, and on the prompt
    unless loss_on_prompt), index, prompt_length."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        start = 0 if e.loss_on_prompt else len(e.prompt_ids)
        labels[row, start: len(seq)] = torch.tensor(seq[start:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "index": torch.tensor([e.index for e in examples]),
            "prompt_length": torch.tensor([len(e.prompt_ids) for e in examples])}


def collate_blocks(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of packed corpus blocks: every token is a target."""
    return {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks.clone()}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[list[int]]:
    """Shuffled index batches for one epoch (deterministic from seed and epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for i in range(0, n, batch_size):
        yield order[i: i + batch_size]


def split_validation(examples: list[Example], n_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `n_val` examples for validation (the paper holds out 500)."""
    if not 0 < n_val < len(examples):
        raise ValueError(f"validation size {n_val} must be between 1 and {len(examples) - 1}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]
