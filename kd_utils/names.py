"""The declarations the study's modules share, torch-free, so that validating params imports no
torch: the KD objectives (kd_utils.losses.OBJECTIVES implements exactly these), the training
methods, and the micro model family's shapes (kd_utils.models builds them)."""
from __future__ import annotations

from dataclasses import dataclass

#: Token-level KD objectives, one per entry of the losses registry, in its order.
WORD_LEVEL = ("fkl", "rkl", "gjsd", "skew_fkl", "skew_rkl", "tvd")
#: Every `method` of a run: the SFT baseline, sequence-level KD, on-policy GKD and the token-level objectives.
METHODS = ("sft", "seqkd", "gkd") + WORD_LEVEL
#: The order methods are shown in: the token-level objectives, then sequence-level and on-policy KD.
METHOD_ORDER = WORD_LEVEL + ("seqkd", "gkd")


@dataclass(frozen=True)
class MicroSize:
    """Shape of one member of the micro Qwen2 family."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int


MICRO_SIZES: dict[str, MicroSize] = {
    "micro-xs": MicroSize(hidden=32, layers=2, heads=4, kv_heads=2, ffn=96),
    "micro-s": MicroSize(hidden=64, layers=2, heads=4, kv_heads=2, ffn=192),
    "micro-m": MicroSize(hidden=96, layers=4, heads=4, kv_heads=2, ffn=288),
    "micro-l": MicroSize(hidden=128, layers=4, heads=4, kv_heads=2, ffn=384),
}
