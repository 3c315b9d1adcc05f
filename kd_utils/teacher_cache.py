"""The offline teacher-signal cache: run the teacher once, distil many students from disk.

A cache is keyed by everything that determines the signal (:func:`cache_key`: teacher weights,
tokenizer, tokenized data, max length, k, noise sigma and seed, tail samples m and their seed).
Every student, off-policy method and temperature of a grid then reads the same cache instead of
running the teacher each step.

What is stored, per target position (the response positions ``labels[:, 1:] != -100``, each
example's positions in order): the teacher's top-k logits (fp16) and token ids (int16 when the
vocabulary fits, else int32), m tail samples (ids and fp16 logits, below), and for EACH requested
temperature tau the full-vocabulary log-normalizer ``logZ_tau = logsumexp(z / tau)`` and the tail
log-mass (logsumexp over the tokens outside the top-k), fp32. Logits are stored shifted by their
position's maximum (softmax is shift-invariant; logZ carries the same shift), so the top token is
exactly 0 and fp16 keeps ~5e-4 relative precision where the mass is. The whole row is rounded to
fp16 before logZ, tail and samples are computed from it: head, tail and samples describe ONE
distribution (the teacher with fp16-rounded logits; at k = V the head sums to 1, and a sampled
logit with logZ gives that token's cached probability exactly). Teacher logits wider than the
tokenizer are sliced to ``vocab_size`` first. k >= vocab_size stores the whole distribution
(k = vocab_size, no samples).

Temperature: the top-k set is the same at every tau (softmax(z / tau) is monotone in z), so one
set of raw logits serves all temperatures; ``sparse_kd_loss`` tempers them (``z / tau - logZ_tau``).
A temperature that was not cached raises: a logZ at the wrong tau would be a silent error.

Tail. The top-k head holds most of the teacher's mass at tau = 1 but little at higher tau
(SmolLM2-135M, k = 16: 89% at tau 1, 28% at tau 2, 0.7% at tau 5; the manifest records the mean
and 10th percentile of the head mass per cached tau as ``head_mass``). So the tail is
importance-sampled (``samples`` = m > 0, default 16): per position, m tail tokens are drawn i.i.d.
from :func:`~kd_utils.losses.tail_log_proposal` (the teacher's tail averaged over the cached
temperatures, mixed half and half with uniform over the V - k tail tokens), and
:func:`~kd_utils.losses.sparse_kd_loss` turns them (with a control variate from the exact tail
mass) into an estimate of the tail's contribution that is unbiased in value and gradient for
every objective at every cached temperature. How noisy it is (tests/benchmarks/bench_cache_error.py,
SmolLM2-135M and a pruned student, ~2000 positions): the summed loss within 0.5% of the live one
at tau 1, 2 and 5 where the one-bucket tail is 17-99% low; the gradient close to the live one for
fkl and gjsd at tau 1 (cosine > 0.9), noisy for both at tau 2 and 5 and for rkl everywhere
(cosine 0.06-0.7 on the student's final hidden states: there the m samples per position are too
few, and more positions per step, a larger m or the live teacher are the remedies). The draw
is made ONCE, from a generator seeded by (sample_seed, example index) -- independent of batching --
so a cache fixes one draw per position, as it does for the noise. ``samples = 0`` keeps the older
one-bucket tail: it matches only the student's total tail mass, a lower bound of the dense loss
that is close at tau = 1 and a different objective at tau 2 and 5. Cost per position: (2 + id
bytes) * (k + m) for head and samples (ids int16 up to 32767 tokens, else int32), 8 per
temperature.

Noise (the teacher-noise ablation, z + N(0, sigma^2)): drawn ONCE per position at cache time, on
the full logits, from a generator seeded by (noise_seed, example index) -- so the draw does not
depend on batching -- and top-k and logZ are taken from the noisy logits: the cached signal is
exact for that draw. The live teacher redraws noise every step; the cache fixes one draw per
position, a different but equally valid ablation. Noise sigma and seed are part of the key.

Layout: ``<out_root>/<key>/shard-00000.safetensors ...`` (per shard: values, ids, logz, tail,
sample_values, sample_ids, local per-example offsets, example indices), and ``manifest.json``
written LAST with each shard's size and sha256. Files are written under temporary names and
renamed; a directory without a manifest is incomplete. :func:`ensure_cache` opens a valid cache
or rebuilds (missing, partial, corrupt, or built with other settings), under a file lock so
parallel cells build it once.

On-policy GKD trains on student samples, which no cache can hold: :func:`teacher_for` gives it
the cache on its gold (off-policy) batches and the live teacher on the batches of student samples.
SeqKD's teacher generations are cached the same way by :func:`cached_generations`.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from tqdm import tqdm

from .chunking import budget_bytes, check_fits, rows_within
from .data import IGNORE, Example, collate
from .losses import TAIL_UNIFORM, sparse_kd_loss, tail_log_proposal
from .methods import KDSettings

__all__ = [
    "CachedTeacher",
    "CorruptCacheError",
    "TeacherCache",
    "build_cache",
    "cache_key",
    "cached_generations",
    "ensure_cache",
    "generations_key",
    "open_cache",
    "OnPolicyTeacher",
    "teacher_for",
]

logger = logging.getLogger(__name__)

FORMAT = 3  # 2: the exact tail log-mass is stored beside logZ; 3: importance-sampled tail tokens
MANIFEST = "manifest.json"
_KEY_CHARS = 16
_ROWS = ("values", "ids", "logz", "tail", "sample_values", "sample_ids")  # per position
_TENSORS = (*_ROWS, "offsets", "index")


class CorruptCacheError(ValueError):
    """A cache file does not match its manifest (size, checksum, contents)."""


# --------------------------------------------------------------------------- keys
@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, memoised on (path, size, mtime): a grid hashes the same teacher often."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _model_dir(name_or_path: str | Path) -> Path:
    """A saved model's directory: the path itself, or for a Hub id (what ``models.load_model``
    treats as one: not absolute, not starting with . or ~, not an existing path) its local snapshot
    folder (named by the commit), with the weights and configs the load would fetch: the cached
    one when HF_HUB_OFFLINE=1, else downloaded as the load would."""
    path = Path(name_or_path).expanduser()
    if path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.safetensors", "*.json"],
                                  local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))


def _update_with_teacher(h: "hashlib._Hash", teacher: str | Path | torch.nn.Module) -> None:
    if isinstance(teacher, torch.nn.Module):
        for name, t in sorted(teacher.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return
    files = sorted(_model_dir(teacher).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {teacher} to key the teacher cache on")
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{_file_sha256(str(f.resolve()), st.st_size, st.st_mtime_ns)}|".encode())


def _update_with_tokenizer(h: "hashlib._Hash", tokenizer) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    h.update(text.encode())
    h.update(f"|{len(tokenizer)}|{tokenizer.eos_token_id}|{tokenizer.pad_token_id}|".encode())


def _update_with_examples(h: "hashlib._Hash", examples: Sequence[Example]) -> None:
    examples = sorted(examples, key=lambda e: e.index)  # the cache holds them in index order
    heads = np.array([(e.index, len(e.prompt_ids), len(e.response_ids), e.loss_on_prompt) for e in examples],
                     dtype=np.int64)
    ids = np.fromiter((t for e in examples for t in (*e.prompt_ids, *e.response_ids)), dtype=np.int64)
    h.update(heads.tobytes())
    h.update(ids.tobytes())


def cache_key(teacher_dir_or_model: str | Path | torch.nn.Module, tokenizer, examples: Sequence[Example],
              max_length: int, k: int, noise: float = 0.0, noise_seed: int = 0, samples: int = 16,
              sample_seed: int = 0) -> str:
    """Short sha256 of what determines the cached signal.

    The teacher is keyed by the bytes of the ``*.safetensors`` files of a saved model directory
    or of a Hub id's snapshot (the same weights key the same either way), or by the state dict's
    tensors of a module (so a directory and the same model in memory get
    different keys: key consistently one way). The temperatures are not part of the key: a cache
    holds a set of them (:func:`ensure_cache` rebuilds when one is missing).
    """
    h = hashlib.sha256(b"kd_utils.teacher_cache/topk")
    _update_with_teacher(h, teacher_dir_or_model)
    _update_with_tokenizer(h, tokenizer)
    _update_with_examples(h, examples)
    h.update(json.dumps({"format": FORMAT, "max_length": int(max_length), "k": int(k), "noise": float(noise),
                         "noise_seed": int(noise_seed), "samples": int(samples), "sample_seed": int(sample_seed),
                         "tail_uniform": TAIL_UNIFORM}, sort_keys=True).encode())
    return h.hexdigest()[:_KEY_CHARS]


# --------------------------------------------------------------------------- the cache on disk
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _id_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max else torch.int32


def _row_seed(*parts: object) -> int:
    """A 63-bit seed from (seed, ..., example index): one generator per example, so draws do not
    depend on batching."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


