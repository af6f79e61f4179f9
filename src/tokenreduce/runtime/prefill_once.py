"""Prefill once, compress many ways: the benchmark path of the kv-cache stage.

Compression acts on each layer's cache after its attention, so a prefill's hidden states do
not depend on the kv-cache method and one recorded forward serves them all. Each cache
`prefill_once` returns is bit for bit the one that method's own prefill inside
``tokenreduce.apply`` leaves (tested).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ..core.errors import NeverFiredError, StageError
from ..core.method import KVContext, KVMethod, RetrievalMethod
from ..core.stats import Stats
from ..families.decoders import find_decoder
from .kv_cache import DecoderAttachment, compress_layer, mark_uniform, record_compression


class _Recorder(KVMethod):
    """The method `prefill_once` attaches: every full-attention layer recorded, nothing compressed."""

    name, paper = "record", "-"

    def score(self, ctx: KVContext) -> Tensor:
        raise AssertionError("a recording prefill compresses nothing")


def prefill_once(model: nn.Module, input_ids: Tensor, methods: list[KVMethod], attention_mask: Tensor | None = None,
                 **kwargs) -> tuple[object, list[tuple[DynamicCache, Stats, float]]]:
    """Prefill ``input_ids`` once; return the forward's output and, per method, the compressed cache, its
    stats and the seconds its compression took (scoring included; the shared forward excluded).

    Each cache is what the method's own prefill inside ``tokenreduce.apply`` leaves (the same
    entries, bit for bit): compression acts on each layer's cache after its attention, so the
    hidden states of a prefill do not depend on the method and one forward serves them all.
    The caches share no tensors that decoding writes to; continue each one inside
    ``apply(model, its method)`` (decode-time eviction needs the attachment). A benchmark
    tool: the queries of every layer are held until the end (``B H N D`` floats per layer).
    """
    for m in methods:
        if not isinstance(m, KVMethod):
            raise StageError(f"prefill_once takes kv-cache methods; got {m!r}")
        if m.repositions or isinstance(m, RetrievalMethod):
            raise StageError(f"{m!r} re-positions or retrieves from the cache while decoding; prefill it inside "
                             "tokenreduce.apply")
    family, backbone = find_decoder(model)
    att = DecoderAttachment(model, family, backbone, _Recorder(keep_count=1))
    att.recording = {}
    full = DynamicCache(config=backbone.config)
    try:
        out = model(input_ids, attention_mask=attention_mask, past_key_values=full, **kwargs)
    finally:
        att.remove()
    info, recorded = att.info, att.recording
    if not recorded:
        raise NeverFiredError("the recording prefill ran no full-attention layer of the decoder")
    results = []
    first = recorded[min(recorded)]
    memos: dict[int, dict] = {li: {} for li in recorded}  # accumulated attention shared by methods that agree on it
    for m in methods:
        m.check(info)
        mine = tuple(i for i in info.compressible if m.compresses(i))
        budgets = {i: m.layer_budgets(first.lengths, i, info) for i in mine}
        t0 = time.perf_counter()
        m.begin_prefill()
        cache = DynamicCache(config=backbone.config)
        stats = Stats(batch_size=input_ids.shape[0])
        layers = []
        for li, layer in enumerate(full.layers):
            st = recorded.get(li)
            if st is None:  # a sliding-window layer: shared tensors are replaced, never written, by decoding
                layers.append(copy.copy(layer))
                continue
            keep_all = li not in mine
            plan = dataclasses.replace(st, budgets=st.lengths if keep_all else budgets[li], compress=not keep_all,
                                       keep_all=keep_all)
            new, rows = compress_layer(m, info, li, layer, plan, keep_all=keep_all, memo=memos[li])
            record_compression(stats, m, info, li, layer, new, plan, rows)
            layers.append(new)
        cache.layers = layers
        mark_uniform(cache)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
        results.append((cache, stats, time.perf_counter() - t0))
    return out, results
