"""Tests of kd_utils.losses against an independent float64 reference (plain probabilities),
in the style of TRL's GKD loss tests."""
from __future__ import annotations

import math

import pytest
import torch

from kd_utils.losses import (
    LOG_PROB_FLOOR,
    OBJECTIVES,
    TAIL_UNIFORM,
    add_logit_noise,
    add_topk_logit_noise,
    kd_loss,
    sparse_kd_loss,
    tail_log_proposal,
)


NAMES = ["fkl", "rkl", "gjsd", "skew_fkl", "skew_rkl", "tvd"]
B, T, V = 3, 5, 11


# --------------------------------------------------------------------------- reference
def _kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def ref_div(s_logits, t_logits, objective, tau=1.0, beta=0.5, alpha=0.1):
    """Per-position tau^2 * D(P_T, P_S), float64, written from the definitions."""
    p = torch.softmax(t_logits.double() / tau, -1)
    q = torch.softmax(s_logits.double() / tau, -1)
    if objective == "fkl":
        d = _kl64(p, q)
    elif objective == "rkl":
        d = _kl64(q, p)
    elif objective == "gjsd":
        m = beta * p + (1 - beta) * q
        d = beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    elif objective == "skew_fkl":
        d = _kl64(p, alpha * p + (1 - alpha) * q)
    elif objective == "skew_rkl":
        d = _kl64(q, alpha * q + (1 - alpha) * p)
    elif objective == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    else:
        raise AssertionError(objective)
    return tau**2 * d


def ref_loss(s_logits, t_logits, mask=None, reduction="mean", **kw):
    d = ref_div(s_logits, t_logits, **kw)
    m = torch.ones(d.shape, dtype=torch.bool) if mask is None else mask.bool()
    d = torch.where(m, d, torch.zeros_like(d))
    if reduction == "none":
        return d
    if reduction == "sum":
        return d.sum()
    return d.sum() / max(int(m.sum()), 1)


def _inputs(seed=0, shape=(B, T, V), scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(shape, generator=g)).to(dtype)
    t = (scale * torch.randn(shape, generator=g)).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) > 0.3
    mask.view(-1)[0] = True
    return s, t, mask


def _topk_cache(t_logits, k, tau):
    vals, ids = t_logits.topk(k, dim=-1)
    return vals, ids, (t_logits.to(torch.promote_types(t_logits.dtype, torch.float32)) / tau).logsumexp(-1)


# --------------------------------------------------------------------------- registry/API
def test_registry_names():
    assert sorted(OBJECTIVES) == sorted(NAMES)


