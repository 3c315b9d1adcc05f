"""The memory budget of logits work: chunk sizes from ``memory.chunk_mb``, a check before compute,
and a row-wise map whose gradient is taken chunk by chunk.

Every place that materialises teacher or student logits (the teacher-cache build, the KD losses,
the live teacher, GKD's on-policy sampling, SeqKD generation, log-likelihood scoring) sizes its
chunks so that its float32 ``[rows, vocab]`` work fits the budget: ``rows = budget / (vocab * 4 *
copies)``, where ``copies`` is how many such tensors the step holds at once. A budget of None is the
device's default (:data:`DEFAULT_CHUNK_MB`). Results do not depend on the budget (up to float
summation order), only peak memory and speed do.

Off-the-shelf chunked losses were considered first: Liger-Kernel's fused/chunked distillation losses
(``LigerFusedLinearJSD``, ``LigerFusedLinearDistillationBase``) take the student's and a dense
teacher's hidden states and output heads, run as Triton kernels (GPU only) or torch.compile'd
chunks, and offer JSD/KL at one temperature; they fit neither a sparse cached teacher (top-k, logZ,
sampled tail) nor six objectives with masks, and the Triton ones do not run on CPU. Hence
:func:`row_map`, Liger's idea (gradients computed in the forward pass, one chunk at a time) in
plain torch for any row-wise function.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["DEFAULT_CHUNK_MB", "available_bytes", "budget_bytes", "check_fits", "decode_batch", "row_map",
           "rows_within"]

#: The budget (MB) when ``memory.chunk_mb`` is not set, by device type; others get the CPU's.
DEFAULT_CHUNK_MB = {"cpu": 1024, "cuda": 8192}
_MB = 2**20
#: [batch, V] float32 tensors one decoding step holds (logits, processed scores, probabilities).
_DECODE_COPIES = 4


def budget_bytes(chunk_mb: int | None, device: torch.device | str = "cpu") -> int:
    """The chunk budget in bytes: ``chunk_mb``, or the device type's default."""
    kind = torch.device(device).type
    return int(chunk_mb or DEFAULT_CHUNK_MB.get(kind, DEFAULT_CHUNK_MB["cpu"])) * _MB


def rows_within(budget: int, vocab: int, copies: float) -> int:
    """Rows of ``[rows, vocab]`` float32 work that fit ``budget`` bytes with ``copies`` such tensors
    alive at once (at least 1: one row is the floor)."""
    return max(1, int(budget // (vocab * 4 * copies)))


def decode_batch(model: torch.nn.Module, chunk_mb: int | None, cap: int) -> int:
    """Sequences per ``generate`` call: at most ``cap``, and no more than one decoding step's
    [batch, V] work fits the budget."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    return min(cap, rows_within(budget_bytes(chunk_mb, device), vocab, _DECODE_COPIES))


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory of the device: MemAvailable of /proc/meminfo on CPU, the free memory of a CUDA
    device; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(need: int, device: torch.device | str, what: str) -> None:
    """Raise MemoryError, before any compute, when ``need`` bytes (the estimate of the largest
    chunk) exceed the device's available memory."""
    free = available_bytes(device)
    if free is not None and need > free:
        raise MemoryError(f"{what} needs about {need / _MB:,.0f} MB for its largest chunk, more than the "
                          f"{free / _MB:,.0f} MB available on {torch.device(device).type}: lower memory.chunk_mb "
                          "in the params (or shorten training.max_length when one example alone is too large)")


class _RowMap(torch.autograd.Function):
    """``fn`` on chunks of selected rows; the per-row gradients are taken in the forward pass, chunk
    by chunk, so no chunk's intermediates outlive it. Valid because each output row depends only on
    its own input rows: the vector-Jacobian product is then ``grad_out[r] * d out[r] / d x[r]``."""

    @staticmethod
    def forward(ctx, fn, index, chunk, lead, *tensors):
        wants = [bool(need) and t.is_floating_point() for t, need in zip(tensors, ctx.needs_input_grad[4:])]
        grads = [torch.zeros_like(t) if w else None for t, w in zip(tensors, wants)]
        out = []
        for rows in index.split(chunk):
            at = torch.unravel_index(rows, lead)
            with torch.enable_grad():
                part = [t[at].detach().requires_grad_(w) for t, w in zip(tensors, wants)]
                vals = fn(*part)
                wrt = [p for p, w in zip(part, wants) if w]
                for g, d in zip([g for g in grads if g is not None], torch.autograd.grad(vals.sum(), wrt)):
                    g[at] = d.to(g.dtype)
            out.append(vals.detach())
        ctx.wants, ctx.lead = wants, lead
        ctx.save_for_backward(index, *[g for g in grads if g is not None])
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        index, *grads = ctx.saved_tensors
        scale = grad_out.new_zeros(ctx.lead)
        scale[torch.unravel_index(index, ctx.lead)] = grad_out
        given, out = iter(grads), []
        for wanted in ctx.wants:
            g = next(given) if wanted else None
            out.append(None if g is None else g * scale.view(*ctx.lead, *[1] * (g.dim() - len(ctx.lead))).to(g.dtype))
        return (None, None, None, None, *out)


def row_map(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], index: torch.Tensor, chunk: int,
            lead: int = 1) -> torch.Tensor:
    """``fn`` on the rows ``index`` (flat positions over the first ``lead`` dims, which all tensors
    share) of ``tensors``, ``chunk`` rows at a time: one value per row, ``[len(index)]``. Only the
    selected rows are copied (a view such as ``logits[:, :-1]`` is never flattened into a copy).
    ``fn`` must be row-wise: output row r depends only on row r of each input. With autograd the
    gradients of the float inputs that require grad are accumulated chunk by chunk during the forward
    pass (peak: one chunk's graph plus one gradient per input); only first-order gradients."""
    shape = tuple(tensors[0].shape[:lead])
    if len(index) and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _RowMap.apply(fn, index, chunk, shape, *tensors)
    parts = []
    for rows in index.split(chunk) if len(index) else [index]:  # no rows: fn on empty rows (0 values)
        at = torch.unravel_index(rows, shape)
        parts.append(fn(*[t[at] for t in tensors]))
    return torch.cat(parts)
