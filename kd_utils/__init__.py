"""kd_utils: knowledge distillation of language models, the study of
"On the Generalization vs Fidelity Paradox in Knowledge Distillation" (Ramesh et al., 2025).

Modules, one job each:
  config        typed, validated study parameters (the params YAML)
  microworld    the procedural micro tasks and generic corpus of the CPU micro-study
  tokenization  the locally trained byte-level BPE tokenizer
  models        model families, loading from paths or the hub, compatibility checks
  losses        the KD objectives (one registry of names)
  training      the training loop (SFT, word-level KD, SeqKD, on-policy GKD)
  teacher_cache the offline teacher-signal cache
  tasks         the declarative task registry and answer extraction
  evaluation    zero-shot generation and scoring
  fidelity      teacher-student agreement and rationale similarity
  stats         the hypothesis tests of the paper
  runner        cell execution: papermill, resume, failure isolation, executors
  grid          params -> cells, and the `plan` / `run` CLI
  plots         the report figures
"""
__version__ = "0.1.0"
