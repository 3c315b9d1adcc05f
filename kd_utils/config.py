"""Typed, validated study parameters: the one place a params YAML is read and checked.

The same models drive the grid runner, the notebooks (whose `parameters` cells receive
these sections as plain dicts) and the tests. Every error names the file and the key and,
for a typo, suggests the closest valid key, before any compute starts.
"""
from __future__ import annotations

import ast
import difflib
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .names import METHODS, MICRO_SIZES
from .model_sources import PRUNE_RULES
from .tasks import DOMAINS, SCORERS, can_score, resolve_tasks


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldConfig(Strict):
    """The procedural micro world (tasks, corpus, tokenizer)."""

    n_train: int = Field(2000, gt=0, description="training items per task")
    n_test: int = Field(200, gt=0, description="test items per task")
    corpus_lines: int = Field(60000, gt=0, description="lines of generic pretraining text")
    vocab_size: int = Field(1024, ge=300)
    seed: int = 0
    instruction: bool = Field(False, description=(
        "also write the instruction-following task (micro_instruct, group micro_instruction, ROUGE-L) and "
        "train the tokenizer on it; list it in training.train_tasks and evaluation.tasks to use it"))

    def task_groups(self) -> list[str]:
        """The task groups this world writes."""
        return ["micro", "micro_instruction"] if self.instruction else ["micro"]


def world_params(world: WorldConfig) -> dict:
    """The world as notebook parameters: `instruction` only when set, so that worlds without it keep
    their cells' ids."""
    return world.model_dump(exclude=set() if world.instruction else {"instruction"})


PruneRule = Literal[PRUNE_RULES]  # kd_utils.model_sources.kept_layers
Scorer = Literal[tuple(SCORERS)]  # kd_utils.tasks.SCORERS


class PruneSpec(Strict):
    """A student derived from another model by keeping some of its layers (Minitron, ShortGPT)."""

    model: str = Field(description="the model (a name in `models`) whose layers are kept")
    keep: int = Field(gt=0, description="how many of its layers to keep")
    rule: PruneRule = Field(
        "even", description="which layers: 'even' (evenly spaced, first and last included), 'first' (the first "
                            "`keep`), 'ends' (the first and last halves, dropping the middle)")


class ModelSpec(Strict):
    """A model: a micro size built by the project, a hub id / local path, a GGUF file, or a pruned copy."""

    micro: str | None = None
    path: str | None = None
    gguf: str | None = Field(None, description="a GGUF file, or 'distribution:path/in/it.gguf' of an installed "
                                               "wheel; converted once in the prepare stage")
    prune: PruneSpec | None = None
    finetune: Literal["auto", "lora", "full"] = Field(
        "auto", description="'auto': full fine-tuning for pruned models (LoRA cannot heal pruning), else LoRA "
                            "when training.lora is set; 'lora' or 'full' force one")
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        sources = [k for k in ("micro", "path", "gguf", "prune") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of 'micro' (a micro size), 'path' (hub id or local directory), "
                             f"'gguf' (a GGUF file) or 'prune' (layers of another model); got {sources or 'none'}")
        if self.micro is not None:
            if self.micro not in MICRO_SIZES:
                raise ValueError(f"unknown micro size {self.micro!r}; known: {sorted(MICRO_SIZES)}")
        return self

    def uses_lora(self, training_lora: bool) -> bool:
        """Whether this model's runs train LoRA adapters."""
        if self.finetune == "auto":
            return training_lora and self.prune is None
        return self.finetune == "lora"


class PretrainSettings(Strict):
    """How micro models are pretrained on the generic corpus: the settings one model's run takes."""

    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    batch_size: int = Field(32, gt=0, description="blocks per step")
    block: int = Field(64, gt=8, description="tokens per block of the packed corpus")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")


class PretrainConfig(PretrainSettings):
    """Pretraining of micro models on the generic corpus (steps per model name)."""

    steps: dict[str, int] = Field(default_factory=dict, description="pretraining steps per micro model name")


class LoraConfig(Strict):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class ContaminationConfig(Strict):
    """The train/test overlap check run before any compute (kd_utils.contamination)."""

    max_share: float = Field(0.01, ge=0, le=1, description="largest share of a task's test items allowed to "
                                                          "appear in the training data (normalized instruction)")
    allow: bool = Field(False, description="run anyway above max_share (the overlap is still reported)")


