"""One training run's decisions (kd_utils.distill): which teacher signal a cached run may use."""
from __future__ import annotations

from types import SimpleNamespace

from kd_utils.distill import BUCKET_MIN_HEAD_MASS, coarse_bucket


def _cache(samples: int, mass: float):
    return SimpleNamespace(samples=samples, k=16, manifest={"head_mass": {"2.0": {"mean": mass, "p10": mass / 2}}})


def test_a_bucket_cache_serves_only_temperatures_where_the_top_k_holds_the_mass():
    assert coarse_bucket(_cache(0, BUCKET_MIN_HEAD_MASS), 2.0) is None
    reason = coarse_bucket(_cache(0, 0.28), 2.0)
    assert "28.0% of the teacher's mass in its top 16 at tau 2" in reason and "live teacher" in reason


def test_a_sampled_tail_cache_serves_every_temperature():
    assert coarse_bucket(_cache(16, 0.007), 2.0) is None
