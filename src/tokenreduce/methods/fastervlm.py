"""FasterVLM — [CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster (Zhang et al., 2024, arXiv 2412.01818).

The vision tower's [CLS] token already knows which patches matter, better than the language
model's text-to-image attention. FasterVLM takes the [CLS] row of the attention at the tower's
select layer (the block whose output the projector reads, LLaVA's ``vision_feature_layer`` = -2),
averages it over heads, and keeps each image's top ``T`` patch tokens after the projector; the
rest never enter the language model. Attached at the connector stage (`runtime.connector`),
which takes the [CLS] row from Q and K on the tower's own attention call (no eager switch).

Differences from the reference code (Theia-4869/FasterVLM, ``clip_encoder.feature_select`` and
``llava_arch.encode_images``):

* Positions: the reference re-indexes the kept tokens (the shorter prompt is numbered from 0);
  we keep each kept token's original position by default, so every distance to the question is
  the full model's. ``renumber=True`` gives the reference's numbering, end-aligned (a constant
  shift of the reference's, as GemFilter, so ``generate`` continues right).
* Budget: the reference keeps ``round(N (1 - R))``; ours is every connector method's
  ``floor(keep_ratio N)`` (at least 1), or ``keep_count``.
* Batches: the reference is batched over images of one size; we plan per image and left-pad
  samples whose prompts end with different lengths.
* Towers without [CLS] (SigLIP: LLaVA-OneVision, and the Qwen, Idefics3, SmolVLM, Gemma 3 towers) are
  refused with the methods that need none.
"""

from __future__ import annotations

from ..core.budget import check_keep_count, check_keep_ratio
from ..core.method import ConnectorMethod, VisualContext
from ..core.params import check_bool
from ..core.reduction import Reduction
from ..core.registry import register


@register
class FasterVLM(ConnectorMethod):
    name = "fastervlm"
    paper = ("[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster "
             "(Zhang et al., 2024)")
    arxiv = "2412.01818"
    needs_cls = True

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, renumber: bool = False):
        keep_ratio = check_keep_ratio(self.name, keep_ratio)
        keep_count = check_keep_count(self.name, keep_count)
        super().__init__(keep_ratio, keep_count)
        self.renumber = check_bool(self.name, "renumber", renumber, why="True = the reference's renumbered positions")

    def plan(self, ctx: VisualContext) -> Reduction:
        n = ctx.features.shape[0]
        score = ctx.cls_attention.float().mean(0)  # [n]: the [CLS] row, mean over heads
        keep = score.topk(ctx.budget).indices.sort().values
        return Reduction.keep(keep[None], n)

    def scoring_flops(self, n: int, ctx: VisualContext) -> float:
        h, d = ctx.tower_keys.shape[0], ctx.tower_keys.shape[-1]
        return 2.0 * h * (n + 1) * d  # the [CLS] row: one query against every key