@pytest.mark.parametrize("objective", NAMES)
def test_objectives_are_per_token_terms_summed_by_the_callers(objective):
    """OBJECTIVES[name] is elementwise: phi(t_v, s_v) per token, any subset of tokens gives the
    same terms, and their sum over the vocabulary is the divergence."""
    s, t, _ = _inputs(seed=20, dtype=torch.float64)
    t_lp, s_lp = torch.log_softmax(t / 1.5, -1), torch.log_softmax(s / 1.5, -1)
    fn = OBJECTIVES[objective]
    terms = fn(t_lp, s_lp, beta=0.3, alpha=0.2)
    assert terms.shape == (B, T, V)
    some = torch.tensor([7, 0, 3])
    torch.testing.assert_close(fn(t_lp[..., some], s_lp[..., some], beta=0.3, alpha=0.2), terms[..., some],
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(1.5**2 * terms.sum(-1), ref_div(s, t, objective, tau=1.5, beta=0.3, alpha=0.2),
                               rtol=1e-12, atol=1e-13)


def test_unknown_objective_lists_valid_names():
    s, t, _ = _inputs()
    with pytest.raises(ValueError) as e:
        kd_loss(s, t, objective="jsd")
    assert all(n in str(e.value) for n in NAMES)


def test_shape_mismatch_names_both_shapes():
    s, t, _ = _inputs()
    with pytest.raises(ValueError) as e:
        kd_loss(s, torch.cat([t, t[..., :2]], -1))
    assert str((B, T, V)) in str(e.value) and str((B, T, V + 2)) in str(e.value)
    with pytest.raises(ValueError, match="mask shape"):
        kd_loss(s, t, mask=torch.ones(B, T + 1, dtype=torch.bool))


@pytest.mark.parametrize(
    "kw", [dict(temperature=0.0), dict(temperature=-1.0), dict(beta=1.5), dict(alpha=-0.1), dict(reduction="avg")]
)
def test_bad_arguments(kw):
    s, t, _ = _inputs()
    with pytest.raises(ValueError):
        kd_loss(s, t, **kw)


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("objective", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_matches_float64_reference(objective, tau):
    kw = dict(objective=objective, tau=tau, beta=0.3, alpha=0.2)
    s, t, mask = _inputs(seed=1)
    ref = ref_loss(s, t, mask, **kw)
    args = dict(objective=objective, temperature=tau, beta=0.3, alpha=0.2)
    got32 = kd_loss(s, t, mask, **args)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-6)
    got64 = kd_loss(s.double(), t.double(), mask, **args)
    torch.testing.assert_close(got64, ref, rtol=1e-12, atol=1e-13)
    # temperature: same as the tau = 1 loss on logits / tau, times tau^2
    torch.testing.assert_close(
        kd_loss(s.double(), t.double(), mask, **args),
        tau**2 * kd_loss(s.double() / tau, t.double() / tau, mask, **{**args, "temperature": 1.0}),
    )


@pytest.mark.parametrize("objective", NAMES)
def test_zero_for_identical_inputs(objective):
    s, _, mask = _inputs()
    out = kd_loss(s, s.clone(), mask, objective=objective, temperature=2.0, reduction="none")
    assert torch.all(out.abs() < 1e-6)


def test_gjsd_symmetric_and_bounded_by_ln2():
    s, t, mask = _inputs(seed=2, scale=4.0)
    a = kd_loss(s, t, mask, objective="gjsd", beta=0.5, reduction="none")
    b = kd_loss(t, s, mask, objective="gjsd", beta=0.5, reduction="none")
    torch.testing.assert_close(a, b)
    assert torch.all(a <= math.log(2) + 1e-6)
    # nearly disjoint supports approach the bound
    big = torch.full((1, 4), -40.0)
    far_s, far_t = big.clone(), big.clone()
    far_s[0, 0] = far_t[0, 1] = 40.0
    torch.testing.assert_close(kd_loss(far_s, far_t, objective="gjsd").item(), math.log(2), rtol=1e-5, atol=0)


def trl_generalized_jsd(s_logits, t_logits, beta, tau=1.0):
    """Per-position float64 re-implementation of TRL's GKDTrainer.generalized_jsd_loss
    (huggingface/trl, trl/experimental/gkd/gkd_trainer.py, at f2cd577): F.kl_div(input, target,
    log_target=True) = KL(target || input); beta = 0 -> kl_div(student, teacher), beta = 1 ->
    kl_div(teacher, student). TRL has no tau^2 factor: it is applied here, as kd_loss does."""
    import torch.nn.functional as F

    s_lp = torch.log_softmax(s_logits.double() / tau, -1)
    t_lp = torch.log_softmax(t_logits.double() / tau, -1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        m = torch.logsumexp(torch.stack([s_lp + torch.log1p(-b), t_lp + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(m, t_lp, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(m, s_lp, reduction="none", log_target=True)
    return tau**2 * jsd.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_gjsd_matches_trl_including_the_endpoints(beta, tau):
    s, t, _ = _inputs(seed=3, scale=1.5, dtype=torch.float64)
    got = kd_loss(s, t, objective="gjsd", beta=beta, temperature=tau, reduction="none")
    torch.testing.assert_close(got, trl_generalized_jsd(s, t, beta, tau), rtol=1e-12, atol=1e-13)
    if beta in (0.0, 1.0):  # TRL's endpoints: fkl at 0, rkl at 1
        base = "fkl" if beta == 0.0 else "rkl"
        assert torch.equal(got, kd_loss(s, t, objective=base, temperature=tau, reduction="none"))


def test_gjsd_limits():
    """M = beta P_T + (1-beta) P_S. Expanding in beta: gjsd = beta KL(P_T||P_S) - beta^2/2
    chi^2(P_T||P_S) + O(beta^3), so gjsd/beta -> fkl as beta -> 0 and, by gjsd(T,S;beta) =
    gjsd(S,T;1-beta), gjsd/(1-beta) -> rkl as beta -> 1 (the GKD paper's forward/reverse-KL ends).
    The mixture formula itself goes to 0; at beta = 0 / 1 gjsd returns those limits, fkl / rkl
    (TRL's convention): continuous after dividing by beta / (1 - beta), not before."""
    s, t, _ = _inputs(seed=3, scale=0.7, dtype=torch.float64)
    fkl = kd_loss(s, t, objective="fkl", reduction="none")
    rkl = kd_loss(s, t, objective="rkl", reduction="none")
    assert torch.equal(kd_loss(s, t, objective="gjsd", beta=0.0, reduction="none"), fkl)
    assert torch.equal(kd_loss(s, t, objective="gjsd", beta=1.0, reduction="none"), rkl)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    chi2_pq, chi2_qp = ((p - q) ** 2 / q).sum(-1), ((p - q) ** 2 / p).sum(-1)
    for eps in (1e-3, 1e-4):
        lo = kd_loss(s, t, objective="gjsd", beta=eps, reduction="none")
        hi = kd_loss(s, t, objective="gjsd", beta=1 - eps, reduction="none")
        torch.testing.assert_close((lo / eps - fkl) / eps, -chi2_pq / 2, rtol=0.05, atol=1e-3)
        torch.testing.assert_close((hi / eps - rkl) / eps, -chi2_qp / 2, rtol=0.05, atol=1e-3)
        torch.testing.assert_close(lo / eps, fkl, rtol=20 * eps * chi2_pq.max().item(), atol=0)
    # near the endpoints the formula is small: the endpoint values are limits of gjsd/beta, gjsd/(1-beta)
    tiny = 1e-6
    torch.testing.assert_close(kd_loss(s, t, objective="gjsd", beta=tiny, reduction="none") / tiny, fkl,
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(kd_loss(s, t, objective="gjsd", beta=1 - tiny, reduction="none") / tiny, rkl,
                               rtol=1e-5, atol=0)
    assert torch.all(kd_loss(s, t, objective="gjsd", beta=tiny, reduction="none") < 1e-5 * fkl)


def test_skew_limits():
    s, t, mask = _inputs(seed=4)
    for skew, base in (("skew_fkl", "fkl"), ("skew_rkl", "rkl")):
        torch.testing.assert_close(
            kd_loss(s, t, mask, objective=skew, alpha=0.0), kd_loss(s, t, mask, objective=base)
        )
        assert kd_loss(s, t, mask, objective=skew, alpha=1.0).item() == 0.0
        # a mixture with weight alpha on the first argument bounds the KL by -log(alpha)
        assert torch.all(kd_loss(s * 10, t * 10, objective=skew, alpha=0.1, reduction="none") <= -math.log(0.1) + 1e-5)


def test_tvd_in_unit_interval():
    s, t, _ = _inputs(seed=5, scale=6.0)
    out = kd_loss(s, t, objective="tvd", reduction="none")
    assert torch.all((out >= 0) & (out <= 1))
    far = torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]])
    torch.testing.assert_close(kd_loss(*far, objective="tvd").item(), 1.0, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- masking / reduction
@pytest.mark.parametrize("objective", NAMES)
def test_masked_positions_do_not_matter(objective):
    s, t, mask = _inputs(seed=6)
    base = kd_loss(s, t, mask, objective=objective)
    s2, t2 = s.clone().requires_grad_(), t.clone()
    with torch.no_grad():
        s2[~mask] = float("nan")
        t2[~mask] = float("-inf")
    out = kd_loss(s2, t2, mask, objective=objective)
    assert out.item() == pytest.approx(base.item(), rel=1e-6)
    out.backward()
    assert torch.isfinite(s2.grad).all() and torch.all(s2.grad[~mask] == 0)
    none = kd_loss(s2, t2, mask, objective=objective, reduction="none")
    assert torch.all(none[~mask] == 0) and torch.isfinite(none).all()


def test_all_masked_is_zero_without_nan():
    s, t, _ = _inputs()
    s = s.requires_grad_()
    mask = torch.zeros(B, T, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        out = kd_loss(s, t, mask, reduction=reduction)
        assert out.item() == 0.0
    out.backward()
    assert torch.all(s.grad == 0)
    assert torch.all(kd_loss(s, t, mask, reduction="none") == 0)


def test_integer_mask_equals_bool_mask():
    s, t, mask = _inputs(seed=7)
    assert kd_loss(s, t, mask.long()).item() == kd_loss(s, t, mask).item()


@pytest.mark.parametrize("objective", NAMES)
def test_reductions_consistent(objective):
    s, t, mask = _inputs(seed=8)
    none = kd_loss(s, t, mask, objective=objective, reduction="none")
    assert none.shape == (B, T)
    total = kd_loss(s, t, mask, objective=objective, reduction="sum")
    mean = kd_loss(s, t, mask, objective=objective, reduction="mean")
    torch.testing.assert_close(none.sum(), total)
    torch.testing.assert_close(mean, total / mask.sum())
    torch.testing.assert_close(kd_loss(s, t, objective=objective), kd_loss(s, t, objective=objective, reduction="none").mean())


def test_gradient_accumulation_uses_token_count():
    s, t, _ = _inputs(seed=9, shape=(4, 6, V))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:2, :5] = True  # micro-batch 1: 10 tokens
    mask[2:, :1] = True  # micro-batch 2: 2 tokens
    micro = [(s[:2], t[:2], mask[:2]), (s[2:], t[2:], mask[2:])]
    accumulated = sum(kd_loss(a, b, m, reduction="sum") for a, b, m in micro) / mask.sum()
    full = kd_loss(s, t, mask)
    torch.testing.assert_close(accumulated, full)
    mean_of_means = sum(kd_loss(a, b, m) for a, b, m in micro) / len(micro)
    assert abs(mean_of_means.item() - full.item()) > 1e-3


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("objective", NAMES)
def test_bf16_inputs(objective):
    s, t, mask = _inputs(seed=10)
    s16, t16 = s.bfloat16(), t.bfloat16()
    out = kd_loss(s16, t16, mask, objective=objective, temperature=2.0)
    assert out.dtype == torch.float32
    # computed in float32: identical to the float32 loss of the rounded inputs ...
    assert out.item() == kd_loss(s16.float(), t16.float(), mask, objective=objective, temperature=2.0).item()
    # ... and close to the unrounded float32 loss
    ref = kd_loss(s, t, mask, objective=objective, temperature=2.0)
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=1e-3)


@pytest.mark.parametrize("objective", NAMES)
def test_padded_teacher_vocab_neg_inf(objective):
    s, t, mask = _inputs(seed=11, shape=(B, T, V + 5))
    t[..., V:] = float("-inf")  # teacher vocab padded beyond the tokenizer
    s[..., V + 1] = float("-inf")  # a student token that is also zero under the teacher
    s_ok = s.clone()
    s[0, 0, 3] = float("-inf")  # a banned student token the teacher likes (fkl truly +inf)
    for s_in in (s.clone(), s_ok.clone()):  # finite value and finite grads either way
        s_in.requires_grad_()
        tt = t.clone().requires_grad_()
        out = kd_loss(s_in, tt, mask, objective=objective, temperature=1.5)
        assert torch.isfinite(out)
        out.backward()
        assert torch.isfinite(s_in.grad).all() and torch.isfinite(tt.grad).all()
    out = kd_loss(s_ok, t, mask, objective=objective, temperature=1.5)
    ref = ref_loss(s_ok, t, mask, objective=objective, tau=1.5)
    if objective == "rkl":
        # KL(P_S||P_T) is truly +inf (P_T = 0 < P_S on the pad); it is capped at the floor:
        # each such token costs P_S * (log P_S - LOG_PROB_FLOOR)
        assert torch.isinf(ref)
        q = torch.softmax(s_ok.double() / 1.5, -1)
        p_log = torch.log_softmax(t.double() / 1.5, -1).clamp_min(LOG_PROB_FLOOR)
        capped = (torch.where(q > 0, q * (q.log() - p_log), 0.0)).sum(-1) * 1.5**2
        ref = capped[mask].mean()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", NAMES)
def test_gradcheck(objective):
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    f = lambda a, b: kd_loss(a, b, mask, objective=objective, temperature=1.7, beta=0.3, alpha=0.2)  # noqa: E731
    assert torch.autograd.gradcheck(f, (s, t))
    ids = torch.randn(2, 3, 5, generator=g).topk(3, -1).indices
    z = t.detach().gather(-1, ids)
    lz = (t.detach() / 1.7).logsumexp(-1)
    fs = lambda a: sparse_kd_loss(a, z, ids, lz, mask, objective=objective, temperature=1.7, beta=0.3, alpha=0.2)  # noqa: E731
    assert torch.autograd.gradcheck(fs, (s,))


# --------------------------------------------------------------------------- sparse (top-k cache)
@pytest.mark.parametrize("objective", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sparse_equals_dense_at_full_k(objective, tau):
    s, t, mask = _inputs(seed=13, dtype=torch.float64)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    ids = perm.expand(B, T, V).contiguous()  # any order of all V ids, not only sorted
    z, lz = t.gather(-1, ids), (t / tau).logsumexp(-1)
    kw = dict(objective=objective, temperature=tau, beta=0.3, alpha=0.2)
    for reduction in ("mean", "none"):
        torch.testing.assert_close(
            sparse_kd_loss(s, z, ids, lz, mask, reduction=reduction, **kw),
            kd_loss(s, t, mask, reduction=reduction, **kw),
            rtol=1e-10,
            atol=1e-12,
        )
    s32, t32 = s.float(), t.float()
    z32, ids32, lz32 = _topk_cache(t32, V, tau)
    torch.testing.assert_close(
        sparse_kd_loss(s32, z32, ids32, lz32, mask, **kw), kd_loss(s32, t32, mask, **kw), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("objective", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sparse_lower_bound_for_k_below_vocab(objective, tau):
    """All six objectives are f-divergences; bucketing the tail is a deterministic map of both
    distributions, so the data-processing inequality gives sparse <= dense for every k. Float64:
    in float32 a tiny teacher tail (here one token, ~1e-6) is only known to the precision of the
    cached logZ, which rkl (log of the teacher tail weighted by the student's) can amplify."""
    s, t, mask = _inputs(seed=14, scale=3.0, dtype=torch.float64)
    dense = kd_loss(s, t, mask, objective=objective, temperature=tau, reduction="none")
    prev = torch.zeros_like(dense)
    for k in (1, 3, 6, V - 1):
        z, ids, lz = _topk_cache(t, k, tau)
        sp = sparse_kd_loss(s, z, ids, lz, mask, objective=objective, temperature=tau, reduction="none")
        assert torch.isfinite(sp).all()
        assert torch.all(sp <= dense + 1e-10)
        assert torch.all(sp >= prev - 1e-10)  # a finer partition: monotone in k (top-k sets nest)
        prev = sp


@pytest.mark.parametrize("objective", NAMES)
def test_sparse_with_padded_teacher_and_rounding(objective):
    s, t, mask = _inputs(seed=15, shape=(B, T, V + 3))
    t[..., V:] = float("-inf")
    z, ids, lz = _topk_cache(t, V + 3, 1.0)  # k = V_padded: includes -inf logits
    lz = lz - 1e-4  # a logZ slightly too small: top-k mass > 1 -> tail clamped to 0
    s = s.requires_grad_()
    out = sparse_kd_loss(s, z, ids, lz, mask, objective=objective)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_sparse_shape_errors():
    s, t, _ = _inputs()
    z, ids, lz = _topk_cache(t, 4, 1.0)
    with pytest.raises(ValueError, match="topk_ids"):
        sparse_kd_loss(s, z, ids[..., :3], lz)
    with pytest.raises(ValueError, match="teacher_logz"):
        sparse_kd_loss(s, z, ids, lz[:, :2])
    with pytest.raises(ValueError, match="k <= V"):
        sparse_kd_loss(s[..., :3], z, ids, lz)
    # (..., 1) log-normalizers are accepted
    assert sparse_kd_loss(s, z, ids, lz.unsqueeze(-1)).item() == sparse_kd_loss(s, z, ids, lz).item()


# --------------------------------------------------------------------------- noise
def test_add_logit_noise_std_and_identity():
    x = torch.zeros(400, 1000)
    assert add_logit_noise(x, 0.0) is x
    y = add_logit_noise(x, 0.7, generator=torch.Generator().manual_seed(0))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert abs(y.std().item() - 0.7) < 0.01 and abs(y.mean().item()) < 0.01
    y2 = add_logit_noise(x, 0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, y2)
    pad = torch.tensor([1.0, float("-inf")])
    assert add_logit_noise(pad, 1.0)[1].item() == float("-inf")
    assert add_logit_noise(x.bfloat16(), 0.5).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        add_logit_noise(x, -0.1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_noise_exact_at_full_k_and_consistent(tau):
    s, t, mask = _inputs(seed=16, dtype=torch.float64)
    z, ids, lz = _topk_cache(t, V, tau)
    zn, lzn = add_topk_logit_noise(z, lz, 0.5, temperature=tau, generator=torch.Generator().manual_seed(1))
    t_noisy = torch.empty_like(t).scatter_(-1, ids, zn)  # the same noise on the dense logits
    torch.testing.assert_close(lzn, (t_noisy / tau).logsumexp(-1))
    torch.testing.assert_close(
        sparse_kd_loss(s, zn, ids, lzn, mask, temperature=tau), kd_loss(s, t_noisy, mask, temperature=tau)
    )
    # k < V, scale_tail=False: the unnormalized tail mass is kept as is
    z, ids, lz = _topk_cache(t, 4, tau)
    zn, lzn = add_topk_logit_noise(z, lz, 0.5, temperature=tau, scale_tail=False)
    tail_unnorm = (lz.exp() - (z / tau).exp().sum(-1))
    total = (zn / tau).exp().sum(-1) + tail_unnorm
    torch.testing.assert_close(lzn, total.log())
    # default: the tail mass times its expected noise factor
    c = math.exp(0.5**2 / (2 * tau**2))
    zn, lzs = add_topk_logit_noise(z, lz, 0.5, temperature=tau)
    torch.testing.assert_close(lzs, ((zn / tau).exp().sum(-1) + c * tail_unnorm).log())
    assert add_topk_logit_noise(z, lz, 0.0)[0] is z


def test_floor_constant():
    assert LOG_PROB_FLOOR == pytest.approx(-87.3365, abs=1e-3)


def test_topk_noise_tail_scaling_matches_dense_noise():
    """With a many-token tail, scaling the tail by exp(sigma^2 / (2 tau^2)) approximates the
    densely noised teacher (same noise on the top-k, fresh noise on the tail) better than
    keeping it."""
    n, vocab, k, tau, sigma = 128, 1024, 8, 1.0, 1.0
    g = torch.Generator().manual_seed(17)
    rank = torch.arange(1, vocab + 1, dtype=torch.float64)
    t = (-1.5 * rank.log())[torch.argsort(torch.rand(n, vocab, generator=g), -1)]
    s = t + torch.randn(n, vocab, generator=g, dtype=torch.float64)
    z, ids, lz = _topk_cache(t, k, tau)
    out = {}
    for scale in (True, False):
        zn, lzn = add_topk_logit_noise(z, lz, sigma, tau, torch.Generator().manual_seed(3), scale_tail=scale)
        out[scale] = sparse_kd_loss(s, zn, ids, lzn, temperature=tau).item()
    tn = (t + sigma * torch.randn(n, vocab, generator=g, dtype=torch.float64)).scatter(-1, ids, zn)
    target = sparse_kd_loss(s, zn, ids, (tn / tau).logsumexp(-1), temperature=tau).item()
    assert abs(out[True] - target) < abs(out[False] - target)
    assert abs(out[True] - target) < 0.02 * target


def test_exact_teacher_tail_fixes_a_confident_teacher_whose_head_mass_rounds_to_one():
    """1 - (top-k mass) rounds to 0 in float32 for a confident teacher; the stored exact tail
    log-mass keeps rkl at its float64 bucketed value instead of the floor's ~87-nat penalty."""
    torch.manual_seed(0)
    V, k = 64, 4
    t = torch.zeros(3, V, dtype=torch.float64)
    t[:, 0] = 60.0  # tail mass ~ 60 * e^-60: exactly 0 after float32 rounding of the head
    s = torch.randn(3, V, dtype=torch.float64)
    top, ids = t.topk(k, dim=-1)
    logz = t.logsumexp(-1)
    tail = t.scatter(-1, ids, float("-inf")).logsumexp(-1)
    # float64 reference on the k + 1 buckets
    tp = torch.cat([top - logz[:, None], (tail - logz)[:, None]], -1).exp()
    sl = s.log_softmax(-1)
    sp = torch.cat([sl.gather(-1, ids), sl.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)], -1).exp()
    ref = (sp * (sp.log() - tp.log())).sum(-1).mean()
    f32 = dict(objective="rkl", temperature=1.0)
    exact = sparse_kd_loss(s.float(), top.float(), ids, logz.float(), teacher_tail_logz=tail.float(), **f32)
    rounded = sparse_kd_loss(s.float(), top.float(), ids, logz.float(), **f32)
    assert exact.item() == pytest.approx(ref.item(), rel=1e-4)
    assert rounded.item() > ref.item() + 10  # the empty-tail floor overweights the student's tail


# --------------------------------------------------------------------------- sparse, sampled tail
def _tail_samples(t, k, temperatures, m, seed=0):
    """The cache's draw, on dense teacher logits: top-k ids, the tail logsumexp at each
    temperature, and m tail tokens per position from tail_log_proposal (with their logits, log q)."""
    ids = t.topk(k, dim=-1).indices
    rest = t.scatter(-1, ids, -math.inf)
    tail = torch.stack([(rest / tau).logsumexp(-1) for tau in temperatures], -1)
    log_q = tail_log_proposal(t, tail, temperatures, t.shape[-1] - k).scatter(-1, ids, -math.inf)
    picked = torch.multinomial(log_q.exp().reshape(-1, t.shape[-1]), m, replacement=True,
                               generator=torch.Generator().manual_seed(seed)).reshape(*t.shape[:-1], m)
    return ids, tail, log_q, dict(sample_logits=t.gather(-1, picked), sample_ids=picked,
                                  sample_log_q=log_q.gather(-1, picked))


def test_tail_proposal_is_a_distribution_over_the_tail_with_bounded_weights():
    _, t, _ = _inputs(seed=21, scale=3.0, dtype=torch.float64)
    k, temps = 3, (1.0, 2.0, 5.0)
    ids, tail, log_q, _ = _tail_samples(t, k, temps, 1)
    torch.testing.assert_close(log_q.logsumexp(-1), torch.zeros(B, T, dtype=torch.float64))
    assert torch.all((log_q.exp() >= TAIL_UNIFORM / (V - k) * (1 - 1e-12)) | log_q.isinf())
    # the teacher part is the mean of the tail conditionals at the given temperatures
    cond = torch.stack([torch.softmax(t.scatter(-1, ids, -math.inf) / tau, -1) for tau in temps]).mean(0)
    torch.testing.assert_close(log_q.exp(), (1 - TAIL_UNIFORM) * cond + TAIL_UNIFORM / (V - k) * (cond > 0))
    uniform = tail_log_proposal(t, tail, temps, V - k, uniform=1.0)
    torch.testing.assert_close(uniform, torch.full_like(t, -math.log(V - k)))
    with pytest.raises(ValueError, match="uniform"):
        tail_log_proposal(t, tail, temps, V - k, uniform=0.0)


def _sampled_variance(s, t, ids, log_q, objective, tau, control=True):
    """Exact per-position variance of the one-sample tail estimate (float64 dense reference):
    sum r^2 / q - (sum r)^2 over the tail, r = phi(p_v, s_v) - phi(pbar, s_v) with pbar the
    teacher's tail mass / (V - k) (control=False: r = phi)."""
    t_lp, s_lp = torch.log_softmax(t / tau, -1), torch.log_softmax(s / tau, -1)
    fn = OBJECTIVES[objective]
    r = fn(t_lp, s_lp, beta=0.3, alpha=0.2)
    if control:
        pbar = t_lp.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True) - math.log(t.shape[-1] - ids.shape[-1])
        r = r - fn(pbar.expand_as(s_lp), s_lp, beta=0.3, alpha=0.2)
    r = r.scatter(-1, ids, 0.0) * tau**2
    return torch.where(log_q.isfinite(), r**2 * (-log_q).exp(), 0.0).sum(-1) - r.sum(-1) ** 2


@pytest.mark.parametrize("objective", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_sampled_tail_is_unbiased_in_value_and_gradient(objective, tau):
    """R independent m-sample estimates averaged = one estimate from R * m draws (the mean over
    samples is the mean of the R means). Value: within 5 exact standard errors of kd_loss
    (Var = sum r^2 / q - (sum r)^2 per position, r = phi minus the control variate); gradient:
    within 6 standard errors per coordinate (from R independent estimates). The bucket form
    misses by far more."""
    s, t, mask = _inputs(seed=22, scale=2.0, dtype=torch.float64)
    k, temps, m, reps = 3, (1.0, 2.0, 5.0), 4, 4000
    kw = dict(objective=objective, temperature=tau, beta=0.3, alpha=0.2, reduction="none")
    ids, tail, log_q, smp = _tail_samples(t, k, temps, m * reps)
    lz, t_tail = (t / tau).logsumexp(-1), (t.scatter(-1, ids, -math.inf) / tau).logsumexp(-1)
    z = t.gather(-1, ids)
    est = sparse_kd_loss(s, z, ids, lz, mask, **kw, **smp, teacher_tail_logz=t_tail)
    dense = kd_loss(s, t, mask, **kw)
    se = (_sampled_variance(s, t, ids, log_q, objective, tau) / (m * reps)).sqrt() * mask
    assert torch.all((est - dense).abs() <= 5 * se + 1e-12)
    bucket = sparse_kd_loss(s, z, ids, lz, mask, **kw, teacher_tail_logz=t_tail)
    assert ((bucket - dense).abs() > 5 * se + 1e-12).any()  # the same criterion rejects the bucket

    grads = []
    for r in range(40):  # 40 independent estimates of m * 100 samples each
        part = {name: x[..., r * m * 100: (r + 1) * m * 100] for name, x in smp.items()}
        x = s.clone().requires_grad_()
        sparse_kd_loss(x, z, ids, lz, mask, **{**kw, "reduction": "sum"}, **part, teacher_tail_logz=t_tail).backward()
        grads.append(x.grad)
    grads = torch.stack(grads)
    x = s.clone().requires_grad_()
    kd_loss(x, t, mask, **{**kw, "reduction": "sum"}).backward()
    g_se = grads.std(0) / math.sqrt(len(grads))
    assert torch.all((grads.mean(0) - x.grad).abs() <= 6 * g_se + 1e-12)


def test_the_control_variate_carries_a_student_heavy_tail():
    """A student with tail mass where the teacher has almost none (gjsd's tail terms then follow
    the student, which the teacher-based proposal rarely draws): the estimate's spread across
    independent draws is a fraction of the plain importance-sampling estimate's exact std, and
    matches the control-variate variance."""
    s, t, _ = _inputs(seed=25, scale=3.0, dtype=torch.float64)
    k, m, reps, tau = 3, 4, 400, 1.0
    ids, tail, log_q, smp = _tail_samples(t, k, (tau,), m * reps)
    z, lz, t_tail = t.gather(-1, ids), (t / tau).logsumexp(-1), tail[..., 0]
    draws = torch.stack([sparse_kd_loss(s, z, ids, lz, objective="gjsd", beta=0.3, reduction="none",
                                        teacher_tail_logz=t_tail,
                                        **{name: x[..., r * m: (r + 1) * m] for name, x in smp.items()})
                         for r in range(reps)])
    plain = (_sampled_variance(s, t, ids, log_q, "gjsd", tau, control=False) / m).sqrt()
    with_cv = (_sampled_variance(s, t, ids, log_q, "gjsd", tau) / m).sqrt()
    assert float(draws.std(0).sum()) < 0.5 * float(plain.sum())
    torch.testing.assert_close(draws.std(0), with_cv, rtol=0.2, atol=0)


@pytest.mark.parametrize("objective", NAMES)
def test_sampled_tail_is_exact_with_one_tail_token(objective):
    """k = V - 1: every sample is the one tail token, q = 1: the estimate is the dense loss."""
    s, t, mask = _inputs(seed=23, dtype=torch.float64)
    ids, _, _, smp = _tail_samples(t, V - 1, (2.0,), 3)
    kw = dict(objective=objective, temperature=2.0, beta=0.3, alpha=0.2, reduction="none")
    torch.testing.assert_close(sparse_kd_loss(s, t.gather(-1, ids), ids, (t / 2.0).logsumexp(-1), mask, **kw, **smp),
                               kd_loss(s, t, mask, **kw), rtol=1e-12, atol=1e-13)


def test_sampled_tail_arguments():
    s, t, mask = _inputs(seed=24, dtype=torch.float64)
    ids, _, _, smp = _tail_samples(t, 4, (1.0,), 5)
    z, lz = t.gather(-1, ids), t.logsumexp(-1)
    with pytest.raises(ValueError, match="all of sample_logits"):
        sparse_kd_loss(s, z, ids, lz, sample_logits=smp["sample_logits"], sample_ids=smp["sample_ids"])
    with pytest.raises(ValueError, match="vocab axis replaced by m"):
        sparse_kd_loss(s, z, ids, lz, **{**smp, "sample_log_q": smp["sample_log_q"][..., :2]})
    # masked positions are never computed, the gradient is finite, gradcheck passes
    x = s.clone().requires_grad_()
    poisoned = {name: v.clone() for name, v in smp.items()}
    poisoned["sample_log_q"][~mask] = float("nan")
    out = sparse_kd_loss(x, z, ids, lz, mask, objective="gjsd", **poisoned)
    assert out.item() == sparse_kd_loss(s, z, ids, lz, mask, objective="gjsd", **smp).item()
    out.backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[~mask] == 0)
    f = lambda a: sparse_kd_loss(a, z, ids, lz, mask, objective="skew_rkl", temperature=1.7, **smp)  # noqa: E731
    assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(),))
