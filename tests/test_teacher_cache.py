"""The offline teacher cache on a tiny real setup (conftest's `micro`): micro world data, a BPE
tokenizer and a micro-s teacher trained 150 steps (peaked, not random)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from kd_utils import cache_build, cache_keys, cache_shards, evaluation, seqkd_store, teachers
from kd_utils.data import IGNORE, collate, epoch_batches
from kd_utils.losses import OBJECTIVES, sparse_kd_loss, tail_log_proposal
from kd_utils.methods import KDSettings, LiveTeacher, kd_objective
from kd_utils.models import build_micro_model
from kd_utils.tasks import training_pairs
from kd_utils.training import OptimSettings, cycle_steps, train

TEMPS = (1.0, 2.0)


@pytest.fixture(scope="module")
def setup(micro):
    """conftest's micro world and trained micro-s teacher, plus the training pairs' text."""
    prompts, responses = training_pairs(micro.train_items)
    return SimpleNamespace(**vars(micro), prompts=prompts, responses=responses)


def _build(s, out, k, temperatures=TEMPS, **kw):
    key = cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length, k, kw.get("noise", 0.0), kw.get("noise_seed", 0),
                       samples=kw.get("samples", 16), sample_seed=kw.get("sample_seed", 0))
    return cache_build.ensure_cache(s.teacher, s.examples, out, key, k=k, temperatures=temperatures, batch_size=32,
                           shard_examples=50, progress=False, **kw)


@pytest.fixture(scope="module")
def caches(setup, tmp_path_factory):
    """One-bucket tails (samples=0) at several k, and the whole vocabulary."""
    out = tmp_path_factory.mktemp("caches")
    return {k: _build(setup, out, k, samples=0) for k in (4, 16, 64, setup.vocab)}


@pytest.fixture(scope="module")
def sampled(setup, tmp_path_factory):
    """The default cache: k = 16 and 16 importance-sampled tail tokens per position."""
    return _build(setup, tmp_path_factory.mktemp("sampled"), 16)


def _batch(s, n=24, seed=0, examples=None):
    """A training-like batch: shuffled examples (index order != batch order), right-padded."""
    examples = examples or s.examples
    picked = random.Random(seed).sample(range(len(examples)), n)
    b = collate([examples[i] for i in picked], s.pad)
    return b, b["labels"][:, 1:] != IGNORE


@pytest.fixture(scope="module")
def student_logits(setup):
    b, mask = _batch(setup)
    student = build_micro_model("micro-xs", setup.vocab, seed=1).eval()
    with torch.no_grad():
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    return logits, b, mask


# --------------------------------------------------------------------------- keys
def test_key_changes_with_every_ingredient(setup, tmp_path):
    s = setup
    base = cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length, 16, 0.0, 0)
    assert base == cache_keys.cache_key(s.teacher_dir, s.tok, list(s.examples), s.max_length, 16, 0.0, 0)
    assert len(base) == 16 and int(base, 16) >= 0

    moved = copy.deepcopy(s.teacher)
    with torch.no_grad():
        moved.model.norm.weight[0] += 1e-3
    moved.save_pretrained(tmp_path / "moved")
    e0 = s.examples[0]
    edited = [type(e0)(e0.prompt_ids, (e0.response_ids[0] + 1,) + e0.response_ids[1:], 0)] + s.examples[1:]
    tok2 = copy.deepcopy(s.tok)
    tok2.add_tokens(["zzqx"])
    variants = {
        "weights (dir)": cache_keys.cache_key(tmp_path / "moved", s.tok, s.examples, s.max_length, 16),
        "tokenizer": cache_keys.cache_key(s.teacher_dir, tok2, s.examples, s.max_length, 16),
        "one token": cache_keys.cache_key(s.teacher_dir, s.tok, edited, s.max_length, 16),
        "one example fewer": cache_keys.cache_key(s.teacher_dir, s.tok, s.examples[:-1], s.max_length, 16),
        "max_length": cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length + 1, 16),
        "k": cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length, 17),
        "noise": cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length, 16, 0.5),
        "noise seed": cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length, 16, 0.5, 1),
        "tail samples": cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length, 16, samples=8),
        "sample seed": cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length, 16, sample_seed=1),
    }
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants
    # a module in memory: keyed by its tensors, any weight change -> a new key
    mem = cache_keys.cache_key(s.teacher, s.tok, s.examples, s.max_length, 16)
    assert mem == cache_keys.cache_key(copy.deepcopy(s.teacher), s.tok, s.examples, s.max_length, 16)
    assert mem != cache_keys.cache_key(moved, s.tok, s.examples, s.max_length, 16)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        cache_keys.cache_key(tmp_path, s.tok, s.examples, s.max_length, 16)


def test_a_hub_id_is_keyed_by_its_snapshot_files(setup, tmp_path, monkeypatch):
    """A Hub id (the base-teacher ablation's "Qwen/Qwen2.5-7B") resolves to its cached snapshot
    offline: a fake hub cache with refs/main -> snapshots/<commit>/model.safetensors. Same bytes as
    the saved teacher directory -> the same key; refs/main moved to a commit with other weights
    -> another key; an id not in the cache raises (offline, nothing to download)."""
    import huggingface_hub

    s, hub = setup, tmp_path / "hub"
    repo = hub / "models--org--teacher"
    commits = {"a" * 40: s.teacher_dir, "b" * 40: tmp_path / "moved"}
    moved = copy.deepcopy(s.teacher)
    with torch.no_grad():
        moved.model.norm.weight[0] += 1e-3
    moved.save_pretrained(commits["b" * 40])
    for commit, source in commits.items():
        (repo / "snapshots" / commit).mkdir(parents=True)
        for name in ("model.safetensors", "config.json"):
            (repo / "snapshots" / commit / name).write_bytes((source / name).read_bytes())
    (repo / "refs").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    # huggingface_hub reads HF_HUB_CACHE once, at import (as the model loader does): set it there too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))

    def key(teacher):
        return cache_keys.cache_key(teacher, s.tok, s.examples, s.max_length, 16)

    (repo / "refs" / "main").write_text("a" * 40)
    assert key("org/teacher") == key(s.teacher_dir)
    (repo / "refs" / "main").write_text("b" * 40)
    assert key("org/teacher") == key(commits["b" * 40]) != key(s.teacher_dir)
    with pytest.raises(FileNotFoundError):
        key("org/absent")


# --------------------------------------------------------------------------- build / open
def test_build_then_open_round_trips(setup, sampled):
    s, cache = setup, sampled
    m = cache.manifest
    n_pos = sum(len(e.response_ids) for e in s.examples)
    assert (m["k"], m["vocab_size"], m["temperatures"], m["n_examples"], m["n_positions"], m["samples"]) == \
        (16, s.vocab, [1.0, 2.0], len(s.examples), n_pos, 16)
    assert len(m["shards"]) == math.ceil(len(s.examples) / 50)
    assert m["forward_passes"] == sum(math.ceil((b - a) / 32) for a, b in (sh["examples"] for sh in m["shards"]))
    assert cache.forward_passes == m["forward_passes"]  # this call built it
    assert (cache.values.dtype, cache.ids.dtype, cache.logz.dtype) == (torch.float16, torch.int16, torch.float32)
    assert cache.index.tolist() == [e.index for e in s.examples]
    assert not [p for p in cache.path.iterdir() if ".tmp-" in p.name]
    assert (cache.sample_values.dtype, cache.sample_ids.dtype, cache.sample_values.shape) == \
        (torch.float16, torch.int16, (n_pos, 16))
    assert cache.nbytes / n_pos < 4 * 16 + 4 * 16 + 8 * 2 + 4  # head, samples, logz + tail per tau, offsets

    again = cache_shards.open_cache(cache.path)
    for name in ("values", "ids", "logz", "tail", "sample_values", "sample_ids", "offsets", "index"):
        assert torch.equal(getattr(again, name), getattr(cache, name))
    assert again.forward_passes == 0
    reused = _build(s, cache.path.parent, 16)
    assert reused.forward_passes == 0

    # alignment: example 37 alone through the teacher; position t predicts token t + 1
    e = s.examples[37]
    b = collate([e], s.pad)
    with torch.no_grad():
        logits = s.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0, :-1].float()
    z = logits[b["labels"][0, 1:] != IGNORE]
    rows = cache.positions(torch.tensor([e.index]), torch.tensor([len(e.response_ids)]))
    top, ids = z.topk(16, -1)
    assert torch.equal(cache.ids[rows, 0].long(), ids[:, 0])
    torch.testing.assert_close(cache.values[rows].float(), top - top[:, :1], atol=5e-3, rtol=1e-3)
    rest = z.scatter(-1, ids, float("-inf"))
    for j, tau in enumerate(TEMPS):
        torch.testing.assert_close(cache.logz[rows, j], (z / tau).logsumexp(-1) - top[:, 0] / tau,
                                   atol=2e-3, rtol=1e-4)
        # the exact tail log-mass (tokens outside the top-k), shifted like logZ
        torch.testing.assert_close(cache.tail[rows, j], (rest / tau).logsumexp(-1) - top[:, 0] / tau,
                                   atol=2e-3, rtol=1e-4)
    # the samples are tail tokens with their (shifted) logits
    smp = cache.sample_ids[rows].long()
    assert not (smp[:, :, None] == cache.ids[rows].long()[:, None, :]).any()
    torch.testing.assert_close(cache.sample_values[rows].float(), z.gather(-1, smp) - top[:, :1], atol=5e-3, rtol=1e-3)
    # head mass statistics per temperature
    for j, tau in enumerate(TEMPS):
        mass = ((cache.values.float() / tau).logsumexp(-1) - cache.logz[:, j]).exp()
        stats = m["head_mass"][str(tau)]
        assert stats["mean"] == pytest.approx(float(mass.mean()), rel=1e-5)
        assert stats["p10"] == pytest.approx(float(mass.quantile(0.1)), rel=1e-5)
    assert 0 < m["head_mass"]["2.0"]["p10"] < m["head_mass"]["2.0"]["mean"] < m["head_mass"]["1.0"]["mean"] < 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_detected_and_rebuilt(setup, tmp_path, damage, caplog):
    cache = _build(setup, tmp_path, 16)
    shard = cache.path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(data)
    with pytest.raises(cache_shards.CorruptCacheError, match="shard-00001.safetensors"):
        cache_shards.open_cache(cache.path)
    with caplog.at_level(logging.WARNING, logger="kd_utils.cache_build"):
        rebuilt = _build(setup, tmp_path, 16)
    assert "shard-00001.safetensors" in caplog.text and "rebuilding" in caplog.text
    assert rebuilt.forward_passes > 0
    assert torch.equal(cache_shards.open_cache(cache.path).values, cache.values)


def test_a_bad_manifest_or_missing_manifest_is_rebuilt(setup, tmp_path, caplog):
    cache = _build(setup, tmp_path, 16)
    (cache.path / "manifest.json").write_text("{not json")
    with pytest.raises(cache_shards.CorruptCacheError, match="manifest"):
        cache_shards.open_cache(cache.path)
    (cache.path / "manifest.json").unlink()
    (cache.path / ".shard-00003.safetensors.tmp-1").write_bytes(b"partial")  # an interrupted build
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        cache_shards.open_cache(cache.path)
    with caplog.at_level(logging.WARNING, logger="kd_utils.cache_build"):
        rebuilt = _build(setup, tmp_path, 16)
    assert "interrupted" in caplog.text and rebuilt.forward_passes > 0
    assert not (cache.path / ".shard-00003.safetensors.tmp-1").exists()
    manifest = json.loads((cache.path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # a manifest that disagrees with its shard
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(cache_shards.CorruptCacheError, match="shard-00000.safetensors fails its sha256"):
        cache_shards.open_cache(cache.path)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"], manifest["k"] = rebuilt.manifest["shards"][0]["sha256"], 8
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(cache_shards.CorruptCacheError, match=r"shard-00000.safetensors contradicts the manifest: values"):
        cache_shards.open_cache(cache.path)


def test_a_missing_temperature_or_other_settings_rebuild(setup, tmp_path, caplog):
    first = _build(setup, tmp_path, 16, temperatures=(1.0,))
    with caplog.at_level(logging.WARNING, logger="kd_utils.cache_build"):
        second = _build(setup, tmp_path, 16, temperatures=(2.0,))
    assert "lacks temperatures [2.0]" in caplog.text
    assert second.temperatures == (1.0, 2.0) and second.forward_passes > 0
    torch.testing.assert_close(second.logz[:, 0], first.logz[:, 0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kd_utils.cache_build"):
        # the same key asked for other examples (a caller's bug): never served stale rows
        key = second.key
        third = cache_build.ensure_cache(setup.teacher, setup.examples[:-1], tmp_path, key, k=16, temperatures=TEMPS,
                                batch_size=32, progress=False)
    assert "other examples" in caplog.text and third.manifest["n_examples"] == len(setup.examples) - 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kd_utils.cache_build"):
        fourth = cache_build.ensure_cache(setup.teacher, setup.examples[:-1], tmp_path, key, k=16, temperatures=TEMPS,
                                 batch_size=32, progress=False, samples=4)
    assert "built with 16 tail samples (seed 0, uniform share 0.5); asked 4" in caplog.text
    assert fourth.samples == 4 and fourth.sample_ids.shape == (fourth.n_positions, 4)


def test_large_vocabularies_store_int32_ids_and_wide_teachers_are_sliced(setup, tmp_path):
    big = build_micro_model("micro-xs", 33_000, seed=2)
    examples = setup.examples[:3]
    cache = cache_shards.open_cache(cache_build.build_cache(big, examples, tmp_path, "big", k=8, vocab_size=32_800, progress=False))
    assert cache.ids.dtype == torch.int32 and cache.manifest["ids_dtype"] == "int32"
    assert int(cache.ids.max()) < 32_800
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        cache_build.build_cache(big, examples, tmp_path, "too-wide", vocab_size=40_000, progress=False)


# --------------------------------------------------------------------------- the signal vs the live teacher
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("tau", TEMPS)
def test_k_equal_to_vocab_equals_the_live_teacher(setup, caches, student_logits, objective, tau):
    logits, b, mask = student_logits
    settings = KDSettings(objective, temperature=tau)
    live = LiveTeacher(setup.teacher, setup.vocab).kd_sum(logits, b, mask, settings)
    cached = teachers.CachedTeacher(caches[setup.vocab], setup.vocab).kd_sum(logits, b, mask, settings)
    torch.testing.assert_close(cached, live, rtol=2e-5, atol=1e-4)


def test_a_padded_teacher_vocabulary_is_sliced(setup, tmp_path, student_logits):
    """Like Qwen2.5-7B's 152064 logits for a 151936-token tokenizer."""
    padded = copy.deepcopy(setup.teacher)
    padded.resize_token_embeddings(setup.vocab + 64, mean_resizing=False)
    cache = cache_build.ensure_cache(padded, setup.examples, tmp_path, "padded", k=10**6, vocab_size=setup.vocab,
                            progress=False)
    assert cache.k == setup.vocab  # k >= vocab: the whole distribution
    logits, b, mask = student_logits
    settings = KDSettings("fkl")
    torch.testing.assert_close(teachers.CachedTeacher(cache, setup.vocab).kd_sum(logits, b, mask, settings),
                               LiveTeacher(padded, setup.vocab).kd_sum(logits, b, mask, settings), rtol=2e-5, atol=1e-4)


def test_topk_loss_is_a_close_lower_bound(setup, caches, student_logits):
    """k < V: the bucketed loss is below the dense one and rises with k (data processing: the
    top-4 buckets are a coarsening of the top-16 ones). Relative errors, printed with -s."""
    logits, b, mask = student_logits
    live = LiveTeacher(setup.teacher, setup.vocab)
    print("\nrelative error of the top-k loss vs the live teacher (fresh micro-xs student):")
    errors = {}
    for objective in ("fkl", "rkl", "gjsd"):
        for tau in TEMPS:
            settings = KDSettings(objective, temperature=tau)
            dense = float(live.kd_sum(logits, b, mask, settings))
            sparse = [float(teachers.CachedTeacher(caches[k], setup.vocab).kd_sum(logits, b, mask, settings))
                      for k in (4, 16, 64)]
            errors[objective, tau] = [(v - dense) / dense for v in sparse]
            print(f"  {objective:5s} tau={tau}: " + "  ".join(f"k={k}: {e:+.2e}" for k, e in
                                                               zip((4, 16, 64), errors[objective, tau])))
            assert sparse[0] <= sparse[1] * (1 + 1e-5) and sparse[1] <= sparse[2] * (1 + 1e-5)
            assert sparse[2] <= dense * (1 + 1e-5)
    # fkl's gap is sum P_T(tail) KL(tail conditionals): small for a peaked teacher (tail mass ~2% at k=16)
    assert abs(errors["fkl", 1.0][1]) < 0.01


def test_one_bucket_cache_is_the_old_bucket_loss(setup, caches, student_logits):
    """samples = 0: kd_sum is sparse_kd_loss on the head plus one bucket with the exact tail mass."""
    logits, b, mask = student_logits
    c = caches[16]
    assert c.samples == 0 and c.sample_values.shape == (c.n_positions, 0)
    rows = c.positions(b["index"], mask.sum(1))
    for objective in sorted(OBJECTIVES):
        s = KDSettings(objective, temperature=2.0)
        old = sparse_kd_loss(logits[mask], c.values[rows], c.ids[rows], c.logz[rows, 1], objective=objective,
                             temperature=2.0, reduction="sum", teacher_tail_logz=c.tail[rows, 1])
        assert torch.equal(teachers.CachedTeacher(c, setup.vocab).kd_sum(logits, b, mask, s), old)


def test_sampled_tail_weights_match_the_draw(setup, sampled):
    """The weights the loss uses are the probabilities the samples were drawn with: over all
    positions' samples, mean 1/q = V - k (E_q[1/q] = tail size) and, per temperature, mean p/q =
    the mean tail mass (E_q[p/q] = sum of p over the tail)."""
    c = sampled
    log_q = tail_log_proposal(c.sample_values, c.tail, c.temperatures, c.vocab_size - c.k)
    assert float((-log_q).exp().mean()) == pytest.approx(c.vocab_size - c.k, rel=0.02)
    for j, tau in enumerate(c.temperatures):
        p = (c.sample_values.float() / tau - c.logz[:, j: j + 1]).exp()
        tail_mass = (c.tail[:, j] - c.logz[:, j]).exp()
        assert float((p * (-log_q).exp()).mean()) == pytest.approx(float(tail_mass.mean()), rel=0.03)


def test_sampled_cache_is_unbiased_against_the_live_teacher(setup, sampled, student_logits, tmp_path):
    """Caches with independent sample seeds: their mean loss is the live full-vocabulary loss
    within 4 standard errors (spread across seeds), for fkl, rkl and gjsd at both temperatures."""
    logits, b, mask = student_logits
    seeded = [sampled] + [_build(setup, tmp_path, 16, sample_seed=seed) for seed in (1, 2, 3, 4, 5)]
    live = LiveTeacher(setup.teacher, setup.vocab)
    print("\nsampled cache (k=16, m=16) vs live, 6 sample seeds:")
    for objective in ("fkl", "rkl", "gjsd"):
        for tau in TEMPS:
            s = KDSettings(objective, temperature=tau)
            dense = float(live.kd_sum(logits, b, mask, s))
            got = torch.tensor([float(teachers.CachedTeacher(c, setup.vocab).kd_sum(logits, b, mask, s)) for c in seeded])
            se = float(got.std()) / math.sqrt(len(got))
            print(f"  {objective:5s} tau={tau}: mean rel. error {(float(got.mean()) - dense) / dense:+.2e}, "
                  f"one cache's rel. std {float(got.std()) / dense:.2e}")
            assert abs(float(got.mean()) - dense) <= 4 * se + 1e-5 * dense


def test_samples_do_not_depend_on_batching(setup, sampled, tmp_path):
    """The draw is seeded per (sample_seed, example): other batchings draw the same tokens. In
    float32 another batch shape moves a few logits by an fp16 ulp (see the noise test), which
    perturbs that row's proposal and, rarely, a sampled token (2 of 56,736 here); a float64
    teacher, whose forward drift does not survive rounding to float32, gives the identical draw."""
    def build(teacher, name, batch_size, shard_examples):
        return cache_shards.open_cache(cache_build.build_cache(teacher, setup.examples, tmp_path, name, k=16, temperatures=TEMPS,
                                            batch_size=batch_size, shard_examples=shard_examples, progress=False))

    other = build(setup.teacher, "rebatched", 40, 7)
    same = other.sample_ids == sampled.sample_ids
    assert float(same.float().mean()) > 0.999
    torch.testing.assert_close(other.sample_values[same], sampled.sample_values[same], atol=1e-4, rtol=2**-10)
    exact = copy.deepcopy(setup.teacher).double()
    a, b = build(exact, "f64-a", 32, 50), build(exact, "f64-b", 40, 7)
    assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.sample_values, b.sample_values)
    assert not torch.equal(cache_shards.open_cache(cache_build.build_cache(setup.teacher, setup.examples[:20], tmp_path, "seed-1", k=16,
                                                        temperatures=TEMPS, sample_seed=1, progress=False)).sample_ids,
                           sampled.sample_ids[: int(sampled.offsets[20])])


