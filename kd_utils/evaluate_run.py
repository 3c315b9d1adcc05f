"""One evaluation run (an `evaluate` cell): load a model, score it on the study's tasks,
keep every prediction, and describe the model for the tidy results table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .chunking import budget_bytes, check_fits
from .config import EvalJob
from .evaluation import evaluate
from .models import count_parameters, load_model, read_manifest
from .tasks import can_score, resolve_tasks


def run_evaluation(job: EvalJob, out_dir: str | Path, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Evaluate `job.model_path` zero-shot with the main scorer (`evaluation.scorer`); writes
    predictions.jsonl and accuracy.csv (when decoding samples, the first sampling seed's there and
    the others' in `sample-<seed>/`), and each extra scorer's in `scorer-<name>/`, on the tasks it
    applies to. Returns the per-task table (each task in its metric, accuracy or ROUGE-L; mean and
    mean 95% bounds over sampling seeds; `accuracy_<extra scorer>`
    columns beside, NaN where it does not apply) and the metrics of the model."""
    e = job.evaluation
    model, tokenizer = load_model(job.model_path, trust_remote_code=job.trust_remote_code)
    check_fits(budget_bytes(job.memory.chunk_mb, model.device), model.device, f"scoring {job.model}")
    sample = e.decoding == "sample"
    seeds = e.sample_seeds if sample else [0]
    common = dict(data_root=job.data_root or e.data_root, limit=e.limit, batch_size=e.batch_size,
                  max_new_tokens=e.max_new_tokens, do_sample=sample, temperature=e.temperature, top_p=e.top_p,
                  stop_strings=e.stop_strings or None, progress=progress, chunk_mb=job.memory.chunk_mb)
    tables = [evaluate(model, tokenizer, e.tasks, seed=seed, scorer=e.scorer, **common,
                       out_dir=Path(out_dir) / ("" if seed == seeds[0] else f"sample-{seed}")).assign(eval_seed=seed)
              for seed in seeds]
    table = pd.concat(tables, ignore_index=True)
    mean = table.groupby(["task", "domain"], sort=False, as_index=False).agg(
        metric=("metric", "first"), n=("n", "first"), accuracy=("accuracy", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"),
        truncated=("truncated", "first"))
    for scorer in e.extra_scorers:
        tasks = [t for t in resolve_tasks(e.tasks) if can_score(t, scorer)]
        view = pd.DataFrame(columns=["task", "accuracy"]) if not tasks else evaluate(
            model, tokenizer, tasks, seed=seeds[0], scorer=scorer, out_dir=Path(out_dir) / f"scorer-{scorer}", **common)
        mean = mean.merge(view[["task", "accuracy"]].rename(columns={"accuracy": f"accuracy_{scorer}"}),
                          on="task", how="left")
    metrics = {**job.model_dump(exclude={"evaluation", "data_root", "model_path", "trust_remote_code"}),
               "params": count_parameters(model), "manifest": read_manifest(job.model_path), "scorer": e.scorer,
               "accuracy": dict(zip(mean.task, mean.accuracy)), "tasks": mean.to_dict(orient="records")}
    return mean, metrics
