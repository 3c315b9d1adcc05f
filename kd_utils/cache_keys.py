"""The keys of the teacher cache and the SeqKD store: a short sha256 of everything that determines
what they hold, so a changed teacher, tokenizer, data or setting gets a new key.

A cache's key (:func:`cache_key`) covers the teacher weights, tokenizer, tokenized data, max length,
k, noise sigma and seed, tail samples m and their seed; a generations key (:func:`generations_key`)
the teacher, tokenizer, prompts and max_new_tokens. Both include the format version
(:data:`kd_utils.cache_shards.FORMAT`). The hash inputs are fixed byte for byte: existing caches
stay valid only while they are.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .cache_shards import FORMAT
from .data import Example
from .losses import TAIL_UNIFORM

__all__ = ["cache_key", "generations_key"]

_KEY_CHARS = 16
# The keys' domain tags (first bytes hashed) keep the module name the cache had when they were
# fixed: changing them would invalidate every existing cache.
_CACHE_TAG = b"kd_utils.teacher_cache/topk"
_GENERATIONS_TAG = b"kd_utils.teacher_cache/greedy-generations"


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
    holds a set of them (:func:`~kd_utils.cache_build.ensure_cache` rebuilds when one is missing).
    """
    h = hashlib.sha256(_CACHE_TAG)
    _update_with_teacher(h, teacher_dir_or_model)
    _update_with_tokenizer(h, tokenizer)
    _update_with_examples(h, examples)
    h.update(json.dumps({"format": FORMAT, "max_length": int(max_length), "k": int(k), "noise": float(noise),
                         "noise_seed": int(noise_seed), "samples": int(samples), "sample_seed": int(sample_seed),
                         "tail_uniform": TAIL_UNIFORM}, sort_keys=True).encode())
    return h.hexdigest()[:_KEY_CHARS]


def generations_key(teacher_dir_or_model: str | Path | torch.nn.Module, tokenizer, prompts: Sequence[str],
                    max_new_tokens: int) -> str:
    """Short sha256 of teacher, tokenizer, prompts and max_new_tokens (greedy decoding)."""
    h = hashlib.sha256(_GENERATIONS_TAG)
    _update_with_teacher(h, teacher_dir_or_model)
    _update_with_tokenizer(h, tokenizer)
    h.update(json.dumps({"format": FORMAT, "prompts": list(prompts), "max_new_tokens": int(max_new_tokens)}).encode())
    return h.hexdigest()[:_KEY_CHARS]
