"""Training data (kd_utils.data) and the training loop (kd_utils.training): batches that put
targets only on responses, token-sum gradient accumulation, determinism, best-checkpoint
restore, the learning-rate schedule and the autocast rules."""
from __future__ import annotations

import math
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kd_utils.data import (IGNORE, Example, collate, collate_blocks, epoch_batches, pack_corpus,
                           split_validation, tokenize_pairs)
from kd_utils.models import build_micro_model
from kd_utils.training import (OptimSettings, accumulate_gradients, cycle_steps, lr_lambda, token_ce, train,
                               use_autocast, validation_loss)

# --- tokenize_pairs --------------------------------------------------------------------------


def test_tokenize_pairs_keeps_prompt_whole_and_ends_response_with_eos(world):
    prompts = ["### Instruction:\nis 3 larger than 2?\n\n### Response:\n", "Q: 12 + 30?\n"]
    responses = ["the correct answer is true", "12 + 30 = 42. The answer is 42."]
    ex = tokenize_pairs(world.tok, prompts, responses, max_length=world.max_length)
    for i, (e, p, r) in enumerate(zip(ex, prompts, responses)):
        assert e.index == i
        assert list(e.prompt_ids) == world.tok(p)["input_ids"]
        assert list(e.response_ids) == world.tok(r, add_special_tokens=False)["input_ids"] + [world.eos]
        assert world.tok.decode(e.prompt_ids) + world.tok.decode(e.response_ids[:-1]) == p + r


def test_tokenize_pairs_truncates_only_the_end_of_the_response(world):
    prompt, response = "Count: ", " ".join(str(i) for i in range(40))
    full = tokenize_pairs(world.tok, [prompt], [response], max_length=1000)[0]
    cut = tokenize_pairs(world.tok, [prompt], [response], max_length=len(full.prompt_ids) + 10)[0]
    assert cut.prompt_ids == full.prompt_ids
    assert len(cut.prompt_ids) + len(cut.response_ids) == len(full.prompt_ids) + 10
    assert cut.response_ids == full.response_ids[:10]


def test_a_long_prompt_loses_its_left_and_keeps_its_end_and_the_whole_response(world):
    prompt, response = "word " * 50 + "is 3 larger than 2?", "the correct answer is true"
    full = tokenize_pairs(world.tok, [prompt], [response], max_length=1000)[0]
    n = len(full.response_ids) + 12
    report = {}
    cut = tokenize_pairs(world.tok, ["ok", prompt], ["a", response], max_length=n, report=report)[1]
    assert cut.index == 1 and cut.response_ids == full.response_ids
    assert cut.prompt_ids == full.prompt_ids[-12:]
    assert report == {"examples": 2, "prompt_truncated": 1, "response_truncated": 0, "skipped": 0}


class _DigitTokenizer:
    """One token per digit (id = digit + 2), a special BOS (1) on prompts, eos 9."""

    eos_token_id, all_special_ids = 9, [1, 9]

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [([1] if add_special_tokens else []) + [int(c) + 2 for c in t] for t in texts]}


def test_left_truncation_keeps_the_special_token_prefix():
    ex = tokenize_pairs(_DigitTokenizer(), ["1234567"], ["12"], max_length=8)[0]
    assert ex.prompt_ids == (1, 6, 7, 8, 9) and ex.response_ids == (3, 4, 9)


def test_a_response_longer_than_half_the_window_is_cut_and_the_prompt_keeps_half(world):
    prompt, response = "word " * 30, " ".join(str(i) for i in range(80))
    full = tokenize_pairs(world.tok, [prompt], [response], max_length=1000)[0]
    report = {}
    cut = tokenize_pairs(world.tok, [prompt], [response], max_length=40, report=report)[0]
    assert len(cut.prompt_ids) == min(len(full.prompt_ids), 20)
    assert cut.response_ids == full.response_ids[: 40 - len(cut.prompt_ids)]
    assert report["response_truncated"] == 1


