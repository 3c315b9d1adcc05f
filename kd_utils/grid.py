"""A study's params -> cells (one notebook run each), and the `plan` / `run` / `report` CLI.

    python -m kd_utils.grid plan params/micro.yaml
    python -m kd_utils.grid run params/micro.yaml [--only PATTERN] [--force] [--max-workers N]
                                                   [--executor local|slurm]

Stages: prepare (world, pretrained bases, SFT teachers, teacher caches) -> distill (student
SFT baselines and KD runs) -> evaluate (every model on every task) -> fidelity -> statistics,
then `report.html`. Cell ids hash the resolved parameters, so editing the params makes new
cells and never reuses a stale result.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import (CacheJob, DistillJob, EvalJob, FidelityJob, GainsJob, ModelJob, PretrainJob, StudyConfig, WorldJob,
                     job_params, load_study)
from .methods import WORD_LEVEL, noise_seed
from .engine.cells import Cell
from .engine.plan import format_plan, plan, select_cells
from .engine.schedule import run

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NB = {
    "world": NOTEBOOKS / "00_world.ipynb",
    "pretrain": NOTEBOOKS / "01_pretrain.ipynb",
    "model": NOTEBOOKS / "02_model.ipynb",
    "cache": NOTEBOOKS / "05_teacher_cache.ipynb",
    "distill": NOTEBOOKS / "10_distill.ipynb",
    "evaluate": NOTEBOOKS / "20_evaluate.ipynb",
    "fidelity": NOTEBOOKS / "30_fidelity.ipynb",
    "ablation": NOTEBOOKS / "40_ablation.ipynb",
    "statistics": NOTEBOOKS / "50_statistics.ipynb",
}


@dataclass
class Grid:
    """The expanded study: cells plus what the report and the cost estimate need."""

    cfg: StudyConfig
    study_dir: Path
    cells: list[Cell] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)  # cell id -> estimated FLOPs
    model_cells: dict[str, Cell] = field(default_factory=dict)  # trained model name -> its cell
    notes: list[str] = field(default_factory=list)  # planning decisions worth a line in `plan`/`run`
    contamination: "pd.DataFrame | None" = None  # test items found in the training data, per task

    def add(self, cell: Cell, flops: float = 0.0) -> Cell:
        if all(c.id != cell.id for c in self.cells):
            self.cells.append(cell)
            self.cost[cell.id] = flops
        return cell

    def by_notebook(self, key: str) -> list[Cell]:
        return [c for c in self.cells if c.notebook == NB[key]]


def _param_count(cfg: StudyConfig, name: str) -> float:
    """Parameters of a model, for the cost estimate: micro exact; real from its local files (safetensors
    headers, GGUF tensor infos; a pruned model counts its kept layers), else the size in its name."""
    spec = cfg.models[name]
    if spec.micro:
        from .names import MICRO_SIZES
        s, v = MICRO_SIZES[spec.micro], cfg.world.vocab_size
        kv = s.hidden // s.heads * s.kv_heads
        return v * s.hidden + s.layers * (2 * s.hidden * s.hidden + 2 * s.hidden * kv + 3 * s.hidden * s.ffn)
    from .model_sources import count_parameters_from_files, kept_layers, layer_count
    source = _model_file(cfg, spec.prune.model if spec.prune else name)
    keep = None
    if spec.prune and source is not None:
        n_layers = layer_count(source)
        try:
            keep = kept_layers(n_layers, spec.prune.keep, spec.prune.rule) if n_layers else None
        except ValueError as err:
            raise ValueError(f"models.{name}.prune: {err} ({spec.prune.model!r})") from None
    count = count_parameters_from_files(source, keep) if source is not None else None
    if count is not None:
        return float(count)
    import re
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB]\b", (spec.path or "").replace("-", " ").replace("_", " "))
    return float(m.group(1)) * 1e9 if m else math.nan


def _model_file(cfg: StudyConfig, name: str) -> Path | None:
    """The local file or folder a real model is read from (a GGUF file, a saved model), if any."""
    spec = cfg.models[name]
    if spec.gguf:
        from .model_sources import resolve_gguf
        return resolve_gguf(spec.gguf)
    local = Path(spec.path).expanduser() if spec.path else None
    return local if local is not None and local.exists() else None


@functools.lru_cache(maxsize=8)
def _local_items(train_tasks: tuple[str, ...], data: str | None, data_root: str | None, limit: int | None,
                 data_mtime: int | None) -> tuple[dict, ...] | None:
    """The training items when they can be read before compute (local files only), read once per
    plan (a rewritten train_data file has a new mtime, so it is read again)."""
    from .tasks import load_training_items, training_data_file
    if data is not None and not training_data_file(data, data_root).is_file():
        return None
    try:
        return tuple(load_training_items(list(train_tasks), data, data_root, limit))
    except FileNotFoundError:
        return None


def _training_items(cfg: StudyConfig, data_root: str | None) -> tuple[dict, ...] | None:
    from .tasks import training_data_file
    tasks = cfg.training.train_tasks
    data = cfg.training.train_data
    file = training_data_file(data, data_root) if data else None
    mtime = file.stat().st_mtime_ns if file is not None and file.is_file() else None
    return _local_items((tasks,) if isinstance(tasks, str) else tuple(tasks), data, data_root, cfg.training.limit,
                        mtime)


def _train_examples(cfg: StudyConfig) -> int:
    """Training examples: the micro world's, else the training items when they are local files,
    else 10k (Math10K-sized)."""
    if cfg.world:
        from .tasks import resolve_tasks
        n = cfg.world.n_train
        return min(n, cfg.training.limit or n) * len(resolve_tasks(cfg.training.train_tasks))
    items = _training_items(cfg, cfg.evaluation.data_root)
    return 10_000 if items is None else len(items)


def _train_tokens(cfg: StudyConfig) -> float:
    """Rough size of the training set in tokens (for the cost of one teacher pass)."""
    return _train_examples(cfg) * cfg.training.max_length / 2


def _steps(cfg: StudyConfig, model: str) -> float:
    """Optimizer steps of a run: given, or epochs over the training set."""
    steps = cfg.steps_for(model)
    if steps is not None:
        return steps
    return cfg.training.epochs * _train_examples(cfg) / (cfg.training.batch_for(model) * cfg.training.grad_accum)


def _eval_tokens(cfg: StudyConfig) -> float:
    """Tokens one model reads and writes in evaluation (prompt ~ half of max_length, plus the
    budget), counting test items from local files only (planning never downloads)."""
    from .tasks import generation_budget, load_items, local_test_file, resolve_tasks
    total = 0.0
    for task in resolve_tasks(cfg.evaluation.tasks):
        local = local_test_file(task, cfg.evaluation.data_root)
        n = cfg.world.n_test if cfg.world else len(load_items(task, cfg.evaluation.data_root)) if local.is_file() else 1000
        n = min(n, cfg.evaluation.limit or n)
        total += n * (cfg.training.max_length / 2 + generation_budget(task, cfg.evaluation.max_new_tokens))
    return total * len(cfg.evaluation.sample_seeds if cfg.evaluation.decoding == "sample" else [0])


def _tokens_per_step(cfg: StudyConfig, model: str) -> float:
    return cfg.training.batch_for(model) * cfg.training.grad_accum * cfg.training.max_length / 2


def expand(cfg: StudyConfig, study_dir: str | Path) -> Grid:
    """All cells of a study, with their dependencies."""
    g = Grid(cfg, Path(study_dir))
    study = g.study_dir.resolve()
    res = lambda stage: {k: v for k, v in cfg.resources.get(stage, {}).items()}  # noqa: E731
    train_dump = cfg.training.model_dump(mode="json")
    data_root, world_cell = cfg.evaluation.data_root, None
    cache_root = str(study / "cache")

    if cfg.world:
        world_cell = g.add(Cell("prepare", "prepare/world", NB["world"], job_params(WorldJob(world=cfg.world)),
                                resources=res("prepare")))
        data_root = str(world_cell.output_dir(study) / "data")

    def deps_of(*cells: Cell | None) -> tuple[str, ...]:
        return tuple(c.id for c in cells if c is not None)

    # Largest models first: among ready cells the runner starts the earliest listed, so the
    # long teacher runs (the critical path) start before the students'.
    counts = {m: _param_count(cfg, m) for m in cfg.models}
    n_params = counts.__getitem__
    by_size = sorted(cfg.models, key=lambda m: 0 if math.isnan(counts[m]) else -counts[m])
    base: dict[str, tuple[str, Cell | None]] = {}
    for name in by_size:
        spec = cfg.models[name]
        if spec.micro:
            steps = cfg.pretrain.steps.get(name, 0)
            if steps <= 0:
                raise ValueError(f"pretrain.steps has no positive entry for micro model {name!r}")
            job = PretrainJob(model=name, micro=spec.micro, world_dir=str(world_cell.output_dir(study)),
                              pretrain=cfg.pretrain.model_dump(exclude={"steps"}), steps=steps, seed=cfg.seeds[0])
            cell = g.add(Cell("prepare", f"prepare/pretrain/{name}", NB["pretrain"], job_params(job),
                              deps=(world_cell.id,), resources=res("prepare")),
                         flops=6 * n_params(name) * steps * cfg.pretrain.batch_size * cfg.pretrain.block)
            base[name] = (str(cell.output_dir(study) / "model"), cell)
        elif spec.gguf:
            cell = g.add(Cell("prepare", f"prepare/model/{name}", NB["model"],
                              job_params(ModelJob(model=name, gguf=spec.gguf)), resources=res("prepare")))
            base[name] = (str(cell.output_dir(study) / "model"), cell)
        elif spec.path:
            base[name] = (spec.path, None)
    for name in by_size:  # pruned copies, once their sources are placed
        prune = cfg.models[name].prune
        if prune:
            source_path, source_cell = base[prune.model]
            cell = g.add(Cell("prepare", f"prepare/model/{name}", NB["model"],
                              job_params(ModelJob(model=name, source_path=source_path, keep=prune.keep,
                                                  rule=prune.rule)),
                              deps=deps_of(source_cell), resources=res("prepare")))
            base[name] = (str(cell.output_dir(study) / "model"), cell)

    def training_for(model: str) -> dict:
        """The training section of one model's runs: per-model steps and batch size, LoRA or full fine-tuning."""
        steps = cfg.steps_for(model)
        resolved = {**train_dump, "batch_size": cfg.training.batch_for(model)}
        if not cfg.models[model].uses_lora(cfg.training.lora is not None):
            resolved["lora"] = None
        return {**resolved, "steps": steps} if steps is not None else resolved

    def train_flops(student: str, teacher: str | None, live_share: float) -> float:
        """Student training plus the live teacher's forward passes on `live_share` of the batches."""
        tokens = _steps(cfg, student) * _tokens_per_step(cfg, student)
        return 6 * n_params(student) * tokens + (2 * n_params(teacher) * tokens * live_share
                                                          if live_share else 0)

    def sft_cell(model: str, seed: int) -> Cell:
        path, base_cell = base[model]
        job = DistillJob(student=model, student_path=path, method="sft", seed=seed, steps=cfg.steps_for(model),
                         training=training_for(model), data_root=data_root, cache_root=cache_root,
                         trust_remote_code=cfg.models[model].trust_remote_code, authors=cfg.authors,
                         memory=cfg.memory)
        stage = "prepare" if model in cfg.teachers and seed == cfg.seeds[0] else "distill"
        cell = g.add(Cell(stage, f"sft/{model}/s{seed}", NB["distill"], job_params(job),
                          deps=deps_of(base_cell, world_cell), resources=res(stage)),
                     flops=train_flops(model, None, 0.0))
        g.model_cells[f"{model}/sft/s{seed}"] = cell
        return cell

    for model in by_size:
        if model in cfg.students or model in cfg.teachers:
            for seed in cfg.seeds:
                if model in cfg.students or seed == cfg.seeds[0]:
                    sft_cell(model, seed)

    def teacher_source(teacher: str, kind: str) -> tuple[str, Cell | None]:
        if kind == "base":
            return base[teacher]
        cell = g.model_cells[f"{teacher}/sft/s{cfg.seeds[0]}"]
        return str(cell.output_dir(study) / "model"), cell

    # KD runs: the main axes, then every ablation's overrides.
    subgrids = [("main", cfg.kd.methods, cfg.kd.temperatures, cfg.kd.noise, cfg.kd.teacher_kinds, cfg.kd_pairs())]
    for a in cfg.ablations:
        subgrids.append((a.name, a.methods or cfg.kd.methods, a.temperatures or cfg.kd.temperatures,
                         a.noise or cfg.kd.noise, a.teacher_kinds or cfg.kd.teacher_kinds,
                         [tuple(p) for p in a.pairs] if a.pairs else cfg.kd_pairs()))
    temps_of_teacher: dict[tuple[str, str], set[float]] = {}
    seqkd_teachers: set[tuple[str, str]] = set()
    for _, methods, temps, _, kinds, pairs in subgrids:
        for t, _s in pairs:
            for kind in kinds:
                temps_of_teacher.setdefault((t, kind), set()).update(temps)
                if "seqkd" in methods:
                    seqkd_teachers.add((t, kind))

    def kd_runs():
        """(teacher, student, method, kind, noise, tau, seed) of every KD run: the main grid, then the ablations."""
        for _, methods, temps, noises, kinds, pairs in subgrids:
            for teacher, student in pairs:
                for method in methods:
                    for kind in kinds:
                        for noise in ([0.0] if method == "seqkd" else noises):
                            for tau in ([1.0] if method == "seqkd" else temps):
                                for seed in cfg.seeds:
                                    yield teacher, student, method, kind, noise, tau, seed

    def signal(teacher: str, kind: str, noise: float, seed: int) -> tuple:
        return teacher, kind, noise, noise_seed(noise, seed)

    # A cache pays when the runs reading it would otherwise pass more examples through the teacher
    # than its one build does (gkd reads only its gold, off-policy batches from it).
    cacheable = lambda method: method in WORD_LEVEL or method == "gkd"  # noqa: E731
    live_examples: dict[tuple, float] = {}
    for teacher, student, method, kind, noise, tau, seed in kd_runs():
        if cacheable(method):
            share = 1 - cfg.kd.lmbda if method == "gkd" else 1.0
            key = signal(teacher, kind, noise, seed)
            live_examples[key] = live_examples.get(key, 0.0) + share * _steps(cfg, student) * \
                cfg.training.batch_for(student) * cfg.training.grad_accum
    build_examples = max(1, _train_examples(cfg) - cfg.training.n_val)
    use_cache = {k: cfg.kd.teacher_cache == "always" or (cfg.kd.teacher_cache is True and n > build_examples)
                 for k, n in live_examples.items()}
    skipped = [k for k, cached in use_cache.items() if not cached]
    if cfg.kd.teacher_cache is True and skipped:
        g.notes.append(
            f"teacher cache: {len(use_cache) - len(skipped)} teacher signals cached; "
            f"{len(skipped)} read by too few runs to repay a build over {build_examples} examples run live "
            f"({', '.join(f'{t}/{k}/noise {n:g}' for t, k, n, _ in skipped)}; kd.teacher_cache: always caches them)")

    if any(use_cache.values()):
        from .teachers import CACHE_MAX_LOSS_ERROR, CACHE_MIN_GRAD_COSINE
        g.notes.append(f"teacher cache: each cached run first compares the cache with the live teacher on one batch and "
                       f"uses the live teacher unless the loss is within {100 * CACHE_MAX_LOSS_ERROR:g}% and the "
                       f"gradient cosine >= {CACHE_MIN_GRAD_COSINE} (metrics.json: cache_probe)")
    caches: dict[tuple, Cell] = {}

    def cache_cell(teacher: str, kind: str, noise: float, seed: int) -> Cell:
        key = signal(teacher, kind, noise, seed)
        if key not in caches:
            path, tcell = teacher_source(teacher, kind)
            job = CacheJob(teacher=teacher, teacher_path=path, teacher_kind=kind, noise=noise,
                           noise_seed=noise_seed(noise, seed), temperatures=sorted(temps_of_teacher[(teacher, kind)]),
                           training=training_for(teacher), kd=cfg.kd, data_root=data_root, cache_root=cache_root,
                           generations=(teacher, kind) in seqkd_teachers and not noise, authors=cfg.authors,
                           memory=cfg.memory)
            caches[key] = g.add(Cell("prepare", f"prepare/cache/{teacher}/{kind}/n{noise:g}" + (f"/s{seed}" if noise else ""),
                                     NB["cache"], job_params(job), deps=deps_of(tcell, world_cell),
                                     resources=res("prepare")),
                                flops=2 * n_params(teacher) * _train_tokens(cfg))
        return caches[key]

    def student_start(student: str, seed: int) -> tuple[str, Cell | None]:
        """The model a KD run of `student` starts from (kd.student_init): its base, or its SFT of `seed`."""
        if cfg.kd.student_init == "base":
            return base[student]
        cell = g.model_cells[f"{student}/sft/s{seed}"]
        return str(cell.output_dir(study) / "model"), cell

    for teacher, student, method, kind, noise, tau, seed in kd_runs():
        tpath, tcell = teacher_source(teacher, kind)
        spath, scell = student_start(student, seed)
        cached = cacheable(method) and use_cache[signal(teacher, kind, noise, seed)]
        live_share = (cfg.kd.lmbda if method == "gkd" else 0.0) if cached else 1.0
        ccell = cache_cell(teacher, kind, noise, seed) if cached or method == "seqkd" else None
        job = DistillJob(
            student=student, student_path=spath, method=method, teacher=teacher,
            teacher_path=tpath, teacher_kind=kind, temperature=tau, noise=noise, seed=seed,
            steps=cfg.steps_for(student), training=training_for(student),
            kd=cfg.kd.model_copy(update={"teacher_cache": cached}),
            data_root=data_root, cache_root=cache_root,
            cache_temperatures=sorted(temps_of_teacher[(teacher, kind)]) if cached else None,
            trust_remote_code=cfg.models[student].trust_remote_code, authors=cfg.authors, memory=cfg.memory)
        name = f"kd/{student}<-{teacher}/{method}/t{tau:g}/n{noise:g}/{kind}/s{seed}" + \
            ("/from-sft" if cfg.kd.student_init == "sft" else "")
        cell = g.add(Cell("distill", name, NB["distill"], job_params(job),
                          deps=deps_of(scell, tcell, ccell, world_cell), resources=res("distill")),
                     flops=train_flops(student, teacher, live_share))
        g.model_cells[name] = cell

    # Evaluation: every trained model, and base teachers when the base-teacher ablation runs.
    eval_cells = []
    eval_tokens = _eval_tokens(cfg)
    for key, cell in list(g.model_cells.items()):
        p = cell.parameters
        kind = "sft" if p["method"] == "sft" else "kd"
        job = EvalJob(model=key, model_path=str(cell.output_dir(study) / "model"), kind=kind, student=p["student"],
                      teacher=p["teacher"], method=p["method"], temperature=p["temperature"] if kind == "kd" else None,
                      noise=p["noise"], teacher_kind=p["teacher_kind"], seed=p["seed"], evaluation=cfg.evaluation,
                      data_root=data_root, memory=cfg.memory)
        eval_cells.append(g.add(Cell("evaluate", f"evaluate/{key}", NB["evaluate"], job_params(job),
                                     deps=(cell.id,), resources=res("evaluate")),
                                flops=2 * n_params(p["student"]) * eval_tokens))
    for teacher in {t for *_, kinds, pairs in subgrids if "base" in kinds for t, _ in pairs}:
        path, bcell = base[teacher]
        job = EvalJob(model=f"{teacher}/base", model_path=path, kind="base", student=teacher, method="base",
                      evaluation=cfg.evaluation, data_root=data_root, memory=cfg.memory)
        eval_cells.append(g.add(Cell("evaluate", f"evaluate/{teacher}/base", NB["evaluate"],
                                     job_params(job), deps=deps_of(bcell), resources=res("evaluate")),
                                flops=2 * n_params(teacher) * eval_tokens))

    _check_tokenizers(cfg, {p for *_, pairs in subgrids for p in pairs})
    g.contamination = _contamination(cfg, data_root)
    g.notes += _length_notes(cfg, data_root)
    if g.contamination is not None:
        from .contamination import describe
        g.notes.append(describe(g.contamination))

    # Analysis: the inputs' ids are a parameter, so new results make a new analysis cell.
    inputs = hashlib.sha256(",".join(sorted(c.id for c in eval_cells)).encode()).hexdigest()[:12]
    fidelity = FidelityJob(study_dir=str(study), inputs=inputs, tau=cfg.stats.tau,
                           scorer=cfg.stats.scorer_of(cfg.evaluation))
    fid = g.add(Cell("fidelity", "fidelity", NB["fidelity"], job_params(fidelity), deps=tuple(c.id for c in eval_cells),
                     resources=res("fidelity")))
    gains = GainsJob(**fidelity.model_dump(), fidelity_dir=str(fid.output_dir(study)))
    for key in ("ablation", "statistics"):
        g.add(Cell("statistics", key, NB[key], job_params(gains), deps=(fid.id,), resources=res("statistics")))
    return g