def _rewrite_shard(path, name, edit):
    """Apply ``edit`` to shard ``name``'s tensors and re-register it in the manifest (size, sha256):
    a shard that passes its checksum but holds wrong contents."""
    shard = path / name
    tensors = edit(safetensors.torch.load(shard.read_bytes()))
    data = safetensors.torch.save(tensors)
    shard.write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["file"] == name)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    ("missing", r"holds \[.*\], expected"),
    ("short", r"sample_values is torch.float16 \(\d+, 15\), expected"),
    ("above the head", "sample_values above the top-k"),
    ("nan", "sample_values above the top-k"),
    ("id out of range", "sample_ids: token ids outside"),
])
def test_bad_sample_tensors_are_detected_and_rebuilt(setup, tmp_path, damage, message, caplog):
    cache = _build(setup, tmp_path, 16)

    def edit(t):
        if damage == "missing":
            del t["sample_ids"]
        elif damage == "short":
            t["sample_values"] = t["sample_values"][:, 1:].contiguous()
        elif damage == "above the head":
            t["sample_values"][3, 2] = 1.0  # above the top token (0 after the shift)
        elif damage == "nan":
            t["sample_values"][3, 2] = float("nan")
        else:
            t["sample_ids"][3, 2] = setup.vocab
        return t

    _rewrite_shard(cache.path, "shard-00002.safetensors", edit)
    with pytest.raises(cache_shards.CorruptCacheError, match=message):
        cache_shards.open_cache(cache.path)
    with caplog.at_level(logging.WARNING, logger="kd_utils.cache_build"):
        assert _build(setup, tmp_path, 16).forward_passes > 0
    assert "shard-00002.safetensors" in caplog.text
    assert torch.equal(cache_shards.open_cache(cache.path).sample_ids, cache.sample_ids)


