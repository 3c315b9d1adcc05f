"""One teacher-cache build (a `05_teacher_cache` cell): a teacher's signal over a run's training
examples cached before the distill stage, and SeqKD's teacher generations when asked.

The cache itself, one job per module: its keys (:mod:`kd_utils.cache_keys`), its files on disk
(:mod:`kd_utils.cache_shards`), the signal it stores (:mod:`kd_utils.cache_signal`), building and
reusing it (:mod:`kd_utils.cache_build`), the teacher signals a run reads from it
(:mod:`kd_utils.teachers`) and SeqKD's generations (:mod:`kd_utils.seqkd_store`).
"""
from __future__ import annotations

import time
from pathlib import Path

from .cache_build import open_teacher_cache
from .config import KDConfig, MemoryConfig, TrainingConfig
from .distill import training_examples
from .models import load_model
from .seqkd_store import teacher_generations

__all__ = ["build_teacher_cache"]


def build_teacher_cache(teacher_path: str, training: dict, kd: dict, data_root: str | None, cache_root: str,
                        temperatures, noise: float = 0.0, noise_seed: int = 0, generations: bool = False,
                        authors: bool = False, memory: dict | None = None) -> dict:
    """The prepare-stage cell: build (or verify) a teacher's cache before the distill stage."""
    training, kd = TrainingConfig.model_validate(training), KDConfig.model_validate(kd)
    chunk_mb = MemoryConfig.model_validate(memory or {}).chunk_mb
    teacher, tokenizer = load_model(teacher_path)
    t0 = time.perf_counter()
    prompts, train_ex, _ = training_examples(tokenizer, training, data_root, loss_on_prompt=authors)
    cache = open_teacher_cache(teacher, teacher_path, tokenizer, train_ex, training, kd, cache_root, temperatures,
                               noise, noise_seed, len(tokenizer), chunk_mb)
    size = sum(f.stat().st_size for f in Path(cache.path).iterdir())
    out = {"key": Path(cache.path).name, "path": str(cache.path), "k": kd.cache_k, "temperatures": list(temperatures),
           "noise": noise, "examples": len(train_ex), "target_tokens": int(cache.offsets[-1]),
           "bytes": size, "bytes_per_token": size / max(1, int(cache.offsets[-1])),
           "teacher_forward_passes": cache.forward_passes, "seconds": time.perf_counter() - t0}
    if generations:
        teacher_generations(teacher, teacher_path, tokenizer, prompts, train_ex, cache_root, training.max_length,
                            chunk_mb)
    return out
