"""SeqKD's store of teacher generations: greedy generations made once per key
(:func:`~kd_utils.cache_keys.generations_key`) and kept as ``<out_root>/<key>/generations.json``
with a checksummed manifest, under the cache's file lock and format.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import locks
from .cache_keys import generations_key
from .cache_shards import FORMAT, CorruptCacheError, lock_path, read_manifest, replace_dir, write_atomic, write_manifest
from .chunking import decode_batch
from .data import Example

if TYPE_CHECKING:
    import torch

__all__ = ["cached_generations", "teacher_generations"]

logger = logging.getLogger(__name__)

_GENERATION_FIELDS = ("format", "key", "n_prompts", "max_new_tokens", "file", "bytes", "sha256")


def _read_generations(path: Path, key: str, n: int) -> list[str]:
    m = read_manifest(path, key, _GENERATION_FIELDS)
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
    with locks.locked(lock_path(root, key)):
        try:
            return _read_generations(path, key, n)
        except FileNotFoundError:
            if path.exists():
                logger.warning("teacher generations %s are incomplete; regenerating", path)
        except (CorruptCacheError, json.JSONDecodeError, UnicodeDecodeError) as err:
            logger.warning("teacher generations %s: %s; regenerating", path, err)
        outputs = generate(teacher, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress, desc="teacher generations")
        replace_dir(path)
        data = json.dumps(outputs).encode()
        write_atomic(path / "generations.json", data)
        manifest = {"format": FORMAT, "key": key, "n_prompts": n, "max_new_tokens": max_new_tokens,
                    "file": "generations.json", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        write_manifest(path, manifest)
        return outputs


def teacher_generations(teacher, teacher_path: str, tokenizer, prompts: list[str], train_ex: list[Example],
                        cache_root: str, max_length: int, chunk_mb: int | None = None) -> tuple[list[str], list[str]]:
    """SeqKD's greedy teacher generations for the training examples' prompts (made once,
    cached, up to 64 prompts at a time within ``chunk_mb``): (those prompts, the generations), in
    train_ex order. ``max_length``, the training window, also caps each generation's new tokens."""
    chosen = [prompts[e.index] for e in train_ex]
    key = generations_key(teacher_path, tokenizer, chosen, max_length)
    return chosen, cached_generations(teacher, tokenizer, chosen, cache_root, key, max_new_tokens=max_length,
                                      batch_size=decode_batch(teacher, chunk_mb, 64))