def test_noise_is_one_fixed_draw_per_position(setup, tmp_path, caches):
    s, sigma = setup, 1.0
    key = cache_keys.cache_key(s.teacher_dir, s.tok, s.examples, s.max_length, s.vocab, sigma, 3)
    noisy = cache_build.ensure_cache(s.teacher, s.examples, tmp_path, key, k=s.vocab, noise=sigma, noise_seed=3,
                            batch_size=16, progress=False)
    other_batching = cache_shards.open_cache(cache_build.build_cache(s.teacher, s.examples, tmp_path, "rebatched", k=s.vocab,
                                                  noise=sigma, noise_seed=3, batch_size=40, shard_examples=7,
                                                  progress=False))

    def full(cache):  # the stored full logits (shifted) in token order
        return torch.zeros(cache.values.shape, dtype=torch.float32).scatter_(-1, cache.ids.long(), cache.values.float())

    # the draw depends on (seed, example), not on batching. Other batch shapes change the float32
    # forward by a few ulps, which moves a stored fp16 logit across a rounding boundary now and
    # then: one fp16 ulp apart = 2^-10 relative (0.0156 for logits in [-32, -16)).
    torch.testing.assert_close(full(other_batching), full(noisy), atol=1e-4, rtol=2**-10)
    diff = full(noisy) - full(caches[s.vocab])  # = noise + a per-position shift
    eps = diff - diff.mean(-1, keepdim=True)
    assert abs(float(eps.std(-1).mean()) - sigma) < 0.05 * sigma
    firsts = eps[noisy.offsets[:-1]]  # each example's first position: independent draws
    corr = torch.corrcoef(firsts[:20]) - torch.eye(20)
    assert float(corr.abs().max()) < 0.25
    torch.testing.assert_close(noisy.logz[:, 0], full(noisy).logsumexp(-1), atol=1e-3, rtol=0)

    b = collate([s.examples[5]], s.pad)
    mask = b["labels"][:, 1:] != IGNORE
    logits = torch.randn(*mask.shape, s.vocab)
    teacher = teachers.CachedTeacher(noisy, s.vocab)
    assert torch.isfinite(teacher.kd_sum(logits, b, mask, KDSettings("fkl", noise=sigma)))
    with pytest.raises(ValueError, match="noise sigma=1.0.*sigma=0.0"):
        teacher.kd_sum(logits, b, mask, KDSettings("fkl"))


