"""KD objectives: token-level divergences between teacher and student next-token distributions.

One registry, :data:`OBJECTIVES`, is used by both entry points. Every objective here is a sum over
the vocabulary of a per-token term ``phi(p_v, s_v)`` (all six are f-divergences or, gjsd, a
weighted sum of two); the registry holds phi, elementwise on log-probs, and the callers sum it:

* :func:`kd_loss` -- dense logits, ``tau^2 * D(P_T, P_S)`` with ``P = softmax(logits / tau)``.
* :func:`sparse_kd_loss` -- the same objective from an offline teacher cache that holds, per
  position, the teacher's top-k logits, their token ids and ``logZ_tau`` (logsumexp of the FULL
  teacher vocabulary at temperature tau).

Numerics. Inputs of any float dtype are computed in float32 (float64 stays float64, for
gradcheck); the result is float32/float64. Log-probs come from ``log_softmax``; mixtures are
formed in log space (``logaddexp``, the two-term logsumexp); a KL term is ``p * (log p - log q)``
with the weight ``p = exp(log p)`` taken unclamped (so ``0 * log 0 = 0`` exactly) and both logs
floored at :data:`LOG_PROB_FLOOR` = log(float32 tiny) ~ -87.3. The floor changes nothing for
probabilities above ~1e-38; it keeps the value and the gradients finite when a distribution puts
zero mass somewhere (``-inf`` logits: a padded teacher vocabulary, banned tokens). Only KLs that
are truly +inf are affected -- rkl where P_T = 0 < P_S (e.g. a padded teacher vocabulary), fkl
where P_S = 0 < P_T -- each such token costs ``p * (log p + 87.3)``, a large finite penalty
(gjsd and the skew KLs are bounded, tvd <= 1). Masked positions are never computed (they
are dropped before the softmax), so they may hold anything, NaN included, and get zero gradient.
A position whose unmasked logits are all ``-inf`` has no distribution and gives NaN.

Sparse (top-k) form. The k cached tokens are exact: phi at each of them, with the teacher's
``log p_i = z_i / tau - logZ_tau`` from the cached raw (untempered) logits ``z_i`` and the student's
full-vocabulary ``log_softmax(s / tau)`` gathered at the cached ids. The other V - k tokens (the
tail) are handled in one of two ways:

* One bucket (no samples given). The tail's total masses form a (k+1)-th bucket and phi is taken
  on them. Teacher tail ``= log(1 - sum_i p_i)`` via ``log1mexp`` or, better, exact from the
  cached tail logsumexp (``teacher_tail_logz``); rounding that makes the top-k mass reach or
  exceed 1 is clamped in log space to a zero tail (never a negative mass or NaN). ``1 - sum`` is
  only as precise as the cached ``logZ``: with float32, absolute error ~ 6e-8 * |logZ|, so tails
  below ~1e-6 are mostly rounding (rkl, which weighs log(teacher tail) by the student's tail mass,
  is the most sensitive to this). Student tail: the logsumexp over the other V - k tokens (exact).
  For k < V the bucketed value is a lower bound on the dense one for EVERY objective here: all six
  are f-divergences, and merging the tail into one bucket is a deterministic map of both
  distributions (data-processing inequality). What is lost is the student's shape inside the
  tail, only its total tail mass is matched -- a different objective wherever the tail is large
  (a top-16 head holds most of the mass at tau = 1, little at tau = 2 or 5).
* Importance-sampled (``sample_logits``, ``sample_ids``, ``sample_log_q`` given): m tail tokens
  ``v_1..v_m`` drawn i.i.d. from a proposal q over the tail, with their raw teacher logits. The
  tail sum ``sum_{v in tail} phi(p_v, s_v)`` is estimated by ``(1/m) sum_j phi(p_{v_j}, s_{v_j}) /
  q(v_j)``: ``p`` at a sample is exact (its logit and the exact logZ), the student is exact, so the
  estimate is unbiased in value and in gradient for every objective at every temperature, with
  variance ~ 1/m (the idea of "Sparse Logit Sampling", Anshumann et al., ACL 2025, here with the
  exact top-k head kept). :func:`tail_log_proposal` is the cache's proposal. A control variate
  lowers the variance: with ``pbar = (teacher tail mass) / (V - k)`` (exact, from the cached tail
  logsumexp), ``sum_{v in tail} phi(pbar, s_v)`` is computed exactly and only
  ``phi(p_v, s_v) - phi(pbar, s_v)`` is sampled -- still unbiased, for any pbar. Where the
  student puts tail mass the teacher does not (gjsd, rkl), the plain estimate is dominated by
  those tokens, which a teacher-based proposal rarely draws; the control variate carries most of
  them exactly. Measured (SmolLM2-135M teacher, pruned student, k = m = 16, tau 1 / 2 / 5): the
  estimate's std fell 55x / 4x / 1.4x for gjsd and 3.4x / 3.2x / 1.8x for rkl, and rose at most
  1.25x for fkl.

Temperature: the top-k set is the same at every tau (softmax(z / tau) is monotone in z), so the
cache stores raw logits once and one ``logZ_tau`` per temperature; ``logZ`` at the wrong tau is a
silent error. At k = V the tail is empty and the result equals :func:`kd_loss` (up to float
error).

Noise (the paper's teacher-noise ablation, z + N(0, sigma^2) before the tempered softmax): on
dense logits use :func:`add_logit_noise` then :func:`kd_loss`. On a cache only the k stored logits
can be perturbed; :func:`add_topk_logit_noise` does so and recomputes ``logZ`` from the noisy
top-k plus the tail's unnormalized mass ``exp(logZ) * tail``. Noise cannot be drawn for the
uncached tail tokens, so the tail is replaced by its expectation under the noise: each token's
tempered unnormalized mass grows in expectation by ``c = exp(sigma^2 / (2 tau^2))``, so the tail
mass is multiplied by c (default ``scale_tail=True``; unbiased for any tail, and what a tail of
many comparable tokens concentrates at). ``scale_tail=False`` keeps it unchanged: the ablation
with noise-free tail tokens, which understates the tail by c relative to the noisy head (c = 1.13
at sigma = tau / 2, 1.65 at sigma = tau). Either way the redistribution of mass inside the tail is
invisible to the single tail bucket. Both are exact at k = V and close when the tail is small.
(On synthetic Zipf teachers, V = 4096, k = 16, sigma in {0.5, 1}: the scaled tail matched the
bucketed loss of the densely noised teacher to <= 0.3%, the unchanged tail was 0.6-14% high.)

Objective sources: see each function's docstring. gjsd follows TRL at its endpoints: beta = 0 is
forward KL(P_T || P_S) and beta = 1 reverse KL(P_S || P_T) (the limits of gjsd/beta and
gjsd/(1-beta); the mixture formula itself is 0 there).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .names import WORD_LEVEL

from .chunking import budget_bytes, row_map, rows_within

__all__ = [
    "LOG_PROB_FLOOR",
    "OBJECTIVES",
    "TAIL_UNIFORM",
    "add_logit_noise",
    "add_topk_logit_noise",
    "kd_loss",
    "sparse_kd_loss",
    "tail_log_proposal",
]

#: Floor for log-probabilities inside the log ratios: log of the smallest normal float32.
LOG_PROB_FLOOR: float = math.log(torch.finfo(torch.float32).tiny)

#: Uniform share of the tail proposal (:func:`tail_log_proposal`).
TAIL_UNIFORM: float = 0.5

_REDUCTIONS = ("mean", "sum", "none")

#: [rows, V] float tensors one chunk of a loss holds at once (log-probs, objective terms, their grads).
_LOSS_COPIES = 16


# --------------------------------------------------------------------------- primitives
def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-token terms of KL(p || q), p * (log p - log q); 0 * log 0 = 0, logs floored (finite)."""
    return logp.exp() * (logp.clamp_min(LOG_PROB_FLOOR) - logq.clamp_min(LOG_PROB_FLOOR))


