"""The micro-study's byte-level BPE tokenizer: digits one per token, a compressed prompt
template, lossless round trips, and identical tokenisation wherever it is loaded back."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from kd_utils.microworld import GENERATORS, generate_task
from kd_utils.models import build_micro_model, load_model, load_tokenizer
from kd_utils.tasks import build_prompt
from kd_utils.tokenization import EOS, PAD, train_bpe_tokenizer

ODD_TEXTS = [
    "café naïve — 😀 ünïcödé ∑ 中文",
    "  leading and  double  spaces\n\ttabs\r\nwindows lines ",
    "12345 + 67 = 12412. -3.75, 1,000,000 and 007",
    "### Response:\n### Instruction:\n\n\n",
    "",
]


@pytest.fixture(scope="module")
def all_task_texts() -> list[str]:
    """Prompts and outputs of every micro task, most of them never seen in tokenizer training."""
    items = [it for t in sorted(GENERATORS) for it in generate_task(t, 30, seed=11)]
    return [build_prompt(it["instruction"]) for it in items] + [it["output"] for it in items]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_token_holding_a_digit_is_exactly_one_digit(world, all_task_texts):
    for text in all_task_texts + ODD_TEXTS:
        for i in _ids(world.tok, text):
            piece = world.tok.decode([i])
            if any(c.isdigit() for c in piece):
                assert len(piece) == 1, (text, piece)


@pytest.mark.parametrize("number", ["0", "7", "42", "2024", "1234567890", "100000"])
def test_a_number_costs_one_token_per_digit(world, number):
    for text in (number, f" {number}", f"is {number}."):
        pieces = [world.tok.decode([i]) for i in _ids(world.tok, text)]
        assert [p for p in pieces if p.isdigit()] == list(number), pieces


def test_the_fixed_prompt_template_compresses_to_a_few_tokens(world):
    template = build_prompt("")
    n = len(_ids(world.tok, template))
    assert n <= 16, f"{n} tokens for the {len(template)}-character template"


def test_prompt_overhead_over_the_instruction_is_a_few_tokens(world):
    over = [len(_ids(world.tok, build_prompt(it["instruction"]))) - len(_ids(world.tok, it["instruction"]))
            for it in world.test_items]
    assert max(over) <= 16, max(over)


def test_decode_inverts_encode_on_every_task_text(world, all_task_texts):
    bad = [t for t in all_task_texts if world.tok.decode(_ids(world.tok, t)) != t]
    assert not bad, bad[:2]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_decode_inverts_encode_on_any_unicode_and_whitespace(world, text):
    """Byte-level BPE: no unknown token, no normalisation, nothing lost."""
    ids = _ids(world.tok, text)
    assert world.tok.decode(ids) == text
    assert world.tok.unk_token_id is None or world.tok.unk_token_id not in ids


def test_vocabulary_has_the_requested_size_and_both_special_tokens(world):
    tok = world.tok
    assert len(tok) == 512
    assert tok.eos_token == EOS and tok.pad_token == PAD
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    assert _ids(tok, EOS) == [tok.eos_token_id] and _ids(tok, PAD) == [tok.pad_token_id]


def test_no_special_tokens_are_added_around_text(world):
    """tokenize_pairs and generation encode prompts with the tokenizer's special tokens: the
    micro BPE adds none (no BOS), so training and evaluation prompts are the same ids."""
    text = build_prompt("is 3 larger than 2?")
    assert world.tok(text)["input_ids"] == _ids(world.tok, text)


def test_training_is_deterministic(tmp_path, world):
    texts = [build_prompt(it["instruction"]) + it["output"] for it in world.train_items]
    a = train_bpe_tokenizer(texts, 400, tmp_path / "a")
    b = train_bpe_tokenizer(texts, 400, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert a.get_vocab() == b.get_vocab()


def test_reloads_with_autotokenizer_and_tokenises_identically(world, all_task_texts):
    again = AutoTokenizer.from_pretrained(str(world.tok_dir))
    assert len(again) == len(world.tok)
    assert (again.eos_token_id, again.pad_token_id) == (world.tok.eos_token_id, world.tok.pad_token_id)
    for text in all_task_texts + ODD_TEXTS:
        assert again(text)["input_ids"] == world.tok(text)["input_ids"], text


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory):
    """A Qwen2 model saved with the micro tokenizer beside it, as every micro model is."""
    d = tmp_path_factory.mktemp("qwen2_with_micro_tokenizer")
    build_micro_model("micro-xs", world.vocab, eos_token_id=world.eos, pad_token_id=world.pad).save_pretrained(d)
    world.tok.save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["model_type"] == "qwen2"
    return d


def test_load_tokenizer_beside_a_qwen2_config_tokenises_like_the_original(world, model_dir, all_task_texts):
    """Regression: transformers 5 swaps in Qwen2Tokenizer (another pre-tokenizer) when a
    Qwen2 config sits beside a generic tokenizer.json."""
    loaded = load_tokenizer(model_dir)
    for text in all_task_texts + ODD_TEXTS:
        assert loaded(text)["input_ids"] == world.tok(text)["input_ids"], text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (world.tok.eos_token_id, world.tok.pad_token_id)


def test_load_model_returns_the_original_tokenisation(world, model_dir, all_task_texts):
    _, loaded = load_model(str(model_dir))
    for text in all_task_texts[:50] + ODD_TEXTS:
        assert loaded(text)["input_ids"] == world.tok(text)["input_ids"], text
