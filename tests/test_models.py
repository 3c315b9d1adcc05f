"""The micro Qwen2 family and model loading: sizes, save/load round trips, clear errors for
missing or unreachable models, tokenizer compatibility of a teacher-student pair, LoRA."""
from __future__ import annotations

import json
import socket
import time

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM

from kd_utils.models import (MICRO_SIZES, apply_lora, best_device, build_micro_model, check_compatible,
                             count_parameters, default_dtype, load_model, read_manifest)
from kd_utils.tokenization import train_bpe_tokenizer

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


# --- the micro family ------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [512, 1024])  # the micro studies' vocabularies
def test_micro_sizes_strictly_increase_and_span_at_least_10x(vocab):
    counts = [count_parameters(build_micro_model(s, vocab)) for s in MICRO_SIZES]
    assert all(a < b for a, b in zip(counts, counts[1:])), dict(zip(MICRO_SIZES, counts))
    assert counts[-1] >= 10 * counts[0], dict(zip(MICRO_SIZES, counts))


def test_build_micro_model_is_deterministic_from_its_seed():
    a, b, c = (build_micro_model("micro-xs", 300, seed=s) for s in (4, 4, 5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_build_micro_model_rejects_an_unknown_size():
    with pytest.raises(ValueError, match="micro-xs"):
        build_micro_model("micro-xxl", 300)


def test_micro_model_ties_embeddings_and_counts_them_once():
    m = build_micro_model("micro-s", 700, eos_token_id=0, pad_token_id=1)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    every = sum(p.numel() for _, p in m.named_parameters(remove_duplicate=False))
    assert count_parameters(m) == every - m.lm_head.weight.numel()
    assert (m.config.vocab_size, m.config.eos_token_id, m.config.pad_token_id) == (700, 0, 1)


def test_micro_model_has_the_lora_target_projections():
    names = {n.split(".")[-1] for n, _ in build_micro_model("micro-xs", 300).named_modules()}
    assert set(LORA_TARGETS) <= names


# --- save / load ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved_micro")
    model = build_micro_model("micro-m", world.vocab, seed=7, eos_token_id=world.eos, pad_token_id=world.pad).eval()
    model.save_pretrained(d)
    world.tok.save_pretrained(d)
    ids = torch.tensor([world.tok("Tom has 3 apples. Tom gets 4 more.")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return d, ids, logits


def test_save_pretrained_round_trip_gives_identical_logits(saved):
    d, ids, logits = saved
    again = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)


def test_load_model_returns_eval_model_with_identical_logits_and_tokenizer(saved, world):
    d, ids, logits = saved
    model, tok = load_model(str(d), dtype=torch.float32)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
    assert len(tok) == len(world.tok) and tok.eos_token_id == world.eos


@pytest.mark.parametrize("path", ["/nonexistent/kd/model-dir", "./no_such_model_dir", "~/no_such_model_dir"])
def test_load_model_on_a_missing_local_path_raises_file_not_found_naming_it(path):
    with pytest.raises(FileNotFoundError, match="no_such_model_dir|model-dir") as err:
        load_model(path)
    assert path in str(err.value)


class _NetworkSpy:
    """Records DNS lookups (any hub request starts with one) and fails them at once;
    sleeping (the hub client's retry back-off) is made instant."""

    def __init__(self, monkeypatch):
        self.hosts = []
        monkeypatch.setattr(socket, "getaddrinfo", self._lookup)
        monkeypatch.setattr(time, "sleep", lambda s: None)

    def _lookup(self, host, *args, **kwargs):
        self.hosts.append(host)
        raise socket.gaierror(-2, "Name or service not known (blocked by the test)")


def test_load_model_offline_hub_id_raises_a_clear_file_not_found(monkeypatch):
    """HF_HUB_OFFLINE=1 set when the process started (huggingface_hub reads it at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spy = _NetworkSpy(monkeypatch)
    with pytest.raises(FileNotFoundError) as err:
        load_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg and "HF_HUB_OFFLINE" in msg and "local path" in msg
    assert spy.hosts == []


def test_load_model_honours_hf_hub_offline_set_after_import(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spy = _NetworkSpy(monkeypatch)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model")
    assert spy.hosts == [], f"the hub was contacted although HF_HUB_OFFLINE=1: {spy.hosts[:2]}"


def test_defaults_on_this_cpu_machine():
    cpu = torch.device("cpu")
    assert default_dtype(cpu) == torch.float32
    if not torch.cuda.is_available():
        assert best_device() == cpu


def test_read_manifest_is_empty_without_a_manifest_and_the_json_with_one(tmp_path):
    assert read_manifest(tmp_path) == {}
    (tmp_path / "kd_manifest.json").write_text(json.dumps({"method": "fkl", "seed": 2}))
    assert read_manifest(tmp_path) == {"method": "fkl", "seed": 2}


# --- tokenizer compatibility ----------------------------------------------------------------------

def test_check_compatible_accepts_the_same_tokenizer_and_returns_its_size(world):
    assert check_compatible(world.tok, world.tok, "teacher-s", "student-xs") == len(world.tok)


def test_check_compatible_accepts_a_teacher_with_a_few_extra_tokens(world, tmp_path):
    world.tok.save_pretrained(tmp_path)
    from kd_utils.models import load_tokenizer

    bigger = load_tokenizer(tmp_path)
    bigger.add_tokens(["<|extra_0|>", "<|extra_1|>"])
    assert len(bigger) == len(world.tok) + 2
    assert check_compatible(bigger, world.tok, "t", "s") == len(world.tok)


def test_check_compatible_rejects_another_vocabulary_naming_both_models_and_sizes(world, tmp_path):
    other = train_bpe_tokenizer(["completely different text about zebras and quasars " * 3] * 50 +
                                [f"line {i} of a corpus" for i in range(300)], 300, tmp_path / "other")
    with pytest.raises(ValueError) as err:
        check_compatible(world.tok, other, "teacher-s", "student-other")
    msg = str(err.value)
    for part in ("teacher-s", "student-other", str(len(world.tok.get_vocab())), str(len(other.get_vocab()))):
        assert part in msg, (part, msg)


# --- LoRA -------------------------------------------------------------------------------------------

def test_apply_lora_trains_only_the_adapters_and_starts_as_the_base_model(world):
    base = build_micro_model("micro-xs", world.vocab, seed=0)
    ids = torch.tensor([world.examples[0].prompt_ids])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == set(LORA_TARGETS)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, frozen[key]), n
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before), "the adapters did train"


def test_apply_lora_rejects_missing_target_modules_naming_them(world):
    with pytest.raises(ValueError, match="c_attn") as err:
        apply_lora(build_micro_model("micro-xs", world.vocab), 4, 8, 0.0, ["q_proj", "c_attn"])
    assert "q_proj" not in str(err.value).split("found")[0]


def test_load_model_expands_a_home_relative_path(saved, monkeypatch):
    """load_model treats "~/..." as a local path; it must find the model there."""
    d, ids, logits = saved
    monkeypatch.setenv("HOME", str(d.parent))
    model, _ = load_model(f"~/{d.name}", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
