"""kd_utils: knowledge distillation of language models, the study of
"On the Generalization vs Fidelity Paradox in Knowledge Distillation" (Ramesh et al., 2025).

Modules, one job each:
  config        typed, validated study parameters (the params YAML) and cell jobs
  microworld    the procedural micro tasks and generic corpus of the CPU micro-study
  tokenization  the locally trained byte-level BPE tokenizer
  prepare       the micro world on disk and the pretrained base models
  models        model families, loading from paths or the hub, compatibility checks, LoRA
  data          tokenised examples, packing, batches
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
"""
__version__ = "0.1.0"