def _check_tokenizers(cfg: StudyConfig, pairs: set[tuple[str, str]]) -> None:
    """Teacher and student share a tokenizer: checked before compute where both are local model
    folders (GGUF-converted and pruned models share their source's; the distill cell checks every pair)."""
    folders = {name: Path(spec.path).expanduser() for name, spec in cfg.models.items()
               if spec.path and (Path(spec.path).expanduser() / "tokenizer_config.json").is_file()}
    pairs = [(t, s) for t, s in pairs if t in folders and s in folders]
    if not pairs:
        return
    from .models import check_compatible, load_tokenizer
    tokenizers = {name: load_tokenizer(folders[name]) for pair in pairs for name in pair}
    for t, s in pairs:
        check_compatible(tokenizers[t], tokenizers[s], t, s)


def _length_notes(cfg: StudyConfig, data_root: str | None) -> list[str]:
    """A warning when training pairs exceed max_length, measured with the first teacher's tokenizer
    where it can be read before compute (a local folder, a GGUF file; a pruned model's source's)."""

    name = cfg.teachers[0]
    spec = cfg.models[cfg.models[name].prune.model] if cfg.models[name].prune else cfg.models[name]
    folder = Path(spec.path).expanduser() if spec.path else None
    if not spec.gguf and not (folder and (folder / "tokenizer_config.json").is_file()):
        return []
    items = _training_items(cfg, data_root)
    if not items:
        return []
    from .data import tokenize_pairs
    from .model_sources import gguf_tokenizer
    from .models import load_tokenizer
    from .tasks import build_prompt

    tokenizer = gguf_tokenizer(spec.gguf) if spec.gguf else load_tokenizer(folder)
    report: dict = {}
    tokenize_pairs(tokenizer, [build_prompt(it["instruction"], it.get("input", "")) for it in items],
                   [it["output"] for it in items], cfg.training.max_length, truncation=cfg.training.truncation,
                   report=report)
    over = report["prompt_truncated"] + report["response_truncated"] + report["skipped"]
    if not over:
        return []
    rule = ("are left out" if cfg.training.truncation == "skip" else
            "lose prompt tokens from the left, or response tokens from the end when the response is long")
    return [f"warning: {over} of {len(items)} training examples exceed training.max_length="
            f"{cfg.training.max_length} tokens ({name}'s tokenizer); they {rule} (training.truncation: "
            f"{cfg.training.truncation}; each run records its counts)"]


