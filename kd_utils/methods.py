"""Distillation recipes as objectives for the training loop.

Methods, chosen by name in params:
- `sft`: cross-entropy on the gold outputs.
- word-level KD with any objective of `kd_utils.losses` on the gold sequences (`fkl` is
  what the paper's authors ran as "SeqKD", `rkl` what they ran as "RevKD").
- `seqkd`: the paper's text definition, cross-entropy on teacher-generated outputs (the
  generations are made once per teacher and dataset: see `kd_utils.seqkd_store`).
- `gkd`: with probability lambda a batch's responses are replaced by student samples
  (on-policy), loss gjsd with beta at temperature tau (Agarwal et al., 2024).
Options of every KD method: temperature, a cross-entropy mixing weight (0 as the paper),
Gaussian noise on the teacher logits, and any teacher.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .chunking import budget_bytes, decode_batch
from .data import IGNORE, Example, collate, left_pad
from .losses import add_logit_noise, kd_loss
from .names import METHODS, WORD_LEVEL  # noqa: F401 (re-exported: the methods' names live in kd_utils.names)
from .training import Batch, Objective, summed_ce


@dataclass(frozen=True)
class KDSettings:
    """How the teacher signal is turned into a loss."""

    method: str
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    ce_weight: float = 0.0
    noise: float = 0.0
    lmbda: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.ce_weight <= 1 or not 0 <= self.lmbda <= 1 or not 0 <= self.beta <= 1:
            raise ValueError("ce_weight, lmbda and beta must lie in [0, 1]")
        if self.noise < 0:
            raise ValueError(f"noise sigma must be >= 0, got {self.noise}")

    @property
    def objective(self) -> str:
        """The divergence used by a KD method (gkd: gjsd)."""
        return "gjsd" if self.method == "gkd" else self.method

    @property
    def uses_teacher_logits(self) -> bool:
        return self.method not in ("sft", "seqkd")


def noise_seed(noise: float, seed: int) -> int:
    """The seed of the teacher-noise draw: the run's seed when there is noise, else 0 (a
    noise-free teacher signal does not depend on the seed, so one cache serves every seed)."""
    return seed if noise else 0


class LiveTeacher:
    """A frozen teacher run forward on every batch; logits sliced to the shared vocabulary
    and, for the noise ablation, perturbed by z + N(0, sigma^2). Within ``chunk_mb``
    (kd_utils.chunking): the teacher runs on as many of the batch's examples at a time as keep its
    float32 logits within half the budget, and the loss takes the other half."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, noise: float = 0.0, seed: int = 0,
                 chunk_mb: int | None = None):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.noise = noise
        self.budget = budget_bytes(chunk_mb, next(model.parameters()).device)
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.forward_passes = 0

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        self.forward_passes += 1
        return add_logit_noise(out[..., : self.vocab_size].float(), self.noise, self.generator)

    def kd_sum(self, student_logits: torch.Tensor, batch: Batch, mask: torch.Tensor, s: KDSettings) -> torch.Tensor:
        width = self.model.get_output_embeddings().weight.shape[0]
        rows = max(1, self.budget // 2 // (batch["input_ids"].shape[1] * width * 4))
        total = student_logits.new_zeros((), dtype=torch.float32)
        for a, student in zip(range(0, len(student_logits), rows), student_logits.split(rows)):
            part = {"input_ids": batch["input_ids"][a:a + rows], "attention_mask": batch["attention_mask"][a:a + rows]}
            total = total + kd_loss(student, self.logits(part)[:, :-1], mask=mask[a:a + rows], objective=s.objective,
                                    temperature=s.temperature, beta=s.beta, alpha=s.alpha, reduction="sum",
                                    chunk_mb=max(1, self.budget // 2**21))
        return total


def kd_objective(teacher, settings: KDSettings, vocab_size: int) -> Objective:
    """Word-level KD on the batch's target positions; `teacher` is a LiveTeacher or a
    cached teacher signal (anything with `kd_sum`)."""
    def objective(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        student = logits[:, :-1, :vocab_size]
        loss = teacher.kd_sum(student, batch, mask, settings)
        if settings.ce_weight:
            loss = (1 - settings.ce_weight) * loss + settings.ce_weight * summed_ce(logits, batch["labels"])
        return loss, int(mask.sum())
    return objective


class OnPolicySampler:
    """GKD's on-policy step: with probability lmbda, replace a batch's responses by samples
    of the current student (temperature 1, from the same prompts), generated as many prompts at a
    time as one decoding step's logits fit ``chunk_mb`` (kd_utils.chunking.decode_batch)."""

    def __init__(self, lmbda: float, max_new_tokens: int, pad_id: int, eos_id: int, seed: int = 0,
                 loss_on_prompt: bool = False, chunk_mb: int | None = None):
        self.lmbda, self.max_new_tokens, self.loss_on_prompt = lmbda, max_new_tokens, loss_on_prompt
        self.chunk_mb = chunk_mb
        self.pad_id, self.eos_id = pad_id, eos_id
        self.rng = random.Random(seed)
        self.generator_seed = seed
        self.on_policy_batches = 0

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: Batch) -> Batch:
        if self.rng.random() >= self.lmbda:
            return batch
        self.on_policy_batches += 1
        prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_length"].tolist())]
        device = batch["input_ids"].device
        left, attn = left_pad(prompts, self.pad_id, device)
        width = left.shape[1]
        was_training = model.training
        model.eval()
        torch.manual_seed(self.generator_seed + self.on_policy_batches)
        rows = decode_batch(model, self.chunk_mb, len(prompts))
        out = [g for a in range(0, len(prompts), rows) for g in model.generate(
            input_ids=left[a:a + rows], attention_mask=attn[a:a + rows], do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_id)]
        model.train(was_training)
        examples = []
        for r, (p, idx) in enumerate(zip(prompts, batch["index"].tolist())):
            gen = out[r][width:].tolist()
            if self.eos_id in gen:  # generate pads only after eos: cut there
                gen = gen[: gen.index(self.eos_id) + 1]
            examples.append(Example(tuple(p), tuple(gen) or (self.eos_id,), idx, self.loss_on_prompt))
        new = collate(examples, self.pad_id)
        new["on_policy"] = torch.tensor(True)
        return {k: v.to(device) for k, v in new.items()}
