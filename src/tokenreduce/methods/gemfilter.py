"""GemFilter — Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x Input
Token Reduction (Shi et al., 2024, arXiv 2409.17422).

An early layer already knows which prompt tokens the answer needs. GemFilter runs the prompt
through layers ``0..L`` only, scores every token by layer ``L``'s post-RoPE query of the *last*
token against its key (``q_last . k_j``, raw dot products summed over all query heads; GQA:
each query head against its KV head), smooths the scores along the sequence with a 1-D
average pool (``kernel_size`` 5, zero padding), keeps the top ``k`` tokens in their original
order, then prefills only those ``k`` tokens through the whole model as a new prompt and
generates from it. The prompt's cost drops to ``L/num_layers`` of a full prefill plus a
prefill of ``k`` tokens; the cache holds ``k`` entries per layer. Attached at the decoder stage
by `runtime.prefill_filter` (which documents positions, masks and the cache).

Budget: ``keep_ratio`` (fraction of each sample's prompt tokens) or ``keep_count`` (tokens per
sample; the reference's ``topk``, default there 1024). ``layer``: the filter layer, 0-based
(``None``: the reference's choice for its models, see `DEFAULT_LAYERS`, else 13/32 of the depth).

Differences from the reference code (SalesforceAIResearch/GemFilter, ``gem_filter_utils.py``,
``my_generation.py``; checked against it):

* Positions: the reference renumbers the kept tokens ``0..k-1`` and decodes at ``k, k+1, ...``;
  we shift them by a constant so they end where the caller's positions continue
  (``N-k..N-1``, decoding at ``N, N+1, ...``): the same distances, so the same RoPE attention up
  to float rounding, and ``generate`` works unchanged (details and the one exception,
  length-dependent rotary types such as Phi-3 ``longrope``, in `runtime.prefill_filter`).
* The filter pass stops inside layer ``L``'s attention, right after Q and K; the reference
  truncates ``model.model.layers`` to ``L+1`` and so also runs ``L``'s attention and MLP, the
  final norm and the LM head (wasted work, same selection).
* Scores in float32 (float64 for a float64 model), from the queries/keys the model computed in
  its own dtype; the reference's dot products are in the model dtype (fp16). No softmax in
  either: the reference ranks raw ``q.k`` sums (the paper's ``Q K^T`` row), not probabilities.
* Ties: the later token wins (`core.kv.select_kept`); the reference leaves ties to ``topk``.
* Batches: the reference asserts batch size 1; we select per sample among its real tokens
  (left padding scores as the zero padding of the pooling, as for a sample alone) and
  left-pad samples that keep fewer tokens.
* Budget larger than the prompt: the reference keeps ``min(topk, n)`` silently; we raise
  (`BudgetError`). Nothing is force-kept in either (not the question, not the last token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.budget import check_keep_count, check_keep_ratio
from ..core.method import DecoderInfo, PrefillFilterMethod
from ..core.params import check_int
from ..core.registry import register

# (model_type, num_hidden_layers, hidden_size) -> filter layer. The first three are the reference's
# needle_eval.py choices; SmolLM2 is ours (measured, see below).
DEFAULT_LAYERS: dict[tuple[str, int, int], int] = {
    ("llama", 32, 4096): 13,  # Llama-3.1-8B-Instruct ("13, 14 out of 32")
    ("mistral", 40, 5120): 19,  # Mistral-Nemo-Instruct-2407
    ("phi3", 32, 3072): 19,  # Phi-3.5-mini-instruct
    # SmolLM2-135M-Instruct (30 layers): the earliest layer whose last query puts every token of the needle's number
    # in the top 1/8 of a ~2k-token prompt, in all 10 needle samples (depths 0.1..0.9, 2 seeds); layers 21-23 do,
    # no layer before 21 does (15: 57 %, 13: 41 %). benchmarks/gemfilter_prefill_cpu.py --part sweep.
    ("llama", 30, 576): 21,
}
RELATIVE_DEPTH = 13 / 32  # fallback for other models: Llama-3.1-8B's filter layer, as a fraction of the depth


@register
class GemFilter(PrefillFilterMethod):
    name = "gemfilter"
    paper = ("Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x Input Token "
             "Reduction (Shi et al., 2024)")
    arxiv = "2409.17422"
    signals = ("last_query_logits",)

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, layer: int | None = None,
                 kernel_size: int = 5):
        keep_ratio = check_keep_ratio(self.name, keep_ratio)  # types and ranges first, then the combination
        keep_count = check_keep_count(self.name, keep_count)
        super().__init__(keep_ratio, keep_count)
        self.layer = check_int(self.name, "layer", layer, min=0, optional=True,
                               why="a 0-based decoder layer index; None = the default for the model")
        self.kernel_size = check_int(self.name, "kernel_size", kernel_size, min=1, odd=True, why="1 = no pooling")

    def describe(self) -> str:
        return f"{super().describe()}, layer={self.layer}, kernel_size={self.kernel_size}"

    def filter_layer(self, info: DecoderInfo, config) -> int:
        if self.layer is not None:
            return self.layer
        key = (getattr(config, "model_type", ""), info.num_layers, info.hidden_size)
        return DEFAULT_LAYERS.get(key, int(info.num_layers * RELATIVE_DEPTH))

    def score(self, query: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
        b, h, d = query.shape
        hk = keys.shape[1]
        dt = torch.promote_types(query.dtype, torch.float32)
        q = query.to(dt).reshape(b, hk, h // hk, d).sum(2)  # sum over a group's query heads: they share the keys
        s = torch.einsum("bkd,bknd->bn", q, keys.to(dt))  # = sum over all query heads of q_h . k_j
        s = s.masked_fill(~valid, 0.0)  # padding acts as the pooling's zero padding
        if self.kernel_size > 1:
            s = F.avg_pool1d(s[:, None], self.kernel_size, stride=1, padding=self.kernel_size // 2)[:, 0]
        return s

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        """The last query against every key, all heads, plus the pooling."""
        return 2.0 * length * info.num_heads * info.head_dim + self.kernel_size * length
