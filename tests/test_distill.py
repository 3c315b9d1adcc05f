"""One training run's decisions (kd_utils.distill, kd_utils.teachers.probe_cache): a cached teacher
signal serves a run only when it reproduces the live teacher on a probe batch of that run's student
and data."""
from __future__ import annotations

import pytest
import torch

from kd_utils.cache_build import build_cache
from kd_utils.cache_shards import open_cache
from kd_utils.data import collate
from kd_utils.methods import KDSettings, LiveTeacher
from kd_utils.models import build_micro_model
from kd_utils.teachers import CACHE_MAX_LOSS_ERROR, CACHE_MIN_GRAD_COSINE, CachedTeacher, probe_cache


@pytest.fixture(scope="module")
def setup(micro, tmp_path_factory):
    examples = micro.examples[:24]
    student = build_micro_model("micro-xs", micro.vocab, seed=3, eos_token_id=micro.eos, pad_token_id=micro.pad)
    root = tmp_path_factory.mktemp("probe-cache")
    caches = {name: open_cache(build_cache(micro.teacher, examples, root, name, k=k, temperatures=(1.0, 5.0),
                                           samples=m, progress=False))
              for name, k, m in (("exact", micro.vocab, 0), ("coarse", 2, 0))}
    return micro, student, collate(examples[:8], micro.pad), caches


def _probe(setup, cache: str, objective: str, tau: float) -> dict:
    micro, student, batch, caches = setup
    settings = KDSettings(method=objective, temperature=tau)
    return probe_cache(CachedTeacher(caches[cache], micro.vocab), LiveTeacher(micro.teacher, micro.vocab),
                       student, batch, settings, micro.vocab)


@pytest.mark.parametrize("objective", ["fkl", "rkl", "gjsd"])
def test_a_cache_holding_the_whole_vocabulary_reproduces_the_live_teacher(setup, objective):
    probe = _probe(setup, "exact", objective, 5.0)
    assert abs(probe["loss_error"]) < 1e-3 and probe["grad_cosine"] > 0.999


def test_a_two_token_bucket_at_tau_5_is_refused_by_the_probe(setup):
    probe = _probe(setup, "coarse", "rkl", 5.0)
    assert abs(probe["loss_error"]) > CACHE_MAX_LOSS_ERROR or probe["grad_cosine"] < CACHE_MIN_GRAD_COSINE


def test_the_probe_leaves_the_student_and_its_mode_as_they_were(setup):
    _, student, _, _ = setup
    student.train()
    before = [p.detach().clone() for p in student.parameters()]
    _probe(setup, "coarse", "fkl", 1.0)
    assert student.training and all(p.grad is None for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