def _contamination(cfg: StudyConfig, data_root: str | None):
    """Per task, the test items found in the training data, when both can be read before compute
    (local files; the micro world's data is made by its prepare cell, which checks it there).
    Raises above training.contamination.max_share unless it is allowed."""
    from .contamination import refuse_above, task_overlap

    items = None if cfg.world else _training_items(cfg, data_root)
    if items is None:
        return None
    try:
        table = task_overlap(list(items), cfg.evaluation.tasks, cfg.evaluation.data_root)
    except FileNotFoundError:
        return None
    c = cfg.training.contamination
    refuse_above(table, c.max_share, c.allow, cfg.training.train_data or f"(train_tasks {cfg.training.train_tasks})")
    return table


def study_dir_for(cfg: StudyConfig, outputs: str | Path | None = None) -> Path:
    return Path(outputs or os.environ.get("KD_OUTPUTS", REPO / "outputs")) / cfg.study


def _cost_column(grid: Grid):
    def cost(cell: Cell) -> float:
        f = grid.cost.get(cell.id, 0.0)
        return 0.0 if math.isnan(f) else float(f)
    return cost


def _summary_line(grid: Grid) -> str:
    total = sum(f for f in grid.cost.values() if not math.isnan(f))
    gpu_hours = total / 100e12 / 3600  # 100 TFLOP/s effective: bf16 on an A100/H100 at ~30-40% utilisation
    return (f"estimated compute: {total:.3g} FLOPs (training 6 x params x tokens, + 2 x teacher params x tokens "
            f"for live teachers and cache builds; evaluation 2 x params x tokens) ~ {gpu_hours:.3g} GPU-hours at "
            f"100 TFLOP/s effective (generation is memory-bound and runs slower: read this as a lower bound)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kd_utils.grid", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("plan", "run", "report"):
        p = sub.add_parser(name)
        p.add_argument("params")
        p.add_argument("--outputs", default=None, help="outputs root (default ./outputs)")
        if name != "report":
            p.add_argument("--only", action="append", help="run only cells whose name/id/stage matches (repeatable)")
        if name == "run":
            p.add_argument("--force", action="store_true")
            p.add_argument("--rerun-stale", action="store_true",
                           help="re-run complete cells made by other code (plan marks them stale)")
            p.add_argument("--max-workers", type=int, default=None)
            p.add_argument("--threads-per-worker", type=int, default=None)
            p.add_argument("--executor", choices=("local", "slurm"), default=None)
            p.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = load_study(args.params)
        grid = expand(cfg, study_dir_for(cfg, args.outputs))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    study = grid.study_dir
    if args.command == "plan":
        table = plan(grid.cells, study, cost=_cost_column(grid))
        try:
            chosen = {c.id for c in select_cells(grid.cells, args.only)}  # the selection `run --only` makes
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(format_plan(table[table["id"].isin(chosen)], max_rows=10_000))
        print("\n".join(grid.notes + [_summary_line(grid)]))
        return 0
    if args.command == "report":
        from .report import render_report
        print(render_report(grid))
        return 0
    study.mkdir(parents=True, exist_ok=True)
    (study / "params.resolved.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    if grid.contamination is not None:
        grid.contamination.to_csv(study / "contamination.csv", index=False)
    for note in grid.notes:
        print(note)
    executor = args.executor or cfg.executor.get("kind", "local")
    summary = run(grid.cells, study, executor=executor, max_workers=args.max_workers or cfg.executor.get("max_workers"),
                  only=args.only, force=args.force, rerun_stale=args.rerun_stale,
                  threads_per_worker=args.threads_per_worker or cfg.executor.get("threads_per_worker"),
                  cwd=REPO, slurm=cfg.executor.get("slurm"), warm=cfg.executor.get("warm_kernels", True))
    print(summary.format())
    if summary.ok and not args.no_report and not args.only:
        from .report import render_report
        print(f"report: {render_report(grid)}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
