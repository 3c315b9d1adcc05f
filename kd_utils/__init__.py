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
  locks         exclusive file locks that name their holder (runner, teacher cache)
  cache_keys    the teacher cache's and SeqKD store's keys: a hash of what determines them
  cache_shards  the teacher cache on disk: shards and manifest, written and read back checked
  cache_signal  the teacher signal a cache stores (top-k, logZ, exact tail, sampled tail tokens)
  cache_build   building a teacher cache within the memory budget, or reusing a valid one
  teachers      the teacher signal a run reads: cached, cached + live (GKD), the cache probe
  seqkd_store   SeqKD's stored teacher generations
  teacher_cache one teacher-cache build (a prepare cell)
  tasks         the declarative task registry and answer extraction
  schema        the columns of the shared tables (results.csv, fidelity.csv, gains, hypotheses)
  evaluation    zero-shot generation and scoring
  evaluate_run  one evaluation run (an evaluate cell)
  fidelity      teacher-student agreement and rationale similarity
  results       the tidy results and fidelity tables
  gains         the gain table: KD accuracy minus the student's SFT accuracy, per configuration
  hypotheses    the hypothesis tests of the paper, effect sizes, Holm / BH corrections
  prose         the hypothesis table as plain-English sentences
  mixed_model   a random-intercept model of the gains (beyond the paper)
  authors_tables the authors' published tables parsed, and their analysis rerun (CLI)
  ablation      the ablation views
  plots         the report figures
  engine        the notebook-DAG engine (cells, plan, locks, workers, local and SLURM executors, run)
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
