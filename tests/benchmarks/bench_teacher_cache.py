"""Benchmark of the offline teacher cache on the micro models (CPU).

    .venv/bin/python tests/benchmarks/bench_teacher_cache.py --out outputs/benchmarks

Teacher micro-m (~540k parameters at vocab 1024), SFT-trained on the micro world so it is peaked;
student micro-s (~160k). Everything is measured in ONE run, variants alternated (rotated order per
repetition), medians of per-step times after warm-up, the real training loop (`training.train`):

* step time: SFT, word-level KD (fkl) with the cached teacher (k=16), with the live teacher;
* where the time goes: the same steps timed by phase (forward, loss, backward, optimiser);
* cache size per target token; peak RSS of each variant in its own subprocess;
* a grid: N students x M temperatures distilled with one cache build vs the live teacher;
* fidelity: relative error of the top-k loss vs the live full-vocabulary loss (k, objective, tau).

Writes ``<out>/teacher_cache.json`` and ``<out>/teacher_cache.md``. Wall-clock on a shared
machine is noisy: only ratios within this run are meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kd_utils import cache_build, cache_keys, cache_shards  # noqa: E402
from kd_utils.data import IGNORE, collate, epoch_batches, tokenize_pairs  # noqa: E402
from kd_utils.methods import KDSettings, LiveTeacher, kd_objective  # noqa: E402
from kd_utils.microworld import GENERATORS, generic_corpus, write_world  # noqa: E402
from kd_utils.models import build_micro_model, count_parameters  # noqa: E402
from kd_utils.tasks import load_items, training_pairs  # noqa: E402
from kd_utils.teachers import CachedTeacher  # noqa: E402
from kd_utils.tokenization import train_bpe_tokenizer  # noqa: E402
from kd_utils.training import OptimSettings, cycle_steps, token_ce, train  # noqa: E402

VOCAB, MAX_LENGTH, BATCH, K = 1024, 256, 32, 16
TEACHER, STUDENT = "micro-m", "micro-s"
VARIANTS = ("sft", "cached", "live")


# --------------------------------------------------------------------------- setup
def prepare(work: Path, teacher_steps: int, n_train: int, load_teacher: bool = True):
    """Data, tokenizer and a trained teacher (reused from `work` when already there)."""
    data = work / "data"
    if not (data / "micro_obqa" / "train.json").exists():
        write_world(data, n_train=n_train, n_test=1, seed=0)
    items = [it for t in GENERATORS for it in load_items(t, data, "train")]
    prompts, responses = training_pairs(items)
    if (work / "tok" / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(work / "tok")
    else:
        tok = train_bpe_tokenizer(generic_corpus(2000, 0) + prompts + responses, VOCAB, work / "tok")
    examples = tokenize_pairs(tok, prompts, responses, MAX_LENGTH)
    if not load_teacher:
        return tok, examples, None
    if (work / "teacher" / "model.safetensors").exists():
        teacher = AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32)
    else:
        teacher = build_micro_model(TEACHER, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        steps = cycle_steps(lambda ep: ([collate([examples[i] for i in b], tok.pad_token_id)]
                                        for b in epoch_batches(len(examples), BATCH, 0, ep)))
        r = train(teacher, steps, token_ce, OptimSettings(max_steps=teacher_steps, lr=3e-3, warmup_steps=20,
                                                           eval_every=10**6), progress=False)
        print(f"teacher {TEACHER}: {teacher_steps} SFT steps, final loss {r.history[-1]['loss']:.3f}", flush=True)
        teacher.save_pretrained(work / "teacher")
    return tok, examples, teacher.eval()


def batches(examples, pad: int, seed: int):
    return cycle_steps(lambda ep: ([collate([examples[i] for i in b], pad)]
                                   for b in epoch_batches(len(examples), BATCH, seed, ep)))


def objective_for(variant: str, teacher, cache, settings: KDSettings):
    if variant == "sft":
        return token_ce
    kd_teacher = CachedTeacher(cache, VOCAB) if variant == "cached" else LiveTeacher(teacher, VOCAB)
    return kd_objective(kd_teacher, settings, VOCAB)


def run_steps(variant, examples, pad, teacher, cache, n_steps, seed=0, settings=KDSettings("fkl")):
    """Train a fresh student `n_steps` with the real loop; per-step seconds."""
    student = build_micro_model(STUDENT, VOCAB, seed=seed)
    r = train(student, batches(examples, pad, seed), objective_for(variant, teacher, cache, settings),
              OptimSettings(max_steps=n_steps, lr=3e-3, warmup_steps=5, eval_every=10**6), progress=False)
    t = [h["seconds"] for h in r.history]
    return [b - a for a, b in zip([0.0] + t, t)]


# --------------------------------------------------------------------------- measurements
def loop_step_times(examples, pad, teacher, cache, reps: int, steps: int, warmup: int) -> dict:
    """Per-step times of whole `training.train` runs, variants rotated per repetition."""
    pooled = {v: [] for v in VARIANTS}
    per_rep = []
    for rep in range(reps):
        order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]
        med = {}
        for v in order:
            t = run_steps(v, examples, pad, teacher, cache, warmup + steps, seed=rep)[warmup:]
            pooled[v] += t
            med[v] = statistics.median(t)
        per_rep.append(med)
        print(f"rep {rep}: " + ", ".join(f"{v} {1000 * med[v]:.1f} ms" for v in VARIANTS), flush=True)
    median = {v: statistics.median(pooled[v]) for v in VARIANTS}
    return {"median_step_s": median, "per_rep_median_s": per_rep,
            "cached_over_sft": median["cached"] / median["sft"], "live_over_cached": median["live"] / median["cached"],
            "cached_over_sft_per_rep": [r["cached"] / r["sft"] for r in per_rep],
            "live_over_cached_per_rep": [r["live"] / r["cached"] for r in per_rep]}


def interleaved_steps(examples, pad, teacher, cache, rounds: int, warmup: int) -> dict:
    """One training step of each variant per round, on the same batch, order rotated every round
    (load drift on the shared machine hits all three alike); timed by phase: forward (student),
    loss (CE; cache gather + sparse KD; teacher forward + dense KD), backward, optimizer (clip,
    AdamW, zero_grad) -- the work of one `training.train` step. Medians over rounds after warm-up."""
    settings = KDSettings("fkl")
    kd = {"cached": CachedTeacher(cache, VOCAB), "live": LiveTeacher(teacher, VOCAB)}
    students = {v: build_micro_model(STUDENT, VOCAB, seed=0) for v in VARIANTS}
    opts = {v: torch.optim.AdamW(m.parameters(), lr=3e-3) for v, m in students.items()}
    phases = ("forward", "loss", "backward", "optimizer")
    acc = {v: {p: [] for p in (*phases, "step")} for v in VARIANTS}
    gather, it = [], batches(examples, pad, 7)
    for r in range(warmup + rounds):
        b = next(it)[0]
        labels = b["labels"][:, 1:]
        mask = labels != IGNORE
        for v in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            model, opt = students[v], opts[v]
            t0 = time.perf_counter()
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            t1 = time.perf_counter()
            if v == "sft":
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                       reduction="sum")
            else:
                loss = kd[v].kd_sum(logits[:, :-1, :VOCAB], b, mask, settings)
            t2 = time.perf_counter()
            (loss / int(mask.sum())).backward()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            if r >= warmup:
                for p, d in zip((*phases, "step"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    acc[v][p].append(d)
        if r >= warmup:
            g0 = time.perf_counter()
            kd["cached"].signal(b, mask, 0)
            gather.append(time.perf_counter() - g0)
    steps = {v: acc[v]["step"] for v in VARIANTS}
    return {
        "rounds": rounds,
        "median_s": {v: {p: statistics.median(x) for p, x in ph.items()} for v, ph in acc.items()},
        "cache_gather_s": statistics.median(gather),
        "cached_over_sft": statistics.median(c / s for c, s in zip(steps["cached"], steps["sft"])),
        "live_over_cached": statistics.median(lv / c for lv, c in zip(steps["live"], steps["cached"])),
    }


def rss_child(variant: str, work: Path, cache_path: str, steps: int) -> None:
    """Run in a fresh process: load what the variant needs (the teacher for live, the cache for
    cached), train `steps` steps, and print RSS before training and its peak while training
    (psutil sampled every 2 ms), plus the process's lifetime peak (getrusage)."""
    torch.set_num_threads(1)
    tok, examples, teacher = prepare(work, 0, 0, load_teacher=variant == "live")
    cache = cache_shards.open_cache(cache_path) if variant == "cached" else None
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_steps(variant, examples, tok.pad_token_id, teacher, cache, steps)
    done.set()
    sampler.join()
    print(json.dumps({"variant": variant, "rss_before_training": before, "peak_rss_training": peak[0],
                      "training_delta": peak[0] - before,
                      "lifetime_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_memory(work: Path, cache_path: str, steps: int) -> dict:
    out = {}
    for v in VARIANTS:
        res = subprocess.run([sys.executable, __file__, "--rss-child", v, "--work", str(work), "--cache", cache_path,
                              "--steps", str(steps)], capture_output=True, text=True, check=True)
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def grid(examples, pad, teacher, tok, work: Path, students: int, temps: list[float], steps: int, reps: int) -> dict:
    """N students x M temperatures: one cache build + cached runs, vs live-teacher runs."""
    key = cache_keys.cache_key(work / "teacher", tok, examples, MAX_LENGTH, K)
    root = work / "grid_cache"
    walls = {"cached": [], "live": []}
    builds, passes = [], {}
    for rep in range(reps):
        for v in (("cached", "live") if rep % 2 == 0 else ("live", "cached")):
            t0 = time.perf_counter()
            if v == "cached":
                shutil.rmtree(root, ignore_errors=True)
                cache = cache_build.ensure_cache(teacher, examples, root, key, k=K, temperatures=temps, progress=False)
                builds.append(time.perf_counter() - t0)
                passes[v] = cache.forward_passes
                teachers = [CachedTeacher(cache, VOCAB)]
            else:
                teachers = [LiveTeacher(teacher, VOCAB)]
            for seed in range(students):
                for tau in temps:
                    obj = kd_objective(teachers[0], KDSettings("fkl", temperature=tau), VOCAB)
                    student = build_micro_model(STUDENT, VOCAB, seed=seed)
                    train(student, batches(examples, pad, seed), obj,
                          OptimSettings(max_steps=steps, lr=3e-3, warmup_steps=5, eval_every=10**6), progress=False)
            walls[v].append(time.perf_counter() - t0)
            if v == "live":
                passes[v] = teachers[0].forward_passes
            print(f"grid rep {rep} {v}: {walls[v][-1]:.1f} s", flush=True)
    med = {v: statistics.median(w) for v, w in walls.items()}
    return {"students": students, "temperatures": temps, "steps_per_run": steps, "wall_s": walls,
            "median_wall_s": med, "live_over_cached": med["live"] / med["cached"],
            "cache_build_s": statistics.median(builds), "teacher_forward_passes": passes}


def fidelity(examples, pad, teacher, caches: dict, trained_steps: int) -> dict:
    """Relative error (sparse - dense) / dense of the KD loss, for a fresh and an SFT-trained student."""
    b = collate(examples[:: max(1, len(examples) // 64)][:64], pad)
    mask = b["labels"][:, 1:] != IGNORE
    live = LiveTeacher(teacher, VOCAB)
    fresh = build_micro_model(STUDENT, VOCAB, seed=11)
    trained = build_micro_model(STUDENT, VOCAB, seed=11)
    train(trained, batches(examples, pad, 11), token_ce,
          OptimSettings(max_steps=trained_steps, lr=3e-3, warmup_steps=10, eval_every=10**6), progress=False)
    with torch.no_grad():
        p = F.softmax(live.logits(b)[:, :-1][mask], -1)
    out = {"teacher_tail_mass": {k: float(1 - p.topk(k, -1).values.sum(-1).mean()) for k in caches},
           "teacher_top1_mass": float(p.max(-1).values.mean()), "positions": int(mask.sum()), "rel_error": {}}
    for name, student in (("fresh", fresh), (f"sft_{trained_steps}_steps", trained)):
        with torch.no_grad():
            logits = student.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        rows = {}
        for objective in ("fkl", "rkl", "gjsd"):
            for tau in (1.0, 2.0):
                s = KDSettings(objective, temperature=tau)
                dense = float(live.kd_sum(logits, b, mask, s))
                rows[f"{objective} tau={tau:g}"] = {
                    "dense_per_token": dense / int(mask.sum()),
                    **{f"k={k}": (float(CachedTeacher(c, VOCAB).kd_sum(logits, b, mask, s)) - dense) / dense
                       for k, c in caches.items()}}
        out["rel_error"][name] = rows
    return out


# --------------------------------------------------------------------------- report
def markdown(r: dict) -> str:
    it, lp, mem, g = r["interleaved"], r["train_loop"], r["peak_memory"], r["grid"]
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    ok = lambda v, target, ge: f"{'yes' if (v >= target if ge else v <= target) else 'NO'}"  # noqa: E731
    lines = [
        "# Teacher cache benchmark", "",
        f"{r['setup']['teacher']} teacher ({r['setup']['teacher_params']:,} params) -> {r['setup']['student']} student "
        f"({r['setup']['student_params']:,}), vocab {VOCAB}, batch {BATCH}, {r['setup']['examples']} examples "
        f"({r['setup']['target_tokens']} target tokens), fkl at tau=1, k={K}, {r['setup']['threads']} torch thread(s), "
        f"{r['setup']['machine']}.", "",
        "| metric | interleaved steps (primary) | whole train() runs | target | met |", "|---|---|---|---|---|",
        f"| cached KD step / SFT step | {it['cached_over_sft']:.2f} | {lp['cached_over_sft']:.2f} | <= 1.15 | "
        f"{ok(it['cached_over_sft'], 1.15, False)} |",
        f"| live KD step / cached KD step | {it['live_over_cached']:.2f} | {lp['live_over_cached']:.2f} | >= 1.8 | "
        f"{ok(it['live_over_cached'], 1.8, True)} |",
        f"| cache bytes per target token (k={K}, {len(r['cache']['temperatures'])} tau; 1 tau: "
        f"{r['cache']['bytes_per_token_one_tau']:.1f}) | {r['cache']['bytes_per_token']:.1f} | | <= 100 | "
        f"{ok(r['cache']['bytes_per_token'], 100, False)} |",
        f"| grid wall time live / cached ({g['students']} students x {len(g['temperatures'])} tau) | "
        f"{g['live_over_cached']:.2f} | | | |", "",
        f"Interleaved: {it['rounds']} rounds, one step of each variant per round on the same batch, order rotated; "
        f"median of per-round ratios. Train loop: {len(lp['per_rep_median_s'])} runs per variant, ratio of pooled "
        f"median step times (per-run ratios cached/sft {[round(x, 2) for x in lp['cached_over_sft_per_rep']]}, "
        f"live/cached {[round(x, 2) for x in lp['live_over_cached_per_rep']]}).", "",
        "## Step time by phase (interleaved, median ms)", "",
        "| variant | step | forward | loss (incl. teacher / gather) | backward | optimizer | train() step |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        lines.append(f"| {v} | " + " | ".join(ms(it["median_s"][v][p]) for p in
                                               ("step", "forward", "loss", "backward", "optimizer"))
                     + f" | {ms(lp['median_step_s'][v])} |")
    lines += ["", f"cache gather (positions + index + copy) per batch: {ms(it['cache_gather_s'])} ms; "
              f"cache build {r['cache']['build_s']:.2f} s, verified open {r['cache']['open_verified_s']:.3f} s."]
    lines += ["", "## Memory (RSS, MiB, one subprocess per variant)", "",
              "| variant | before training (setup loaded) | peak while training | training delta | process lifetime peak |",
              "|---|---|---|---|---|"]
    lines += [f"| {v} | {mb(mem[v]['rss_before_training'])} | {mb(mem[v]['peak_rss_training'])} | "
              f"{mb(mem[v]['training_delta'])} | {mb(mem[v]['lifetime_peak_rss'])} |" for v in VARIANTS]
    lines += ["", f"## Grid: {g['students']} students x temperatures {g['temperatures']}, {g['steps_per_run']} steps each",
              "", f"median wall: cached {g['median_wall_s']['cached']:.1f} s (incl. build {g['cache_build_s']:.1f} s), "
              f"live {g['median_wall_s']['live']:.1f} s; teacher forward passes: {g['teacher_forward_passes']}", "",
              "## Fidelity: relative error of the top-k loss vs the live full-vocabulary loss", "",
              f"teacher tail mass beyond top-k: {', '.join(f'k={k}: {v:.4f}' for k, v in r['fidelity']['teacher_tail_mass'].items())}; "
              f"mean top-1 mass {r['fidelity']['teacher_top1_mass']:.3f}", ""]
    ks = [k for k in r["fidelity"]["teacher_tail_mass"]]
    for student, rows in r["fidelity"]["rel_error"].items():
        lines += [f"student: {student}", "", "| objective | dense per token | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        lines += [f"| {name} | {row['dense_per_token']:.4f} | " + " | ".join(f"{row[f'k={k}']:+.2e}" for k in ks) + " |"
                  for name, row in rows.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/benchmarks")
    ap.add_argument("--work", default=None, help="data/tokenizer/teacher/cache folder (default <out>/teacher_cache_work)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=60, help="interleaved rounds (one step per variant each)")
    ap.add_argument("--reps", type=int, default=5, help="whole train() runs per variant")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--n-train", type=int, default=60, help="training items per micro task")
    ap.add_argument("--grid-steps", type=int, default=40)
    ap.add_argument("--rss-child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "teacher_cache_work"
    if args.rss_child:
        rss_child(args.rss_child, work, args.cache, args.steps)
        return
    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    tok, examples, teacher = prepare(work, args.teacher_steps, args.n_train)
    pad, temps = tok.pad_token_id, [1.0, 2.0]
    caches = {}
    for k in (4, 16, 64):
        key = cache_keys.cache_key(work / "teacher", tok, examples, MAX_LENGTH, k)
        caches[k] = cache_build.ensure_cache(teacher, examples, work / "caches", key, k=k, temperatures=temps, progress=False)
    cache = caches[K]
    n_pos = cache.n_positions
    result = {
        "setup": {"teacher": TEACHER, "student": STUDENT, "teacher_params": count_parameters(teacher),
                  "student_params": count_parameters(build_micro_model(STUDENT, VOCAB)), "examples": len(examples),
                  "target_tokens": n_pos, "threads": args.threads, "torch": torch.__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}"},
        "cache": {"k": K, "temperatures": temps, "bytes": cache.nbytes, "bytes_per_token": cache.nbytes / n_pos},
    }
    one_tau = cache_build.build_cache(teacher, examples, work / "caches", "one-tau", k=K, temperatures=(1.0,), progress=False)
    result["cache"]["bytes_per_token_one_tau"] = cache_shards.open_cache(one_tau).nbytes / n_pos
    t0 = time.perf_counter()
    cache_build.build_cache(teacher, examples, work / "caches", "timed", k=K, temperatures=temps, progress=False)
    result["cache"]["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache_shards.open_cache(cache.path)
    result["cache"]["open_verified_s"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1), flush=True)
    result["interleaved"] = interleaved_steps(examples, pad, teacher, cache, args.rounds, args.warmup)
    result["train_loop"] = loop_step_times(examples, pad, teacher, cache, args.reps, args.steps, args.warmup)
    result["peak_memory"] = peak_memory(work, str(cache.path), args.steps)
    result["grid"] = grid(examples, pad, teacher, tok, work, 2, temps, args.grid_steps, 2)
    result["fidelity"] = fidelity(examples, pad, teacher, caches, 150)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_cache.json").write_text(json.dumps(result, indent=1))
    (out / "teacher_cache.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
