"""The teacher signal of a KD run from the cache: the cached teacher, GKD's cached-and-live
teacher, the choice between them and the live teacher, and the probe that checks a cache against
the live teacher (:class:`~kd_utils.methods.LiveTeacher`) before a run trusts it.

Each has ``kd_sum(student_logits, batch, mask, settings)`` and ``forward_passes``. On-policy GKD
trains on student samples, which no cache can hold: :func:`teacher_for` gives it the cache on its
gold (off-policy) batches and the live teacher on the batches of student samples.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from .cache_shards import TeacherCache
from .data import IGNORE
from .losses import sparse_kd_loss, tail_log_proposal
from .methods import KDSettings, LiveTeacher

__all__ = ["CACHE_MAX_LOSS_ERROR", "CACHE_MIN_GRAD_COSINE", "CachedTeacher", "OnPolicyTeacher", "probe_cache",
           "teacher_for"]

logger = logging.getLogger(__name__)


class CachedTeacher:
    """The teacher signal read from a :class:`TeacherCache`, with LiveTeacher's ``kd_sum``.

    ``forward_passes``: teacher forward passes to attribute to this run (e.g. the
    ``cache.forward_passes`` of the ensure_cache call that built it); it never runs the teacher.
    ``chunk_mb``: the loss's memory budget (kd_utils.chunking).
    """

    def __init__(self, cache: TeacherCache, vocab_size: int, forward_passes: int = 0, chunk_mb: int | None = None):
        if vocab_size != cache.vocab_size:
            raise ValueError(f"teacher cache {cache.path} has vocab_size {cache.vocab_size}, the student "
                             f"objective uses {vocab_size}")
        self.cache, self.vocab_size, self.forward_passes = cache, vocab_size, forward_passes
        self.chunk_mb = chunk_mb

    def check(self, s: KDSettings) -> int:
        """Raise unless the cache serves ``s`` (same noise, a cached temperature); the logz column."""
        if not math.isclose(s.noise, self.cache.noise, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(f"teacher cache {self.cache.path} holds teacher noise sigma={self.cache.noise}, "
                             f"the settings ask sigma={s.noise}: build a cache for that noise")
        return self.cache.temperature_column(s.temperature)

    def signal(self, batch: dict[str, torch.Tensor], mask: torch.Tensor, column: int) -> dict[str, torch.Tensor]:
        """The teacher arguments of :func:`~kd_utils.losses.sparse_kd_loss` for the mask's True
        positions (row-major order) at the temperature of ``column``: top-k logits and ids, logZ,
        the exact tail log-mass, and the sampled tail tokens with their log proposal probability
        (when the cache has samples)."""
        rows = self.cache.positions(batch["index"], mask.sum(1))
        device, c = mask.device, self.cache
        out = {"topk_logits": c.values[rows].to(device), "topk_ids": c.ids[rows].to(device),
               "teacher_logz": c.logz[rows, column].to(device), "teacher_tail_logz": c.tail[rows, column].to(device)}
        if not c.samples:
            return out
        values = c.sample_values[rows].to(device)
        log_q = tail_log_proposal(values, c.tail[rows].to(device), c.temperatures, c.vocab_size - c.k,
                                  c.manifest["tail_uniform"])
        return {**out, "sample_logits": values, "sample_ids": c.sample_ids[rows].to(device), "sample_log_q": log_q}

    def kd_sum(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor,
               s: KDSettings) -> torch.Tensor:
        """Summed KD loss over the mask's positions (student_logits [B, T-1, V], mask [B, T-1])."""
        column = self.check(s)
        signal = {name: _at(mask, rows) for name, rows in self.signal(batch, mask, column).items()}
        return sparse_kd_loss(student_logits, **signal, mask=mask, objective=s.objective, temperature=s.temperature,
                              beta=s.beta, alpha=s.alpha, reduction="sum", chunk_mb=self.chunk_mb)


def _at(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-position rows (one per True of ``mask``, row-major) laid out on the mask's shape, zeros
    elsewhere (never read): the student's logits are then used in place, not copied by ``[mask]``."""
    out = rows.new_zeros((*mask.shape, *rows.shape[1:]))
    out[mask] = rows
    return out


class OnPolicyTeacher:
    """GKD's teacher signal: the cache on gold batches, the live teacher on the batches whose
    responses are student samples (marked ``on_policy`` by :class:`~kd_utils.methods.OnPolicySampler`)."""

    def __init__(self, cached: CachedTeacher, live):
        self.cached, self.live = cached, live

    @property
    def forward_passes(self) -> int:
        return self.cached.forward_passes + self.live.forward_passes

    def kd_sum(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor,
               s: KDSettings) -> torch.Tensor:
        teacher = self.live if bool(batch.get("on_policy", False)) else self.cached
        return teacher.kd_sum(student_logits, batch, mask, s)


def teacher_for(settings: KDSettings, live_teacher_factory: Callable[[], object], cache: TeacherCache | None,
                log: Callable[[str], None] = logger.info, vocab_size: int | None = None, chunk_mb: int | None = None):
    """The teacher of one run: the live teacher without a cache; the cache for off-policy
    word-level KD; for on-policy gkd, the cache on gold batches and the live teacher on
    student samples. Raises before training when the cache cannot serve the settings."""
    if cache is None:
        return live_teacher_factory()
    cached = CachedTeacher(cache, cache.vocab_size if vocab_size is None else vocab_size,
                           forward_passes=cache.forward_passes, chunk_mb=chunk_mb)
    cached.check(settings)
    if settings.method == "gkd":
        log("gkd is on-policy: the live teacher scores its student samples, the cache its gold batches")
        return OnPolicyTeacher(cached, live_teacher_factory())
    return cached


#: A cached run must reproduce the live teacher on a probe batch of its own student and data:
#: the summed loss within this relative error (the bound the real-LM issue sets)...
CACHE_MAX_LOSS_ERROR = 0.01
#: ...and a gradient w.r.t. the student's logits at least this close in direction; otherwise the
#: live teacher serves the run. On SmolLM2 (vocab 49152, k 16, 16 sampled tail tokens) only fkl at
#: tau 1 passes both (see the cache-error table of docs/teacher-cache.md).
CACHE_MIN_GRAD_COSINE = 0.9


def probe_cache(cached, live: LiveTeacher, student, batch: dict, settings: KDSettings, vocab: int) -> dict:
    """The cached signal against the live teacher on one batch: the relative error of the summed
    loss, the cosine between the two gradients w.r.t. the student's logits, and whether the cache
    may serve the run (``served``: within :data:`CACHE_MAX_LOSS_ERROR` and :data:`CACHE_MIN_GRAD_COSINE`)."""
    device = next(student.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = student.training
    student.eval()
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student.train(was_training)
    mask = batch["labels"][:, 1:] != IGNORE
    measured = {}
    for name, teacher in (("cached", cached), ("live", live)):
        x = logits[:, :-1, :vocab].detach().float().requires_grad_(True)
        loss = teacher.kd_sum(x, batch, mask, settings)
        loss.backward()
        measured[name] = (float(loss.detach()), x.grad[mask].flatten())
    (c, gc), (v, gv) = measured["cached"], measured["live"]
    probe = {"loss_error": (c - v) / abs(v) if v else 0.0,
             "grad_cosine": float(torch.nn.functional.cosine_similarity(gc, gv, dim=0))}
    probe["served"] = abs(probe["loss_error"]) <= CACHE_MAX_LOSS_ERROR and probe["grad_cosine"] >= CACHE_MIN_GRAD_COSINE
    return probe
