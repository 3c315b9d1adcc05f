"""Model families and loading: the micro Qwen2 family, real models from a path or the hub.

Micro models are ordinary Qwen2 causal LMs built from a config and saved with
`save_pretrained`, so every later stage loads them with `AutoModelForCausalLM` exactly
like a hub model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from .names import MICRO_SIZES


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
    path = Path(name_or_path).expanduser()
    looks_local = path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.exists()
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    if (path / "adapter_config.json").exists():
        return _load_adapter(path, device, dtype, trust_remote_code, allow_pickle)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    source = str(path) if path.exists() else name_or_path
    if offline and not path.exists() and not in_hub_cache(name_or_path):
        raise FileNotFoundError(f"could not load model {name_or_path!r}: not a local directory, not in the hub "
                                "cache, and the hub is disabled (HF_HUB_OFFLINE=1); give a local path")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype or default_dtype(device), trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, local_files_only=offline)
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, local_files_only=offline)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r}: not a local directory with a saved model, and the hub "
            f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not provide it (offline or unknown id)'}. "
            f"Give a local path or download it first. ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from err
    return model.to(device).eval(), tokenizer


def in_hub_cache(repo_id: str) -> bool:
    """Whether a hub model's config is already in the local hub cache (usable offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _load_adapter(path: Path, device: torch.device, dtype, trust_remote_code: bool, allow_pickle: bool):
    """A saved LoRA adapter: its base model (named in the manifest) plus the adapter, merged."""
    from peft import PeftModel

    base = read_manifest(path).get("base_model")
    if not base:
        raise FileNotFoundError(f"{path} holds a LoRA adapter but its kd_manifest.json names no base_model")
    model, _ = load_model(base, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          allow_pickle=allow_pickle)
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return merged.to(device).eval(), load_tokenizer(path, trust_remote_code=trust_remote_code)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, local_files_only: bool = False):
    """AutoTokenizer, except for a generic tokenizer.json (the micro BPE, saved as
    `TokenizersBackend`): transformers 5 would swap in the model type's own class (Qwen2's
    pre-tokenizer regex) when a Qwen2 config sits beside it, changing the tokenisation."""
    config = Path(name_or_path) / "tokenizer_config.json"
    if config.exists() and json.loads(config.read_text()).get("tokenizer_class") == "TokenizersBackend":
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(str(name_or_path))
    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code,
                                         local_files_only=local_files_only)


def read_manifest(model_dir: str | Path) -> dict:
    """The project's manifest beside a saved model (params, provenance), or {}."""
    p = Path(model_dir) / "kd_manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def check_compatible(teacher_tokenizer, student_tokenizer, teacher: str, student: str) -> int:
    """Check that teacher and student share a tokenizer (same ids on the shared vocabulary)
    and return the KD vocabulary size. Logits wider than the tokenizer (Qwen2.5-7B/14B pad
    152064 vs 151936) are sliced to this size by the callers, not an error."""
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    shared = tv.keys() & sv.keys()
    same_ids = all(tv[t] == sv[t] for t in shared)
    coverage = len(shared) / max(len(tv), len(sv))
    if not same_ids or coverage < 0.99:
        raise ValueError(
            f"teacher {teacher!r} (vocabulary {len(tv)}) and student {student!r} (vocabulary {len(sv)}) do not "
            f"share a tokenizer: {len(shared)} shared tokens, ids {'agree' if same_ids else 'differ'}; "
            "token-level KD needs the same tokenizer family")
    return min(len(teacher_tokenizer), len(student_tokenizer))


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules) -> torch.nn.Module:
    """Wrap a causal LM with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in present]
    if missing:
        raise ValueError(f"LoRA target modules {missing} not found in the model; it has e.g. "
                         f"{sorted(x for x in present if x.endswith('proj'))}")
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=list(target_modules), task_type="CAUSAL_LM"))
