"""Building the teacher cache: run the teacher once, distil many students from disk.

:func:`build_cache` runs the teacher over the examples within a memory budget and writes the
shards and manifest (:mod:`kd_utils.cache_shards`) of the signal :mod:`kd_utils.cache_signal`
computes. :func:`ensure_cache` opens a valid cache or rebuilds it (missing, partial, corrupt, or
built with other settings), under a file lock so parallel cells build it once;
:func:`open_teacher_cache` does so for a run's settings. Every student, off-policy method and
temperature of a grid then reads the same cache instead of running the teacher each step.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import locks
from .cache_keys import cache_key
from .cache_shards import (FORMAT, ROWS, CorruptCacheError, TeacherCache, ids_dtype, lock_path, open_cache,
                           replace_dir, write_manifest, write_shard)
from .cache_signal import cache_copies, signal_rows
from .chunking import budget_bytes, check_fits, rows_within
from .data import Example
from .losses import TAIL_UNIFORM

if TYPE_CHECKING:
    from .config import KDConfig, TrainingConfig

__all__ = ["build_cache", "ensure_cache", "open_teacher_cache"]

logger = logging.getLogger(__name__)


def _budgeted_batches(examples: Sequence[Example], rows: range, batch_size: int, budget: int,
                      width: int) -> Iterator[list[Example]]:
    """Consecutive examples of ``rows``, at most ``batch_size`` per teacher forward and as many as
    keep its float32 logits (examples x longest x ``width``) within ``budget`` bytes (at least one)."""
    batch, longest = [], 0
    for i in rows:
        e = examples[i]
        n = len(e.prompt_ids) + len(e.response_ids)
        if batch and (len(batch) == batch_size or (len(batch) + 1) * max(longest, n) * width * 4 > budget):
            yield batch
            batch, longest = [], 0
        batch.append(e)
        longest = max(longest, n)
    if batch:
        yield batch


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def build_cache(teacher: torch.nn.Module, examples: Sequence[Example], out_root: str | Path, key: str, k: int = 16,
                temperatures: Sequence[float] = (1.0,), noise: float = 0.0, noise_seed: int = 0,
                batch_size: int = 64, vocab_size: int | None = None, shard_examples: int = 8192,
                progress: bool = True, samples: int = 16, sample_seed: int = 0, chunk_mb: int | None = None) -> Path:
    """Run the teacher once over ``examples`` (in index order) and write the cache to
    ``<out_root>/<key>``, replacing whatever is there; returns that directory.

    ``samples`` (m): tail tokens drawn per position for the importance-sampled tail (0: the tail is
    one bucket; forced to 0 when k covers the vocabulary), from a generator seeded by
    (``sample_seed``, example index). No grad, eval mode (restored after), on the teacher's device,
    bf16 autocast on CUDA. ``vocab_size`` None = the teacher's output width. Not locked: use
    :func:`ensure_cache` when processes may race.

    Memory: ``chunk_mb`` (None: the device's default, kd_utils.chunking) bounds the logits work.
    Half of it goes to the teacher forward (at most ``batch_size`` examples, fewer when their
    float32 logits would not fit), half to the per-position work (top-k, logZ, tail, samples), done
    a chunk of positions at a time; the floor is one example's logits. The cache does not depend
    on the budget. Raises MemoryError before the first forward when the largest chunk would not
    fit the machine's available memory.
    """
    examples = sorted(examples, key=lambda e: e.index)
    if not examples:
        raise ValueError("no examples to cache")
    if len({e.index for e in examples}) != len(examples):
        raise ValueError("example indices must be unique (they are the cache's keys)")
    temperatures = sorted({float(t) for t in temperatures})
    if not temperatures or any(not (math.isfinite(t) and t > 0) for t in temperatures):
        raise ValueError(f"temperatures must be finite numbers > 0, got {temperatures}")
    if k < 1 or batch_size < 1 or shard_examples < 1 or samples < 0:
        raise ValueError(f"k, batch_size and shard_examples must be >= 1 and samples >= 0, got {k}, {batch_size}, "
                         f"{shard_examples}, {samples}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise sigma must be a finite number >= 0, got {noise}")
    vocab_size = vocab_size or teacher.get_output_embeddings().weight.shape[0]
    k = min(k, vocab_size)
    samples = samples if k < vocab_size else 0
    device = next(teacher.parameters()).device
    budget, width = budget_bytes(chunk_mb, device), teacher.get_output_embeddings().weight.shape[0]
    rows_per_chunk = rows_within(budget / 2, vocab_size, cache_copies(temperatures))
    longest = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    positions = min(rows_per_chunk, sum(e.n_targets for e in examples))
    forward = max(min(budget // 2, min(batch_size, len(examples)) * longest * width * 4), longest * width * 4)
    check_fits(forward + positions * vocab_size * 4 * cache_copies(temperatures)
               + (longest * vocab_size * 4 if noise else 0), device, f"the teacher cache build {key}")
    path = Path(out_root) / key
    replace_dir(path)
    was_training = teacher.training
    teacher.eval()
    shards, passes, n_pos, head_mass = [], 0, 0, []
    bar = tqdm(total=len(examples), desc=f"teacher cache {key}", disable=not progress)
    try:
        for s, rows in enumerate(_chunks(len(examples), shard_examples)):
            parts = []
            for chunk in _budgeted_batches(examples, rows, batch_size, budget // 2, width):
                parts.append(signal_rows(teacher, chunk, vocab_size, k, temperatures, noise, noise_seed, samples,
                                         sample_seed, rows_per_chunk))
                passes += 1
                bar.update(len(chunk))
            counts = torch.tensor([examples[r].n_targets for r in rows])
            tensors = {name: torch.cat([p[name] for p in parts]) for name in ROWS}
            tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            tensors["index"] = torch.tensor([examples[r].index for r in rows], dtype=torch.long)
            head_mass.append(_head_mass(tensors["values"], tensors["logz"], temperatures))
            n = int(counts.sum())
            shards.append({**write_shard(path, s, tensors),
                           "examples": [rows.start, rows.stop], "positions": [n_pos, n_pos + n],
                           "index_range": [examples[rows.start].index, examples[rows.stop - 1].index]})
            n_pos += n
    finally:
        teacher.train(was_training)
        bar.close()
    device = next(teacher.parameters()).device
    mass = torch.cat(head_mass).numpy()
    manifest = {
        "format": FORMAT, "key": key, "k": k, "vocab_size": vocab_size, "temperatures": temperatures,
        "noise": float(noise), "noise_seed": int(noise_seed), "samples": samples, "sample_seed": int(sample_seed),
        "tail_uniform": TAIL_UNIFORM, "n_examples": len(examples), "n_positions": n_pos,
        "ids_dtype": str(ids_dtype(vocab_size)).removeprefix("torch."), "forward_passes": passes,
        "device": device.type, "autocast_bf16": device.type == "cuda" and torch.cuda.is_bf16_supported(),
        "head_mass": {str(t): {"mean": float(mass[:, j].mean()), "p10": float(np.percentile(mass[:, j], 10))}
                      for j, t in enumerate(temperatures)},
        "shards": shards,
    }
    write_manifest(path, manifest)
    return path


def _head_mass(values: torch.Tensor, logz: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """[N, n_temperatures] teacher probability mass inside the cached top-k at each temperature."""
    v = values.float()
    return torch.stack([((v / t).logsumexp(-1) - logz[:, j]).exp() for j, t in enumerate(temperatures)], dim=-1)


def _mismatch(cache: TeacherCache, examples: Sequence[Example], k: int, temperatures: Sequence[float],
              noise: float, noise_seed: int, vocab_size: int | None, samples: int, sample_seed: int) -> str | None:
    """Why an existing cache does not serve this request (None if it does)."""
    m = cache.manifest
    want_vocab = vocab_size or m["vocab_size"]
    if (m["k"], m["vocab_size"]) != (min(k, want_vocab), want_vocab):
        return f"built with k={m['k']}, vocab_size={m['vocab_size']}; asked k={k}, vocab_size={want_vocab}"
    want_samples = samples if k < want_vocab else 0
    if (m["samples"], m.get("sample_seed"), m["tail_uniform"]) != (want_samples, int(sample_seed), TAIL_UNIFORM):
        return (f"built with {m['samples']} tail samples (seed {m.get('sample_seed')}, uniform share "
                f"{m['tail_uniform']}); asked {want_samples} (seed {sample_seed}, uniform share {TAIL_UNIFORM})")
    if (m["noise"], m.get("noise_seed")) != (float(noise), int(noise_seed)):
        return f"built with noise {m['noise']} (seed {m.get('noise_seed')}); asked {noise} (seed {noise_seed})"
    lacking = [t for t in temperatures if not any(math.isclose(t, c, rel_tol=1e-9) for c in cache.temperatures)]
    if lacking:
        return f"lacks temperatures {lacking} (has {list(cache.temperatures)})"
    ordered = sorted(examples, key=lambda e: e.index)
    if [e.index for e in ordered] != cache.index.tolist() or \
            [e.n_targets for e in ordered] != cache.offsets.diff().tolist():
        return "built for other examples (indices or response lengths differ)"
    return None


def ensure_cache(teacher: torch.nn.Module, examples: Sequence[Example], out_root: str | Path, key: str,
                 k: int = 16, temperatures: Sequence[float] = (1.0,), noise: float = 0.0, noise_seed: int = 0,
                 batch_size: int = 64, vocab_size: int | None = None, shard_examples: int = 8192,
                 progress: bool = True, verify: bool = True, samples: int = 16, sample_seed: int = 0,
                 chunk_mb: int | None = None) -> TeacherCache:
    """Open ``<out_root>/<key>`` if it is complete, intact and serves this request; otherwise log
    why and (re)build it (a missing temperature: rebuilt with the union). Never reads bad data.
    ``samples`` / ``sample_seed``: the importance-sampled tail (:func:`build_cache`); pass the same
    to :func:`cache_key`. ``.forward_passes`` of the result counts the teacher batches run here (0
    when reused). ``chunk_mb``: the build's memory budget (:func:`build_cache`)."""
    root = Path(out_root)
    with locks.locked(lock_path(root, key)):
        try:
            cache = open_cache(root, key, verify=verify)
            reason = _mismatch(cache, examples, k, temperatures, noise, noise_seed, vocab_size, samples, sample_seed)
            if reason is None:
                return cache
            temperatures = sorted({*cache.temperatures, *temperatures})
        except FileNotFoundError as err:
            reason = str(err) if (root / key).exists() else None
        except CorruptCacheError as err:
            reason = str(err)
        if reason:
            logger.warning("teacher cache %s: %s; rebuilding", root / key, reason)
        path = build_cache(teacher, examples, root, key, k=k, temperatures=temperatures, noise=noise,
                           noise_seed=noise_seed, batch_size=batch_size, vocab_size=vocab_size,
                           shard_examples=shard_examples, progress=progress, samples=samples,
                           sample_seed=sample_seed, chunk_mb=chunk_mb)
        cache = open_cache(path, verify=verify)
        cache.forward_passes = cache.manifest["forward_passes"]
        logger.info("teacher cache %s: built with %d teacher forward passes", path, cache.forward_passes)
        return cache


def open_teacher_cache(teacher, teacher_path: str, tokenizer, train_ex: list[Example], training: TrainingConfig,
                       kd: KDConfig, cache_root: str, temperatures, noise: float, noise_seed: int, vocab: int,
                       chunk_mb: int | None = None) -> TeacherCache:
    """The teacher's cached signal on a run's training examples, for its ``training`` and ``kd``
    settings (built once within ``chunk_mb``, reused by every run)."""
    key = cache_key(teacher_path, tokenizer, train_ex, training.max_length, kd.cache_k, noise, noise_seed,
                    samples=kd.cache_samples)
    return ensure_cache(teacher, train_ex, cache_root, key, k=kd.cache_k, temperatures=tuple(temperatures),
                        noise=noise, noise_seed=noise_seed, vocab_size=vocab, samples=kd.cache_samples,
                        chunk_mb=chunk_mb)
