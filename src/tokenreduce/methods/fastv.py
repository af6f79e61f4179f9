"""FastV — An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models (Chen et al., 2024, arXiv 2403.06764).

After the first layers a VLM's language model barely attends to most visual tokens. FastV
takes, at layer ``K - 1``, the attention of the last prompt token to every visual token
(averaged over heads), and from layer ``K`` on keeps only the top ``(1 - R)`` of the visual
tokens; text tokens all stay. Attached at the decoder stage (`runtime.in_llm`): the one softmax
row is computed from layer ``K - 1``'s own Q and K (SDPA stays SDPA), layers ``>= K`` run on the
kept tokens only and cache only them.

Budget: ``K`` and ``R`` natively (the paper's K=2, R=0.5), or ``keep_ratio`` = the fraction of
visual tokens kept averaged over the ``L`` layers, which with ``K`` fixes
``R = (1 - keep_ratio) L / (L - K)`` (a keep_ratio below ``K / L`` cannot be reached and is refused),
or ``schedule`` = any per-layer schedule (`core.schedule.LayerSchedule`, e.g. a searched one), each drop
scored FastV's way (the previous layer's last-query attention).

Differences from the reference code (pkunlp-icler/FastV, its ``modeling_llama`` "inplace" mode and
the lmms-eval copy):

* The reference hard-codes the visual span (``[35:611]`` for LLaVA-1.5) and runs batch size 1; we
  find each sample's visual tokens from its input ids and keep each sample's own top tokens.
* The reference needs eager attention (``output_attentions``) and re-runs layer ``K - 1`` (its
  cache is written twice: FastV#18, #46); we compute the one row from Q and K inside the routed
  attention call, and no layer runs twice.
* Kept count: ``floor(N (1 - R))`` (at least 1), as every decoder-stage budget; the reference rounds.
* Scores: the last prompt token's row, as the code (the paper's text speaks of the attention
  received from all tokens, FastV#44 #48). Kept tokens keep their positions, as the reference's
  inplace mode.
"""

from __future__ import annotations

from ..core.method import DecoderInfo, LayerDropMethod
from ..core.registry import register
from ..core.schedule import one_drop


@register
class FastV(LayerDropMethod):
    name = "fastv"
    paper = ("An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large "
             "Vision-Language Models (Chen et al., 2024)")
    arxiv = "2403.06764"
    scores_from = "previous"

    def __init__(self, keep_ratio: float | None = None, k: int | None = None, r: float | None = None, schedule=None):
        super().__init__(keep_ratio, schedule)
        self.one_drop_budget(k, r, "the first layer (0-based) that runs on the kept tokens; None = 2, the paper's")

    def describe(self) -> str:
        if self.given_schedule is not None:
            return super().describe()
        return f"keep_ratio={self.budget.ratio}, k={self.k}" if self.budget else f"k={self.k}, r={self.r}"

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        return one_drop(self.name, info.num_layers, self.k, None if self.budget is None else self.budget.ratio, self.r)
