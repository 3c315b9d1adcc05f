"""Distillation recipes (kd_utils.methods) and one distillation run per method
(kd_utils.distill.run_distillation): a tiny student trained a few dozen steps with every
method must fit its objective and come closer to its teacher on held-out text."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from kd_utils.config import DistillJob, KDConfig, TrainingConfig
from kd_utils.data import IGNORE, Example, collate
from kd_utils.fidelity import distribution_fidelity
from kd_utils.losses import OBJECTIVES
from kd_utils.methods import METHODS, KDSettings, LiveTeacher, OnPolicySampler, kd_objective
from kd_utils.models import build_micro_model, load_model
from kd_utils.training import accumulate_gradients, token_ce

KD_METHODS = [m for m in METHODS if m not in ("sft", "seqkd")]


def test_methods_are_the_baselines_and_every_objective():
    assert set(METHODS) == {"sft", "seqkd", "gkd", *OBJECTIVES}
    assert {"fkl", "rkl", "gjsd", "skew_fkl", "skew_rkl", "tvd"} <= set(METHODS)


# --- KDSettings -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_kd_settings_accepts_every_method(method):
    s = KDSettings(method)
    assert s.objective == ("gjsd" if method == "gkd" else method)
    assert s.uses_teacher_logits == (method not in ("sft", "seqkd"))


@pytest.mark.parametrize("method", ["kd", "FKL", "reverse_kl", ""])
def test_kd_settings_rejects_an_unknown_method_naming_the_known_ones(method):
    with pytest.raises(ValueError, match="unknown method.*fkl"):
        KDSettings(method)


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=-1.0), dict(lmbda=1.5), dict(beta=-0.1),
                                dict(ce_weight=2.0), dict(noise=-0.5)])
def test_kd_settings_rejects_out_of_range_options(kw):
    with pytest.raises(ValueError):
        KDSettings("fkl", **kw)


# --- LiveTeacher ------------------------------------------------------------------------------

@pytest.fixture
def batch(world):
    return collate(world.examples[:6], world.pad)


@pytest.fixture
def wide(world):
    """A teacher whose logits are 8 columns wider than the shared vocabulary (as Qwen2.5-7B's)."""
    return build_micro_model("micro-xs", world.vocab + 8, seed=3)


def test_live_teacher_slices_wider_logits_to_the_vocabulary(world, wide, batch):
    t = LiveTeacher(wide, world.vocab)
    out = t.logits(batch)
    with torch.no_grad():
        full = wide(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.shape == (*batch["input_ids"].shape, world.vocab) and out.dtype == torch.float32
    torch.testing.assert_close(out, full[..., : world.vocab].float())


def test_live_teacher_is_frozen_and_counts_forward_passes(world, wide, batch):
    t = LiveTeacher(wide, world.vocab)
    assert not wide.training and not any(p.requires_grad for p in wide.parameters())
    for _ in range(3):
        t.logits(batch)
    assert t.forward_passes == 3


@pytest.mark.parametrize("sigma", [1.0, 5.0])
def test_live_teacher_noise_has_the_requested_std_and_is_fresh_per_batch(world, wide, batch, sigma):
    clean = LiveTeacher(wide, world.vocab).logits(batch)
    noisy = LiveTeacher(wide, world.vocab, noise=sigma, seed=0)
    first, second = noisy.logits(batch) - clean, noisy.logits(batch) - clean
    assert first.std().item() == pytest.approx(sigma, rel=0.02)
    assert abs(first.mean().item()) < 0.02 * sigma
    assert not torch.allclose(first, second), "each batch draws new noise"
    again = LiveTeacher(wide, world.vocab, noise=sigma, seed=0).logits(batch) - clean
    torch.testing.assert_close(again, first)
    other = LiveTeacher(wide, world.vocab, noise=sigma, seed=1).logits(batch) - clean
    assert not torch.allclose(other, first)


# --- kd_objective -----------------------------------------------------------------------------------

@pytest.fixture
def xs(world):
    return build_micro_model("micro-xs", world.vocab, seed=0)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_kd_objective_is_zero_when_the_student_is_the_teacher(world, xs, batch, objective):
    teacher = LiveTeacher(copy.deepcopy(xs), world.vocab)
    loss, n = kd_objective(teacher, KDSettings(objective, temperature=2.0), world.vocab)(xs, batch)
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    assert abs(float(loss.detach())) < 1e-4 * n


@pytest.mark.parametrize("method", KD_METHODS)
def test_kd_objective_is_positive_and_sums_over_rows(world, micro, xs, method):
    """Summed over target positions: a batch's loss is the sum of its rows' losses."""
    objective = kd_objective(LiveTeacher(micro.teacher, world.vocab), KDSettings(method), world.vocab)
    rows = world.examples[:4]
    loss, n = objective(xs, collate(rows, world.pad))
    parts = [objective(xs, collate([e], world.pad)) for e in rows]
    assert float(loss.detach()) > 0
    assert n == sum(p[1] for p in parts) == sum(len(e.response_ids) for e in rows)
    assert float(loss.detach()) == pytest.approx(sum(float(p[0].detach()) for p in parts), rel=1e-4)


def test_kd_objective_ce_weight_mixes_kd_and_cross_entropy_linearly(world, micro, xs, batch):
    teacher = LiveTeacher(micro.teacher, world.vocab)

    def value(w):
        return float(kd_objective(teacher, KDSettings("fkl", ce_weight=w), world.vocab)(xs, batch)[0].detach())

    ce, _ = token_ce(xs, batch)
    kd, mixed = value(0.0), value(0.3)
    assert value(1.0) == pytest.approx(float(ce.detach()), rel=1e-5)
    assert mixed == pytest.approx(0.7 * kd + 0.3 * float(ce.detach()), rel=1e-5)


class _Wider(torch.nn.Module):
    """A student whose logits carry extra (padded-vocabulary) columns with huge values."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=torch.cat([logits, torch.full_like(logits[..., :8], 50.0)], -1))


def test_kd_objective_ignores_student_logits_beyond_the_vocabulary(world, micro, xs, batch):
    objective = kd_objective(LiveTeacher(micro.teacher, world.vocab), KDSettings("rkl"), world.vocab)
    plain, _ = objective(xs, batch)
    wider, _ = objective(_Wider(xs), batch)
    assert float(wider.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)


def test_kd_gradients_reach_the_student_only(world, micro, xs, batch):
    objective = kd_objective(LiveTeacher(micro.teacher, world.vocab), KDSettings("gjsd"), world.vocab)
    loss, _ = objective(xs, batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in xs.parameters())
    assert all(p.grad is None for p in micro.teacher.parameters())


def test_kd_gradient_accumulation_equals_the_concatenated_batch(world, micro, xs):
    objective = kd_objective(LiveTeacher(micro.teacher, world.vocab), KDSettings("fkl", temperature=2.0), world.vocab)
    short, long = world.examples[:2], world.examples[2:9]
    accumulate_gradients(xs, [collate(short, world.pad), collate(long, world.pad)], objective)
    accumulated = [p.grad.clone() for p in xs.parameters()]
    xs.zero_grad(set_to_none=True)
    accumulate_gradients(xs, [collate(short + long, world.pad)], objective)
    for a, p in zip(accumulated, xs.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


# --- OnPolicySampler ---------------------------------------------------------------------------------

def _prompt_len(labels_row: torch.Tensor) -> int:
    return int((labels_row != IGNORE).nonzero()[0])


def test_on_policy_sampler_with_lmbda_1_replaces_every_response_keeping_prompts(world, xs):
    gold = collate(world.examples[3:8], world.pad)
    sampler = OnPolicySampler(1.0, max_new_tokens=12, pad_id=world.pad, eos_id=world.eos, seed=0)
    xs.train()
    for call in range(1, 4):
        new = sampler(xs, gold)
        assert sampler.on_policy_batches == call
        assert xs.training, "the model's training flag is restored"
        assert torch.equal(new["index"], gold["index"])
        assert not torch.equal(new["input_ids"], gold["input_ids"])
        for r in range(len(gold["index"])):
            p = _prompt_len(gold["labels"][r])
            assert _prompt_len(new["labels"][r]) == p
            assert torch.equal(new["input_ids"][r, :p], gold["input_ids"][r, :p]), "same prompt"
            n = int(new["attention_mask"][r].sum())
            response = new["input_ids"][r, p:n].tolist()
            assert 1 <= len(response) <= 12
            assert new["labels"][r, p:n].tolist() == response
            assert new["labels"][r, n:].eq(IGNORE).all() and new["labels"][r, :p].eq(IGNORE).all()
            assert world.eos not in response[:-1], "a sample ends at its first eos"


def test_under_authors_on_policy_samples_keep_the_prompt_in_the_loss(world, xs):
    """The authors' GKD labels the whole sampled sequence (their generate_new_inputs masks pads only)."""
    examples = [Example(e.prompt_ids, e.response_ids, e.index, loss_on_prompt=True) for e in world.examples[3:6]]
    gold = collate(examples, world.pad)
    new = OnPolicySampler(1.0, max_new_tokens=6, pad_id=world.pad, eos_id=world.eos, seed=0,
                          loss_on_prompt=True)(xs, gold)
    for r, e in enumerate(examples):
        n = int(new["attention_mask"][r].sum())
        assert new["labels"][r, :n].tolist() == new["input_ids"][r, :n].tolist()
        assert new["input_ids"][r, :len(e.prompt_ids)].tolist() == list(e.prompt_ids)


def test_on_policy_sampler_with_lmbda_0_never_samples(world, xs):
    gold = collate(world.examples[:4], world.pad)
    sampler = OnPolicySampler(0.0, max_new_tokens=8, pad_id=world.pad, eos_id=world.eos)
    for _ in range(20):
        assert sampler(xs, gold) is gold
    assert sampler.on_policy_batches == 0


def test_on_policy_sampler_replaces_about_lmbda_of_the_batches(world, xs):
    gold = collate(world.examples[:2], world.pad)
    sampler = OnPolicySampler(0.3, max_new_tokens=2, pad_id=world.pad, eos_id=world.eos, seed=1)
    replaced = sum(sampler(xs, gold) is not gold for _ in range(200))
    assert replaced == sampler.on_policy_batches
    assert 0.2 <= replaced / 200 <= 0.4


def test_on_policy_sampler_is_deterministic_from_its_seed(world, xs):
    gold = collate(world.examples[:4], world.pad)
    runs = [[OnPolicySampler(1.0, 10, world.pad, world.eos, seed=s)(xs, gold)["input_ids"] for _ in range(1)]
            for s in (5, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][0], runs[2][0])


# --- one distillation run per method --------------------------------------------------------------------

STEPS = 40


def _job(micro, method, tmp, cache=False, **kd):
    return DistillJob(
        student="micro-xs", student_path=str(micro.student_dir), method=method, teacher="micro-s",
        teacher_path="" if method == "sft" else str(micro.teacher_dir), temperature=1.0, steps=STEPS,
        training=TrainingConfig(train_tasks=micro.tasks, steps=STEPS, lr=5e-3, batch_size=16, warmup_steps=5,
                                eval_every=10, n_val=20, max_length=micro.max_length, autocast="off"),
        kd=KDConfig(teacher_cache=cache, **kd), data_root=str(micro.data_root), cache_root=str(tmp / "cache"))


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def runs(micro, tmp_path_factory):
    """run(method, cache) -> (result, run_dir), each distinct run done once per module."""
    from kd_utils.distill import run_distillation

    done = {}

    def run(method, cache=False):
        if (method, cache) not in done:
            tmp = tmp_path_factory.mktemp(f"{method}_{cache}")
            done[method, cache] = (run_distillation(_job(micro, method, tmp, cache), tmp / "run", progress=False),
                                   tmp / "run")
        return done[method, cache]
    return run


@torch.no_grad()
def _heldout_objective(micro, model, method) -> float:
    """The method's own training objective per target token on the held-out batches (cross-entropy
    on gold text for sft and seqkd)."""
    if method in ("sft", "seqkd"):
        objective = token_ce
    else:
        objective = kd_objective(LiveTeacher(micro.teacher, micro.vocab), KDSettings(method), micro.vocab)
    total, n = 0.0, 0
    for b in micro.heldout:
        loss, k = objective(model, b)
        total, n = total + float(loss), n + k
    return total / n


def _check_learns_the_teacher(micro, result, run_dir, method):
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert _mean(losses[-5:]) < 0.95 * _mean(losses[:5]), f"{method}: the training loss must fall"
    before, _ = load_model(str(micro.student_dir), dtype=torch.float32)
    after, _ = load_model(str(run_dir / "model"), dtype=torch.float32)
    obj_before, obj_after = _heldout_objective(micro, before, method), _heldout_objective(micro, after, method)
    assert obj_after < 0.9 * obj_before, f"{method}: held-out objective {obj_before:.3f} -> {obj_after:.3f}"
    fid_before = distribution_fidelity(before, micro.teacher, micro.heldout)
    fid_after = distribution_fidelity(after, micro.teacher, micro.heldout)
    assert fid_after["kl"] < 0.8 * fid_before["kl"], (method, fid_before, fid_after)
    assert fid_after["top1_agreement"] > fid_before["top1_agreement"] + 0.05, (method, fid_before, fid_after)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_fits_its_objective_and_moves_the_student_toward_the_teacher(micro, runs, method):
    result, run_dir = runs(method)
    _check_learns_the_teacher(micro, result, run_dir, method)
    assert result["method"] == method and result["steps"] == STEPS
    assert result["on_policy_batches"] > 0 if method == "gkd" else result["on_policy_batches"] == 0
    if method in ("sft", "seqkd"):
        assert result["teacher_signal"] is None and result["teacher_forward_passes"] == 0
    else:
        assert result["teacher_signal"] == "LiveTeacher"
        assert result["teacher_forward_passes"] == STEPS, "one live-teacher pass per (single micro-batch) step"
    manifest = json.loads((run_dir / "model" / "kd_manifest.json").read_text())
    assert manifest["method"] == method and manifest["adapter"] is False


def test_fkl_from_the_teacher_cache_learns_and_matches_the_live_teacher(micro, runs):
    live, _ = runs("fkl", cache=False)
    cached, run_dir = runs("fkl", cache=True)
    assert cached["teacher_signal"] == "CachedTeacher"
    _check_learns_the_teacher(micro, cached, run_dir, "fkl")
    # Same first batch and weights: the cache (top k + sampled tail, unbiased) is within its probe's bound.
    assert cached["cache_probe"]["served"] and abs(cached["cache_probe"]["loss_error"]) <= 0.01
    first_live, first_cached = live["history"][0]["loss"], cached["history"][0]["loss"]
    assert abs(first_cached / first_live - 1) <= 0.02


def test_gkd_with_the_cache_runs_the_teacher_only_on_its_student_samples(micro, runs):
    live, _ = runs("gkd", cache=False)
    cached, run_dir = runs("gkd", cache=True)
    fkl_cached, _ = runs("fkl", cache=True)
    assert cached["teacher_signal"] == "OnPolicyTeacher"
    _check_learns_the_teacher(micro, cached, run_dir, "gkd")
    # The same coin flips, so the same batches are on-policy; the teacher ran on those and built the cache.
    assert cached["on_policy_batches"] == live["on_policy_batches"] > 0
    assert cached["teacher_forward_passes"] == fkl_cached["teacher_forward_passes"] + cached["on_policy_batches"]
    assert cached["teacher_forward_passes"] - fkl_cached["teacher_forward_passes"] < live["teacher_forward_passes"]


def _manifests(cache_root):
    return {p: p.stat().st_mtime_ns for p in cache_root.rglob("manifest.json")}


def test_a_second_cached_run_reuses_the_cache_and_reproduces_the_run(micro, runs):
    first, run_dir = runs("fkl", cache=True)
    cache_root = run_dir.parent / "cache"
    built = _manifests(cache_root)
    assert len(built) == 1
    from kd_utils.distill import run_distillation

    second = run_distillation(_job(micro, "fkl", run_dir.parent, cache=True), run_dir.parent / "again", progress=False)
    assert _manifests(cache_root) == built, "the cache must not be rebuilt"
    assert second["teacher_forward_passes"] == 0, "the teacher must not run again"
    assert [h["loss"] for h in second["history"]] == [h["loss"] for h in first["history"]]


def test_a_run_that_builds_the_cache_reports_the_teacher_passes_it_ran(micro, runs):
    result, run_dir = runs("fkl", cache=True)
    (manifest,) = [json.loads(p.read_text()) for p in (run_dir.parent / "cache").rglob("manifest.json")]
    assert manifest["forward_passes"] > 0
    assert result["teacher_forward_passes"] == manifest["forward_passes"]


def test_a_job_with_steps_only_in_its_training_section_trains_that_many_steps(micro, tmp_path):
    from kd_utils.distill import run_distillation

    job = _job(micro, "sft", tmp_path).model_copy(update={"steps": None, "training": TrainingConfig(
        train_tasks=micro.tasks, steps=3, batch_size=16, warmup_steps=1, n_val=20, max_length=micro.max_length)})
    assert run_distillation(job, tmp_path / "run", progress=False)["steps"] == 3