class MemoryConfig(Strict):
    """The memory budget of every computation over full-vocabulary logits (kd_utils.chunking)."""

    chunk_mb: int | None = Field(None, gt=0, description=(
        "MB one chunk of logits work may take: the teacher-cache build (teacher forward and per-position top-k, "
        "logZ, tail), the KD loss and live teacher, GKD's on-policy samples, SeqKD generation and "
        "log-likelihood scoring. Results do not depend on it, peak memory and speed do. Unset: the device's "
        "default (kd_utils.chunking.DEFAULT_CHUNK_MB). A run stops before compute when its largest chunk would "
        "exceed the machine's available memory. Set, it enters the ids of the cells it reaches"))


class TrainingConfig(Strict):
    """Optimisation shared by SFT and KD runs. `steps` and `batch_size` are an int or a per-model dict."""

    train_tasks: str | list[str] = "micro"
    train_data: str | None = Field(None, description=(
        "instead of tasks: an LLM-Adapters JSON file (Math10K...), a JSONL file in MiniLLM's format, a named set "
        "(kd_utils.tasks.TRAIN_SETS: 'dolly', MiniLLM's Dolly-15K training split) or a hub dataset id"))
    limit: int | None = Field(None, gt=0, description="the first N items of each training task (or of train_data)")
    steps: int | dict[str, int] | None = None
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(3e-4, gt=0)
    batch_size: int | dict[str, int] = 16
    grad_accum: int = Field(1, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(100, gt=0)
    n_val: int = Field(500, gt=0)
    max_length: int = Field(256, gt=8)
    autocast: Literal["auto", "bf16", "off"] = "auto"
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False
    truncation: Literal["left", "skip"] = Field(
        "left", description="a pair longer than max_length: 'left' cuts the prompt from its left and keeps the "
                            "response whole (kd_utils.data.tokenize_pairs), 'skip' leaves it out; each run counts both")
    contamination: ContaminationConfig = Field(default_factory=lambda: ContaminationConfig())

    @model_validator(mode="after")
    def _length(self) -> "TrainingConfig":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'steps' or 'epochs'")
        for key in ("steps", "batch_size"):
            value = getattr(self, key)
            for model, v in (value.items() if isinstance(value, dict) else [("", value)]):
                if v is not None and v <= 0:
                    raise ValueError(f"training.{key}{'.' + model if model else ''} must be positive, got {v}")
        return self

    def batch_for(self, model: str) -> int:
        """The batch size of `model`'s runs."""
        if isinstance(self.batch_size, dict):
            if model not in self.batch_size:
                raise ValueError(f"training.batch_size has no entry for model {model!r}")
            return self.batch_size[model]
        return self.batch_size


def _positive_temperatures(cls, v: list[float]) -> list[float]:
    """The field validator of every `temperatures` list: each one positive."""
    if any(t <= 0 for t in v):
        raise ValueError(f"temperatures must be positive: {v}")
    return v


class KDConfig(Strict):
    """The KD axes of the grid and the options of every KD method."""

    methods: list[str] = ["fkl", "rkl", "gkd"]
    temperatures: list[float] = [1.0, 2.0]
    noise: list[float] = [0.0]
    teacher_kinds: list[Literal["sft", "base"]] = ["sft"]
    ce_weight: float = Field(0.0, ge=0, le=1)
    beta: float = Field(0.5, ge=0, le=1)
    alpha: float = Field(0.1, ge=0, le=1)
    lmbda: float = Field(0.5, ge=0, le=1)
    teacher_cache: bool | Literal["always"] = Field(True, description=(
        "true: cache each teacher signal whose runs would otherwise pass more examples through the teacher "
        "than the one cache build does (the grid says which); 'always': cache every signal; false: live teachers"))
    cache_k: int = Field(16, gt=0, description="teacher tokens stored exactly per position (its top k)")
    cache_samples: int = Field(16, ge=0, description=(
        "tail tokens sampled per position: the cached loss is then unbiased at every temperature; "
        "0 = one tail bucket (a lower bound, coarse at tau > 1)"))
    student_init: Literal["base", "sft"] = Field("base", description=(
        "where each KD run starts: the student's pretrained base (the paper) or its SFT model of the same seed "
        "(MiniLLM, GKD); from 'sft' a run trains its steps on top of the SFT ones, so its gain over SFT includes "
        "that extra training"))

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        kd_methods = [x for x in METHODS if x != "sft"]
        for m in v:
            if m == "sft":
                raise ValueError("'sft' is not a KD method: every student gets its SFT baseline anyway")
            if m not in kd_methods:
                raise ValueError(f"unknown KD method {m!r}{_suggest(m, kd_methods)}; known: {', '.join(kd_methods)}")
        return v

    _temps = field_validator("temperatures")(_positive_temperatures)


class EvalConfig(Strict):
    tasks: str | list[str] = "micro"
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(64, gt=0)
    decoding: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    sample_seeds: list[int] = [0]
    max_new_tokens: dict[str, int] = Field(default_factory=dict, description=(
        "new tokens decoded per domain (math, commonsense, instruction): an entry overrides the budget of "
        "that domain's tasks, a domain not named (or no key at all) keeps each task's own budget, "
        "kd_utils.tasks.Task.max_new_tokens (its domain's tasks.MAX_NEW_TOKENS: 256 math and 32 commonsense "
        "as LLM-Adapters, 256 instruction). The one default is the registry's: before, an absent key meant "
        "48/8/128 but a partial one the registry's for the domains it left out; every params/*.yaml names "
        "the domains it evaluates, so their budgets are unchanged"))
    scorer: Scorer = Field("generate", description=(
        "the accuracy of results.csv and of the statistics: generate (the paper's), loglik, loglik_norm "
        "(lm-evaluation-harness acc / acc_norm) or loglik_label (kd_utils.tasks.SCORERS)"))
    extra_scorers: list[Scorer] = Field(default_factory=list, description=(
        "further views of every model, in results.csv as accuracy_<scorer> (the log-likelihood ones on the "
        "tasks that can be scored so: choice tasks, with declared continuations for loglik/loglik_norm)"))
    stop_strings: list[str] = Field(default_factory=list, description=(
        "generation stops before the first of these (the authors keep the text up to the next '### Response:')"))
    data_root: str | None = None

    @field_validator("max_new_tokens")
    @classmethod
    def _budgets(cls, v: dict[str, int]) -> dict[str, int]:
        for domain, n in v.items():
            if domain not in DOMAINS:
                raise ValueError(f"unknown domain {domain!r}{_suggest(domain, DOMAINS)}; known: {', '.join(DOMAINS)}")
            if n < 1:
                raise ValueError(f"{domain}: at least 1 new token, got {n}")
        return v

    @field_validator("stop_strings")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        if not all(v):
            raise ValueError("stop_strings must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _views(self) -> "EvalConfig":
        if self.scorer in self.extra_scorers or len(set(self.extra_scorers)) < len(self.extra_scorers):
            raise ValueError(f"extra_scorers {self.extra_scorers} repeat a scorer (the main one is {self.scorer!r})")
        unscored = [t.name for t in resolve_tasks(self.tasks) if not can_score(t, self.scorer)]
        if unscored:
            raise ValueError(f"scorer {self.scorer!r} cannot score {unscored}: keep scorer 'generate' and add "
                             f"{self.scorer!r} to extra_scorers (applied where it can be), or narrow the tasks")
        return self


class StatsConfig(Strict):
    tau: Literal["max", "mean"] | float = "max"
    scorer: Scorer | None = Field(None, description=(
        "whose accuracy the gains, hypotheses and ablations use: the evaluation's main scorer (default) or one "
        "of its extra_scorers (then only the tasks that scorer applies to enter the statistics)"))

    def scorer_of(self, evaluation: "EvalConfig") -> str:
        """The scorer the statistics use for a study evaluated with `evaluation`."""
        return self.scorer or evaluation.scorer


class Ablation(Strict):
    """An extra sub-grid: overrides some KD axes (and optionally the pairs)."""

    name: str
    methods: list[str] | None = None
    temperatures: list[float] | None = None
    noise: list[float] | None = None
    teacher_kinds: list[Literal["sft", "base"]] | None = None
    pairs: list[tuple[str, str]] | None = None  # (teacher, student)


class StudyConfig(Strict):
    """A whole study: models, pairs, axes, and the settings of every stage."""

    study: str
    seeds: list[int] = [0]
    authors: bool = Field(False, description=(
        "reproduce the paper's code (LCS2-IIITD/KD_generalization) where it differs from its text: prompt tokens "
        "in every loss (train_on_inputs), and no temperature in GKD (their GKD 'tau' runs are tau 1)"))
    world: WorldConfig | None = None
    models: dict[str, ModelSpec]
    teachers: list[str]
    students: list[str]
    pairs: list[tuple[str, str]] | None = None
    pretrain: PretrainConfig = PretrainConfig()
    training: TrainingConfig
    kd: KDConfig = KDConfig()
    evaluation: EvalConfig = EvalConfig()
    stats: StatsConfig = StatsConfig()
    memory: MemoryConfig = MemoryConfig()
    ablations: list[Ablation] = []
    resources: dict[str, dict[str, Any]] = {}
    executor: dict[str, Any] = {}

    @model_validator(mode="after")
    def _references(self) -> "StudyConfig":
        known = set(self.models)
        for key in ("teachers", "students"):
            for name in getattr(self, key):
                if name not in known:
                    raise ValueError(f"{key}: {name!r} is not in models{_suggest(name, known)}")
        for pair in list(self.pairs or []) + [p for a in self.ablations for p in a.pairs or []]:
            for name in pair:
                if name not in known:
                    raise ValueError(f"pairs: {name!r} is not in models{_suggest(name, known)}")
        for name, spec in self.models.items():
            if spec.prune is not None:
                source = spec.prune.model
                if source not in known:
                    raise ValueError(f"models.{name}.prune.model: {source!r} is not in models{_suggest(source, known)}")
                if self.models[source].prune is not None:
                    raise ValueError(f"models.{name}.prune.model: {source!r} is itself pruned; prune its source")
            if spec.path is not None:
                problem = _unreachable(spec.path)
                if problem:
                    raise ValueError(f"models.{name}.path: {problem}")
        if any(m.micro for m in self.models.values()) and self.world is None:
            raise ValueError("micro models need a 'world' section (the micro tasks, corpus and tokenizer)")
        per_model = {"pretrain.steps": self.pretrain.steps, "training.steps": self.training.steps,
                     "training.batch_size": self.training.batch_size}
        for key, value in per_model.items():
            for name in value if isinstance(value, dict) else ():
                if name not in known:
                    raise ValueError(f"{key}: {name!r} is not in models{_suggest(name, known)}")
        trained = set(self.teachers) | set(self.students)
        for key in ("training.steps", "training.batch_size"):
            value = per_model[key]
            missing = sorted(trained - set(value)) if isinstance(value, dict) else []
            if missing:
                raise ValueError(f"{key} has no entry for {missing}")
        evaluated = [self.evaluation.scorer, *self.evaluation.extra_scorers]
        if self.stats.scorer_of(self.evaluation) not in evaluated:
            raise ValueError(f"stats.scorer: {self.stats.scorer!r} is not among the evaluation's scorers {evaluated} "
                             f"(add it to evaluation.extra_scorers)")
        return self

    def kd_pairs(self) -> list[tuple[str, str]]:
        """(teacher, student) pairs: explicit, else every teacher with every other student."""
        return [tuple(p) for p in self.pairs] if self.pairs else [
            (t, s) for t in self.teachers for s in self.students if s != t]

    def steps_for(self, model: str) -> int | None:
        steps = self.training.steps
        if isinstance(steps, dict):
            if model not in steps:
                raise ValueError(f"training.steps has no entry for model {model!r}")
            return steps[model]
        return steps


def _unreachable(path: str) -> str | None:
    """Why a model path cannot be loaded, when that is knowable before any compute."""
    import os

    local = Path(path).expanduser()
    if local.exists():
        return None
    if path.startswith(("/", ".", "~")):
        return f"{path!r} does not exist"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from .models import in_hub_cache
        if not in_hub_cache(path):
            return f"{path!r} is not a local directory nor in the hub cache, and HF_HUB_OFFLINE=1"
    return None


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the (sub)model at a validation-error location."""
    current: Any = model
    dict_keys_next = False
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        if dict_keys_next:  # a key of a dict[str, Model] (a model name), not a field
            dict_keys_next = False
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        dict_keys_next = getattr(ann, "__origin__", None) is dict
        candidates = [ann, *getattr(ann, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        for c in candidates:
            for a in getattr(c, "__args__", ()):
                if isinstance(a, type) and issubclass(a, BaseModel):
                    nested.append(a)
        current = nested[0] if nested else None
    return list(getattr(current, "model_fields", {})) if current is not None else []


def format_errors(err: ValidationError, source: str, model: type[BaseModel] = StudyConfig) -> str:
    return "\n".join([f"invalid params in {source}:", *_error_lines(err, model)])


def _error_lines(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per validation error: the key, and for an unknown key the closest valid one."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(e["loc"][-1], _fields_at(model, e["loc"]))
        lines.append(f"  {key}: {msg}")
    return lines


def load_study(path: str | Path, overrides: dict | None = None) -> StudyConfig:
    """Read and validate a params YAML; warn when a student is not smaller than its teacher."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of keys")
    raw = {**raw, **(overrides or {})}
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(format_errors(err, str(path))) from None
    _warn_sizes(cfg, path)
    return cfg


def _warn_sizes(cfg: StudyConfig, path: Path) -> None:
    order = list(MICRO_SIZES)
    for t, s in cfg.kd_pairs():
        mt, ms = cfg.models[t].micro, cfg.models[s].micro
        if mt and ms and order.index(ms) >= order.index(mt):
            warnings.warn(f"{path}: student {s!r} is not smaller than its teacher {t!r}", stacklevel=3)


# --- notebook jobs ---------------------------------------------------------------------------------
#
# One typed job per notebook (NOTEBOOK_JOBS), declared once: a notebook's `parameters` cell declares
# exactly its job's fields plus the job's `notebook_only` names (tests/test_notebook_jobs.py), the grid
# builds every cell's parameters as `job_params(SomeJob(...))`, and a notebook builds its job with
# `job_from_namespace`, which refuses a parameter that is not a field instead of dropping it.

RERUN_NAMES = ("cell_dir", "study_dir", "rerun")


class NotebookJob(Strict):
    """The validated parameters of one notebook run; one subclass per notebook (NOTEBOOK_JOBS)."""

    #: the names a notebook's `parameters` cell declares besides the job's fields: `cell_dir` (where a run
    #: writes; the runner sets it) and, in notebooks that re-run a study's cell when opened as they are,
    #: `study_dir` and `rerun` (RERUN_NAMES: which study, which cell)
    notebook_only: ClassVar[tuple[str, ...]] = ("cell_dir",)

    def params(self) -> dict:
        """The job as notebook parameters (JSON values; a `memory` field as :func:`memory_params`)."""
        params = self.model_dump(mode="json")
        if "memory" in type(self).model_fields:
            del params["memory"]
            params.update(memory_params(self.memory))
        return params


class WorldJob(NotebookJob):
    """The procedural micro world: the parameters of a `00_world` notebook, validated."""

    world: WorldConfig = Field(WorldConfig(), description="the study's `world` section (WorldConfig fields)")

    def params(self) -> dict:
        """`instruction` only when set (:func:`world_params`), so that worlds without it keep their cells' ids."""
        return {"world": world_params(self.world)}


class PretrainJob(NotebookJob):
    """One micro model pretrained on the world's generic corpus: the parameters of a `01_pretrain` notebook."""

    notebook_only: ClassVar[tuple[str, ...]] = RERUN_NAMES

    model: str = Field(description="the model's name in the study")
    micro: str = Field(description="its size: a name in kd_utils.names.MICRO_SIZES")
    world_dir: str = Field(description="the world cell's folder (its tokenizer/ and corpus.txt); empty in the "
                                       "notebook as opened: it re-runs the study's cell `rerun`")
    pretrain: PretrainSettings = Field(PretrainSettings(), description=(
        "the study's `pretrain` section without its per-model steps (lr, batch_size, block, warmup_steps)"))
    steps: int = Field(gt=0, description="optimizer steps: this model's entry of pretrain.steps")
    seed: int = Field(0, description="initialisation and batch-order seed (the study's first seed)")

    @field_validator("micro")
    @classmethod
    def _size(cls, v: str) -> str:
        if v not in MICRO_SIZES:
            raise ValueError(f"unknown micro size {v!r}{_suggest(v, MICRO_SIZES)}; known: {', '.join(MICRO_SIZES)}")
        return v


class ModelJob(NotebookJob):
    """One real model made ready for the grid: the parameters of a `02_model` notebook, validated."""

    model: str = Field(description="the model's name in the study")
    gguf: str | None = Field(None, description="convert this GGUF (file or 'distribution:path') to a saved model")
    source_path: str | None = Field(None, description="prune this saved model (a folder; then gguf is None)")
    keep: int | None = Field(None, gt=0, description="pruning: how many of its layers to keep")
    rule: PruneRule = Field("even", description="pruning: which layers, 'even', 'first' or 'ends' "
                                                "(PruneSpec.rule)")

    @model_validator(mode="after")
    def _one(self) -> "ModelJob":
        if (self.gguf is None) == (self.source_path is None):
            raise ValueError("give exactly one of 'gguf' (convert) or 'source_path' (prune)")
        if (self.source_path is None) != (self.keep is None):
            raise ValueError("pruning needs both 'source_path' and 'keep'")
        return self


class CacheJob(NotebookJob):
    """One teacher signal cached over the training set: the parameters of a `05_teacher_cache` notebook."""

    notebook_only: ClassVar[tuple[str, ...]] = RERUN_NAMES

    teacher: str = Field(description="the teacher's model name in the study")
    teacher_path: str = Field(description="the teacher model's folder or hub id; empty in the notebook as opened: "
                                          "it re-runs the study's cell `rerun`")
    teacher_kind: Literal["sft", "base"] = Field(description="the teacher as fine-tuned (sft) or its base model")
    noise: float = Field(0.0, ge=0, description="sigma of the Gaussian noise added to the teacher's logits")
    noise_seed: int = Field(0, description="seed of the noise draw (kd_utils.methods.noise_seed)")
    temperatures: list[float] = Field(min_length=1, description=(
        "the temperatures whose log-normalisers are stored: every temperature of this teacher's KD runs"))
    training: TrainingConfig = Field(description=(
        "the teacher's training section: which examples the cache covers (train_tasks / train_data, limit, "
        "max_length, n_val, truncation)"))
    kd: KDConfig = Field(KDConfig(), description="the study's kd section (cache_k, cache_samples)")
    data_root: str | None = Field(None, description="the task data's folder (the micro world's data/); "
                                                    "None: the default data root")
    cache_root: str = Field("outputs/cache", description="folder of the teacher caches")
    generations: bool = Field(False, description="also make SeqKD's greedy teacher generations")
    authors: bool = Field(False, description="the authors' code: prompt tokens are target positions too")
    memory: MemoryConfig = Field(MemoryConfig(), description="the budget of the logits work (MemoryConfig)")

    _temps = field_validator("temperatures")(_positive_temperatures)


class DistillJob(NotebookJob):
    """One training run: the parameters of a `10_distill` notebook, validated."""

    notebook_only: ClassVar[tuple[str, ...]] = RERUN_NAMES

    student: str = Field(description="the student's model name in the study")
    student_path: str = Field(description="the model the run starts from (folder or hub id); empty in the notebook "
                                          "as opened: it re-trains the study's cell `rerun`")
    method: str = Field("sft", description="'sft' or a KD method of kd_utils.names.METHODS")
    teacher: str = Field("", description="the teacher's model name (KD runs)")
    teacher_path: str = Field("", description="the teacher model's folder or hub id (KD runs)")
    teacher_kind: Literal["sft", "base", ""] = Field("", description="the teacher as fine-tuned or its base model")
    temperature: float = Field(1.0, gt=0, description="the KD temperature tau")
    noise: float = Field(0.0, ge=0, description="sigma of the Gaussian noise on the teacher's logits")
    seed: int = Field(0, description="the run's seed (initialisation of new weights, batch order, noise draw)")
    steps: int | None = Field(None, gt=0, description="optimizer steps; None: training.epochs decide")
    training: TrainingConfig = Field(description="the study's training section, resolved for this model")
    kd: KDConfig = Field(KDConfig(), description="the study's kd section (teacher_cache: whether this run reads a "
                                                 "cache)")
    data_root: str | None = Field(None, description="the task data's folder; None: the default data root")
    cache_root: str = Field("outputs/cache", description="folder of the teacher caches")
    cache_temperatures: list[float] | None = Field(None, description=(
        "the temperatures of the teacher cache this run reads (it must hold `temperature`); None: no cache"))
    trust_remote_code: bool = Field(False, description="let transformers run the model repository's own code")
    authors: bool = Field(False, description="the authors' code: prompt tokens in the loss, no temperature in GKD")
    memory: MemoryConfig = Field(MemoryConfig(), description="the budget of the logits work (MemoryConfig)")

    @model_validator(mode="after")
    def _teacher(self) -> "DistillJob":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}{_suggest(self.method, METHODS)}; known: {', '.join(METHODS)}")
        if self.method != "sft" and not self.teacher_path:
            raise ValueError(f"method {self.method!r} needs a teacher_path")
        if self.cache_temperatures and self.temperature not in self.cache_temperatures:
            raise ValueError(f"temperature {self.temperature} is not among cache_temperatures {self.cache_temperatures}")
        return self


