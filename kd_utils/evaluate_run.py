"""One evaluation run (an `evaluate` cell): load a model, score it on the study's tasks,
keep every prediction, and describe the model for the tidy results table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .config import EvalJob
from .evaluation import evaluate
from .models import count_parameters, load_model, read_manifest


def run_evaluation(job: EvalJob, out_dir: str | Path, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Evaluate `job.model_path` zero-shot; writes predictions.jsonl and accuracy.csv (one
    folder per sampling seed when decoding samples). Returns the per-task table (mean over
    sampling seeds) and the metrics describing the model."""
    e = job.evaluation
    model, tokenizer = load_model(job.model_path, trust_remote_code=job.trust_remote_code)
    sample = e.decoding == "sample"
    tables = []
    for s in e.sample_seeds if sample else [0]:
        target = Path(out_dir) / (f"sample-{s}" if sample else "")
        per_domain = []
        for domain, tasks in _by_domain(e.tasks).items():
            per_domain.append(evaluate(
                model, tokenizer, tasks, data_root=job.data_root or e.data_root, limit=e.limit,
                batch_size=e.batch_size, max_new_tokens=e.max_new_tokens.get(domain), do_sample=sample,
                temperature=e.temperature, top_p=e.top_p, seed=s, scorer=e.scorer, progress=progress,
                out_dir=target / domain))
        tables.append(pd.concat(per_domain, ignore_index=True).assign(eval_seed=s))
        _merge_domain_files(target, list(_by_domain(e.tasks)))
    table = pd.concat(tables, ignore_index=True)
    mean = table.groupby(["task", "domain"], sort=False, as_index=False)[["n", "accuracy", "ci_low", "ci_high"]].mean()
    params = count_parameters(model)
    metrics = {**job.model_dump(exclude={"evaluation", "data_root", "model_path", "trust_remote_code"}),
               "params": params, "manifest": read_manifest(job.model_path),
               "accuracy": dict(zip(mean.task, mean.accuracy)), "tasks": mean.to_dict(orient="records")}
    return mean, metrics


def _by_domain(tasks) -> dict[str, list[str]]:
    from .tasks import resolve_tasks

    out: dict[str, list[str]] = {}
    for t in resolve_tasks(tasks):
        out.setdefault(t.domain, []).append(t.name)
    return out


def _merge_domain_files(target: Path, domains: list[str]) -> None:
    """One predictions.jsonl and accuracy.csv per run, whatever the domains."""
    lines, tables = [], []
    for d in domains:
        lines.append((target / d / "predictions.jsonl").read_text())
        tables.append(pd.read_csv(target / d / "accuracy.csv"))
        (target / d / "predictions.jsonl").unlink()
        (target / d / "accuracy.csv").unlink()
        (target / d).rmdir()
    (target / "predictions.jsonl").write_text("".join(lines))
    pd.concat(tables).to_csv(target / "accuracy.csv", index=False)
