"""The tidy tables every analysis reads: results.csv (one row per model and task) and
fidelity.csv (one row per student model, teacher and task), collected from the cells."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .fidelity import fidelity_table
from .schema import RESULT_COLUMNS
from .tasks import SCORERS


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def save_metrics(cell_dir: str | Path, metrics: dict) -> None:
    """Write metrics.json, the file that marks a cell complete: call it last."""
    path = Path(cell_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(metrics), indent=1, default=str))


def _cells(study_dir: Path, stage: str):
    for m in sorted((study_dir / stage).glob("*/metrics.json")):
        yield m.parent, json.loads(m.read_text())


def collect_results(study_dir: str | Path, write: bool = True) -> pd.DataFrame:
    """results.csv from every complete evaluate cell of the study."""
    study = Path(study_dir)
    rows, params = [], {}
    evals = list(_cells(study, "evaluate"))
    for _, m in evals:
        if m["kind"] in ("sft", "base"):
            params.setdefault(m["student"], m["params"])
    for cell_dir, m in evals:
        scorer = m.get("scorer", "generate")
        for t in m["tasks"]:
            rows.append({
                "model": m["model"], "kind": m["kind"], "student": m["student"], "teacher": m["teacher"],
                "method": m["method"] or m["kind"], "temperature": m["temperature"], "noise": m["noise"],
                "teacher_kind": m["teacher_kind"], "seed": m["seed"], "task": t["task"], "domain": t["domain"],
                "n": t["n"], "scorer": scorer, "metric": t.get("metric", "accuracy"), "accuracy": t["accuracy"], "ci_low": t["ci_low"],
                "ci_high": t["ci_high"], "student_params": m["params"],
                "teacher_params": params.get(m["teacher"]) if m["teacher"] else None, "cell_id": cell_dir.name,
                **{f"accuracy_{s}": t["accuracy"] if s == scorer else t.get(f"accuracy_{s}") for s in SCORERS}})
    if not rows:
        raise FileNotFoundError(f"no complete evaluate cells under {study / 'evaluate'}")
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    table["temperature"] = table["temperature"].astype(float)
    table["teacher_params"] = table["teacher_params"].astype(float)
    if write:
        table.to_csv(study / "results.csv", index=False)
    return table


def scored_by(results: pd.DataFrame, scorer: str) -> pd.DataFrame:
    """results.csv as `scorer` saw it: its accuracy in `accuracy` (the interval only where it is the
    main scorer), on the rows it scored (a log-likelihood scorer skips the generation-only tasks)."""
    column = f"accuracy_{scorer}"
    if column not in results:
        raise ValueError(f"unknown scorer {scorer!r}; results hold {[c[9:] for c in results if c.startswith('accuracy_')]}")
    out = results[results[column].notna()].copy()
    if out.empty:
        raise ValueError(f"no model was scored by {scorer!r}: add it to evaluation.extra_scorers")
    other = out["scorer"] != scorer
    out.loc[other, ["ci_low", "ci_high"]] = float("nan")
    out["accuracy"], out["scorer"] = out[column], scorer
    return out.reset_index(drop=True)


def scorer_views(results: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy per model under each scorer the evaluation ran (over the tasks that scorer
    scored), with the number of tasks: one column pair per scorer, models in results' order."""
    views = {}
    for s in SCORERS:
        rows = results[results[f"accuracy_{s}"].notna()]
        if len(rows):
            grouped = rows.groupby("model", sort=False)[f"accuracy_{s}"]
            views[s], views[f"{s} tasks"] = grouped.mean(), grouped.size()
    return pd.DataFrame(views).reindex(results["model"].unique())


def collect_fidelity(study_dir: str | Path, write: bool = True) -> pd.DataFrame:
    """fidelity.csv: every KD model against its teacher, and every SFT student against each
    teacher it is distilled from (the paper's SFT rows), from the saved predictions."""
    study = Path(study_dir)
    evals = {m["model"]: (d, m) for d, m in _cells(study, "evaluate")}
    teacher_model = {}  # (model, kind) -> the evaluation of the model that taught: SFT'd at the study's first seed
    resolved = study / "params.resolved.json"
    first_seed = json.loads(resolved.read_text())["seeds"][0] if resolved.is_file() else None
    for name, (_, m) in sorted(evals.items(), key=lambda e: (e[1][1]["seed"] != first_seed, e[1][1]["seed"])):
        if m["kind"] == "base":
            teacher_model[(m["student"], "base")] = name
        elif m["kind"] == "sft":
            teacher_model.setdefault((m["student"], "sft"), name)
    files = {name: d / "predictions.jsonl" for name, (d, _) in evals.items()}
    pairs = []
    for name, (_, m) in evals.items():
        if m["kind"] == "kd" and (m["teacher"], m["teacher_kind"]) in teacher_model:
            pairs.append((name, teacher_model[(m["teacher"], m["teacher_kind"])]))
    for name, (_, m) in evals.items():
        if m["kind"] == "sft":
            for t in sorted({evals[k][1]["teacher"] for k, _t in pairs if evals[k][1]["student"] == m["student"]}):
                if (t, "sft") in teacher_model and teacher_model[(t, "sft")] != name:
                    pairs.append((name, teacher_model[(t, "sft")]))
    table = fidelity_table(files, pairs)  # an empty table with the fidelity.csv columns when no pairs
    # Name the teacher by model name (as results.csv does), not by its evaluation key.
    table["teacher"] = table["teacher"].map(lambda k: evals[k][1]["student"])
    if write:
        table.to_csv(study / "fidelity.csv", index=False)
    return table