class EvalJob(NotebookJob):
    """One evaluation run: the parameters of a `20_evaluate` notebook, validated."""

    notebook_only: ClassVar[tuple[str, ...]] = RERUN_NAMES

    model: str = Field(description="the evaluated model's key: '<student>/sft/s<seed>', a KD cell's name or "
                                   "'<teacher>/base'")
    model_path: str = Field(description="the model's folder or hub id; empty in the notebook as opened: it "
                                        "re-evaluates the study's cell `rerun`")
    kind: Literal["base", "sft", "kd"] = Field(description="a base model, an SFT model or a KD student")
    student: str = Field(description="the evaluated model's name in the study")
    teacher: str = Field("", description="its teacher (KD)")
    method: str = Field("", description="how it was trained: 'sft', a KD method, or 'base'")
    temperature: float | None = Field(None, description="its KD temperature (KD)")
    noise: float = Field(0.0, description="its teacher's logit noise (KD)")
    teacher_kind: Literal["sft", "base", ""] = Field("", description="its teacher as fine-tuned or base (KD)")
    seed: int = Field(0, description="its training seed")
    evaluation: EvalConfig = Field(EvalConfig(), description="the study's evaluation section")
    data_root: str | None = Field(None, description="the task data's folder; None: the default data root")
    trust_remote_code: bool = Field(False, description="let transformers run the model repository's own code")
    memory: MemoryConfig = Field(MemoryConfig(), description="the budget of log-likelihood scoring (MemoryConfig)")