def test_skip_leaves_long_pairs_out_and_counts_them(world):
    prompt = "word " * 50
    report = {}
    ex = tokenize_pairs(world.tok, ["ok", prompt, "fine"], ["a", "b", "c"], max_length=20, truncation="skip",
                        report=report)
    assert [e.index for e in ex] == [0, 2]
    assert report == {"examples": 2, "prompt_truncated": 0, "response_truncated": 0, "skipped": 1}
    with pytest.raises(ValueError, match="no example fits"):
        tokenize_pairs(world.tok, [prompt], ["b"], max_length=20, truncation="skip")
    with pytest.raises(ValueError, match="unknown truncation rule 'right'"):
        tokenize_pairs(world.tok, ["a"], ["b"], max_length=20, truncation="right")


def test_loss_on_prompt_puts_every_token_after_the_first_in_the_labels(world):
    e = tokenize_pairs(world.tok, ["Q: 1 + 2?\n"], ["3"], max_length=50, loss_on_prompt=True)[0]
    batch = collate([e], 0)
    seq = list(e.prompt_ids + e.response_ids)
    assert batch["labels"][0, :len(seq)].tolist() == seq
    assert e.n_targets == len(seq) - 1 == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_tokenize_pairs_rejects_mismatched_lengths_and_a_tokenizer_without_eos(world):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        tokenize_pairs(world.tok, ["a", "b"], ["c"], max_length=50)
    no_eos = SimpleNamespace(eos_token_id=None)
    with pytest.raises(ValueError, match="eos"):
        tokenize_pairs(no_eos, ["a"], ["b"], max_length=50)


# --- collate ---------------------------------------------------------------------------------------

def _examples() -> list[Example]:
    return [Example((5, 6, 7), (8, 9, 2), 10), Example((5,), (4, 2), 3), Example((1, 1, 1, 1), (3, 3, 3, 3, 2), 7)]


def test_collate_right_pads_and_targets_only_response_tokens():
    ex, pad = _examples(), 99
    b = collate(ex, pad)
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in ex)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, width)
    for row, e in enumerate(ex):
        p, r = len(e.prompt_ids), len(e.response_ids)
        assert b["input_ids"][row, : p + r].tolist() == list(e.prompt_ids + e.response_ids)
        assert b["input_ids"][row, p + r:].eq(pad).all()
        assert b["attention_mask"][row].tolist() == [1] * (p + r) + [0] * (width - p - r)
        assert b["labels"][row, :p].eq(IGNORE).all(), "no target on the prompt"
        assert b["labels"][row, p: p + r].tolist() == list(e.response_ids)
        assert b["labels"][row, p + r:].eq(IGNORE).all(), "no target on padding"
    assert b["index"].tolist() == [10, 3, 7]


def test_collate_target_count_is_the_number_of_response_tokens():
    ex = _examples()
    b = collate(ex, 0)
    assert int((b["labels"][:, 1:] != IGNORE).sum()) == sum(len(e.response_ids) for e in ex)


def test_collate_blocks_targets_every_token():
    blocks = torch.arange(12).view(3, 4)
    b = collate_blocks(blocks)
    assert torch.equal(b["labels"], blocks) and b["attention_mask"].eq(1).all()
    b["labels"][0, 0] = -5
    assert blocks[0, 0] == 0, "labels must not alias the input ids"


# --- pack_corpus, epoch_batches, split_validation ------------------------------------------------

def test_pack_corpus_is_the_eos_joined_stream_cut_into_blocks(world):
    texts = [f"{a} plus {a} is {2 * a}." for a in range(60)]
    blocks = pack_corpus(world.tok, texts, block=16)
    stream = []
    for t in texts:
        stream += world.tok(t, add_special_tokens=False)["input_ids"] + [world.eos]
    assert blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]


def test_pack_corpus_too_short_for_one_block_raises(world):
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_corpus(world.tok, ["hi"], block=64)


