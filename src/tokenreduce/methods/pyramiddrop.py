"""PyramidDrop — Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction
(Xing et al., 2024, arXiv 2410.17247).

Visual redundancy grows with depth, so drop visual tokens in stages, like a pyramid: the language
model is split into stages at layers ``K_1 < K_2 < ...`` (the paper: 8, 16, 24 of 32), and at the
start of each stage the visual tokens still present are ranked by the last instruction token's
attention and a fraction ``lambda`` of them kept (576 -> 288 -> 144 -> 72 at lambda 0.5). The
attention is computed as the reference does: layer ``K``'s input norm, Q/K projections and RoPE
applied to that layer's input (the last token's query against every key, GQA: each query head
against its KV head, softmax, mean over heads). Attached at the decoder stage (`runtime.in_llm`).

Budget: ``layers`` and ``lambda_`` natively (default: the quarter points of the depth and 0.5),
or ``keep_ratio`` = the fraction of visual tokens kept averaged over the layers, solved for
``lambda_`` (bisection) at the given layers, or ``schedule`` = any per-layer schedule
(`core.schedule.LayerSchedule`, e.g. a searched one), each drop scored PyramidDrop's way (layer K's own
projections, or ``scores_from="previous"``).

Differences from the reference code (Cooperx521/PyramidDrop, ``pdrop_rank_drop``):

* GQA: the reference multiplies queries by keys without ``repeat_kv`` and fails on GQA models;
  we pair each query head with its KV head.
* Batches: the reference supports right padding only and re-indexes positions per sample; we
  find visual tokens per sample from the input ids, left-pad, and keep original positions.
* "Last instruction token": the last prompt token (the reference locates the end of the
  instruction before the answer template; with the chat template it is the last prompt token
  or a few tokens before it).
* Kept count per stage: ``floor(lambda^s N)`` of the original ``N`` (at least 1); the reference
  multiplies the running count by lambda and truncates.
* ``scores_from="previous"`` (an option; needed on M-RoPE models) scores with layer ``K - 1``'s
  own attention row instead, as FastV.
"""

from __future__ import annotations

from ..core.errors import BudgetError
from ..core.method import DecoderInfo, LayerDropMethod
from ..core.params import check_choice, check_float, check_ints
from ..core.registry import register
from ..core.schedule import fit_schedule


@register
class PyramidDrop(LayerDropMethod):
    name = "pyramiddrop"
    paper = ("PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy "
             "Reduction (Xing et al., 2024)")
    arxiv = "2410.17247"
    scores_from = "own"

    def __init__(self, keep_ratio: float | None = None, layers=None, lambda_: float | None = None,
                 scores_from: str = "own", schedule=None):
        super().__init__(keep_ratio, schedule)
        self.refuse_with_schedule(layers=layers, lambda_=lambda_)
        self.layers = check_ints(self.name, "layers", layers, min=1, optional=True,
                                 why="the first layer (0-based) of each stage; None = the quarter points")
        if self.layers is not None and (not self.layers or list(self.layers) != sorted(set(self.layers))):
            raise BudgetError(f"{self.name}: layers must be distinct and ascending; got {list(self.layers)}")
        self.lambda_ = check_float(self.name, "lambda_", lambda_, min=0.0, max=1.0, min_open=True, optional=True,
                                   why="the fraction of visual tokens each stage keeps")
        if self.lambda_ is not None and self.budget is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or lambda_, not both")
        if self.lambda_ is None and self.budget is None and self.given_schedule is None:
            self.lambda_ = 0.5
        self.scores_from = check_choice(self.name, "scores_from", scores_from, ("own", "previous"),
                                        why="'own' = layer K's projections (the reference)")

    def describe(self) -> str:
        if self.given_schedule is not None:
            return super().describe() + (f", scores_from={self.scores_from}" if self.scores_from != "own" else "")
        what = f"keep_ratio={self.budget.ratio}" if self.budget else f"lambda_={self.lambda_}"
        return what + (f", layers={list(self.layers)}" if self.layers else "")

    def stage_layers(self, info: DecoderInfo) -> list[int]:
        n = info.num_layers
        layers = list(self.layers) if self.layers else sorted({round(n * s / 4) for s in (1, 2, 3)} - {0})
        if not layers or layers[-1] >= n:
            raise BudgetError(f"{self.name}: stage layers {layers} do not fit this language model's {n} layers")
        return layers

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        layers = self.stage_layers(info)
        if self.lambda_ is not None:
            return [(k, self.lambda_ ** (s + 1)) for s, k in enumerate(layers)]
        target, n = self.budget.ratio, info.num_layers
        lowest = self.mean_kept([(k, 0.0) for k in layers], n)
        if target <= lowest:
            raise BudgetError(f"{self.name}: keep_ratio={target} is below what stages at {layers} of {n} layers can "
                              f"reach ({lowest:.3f}, every visual token gone after the first stage); raise keep_ratio "
                              "or start the first stage later")
        return fit_schedule(lambda lam: [(k, lam ** (s + 1)) for s, k in enumerate(layers)], target, n)

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        qd, kvd, h = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim, info.hidden_size
        return 2.0 * h * (qd + length * kvd) + 2.0 * info.num_heads * length * info.head_dim  # re-projected Q, K; row
