"""The teacher's signal at target positions: what the cache stores, computed from one teacher
forward (:func:`signal_rows`; :mod:`kd_utils.cache_build` runs it over the data and writes shards).

The whole row is rounded to fp16 before logZ, tail and samples are computed from it: head, tail
and samples describe ONE distribution (the teacher with fp16-rounded logits; at k = V the head sums
to 1, and a sampled logit with logZ gives that token's cached probability exactly). Logits are
shifted by their position's maximum (softmax is shift-invariant; logZ carries the same shift), so
the top token is exactly 0 and fp16 keeps ~5e-4 relative precision where the mass is. Teacher
logits wider than the tokenizer are sliced to ``vocab_size`` first. k >= vocab_size stores the
whole distribution (k = vocab_size, no samples).

Temperature: the top-k set is the same at every tau (softmax(z / tau) is monotone in z), so one
set of raw logits serves all temperatures; ``sparse_kd_loss`` tempers them (``z / tau - logZ_tau``).
A temperature that was not cached raises: a logZ at the wrong tau would be a silent error.

Tail. The top-k head holds most of the teacher's mass at tau = 1 but little at higher tau
(SmolLM2-135M, k = 16: 89% at tau 1, 28% at tau 2, 0.7% at tau 5; the manifest records the mean
and 10th percentile of the head mass per cached tau as ``head_mass``). So the tail is
importance-sampled (``samples`` = m > 0, default 16): per position, m tail tokens are drawn i.i.d.
from :func:`~kd_utils.losses.tail_log_proposal` (the teacher's tail averaged over the cached
temperatures, mixed half and half with uniform over the V - k tail tokens), and
:func:`~kd_utils.losses.sparse_kd_loss` turns them (with a control variate from the exact tail
mass) into an estimate of the tail's contribution that is unbiased in value and gradient for
every objective at every cached temperature. How noisy it is (tests/benchmarks/bench_cache_error.py,
SmolLM2-135M and a pruned student, ~2000 positions): the summed loss within 0.5% of the live one
at tau 1, 2 and 5 where the one-bucket tail is 17-99% low; the gradient close to the live one for
fkl and gjsd at tau 1 (cosine > 0.9), noisy for both at tau 2 and 5 and for rkl everywhere
(cosine 0.06-0.7 on the student's final hidden states: there the m samples per position are too
few, and more positions per step, a larger m or the live teacher are the remedies). The draw
is made ONCE, from a generator seeded by (sample_seed, example index) -- independent of batching --
so a cache fixes one draw per position, as it does for the noise. ``samples = 0`` keeps the older
one-bucket tail: it matches only the student's total tail mass, a lower bound of the dense loss
that is close at tau = 1 and a different objective at tau 2 and 5.

Noise (the teacher-noise ablation, z + N(0, sigma^2)): drawn ONCE per position at cache time, on
the full logits, from a generator seeded by (noise_seed, example index) -- so the draw does not
depend on batching -- and top-k and logZ are taken from the noisy logits: the cached signal is
exact for that draw. The live teacher redraws noise every step; the cache fixes one draw per
position, a different but equally valid ablation. Noise sigma and seed are part of the key.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from .cache_shards import ROWS, ids_dtype
from .data import IGNORE, Example, collate
from .losses import tail_log_proposal

__all__ = ["cache_copies", "signal_rows"]


def _row_seed(*parts: object) -> int:
    """A 63-bit seed from (seed, ..., example index): one generator per example, so draws do not
    depend on batching."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