@torch.inference_mode()
def _teacher_signal(teacher: torch.nn.Module, examples: Sequence[Example], vocab_size: int, k: int,
                    temperatures: Sequence[float], noise: float, noise_seed: int, samples: int, sample_seed: int,
                    rows: int) -> dict[str, torch.Tensor]:
    """One teacher forward over ``examples``: the shard tensors of their target positions (values,
    ids, logz, tail, sample_values, sample_ids); tail = logsumexp over the tokens outside the
    top-k, exact (never 1 - head, which rounds to 0 for a confident teacher). The positions are
    processed ``rows`` at a time (:func:`_position_signal`); each example's noise is drawn whole
    and its tail samples from one generator, so neither depends on the chunking.
    Right padding (id 0) is masked out and after every real token, so it changes no real logit."""
    device = next(teacher.parameters()).device
    batch = collate(examples, 0)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = teacher(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"teacher has {logits.shape[-1]} output logits, fewer than vocab_size={vocab_size}")
    where = (batch["labels"][:, 1:] != IGNORE).nonzero().to(device)  # (example, position), positions in order
    starts = np.cumsum([0] + [e.n_targets for e in examples])
    draws: dict[int, torch.Tensor] = {}  # an example's noise, drawn whole, until its last chunk
    samplers: dict[int, torch.Generator] = {}
    parts = []
    for a in range(0, len(where), rows):
        b = min(a + rows, len(where))
        z = logits[where[a:b, 0], where[a:b, 1], :vocab_size].float()  # [b - a, V], a copy of these rows only
        segments = []  # (example, its first and last-but-one local position in this chunk)
        for r in range(int(where[a, 0]), int(where[b - 1, 0]) + 1):
            lo, hi = max(a, starts[r]) - starts[r], min(b, starts[r + 1]) - starts[r]
            if hi > lo:
                segments.append((r, lo, hi))
        if noise:
            for r, lo, hi in segments:
                if r not in draws:
                    g = torch.Generator(device=device).manual_seed(_row_seed(noise_seed, examples[r].index))
                    draws[r] = torch.randn((examples[r].n_targets, vocab_size), generator=g, device=device)
            z += noise * torch.cat([draws[r][lo:hi] for r, lo, hi in segments])
            for r, lo, hi in segments:
                if hi == examples[r].n_targets:
                    del draws[r]
        for r, _, _ in segments:
            if r not in samplers:
                seed = _row_seed("tail-samples", sample_seed, examples[r].index)
                samplers[r] = torch.Generator(device=device).manual_seed(seed)
        parts.append(_position_signal(z, [(samplers[r], hi - lo) for r, lo, hi in segments], vocab_size, k,
                                      temperatures, samples))
    return {name: torch.cat([p[name] for p in parts]) for name in _ROWS}