class FidelityJob(NotebookJob):
    """The accuracy and fidelity analysis of a study: the parameters of a `30_fidelity` notebook."""

    study_dir: str = Field(description="the study whose evaluations it reads")
    inputs: str = Field("", description="digest of the evaluation cells it reads (set by the grid: new results "
                                        "make a new cell)")
    tau: Literal["max", "mean"] | float = Field("max", description=(
        "aggregation over temperatures (stats.tau): 'max' (the authors'), 'mean', or a fixed tau"))
    scorer: Scorer | Literal[""] = Field("", description="whose accuracy the gains use (stats.scorer); empty: the "
                                                          "evaluation's main scorer")


class GainsJob(FidelityJob):
    """An analysis of a study's KD gains: the parameters of the `40_ablation` and `50_statistics` notebooks."""

    fidelity_dir: str = Field("", description="the fidelity cell's folder (its gains.csv); empty: the study's "
                                              "fidelity cell")


class ExploreJob(NotebookJob):
    """What the explorer shows: the parameters of the `60_explore` notebook (opened by hand, not by the grid)."""

    notebook_only: ClassVar[tuple[str, ...]] = ()

    study_dir: str = Field(description="the study to explore")
    student: str = Field("", description="a student model of results.csv; empty: the first pair of the table")
    teacher: str = Field("", description="its teacher's model name; empty: the teacher it learned from")
    show: str = Field("paradox", description="which items: one of kd_utils.explore.SHOW")
    task: str = Field("", description="one task, or empty for all")
    other_rationale_below: float = Field(50.0, ge=0, description=(
        "sentence BLEU under which an agreeing answer counts as another rationale"))
    rows: int = Field(20, gt=0, description="items shown")