@pytest.mark.parametrize("n,bs", [(10, 3), (16, 4), (1, 8), (37, 16)])
def test_epoch_batches_cover_every_index_once_per_epoch(n, bs):
    for epoch in range(3):
        batches = list(epoch_batches(n, bs, seed=5, epoch=epoch))
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert all(len(b) == bs for b in batches[:-1]) and 0 < len(batches[-1]) <= bs


def test_epoch_batches_are_deterministic_and_reshuffled_each_epoch():
    one = list(epoch_batches(50, 7, seed=1, epoch=0))
    assert one == list(epoch_batches(50, 7, seed=1, epoch=0))
    assert one != list(epoch_batches(50, 7, seed=1, epoch=1))
    assert one != list(epoch_batches(50, 7, seed=2, epoch=0))


def test_split_validation_partitions_deterministically():
    ex = [Example((1,), (2,), i) for i in range(30)]
    train_a, val_a = split_validation(ex, 8, seed=3)
    train_b, val_b = split_validation(ex, 8, seed=3)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 8 and len(train_a) == 22
    assert sorted(e.index for e in train_a + val_a) == list(range(30))
    assert [e.index for e in val_a] == sorted(e.index for e in val_a)
    assert split_validation(ex, 8, seed=4)[1] != val_a


@pytest.mark.parametrize("n_val", [0, 30, 31, -1])
def test_split_validation_rejects_sizes_that_leave_a_split_empty(n_val):
    ex = [Example((1,), (2,), i) for i in range(30)]
    with pytest.raises(ValueError, match="validation size"):
        split_validation(ex, n_val, seed=0)


# --- gradient accumulation -----------------------------------------------------------------------

def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture
def xs(world):
    return build_micro_model("micro-xs", world.vocab, seed=0, eos_token_id=world.eos, pad_token_id=world.pad)


def _uneven_micro_batches(world):
    """Two micro-batches with very different target-token counts, and their concatenation."""
    by_len = sorted(world.examples, key=lambda e: len(e.response_ids))
    short, long = by_len[:5], by_len[-3:]
    parts = [collate(short, world.pad), collate(long, world.pad)]
    counts = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in parts]
    assert counts[1] > 2 * counts[0], counts
    return parts, collate(short + long, world.pad), counts


def test_accumulated_gradients_equal_the_gradients_of_the_concatenated_batch(world, xs):
    parts, whole, counts = _uneven_micro_batches(world)
    loss, n = accumulate_gradients(xs, parts, token_ce)
    accumulated = _grads(xs)
    total, n_whole = token_ce(xs, whole)
    (total / n_whole).backward()
    reference = _grads(xs)
    assert n == n_whole == sum(counts)
    assert loss == pytest.approx(float(total.detach()) / n_whole, rel=1e-5)
    assert accumulated.keys() == reference.keys() and accumulated
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)


def test_accumulated_gradients_differ_from_a_mean_of_micro_batch_means(world, xs):
    parts, _, counts = _uneven_micro_batches(world)
    accumulate_gradients(xs, parts, token_ce)
    accumulated = _grads(xs)
    for b, n in zip(parts, counts):
        loss, _ = token_ce(xs, b)
        (loss / n / len(parts)).backward()
    mean_of_means = _grads(xs)
    diff = max(float((accumulated[k] - mean_of_means[k]).norm() / mean_of_means[k].norm().clamp_min(1e-12))
               for k in accumulated)
    assert diff > 1e-2


# --- the training loop ---------------------------------------------------------------------------

def _steps(world, seed=0, bs=16):
    return cycle_steps(lambda ep: ([collate([world.examples[i] for i in b], world.pad)]
                                   for b in epoch_batches(len(world.examples), bs, seed, ep)))


def _train_xs(world, seed_data=0, steps=8, **kw):
    model = build_micro_model("micro-xs", world.vocab, seed=0, eos_token_id=world.eos, pad_token_id=world.pad)
    result = train(model, _steps(world, seed_data), token_ce,
                   OptimSettings(max_steps=steps, lr=3e-3, warmup_steps=2, eval_every=10**6, **kw), progress=False)
    return model, result


