"""Prefill and greedy decoding with a method attached, timed: what every decoder-side benchmark runs per prompt.

`compressed_prefill` prefills a prefix into a fresh cache compressed by a method (or the
full cache) and keeps the method attached for decoding; `shared_prefills` makes the caches
of several prefill-time kv methods from one forward (`prefill_once`); `greedy_decode`
decodes token by token, timing the suffix and the one-token steps apart. Used by
``bench kv`` and meant for the decoder stage of ``bench vlm``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .timing import sync

__all__ = ["cache_bytes", "compressed_prefill", "forkable", "shared_prefills", "Decoded", "greedy_decode"]


def cache_bytes(cache) -> int:
    """Physical bytes of keys and values in every layer of ``cache``."""
    from ..core.kv import kv_bytes

    return sum(kv_bytes(layer) for layer in cache.layers)


@contextlib.contextmanager
def compressed_prefill(model: nn.Module, prefix_ids: torch.Tensor, method=None, prefilled: tuple | None = None
                       ) -> Iterator[tuple]:
    """Prefill ``prefix_ids`` [1, N] into a fresh cache compressed by ``method`` (None: the full cache).

    A context manager yielding ``(cache, stats, seconds)``: ``stats`` the attachment's
    `Stats` (None for the full cache), ``seconds`` the prefill's wall time (the model's
    forward, synchronised). The method stays attached until the block exits, so decoding
    inside the block runs with it (decode-time eviction needs that).

    ``prefilled``: ``(cache, stats, seconds)`` already made by `shared_prefills`; then no
    forward runs here, the method is only attached for decoding.
    """
    import tokenreduce
    from transformers import DynamicCache

    device = prefix_ids.device
    with torch.inference_mode(), (tokenreduce.apply(model, method) if method is not None
                                  else contextlib.nullcontext()) as handle:
        # with the config, as generate() makes it: sliding-window layers (Gemma 3) then hold only their window
        if prefilled is not None:
            yield prefilled
            return
        cache = DynamicCache(config=model.config)
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=prefix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(device)
        seconds = time.perf_counter() - t0
        yield cache, (handle.stats if handle is not None else None), seconds


def forkable(method) -> bool:
    """Whether `prefill_once` can make ``method``'s cache (a kv method that compresses at prefill only)."""
    from ..core.method import KVMethod, RetrievalMethod

    return isinstance(method, KVMethod) and not method.repositions and not isinstance(method, RetrievalMethod)


def shared_prefills(model: nn.Module, prefix_ids: torch.Tensor, methods: list) -> list[tuple]:
    """``(cache, stats, seconds)`` per method from one prefill: seconds = the shared forward + the method's own
    compression."""
    from ..runtime import prefill_once

    device = prefix_ids.device
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        _, forks = prefill_once(model, prefix_ids, methods, logits_to_keep=1)
        sync(device)
        total = time.perf_counter() - t0
    forward = total - sum(f[2] for f in forks)
    return [(cache, stats, forward + own) for cache, stats, own in forks]


@dataclass
class Decoded:
    tokens: list[int]  # generated ids (the stop token included, if one came)
    suffix_s: float  # the suffix's forward (the rest of the prompt), which also yields the first token
    decode_s: float  # the one-token steps after it
    steps: int  # one-token forwards run


def greedy_decode(model: nn.Module, cache, suffix_ids: torch.Tensor, max_new_tokens: int,
                  stop: Sequence[int] = ()) -> Decoded:
    """Greedy decoding after a prefilled ``cache``: the suffix in one forward, then one token at a time.

    The first new token comes from the suffix's forward; every further one costs one step.
    Stops after a token in ``stop`` or ``max_new_tokens`` tokens. Written out (not
    ``generate``) so the steps are timed exactly and nothing else runs in between.
    """
    device = suffix_ids.device
    stop = {int(s) for s in stop}
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=suffix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        sync(device)
        suffix_s = time.perf_counter() - t0
        tokens = [token]
        step = torch.empty(1, 1, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        while len(tokens) < max_new_tokens and token not in stop:
            step.fill_(token)
            out = model(input_ids=step, past_key_values=cache, use_cache=True)
            token = int(out.logits[0, -1].argmax())  # .item() synchronises
            tokens.append(token)
        sync(device)
        decode_s = time.perf_counter() - t0
    return Decoded(tokens, suffix_s, decode_s, len(tokens) - 1)