def test_bad_requests_raise_clear_errors(setup, caches, student_logits, tmp_path):
    logits, b, mask = student_logits
    teacher = teachers.CachedTeacher(caches[16], setup.vocab)
    with pytest.raises(ValueError, match=r"temperature 3.0.*\[1.0, 2.0\]"):
        teacher.kd_sum(logits, b, mask, KDSettings("fkl", temperature=3.0))
    with pytest.raises(ValueError, match="vocab_size"):
        teachers.CachedTeacher(caches[16], setup.vocab + 1)
    stranger = dict(b, index=b["index"].clone())
    stranger["index"][3] = 10_000
    with pytest.raises(KeyError, match="example index 10000"):
        teacher.kd_sum(logits, stranger, mask, KDSettings("fkl"))
    # an example with fewer target positions than cached (e.g. tokenized with a shorter max_length)
    cut = dataclasses.replace(setup.examples[7], response_ids=setup.examples[7].response_ids[1:])
    sb = collate([setup.examples[0], cut], setup.pad)
    smask = sb["labels"][:, 1:] != IGNORE
    slogits = torch.randn(*smask.shape, setup.vocab)
    with pytest.raises(ValueError, match=f"example index {cut.index}: the batch has"):
        teacher.kd_sum(slogits, sb, smask, KDSettings("fkl"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_build_and_gather(setup, caches, student_logits, tmp_path):
    """On CUDA the teacher runs under bf16 autocast: close to the fp32 CPU cache, not equal."""
    teacher = copy.deepcopy(setup.teacher).cuda()
    cache = cache_build.ensure_cache(teacher, setup.examples, tmp_path, "cuda", k=setup.vocab, temperatures=TEMPS,
                            progress=False)
    noisy = cache_build.build_cache(teacher, setup.examples[:5], tmp_path, "cuda-noisy", k=16, noise=0.5, progress=False)
    assert cache.manifest["device"] == "cuda" and cache_shards.open_cache(noisy).manifest["noise"] == 0.5
    logits, b, mask = student_logits
    gpu_batch = {k: v.cuda() for k, v in b.items()}
    settings = KDSettings("fkl", temperature=2.0)
    on_gpu = teachers.CachedTeacher(cache, setup.vocab).kd_sum(logits.cuda(), gpu_batch, mask.cuda(), settings)
    on_cpu = teachers.CachedTeacher(caches[setup.vocab], setup.vocab).kd_sum(logits, b, mask, settings)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=2e-2, atol=0)
    # tail samples drawn on the GPU (its generator): tail tokens, and the same loss read on either device
    sampled = cache_build.ensure_cache(teacher, setup.examples, tmp_path, "cuda-sampled", k=16, temperatures=TEMPS,
                              progress=False)
    assert sampled.samples == 16
    assert not (sampled.sample_ids.long()[:, :, None] == sampled.ids.long()[:, None, :]).any()
    for objective in ("fkl", "rkl", "gjsd"):
        s = KDSettings(objective, temperature=2.0)
        teacher_signal = teachers.CachedTeacher(sampled, setup.vocab)
        torch.testing.assert_close(teacher_signal.kd_sum(logits.cuda(), gpu_batch, mask.cuda(), s).cpu(),
                                   teacher_signal.kd_sum(logits, b, mask, s), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- training through the cache
def test_training_a_student_through_the_cache(setup, sampled):
    s = setup
    settings = KDSettings("fkl", temperature=2.0)
    objective = kd_objective(teachers.CachedTeacher(sampled, s.vocab), settings, s.vocab)
    student = build_micro_model("micro-xs", s.vocab, seed=4)
    b, _ = _batch(s, n=32, seed=1)
    loss, n = objective(student, b)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert n > 0 and grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    student.zero_grad()

    def kd_per_token() -> float:
        with torch.no_grad():
            loss, n = objective(student.eval(), b)
        return float(loss) / n

    before = kd_per_token()
    steps = cycle_steps(lambda ep: ([collate([s.examples[i] for i in idx], s.pad)]
                                    for idx in epoch_batches(len(s.examples), 32, 2, ep)))
    train(student, steps, objective, OptimSettings(max_steps=12, lr=1e-2, warmup_steps=1, eval_every=10**6),
          progress=False)
    assert kd_per_token() < 0.8 * before


def test_teacher_for_picks_the_cache_and_the_live_teacher_only_for_student_samples(setup, caches):
    made, messages = [], []

    def live():
        made.append(LiveTeacher(setup.teacher, setup.vocab))
        return made[-1]

    assert isinstance(teachers.teacher_for(KDSettings("rkl"), live, caches[16], messages.append), teachers.CachedTeacher)
    assert not made
    gkd = teachers.teacher_for(KDSettings("gkd"), live, caches[16], messages.append)
    assert isinstance(gkd, teachers.OnPolicyTeacher) and gkd.live is made[-1]
    assert messages == ["gkd is on-policy: the live teacher scores its student samples, the cache its gold batches"]
    assert teachers.teacher_for(KDSettings("fkl"), live, None, messages.append) is made[-1]
    with pytest.raises(ValueError, match="temperature 4.0"):
        teachers.teacher_for(KDSettings("fkl", temperature=4.0), live, caches[16], messages.append)
    with pytest.raises(ValueError, match="temperature 4.0"):
        teachers.teacher_for(KDSettings("gkd", temperature=4.0), live, caches[16], messages.append)


def test_gkd_reads_gold_batches_from_the_cache_and_scores_student_samples_live(setup, caches, student_logits):
    s = setup
    student_logits, b, mask = student_logits
    settings = KDSettings("gkd")
    cached = teachers.CachedTeacher(caches[s.vocab], s.vocab)
    live = LiveTeacher(s.teacher, s.vocab)
    teacher = teachers.OnPolicyTeacher(cached, live)
    gold = teacher.kd_sum(student_logits, b, mask, settings)
    assert live.forward_passes == 0  # the gold batch came from the cache
    torch.testing.assert_close(gold, live.kd_sum(student_logits, b, mask, settings), rtol=2e-5, atol=1e-4)
    live.forward_passes = 0
    # A batch of student samples: same example indices, other responses -> the live teacher.
    sampled = collate([type(e)(e.prompt_ids, tuple(reversed(e.response_ids[:-1])) + e.response_ids[-1:], e.index)
                       for e in (s.examples[i] for i in b["index"].tolist())], s.pad)
    sampled["on_policy"] = torch.tensor(True)
    smask = sampled["labels"][:, 1:] != IGNORE
    got = teacher.kd_sum(student_logits[:, : smask.shape[1]], sampled, smask, settings)
    assert live.forward_passes == 1 and teacher.forward_passes == cached.forward_passes + 1
    expected = LiveTeacher(s.teacher, s.vocab).kd_sum(student_logits[:, : smask.shape[1]], sampled, smask, settings)
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, gold)


# --------------------------------------------------------------------------- SeqKD generations
def test_cached_generations_round_trip_and_rebuild(setup, tmp_path, monkeypatch, caplog):
    s = setup
    prompts = s.prompts[:5]
    calls = []
    real = evaluation.generate

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate", counting)
    key = cache_keys.generations_key(s.teacher_dir, s.tok, prompts, 12)
    first = seqkd_store.cached_generations(s.teacher, s.tok, prompts, tmp_path, key, max_new_tokens=12, batch_size=4)
    assert first == real(s.teacher, s.tok, prompts, max_new_tokens=12, progress=False) and calls == [5]
    assert seqkd_store.cached_generations(s.teacher, s.tok, prompts, tmp_path, key, 12) == first and calls == [5]

    other = cache_keys.generations_key(s.teacher_dir, s.tok, s.prompts[1:6], 12)
    assert other not in (key, cache_keys.generations_key(s.teacher_dir, s.tok, prompts, 13))
    seqkd_store.cached_generations(s.teacher, s.tok, s.prompts[1:6], tmp_path, other, 12)
    assert calls == [5, 5]

    stored = tmp_path / key / "generations.json"
    stored.write_text(json.dumps(["forged"] * 5))
    with caplog.at_level(logging.WARNING, logger="kd_utils.seqkd_store"):
        assert seqkd_store.cached_generations(s.teacher, s.tok, prompts, tmp_path, key, 12) == first
    assert "regenerating" in caplog.text and calls == [5, 5, 5]