def _position_signal(z: torch.Tensor, samplers: Sequence[tuple[torch.Generator, int]], vocab_size: int, k: int,
                     temperatures: Sequence[float], samples: int) -> dict[str, torch.Tensor]:
    """The cached rows of teacher logits ``z`` ([n, V] float32, a private copy), drawing each run of
    rows' tail samples from its generator (``samplers``: (generator, rows) in order)."""
    # Every logit as it would be stored (fp16, shifted by the row's max), so logZ, tail, head and
    # samples describe ONE distribution: at k = V the head sums to 1, and a sampled logit plus
    # logZ is that token's exact cached probability.
    y = z.sub_(z.amax(-1, keepdim=True))  # in place: z is a private copy
    y.copy_(y.half())
    top, ids = y.topk(k, dim=-1)
    logz = torch.stack([(y if t == 1.0 else y / t).logsumexp(-1) for t in temperatures], dim=-1)
    rest = y.scatter(-1, ids, float("-inf"))
    tail = torch.stack([(rest if t == 1.0 else rest / t).logsumexp(-1) for t in temperatures], dim=-1)
    del rest
    picked = torch.empty((len(y), samples), dtype=torch.long, device=y.device)
    if samples:
        start = 0
        for g, n in samplers:
            r = slice(start, start + n)
            log_q = tail_log_proposal(y[r], tail[r], temperatures, vocab_size - k).scatter_(-1, ids[r], float("-inf"))
            picked[r] = torch.multinomial(log_q.exp_(), samples, replacement=True, generator=g)
            start = r.stop
    id_dtype = _id_dtype(vocab_size)
    return {"values": top.half().cpu(), "ids": ids.to(id_dtype).cpu(), "logz": logz.cpu(), "tail": tail.cpu(),
            "sample_values": y.gather(-1, picked).half().cpu(), "sample_ids": picked.to(id_dtype).cpu()}