def test_train_is_deterministic_for_the_same_seed(world):
    a, ra = _train_xs(world)
    b, rb = _train_xs(world)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]
    c, _ = _train_xs(world, seed_data=1)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_train_reduces_the_training_loss_and_counts_target_tokens(world):
    _, r = _train_xs(world, steps=30)
    assert len(r.history) == 30 and [h["step"] for h in r.history] == list(range(1, 31))
    first, last = (sum(h["loss"] for h in part) / 5 for part in (r.history[:5], r.history[-5:]))
    assert last < first - 0.5
    assert r.target_tokens > 0 and r.seconds > 0


def test_the_best_checkpoint_by_validation_loss_is_restored(world):
    """Twelve steps on task data, then eighteen on random tokens: validation gets worse later,
    and the model returned must be the best one seen, whose loss is result.best_val_loss."""
    train_ex, val_ex = split_validation(world.examples, 40, seed=0)
    val = [collate(val_ex, world.pad)]
    gen = torch.Generator().manual_seed(0)

    def steps():
        for i, b in enumerate(epoch_batches(len(train_ex), 16, 0, 0)):
            if i == 12:
                break
            yield [collate([train_ex[j] for j in b], world.pad)]
        while True:
            yield [collate_blocks(torch.randint(0, world.vocab, (16, 40), generator=gen))]

    model = build_micro_model("micro-xs", world.vocab, seed=0, eos_token_id=world.eos, pad_token_id=world.pad)
    seen = []
    r = train(model, steps(), token_ce, OptimSettings(max_steps=30, lr=5e-3, warmup_steps=2, eval_every=3),
              val_batches=val, progress=False, on_eval=lambda s, v: seen.append((s, v)))
    evaluated = [(h["step"], h["val_loss"]) for h in r.history if "val_loss" in h]
    assert evaluated == seen and [s for s, _ in seen] == list(range(3, 31, 3))
    assert seen[-1][1] > r.best_val_loss + 0.1, f"precondition: validation must get worse later, {seen}"
    assert (r.best_step, r.best_val_loss) == min(seen, key=lambda sv: sv[1])
    assert r.best_step < 30
    assert validation_loss(model, val) == pytest.approx(r.best_val_loss, rel=1e-6)
    assert not model.training


def test_validation_loss_is_mean_token_cross_entropy_and_keeps_the_training_flag(world, xs):
    batches = [collate(world.examples[:7], world.pad), collate(world.examples[7:20], world.pad)]
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = xs(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                           ignore_index=IGNORE, reduction="sum"))
            count += int((b["labels"][:, 1:] != IGNORE).sum())
    xs.train()
    assert validation_loss(xs, batches) == pytest.approx(total / count, rel=1e-5)
    assert xs.training


def test_train_without_trainable_parameters_raises(world, xs):
    xs.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(xs, _steps(world), token_ce, OptimSettings(max_steps=1), progress=False)


def test_prepare_replaces_batches_before_their_tokens_are_counted(world, xs):
    def shorten(model, batch):
        labels = batch["labels"].clone()
        labels[1:] = IGNORE  # keep the targets of the first row only
        return {**batch, "labels": labels}

    first = [collate([world.examples[i] for i in b], world.pad) for b in epoch_batches(len(world.examples), 16, 0, 0)]
    expected = sum(int((shorten(None, b)["labels"][:, 1:] != IGNORE).sum()) for b in first[:3])
    r = train(xs, iter([[b] for b in first]), token_ce, OptimSettings(max_steps=3, warmup_steps=1),
              progress=False, prepare=shorten)
    assert r.target_tokens == expected


# --- learning-rate schedule -------------------------------------------------------------------

