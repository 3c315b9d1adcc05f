"""Benchmark: this project's evaluator against lm-evaluation-harness on one multiple-choice
task (same model, same local data through a custom task, same log-likelihood scoring of each
option's content, `tasks.loglik_requests`), and generation throughput at batch 1 and 32.
bench_loglik.py does the same with a real LM on real items, through lm-eval's own task files.

    .venv/bin/python tests/benchmarks/bench_eval.py --out outputs/benchmarks [--model DIR --data-root DIR]

Without --model it builds a small micro world and trains a micro-s for a few hundred steps
with a standard byte-level BPE (merges stop at spaces): the project's micro tokenizer merges
across spaces, so "...answer is" + " true" has no token boundary at the continuation and
log-likelihood scoring (ours and lm-eval's alike) is ill-defined for it. Writes
`<out>/eval.json` and `<out>/eval.md`. Needs `lm-eval` (requirements-bench.txt).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from kd_utils.evaluation import evaluate, generate, load_predictions
from kd_utils.models import load_model
from kd_utils.tasks import build_prompt, get_task, item_options, load_items, loglik_requests

REPO = Path(__file__).resolve().parents[2]


def small_model(root: Path) -> tuple[str, str]:
    """A micro-s trained briefly on a small world, with a standard byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kd_utils.config import DistillJob, PretrainConfig, TrainingConfig, WorldConfig
    from kd_utils.distill import run_distillation
    from kd_utils.prepare import build_world, pretrain_micro

    world = root / "world"
    build_world(WorldConfig(n_train=400, n_test=200, corpus_lines=5000), world)
    texts = (world / "corpus.txt").read_text().splitlines()
    for task in ("micro_boolq", "micro_piqa", "micro_winogrande"):
        texts += [build_prompt(it["instruction"]) + it["output"] for it in load_items(task, world / "data", "train")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(
        world / "tokenizer")
    pretrain_micro("micro-s", world, PretrainConfig(), 200, root / "base", progress=False)
    job = DistillJob(student="micro-s", student_path=str(root / "base" / "model"), steps=600,
                     training=TrainingConfig(steps=600, lr=3e-3, batch_size=32, max_length=160, n_val=100,
                                             train_tasks=["micro_boolq", "micro_piqa", "micro_winogrande"]),
                     data_root=str(world / "data"))
    run_distillation(job, root / "sft", progress=False)
    return str(root / "sft" / "model"), str(world / "data")


def lm_eval_run(model, tokenizer, task_name: str, data_root: str, limit: int, batch_size: int, work: Path) -> dict:
    """The same items through lm-evaluation-harness as a custom multiple_choice task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task = get_task(task_name)
    items = load_items(task, data_root, limit=limit)
    docs = work / "docs.jsonl"
    with docs.open("w") as f:
        for it in items:
            requests = loglik_requests(task, it)  # (context, " " + choice): lm-eval's default target_delimiter
            f.write(json.dumps({"context": requests[0].context, "choices": [r.choice for r in requests],
                                "gold": item_options(task, it).index(it["answer"])}) + "\n")
    (work / "task.yaml").write_text(
        f"task: bench_{task_name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        'doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"bench_{task_name}"], task_manager=TaskManager(include_path=str(work)),
                                  log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    res = out["results"][f"bench_{task_name}"]
    samples = sorted(out["samples"][f"bench_{task_name}"], key=lambda s: s["doc_id"])
    preds = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    return {"acc": 100 * res["acc,none"], "acc_norm": 100 * res["acc_norm,none"], "seconds": seconds,
            "items_per_s": len(items) / seconds, "preds": preds}


def ours(model, tokenizer, task_name: str, data_root: str, limit: int, batch_size: int, work: Path) -> dict:
    t0 = time.perf_counter()
    acc = evaluate(model, tokenizer, [task_name], data_root=data_root, limit=limit, batch_size=batch_size,
                   scorer="loglik", progress=False, out_dir=work / "ours")
    seconds = time.perf_counter() - t0
    norm = evaluate(model, tokenizer, [task_name], data_root=data_root, limit=limit, batch_size=batch_size,
                    scorer="loglik_norm", progress=False)
    preds = load_predictions(work / "ours")
    options = [list(item_options(get_task(task_name), it)) for it in load_items(task_name, data_root, limit=limit)]
    idx = [o.index(e) for o, e in zip(options, preds["extracted"])]
    return {"acc": float(acc["accuracy"].iloc[0]), "acc_norm": float(norm["accuracy"].iloc[0]), "seconds": seconds,
            "items_per_s": int(acc["n"].iloc[0]) / seconds, "preds": idx}


def scoring_speed(model, tokenizer, task_name: str, data_root: str, limit: int, batch_size: int) -> dict:
    """Requests/s of the log-likelihood computation alone, on the same (context, option) pairs:
    kd_utils.evaluation.loglik_choice vs lm-eval's HFLM.loglikelihood (no task setup in either)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from kd_utils.evaluation import loglik_choice

    requests = [[(r.context, r.continuation) for r in loglik_requests(task_name, it)]
                for it in load_items(task_name, data_root, limit=limit)]
    n = sum(len(r) for r in requests)
    t0 = time.perf_counter()
    loglik_choice(model, tokenizer, requests, batch_size=batch_size, progress=False)
    ours_s = time.perf_counter() - t0
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                 for item in requests for i, pair in enumerate(item)]
    t0 = time.perf_counter()
    lm.loglikelihood(instances, disable_tqdm=True)
    theirs_s = time.perf_counter() - t0
    return {"requests": n, "ours_requests_per_s": n / ours_s, "lm_eval_requests_per_s": n / theirs_s}