def _log_mix(w: float, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """log(w * p + (1 - w) * q) in log space (elementwise two-term logsumexp)."""
    if w == 0.0:
        return logq
    if w == 1.0:
        return logp
    return torch.logaddexp(
        logp.clamp_min(LOG_PROB_FLOOR) + math.log(w),
        logq.clamp_min(LOG_PROB_FLOOR) + math.log1p(-w),
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --------------------------------------------------------------------------- objectives
# Each takes teacher / student log-probs t, s of the same shape (may contain -inf) and returns the
# per-token terms phi(t_v, s_v), same shape: the divergence is their sum over the vocabulary.
def _fkl(t: torch.Tensor, s: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """Forward KL(P_T || P_S), mode-covering; Hinton et al. 2015 (word-level KD)."""
    return _kl_terms(t, s)


def _rkl(t: torch.Tensor, s: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """Reverse KL(P_S || P_T), mode-seeking; Gu et al. 2024 (MiniLLM), Agarwal et al. 2024 (GKD)."""
    return _kl_terms(s, t)


def _gjsd(t: torch.Tensor, s: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """beta KL(P_T||M) + (1-beta) KL(P_S||M), M = beta P_T + (1-beta) P_S; Agarwal et al. 2024
    (GKD), as TRL's GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py), which
    returns the endpoint limits: fkl KL(P_T||P_S) at beta = 0, rkl KL(P_S||P_T) at beta = 1. The
    formula itself vanishes there (gjsd/beta -> fkl as beta -> 0, gjsd/(1-beta) -> rkl as beta -> 1),
    so gjsd is discontinuous at the endpoints, as in TRL."""
    if beta == 0.0:
        return _kl_terms(t, s)
    if beta == 1.0:
        return _kl_terms(s, t)
    log_m = _log_mix(beta, t, s)
    return beta * _kl_terms(t, log_m) + (1.0 - beta) * _kl_terms(s, log_m)


def _skew_fkl(t: torch.Tensor, s: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """Skew forward KL(P_T || alpha P_T + (1-alpha) P_S); Ko et al. 2024 (DistiLLM)."""
    return _kl_terms(t, _log_mix(alpha, t, s))


def _skew_rkl(t: torch.Tensor, s: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """Skew reverse KL(P_S || alpha P_S + (1-alpha) P_T); Ko et al. 2024 (DistiLLM)."""
    return _kl_terms(s, _log_mix(alpha, s, t))


def _tvd(t: torch.Tensor, s: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """Total variation 0.5 sum |P_T - P_S|, in [0, 1]; Wen et al. 2023 (f-distill)."""
    return 0.5 * (t.exp() - s.exp()).abs()


LossFunction = Callable[..., torch.Tensor]  # (student logits, teacher signal, ...) -> loss

#: The one registry of KD objectives: name -> fn(teacher_logp, student_logp, *, beta, alpha) giving
#: the per-token terms (elementwise, same shape); a divergence is their sum over the last axis.
OBJECTIVES: dict[str, LossFunction] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "gjsd": _gjsd,
    "skew_fkl": _skew_fkl,
    "skew_rkl": _skew_rkl,
    "tvd": _tvd,
}
if tuple(OBJECTIVES) != WORD_LEVEL:  # the names are declared once, torch-free, in kd_utils.names
    raise ImportError(f"kd_utils.losses.OBJECTIVES {tuple(OBJECTIVES)} differ from kd_utils.names.WORD_LEVEL")


# --------------------------------------------------------------------------- validation
def _check_args(objective: str, temperature: float, beta: float, alpha: float, reduction: str) -> LossFunction:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown KD objective {objective!r}; valid: {sorted(OBJECTIVES)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {list(_REDUCTIONS)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, v in (("beta", beta), ("alpha", alpha)):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    return OBJECTIVES[objective]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    for x in tensors:
        if not torch.is_floating_point(x):
            raise ValueError(f"logits must be a floating tensor, got {x.dtype}")
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _rows(mask: torch.Tensor | None, lead: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Flat indices of the unmasked positions (None = all)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape without vocab {tuple(lead)}")
    return (mask.reshape(-1).to(device) != 0).nonzero().squeeze(-1)


def _reduce(vals: torch.Tensor, idx: torch.Tensor | None, lead: torch.Size, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return vals.sum()
    if reduction == "mean":
        return vals.sum() / max(vals.numel(), 1)
    if idx is None:
        return vals.reshape(lead)
    out = vals.new_zeros(math.prod(lead))
    return out.index_copy(0, idx, vals).reshape(lead)


def _per_position(per_row: Callable[..., torch.Tensor], tensors: list[torch.Tensor], idx: torch.Tensor | None,
                  chunk_mb: int | None) -> torch.Tensor:
    """``per_row`` over the unmasked positions (all when ``idx`` is None) of ``tensors`` (the
    student's (..., V) logits first; the others share its leading dims), in chunks within the
    budget. Masked rows are never computed: no NaN from them, zero grad."""
    if tensors[0].dim() == 1:  # one position
        tensors = [t.unsqueeze(0) for t in tensors]
    s = tensors[0]
    lead = s.dim() - 1
    rows = torch.arange(math.prod(s.shape[:-1]), device=s.device) if idx is None else idx
    chunk = rows_within(budget_bytes(chunk_mb, s.device), s.shape[-1], _LOSS_COPIES)
    return row_map(per_row, tensors, rows, chunk, lead=lead)


def _teacher_tail(log_head: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_head)); a head mass that rounding put at or above 1 (tail below the
    float32 floor) gives a zero tail (-inf), with finite gradients (double-where)."""
    has_tail = log_head < -math.exp(LOG_PROB_FLOOR)
    safe = torch.where(has_tail, log_head, torch.full_like(log_head, -1.0))
    return torch.where(has_tail, _log1mexp(safe), torch.full_like(log_head, -math.inf))


def _check_logz(teacher_logz: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    if teacher_logz.dim() == len(lead) + 1 and teacher_logz.shape[-1] == 1:
        teacher_logz = teacher_logz.squeeze(-1)
    if tuple(teacher_logz.shape) != tuple(lead):
        raise ValueError(
            f"teacher_logz shape {tuple(teacher_logz.shape)} != positions shape {tuple(lead)} "
            "(one log-normalizer per position, for this temperature)"
        )
    return teacher_logz


# --------------------------------------------------------------------------- entry points
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    objective: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    reduction: str = "mean",
    chunk_mb: int | None = None,
) -> torch.Tensor:
    """tau^2 * D(P_T, P_S) per position, P = softmax(logits / tau) over the last axis.

    ``student_logits`` and ``teacher_logits``: (..., V), same shape (slice a padded teacher
    vocabulary to the student's first). ``mask``: (...) bool/0-1, True = counted (None = all).
    ``reduction``: "mean" over unmasked positions (0 if none), "sum" (for gradient accumulation:
    sum micro-batch sums, divide by the step's total token count), or "none" ((...), zeros where
    masked). ``beta`` is used by gjsd, ``alpha`` by skew_fkl / skew_rkl. Float32 (or float64) out.
    Computed over chunks of unmasked positions within ``chunk_mb`` (kd_utils.chunking.row_map).
    """
    fn = _check_args(objective, temperature, beta, alpha, reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
            f"{tuple(teacher_logits.shape)}; slice a padded teacher vocabulary "
            "(teacher_logits[..., :V_student]) and align positions before calling"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty vocabulary axis, got shape {tuple(student_logits.shape)}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    idx = _rows(mask, lead, student_logits.device)
    tau = float(temperature)

    def per_row(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s_lp = F.log_softmax(s.to(dtype) / tau, dim=-1)
        t_lp = F.log_softmax(t.to(dtype) / tau, dim=-1)
        return fn(t_lp, s_lp, beta=beta, alpha=alpha).sum(-1) * tau**2

    vals = _per_position(per_row, [student_logits, teacher_logits], idx, chunk_mb)
    return _reduce(vals, idx, lead, reduction)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    topk_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_logz: torch.Tensor,
    mask: torch.Tensor | None = None,
    objective: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    reduction: str = "mean",
    teacher_tail_logz: torch.Tensor | None = None,
    sample_logits: torch.Tensor | None = None,
    sample_ids: torch.Tensor | None = None,
    sample_log_q: torch.Tensor | None = None,
    chunk_mb: int | None = None,
) -> torch.Tensor:
    """:func:`kd_loss` from a top-k teacher cache: the k ids exact, the tail one bucket or sampled.

    ``student_logits``: (..., V). ``topk_logits`` / ``topk_ids``: (..., k), the teacher's raw
    (untempered) top-k logits and their distinct ids in [0, V). ``teacher_logz``: (...) or
    (..., 1), logsumexp over the FULL teacher vocabulary of teacher_logits / tau at THIS tau.
    Equals kd_loss at k = V. Without samples the tail is one bucket: <= kd_loss for k < V (see the
    module docstring). ``teacher_tail_logz`` (same shape as ``teacher_logz``, optional): logsumexp
    of the teacher's logits / tau over the tokens OUTSIDE the top-k, with the same shift as
    ``teacher_logz``. When given, the bucket's teacher mass is exact (``tail - logZ``) instead of
    ``log(1 - head mass)``, which rounds to an empty tail for a confident teacher and then
    overweights rkl-type objectives.
    ``sample_logits`` / ``sample_ids`` / ``sample_log_q`` (all three or none; (..., m), m >= 1):
    the raw teacher logits (shifted like ``teacher_logz``) and ids of m tail tokens drawn i.i.d.
    from a proposal q over the tail, and log q of each. The tail is then the importance-sampling
    estimate with a control variate (module docstring), unbiased for kd_loss in value and
    gradient; ``teacher_tail_logz`` then only sets the control variate (variance, not bias).
    Computed over chunks of unmasked positions within ``chunk_mb``, as :func:`kd_loss`.
    """
    fn = _check_args(objective, temperature, beta, alpha, reduction)
    if student_logits.dim() < 1:
        raise ValueError("student_logits needs a vocabulary axis")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if topk_logits.shape != topk_ids.shape or topk_logits.shape[:-1] != lead:
        raise ValueError(
            f"topk_logits {tuple(topk_logits.shape)} and topk_ids {tuple(topk_ids.shape)} must both be "
            f"student_logits {tuple(student_logits.shape)} with the vocab axis replaced by k"
        )
    k = topk_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"need 1 <= k <= V, got k={k}, V={vocab}")
    samples = (sample_logits, sample_ids, sample_log_q)
    sampled = sample_logits is not None
    if any((x is None) == sampled for x in samples):
        raise ValueError("give all of sample_logits, sample_ids and sample_log_q, or none")
    if sampled and not (sample_logits.shape == sample_ids.shape == sample_log_q.shape
                        and sample_logits.shape[:-1] == lead and sample_logits.shape[-1] >= 1):
        raise ValueError(
            f"sample_logits {tuple(sample_logits.shape)}, sample_ids {tuple(sample_ids.shape)} and sample_log_q "
            f"{tuple(sample_log_q.shape)} must all be student_logits {tuple(student_logits.shape)} with the "
            "vocab axis replaced by m >= 1"
        )
    teacher_logz = _check_logz(teacher_logz, lead)
    dtype = _compute_dtype(student_logits, topk_logits, teacher_logz)
    idx = _rows(mask, lead, student_logits.device)
    tensors = [student_logits, topk_logits, topk_ids, teacher_logz]
    if sampled:
        tensors += [sample_logits, sample_ids, sample_log_q]
    if teacher_tail_logz is not None:
        tensors.append(_check_logz(teacher_tail_logz, lead))
    tau = float(temperature)

    def per_row(s: torch.Tensor, z: torch.Tensor, ids: torch.Tensor, lz: torch.Tensor, *rest: torch.Tensor):
        ids, lz = ids.long(), lz.to(dtype).unsqueeze(-1)
        s_lp = F.log_softmax(s.to(dtype) / tau, dim=-1)
        t_head = z.to(dtype) / tau - lz
        head = fn(t_head, s_lp.gather(-1, ids), beta=beta, alpha=alpha).sum(-1)
        if teacher_tail_logz is None:  # teacher tail log-mass: exact when given, else log(1 - head)
            t_tail = _teacher_tail(t_head.logsumexp(-1))
        else:
            t_tail = (rest[-1].to(dtype) - lz.squeeze(-1)).clamp(min=LOG_PROB_FLOOR)
        if sampled:
            zs, sids, log_q = rest[0], rest[1].long(), rest[2]
            # control variate: phi at the teacher's tail mass spread evenly over the V - k tail tokens,
            # summed exactly; only the difference to it is importance-sampled
            flat = (t_tail - math.log(vocab - k)).unsqueeze(-1)
            exact = fn(flat.expand_as(s_lp), s_lp, beta=beta, alpha=alpha).scatter(-1, ids, 0.0).sum(-1)
            s_smp = s_lp.gather(-1, sids)
            diff = fn(zs.to(dtype) / tau - lz, s_smp, beta=beta, alpha=alpha) - fn(flat.expand_as(s_smp), s_smp,
                                                                                     beta=beta, alpha=alpha)
            tail = exact + (diff * (-log_q.to(dtype)).exp()).mean(-1)
        else:
            # student tail = logsumexp over the V - k other tokens; the k cached slots are set to the
            # floor (adds <= k * 1e-38 of mass) so an empty tail (k = V) stays finite with finite grads.
            s_tail = s_lp.scatter(-1, ids, LOG_PROB_FLOOR).logsumexp(-1)
            tail = fn(t_tail, s_tail, beta=beta, alpha=alpha)
        return (head + tail) * tau**2

    return _reduce(_per_position(per_row, tensors, idx, chunk_mb), idx, lead, reduction)


def tail_log_proposal(
    logits: torch.Tensor,
    tail_logz: torch.Tensor,
    temperatures: Sequence[float],
    n_tail: int,
    uniform: float = TAIL_UNIFORM,
) -> torch.Tensor:
    """log q(v) of the tail proposal at tail tokens with raw teacher logits ``logits`` (..., m):
    ``q = (1 - uniform) * mean_j P_T(v | tail; tau_j) + uniform / n_tail``, the teacher's tail
    distribution averaged over the cached temperatures plus a uniform share (weights 1/q <=
    n_tail / uniform). ``tail_logz`` (..., n_tau): the tail logsumexp at each of ``temperatures``,
    shifted like ``logits``. Computed in float32 (float64 stays float64).

    Chosen by the exact standard deviation of sparse_kd_loss's estimate (with its control
    variate) on SmolLM2-135M-Instruct teacher / 20-of-30-layer pruned student logits (ARC-Easy and
    BoolQ text, k = m = 16, temperatures {1, 2, 5}; fkl, rkl, gjsd at each): against the teacher's
    tail at one temperature (2 or 5) and other uniform shares (0.1-1), it was the best or within
    10% of the best in every cell; the tail at the largest tau alone (the natural choice) was up to
    3x worse for fkl at tau 1. tests/benchmarks/bench_cache_error.py measures this again.
    """
    if not 0.0 < uniform <= 1.0:
        raise ValueError(f"uniform must be in (0, 1], got {uniform!r}")
    dtype = _compute_dtype(logits, tail_logz)
    log_uniform = torch.full(logits.shape, math.log(uniform / n_tail), dtype=dtype, device=logits.device)
    if uniform == 1.0:
        return log_uniform
    tempered = torch.stack([logits.to(dtype) / t - tail_logz[..., j: j + 1].to(dtype)
                            for j, t in enumerate(temperatures)])
    log_teacher = tempered.logsumexp(0) - math.log(len(temperatures))
    return torch.logaddexp(log_teacher + math.log1p(-uniform), log_uniform)


# --------------------------------------------------------------------------- teacher noise
def add_logit_noise(
    logits: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z + N(0, sigma^2) elementwise (the paper's teacher-noise ablation; apply before the
    tempered softmax, i.e. before kd_loss). sigma = 0 returns ``logits`` itself; -inf stays -inf.
    Same dtype as the input; ``generator`` must live on ``logits.device``."""
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return logits
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=work)
    return (logits.to(work) + sigma * noise).to(logits.dtype)


def add_topk_logit_noise(
    topk_logits: torch.Tensor,
    teacher_logz: torch.Tensor,
    sigma: float,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    scale_tail: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise for a top-k cache: returns (noisy top-k logits, matching logZ at ``temperature``).

    Only the k cached logits get N(0, sigma^2); logZ is recomputed from them plus the tail's
    unnormalized mass times its expected noise factor exp(sigma^2 / (2 tau^2)) (``scale_tail``,
    default) or unchanged (noise-free tail tokens); see the module docstring. Exact at k = V. Feed both outputs to :func:`sparse_kd_loss` at the same
    temperature.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    teacher_logz = _check_logz(teacher_logz, topk_logits.shape[:-1])
    noisy = add_logit_noise(topk_logits, sigma, generator)
    if sigma == 0:
        return noisy, teacher_logz
    dtype = _compute_dtype(topk_logits, teacher_logz)
    tau = float(temperature)
    lz = teacher_logz.to(dtype)
    log_tail = lz + _teacher_tail((topk_logits.to(dtype) / tau - lz.unsqueeze(-1)).logsumexp(-1))
    if scale_tail:
        log_tail = log_tail + sigma**2 / (2 * tau**2)
    new_lz = torch.logaddexp((noisy.to(dtype) / tau).logsumexp(-1), log_tail)
    return noisy, new_lz