@pytest.mark.parametrize("warmup,max_steps,floor", [(10, 100, 0.1), (1, 20, 0.0), (5, 6, 0.2), (0, 50, 0.1)])
def test_lr_lambda_warms_up_linearly_then_decays_by_cosine_to_the_floor(warmup, max_steps, floor):
    f = lr_lambda(OptimSettings(max_steps=max_steps, warmup_steps=warmup, min_lr_ratio=floor))
    ramp = [f(s) for s in range(warmup)]
    assert ramp == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    decay = [f(s) for s in range(warmup, max_steps + 1)]
    assert decay[0] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(decay, decay[1:])), "monotone after warm-up"
    assert f(max_steps) == pytest.approx(floor) and f(10 * max_steps) == pytest.approx(floor)
    if max_steps - warmup >= 2 and (max_steps - warmup) % 2 == 0:
        assert f(warmup + (max_steps - warmup) // 2) == pytest.approx((1 + floor) / 2)


class _Scalar(torch.nn.Module):
    """One parameter with gradient 1 every step: AdamW then moves it by exactly the step's lr."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))


def _applied_lrs(settings: OptimSettings):
    model, before = _Scalar(), []
    batch = {"labels": torch.zeros(1, 2, dtype=torch.long)}  # one target token

    def steps():
        while True:
            before.append(float(model.w.detach()))
            yield [batch]

    r = train(model, steps(), lambda m, b: (m.w.sum(), 1), settings, progress=False)
    before.append(float(model.w.detach()))
    return [a - b for a, b in zip(before, before[1:])][: settings.max_steps], r


def test_the_optimiser_applies_the_warmup_cosine_schedule():
    s = OptimSettings(max_steps=12, lr=0.01, warmup_steps=4, min_lr_ratio=0.1, grad_clip=0)
    applied, _ = _applied_lrs(s)
    f = lr_lambda(s)
    assert applied == pytest.approx([s.lr * f(i) for i in range(s.max_steps)], rel=1e-6)


def test_the_logged_lr_is_the_lr_of_that_step():
    s = OptimSettings(max_steps=6, lr=0.01, warmup_steps=4, grad_clip=0)
    applied, r = _applied_lrs(s)
    assert [h["lr"] for h in r.history] == pytest.approx(applied, rel=1e-6)


# --- autocast ------------------------------------------------------------------------------------

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_autocast_off_and_bf16_are_unconditional():
    for dev in (CPU, CUDA):
        for n in (10, 10**9):
            assert use_autocast("off", dev, n) is False
            assert use_autocast("bf16", dev, n) is True


def test_autocast_auto_on_cpu_only_from_8m_parameters():
    assert use_autocast("auto", CPU, 7_999_999) is False
    assert use_autocast("auto", CPU, 8_000_000) is True


@pytest.mark.parametrize("bf16", [True, False])
def test_autocast_auto_on_gpu_follows_bf16_support(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert use_autocast("auto", CUDA, 1000) is bf16


@pytest.mark.parametrize("bad", ["fp16", "on", "", "BF16"])
def test_autocast_rejects_unknown_settings(bad):
    with pytest.raises(ValueError, match="autocast"):
        use_autocast(bad, CPU, 10)


def test_bf16_autocast_training_on_cpu_runs_and_keeps_fp32_weights(world):
    model, r = _train_xs(world, steps=3, autocast="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(h["loss"]) for h in r.history)


# --- cycle_steps ------------------------------------------------------------------------------------

def test_cycle_steps_runs_epoch_after_epoch():
    steps = cycle_steps(lambda e: iter([[f"e{e}b0"], [f"e{e}b1"]]))
    assert [next(steps) for _ in range(5)] == [["e0b0"], ["e0b1"], ["e1b0"], ["e1b1"], ["e2b0"]]


def _alarm(seconds):
    def handler(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)


def test_cycle_steps_raises_on_an_empty_epoch_instead_of_hanging():
    _alarm(2)
    try:
        with pytest.raises(ValueError):
            next(cycle_steps(lambda e: iter(())))
    finally:
        signal.alarm(0)
