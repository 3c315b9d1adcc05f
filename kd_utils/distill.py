"""One distillation run (a `distill` cell): SFT or KD of one student, saved with its curve.

Everything a run needs is in a validated `DistillJob`; the notebook `10_distill` builds
one from its parameters and calls `run_distillation`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .chunking import budget_bytes, check_fits
from .config import DistillJob, TrainingConfig
from .data import Example, collate, epoch_batches, pad_id_of, split_validation, tokenize_pairs
from .methods import KDSettings, LiveTeacher, OnPolicySampler, kd_objective, noise_seed
from .models import apply_lora, best_device, check_compatible, count_parameters, load_model
from .tasks import load_training_items, training_pairs
from .training import OptimSettings, cycle_steps, token_ce, train


def load_training_pairs(training: TrainingConfig, data_root: str | None) -> tuple[list[str], list[str]]:
    """(prompt, gold response) pairs of the run's training items (kd_utils.tasks.load_training_items)."""
    return training_pairs(load_training_items(training.train_tasks, training.train_data, data_root, training.limit))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_distillation(job: DistillJob, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the job's student, save it under `<out_dir>/model`, return its metrics."""
    out = Path(out_dir)
    device = best_device()
    check_fits(budget_bytes(job.memory.chunk_mb, device), device, f"{job.method} of {job.student}")
    _seed_everything(job.seed)
    settings = KDSettings(method=job.method, temperature=effective_temperature(job), beta=job.kd.beta,
                          alpha=job.kd.alpha, ce_weight=job.kd.ce_weight, noise=job.noise, lmbda=job.kd.lmbda,
                          seed=job.seed)
    student, tokenizer = load_model(job.student_path, device=device, dtype=torch.float32,
                                    trust_remote_code=job.trust_remote_code)
    vocab = len(tokenizer)
    teacher = None
    if job.method != "sft":
        teacher, teacher_tok = load_model(job.teacher_path, device=device, trust_remote_code=job.trust_remote_code)
        vocab = check_compatible(teacher_tok, tokenizer, job.teacher, job.student)

    data_report: dict = {}
    prompts, train_ex, val_ex = training_examples(tokenizer, job.training, job.data_root, job.authors, data_report)
    if job.method == "seqkd":
        train_ex = _teacher_generated(job, teacher, tokenizer, prompts, train_ex)

    if job.training.lora:
        lc = job.training.lora
        student = apply_lora(student, lc.r, lc.alpha, lc.dropout, lc.target_modules)
    if job.training.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.train()

    pad = pad_id_of(tokenizer)
    bs, accum = job.training.batch_for(job.student), job.training.grad_accum

    def epoch(e: int):
        order = list(epoch_batches(len(train_ex), bs, job.seed, e))
        for i in range(0, len(order) - accum + 1, accum):
            yield [collate([train_ex[j] for j in idx], pad) for idx in order[i: i + accum]]

    val_batches = [collate(val_ex[i: i + 64], pad) for i in range(0, len(val_ex), 64)]
    steps = job.steps or (job.training.steps if isinstance(job.training.steps, int) else None) or \
        max(1, int(job.training.epochs * len(train_ex) / (bs * accum)))

    objective, prepare, signal, probe = token_ce, None, None, None
    if settings.uses_teacher_logits:
        signal, probe = _teacher_signal(job, settings, teacher, tokenizer, student, train_ex, vocab, pad)
        objective = kd_objective(signal, settings, vocab)
        if job.method == "gkd":
            longest = max(len(e.response_ids) for e in train_ex + val_ex)
            prepare = OnPolicySampler(settings.lmbda, longest, pad, tokenizer.eos_token_id, seed=job.seed,
                                      loss_on_prompt=job.authors, chunk_mb=job.memory.chunk_mb)

    result = train(student, cycle_steps(epoch), objective,
                   OptimSettings(max_steps=steps, lr=job.training.lr, warmup_steps=job.training.warmup_steps,
                                 weight_decay=job.training.weight_decay, eval_every=job.training.eval_every,
                                 autocast=job.training.autocast),
                   val_batches=val_batches, progress=progress, desc=f"{job.method} {job.student}", prepare=prepare)
    _save(student, tokenizer, job, out)
    return {
        "student": job.student, "teacher": job.teacher, "method": job.method, "temperature": job.temperature,
        "effective_temperature": settings.temperature, "authors": job.authors, "data": data_report,
        "lora": bool(job.training.lora), "noise": job.noise, "teacher_kind": job.teacher_kind, "seed": job.seed, "steps": steps,
        "best_step": result.best_step, "best_val_loss": result.best_val_loss, "seconds": result.seconds,
        "target_tokens": result.target_tokens, "student_params": count_parameters(student),
        "teacher_params": count_parameters(teacher) if teacher is not None else None,
        "teacher_forward_passes": getattr(signal, "forward_passes", 0),
        "teacher_signal": type(signal).__name__ if signal is not None else None, "cache_probe": probe,
        "on_policy_batches": getattr(prepare, "on_policy_batches", 0),
        "history": result.history,
    }


def effective_temperature(job: DistillJob) -> float:
    """The temperature the loss uses: the job's, except GKD under `authors` (their GKD applied none)."""
    return 1.0 if job.authors and job.method == "gkd" else job.temperature


def training_examples(tokenizer, training: TrainingConfig, data_root: str | None, loss_on_prompt: bool = False,
                      report: dict | None = None) -> tuple[list[str], list[Example], list[Example]]:
    """The prompts, and the training and validation examples (gold responses) of a run;
    `report` gets the truncation counts (kd_utils.data.tokenize_pairs)."""
    prompts, gold = load_training_pairs(training, data_root)
    examples = tokenize_pairs(tokenizer, prompts, gold, training.max_length, truncation=training.truncation,
                              loss_on_prompt=loss_on_prompt, report=report)
    train_ex, val_ex = split_validation(examples, training.n_val, seed=0)
    return prompts, train_ex, val_ex


def _teacher_signal(job: DistillJob, settings: KDSettings, teacher, tokenizer, student, train_ex: list[Example],
                    vocab: int, pad: int) -> tuple[object, dict | None]:
    """The run's teacher signal (:func:`kd_utils.teachers.teacher_for`) and the cache probe:
    the cache when it is on (gkd: only for its gold batches) and reproduces the live teacher on a
    probe batch (:func:`kd_utils.teachers.probe_cache`), else the live teacher."""
    from .cache_build import open_teacher_cache
    from .teachers import CACHE_MAX_LOSS_ERROR, CACHE_MIN_GRAD_COSINE, CachedTeacher, probe_cache, teacher_for

    chunk_mb = job.memory.chunk_mb
    live = lambda: LiveTeacher(teacher, vocab, noise=job.noise, seed=job.seed, chunk_mb=chunk_mb)  # noqa: E731
    if not job.kd.teacher_cache:
        return live(), None
    cache = open_teacher_cache(teacher, job.teacher_path, tokenizer, train_ex, job.training, job.kd, job.cache_root,
                               job.cache_temperatures or (job.temperature,), job.noise,
                               noise_seed(job.noise, job.seed), vocab, chunk_mb)
    probe_batch = collate(sorted(train_ex, key=lambda e: e.index)[: job.training.batch_for(job.student)], pad)
    probe = probe_cache(CachedTeacher(cache, vocab, chunk_mb=chunk_mb), live(), student, probe_batch, settings, vocab)
    print(f"teacher cache probe ({settings.objective}, tau {settings.temperature:g}): loss error "
          f"{100 * probe['loss_error']:+.2f}%, gradient cosine {probe['grad_cosine']:.3f}: "
          + ("the cache serves this run" if probe["served"] else
             f"outside |error| <= {100 * CACHE_MAX_LOSS_ERROR:g}% and cosine >= {CACHE_MIN_GRAD_COSINE}; "
             "the live teacher serves this run"))
    signal = teacher_for(settings, live, cache if probe["served"] else None, log=print, vocab_size=vocab,
                         chunk_mb=chunk_mb)
    return signal, probe


def _teacher_generated(job: DistillJob, teacher, tokenizer, prompts: list[str], train_ex: list[Example]) -> list[Example]:
    """SeqKD (the paper's text): the training responses are the teacher's greedy generations."""
    from .seqkd_store import teacher_generations

    chosen, gens = teacher_generations(teacher, job.teacher_path, tokenizer, prompts, train_ex, job.cache_root,
                                       job.training.max_length, job.memory.chunk_mb)
    regenerated = tokenize_pairs(tokenizer, chosen, gens, job.training.max_length, truncation="left",
                                 loss_on_prompt=job.authors)
    return [Example(r.prompt_ids, r.response_ids, e.index, r.loss_on_prompt) for r, e in zip(regenerated, train_ex)]


def _save(model, tokenizer, job: DistillJob, out: Path) -> None:
    """Full weights for full fine-tuning; only the LoRA adapter (+ a manifest naming the base) otherwise."""
    target = out / "model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    manifest = {"base_model": job.student_path if job.training.lora else None, "student": job.student,
                "teacher": job.teacher, "method": job.method, "temperature": job.temperature,
                "noise": job.noise, "teacher_kind": job.teacher_kind, "seed": job.seed,
                "adapter": bool(job.training.lora)}
    (target / "kd_manifest.json").write_text(json.dumps(manifest, indent=1))