def _cache_copies(temperatures: Sequence[float]) -> int:
    """[rows, V] float32 tensors the per-position work holds at once (the rows, their tail, the
    tempered copies of the tail proposal, its probabilities)."""
    return 5 + 2 * len(temperatures)


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
    rows_per_chunk = rows_within(budget / 2, vocab_size, _cache_copies(temperatures))
    longest = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    positions = min(rows_per_chunk, sum(e.n_targets for e in examples))
    forward = max(min(budget // 2, min(batch_size, len(examples)) * longest * width * 4), longest * width * 4)
    check_fits(forward + positions * vocab_size * 4 * _cache_copies(temperatures)
               + (longest * vocab_size * 4 if noise else 0), device, f"the teacher cache build {key}")
    path = Path(out_root) / key
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    was_training = teacher.training
    teacher.eval()
    shards, passes, n_pos, head_mass = [], 0, 0, []
    bar = tqdm(total=len(examples), desc=f"teacher cache {key}", disable=not progress)
    try:
        for s, rows in enumerate(_chunks(len(examples), shard_examples)):
            parts = []
            for chunk in _budgeted_batches(examples, rows, batch_size, budget // 2, width):
                parts.append(_teacher_signal(teacher, chunk, vocab_size, k, temperatures, noise, noise_seed, samples,
                                             sample_seed, rows_per_chunk))
                passes += 1
                bar.update(len(chunk))
            counts = torch.tensor([examples[r].n_targets for r in rows])
            tensors = {name: torch.cat([p[name] for p in parts]) for name in _ROWS}
            tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            tensors["index"] = torch.tensor([examples[r].index for r in rows], dtype=torch.long)
            head_mass.append(_head_mass(tensors["values"], tensors["logz"], temperatures))
            data = safetensors.torch.save(tensors)
            _write_atomic(path / _shard_name(s), data)
            n = int(counts.sum())
            shards.append({"file": _shard_name(s), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
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
        "ids_dtype": str(_id_dtype(vocab_size)).removeprefix("torch."), "forward_passes": passes,
        "device": device.type, "autocast_bf16": device.type == "cuda" and torch.cuda.is_bf16_supported(),
        "head_mass": {str(t): {"mean": float(mass[:, j].mean()), "p10": float(np.percentile(mass[:, j], 10))}
                      for j, t in enumerate(temperatures)},
        "shards": shards,
    }
    _write_atomic(path / MANIFEST, json.dumps(manifest, indent=1).encode())
    return path


def _head_mass(values: torch.Tensor, logz: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """[N, n_temperatures] teacher probability mass inside the cached top-k at each temperature."""
    v = values.float()
    return torch.stack([((v / t).logsumexp(-1) - logz[:, j]).exp() for j, t in enumerate(temperatures)], dim=-1)


_CACHE_FIELDS = ("format", "key", "k", "vocab_size", "temperatures", "noise", "samples", "tail_uniform", "n_examples",
                 "n_positions", "shards")
_GENERATION_FIELDS = ("format", "key", "n_prompts", "max_new_tokens", "file", "bytes", "sha256")


def _read_manifest(path: Path, key: str | None, fields: Sequence[str] = _CACHE_FIELDS) -> dict:
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
    m = _read_manifest(path, key)
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
        for name in _ROWS:
            getattr(cache, name)[a:b] = t[name]
        cache.offsets[ea + 1: eb + 1] = t["offsets"][1:] + a
        cache.index[ea:eb] = t["index"]
        pos, ex = b, eb
    if (pos, ex) != (n, n_ex) or (n_ex > 1 and not bool((cache.index.diff() > 0).all())):
        raise CorruptCacheError(f"teacher cache {path}: shards do not cover {n_ex} examples / {n} positions "
                                "with strictly increasing example indices")
    return cache


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    """Exclusive lock on ``<root>/.<key>.lock`` (parallel cells build a cache once)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    with _locked(root, key):
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


# --------------------------------------------------------------------------- the cached teacher
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


# --------------------------------------------------------------------------- SeqKD generations
def generations_key(teacher_dir_or_model: str | Path | torch.nn.Module, tokenizer, prompts: Sequence[str],
                    max_new_tokens: int) -> str:
    """Short sha256 of teacher, tokenizer, prompts and max_new_tokens (greedy decoding)."""
    h = hashlib.sha256(b"kd_utils.teacher_cache/greedy-generations")
    _update_with_teacher(h, teacher_dir_or_model)
    _update_with_tokenizer(h, tokenizer)
    h.update(json.dumps({"format": FORMAT, "prompts": list(prompts), "max_new_tokens": int(max_new_tokens)}).encode())
    return h.hexdigest()[:_KEY_CHARS]


def _read_generations(path: Path, key: str, n: int) -> list[str]:
    m = _read_manifest(path, key, _GENERATION_FIELDS)
    file = path / m["file"]
    data = file.read_bytes() if file.is_file() else b""
    if len(data) != m["bytes"] or hashlib.sha256(data).hexdigest() != m["sha256"]:
        raise CorruptCacheError(f"{file} does not match its manifest (size or sha256)")
    outputs = json.loads(data)
    if not isinstance(outputs, list) or len(outputs) != n or not all(isinstance(o, str) for o in outputs):
        raise CorruptCacheError(f"{file} does not hold {n} generations")
    return outputs


def cached_generations(teacher: torch.nn.Module, tokenizer, prompts: Sequence[str], out_root: str | Path, key: str,
                       max_new_tokens: int, batch_size: int = 32, progress: bool = False) -> list[str]:
    """Greedy teacher generations for SeqKD (``kd_utils.evaluation.generate``), made once per key
    and stored as ``<out_root>/<key>/generations.json`` with a checksummed manifest; a missing,
    partial or corrupt store is regenerated (with a log message)."""
    from .evaluation import generate  # evaluation pulls in pandas/statsmodels: only when generating

    root, n = Path(out_root), len(prompts)
    path = root / key
    with _locked(root, key):
        try:
            return _read_generations(path, key, n)
        except FileNotFoundError:
            if path.exists():
                logger.warning("teacher generations %s are incomplete; regenerating", path)
        except (CorruptCacheError, json.JSONDecodeError, UnicodeDecodeError) as err:
            logger.warning("teacher generations %s: %s; regenerating", path, err)
        outputs = generate(teacher, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc="teacher generations")
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        data = json.dumps(outputs).encode()
        _write_atomic(path / "generations.json", data)
        manifest = {"format": FORMAT, "key": key, "n_prompts": n, "max_new_tokens": max_new_tokens,
                    "file": "generations.json", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _write_atomic(path / MANIFEST, json.dumps(manifest, indent=1).encode())
        return outputs
