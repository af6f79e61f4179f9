"""VisionZip — Longer is Better but Not Necessary in Vision Language Models (Yang et al., 2024,
arXiv 2412.04467).

Few visual tokens carry most of the [CLS] attention; keep those ("dominant") and fold the rest
into a few "contextual" tokens so their content is not lost. Per image, at the tower's select
layer:

1. dominant: the ``d`` tokens with the largest [CLS] attention summed over heads;
2. contextual: the remaining ``R`` tokens, in order, are compared by their keys at that layer
   (mean over heads, L2-normalised); ``c`` targets are taken at a uniform stride
   (``step = max(1, R // c)``, the first ``c`` of ``0, step, 2 step, ...``), every other remaining
   token joins the target it is most similar to (cosine), and each contextual token is the plain
   mean of its target and the tokens that joined it.

The budget splits as the reference's defaults (54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192):
``c = round(contextual_fraction * k)`` (at least 1 when ``k >= 2``), ``d = k - c``. Attached at the
connector stage (`runtime.connector`), which takes the [CLS] row and the keys from the tower's own
attention call (Q and K only; SDPA stays SDPA).

Differences from the reference code (dvlab-research/VisionZip, ``clip_encoder.feature_select``):

* Where: the reference selects and merges the tower's features *before* the projector and keeps
  the [CLS] token as the first dominant token (so the prompt holds ``d`` dominant tokens including
  [CLS]); we select and merge the *projected* features of the prompt's patch tokens (the
  connector stage works where the language model's input is, and LLaVA's default strategy leaves
  no [CLS] placeholder in the prompt), so all ``d`` dominant tokens are patches and a contextual
  token is the mean of projected features, not the projection of the mean.
* Order and positions: the reference outputs dominant tokens then contextual tokens and
  re-indexes them; we keep every output in the order of its earliest source and at that source's
  position (``renumber=True``: end-aligned renumbering, as GemFilter).
* Batches: per image, samples left-padded; the reference is batched over same-size images.
"""

from __future__ import annotations

import torch

from ..core.budget import check_keep_count, check_keep_ratio
from ..core.method import ConnectorMethod, VisualContext
from ..core.params import check_bool, check_float
from ..core.reduction import Reduction
from ..core.registry import register


def split_budget(k: int, contextual_fraction: float) -> tuple[int, int]:
    """(dominant, contextual) tokens of a budget of ``k``."""
    c = 0 if k < 2 else min(k - 1, max(1, round(contextual_fraction * k)))
    return k - c, c


@register
class VisionZip(ConnectorMethod):
    name = "visionzip"
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (Yang et al., 2024)"
    arxiv = "2412.04467"
    needs_cls = True

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None,
                 contextual_fraction: float = 10 / 64, renumber: bool = False):
        keep_ratio = check_keep_ratio(self.name, keep_ratio)
        keep_count = check_keep_count(self.name, keep_count)
        super().__init__(keep_ratio, keep_count)
        self.contextual_fraction = check_float(self.name, "contextual_fraction", contextual_fraction, min=0.0,
                                               max=1.0, max_open=True, why="the share of the budget merged (10/64)")
        self.renumber = check_bool(self.name, "renumber", renumber, why="True = the reference's renumbered positions")

    def plan(self, ctx: VisualContext) -> Reduction:
        n = ctx.features.shape[0]
        dev = ctx.features.device
        d, c = split_budget(ctx.budget, self.contextual_fraction)
        if d + c >= n:
            return Reduction.identity(1, n, device=dev)
        score = ctx.cls_attention.float().sum(0)  # [n], summed over heads
        dominant = score.topk(d).indices.sort().values
        rest = torch.ones(n, dtype=torch.bool, device=dev)
        rest[dominant] = False
        rest_idx = rest.nonzero().flatten()  # ascending
        dest = torch.full((n,), -1, dtype=torch.long, device=dev)
        dest[dominant] = torch.arange(d, device=dev)
        if c > 0:
            metric = ctx.tower_keys.float().mean(0)[rest_idx]
            metric = metric / metric.norm(dim=-1, keepdim=True)
            r = rest_idx.numel()
            step = max(1, r // c)
            targets = torch.arange(0, r, step, device=dev)[:c]
            c = targets.numel()
            is_target = torch.zeros(r, dtype=torch.bool, device=dev)
            is_target[targets] = True
            others = (~is_target).nonzero().flatten()
            nearest = (metric[others] @ metric[targets].T).argmax(-1)
            group = torch.empty(r, dtype=torch.long, device=dev)
            group[targets] = torch.arange(c, device=dev)
            group[others] = nearest
            dest[rest_idx] = d + group
        return Reduction.merge(dest[None], d + c, torch.ones(1, n, device=dev))

    def scoring_flops(self, n: int, ctx: VisualContext) -> float:
        h, dk = ctx.tower_keys.shape[0], ctx.tower_keys.shape[-1]
        d, c = split_budget(ctx.budget, self.contextual_fraction)
        return 2.0 * h * (n + 1) * dk + 2.0 * (n - d) * c * dk  # the [CLS] row; cosine to the targets
