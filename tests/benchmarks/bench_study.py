"""The whole micro-study with the teacher cache and without it: wall time, cell time per stage,
teacher forward passes, and their ratios (CPU, one run).

    .venv/bin/python tests/benchmarks/bench_study.py --out outputs/benchmarks [--params params/micro.yaml]

Runs ``python -m kd_utils.grid run PARAMS`` twice from empty outputs folders, one after the
other: first as given (``kd.teacher_cache: true``), then with ``kd.teacher_cache: false`` (every
KD run drives its teacher live; no cache cells). Everything else (world, pretraining, teachers,
evaluation, statistics) is the same work in both, so the ratio is the saving a user sees on the
whole study, not on a KD step (see bench_teacher_cache.py for that).

Writes ``<out>/study.json`` and ``<out>/study.md``; the studies stay under ``<work>/{cached,live}``.
The default 2 workers x 1 thread match `make study`. This takes about twice a micro-study.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _stage_seconds(study: Path) -> dict:
    """Cell time per stage (papermill's duration of each executed notebook, kernel start
    included) and teacher forward passes (cache builds plus live-teacher KD runs)."""
    out = {"cell_seconds": {}, "cells": {}, "teacher_forward_passes": 0}
    for metrics in study.glob("*/*/metrics.json"):
        stage = metrics.parent.parent.name
        nb = json.loads((metrics.parent / "notebook.ipynb").read_text())
        out["cells"][stage] = out["cells"].get(stage, 0) + 1
        out["cell_seconds"][stage] = out["cell_seconds"].get(stage, 0.0) + nb["metadata"]["papermill"]["duration"]
        out["teacher_forward_passes"] += int(json.loads(metrics.read_text()).get("teacher_forward_passes") or 0)
    return out


def run_variant(params: Path, cache: bool, work: Path, workers: int, threads: int) -> dict:
    raw = yaml.safe_load(params.read_text())
    raw.setdefault("kd", {})["teacher_cache"] = cache
    root = work / ("cached" if cache else "live")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    variant = root / params.name
    variant.write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = [sys.executable, "-m", "kd_utils.grid", "run", str(variant), "--outputs", str(root),
           "--max-workers", str(workers), "--threads-per-worker", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    (root / "grid.log").write_text(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {root / 'grid.log'}")
    return {"teacher_cache": cache, "wall_seconds": wall, **_stage_seconds(root / raw["study"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/benchmarks")
    ap.add_argument("--params", default="params/micro.yaml")
    ap.add_argument("--work", default=None, help="where the two studies run (default <out>/study_work)")
    ap.add_argument("--max-workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "study_work"
    out.mkdir(parents=True, exist_ok=True)
    params = (ROOT / args.params) if not Path(args.params).is_absolute() else Path(args.params)
    cached = run_variant(params, True, work.resolve(), args.max_workers, args.threads_per_worker)
    print(f"with the cache: {cached['wall_seconds']:.0f} s wall", flush=True)
    live = run_variant(params, False, work.resolve(), args.max_workers, args.threads_per_worker)
    print(f"live teachers: {live['wall_seconds']:.0f} s wall", flush=True)
    result = {
        "params": args.params, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "python": platform.python_version(), "workers": args.max_workers, "threads_per_worker": args.threads_per_worker,
        "cached": cached, "live": live,
        "wall_ratio_live_over_cached": live["wall_seconds"] / cached["wall_seconds"],
        "distill_cell_ratio_live_over_cached": live["cell_seconds"].get("distill", 0) / max(
            cached["cell_seconds"].get("distill", 0), 1e-9),
        "teacher_pass_ratio_live_over_cached": live["teacher_forward_passes"] / max(cached["teacher_forward_passes"], 1),
    }
    (out / "study.json").write_text(json.dumps(result, indent=1))
    lines = [f"# The whole study ({args.params}) with and without the teacher cache", "",
             "| | with cache | live teacher | live / cached |", "|---|---|---|---|",
             f"| wall time (s) | {cached['wall_seconds']:.0f} | {live['wall_seconds']:.0f} | "
             f"{result['wall_ratio_live_over_cached']:.2f} |"]
    for stage in ("prepare", "distill", "evaluate", "fidelity", "statistics"):
        c, v = cached["cell_seconds"].get(stage, 0.0), live["cell_seconds"].get(stage, 0.0)
        lines.append(f"| {stage} cell time (s) | {c:.0f} | {v:.0f} | {v / max(c, 1e-9):.2f} |")
    lines.append(f"| teacher forward passes | {cached['teacher_forward_passes']} | {live['teacher_forward_passes']} | "
                 f"{result['teacher_pass_ratio_live_over_cached']:.2f} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
