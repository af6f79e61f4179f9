"""What the last forward kept and what that bought: tokens per block and analytic FLOPs.

FLOPs count multiply-adds as 2 and follow the tensors actually computed: when samples keep
different counts and are padded, the padded length is what the block paid for, so that is
what is counted (``tokens_per_layer`` reports the mean count of real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def vit_attention_flops(n: float, hidden: int) -> float:
    """QKV and output projections plus the two N x N attention products, one image."""
    return 2 * n * hidden * 3 * hidden + 2 * 2 * n * n * hidden + 2 * n * hidden * hidden


def vit_mlp_flops(n: float, hidden: int, mlp: int) -> float:
    return 2 * 2 * n * hidden * mlp


@dataclass
class Stats:
    tokens_per_layer: list[float] = field(default_factory=list)  # real tokens entering each block (mean over batch)
    mlp_tokens_per_layer: list[float] = field(default_factory=list)  # real tokens each block's MLP saw
    flops: float = 0.0  # analytic FLOPs of the reduced forward, per sample (stages we attach to)
    flops_full: float = 0.0  # the same model without reduction
    scoring_flops: float = 0.0  # the methods' own scoring/planning work, per sample (counted in `flops`)
    batch_size: int = 0
    # kv-cache stage (prefill-time compression; one entry per compressed layer). Compression runs after the
    # context is encoded, so prefill FLOPs are unchanged: flops/flops_full stay 0 and flops_ratio 1.0;
    # ``scoring_flops`` counts the methods' extra work (e.g. SnapKV's window attention rows).
    kv_layers: list[int] = field(default_factory=list)  # cache layers taken over at the last prefill (skipped ones kept whole)
    kv_entries_per_layer: list[float] = field(default_factory=list)  # real context entries per sample (mean), per KV head
    kv_kept_per_layer: list[float] = field(default_factory=list)  # entries kept per sample (mean), per KV head
    kv_slots_per_layer: list[int] = field(default_factory=list)  # physical slots after compression (padding included)
    kv_bytes_before_per_layer: list[int] = field(default_factory=list)  # keys + values of the whole batch, as stored
    kv_bytes_after_per_layer: list[int] = field(default_factory=list)
    # decode-time eviction (H2O, Keyformer): decoding forwards seen and the most slots a layer held after one
    kv_decode_steps: int = 0
    kv_decode_slots: int = 0

    def add_kv_layer(self, layer: int, entries: float, kept: float, slots: int, bytes_before: int,
                     bytes_after: int) -> None:
        """One cache layer shaped by the last forward (entries / kept: per sample, means; bytes: the batch's)."""
        self.kv_layers.append(layer)
        self.kv_entries_per_layer.append(entries)
        self.kv_kept_per_layer.append(kept)
        self.kv_slots_per_layer.append(slots)
        self.kv_bytes_before_per_layer.append(bytes_before)
        self.kv_bytes_after_per_layer.append(bytes_after)

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.flops_full if self.flops_full else 1.0

    @property
    def final_tokens(self) -> float:
        return self.mlp_tokens_per_layer[-1] if self.mlp_tokens_per_layer else 0.0

    @property
    def kv_bytes_before(self) -> int:
        return sum(self.kv_bytes_before_per_layer)

    @property
    def kv_bytes_after(self) -> int:
        return sum(self.kv_bytes_after_per_layer)

    @property
    def kv_bytes_ratio(self) -> float:
        """Physical bytes after / before compression, over the compressed layers (padding slots count)."""
        return self.kv_bytes_after / self.kv_bytes_before if self.kv_bytes_before else 1.0

    def as_dict(self) -> dict:
        return {
            "tokens_per_layer": self.tokens_per_layer,
            "mlp_tokens_per_layer": self.mlp_tokens_per_layer,
            "flops": self.flops,
            "flops_full": self.flops_full,
            "flops_ratio": self.flops_ratio,
            "scoring_flops": self.scoring_flops,
            "batch_size": self.batch_size,
            **({"kv_layers": self.kv_layers, "kv_entries_per_layer": self.kv_entries_per_layer,
                "kv_kept_per_layer": self.kv_kept_per_layer, "kv_slots_per_layer": self.kv_slots_per_layer,
                "kv_bytes_before_per_layer": self.kv_bytes_before_per_layer,
                "kv_bytes_after_per_layer": self.kv_bytes_after_per_layer, "kv_bytes_before": self.kv_bytes_before,
                "kv_bytes_after": self.kv_bytes_after, "kv_bytes_ratio": self.kv_bytes_ratio} if self.kv_layers else {}),
        }


_KV_FROM_FIRST = ("kv_layers", "kv_entries_per_layer", "kv_bytes_before_per_layer")
_KV_FROM_LAST = ("kv_kept_per_layer", "kv_slots_per_layer", "kv_bytes_after_per_layer")


def combine(parts: list[Stats]) -> Stats:
    """One view of several stages' `Stats`, given in stage order (vision tower -> ... -> KV cache).

    ``flops``, ``flops_full`` and ``scoring_flops`` are summed (so ``flops_ratio`` is the ratio
    over every stage that counts FLOPs); ``tokens_per_layer`` and ``mlp_tokens_per_layer``
    concatenate the stages' layers in stage order. The KV fields describe the cache from the
    first stage that shaped it (what it held before: layers, context entries, bytes before) to
    the last (what it holds: kept entries, slots, bytes after, decode-time eviction), so
    GemFilter then SnapKV reports the whole prompt's bytes before and SnapKV's bytes after.
    ``batch_size`` is the largest seen. A single stage is returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    out = Stats()
    for s in parts:
        out.tokens_per_layer += s.tokens_per_layer
        out.mlp_tokens_per_layer += s.mlp_tokens_per_layer
        out.flops += s.flops
        out.flops_full += s.flops_full
        out.scoring_flops += s.scoring_flops
        out.batch_size = max(out.batch_size, s.batch_size)
    kv = [s for s in parts if s.kv_layers]
    if kv:
        for name in _KV_FROM_FIRST:
            setattr(out, name, list(getattr(kv[0], name)))
        for name in _KV_FROM_LAST:
            setattr(out, name, list(getattr(kv[-1], name)))
        out.kv_decode_steps = max(s.kv_decode_steps for s in parts)
        out.kv_decode_slots = kv[-1].kv_decode_slots
    return out
