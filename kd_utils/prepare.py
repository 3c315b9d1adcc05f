"""The prepare stage of the micro-study: the world (tasks, corpus, tokenizer) and the
pretrained base models. Real-model studies skip it: their models come from the hub or disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import microworld
from .config import PretrainConfig, WorldConfig
from .data import collate_blocks, epoch_batches, pack_corpus
from .models import build_micro_model, count_parameters, load_tokenizer
from .contamination import overlap_table, refuse_above
from .tasks import build_prompt, load_items, resolve_tasks
from .tokenization import train_bpe_tokenizer
from .training import OptimSettings, cycle_steps, token_ce, train


def build_world(world: WorldConfig, out_dir: str | Path) -> dict:
    """Write `data/<task>/{train,test}.json`, `corpus.txt` and `tokenizer/` under out_dir."""
    out = Path(out_dir)
    tasks = resolve_tasks(world.task_groups())
    counts = microworld.write_world(out / "data", world.n_train, world.n_test, world.seed, [t.name for t in tasks])
    corpus = microworld.generic_corpus(world.corpus_lines, world.seed)
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    texts = list(corpus)
    for task in tasks:
        for item in json.loads((out / "data" / task.name / "train.json").read_text()):
            texts.append(build_prompt(item["instruction"], item.get("input", "")) + item["output"])
    tokenizer = train_bpe_tokenizer(texts, world.vocab_size, out / "tokenizer")
    lengths = [len(ids) for ids in tokenizer(texts[len(corpus):], add_special_tokens=False)["input_ids"]]
    overlap = overlap_table([it for t in tasks for it in load_items(t, out / "data", split="train")],
                            {t.name: load_items(t, out / "data") for t in tasks})
    refuse_above(overlap, 0.0, False, "of the micro world")
    return {"tasks": counts, "corpus_lines": len(corpus), "vocab_size": len(tokenizer),
            "task_tokens_mean": sum(lengths) / len(lengths), "task_tokens_max": max(lengths),
            "contamination": overlap.to_dict(orient="records")}


def pretrain_micro(size: str, world_dir: str | Path, cfg: PretrainConfig, steps: int, out_dir: str | Path,
                   seed: int = 0, progress: bool = True) -> dict:
    """Pretrain a micro model from random init on the generic corpus; save it (and the
    tokenizer) to `<out_dir>/model` with `save_pretrained`."""
    world_dir, out = Path(world_dir), Path(out_dir)
    tokenizer = load_tokenizer(world_dir / "tokenizer")
    model = build_micro_model(size, len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    blocks = pack_corpus(tokenizer, (world_dir / "corpus.txt").read_text().splitlines(), cfg.block)

    def epoch(e: int):
        for idx in epoch_batches(len(blocks), cfg.batch_size, seed, e):
            yield [collate_blocks(blocks[idx])]

    torch.manual_seed(seed)
    result = train(model, cycle_steps(epoch), token_ce,
                   OptimSettings(max_steps=steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                 eval_every=max(steps, 1)),
                   progress=progress, desc=f"pretrain {size}")
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"model": size, "params": count_parameters(model), "steps": steps,
            "final_loss": result.history[-1]["loss"], "seconds": result.seconds,
            "tokens": result.target_tokens, "history": result.history}


def sample_items(data_root: str | Path, split: str = "test"):
    """The first item of every micro task: instruction and reference output (for the report)."""
    import pandas as pd

    rows = []
    for task in resolve_tasks("micro"):
        item = json.loads((Path(data_root) / task.name / f"{split}.json").read_text())[0]
        rows.append({"task": task.name, "instruction": item["instruction"], "output": item["output"]})
    return pd.DataFrame(rows).set_index("task")
