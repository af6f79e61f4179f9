"""The one object of the library: a `Reduction`, the linear map X' = T X from N tokens to M.

Every method (pruning, merging, recycling, pooling, many-to-many) only *plans* a Reduction;
the ops here apply it, consistently, to everything that must follow the tokens: hidden
states, token sizes, the source map, position ids, validity masks and K/V tensors.

Two storage forms, one meaning:

* sparse: source token ``n`` of sample ``b`` goes to output slot ``dest[b, n]`` (``-1`` =
  dropped) with coefficient ``coef[b, n]``; row ``m`` of T holds the coefficients of the
  sources sent to ``m``. Pruning, merging, recycling and pooling all fit here.
* dense: ``matrix[b, m, n]`` — many-to-many maps (Token Transforming).

Batches with per-sample counts are padded to ``num_out`` slots; ``out_valid[b, m]`` says
which slots are real (a padded slot receives no source and is all zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Reduction:
    num_out: int
    dest: Tensor | None = None  # [B, N] int64, -1 = dropped
    coef: Tensor | None = None  # [B, N] float
    matrix: Tensor | None = None  # [B, M, N] float (dense form)
    keep_index: Tensor | None = None  # [B, M] int64, -1 = padding; set only for pure pruning (fast gather)

    def __post_init__(self):
        if (self.matrix is None) == (self.dest is None):
            raise ValueError("a Reduction is either sparse (dest, coef) or dense (matrix), not both")
        if self.dest is not None and (self.coef is None or self.coef.shape != self.dest.shape):
            raise ValueError("sparse Reduction needs coef of the same shape as dest")

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def identity(batch: int, num_tokens: int, device=None, dtype=torch.float32) -> "Reduction":
        index = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
        return Reduction.keep(index, num_tokens, dtype=dtype)

    @staticmethod
    def keep(index: Tensor, num_tokens: int, dtype=torch.float32) -> "Reduction":
        """Pruning: output slot m is source token ``index[b, m]`` (``-1`` = padded slot)."""
        batch, num_out = index.shape
        dest = torch.full((batch, num_tokens + 1), -1, dtype=torch.long, device=index.device)
        slots = torch.arange(num_out, device=index.device).expand(batch, num_out)
        dest.scatter_(1, torch.where(index >= 0, index, num_tokens), slots)
        dest = dest[:, :num_tokens].contiguous()
        coef = (dest >= 0).to(dtype)
        return Reduction(num_out=num_out, dest=dest, coef=coef, keep_index=index)

    @staticmethod
    def merge(dest: Tensor, num_out: int, sizes: Tensor, weights: Tensor | None = None) -> "Reduction":
        """Merging: tokens sharing a slot are averaged, weighted by ``sizes`` (x ``weights``).

        This is ToMe's size-weighted average; a slot that receives one token copies it.
        """
        w = sizes if weights is None else sizes * weights
        w = torch.where(dest >= 0, w, torch.zeros_like(w))
        total = torch.zeros(dest.shape[0], num_out + 1, dtype=w.dtype, device=w.device)
        total.scatter_add_(1, _slot(dest, num_out), w)
        coef = w / total.gather(1, _slot(dest, num_out)).clamp_min(torch.finfo(w.dtype).tiny)
        return Reduction(num_out=num_out, dest=dest, coef=coef)

    @staticmethod
    def dense(matrix: Tensor) -> "Reduction":
        return Reduction(num_out=matrix.shape[1], matrix=matrix)

    # ------------------------------------------------------------------ properties
    @property
    def batch(self) -> int:
        return (self.dest if self.dest is not None else self.matrix).shape[0]

    @property
    def num_in(self) -> int:
        return self.dest.shape[1] if self.dest is not None else self.matrix.shape[2]

    @property
    def is_dense(self) -> bool:
        return self.matrix is not None

    def to_dense(self) -> Tensor:
        """T as a [B, M, N] matrix."""
        if self.matrix is not None:
            return self.matrix
        t = torch.zeros(self.batch, self.num_out + 1, self.num_in, dtype=self.coef.dtype, device=self.coef.device)
        t.scatter_(1, _slot(self.dest, self.num_out).unsqueeze(1), self.coef.unsqueeze(1))
        return t[:, : self.num_out]

    # ------------------------------------------------------------------ ops
    def apply(self, x: Tensor) -> Tensor:
        """Reduce tokens along dim -2 of ``x`` [B, *heads, N, C] (hidden states, keys, values)."""
        if x.shape[-2] != self.num_in or x.shape[0] != self.batch:
            raise ValueError(f"Reduction maps [{self.batch}, {self.num_in}] tokens; got tensor of shape {tuple(x.shape)}")
        lead, channels = x.shape[1:-2], x.shape[-1]
        if self.matrix is not None:
            t = self.matrix.to(x.dtype).reshape(self.batch, *([1] * len(lead)), self.num_out, self.num_in)
            return t @ x
        if self.keep_index is not None:
            index = self.keep_index.clamp_min(0).reshape(self.batch, *([1] * len(lead)), self.num_out, 1)
            out = x.gather(-2, index.expand(*x.shape[:-2], self.num_out, channels))
            if bool((self.keep_index < 0).any()):
                pad = (self.keep_index >= 0).reshape(self.batch, *([1] * len(lead)), self.num_out, 1)
                out = out * pad.to(out.dtype)
            return out
        view = (self.batch, *([1] * len(lead)), self.num_in, 1)
        index = _slot(self.dest, self.num_out).reshape(view).expand(*x.shape[:-2], self.num_in, channels)
        out = x.new_zeros(*x.shape[:-2], self.num_out + 1, channels)
        out.scatter_add_(-2, index, x * self.coef.to(x.dtype).reshape(view))
        return out[..., : self.num_out, :]

    def sizes(self, size: Tensor) -> Tensor:
        """New token sizes [B, M] from sizes [B, N]: the mass each output slot covers.

        Sparse: sum of the sizes merged into a slot (dropped tokens lose theirs). Dense: each
        source spreads its size over the outputs in proportion to its column of T, so a
        many-to-many map conserves the total.
        """
        if self.matrix is not None:
            col = self.matrix.sum(1, keepdim=True)
            share = self.matrix / torch.where(col == 0, torch.ones_like(col), col)
            return (share @ size.unsqueeze(-1).to(share.dtype)).squeeze(-1).to(size.dtype)
        out = torch.zeros(self.batch, self.num_out + 1, dtype=size.dtype, device=size.device)
        out.scatter_add_(1, _slot(self.dest, self.num_out), torch.where(self.dest >= 0, size, torch.zeros_like(size)))
        return out[:, : self.num_out]

    def valid(self, valid: Tensor | None = None) -> Tensor:
        """Which output slots are real tokens [B, M]: those that receive at least one valid source."""
        if valid is None:
            valid = torch.ones(self.batch, self.num_in, dtype=torch.bool, device=self._device)
        if self.matrix is not None:
            return ((self.matrix != 0) & valid.unsqueeze(1)).any(-1)
        out = torch.zeros(self.batch, self.num_out + 1, dtype=torch.bool, device=valid.device)
        out.scatter_(1, _slot(torch.where(valid, self.dest, -1), self.num_out), True)
        return out[:, : self.num_out]

    def anchors(self) -> Tensor:
        """For each output slot, the earliest source token it covers [B, M] (-1 for an empty slot).

        Positions and masks of a merged token are taken from its anchor.
        """
        n = self.num_in
        if self.matrix is not None:
            idx = torch.arange(n, device=self.matrix.device).expand_as(self.matrix)
            first = torch.where(self.matrix != 0, idx, n).amin(-1)
        else:
            src = torch.arange(n, device=self.dest.device).expand(self.batch, n)
            first = torch.full((self.batch, self.num_out + 1), n, dtype=torch.long, device=self.dest.device)
            first.scatter_reduce_(1, _slot(self.dest, self.num_out), src, reduce="amin")
            first = first[:, : self.num_out]
        return torch.where(first == n, -1, first)

    def positions(self, position_ids: Tensor) -> Tensor:
        """Position ids [B, N] -> [B, M]: each output keeps its anchor's position (0 for padding)."""
        a = self.anchors()
        return torch.where(a >= 0, position_ids.gather(1, a.clamp_min(0)), torch.zeros_like(a))

    def then(self, nxt: "Reduction") -> "Reduction":
        """The composition: first ``self`` (N -> M), then ``nxt`` (M -> K), as one N -> K map."""
        if nxt.num_in != self.num_out:
            raise ValueError(f"cannot compose a map to {self.num_out} tokens with a map from {nxt.num_in}")
        if self.matrix is not None or nxt.matrix is not None:
            return Reduction.dense(nxt.to_dense() @ self.to_dense().to(nxt.to_dense().dtype))
        alive = self.dest >= 0
        step = self.dest.clamp_min(0)
        dest = torch.where(alive, nxt.dest.gather(1, step), -1)
        coef = torch.where(dest >= 0, self.coef * nxt.coef.gather(1, step).to(self.coef.dtype), torch.zeros_like(self.coef))
        keep = None
        if self.keep_index is not None and nxt.keep_index is not None:
            keep = torch.where(nxt.keep_index >= 0, self.keep_index.gather(1, nxt.keep_index.clamp_min(0)), -1)
        return Reduction(num_out=nxt.num_out, dest=dest, coef=coef, keep_index=keep)

    def covers(self) -> Tensor:
        """The source map [B, M, N] bool: which input tokens each output token covers."""
        return self.to_dense() != 0

    def carry_signals(self, signals: dict) -> dict:
        """Attention signals of the N tokens, carried to the M reduced ones (for a later method at the same block).

        Attention a token *receives* (the [CLS] row ``cls_attn`` [B, H, N], the columns of
        ``attn`` [B, H, N, N]) is summed over the tokens each output covers, which is what
        proportional attention gives a merged token whose sources had equal keys; per-token
        vectors (``keys``, ``queries``, ``values`` [B, H, N, D]) and the rows of ``attn`` are reduced as
        the hidden states are (size-weighted means). Other entries (``scale``) carry over unchanged.
        """
        out = dict(signals)
        cover = None
        for name in ("cls_attn", "attn"):
            if name in signals:
                cover = self.covers().to(signals[name].dtype) if cover is None else cover
        if "cls_attn" in signals:
            out["cls_attn"] = torch.einsum("bhn,bmn->bhm", signals["cls_attn"], cover)
        if "attn" in signals:
            out["attn"] = torch.einsum("bhrn,bmn->bhrm", self.apply(signals["attn"]), cover)
        for name in ("keys", "queries", "values"):
            if name in signals:
                out[name] = self.apply(signals[name])
        return out

    @property
    def _device(self):
        return (self.dest if self.dest is not None else self.matrix).device


def _slot(dest: Tensor, num_out: int) -> Tensor:
    """Destination indices with dropped tokens sent to a scratch slot ``num_out``."""
    return torch.where(dest >= 0, dest, num_out)