def generation_speed(model, tokenizer, data_root: str, task_name: str, n: int = 64, new_tokens: int = 32) -> dict:
    prompts = [build_prompt(it["instruction"]) for it in load_items(task_name, data_root, limit=n)]
    out = {}
    for bs in (1, 32):
        t0 = time.perf_counter()
        texts = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=bs, progress=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + eos
        out[f"batch_{bs}"] = {"prompts": n, "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/benchmarks")
    ap.add_argument("--model", default="")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--task", default="micro_boolq")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path, data_root = (args.model, args.data_root) if args.model else small_model(work / "small")
        model, tokenizer = load_model(path, device=torch.device("cpu"))
        # alternate the two evaluators, twice each, and keep the faster run of each
        runs = {"ours": [], "lm_eval": []}
        for _ in range(2):
            runs["ours"].append(ours(model, tokenizer, args.task, data_root, args.limit, args.batch_size, work))
            runs["lm_eval"].append(lm_eval_run(model, tokenizer, args.task, data_root, args.limit, args.batch_size,
                                               work))
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
        agree = sum(a == b for a, b in zip(best["ours"]["preds"], best["lm_eval"]["preds"])) / len(best["ours"]["preds"])
        speed = generation_speed(model, tokenizer, data_root, args.task)
        scoring = [scoring_speed(model, tokenizer, args.task, data_root, args.limit, args.batch_size) for _ in range(3)]
    params = sum(p.numel() for p in model.parameters())
    result = {"model": path, "params": params, "task": args.task, "items": len(best["ours"]["preds"]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, Python {platform.python_version()}",
              "ours": {k: v for k, v in best["ours"].items() if k != "preds"},
              "lm_eval": {k: v for k, v in best["lm_eval"].items() if k != "preds"},
              "per_item_agreement": agree, "speed_ratio_ours_over_lm_eval": best["ours"]["items_per_s"] / best["lm_eval"]["items_per_s"],
              "scoring_only": scoring, "generation": speed}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    o, l = result["ours"], result["lm_eval"]
    md = [f"# Evaluator benchmark\n\n{args.task}, {result['items']} items, log-likelihood scoring, model {params:,} "
          f"parameters, batch {args.batch_size}, {result['machine']}.\n",
          "| evaluator | acc | acc_norm | items/s |", "|---|---|---|---|",
          f"| kd_utils.evaluation | {o['acc']:.2f} | {o['acc_norm']:.2f} | {o['items_per_s']:.1f} |",
          f"| lm-evaluation-harness | {l['acc']:.2f} | {l['acc_norm']:.2f} | {l['items_per_s']:.1f} |",
          f"\nPer-item agreement of the predicted option: {100 * agree:.1f}%. End-to-end speed ratio (ours / "
          f"lm-eval, each call including data loading; lm-eval's includes building its task): "
          f"{result['speed_ratio_ours_over_lm_eval']:.2f}.\n",
          "Scoring alone (the same (context, option) pairs, no task setup), 3 alternating runs, requests/s: "
          + "; ".join(f"ours {r['ours_requests_per_s']:.0f} vs lm-eval {r['lm_eval_requests_per_s']:.0f}" for r in scoring)
          + ".\n",
          "| generation | prompts | new tokens | seconds | tokens/s |", "|---|---|---|---|---|"]
    md += [f"| {k.replace('_', ' ')} | {v['prompts']} | {v['generated_tokens']} | {v['seconds']:.2f} | {v['tokens_per_s']:.0f} |"
           for k, v in speed.items()]
    (out / "eval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
