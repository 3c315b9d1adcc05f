"""The teacher cache on disk: what a cache holds, writing its files, and reading it back checked.

What is stored, per target position (the response positions ``labels[:, 1:] != -100``, each
example's positions in order): the teacher's top-k logits (fp16) and token ids (int16 when the
vocabulary fits, else int32), m importance-sampled tail tokens (ids and fp16 logits), and for EACH
cached temperature tau the full-vocabulary log-normalizer ``logZ_tau = logsumexp(z / tau)`` and the
tail log-mass (logsumexp over the tokens outside the top-k), fp32. Logits are stored shifted by
their position's maximum, logZ with the same shift (:mod:`kd_utils.cache_signal` computes them).
Cost per position: (2 + id bytes) * (k + m) for head and samples, 8 per temperature.

Layout: ``<out_root>/<key>/shard-00000.safetensors ...`` (per shard: values, ids, logz, tail,
sample_values, sample_ids, local per-example offsets, example indices), and ``manifest.json``
written LAST with each shard's size and sha256. Files are written under temporary names and
renamed; a directory without a manifest is incomplete. :func:`open_cache` reads a cache only when
every byte matches its manifest; anything else raises (:class:`CorruptCacheError`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import safetensors.torch
import torch
from safetensors import SafetensorError

__all__ = ["CorruptCacheError", "FORMAT", "MANIFEST", "ROWS", "TeacherCache", "ids_dtype", "lock_path",
           "open_cache", "read_manifest", "replace_dir", "write_atomic", "write_manifest", "write_shard"]

FORMAT = 3  # 2: the exact tail log-mass is stored beside logZ; 3: importance-sampled tail tokens
MANIFEST = "manifest.json"
ROWS = ("values", "ids", "logz", "tail", "sample_values", "sample_ids")  # per position
_TENSORS = (*ROWS, "offsets", "index")


class CorruptCacheError(ValueError):
    """A cache file does not match its manifest (size, checksum, contents)."""


@dataclass(eq=False)
class TeacherCache:
    """A verified cache in memory: per-position rows (values, ids, logz, tail, samples) and per-example offsets.

    ``index`` (sorted example indices) and ``offsets`` map example ``index[r]`` to the position
    rows ``offsets[r]:offsets[r + 1]``. ``forward_passes``: teacher batches run by the call that
    returned it (0 when it was read from disk; ``manifest["forward_passes"]`` is the build's count).
    """

    path: Path
    manifest: dict = field(repr=False)
    values: torch.Tensor = field(repr=False)  # [N, k] float16, logits minus the position's max
    ids: torch.Tensor = field(repr=False)  # [N, k] int16 / int32
    logz: torch.Tensor = field(repr=False)  # [N, n_temperatures] float32, shifted like values
    tail: torch.Tensor = field(repr=False)  # [N, n_temperatures] float32: logsumexp over the non-top-k tokens
    sample_values: torch.Tensor = field(repr=False)  # [N, samples] float16: sampled tail logits, shifted like values
    sample_ids: torch.Tensor = field(repr=False)  # [N, samples] int16 / int32
    offsets: torch.Tensor = field(repr=False)  # [n_examples + 1] int64
    index: torch.Tensor = field(repr=False)  # [n_examples] int64, strictly increasing
    forward_passes: int = 0

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def temperatures(self) -> tuple[float, ...]:
        return tuple(self.manifest["temperatures"])

    @property
    def samples(self) -> int:
        """Sampled tail tokens per position (0: the tail is one bucket)."""
        return self.manifest["samples"]

    @property
    def noise(self) -> float:
        return self.manifest["noise"]

    @property
    def n_positions(self) -> int:
        return self.manifest["n_positions"]

    @property
    def nbytes(self) -> int:
        """Bytes of the shard files on disk."""
        return sum(s["bytes"] for s in self.manifest["shards"])

    def temperature_column(self, temperature: float) -> int:
        """Column of ``logz`` for ``temperature``; raises if the cache lacks it."""
        for j, t in enumerate(self.temperatures):
            if math.isclose(t, temperature, rel_tol=1e-9, abs_tol=0.0):
                return j
        raise ValueError(f"teacher cache {self.path} has no logZ for temperature {temperature}; cached "
                         f"temperatures: {list(self.temperatures)} (rebuild it with ensure_cache(..., "
                         f"temperatures=[...]) including {temperature})")

    def positions(self, example_index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Flat position rows of the given examples, in order; ``counts`` (positions per example
        in the batch) must match the cache's."""
        example_index, counts = example_index.cpu().long(), counts.cpu().long()
        rows = torch.searchsorted(self.index, example_index).clamp_max(len(self.index) - 1)
        missing = self.index[rows] != example_index
        if missing.any():
            raise KeyError(f"example index {int(example_index[missing][0])} is not in teacher cache {self.path} "
                           f"({len(self.index)} examples): the cache was built for other data")
        starts = self.offsets[rows]
        cached = self.offsets[rows + 1] - starts
        bad = cached != counts
        if bad.any():
            r = int(bad.nonzero()[0])
            raise ValueError(
                f"example index {int(example_index[r])}: the batch has {int(counts[r])} target positions but "
                f"teacher cache {self.path} holds {int(cached[r])} (built with another max_length or tokenization?)")
        shift = torch.repeat_interleave(starts - (torch.cumsum(cached, 0) - cached), cached)
        return torch.arange(int(cached.sum())) + shift


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name, then rename: never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ids_dtype(vocab_size: int) -> torch.dtype:
    """The dtype of stored token ids: int16 when the vocabulary fits, else int32."""
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max else torch.int32


def write_shard(path: Path, i: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Write shard ``i`` of the cache directory ``path``; the file, sha256 and size of its manifest entry."""
    data = safetensors.torch.save(tensors)
    write_atomic(path / _shard_name(i), data)
    return {"file": _shard_name(i), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_manifest(path: Path, manifest: dict) -> None:
    """Write ``manifest.json`` into ``path``: last, so a directory without it is incomplete."""
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=1).encode())


def lock_path(root: str | Path, key: str) -> Path:
    """The lock file guarding ``<root>/<key>`` while it is checked or (re)built (beside it, outside it)."""
    return Path(root) / f".{key}.lock"


def replace_dir(path: Path) -> None:
    """An empty directory at ``path``, replacing whatever is there."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


_CACHE_FIELDS = ("format", "key", "k", "vocab_size", "temperatures", "noise", "samples", "tail_uniform", "n_examples",
                 "n_positions", "shards")


def read_manifest(path: Path, key: str | None, fields: Sequence[str] = _CACHE_FIELDS) -> dict:
    """The manifest of the directory ``path``, checked to hold ``fields``, this format and the key."""
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"no complete cache at {path}: {MANIFEST} is missing "
                                "(never built, or the build was interrupted)")
    try:
        manifest = json.loads(file.read_text())
        missing = [f for f in fields if f not in manifest]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise CorruptCacheError(f"{file} is not a valid manifest: {err}") from err
    if missing:
        raise CorruptCacheError(f"{file} lacks {missing}")
    if manifest["format"] != FORMAT:
        raise CorruptCacheError(f"{file}: format {manifest['format']}, this code reads format {FORMAT}")
    if manifest["key"] != path.name or (key is not None and manifest["key"] != key):
        raise CorruptCacheError(f"{file} is for key {manifest['key']!r}, not {key or path.name!r}")
    return manifest


def _load_shard(path: Path, entry: dict, verify: bool) -> dict[str, torch.Tensor]:
    file = path / entry["file"]
    if not file.is_file():
        raise CorruptCacheError(f"teacher cache shard {file} is missing")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise CorruptCacheError(f"teacher cache shard {file} has {size} bytes, the manifest says {entry['bytes']} "
                                "(truncated or overwritten)")
    data = file.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorruptCacheError(f"teacher cache shard {file} fails its sha256 check (corrupt bytes)")
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as err:
        raise CorruptCacheError(f"teacher cache shard {file} is not readable safetensors: {err}") from err
    if sorted(tensors) != sorted(_TENSORS):
        raise CorruptCacheError(f"teacher cache shard {file} holds {sorted(tensors)}, expected {sorted(_TENSORS)}")
    return tensors


def _shard_problems(t: dict[str, torch.Tensor], entry: dict, m: dict, id_dtype: torch.dtype | None) -> list[str]:
    """How a shard's tensors contradict its manifest entry (empty if they do not)."""
    (a, b), (ea, eb) = entry["positions"], entry["examples"]
    n, n_ex, k, n_tau, n_smp = b - a, eb - ea, m["k"], len(m["temperatures"]), m["samples"]
    expected = {"values": (torch.float16, (n, k)), "ids": (id_dtype, (n, k)), "logz": (torch.float32, (n, n_tau)),
                "tail": (torch.float32, (n, n_tau)), "sample_values": (torch.float16, (n, n_smp)),
                "sample_ids": (id_dtype, (n, n_smp)),
                "offsets": (torch.int64, (n_ex + 1,)), "index": (torch.int64, (n_ex,))}
    problems = [f"{name} is {t[name].dtype} {tuple(t[name].shape)}, expected {dtype} {shape}"
                for name, (dtype, shape) in expected.items() if (t[name].dtype, tuple(t[name].shape)) != (dtype, shape)]
    if problems:
        return problems
    offsets = t["offsets"]
    if int(offsets[0]) != 0 or int(offsets[-1]) != n or bool((offsets.diff() < 0).any()):
        problems.append("offsets do not partition its positions")
    for name in ("ids", "sample_ids"):
        if t[name].numel() and (int(t[name].min()) < 0 or int(t[name].max()) >= m["vocab_size"]):
            problems.append(f"{name}: token ids outside [0, {m['vocab_size']})")
    # tail samples lie below the head: at most its smallest (k-th) logit, never NaN or +inf
    if n_smp and n and not bool((t["sample_values"] <= t["values"][:, -1:]).all()):
        problems.append("sample_values above the top-k (samples must be tail tokens) or NaN")
    return problems


def open_cache(path_or_root: str | Path, key: str | None = None, verify: bool = True) -> TeacherCache:
    """Open ``<root>/<key>`` (or the cache directory itself when ``key`` is None).

    Checks the manifest, each shard's size and (``verify``) sha256 of the very bytes that are
    parsed, and every tensor's dtype and shape against the manifest. Raises FileNotFoundError when
    there is no complete cache, :class:`CorruptCacheError` (naming the file) when anything does not
    match. Shards are copied into tensors allocated once (peak memory ~ cache size + one shard).
    """
    path = Path(path_or_root) / key if key is not None else Path(path_or_root)
    m = read_manifest(path, key)
    n, n_ex, id_dtype = m["n_positions"], m["n_examples"], getattr(torch, m.get("ids_dtype", ""), None)
    if not isinstance(id_dtype, torch.dtype):
        raise CorruptCacheError(f"{path / MANIFEST}: unknown ids_dtype {m.get('ids_dtype')!r}")
    cache = TeacherCache(path=path, manifest=m, values=torch.empty((n, m["k"]), dtype=torch.float16),
                         ids=torch.empty((n, m["k"]), dtype=id_dtype),
                         logz=torch.empty((n, len(m["temperatures"])), dtype=torch.float32),
                         tail=torch.empty((n, len(m["temperatures"])), dtype=torch.float32),
                         sample_values=torch.empty((n, m["samples"]), dtype=torch.float16),
                         sample_ids=torch.empty((n, m["samples"]), dtype=id_dtype),
                         offsets=torch.zeros(n_ex + 1, dtype=torch.long), index=torch.empty(n_ex, dtype=torch.long))
    pos = ex = 0
    for entry in m["shards"]:
        if entry["positions"][0] != pos or entry["examples"][0] != ex:
            raise CorruptCacheError(f"{path / MANIFEST}: shard {entry['file']} does not start where the last ended")
        t = _load_shard(path, entry, verify)
        problems = _shard_problems(t, entry, m, id_dtype)
        (a, b), (ea, eb) = entry["positions"], entry["examples"]
        if problems or b > n or eb > n_ex:
            raise CorruptCacheError(f"teacher cache shard {path / entry['file']} contradicts the manifest: "
                                    f"{'; '.join(problems) or 'ranges beyond the totals'}")
        for name in ROWS:
            getattr(cache, name)[a:b] = t[name]
        cache.offsets[ea + 1: eb + 1] = t["offsets"][1:] + a
        cache.index[ea:eb] = t["index"]
        pos, ex = b, eb
    if (pos, ex) != (n, n_ex) or (n_ex > 1 and not bool((cache.index.diff() > 0).all())):
        raise CorruptCacheError(f"teacher cache {path}: shards do not cover {n_ex} examples / {n} positions "
                                "with strictly increasing example indices")
    return cache
