"""FlowCut's language-model stage (Tong et al., NeurIPS 2025, arXiv 2505.19536): the continuation of its
vision-tower pruning (`methods.flowcut`) inside the language model.

For LLaVA-NeXT's tiled images (``anyres``) the reference halves the tower's target and prunes again in
the language model's layer 1, where the instruction can guide the choice. In that layer's attention,
with ``q``, ``v`` the last prompt token's query and value and ``k_j``, ``v_j`` visual token ``j``'s key and
value (per head, after RoPE):

1. relation: ``a_j = mean_h softmax_j(q . k_j / sqrt(d))``, the softmax over the visual tokens only;
2. semantics: ``s_j = mean_h softmax_j(v . v_j / sqrt(d))``, likewise;
3. score: ``(a_j / sum a + s_j / sum s) * || mean_h v_j ||_1`` (the tower stage's score, with the last
   prompt token in the place of [CLS]);
4. the top ``target_num`` visual tokens of the sample (all its images together) are kept, in prompt order,
   from layer 2 on.

Follows the reference code (TungChintao/FlowCut @a2ecd24, ``flowcut/modeling_llama_flowcut.py``: the
scoring inside ``LlamaSdpaAttention_forward``, the cut in ``LlamaModel_forward`` after layer 1;
``utils_flowcut.compute_score``). Differences, and why:

* Positions: the reference renumbers the tokens after the cut (``position_ids = arange``) and, while
  decoding, shifts the positions back by the dropped count; here kept tokens keep their own positions,
  as every in-LLM method of ours (and FastV's reference), so the composed cache and ``generate`` need no
  shift. It also cuts the prompt at ``last_instruct_pos`` (a no-op at inference: the whole prompt).
* Batches: the reference refuses left padding; here each sample keeps its own top tokens and a
  left-padded batch equals its samples one at a time.
* GQA: the reference repeats keys and values to every query head; averaging the softmax over the
  repeated heads equals averaging over the key/value groups, which is what we do for the semantic
  term (the relation term uses every query head).
* Precision: scores in float32 (the reference: the model's dtype, fp16 in its scripts).
* Budget: ``keep_ratio`` = the fraction kept averaged over the layers, as every in-LLM method
  (``(keep_ratio L - K) / (L - K)`` of the visual tokens from layer ``K = layer``, 2 by default as the
  reference; other layers are our option), or any ``schedule`` (each drop
  scored this way from the previous layer's attention call). The reference's ``target_num`` ``T`` of a
  sample with ``N`` visual tokens is ``schedule=[(2, T / N)]``; a fraction rather than a count, so a batch
  of prompts with different image counts keeps the same share of each.
* Where it applies: the reference runs this stage only under ``anyres`` after halving the tower's target.
  Here it is a method of its own, to compose after `flowcut` in the tower (``apply(model, flowcut,
  flowcut_llm)``) or after a connector method, on any VLM the in-LLM stage supports.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import BudgetError
from ..core.method import DecoderInfo, LayerContext, LayerDropMethod
from ..core.params import check_int
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.schedule import one_drop

LAYER = 2  # the first layer on the kept tokens: the reference scores in layer 1 and cuts its output


def _combine(relation: Tensor, last_value: Tensor, values: Tensor, scale: float) -> Tensor:
    """Step 2-3: ``relation`` [v], ``last_value`` [H_kv, Dh], ``values`` [H_kv, v, Dh] -> scores [v]."""
    semantic = (torch.einsum("hd,hvd->hv", last_value, values) * scale).softmax(-1).mean(0)
    return (relation / relation.sum() + semantic / semantic.sum()) * values.mean(0).abs().sum(-1)


@register
class FlowCutLLM(LayerDropMethod):
    name = "flowcut_llm"
    paper = "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (LLM stage)"
    arxiv = "2505.19536"
    scores_from = "previous"
    needs_values = True

    def __init__(self, keep_ratio: float | None = None, layer: int | None = None, schedule=None):
        super().__init__(keep_ratio, schedule)
        self.refuse_with_schedule(layer=layer)
        self.layer = check_int(self.name, "layer", LAYER if layer is None else layer, min=1,
                               why="the first layer (0-based) on the kept tokens, scored in the layer before; "
                                   "None = 2, the reference's")
        if self.budget is None and self.given_schedule is None:
            raise BudgetError(f"{self.name}: give keep_ratio (e.g. 0.25) or schedule (e.g. [(2, 0.2)])")

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        return one_drop(self.name, info.num_layers, self.layer, self.budget.ratio, k_name="layer")

    def describe(self) -> str:
        if self.given_schedule is not None:
            return super().describe()
        return f"keep_ratio={self.budget.ratio}, layer={self.layer}"

    def plan(self, ctx: LayerContext) -> Reduction:
        visual = ctx.visual.nonzero().flatten()
        v = visual.numel()
        if ctx.budget >= v:
            return Reduction.keep(torch.arange(v, device=visual.device)[None], v)
        att = ctx.attention[:, -1, visual].float()  # [H, v]: the last row, restricted to the visual tokens
        relation = (att / att.sum(-1, keepdim=True)).mean(0)  # = the softmax over the visual tokens alone
        values = ctx.values.float()
        scale = 1.0 / math.sqrt(values.shape[-1])
        score = _combine(relation, values[:, -1], values[:, visual], scale)
        keep = score.sort(descending=True, stable=True).indices[:ctx.budget].sort().values
        return Reduction.keep(keep[None], v)

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        """The last row's attention (as FastV) plus the semantic row over the values (``H_kv`` heads)."""
        return super().scoring_flops(length, info) + 2.0 * info.num_kv_heads * length * info.head_dim
