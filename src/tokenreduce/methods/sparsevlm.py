"""SparseVLM — Visual Token Sparsification for Efficient Vision-Language Model Inference (Zhang et al., ICML 2025,
arXiv 2410.04417).

Not every text token should judge the image: SparseVLM picks "raters", the text tokens most
related to the visual tokens, and lets only them score the visual tokens, at a few layers, with
the language model's own attention. Per sample:

1. raters (once, on the language model's input embeddings): for the text tokens after the image,
   ``m = mean over visual tokens of softmax over text tokens of (v . t)``; raters are the text
   tokens with ``m`` strictly above the mean of ``m``;
2. after each pruning layer ``l`` (the reference: 2, 6, 15 of 32), from layer ``l``'s attention
   probabilities: the score of each visual token is its attention from the raters, mean over heads
   and raters (``version="v2"``: the probabilities first divided by the RoPE-only logits of the
   positions, "gravity correction", and only the top heads, by their rater-to-visual mass, averaged);
3. keep the top ``k`` visual tokens (``k`` from a fixed table per target, at most all but one), in order;
4. recycle (``version="v1.5"``): the top 30 % (+1) of the dropped tokens by score are clustered by
   DPC-kNN on their hidden states into ``n/10 + 1`` groups; each group's mean is one more token.

Budget: ``target`` natively (192, 128, 96 or 64: the reference's tables of per-stage counts for
LLaVA-1.5's 576 visual tokens, used here as fractions of the visual tokens a prompt has), or
``keep_ratio`` = the fraction of visual tokens kept averaged over the layers (the table of the
nearest target, its three fractions scaled by one factor to meet it), or ``schedule``. Recycled
tokens come on top of the count, as in the reference (whose tables count them in their average);
the stats report what each layer held.

Versions. The reference repository (Gumpest/SparseVLMs) holds three: v1 (Oct 2024, counts from the
rank of the rater attention, four pruning layers), v1.5 (tag ``v1.5``; the default of ``main``:
fixed tables, recycling) and v2 (``main`` with ``USE_VERSION=2_0``: its own tables, gravity
correction, the top 14 of 32 heads, no recycling, positions preserved). ``version`` picks v1.5
(default) or v2; ``recycle`` and ``top_heads`` override a version's choice. v1's rank-adaptive
counts are not implemented.

Differences from the reference code (@ b9619e6 for v1.5, @ 26a5f48 for v2):

* Where: the reference runs pruning layer ``l`` on every token and reduces its output; here layer
  ``l + 1``'s pre-hook reduces its input (the same tensor), scoring with layer ``l``'s attention call
  (Q and K only; SDPA stays SDPA, the reference needs its own attention code).
* Positions and order: v1.5 renumbers the sequence after each pruning layer and places the recycled
  tokens after the kept ones; here every token keeps its position (as v2) and a recycled token takes
  the place of its earliest member.
* Raters: the reference takes the text after a single image (batch 1, LLaVA-1.5's 576 tokens
  hard-coded); here the text tokens after a sample's first visual token, per sample. When no text
  token is strictly above the mean (all equal, e.g. one text token) every one is a rater (the
  reference averages an empty set and ranks NaN scores).
* DPC-kNN: the reference breaks density ties with ``1e-6`` uniform noise; here ties go to the
  earlier token, so a forward is deterministic.
* GQA: each query head reads its KV head (the reference's v1.5 attention has no ``repeat_kv``).
* v2's head count: the reference's literal 14 (of LLaVA-1.5's 32 heads); here ``top_heads``
  defaults to 14/32 of the model's heads (rounded, at least 1).
* Layers: the reference's pruning layers 2, 6, 15 of 32 are scaled to the model's depth
  (``layers`` overrides; fewer than three layers use the table's first stages).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import BudgetError, StageError, UnsupportedModelError
from ..core.method import DecoderInfo, LayerContext, LayerDropMethod
from ..core.params import check_bool, check_choice, check_int, check_ints
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.schedule import fit_schedule

REFERENCE_VISUAL = 576
PRUNE_AFTER = (2, 6, 15)  # of 32 layers: the reduced tokens enter layers 3, 7, 16
TABLES = {
    "v1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}


def raters(visual_inputs: Tensor, text_inputs: Tensor) -> Tensor:
    """Which text tokens rate the image [t] bool: softmax over text of the visual-text dot products, averaged over
    the visual tokens, strictly above its mean (all of them when none is)."""
    m = (visual_inputs.float() @ text_inputs.float().T).softmax(-1).mean(0)
    chosen = m > m.mean()
    return chosen if bool(chosen.any()) else torch.ones_like(chosen)


def gravity(cos: Tensor, sin: Tensor) -> Tensor:
    """v2's RoPE-only logits [n, n]: all-ones queries and keys rotated at the rows' positions, over sqrt(d)."""
    return (cos.float() @ cos.float().T + sin.float() @ sin.float().T) / math.sqrt(cos.shape[-1])


def dpc_knn(x: Tensor, clusters: int) -> Tensor:
    """DPC-kNN clustering of ``x`` [n, C] into ``clusters`` groups [n] (density from the ``clusters`` nearest, self
    included; centres maximise density x distance to any denser token; every token joins its nearest centre)."""
    n = x.shape[0]
    dist = torch.cdist(x.float()[None], x.float()[None])[0] / math.sqrt(x.shape[-1])
    near = dist.topk(min(clusters, n), dim=-1, largest=False).values
    density = (-(near ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    denser |= (density[None, :] == density[:, None]) & (torch.arange(n)[None, :] < torch.arange(n)[:, None])
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (density * delta).topk(clusters).indices
    group = dist[centres].argmin(0)
    group[centres] = torch.arange(clusters)
    return group


@register
class SparseVLM(LayerDropMethod):
    name = "sparsevlm"
    paper = "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference (Zhang et al., 2025)"
    arxiv = "2410.04417"
    scores_from = "previous"
    attention_rows = "all"

    def __init__(self, keep_ratio: float | None = None, target: int | None = None, version: str = "v1.5",
                 recycle: bool | None = None, top_heads: int | None = None, layers=None, schedule=None):
        super().__init__(keep_ratio, schedule)
        self.refuse_with_schedule(target=target, layers=layers)
        self.version = check_choice(self.name, "version", version, tuple(TABLES), why="the reference's code version")
        self.target = None if target is None else check_choice(
            self.name, "target", target, tuple(TABLES[self.version]),
            why="the reference's average visual tokens of 576, one table each")
        if self.target is not None and self.budget is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or target, not both")
        if self.target is None and self.budget is None and self.given_schedule is None:
            self.target = 192
        self.recycle = check_bool(self.name, "recycle", self.version == "v1.5" if recycle is None else recycle,
                                  why="cluster the best dropped tokens into extra tokens; None = v1.5 only")
        self.top_heads = check_int(self.name, "top_heads", top_heads, min=1, optional=True,
                                   why="heads averaged after gravity correction (v2); None = 14/32 of the heads")
        if self.top_heads is not None and self.version != "v2":
            raise BudgetError(f"{self.name}: top_heads selects heads in version 'v2' only; pass version='v2'")
        self.layers = check_ints(self.name, "layers", layers, min=1, optional=True,
                                 why="the first layer (0-based) seeing each reduction; None = 3, 7, 16 of 32, scaled")
        if self.layers is not None and (not 1 <= len(self.layers) <= 3 or list(self.layers) != sorted(set(self.layers))):
            raise BudgetError(f"{self.name}: layers must be 1 to 3 distinct ascending layers (the table's first stages); "
                              f"got {list(self.layers)}")

    def describe(self) -> str:
        if self.given_schedule is not None:
            return f"{super().describe()}, version={self.version}"
        what = f"keep_ratio={self.budget.ratio}" if self.budget else f"target={self.target}"
        return f"{what}, version={self.version}" + (f", layers={list(self.layers)}" if self.layers else "")

    def stage_layers(self, info: DecoderInfo) -> list[int]:
        n = info.num_layers
        layers = list(self.layers) if self.layers else [max(1, round((l + 1) * n / 32)) for l in PRUNE_AFTER]
        if len(set(layers)) != len(layers) or layers[-1] >= n:
            raise BudgetError(f"{self.name}: the reference's pruning layers scale to {layers} in this language model's "
                              f"{n} layers; pass layers=[a, b, c] (ascending, 1..{n - 1})")
        return layers

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        layers = self.stage_layers(info)
        if self.budget is None:
            return [(k, c / REFERENCE_VISUAL) for k, c in zip(layers, TABLES[self.version][self.target])]
        table = TABLES[self.version]
        nearest = min(table, key=lambda t: abs(t / REFERENCE_VISUAL - self.budget.ratio))
        shape = [c / REFERENCE_VISUAL for c in table[nearest]]
        n = info.num_layers
        if self.budget.ratio <= self.mean_kept([(k, 0.0) for k in layers], n):
            raise BudgetError(f"{self.name}: keep_ratio={self.budget.ratio} is below what stages at {layers} of {n} "
                              "layers can reach; raise keep_ratio or pass later layers")
        return fit_schedule(lambda t: [(k, min(1.0, t * f)) for k, f in zip(layers, shape)], self.budget.ratio, n,
                            hi=1.0 / min(shape))

    def plan(self, ctx: LayerContext) -> Reduction:
        visual = ctx.visual
        v = int(visual.sum())
        keep = max(1, min(ctx.budget, v - 1))
        dev = ctx.hidden.device
        first = int(visual.nonzero()[0])
        text = ~visual & (torch.arange(visual.numel(), device=dev) > first)
        if not bool(text.any()):
            text = ~visual
        if not bool(text.any()):
            raise StageError(f"{self.name}: a prompt with no text token has no rater to score its visual tokens")
        judges = text.nonzero().flatten()[raters(ctx.visual_inputs, ctx.inputs[text])]
        attention = ctx.attention  # [H, n, n]
        if self.version == "v2":
            cos, sin = ctx.rotary
            if cos.dim() != 2:
                raise UnsupportedModelError(f"{self.name}: version='v2' corrects attention by 1-D RoPE logits; this "
                                            "model uses M-RoPE: use version='v1.5'")
            attention = attention / gravity(cos, sin)
        a = attention[:, judges][:, :, visual]  # [H, raters, v]
        if self.version == "v2":
            heads = self.top_heads or max(1, round(14 / 32 * a.shape[0]))
            a = a[a.sum((1, 2)).topk(min(heads, a.shape[0])).indices]
        score = a.mean(0).mean(0)
        order = score.sort(descending=True, stable=True).indices
        dest = torch.full((v,), -1, dtype=torch.long, device=dev)
        kept = order[:keep].sort().values
        dest[kept] = torch.arange(keep, device=dev)
        out = keep
        dropped = order[keep:]  # by score, best first
        if self.recycle and dropped.numel():
            recycled = dropped[: min(dropped.numel(), int(dropped.numel() * 0.3) + 1)]
            clusters = min(recycled.numel(), recycled.numel() // 10 + 1)
            group = dpc_knn(ctx.hidden[visual][recycled], clusters).to(dev)
            dest[recycled] = keep + group
            out += clusters
        return Reduction.merge(dest[None], out, torch.ones(1, v, device=dev))