@torch.inference_mode()
def signal_rows(teacher: torch.nn.Module, examples: Sequence[Example], vocab_size: int, k: int,
                temperatures: Sequence[float], noise: float, noise_seed: int, samples: int, sample_seed: int,
                rows: int) -> dict[str, torch.Tensor]:
    """One teacher forward over ``examples``: the shard tensors of their target positions (values,
    ids, logz, tail, sample_values, sample_ids); tail = logsumexp over the tokens outside the
    top-k, exact (never 1 - head, which rounds to 0 for a confident teacher). The positions are
    processed ``rows`` at a time (:func:`_position_signal`); each example's noise is drawn whole
    and its tail samples from one generator, so neither depends on the chunking.
    Right padding (id 0) is masked out and after every real token, so it changes no real logit."""
    device = next(teacher.parameters()).device
    batch = collate(examples, 0)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = teacher(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"teacher has {logits.shape[-1]} output logits, fewer than vocab_size={vocab_size}")
    where = (batch["labels"][:, 1:] != IGNORE).nonzero().to(device)  # (example, position), positions in order
    starts = np.cumsum([0] + [e.n_targets for e in examples])
    draws: dict[int, torch.Tensor] = {}  # an example's noise, drawn whole, until its last chunk
    samplers: dict[int, torch.Generator] = {}
    parts = []
    for a in range(0, len(where), rows):
        b = min(a + rows, len(where))
        z = logits[where[a:b, 0], where[a:b, 1], :vocab_size].float()  # [b - a, V], a copy of these rows only
        segments = []  # (example, its first and last-but-one local position in this chunk)
        for r in range(int(where[a, 0]), int(where[b - 1, 0]) + 1):
            lo, hi = max(a, starts[r]) - starts[r], min(b, starts[r + 1]) - starts[r]
            if hi > lo:
                segments.append((r, lo, hi))
        if noise:
            for r, lo, hi in segments:
                if r not in draws:
                    g = torch.Generator(device=device).manual_seed(_row_seed(noise_seed, examples[r].index))
                    draws[r] = torch.randn((examples[r].n_targets, vocab_size), generator=g, device=device)
            z += noise * torch.cat([draws[r][lo:hi] for r, lo, hi in segments])
            for r, lo, hi in segments:
                if hi == examples[r].n_targets:
                    del draws[r]
        for r, _, _ in segments:
            if r not in samplers:
                seed = _row_seed("tail-samples", sample_seed, examples[r].index)
                samplers[r] = torch.Generator(device=device).manual_seed(seed)
        parts.append(_position_signal(z, [(samplers[r], hi - lo) for r, lo, hi in segments], vocab_size, k,
                                      temperatures, samples))
    return {name: torch.cat([p[name] for p in parts]) for name in ROWS}


def _position_signal(z: torch.Tensor, samplers: Sequence[tuple[torch.Generator, int]], vocab_size: int, k: int,
                     temperatures: Sequence[float], samples: int) -> dict[str, torch.Tensor]:
    """The cached rows of teacher logits ``z`` ([n, V] float32, a private copy), drawing each run of
    rows' tail samples from its generator (``samplers``: (generator, rows) in order)."""
    # Every logit as it would be stored (fp16, shifted by the row's max), so logZ, tail, head and
    # samples describe ONE distribution: at k = V the head sums to 1, and a sampled logit plus
    # logZ is that token's exact cached probability.
    y = z.sub_(z.amax(-1, keepdim=True))  # in place: z is a private copy
    y.copy_(y.half())
    top, ids = y.topk(k, dim=-1)
    logz = torch.stack([(y if t == 1.0 else y / t).logsumexp(-1) for t in temperatures], dim=-1)
    rest = y.scatter(-1, ids, float("-inf"))
    tail = torch.stack([(rest if t == 1.0 else rest / t).logsumexp(-1) for t in temperatures], dim=-1)
    del rest
    picked = torch.empty((len(y), samples), dtype=torch.long, device=y.device)
    if samples:
        start = 0
        for g, n in samplers:
            r = slice(start, start + n)
            log_q = tail_log_proposal(y[r], tail[r], temperatures, vocab_size - k).scatter_(-1, ids[r], float("-inf"))
            picked[r] = torch.multinomial(log_q.exp_(), samples, replacement=True, generator=g)
            start = r.stop
    id_dtype = ids_dtype(vocab_size)
    return {"values": top.half().cpu(), "ids": ids.to(id_dtype).cpu(), "logz": logz.cpu(), "tail": tail.cpu(),
            "sample_values": y.gather(-1, picked).half().cpu(), "sample_ids": picked.to(id_dtype).cpu()}


def cache_copies(temperatures: Sequence[float]) -> int:
    """[rows, V] float32 tensors the per-position work holds at once (the rows, their tail, the
    tempered copies of the tail proposal, its probabilities)."""
    return 5 + 2 * len(temperatures)
