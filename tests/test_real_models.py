"""The real-model path, offline: tiny random Qwen2 and Llama models saved to disk (one
teacher with logits padded beyond its tokenizer) go through the same notebooks as hub models:
LoRA SFT and KD (adapters saved alone, loaded back on their base), evaluation, statistics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kd_utils.microworld import write_world
from kd_utils.tasks import build_prompt
from kd_utils.tokenization import train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_real_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    write_world(root / "data", n_train=40, n_test=6, seed=0, tasks=["micro_addsub", "micro_boolq"])
    train = [it for t in ("micro_addsub", "micro_boolq")
             for it in json.loads((root / "data" / t / "train.json").read_text())]
    (root / "train.json").write_text(json.dumps(train))
    tok = train_bpe_tokenizer([build_prompt(it["instruction"]) + it["output"] for it in train], 400, root / "tok")
    v = len(tok)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    big = {**small, "hidden_size": 64, "intermediate_size": 128}
    models = {
        # the teacher's logits are padded 64 beyond the tokenizer, as Qwen2.5-7B/14B
        "qwen-t": _save(Qwen2ForCausalLM(Qwen2Config(vocab_size=v + 64, **big)), tok, root / "qwen-t"),
        "qwen-s": _save(Qwen2ForCausalLM(Qwen2Config(vocab_size=v, **small)), tok, root / "qwen-s"),
        "llama-t": _save(LlamaForCausalLM(LlamaConfig(vocab_size=v, **big)), tok, root / "llama-t"),
        "llama-s": _save(LlamaForCausalLM(LlamaConfig(vocab_size=v, **small)), tok, root / "llama-s"),
    }
    params = {
        "study": "tiny_real", "seeds": [0],
        "models": {k: {"path": p} for k, p in models.items()},
        "teachers": ["qwen-t", "llama-t"], "students": ["qwen-s", "llama-s"],
        "pairs": [["qwen-t", "qwen-s"], ["llama-t", "llama-s"]],
        "training": {"train_data": str(root / "train.json"), "steps": 4, "lr": 1e-3, "batch_size": 4,
                     "warmup_steps": 1, "eval_every": 2, "n_val": 8, "max_length": 128,
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "kd": {"methods": ["fkl", "gkd"], "temperatures": [2.0], "teacher_cache": "always"},
        "evaluation": {"tasks": ["micro_addsub", "micro_boolq"], "data_root": str(root / "data"), "limit": 4,
                       "batch_size": 8, "max_new_tokens": {"math": 8, "commonsense": 8}},
        "executor": {"kind": "local", "max_workers": 2, "threads_per_worker": 1},
    }
    path = root / "tiny_real.yaml"
    path.write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "kd_utils.grid", "run", str(path), "--outputs", str(root / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return root / "out" / "tiny_real", models


def test_every_model_is_trained_evaluated_and_analysed(tiny_real_study):
    study, _ = tiny_real_study
    results = pd.read_csv(study / "results.csv")
    assert results["model"].nunique() == 4 + 4  # 4 SFT (every model) + 2 pairs x (fkl, gkd)
    assert set(results[results["kind"] == "kd"]["teacher"]) == {"qwen-t", "llama-t"}
    assert (study / "report.html").exists()


def test_students_save_only_their_lora_adapter_and_name_the_base(tiny_real_study):
    study, models = tiny_real_study
    dirs = [m.parent / "model" for m in (study / "distill").glob("*/metrics.json")]
    assert dirs
    for d in dirs:
        assert (d / "adapter_config.json").exists()
        assert not (d / "model.safetensors").exists()
        assert json.loads((d / "kd_manifest.json").read_text())["base_model"] in models.values()


def test_the_padded_teacher_vocabulary_is_sliced_for_kd(tiny_real_study):
    study, _ = tiny_real_study
    runs = [json.loads(m.read_text()) for m in (study / "distill").glob("*/metrics.json")]
    qwen_kd = [r for r in runs if r["teacher"] == "qwen-t"]
    assert {r["method"] for r in qwen_kd} == {"fkl", "gkd"}
    assert all(r["best_val_loss"] == r["best_val_loss"] for r in qwen_kd)  # finite, not NaN
