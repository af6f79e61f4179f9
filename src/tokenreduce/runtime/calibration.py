"""`calibrate(method, model, data)`: run a model over calibration data for a method that needs it.

The method owns its algorithm (what it gathers, how it fits); this module owns driving the
model. A retrieval method (A²ATS) sees, at every full-attention layer, the pre-RoPE keys and
the queries rotated to its ``relative_position`` of each chunk of a token stream run without a
cache (`kv_retrieval.capture`), then fits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..core.errors import CalibrationError, StageError
from ..core.method import EncoderMethod, LayerDropMethod, Method, RetrievalMethod, UnmergeMethod
from .attach import apply
from .kv_retrieval import capture


def calibrate(method: Method, model: nn.Module, data, **options) -> Method:
    """Calibrate ``method`` on ``model`` with ``data``; returns ``method``.

    An encoder method (DyMU): ``data`` is an iterable of batches (pixel_values [B, 3, H, W], or
    dicts of model inputs), each run with the method attached. A²ATS: ``data`` is token ids
    (one 1-D sequence, or an iterable of them); options ``chunk_size`` (2048), ``max_tokens``
    (65536) and the method's fit options (``iters``, ``seed``, ``epsilon``).
    """
    if not method.needs_calibration:
        raise StageError(f"{method!r} needs no calibration")
    if isinstance(method, RetrievalMethod):
        return _calibrate_retrieval(method, model, data, **options)
    if isinstance(method, UnmergeMethod) and method.tower is not None:  # a pipeline method: its tower's thresholds
        if options:
            raise StageError(f"calibrating {method.name} takes no options; got {sorted(options)}")
        _calibrate_by_forwards(method.tower, model, data)
        return method
    if isinstance(method, LayerDropMethod):  # an in-LLM method (YOPO's visual heads): batches of VLM inputs
        if options:
            raise StageError(f"calibrating {method.name} takes no options; got {sorted(options)}")
        return _calibrate_by_forwards(method, model, _input_dicts(data, method.name))
    if isinstance(method, EncoderMethod):
        if options:
            raise StageError(f"calibrating {method.name} takes no options; got {sorted(options)}")
        return _calibrate_by_forwards(method, model, data)
    raise StageError(f"no calibration runner for {method.stage} methods such as {method!r}")


def _calibrate_by_forwards(method: EncoderMethod | LayerDropMethod, model: nn.Module, batches):
    """Run the model on each batch with ``method`` attached; the method observes each forward's stats (its stage's)
    between ``begin_calibration`` and ``end_calibration`` (DyMU's thresholds, YOPO's visual heads)."""
    param = next(model.parameters(), None)
    method.begin_calibration()
    completed = False
    try:
        with torch.no_grad(), apply(model, method) as handle:
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                    items = len(next(iter(batch.values())))
                else:
                    if param is not None:
                        batch = batch.to(device=param.device, dtype=param.dtype)
                    model(pixel_values=batch)
                    items = batch.shape[0]
                # the tower stage's own stats (inside a VLM the connector and language model run too)
                method.observe_forward(handle.stats_by_stage.get("encoder", handle.stats), items)
        completed = True
    finally:
        method.end_calibration(completed)
    return method


def _input_dicts(batches, who: str):
    """Each batch as the dict of model inputs it must be (a VLM's ids, mask, pixels), else a clear error."""
    for batch in batches:
        if not isinstance(batch, dict):
            raise StageError(f"calibrating {who} runs a VLM: give batches as dicts of model inputs (input_ids, "
                             f"attention_mask, pixel_values, ...); got {type(batch).__name__}")
        yield batch


def _calibrate_retrieval(method: RetrievalMethod, model: nn.Module, data, *, chunk_size: int = 2048,
                         max_tokens: int = 65536, **fit_options) -> RetrievalMethod:
    seqs = token_sequences(data, method.name)
    param = next(model.parameters())
    seen = 0
    method.begin_calibration()
    with torch.no_grad(), capture(model, method.relative_position, method.observe) as (info, full):
        for seq in seqs:
            for start in range(0, len(seq), chunk_size):
                if seen >= max_tokens:
                    break
                piece = seq[start:start + min(chunk_size, max_tokens - seen)]
                model(input_ids=piece[None].to(param.device), use_cache=False)
                seen += len(piece)
    if seen == 0:
        raise CalibrationError(f"calibrating {method.name} got no tokens; pass token ids, e.g. "
                               "tokenizer(text)['input_ids'] of a few thousand tokens or more of ordinary text")
    method.fit(info, full, seen, _model_name(model), **fit_options)
    return method


def token_sequences(stream, who: str) -> list[Tensor]:
    """1-D token-id tensors from one sequence (tensor or list of ints) or an iterable of sequences."""
    if isinstance(stream, str):
        raise CalibrationError(f"calibrating {who} takes token ids, not text: pass tokenizer(text)['input_ids']")
    if isinstance(stream, Tensor):
        return [stream] if stream.dim() == 1 else list(stream.reshape(-1, stream.shape[-1]))
    items = list(stream) if isinstance(stream, Iterable) else []
    if items and all(isinstance(t, int) for t in items):
        return [torch.tensor(items)]
    out = []
    for s in items:
        t = torch.as_tensor(s)
        if t.dim() != 1:
            raise CalibrationError(f"calibrating {who}: each sequence of token ids must be 1-D; got shape "
                                   f"{tuple(t.shape)}")
        out.append(t)
    return out


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or "")
