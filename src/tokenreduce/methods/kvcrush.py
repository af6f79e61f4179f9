"""KVCrush — Key Value Cache size-reduction using similarity in head-behaviour (Jha et al., 2025, arXiv 2503.00022).

An add-on to any importance-based kv-cache method: a fraction of the budget
(``crush_fraction``) goes to representatives of the tokens the importance method would
evict, so the cache also covers what the heads did *not* focus on. Each token gets a
binary signature of head behaviour (bit ``h`` = the token is in head ``h``'s top half of
importance scores); its Hamming distance to an anchor vector projects it onto one axis;
the evicted tokens, sorted by that distance, are split into ``budget * crush_fraction``
equal buckets and one representative per bucket is kept. The rest of the budget is the
importance method's own top entries (its forced ones — SnapKV's window, StreamingLLM's
sinks — included). Representatives are shared by all KV heads (a signature is a token's).

``tokenreduce.get_method("kvcrush", keep_ratio=0.25, base="snapkv")``: ``base`` is any
prefill-time kv-cache method; its own parameters go in ``base_params``.

Differences from the reference code: there is no standalone official repository; we
follow the authors' OpenVINO GenAI integration (``cache/kvcrush.cpp``) and a vLLM-based
implementation (``H2OKVCrushCluster``), which agree on the above, and could not read the
paper's body. Choices: signature bits from the base's per-query-head scores when it has
them (SnapKV, H2O, TOVA; the paper: one bit per attention head), else per KV head;
anchors ``alternate`` (default, as the vLLM one), ``mean`` (bitwise majority), ``random``
(seeded; OpenVINO's default), ``zeros``, ``ones``; representatives at evenly spaced ranks
of the sorted evicted tokens (``linspace`` over the list, as the vLLM one). Unlike the
vLLM one, candidates exclude every KV head's importance picks (not only head 0's) and the
signatures are built per sample (not from the first sample of the batch). Prefill-time
only: a decode-time evicting base (H2O, Keyformer) would evict the representatives again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.errors import StageError, UnknownParameterError
from ..core.method import DecoderInfo, KVContext, KVMethod
from ..core.params import check_choice, check_float, check_mapping, check_seed, fail
from ..core.registry import get_method, register, registered

ANCHORS = ("alternate", "mean", "random", "zeros", "ones")


def crush_representatives(bits: Tensor, candidates: Tensor, count: int, anchor: str, seed: int) -> Tensor:
    """Positions of ``count`` representatives among ``candidates`` [N] (bool), from signatures ``bits`` [S, N].

    Hamming distance of each signature to the anchor, candidates sorted by (distance, position),
    the ones at ``linspace(0, C - 1, count)`` ranks kept (all of them if fewer than ``count``).
    """
    s = bits.shape[0]
    if anchor == "alternate":
        ref = torch.arange(s, device=bits.device) % 2 == 1
    elif anchor == "mean":
        ref = bits[:, candidates].float().mean(1) > 0.5
    elif anchor == "random":
        ref = torch.randint(0, 2, (s,), generator=torch.Generator().manual_seed(seed)).bool().to(bits.device)
    else:
        ref = torch.full((s,), anchor == "ones", dtype=torch.bool, device=bits.device)
    distance = (bits != ref[:, None]).sum(0)  # [N]
    pos = torch.nonzero(candidates).flatten()
    if pos.numel() == 0 or count <= 0:
        return pos[:0]
    order = pos[torch.sort(distance[pos], stable=True).indices]  # ties keep position order
    picks = torch.linspace(0, order.numel() - 1, min(count, order.numel())).long()
    return order[picks]


@register
class KVCrush(KVMethod):
    name = "kvcrush"
    paper = "KVCrush: Key Value Cache size-reduction using similarity in head-behaviour (Jha et al., 2025)"
    arxiv = "2503.00022"
    signals = ()  # the base method's, set per instance

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, base: str = "snapkv",
                 crush_fraction: float = 0.25, anchor: str = "alternate", seed: int = 0,
                 base_params: dict | None = None):
        super().__init__(keep_ratio, keep_count)
        known = registered()
        if not isinstance(base, str) or base not in known:  # a known name of the wrong kind is refused below
            bases = sorted(n for n, c in known.items() if issubclass(c, KVMethod) and not issubclass(c, KVCrush)
                           and not c.evicts_during_decode and c.score is not KVMethod.score)
            fail(self.name, "base", "a prefill-time kv-cache method: " + ", ".join(map(repr, bases)), base,
                 why="unknown method")
        base_params = check_mapping(self.name, "base_params", base_params, forbidden=("keep_ratio", "keep_count"),
                                    why="the base's own parameters; kvcrush's budget is the base's")
        self.crush_fraction = check_float(self.name, "crush_fraction", crush_fraction, min=0.0, max=1.0,
                                          why="the share of the budget for representatives")
        self.anchor = check_choice(self.name, "anchor", anchor, ANCHORS)
        self.seed = check_seed(self.name, "seed", seed)
        budget = {"keep_ratio": keep_ratio} if keep_ratio is not None else {"keep_count": keep_count}
        try:
            self.base = get_method(base, **budget, **(base_params or {}))
        except UnknownParameterError as e:
            raise UnknownParameterError(f"kvcrush: base_params: {e}") from None
        if not isinstance(self.base, KVMethod) or isinstance(self.base, KVCrush):
            raise StageError(f"kvcrush: base must be a kv-cache importance method (snapkv, pyramidkv, tova, knorm, "
                             f"streaming_llm, ...); got {base!r}")
        if self.base.evicts_during_decode:
            raise StageError(f"kvcrush adds representatives at prefill; {base} evicts again while decoding and would "
                             "drop them: use a prefill-time base (snapkv, pyramidkv, tova, knorm, streaming_llm)")
        self.signals = self.base.signals

    def describe(self) -> str:
        return f"base={self.base!r}, crush_fraction={self.crush_fraction}, anchor={self.anchor}, seed={self.seed}"

    # the base decides which layers, rows and budgets
    def check(self, info: DecoderInfo) -> None:
        self.base.check(info)

    def compresses(self, layer: int) -> bool:
        return self.base.compresses(layer)

    def query_rows(self, length: int) -> int:
        return self.base.query_rows(length)

    def layer_budgets(self, lengths: Tensor, layer: int, info: DecoderInfo) -> Tensor:
        return self.base.layer_budgets(lengths, layer, info)

    def begin_prefill(self) -> None:
        self.base.begin_prefill()

    def scoring_flops(self, length: int, rows: int, info: DecoderInfo) -> float:
        return self.base.scoring_flops(length, rows, info) + 4.0 * info.num_heads * length

    def score(self, ctx: KVContext) -> Tensor:
        b, n = ctx.valid.shape
        hk = ctx.keys.shape[1]
        s = self.base.score(ctx).expand(b, hk, n).clone()
        per_head = getattr(self.base, "query_head_scores", None)
        signature_scores = per_head(ctx) if per_head is not None else s
        forced = torch.isposinf(s).any(1)  # [B, N]
        for i in range(b):
            m = int(ctx.budgets[i])
            count = int(m * self.crush_fraction)
            if count == 0:
                continue
            evictable = ctx.valid[i] & ~forced[i]
            e = int(evictable.sum())
            if e == 0:
                continue
            # head behaviour: bit h = the token is in head h's top half of the evictable tokens
            sig = signature_scores[i].masked_fill(~evictable[None], float("-inf"))
            half = max(e // 2, 1)
            top_half = sig.topk(half, dim=-1).indices
            bits = torch.zeros_like(sig, dtype=torch.bool).scatter_(-1, top_half, True)
            # the importance picks (m - count per KV head, forced entries first) are not candidates
            important = s[i].masked_fill(~ctx.valid[i][None], float("-inf")).topk(m - count, dim=-1).indices \
                if m > count else torch.empty(hk, 0, dtype=torch.long, device=s.device)
            picked = torch.zeros(n, dtype=torch.bool, device=s.device)
            picked[important.flatten()] = True
            reps = crush_representatives(bits, evictable & ~picked, count, self.anchor, self.seed)
            s[i, :, reps] = float("inf")
        return s