#: every notebook's job, by the notebook's name
NOTEBOOK_JOBS: dict[str, type[NotebookJob]] = {
    "00_world": WorldJob, "01_pretrain": PretrainJob, "02_model": ModelJob, "05_teacher_cache": CacheJob,
    "10_distill": DistillJob, "20_evaluate": EvalJob, "30_fidelity": FidelityJob, "40_ablation": GainsJob,
    "50_statistics": GainsJob, "60_explore": ExploreJob,
}


def validate_job(model: type[BaseModel], values: dict, source: str, unknown=()):
    """Validate a notebook's parameters into a typed job, with the same messages as params files.
    `unknown`: parameters the notebook was given that are not the job's; each is named, with the closest
    one it has, and the job is refused."""
    lines = []
    if unknown:
        fields, own = list(model.model_fields), list(getattr(model, "notebook_only", ()))
        lines = [f"  {name}: unknown parameter{_suggest(name, fields + own)}" for name in sorted(unknown)]
        lines.append(f"  ({model.__name__}'s parameters: {', '.join(fields)}"
                     + (f"; the notebook's own: {', '.join(own)})" if own else ")"))
    try:
        job = model.model_validate(values)
    except ValidationError as err:
        raise ValueError("\n".join([f"invalid params in {source}:", *lines, *_error_lines(err, model)])) from None
    if lines:
        raise ValueError("\n".join([f"invalid params in {source}:", *lines]))
    return job


