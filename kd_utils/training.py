"""The training loop: AdamW, warm-up, token-normalised gradient accumulation, autocast,
validation cross-entropy and best-checkpoint selection (as the paper).

The loop knows nothing about distillation: an objective maps (model, batch) to
(loss summed over target tokens, number of target tokens); see `kd_utils.methods`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import IGNORE

Batch = dict[str, torch.Tensor]
Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, int]]
Prepare = Callable[[torch.nn.Module, Batch], Batch]


@dataclass(frozen=True)
class OptimSettings:
    """Optimiser and schedule of one training run."""

    max_steps: int
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    autocast: str = "auto"  # "auto" | "bf16" | "off"
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_step: int = -1
    best_val_loss: float = math.inf
    seconds: float = 0.0
    target_tokens: int = 0


def summed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (float32) of a batch's logits [B, T, V] against its labels [B, T],
    summed over the target tokens (the labels after the first position that are not -100)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def token_ce(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over target tokens (labels != -100), and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return summed_ce(logits, batch["labels"]), int((batch["labels"][:, 1:] != IGNORE).sum())


def use_autocast(setting: str, device: torch.device, n_params: int) -> bool:
    """bf16 autocast: always on a bf16 GPU; on CPU only from ~8M parameters, where it pays."""
    if setting == "off":
        return False
    if setting == "bf16":
        return True
    if setting != "auto":
        raise ValueError(f"autocast must be 'auto', 'bf16' or 'off', not {setting!r}")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return n_params >= 8_000_000


def autocast_context(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def lr_lambda(settings: OptimSettings) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps."""
    def f(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[Batch], amp: bool = False) -> float:
    """Mean cross-entropy per target token over the validation batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in batches:
        with autocast_context(amp, device):
            loss, n = token_ce(model, to_device(b, device))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[Batch], objective: Objective,
                         amp: bool = False) -> tuple[float, int]:
    """Backward over the micro-batches of one optimiser step, normalised by the step's total
    number of target tokens (not a mean of micro-batch means). Returns (step loss, tokens)."""
    device = next(model.parameters()).device
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        with autocast_context(amp, device):
            loss_sum, _ = objective(model, b)
        (loss_sum / max(n_tokens, 1)).backward()
        total += float(loss_sum.detach())
    return total / max(n_tokens, 1), n_tokens


def train(model: torch.nn.Module, steps: Iterator[list[Batch]], objective: Objective, settings: OptimSettings,
          val_batches: Sequence[Batch] = (), progress: bool = True, desc: str = "train",
          on_eval: Callable[[int, float], None] | None = None, prepare: Prepare | None = None) -> TrainResult:
    """Run `settings.max_steps` optimiser steps; each item of `steps` is the list of
    micro-batches of one step (gradient accumulation).

    The loss of a step is the sum of the objective over all its target tokens divided by
    their number (not a mean of micro-batch means). With validation batches, the trainable
    weights of the step with the lowest validation cross-entropy are restored at the end.
    `prepare` may replace a micro-batch before its tokens are counted (on-policy sampling).
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    amp = use_autocast(settings.autocast, device, sum(p.numel() for p in params))
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(settings))
    result, best_state = TrainResult(), None
    t0 = time.perf_counter()

    def evaluate(step: int) -> None:
        nonlocal best_state
        if not val_batches:
            return
        val = validation_loss(model, val_batches, amp)
        result.history[-1]["val_loss"] = val
        if val < result.best_val_loss:
            result.best_val_loss, result.best_step = val, step
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if on_eval:
            on_eval(step, val)

    model.train()
    bar = tqdm(total=settings.max_steps, desc=desc, disable=not progress, mininterval=2.0)
    for step, micro_batches in zip(range(settings.max_steps), steps):
        micro_batches = [to_device(b, device) for b in micro_batches]
        if prepare is not None:
            micro_batches = [prepare(model, b) for b in micro_batches]
        total, n_tokens = accumulate_gradients(model, micro_batches, objective, amp)
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.target_tokens += n_tokens
        result.history.append({"step": step + 1, "loss": total, "lr": lr, "seconds": time.perf_counter() - t0})
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.max_steps:
            evaluate(step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{result.history[-1]['loss']:.3f}", refresh=False)
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def cycle_steps(make_epoch: Callable[[int], Iterable[list[Batch]]]) -> Iterator[list[Batch]]:
    """Steps over as many epochs as the loop asks for."""
    epoch = 0
    while True:
        produced = 0
        for step in make_epoch(epoch):
            produced += 1
            yield step
        if produced == 0:
            raise ValueError(f"epoch {epoch} produced no optimizer step (fewer batches than grad_accum?)")
        epoch += 1
