"""Benchmark: peak resident memory of logits work at real vocabularies, chunked and unchunked (CPU).

    .venv/bin/python tests/benchmarks/bench_memory.py --out outputs/benchmarks

Tiny random models of the real architectures with their vocabularies: Llama (32,000, Llama 2),
Qwen2 (152,064, Qwen2.5) and Gemma 3 (262,144); hidden size 64, 2 layers, so the logits dominate
memory as they do at scale. Examples: a 128-token prompt (half the sequence when shorter) and a response filling the sequence
(256 tokens unless said), random token ids. One thread.

Cases, each in a fresh subprocess (peak = its ru_maxrss, so no case sees another's allocations):
* cache build: ``build_cache`` (k 16, 16 tail samples, temperatures 1 and 2) over 2 examples; at
  262k also 128 and 512 tokens (growth with length) and 8 examples (growth with data);
* cached KD step: student forward, ``sparse_kd_loss`` (fkl, tau 2) from a prebuilt cache, backward;
* live KD step: student forward, the live teacher's forward and ``kd_loss``, backward;
  one example of 256 tokens.
"Chunked" is the default CPU budget (``memory.chunk_mb`` unset: 1024 MB); "unchunked" a budget
large enough for one chunk (the behaviour before chunking). Time: one build after a warm-up build
(the 8-example build: one, no warm-up), the median of 3 KD steps after a warm-up step, in the same
process, so the ratio chunked / unchunked is the speed cost of chunking on this machine. Writes ``<out>/memory.json`` and ``<out>/memory.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ARCHS = {"llama": 32_000, "qwen2": 152_064, "gemma3": 262_144}
UNCHUNKED_MB = 1 << 20  # one chunk whatever the shape
PROMPT, K, SAMPLES, TEMPS = 128, 16, 16, (1.0, 2.0)


def tiny_model(arch: str, seed: int):
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=ARCHS[arch], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    config, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                   "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    return cls(config(**common, **({"head_dim": 32} if arch == "gemma3" else {}))).eval()


def make_examples(vocab: int, n: int, length: int):
    import torch

    from kd_utils.data import Example

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=g).tolist()
    prompt = min(PROMPT, length // 2)  # a 128-token sequence: half prompt, half response
    return [Example(tuple(row[:prompt]), tuple(row[prompt:]), i, False) for i, row in enumerate(ids)]


def timed(fn, reps: int = 3, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(case: dict) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from kd_utils import cache_build, cache_shards, teachers
    from kd_utils.data import collate
    from kd_utils.methods import KDSettings, LiveTeacher, kd_objective

    torch.set_num_threads(1)
    vocab = ARCHS[case["arch"]]
    chunk_mb = None if case["chunked"] else UNCHUNKED_MB
    teacher = tiny_model(case["arch"], 0)
    examples = make_examples(vocab, case["examples"], case["length"])
    if case["kind"] in ("prepare", "cache"):
        out = Path(case["dir"])

        def build():
            cache_build.build_cache(teacher, examples, out, case["key"], k=K, temperatures=TEMPS, samples=SAMPLES,
                           progress=False, chunk_mb=chunk_mb)
        if case["kind"] == "prepare":  # the cache a cached step reads
            build()
        seconds = timed(build, reps=1, warm_up=case["examples"] <= 2) if case["kind"] == "cache" else 0.0
    else:
        student = tiny_model(case["arch"], 1).train()
        batch = collate(examples, 0)
        settings = KDSettings("fkl", temperature=2.0)
        if case["kind"] == "cached step":
            cache = cache_shards.open_cache(Path(case["dir"]) / case["key"])
            signal = teachers.CachedTeacher(cache, vocab, chunk_mb=chunk_mb)
        else:
            signal = LiveTeacher(teacher, vocab, chunk_mb=chunk_mb)
        objective = kd_objective(signal, settings, vocab)

        def step():
            student.zero_grad(set_to_none=True)
            loss, _ = objective(student, batch)
            loss.backward()
        seconds = timed(step)
    return {**case, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds}


def measure(case: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cases():
    for arch in ARCHS:
        for chunked in (True, False):
            yield {"kind": "cache", "arch": arch, "length": 256, "examples": 2, "chunked": chunked}
    for length in (128, 512):
        for chunked in (True, False) if length == 128 else (True,):  # unchunked at 512 would pass 4 GB
            yield {"kind": "cache", "arch": "gemma3", "length": length, "examples": 2, "chunked": chunked}
    yield {"kind": "cache", "arch": "gemma3", "length": 256, "examples": 8, "chunked": True}
    for arch in ARCHS:
        yield {"kind": "prepare", "arch": arch, "length": 256, "examples": 1, "chunked": True}
        for kind in ("cached step", "live step"):
            for chunked in (True, False):
                yield {"kind": kind, "arch": arch, "length": 256, "examples": 1, "chunked": chunked}


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def table(results: list[dict]) -> str:
    """Markdown: one row per case, the chunked and unchunked peak and time side by side."""
    rows = {}
    for r in results:
        if r["kind"] == "prepare":
            continue
        key = (r["kind"], r["arch"], ARCHS[r["arch"]], r["examples"], r["length"])
        rows.setdefault(key, {})["chunked" if r["chunked"] else "unchunked"] = r
    lines = ["| what | arch | vocab | examples x tokens | peak RSS chunked (MB) | peak RSS unchunked (MB) "
             "| time chunked (s) | time unchunked (s) | time ratio |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (kind, arch, vocab, n, length), pair in rows.items():
        c, u = pair.get("chunked"), pair.get("unchunked")
        fmt = lambda r, f, spec: format(r[f], spec) if r else "-"  # noqa: E731
        ratio = f"{c['seconds'] / u['seconds']:.2f}" if c and u else "-"
        lines.append(f"| {kind} | {arch} | {vocab:,} | {n} x {length} | {fmt(c, 'peak_mb', ',.0f')} | "
                     f"{fmt(u, 'peak_mb', ',.0f')} | {fmt(c, 'seconds', '.2f')} | {fmt(u, 'seconds', '.2f')} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/benchmarks")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases():
            case = {**case, "dir": tmp, "key": f"{case['arch']}-{case['examples']}x{case['length']}"}
            r = measure(case)
            print(f"{r['kind']:12s} {r['arch']:7s} {r['examples']:3d} x {r['length']:4d} "
                  f"{'chunked' if r['chunked'] else 'unchunked':9s} peak {r['peak_mb']:8,.0f} MB  {r['seconds']:.2f} s",
                  flush=True)
            results.append({k: v for k, v in r.items() if k not in ("dir", "key")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date.today().isoformat(), "cpu": cpu_model(), "threads": 1,
            "default_chunk_mb": 1024, "unchunked_chunk_mb": UNCHUNKED_MB}
    (out / "memory.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    md = (f"Peak resident memory of logits work ({meta['date']}, {meta['cpu']}, one thread; chunked = the default "
          f"CPU budget of 1024 MB):\n\n{table(results)}\n")
    (out / "memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
