"""Memory-bounded logits work (kd_utils.chunking): every chunked path equals the unchunked one,
and a build that cannot fit stops before compute."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from kd_utils import cache_build, cache_shards, chunking
from kd_utils.config import MemoryConfig
from kd_utils.data import Example, collate
from kd_utils.losses import kd_loss, sparse_kd_loss
from kd_utils.methods import KDSettings, LiveTeacher

V = 4096  # at chunk_mb=1 the losses take 4 positions per chunk: chunking is exercised at a small vocabulary
BIG = 1 << 20  # MB: one chunk


def tiny(vocab: int, seed: int = 0, dtype=torch.float64) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).to(dtype).eval()


def examples(vocab: int, n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = (int(x) for x in torch.randint(3, 9, (2,), generator=g))
        ids = torch.randint(1, vocab, (p + r,), generator=g).tolist()
        out.append(Example(tuple(ids[:p]), tuple(ids[p:]), 10 * i + 1, i % 2 == 1))
    return out


def logits(seed: int, shape=(3, 9, V)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


@pytest.fixture
def mask() -> torch.Tensor:
    m = torch.rand((3, 9), generator=torch.Generator().manual_seed(5)) > 0.3
    m[1] = False  # an example without targets
    return m


def _value_and_grad(loss_fn, chunk_mb, reduction):
    s = logits(0).requires_grad_(True)
    out = loss_fn(s, chunk_mb, reduction)
    (out * torch.linspace(0.5, 2.0, out.numel()).view_as(out).double()).sum().backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("objective", ["fkl", "rkl", "gjsd", "skew_fkl", "tvd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_dense_kd_loss_in_chunks_equals_one_chunk(objective, tau, reduction, mask):
    teacher = logits(1)
    teacher[0, 0] = float("nan")  # masked or not, a chunk never reads another row
    mask[0, 0] = False

    def loss(s, chunk_mb, red):
        return kd_loss(s, teacher, mask, objective=objective, temperature=tau, beta=0.3, reduction=red,
                       chunk_mb=chunk_mb)

    (v1, g1), (v2, g2) = _value_and_grad(loss, 1, reduction), _value_and_grad(loss, BIG, reduction)
    torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    assert torch.all(g1[~mask] == 0)


@pytest.mark.parametrize("objective", ["fkl", "rkl", "gjsd"])
@pytest.mark.parametrize("sampled", [False, True])
def test_sparse_kd_loss_in_chunks_equals_one_chunk(objective, sampled, mask):
    t = logits(1)
    top, ids = t.topk(16, dim=-1)
    rest = t.scatter(-1, ids, float("-inf"))
    extra = {"teacher_tail_logz": (rest / 2).logsumexp(-1)}
    if sampled:
        sids = torch.randint(0, V, (3, 9, 4), generator=torch.Generator().manual_seed(2))
        extra |= {"sample_logits": t.gather(-1, sids), "sample_ids": sids,
                  "sample_log_q": torch.full((3, 9, 4), -8.0, dtype=torch.float64)}

    def loss(s, chunk_mb, red):
        return sparse_kd_loss(s, top, ids, (t / 2).logsumexp(-1), mask, objective=objective, temperature=2.0,
                              reduction=red, chunk_mb=chunk_mb, **extra)

    for reduction in ("sum", "none"):
        (v1, g1), (v2, g2) = _value_and_grad(loss, 1, reduction), _value_and_grad(loss, BIG, reduction)
        torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_row_map_gradient_passes_gradcheck():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: (a.log_softmax(-1) * b.exp()).sum(-1)  # noqa: E731
    index = torch.tensor([0, 2, 3, 4])
    assert torch.autograd.gradcheck(lambda a, b: chunking.row_map(fn, [a, b], index, 3), (x, w))


@pytest.mark.parametrize("objective", ["fkl", "gjsd"])
def test_live_teacher_in_sub_batches_equals_one_forward(objective):
    teacher = tiny(V)
    batch = collate(examples(V, 4), 0)
    mask = batch["labels"][:, 1:] != -100
    s = KDSettings(objective, temperature=2.0)
    results = []
    for chunk_mb in (1, BIG):  # 1 MB: 2 examples per teacher forward, 8 positions per loss chunk
        live = LiveTeacher(teacher, V, chunk_mb=chunk_mb)
        student = logits(3, (*batch["input_ids"].shape, V))[:, :-1].requires_grad_(True)
        loss = live.kd_sum(student, batch, mask, s)
        loss.backward()
        results.append((loss.detach(), student.grad, live.forward_passes))
    (l1, g1, passes), (l2, g2, one) = results
    torch.testing.assert_close(l1, l2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)
    assert passes > one == 1


def _cache(tmp_path, teacher, exs, vocab, name, chunk_mb, **kw):
    return cache_shards.open_cache(cache_build.build_cache(teacher, exs, tmp_path, name, k=8, temperatures=(1.0, 2.0), progress=False,
                                        chunk_mb=chunk_mb, **kw))


def _same(a: cache_shards.TeacherCache, b: cache_shards.TeacherCache) -> None:
    for name in (*cache_shards.ROWS, "offsets", "index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_cache_built_in_chunks_equals_one_chunk(tmp_path, noise):
    """Float64 teacher: other batch shapes do not move the float32 logits, so the caches are equal
    bit for bit (noise drawn whole per example, tail samples from one generator per example)."""
    teacher, exs = tiny(V), examples(V, 7)
    small = _cache(tmp_path, teacher, exs, V, "small", 1, noise=noise, noise_seed=3)
    whole = _cache(tmp_path, teacher, exs, V, "whole", BIG, noise=noise, noise_seed=3)
    assert small.manifest["forward_passes"] > 1 == whole.manifest["forward_passes"]
    _same(small, whole)


def test_cache_of_a_262k_vocabulary_under_a_small_budget(tmp_path):
    """Gemma 3's vocabulary (262,144): 8 MB per chunk, one example per forward and one position
    per chunk, equal to the one-chunk build."""
    vocab = 262_144
    teacher, exs = tiny(vocab, dtype=torch.float32).double(), examples(vocab, 3)
    small = _cache(tmp_path, teacher, exs, vocab, "small", 8)
    whole = _cache(tmp_path, teacher, exs, vocab, "whole", 4096)
    assert (small.manifest["forward_passes"], whole.manifest["forward_passes"]) == (3, 1)
    assert small.ids.dtype == torch.int32
    _same(small, whole)


def test_a_build_that_cannot_fit_stops_before_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(chunking, "available_bytes", lambda device: 256 << 10)  # less than one example needs
    teacher = tiny(V)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(MemoryError, match=r"teacher cache build .* lower memory.chunk_mb"):
        _cache(tmp_path, teacher, examples(V, 2), V, "x", 100)
    assert calls == [] and not (tmp_path / "x").exists()


def test_memory_config():
    assert MemoryConfig().chunk_mb is None and MemoryConfig(chunk_mb=512).chunk_mb == 512
    with pytest.raises(ValueError, match="greater than 0"):
        MemoryConfig(chunk_mb=0)
    assert chunking.budget_bytes(None, "cpu") == chunking.DEFAULT_CHUNK_MB["cpu"] << 20
    assert chunking.budget_bytes(None, "cuda") == chunking.DEFAULT_CHUNK_MB["cuda"] << 20
    assert chunking.budget_bytes(3, "cuda") == 3 << 20
