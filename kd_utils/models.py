"""Model families and loading: the micro Qwen2 family, real models from a path or the hub.

Micro models are ordinary Qwen2 causal LMs built from a config and saved with
`save_pretrained`, so every later stage loads them with `AutoModelForCausalLM` exactly
like a hub model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM


@dataclass(frozen=True)
class MicroSize:
    """Shape of one member of the micro Qwen2 family."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int


MICRO_SIZES: dict[str, MicroSize] = {
    "micro-xs": MicroSize(hidden=32, layers=2, heads=4, kv_heads=2, ffn=96),
    "micro-s": MicroSize(hidden=64, layers=2, heads=4, kv_heads=2, ffn=192),
    "micro-m": MicroSize(hidden=96, layers=4, heads=4, kv_heads=2, ffn=288),
    "micro-l": MicroSize(hidden=160, layers=4, heads=4, kv_heads=2, ffn=480),
}


def build_micro_model(size: str, vocab_size: int, max_positions: int = 256, seed: int = 0,
                      eos_token_id: int | None = None, pad_token_id: int | None = None) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 model of a named micro size (deterministic from `seed`)."""
    if size not in MICRO_SIZES:
        raise ValueError(f"unknown micro model size {size!r}; known: {sorted(MICRO_SIZES)}")
    s = MICRO_SIZES[size]
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, intermediate_size=s.ffn,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on a GPU that supports it, fp32 on CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(name_or_path: str, device: torch.device | None = None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False):
    """Load a causal LM (and its tokenizer) from a local directory or a hub id, with clear errors."""
    device = device or best_device()
    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype or default_dtype(device), trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise FileNotFoundError(
            f"could not load model {name_or_path!r}: not a local directory with a saved model, and the hub "
            f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not provide it (offline or unknown id)'}. "
            f"Give a local path or download it first. ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from err
    return model.to(device).eval(), tokenizer


def read_manifest(model_dir: str | Path) -> dict:
    """The project's manifest beside a saved model (params, provenance), or {}."""
    p = Path(model_dir) / "kd_manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}
