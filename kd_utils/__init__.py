"""kd_utils: knowledge distillation of language models, the study of
"On the Generalization vs Fidelity Paradox in Knowledge Distillation" (Ramesh et al., 2025).

Modules, one job each:
  config        typed, validated study parameters (the params YAML) and cell jobs
  microworld    the procedural micro tasks and generic corpus of the CPU micro-study
  tokenization  the locally trained byte-level BPE tokenizer
  prepare       the micro world on disk and the pretrained base models
  models        model families, loading from paths or the hub, compatibility checks, LoRA
  model_sources real models from files: GGUF conversion, depth-pruned students, parameter counts
  data          tokenised examples (long pairs cut or skipped), packing, batches
  contamination train/test overlap of the training data and every evaluation task
  losses        the KD objectives (one registry of names)
  training      the training loop (optimiser, accumulation, validation, best checkpoint)
  methods       the recipes: SFT, word-level KD, SeqKD, on-policy GKD
  distill       one training run (a distill cell)
  teacher_cache the offline teacher-signal cache
  tasks         the declarative task registry and answer extraction
  evaluation    zero-shot generation and scoring
  evaluate_run  one evaluation run (an evaluate cell)
  fidelity      teacher-student agreement and rationale similarity
  stats         the hypothesis tests of the paper
  results       the tidy results and fidelity tables
  ablation      the ablation views
  plots         the report figures
  runner        cell execution: papermill, resume, failure isolation, executors
  grid          params -> cells, and the `plan` / `run` / `report` CLI
  report        the rendered HTML report
  explore       a finished study from a notebook: `kd_utils.open_study("micro")`
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    """`kd_utils.open_study` without importing the study machinery (torch, the grid) with the package."""
    if name == "open_study":
        from .explore import open_study
        return open_study
    raise AttributeError(f"module 'kd_utils' has no attribute {name!r}")