def memory_params(memory: MemoryConfig) -> dict:
    """The memory budget as notebook parameters: none when it is the default, so that the default
    leaves the cells' ids as they were."""
    return {} if memory == MemoryConfig() else {"memory": memory.model_dump(mode="json")}


def job_params(job: NotebookJob) -> dict:
    """A job's notebook parameters: what the grid gives a cell (:meth:`NotebookJob.params`)."""
    return job.params()


def _assignments(source: str) -> tuple[list[str], bool] | None:
    """The names a cell made only of `name = value` lines assigns, and whether every value is a literal;
    None for any other cell."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    if not body or not all(isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
                           for s in body):
        return None
    try:
        for s in body:
            ast.literal_eval(s.value)
        literal = True
    except ValueError:
        literal = False
    return [s.targets[0].id for s in body], literal


def notebook_parameter_names(namespace: dict, model: type[BaseModel]) -> set[str]:
    """The names a notebook's parameters set, read from the kernel's input history (`In`): those of papermill's
    injected cell (it starts with '# Parameters') and of the latest other cell made only of `name = literal`
    lines that sets a field of `model` (the `parameters` cell as it ran). Empty outside a kernel."""
    history = namespace.get("In")
    if not isinstance(history, list):
        return set()
    injected: list[str] = []
    declared: list[str] = []
    for source in history:
        found = _assignments(source) if isinstance(source, str) else None
        if found is None:
            continue
        names, literal = found
        if source.lstrip().startswith("# Parameters"):
            injected = names
        elif literal and set(names) & set(model.model_fields):
            declared = names
    return set(injected) | set(declared)


def job_from_namespace(model: type[BaseModel], namespace: dict, source: str, names=None):
    """A typed job from a notebook's parameter variables (the names of the model's fields) in `namespace`
    (the notebook's globals()). Every name of `names`, the notebook's parameters (default: read from the
    kernel, :func:`notebook_parameter_names`), must be a field or one of the job's `notebook_only` names:
    any other is an error naming it, not a parameter silently dropped."""
    if names is None:
        names = notebook_parameter_names(namespace, model)
    allowed = set(model.model_fields) | set(getattr(model, "notebook_only", ()))
    unknown = sorted(set(names) - allowed)
    return validate_job(model, {k: namespace[k] for k in model.model_fields if k in namespace}, source, unknown)
