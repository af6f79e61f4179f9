"""VFlowOpt's language-model stage (Yang et al., ICCV 2025, arXiv 2508.05211; step 6 of its algorithm): the visual
tokens still present are pruned again inside the language model, the lowest by the *tower's* importance map.

VFlowOpt scores the visual tokens once, in the vision tower (`methods.vflowopt`, steps 1-5: the attention the
select layer's global tokens pay each patch; the lowest patches recycled into a few tokens). The same map then
drives two more drops in the language model, without any text guidance and without the language model's own
attention: before layer ``K`` runs (0-based), the visual tokens still present are sorted by their tower score and
the lowest are removed, so that a fraction ``r_K`` of them stays; a recycled token carries its strongest member's
score. The kept tokens keep their positions.

Use it after the tower stage: ``tokenreduce.apply(model, get_method("vflowopt", keep_ratio=...),
get_method("vflowopt_llm"))``. `methods.vflowopt` gives the score of each token it hands the language model
(``ConnectorMethod.gives_prior``); the runtime carries them with the rows through every drop
(`core.method.LayerContext.prior`). Alone, or after a connector method that gives no scores, this method is
refused at attach (`StageError`), before any work.

What the reference code does (sihany077/VFlowOpt at 129eeef, the path its evaluation runs: ``generate`` with the
cache; ``src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py`` ``Qwen2Model.forward_illava``,
``src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py``
``prepare_inputs_labels_for_multimodal``, ``src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py``
/ ``llava_ov_opt_all.py`` (the configurations), README's ``illava_llm_k=9-18``):

* the tower stage writes its map of the tokens it keeps to ``os.environ["VIT_ATTN_MAP"]`` (JSON): a kept token's
  score, and for a recycled token the score at the index it is written to, its most important member's;
* ``forward_illava`` reads it back; at the first drop layer of the prefill (``layer_idx in illava_llm_k``, before
  that layer runs, i.e. on layer ``K - 1``'s output) it computes every drop's mask at once: for each fraction
  ``r`` of ``illava_llm_r``, ``round(n * (1 - r))`` of the ``n`` visual tokens still present are removed, the
  lowest by ``torch.sort`` of the map, and the map is compacted to the survivors for the next drop; so ``r`` is a
  fraction of the tokens still present, not of the original count;
* each drop layer gathers the hidden states and ``position_ids`` (kept tokens keep their positions), rebuilds a
  plain causal mask, and the later layers' cache holds the kept tokens only;
* layers ``(9, 18)`` of LLaVA-OneVision-7B's 28-layer Qwen2; the released fractions ``illava_llm_r`` are
  ``(0.9833, 0.8773)`` at 25 % of the tokens overall (the defaults here, as `methods.vflowopt`'s ``t`` and ``a``),
  ``(0.7487, 0.487)`` at 50 % and ``(1.0, 0.6011)`` at 10 %, found by its offline search.

Budget (every in-LLM method's meaning): the schedule is ``[(K_1, r_1), (K_2, r_1 r_2)]`` (a fraction of the visual
tokens this stage receives, i.e. of the tower stage's output; kept counts ``floor``, at least 1). ``layers``: the
reference's 9 and 18 scaled to the language model's depth ``L``, ``round(K L / 28)`` (at least 1, strictly
ascending; a drop that falls beyond the last layer is folded into the one before, which then keeps the final
fraction), or given. ``r``: the reference's per-drop fractions of the tokens still present (default the 25 %
configuration), or ``keep_ratio`` = the fraction of visual tokens kept averaged over the layers, solved for a
power ``p`` of the native fractions, ``(r_1^p, (r_1 r_2)^p)`` (the reference's shape in log space, one knob;
bisection; the 25 % configuration drops almost nothing at the first layer, so a low ``keep_ratio`` leaves few
tokens after the second: on the mini-LLaVA's 30 layers 0.5 keeps 54 % from layer 10 and one token from layer 19;
pass ``r`` or a ``schedule`` for another shape), or ``schedule`` = any per-layer schedule, each drop ranked by the
tower map. The overall budget of the paper's tables is mostly the tower stage's: set it with `methods.vflowopt`'s
``keep_ratio`` and keep this stage's native ``r``.

Differences from the reference code, and why:

* Composition: the reference hands the map over through an environment variable (one image: a second image's map
  overwrites the first's); here the connector hands each row's score over with the rewritten prompt, per sample
  and image, and a prompt's images are ranked together (the sample's whole visual budget, as every in-LLM method).
* Batches: the reference runs batch 1 with a hard-coded image start (``illava_llm_image_token_start_index=14``);
  here the visual rows come from the ids and the connector's rewrite, samples are left-padded and each keeps its
  own count, so a padded batch under ``generate`` equals its samples one at a time.
* Counts: ``floor(fraction x n)`` of the tokens this stage received (at least 1), the fraction cumulative; the
  reference removes ``round(n_cur (1 - r))`` of the tokens still present at each drop (a token either way).
* Ties: the lowest scores go first, ties the earlier token first (a stable ascending sort, as `methods.vflowopt`'s
  recycling); the reference's ``torch.sort`` leaves tie order to the device.
* Place of a recycled token: the tower stage puts it at its earliest member's position (the connector's
  convention, `methods.vflowopt`); the reference at its strongest member's. Its score is the strongest member's
  in both.
* The mask after a drop: the runtime's own (causal over the kept tokens, padding masked); the reference rebuilds
  ``_update_causal_mask(None, ...)``, which drops the padding (batch 1 has none) and, with SDPA, may be None.
* Tokens: the reference's anyres prompt holds image-newline tokens scored 1, so its drops never remove them; here
  the tower stage takes single raster grids only (`methods.vflowopt`), so there are none.
* Layer scaling for other depths and ``keep_ratio`` are ours (the reference hard-codes 28 layers and searches the
  fractions per budget); GQA plays no part (no attention is read: ``attention_rows = "none"``).
* The reference's path without a cache (``use_cache=False``) ranks by the language model's last-token attention
  instead and merges the dropped tokens into one; it is not what its evaluation runs, and not done here.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import BudgetError, StageError
from ..core.method import DecoderInfo, LayerContext, LayerDropMethod
from ..core.params import check_fractions, check_ints
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.schedule import fit_schedule

REFERENCE_DEPTH = 28  # LLaVA-OneVision-7B's Qwen2 language model
REFERENCE_LAYERS = (9, 18)  # the README's illava_llm_k=9-18 (0-based: the first layer on the kept tokens)
REFERENCE_R = (0.9833433139039235, 0.8773258179532721)  # illava_llm_r of the released 25 % configuration


def scaled_layers(num_layers: int) -> list[int]:
    """The reference's drop layers scaled to a language model of ``num_layers`` layers: ``round(K L / 28)``, at
    least 1, strictly ascending (possibly past the last layer: `VFlowOptLLM.native_schedule` folds those)."""
    out: list[int] = []
    for k in REFERENCE_LAYERS:
        x = max(1, math.floor(k * num_layers / REFERENCE_DEPTH + 0.5))
        if out and x <= out[-1]:
            x = out[-1] + 1
        out.append(x)
    return out


@register
class VFlowOptLLM(LayerDropMethod):
    name = "vflowopt_llm"
    paper = ("VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization "
             "(Yang et al., ICCV 2025; language-model stage)")
    arxiv = "2508.05211"
    attention_rows = "none"  # ranks by the tower's map alone: no attention row is computed
    needs_prior = True

    def __init__(self, keep_ratio: float | None = None, layers=None, r=None, schedule=None):
        super().__init__(keep_ratio, schedule)
        self.refuse_with_schedule(layers=layers, r=r)
        self.layers = check_ints(self.name, "layers", layers, min=1, optional=True,
                                 why="the drop layers (0-based: the first layer on the kept tokens); None = the "
                                     "reference's 9 and 18 of 28, scaled to the model's depth")
        if self.layers is not None and (not self.layers or list(self.layers) != sorted(set(self.layers))):
            raise BudgetError(f"{self.name}: layers must be distinct and ascending; got {list(self.layers)}")
        self.r = check_fractions(self.name, "r", r, optional=True,
                                 why="at each drop layer, the fraction of the visual tokens still present kept (the "
                                     "reference's illava_llm_r)")
        if self.r is not None and self.budget is not None:
            raise BudgetError(f"{self.name}: give keep_ratio or r, not both")
        if self.layers is not None and len(self.layers) != len(self.r if self.r is not None else REFERENCE_R):
            raise BudgetError(f"{self.name}: {len(self.layers)} layers need as many fractions r (one per drop); got "
                              f"{list(self.r) if self.r is not None else 'the default ' + str(list(REFERENCE_R))}")

    def describe(self) -> str:
        if self.given_schedule is not None:
            return super().describe()
        what = f"keep_ratio={self.budget.ratio}" if self.budget else f"r={[round(x, 4) for x in self.r or REFERENCE_R]}"
        return what + (f", layers={list(self.layers)}" if self.layers else "")

    def drops(self, info: DecoderInfo) -> list[tuple[int, float]]:
        """``[(layer, cumulative fraction of the native r)]``, fitted to the model's layers."""
        n = info.num_layers
        layers = list(self.layers) if self.layers else scaled_layers(n)
        if self.layers and layers[-1] >= n:
            raise BudgetError(f"{self.name}: drop layer {layers[-1]} is beyond this language model's {n} layers "
                              f"(0..{n - 1})")
        cum, out = 1.0, []
        for k, r in zip(layers, self.r or REFERENCE_R):
            cum *= r
            if k < n:
                out.append((k, cum))
            elif out:  # a scaled layer past the last: the drop before keeps the final fraction
                out[-1] = (out[-1][0], cum)
        if not out:
            raise BudgetError(f"{self.name}: a language model of {n} layer(s) has no layer after the first to drop at")
        return out

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        drops = self.drops(info)
        if self.budget is None:
            return drops
        target, n = self.budget.ratio, info.num_layers
        last = drops[-1][1]
        if last >= 1.0:
            raise BudgetError(f"{self.name}: the fractions r keep every token; keep_ratio cannot be solved with them")
        lowest = self.mean_kept([(k, 0.0 if f < 1.0 else 1.0) for k, f in drops], n)
        if target <= lowest:
            raise BudgetError(f"{self.name}: keep_ratio={target} is below what drops at layers "
                              f"{[k for k, _ in drops]} of {n} can reach ({lowest:.3f}, every visual token gone after "
                              "the first); raise keep_ratio or pass earlier layers")

        def make(t: float) -> list[tuple[int, float]]:  # t = the last drop's fraction; the others the same power
            p = math.log(t) / math.log(last)
            return [(k, f ** p) for k, f in drops]

        return fit_schedule(make, target, n)

    def plan(self, ctx: LayerContext) -> Reduction:
        """Keep the ``ctx.budget`` visual rows with the highest tower score, in prompt order (the lowest dropped;
        ties: the earlier token dropped first)."""
        visual = ctx.visual.nonzero().flatten()
        v = visual.numel()
        if ctx.budget >= v:
            return Reduction.keep(torch.arange(v, device=visual.device)[None], v)
        score = ctx.prior[visual].float()
        if bool(score.isnan().any()):
            raise StageError(f"{self.name}: at layer {ctx.layer} a visual token has no tower score (the connector "
                             "method scored only some of its tokens)")
        keep = score.sort(stable=True).indices[v - ctx.budget:].sort().values
        return Reduction.keep(keep[None], v)

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        return 0.0  # a sort of numbers the tower stage computed
