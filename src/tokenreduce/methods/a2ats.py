"""A²ATS — Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and Query-Aware
Vector Quantization (He et al., ACL Findings 2025, arXiv 2502.12665).

The full KV cache stays (offloaded to the host in the paper); each decoding step attends
exactly over a few entries retrieved by an approximate attention score:

* **Windowed RoPE (WRoPE)** — outside a local window the relative position of query and key is
  treated as one fixed value ``w`` (``relative_position``), so the score of key ``n`` is
  ``(R_w q) · k_n`` with ``q``, ``k_n`` *before* RoPE: position-free keys that one codebook,
  shared across inputs, can quantise. WRoPE is only the retrieval score: the last ``window``
  entries and the ``sink`` first ones are always attended, and every attended entry is attended
  exactly, with the model's true RoPE.
* **Query-aware VQ** — per layer and KV head, a codebook of pre-RoPE keys is fitted to minimise
  the expected squared error of the *score*, ``E_q[((R_w q) · (k - c))²] = (k - c)ᵀ H (k - c)``
  with ``H = Σ (R_w q)(R_w q)ᵀ`` over calibration queries of the KV head's query group. With
  ``H = L Lᵀ`` (Cholesky), this is plain k-means (k-means++ init) on ``k L``. Each key is
  stored as the index of its nearest codeword in that metric.
* **Retrieval** — at a decoding step, per query head: a table ``(R_w q) · c`` over the
  codebook, looked up by the keys' codes, gives every key's approximate score; the top
  ``floor(keep_ratio × n)`` (or ``keep_count``) outside sink and window are retrieved. GQA: a KV
  head attends over the union of its query heads' picks, plus sink and window.

Prefill (and any forward with several queries) attends exactly, as the model; it only encodes
the new keys. The budget ``keep_ratio`` is the paper's ``topk`` fraction (entries retrieved per
*query head* per step, of the real context); what a KV head attends to per step is reported by
the attachment (``RetrievalStats.attended``: the union plus sink and window).

Differences from the reference code (junhuihe-hjh/A2ATS ``vqkey/models/llama_masked.py``,
``notebooks/construct_codebooks.py``; the paper's body text was not available to us beyond the
abstract, so hyper-parameters and rules follow the reference code):

* Defaults are the reference's: ``relative_position=2048`` (``wrope_relative_pos``), ``window=64``
  (``wrope_local_window``), ``sink=8``, ``codebook_size=4096``, ``H`` scaled by its RMS then
  ``+ 1e-6 I``. Its calibration stream (64k tokens of FineWeb-Edu + 16k tokens of random UUIDs,
  8k-token chunks carrying a cache) is the caller's choice here (``token_stream``); each chunk of
  ``chunk_size`` tokens runs without a cache.
* k-means: k-means++ init and Lloyd iterations as the reference, until the assignment stops
  changing or ``iters`` (reference: 300, tolerance on the centroid shift). An empty cluster
  keeps its previous centroid (the reference zeroes it). Codewords are stored in key space
  (cluster means of the original keys), the transformed copy ``c L`` is used to encode.
  With fewer calibration keys than ``codebook_size`` the codebook is those keys (exact).
* Pre-RoPE keys come from un-rotating the cached keys' new entries (the reference re-projects
  inside its own attention forward); codes are ``int16`` (reference ``int64``).
* The reference (``llama_masked.py``) computes all scores and masks the rest; we gather the
  selected K/V and call the model's attention implementation on them (as its offload variant's
  sparse kernel). Batches (left-padded) are supported: sink, window and budget are per sample
  (the reference asserts batch 1).
* Keys sharing a code tie in score; the top-k breaks ties towards the more recent entry (as
  `core.kv.select_kept`), the reference leaves it to ``torch.topk``.
* Codes are kept by the method, weakly per cache layer, so a cache prefilled in one ``apply``
  decodes in a later one; a cache reordered behind our back (beam search) is refused.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.errors import CalibrationError
from ..core.method import DecoderInfo, RetrievalMethod
from ..core.params import check_int
from ..core.registry import register


# ---------------------------------------------------------------------------- query-aware k-means
def _assign(x: Tensor, centroids: Tensor, chunk: int = 2048) -> Tensor:
    """Nearest centroid (Euclidean) of each point: ``x`` [R, N, D], ``centroids`` [R, C, D] -> [R, N]."""
    c2 = (centroids * centroids).sum(-1)[:, None, :]
    out = torch.empty(x.shape[:2], dtype=torch.long)
    for i in range(0, x.shape[1], chunk):
        out[:, i:i + chunk] = (c2 - 2 * x[:, i:i + chunk] @ centroids.transpose(1, 2)).argmin(-1)
    return out


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(labels, centroids)`` of k-means++ then Lloyd, for ``R`` independent runs at once.

    ``x`` [R, N, D] (or [N, D] for one run) -> labels [R, N], centroids [R, k', D] with
    ``k' = min(k, N)``: with ``N <= k`` every point is its own centroid (an exact codebook).
    Lloyd stops when no run's assignment changes, or after ``iters`` updates.
    """
    single = x.dim() == 2
    x = x[None] if single else x
    r, n, d = x.shape
    if n <= k:
        labels, cent = torch.arange(n).expand(r, n).clone(), x.clone()
    else:
        rows = torch.arange(r)
        xx = (x * x).sum(-1)  # [R, N]
        cent = torch.empty(r, k, d, dtype=x.dtype)
        cent[:, 0] = x[rows, torch.randint(n, (r,), generator=generator)]
        d2 = torch.full((r, n), float("inf"), dtype=x.dtype)
        for i in range(k):  # k-means++: the next centroid with probability ∝ squared distance to the chosen ones
            if i:
                cdf = d2.cumsum(-1)
                u = (1 - torch.rand(r, 1, generator=generator, dtype=x.dtype)) * cdf[:, -1:]  # in (0, total]
                cent[:, i] = x[rows, torch.searchsorted(cdf, u).squeeze(-1).clamp(max=n - 1)]
            c = cent[:, i]
            dist = xx - 2 * (x @ c[:, :, None]).squeeze(-1) + (c * c).sum(-1, keepdim=True)
            d2 = torch.minimum(d2, dist.clamp(min=0))
        labels = _assign(x, cent)
        for _ in range(iters):
            sums = torch.zeros_like(cent).scatter_add_(1, labels[..., None].expand(r, n, d), x)
            counts = torch.zeros(r, k, dtype=x.dtype).scatter_add_(1, labels, torch.ones(r, n, dtype=x.dtype))
            cent = torch.where((counts > 0)[..., None], sums / counts.clamp(min=1)[..., None], cent)
            new = _assign(x, cent)
            if torch.equal(new, labels):
                break
            labels = new
    return (labels[0], cent[0]) if single else (labels, cent)


# ---------------------------------------------------------------------------- codebooks
@dataclass
class Codebooks:
    """Per full-attention layer and KV head: codewords (pre-RoPE key space) and the query-aware metric's factor."""

    codewords: Tensor  # [L, H_kv, C, D] float32
    factors: Tensor  # [L, H_kv, D, D] float32 lower-triangular, H = L Lᵀ (RMS-normalised, + eps I)
    layers: tuple[int, ...]  # the model's full-attention layer indices, in order
    num_heads: int
    relative_position: int
    model_name: str = ""
    tokens: int = 0  # calibration tokens
    codewords_t: Tensor = field(init=False, repr=False)  # codewords @ L: the encoding copy
    norms_t: Tensor = field(init=False, repr=False)  # |c L|² [L, H_kv, C]

    def __post_init__(self):
        self.codewords_t = self.codewords @ self.factors
        self.norms_t = (self.codewords_t * self.codewords_t).sum(-1)

    @property
    def size(self) -> int:
        return self.codewords.shape[2]

    def state(self) -> dict:
        return dict(codewords=self.codewords, factors=self.factors, layers=list(self.layers), num_heads=self.num_heads,
                    relative_position=self.relative_position, model_name=self.model_name, tokens=self.tokens)


# ---------------------------------------------------------------------------- the method
@register
class A2ATS(RetrievalMethod):
    name = "a2ats"
    paper = ("A²ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and Query-Aware "
             "Vector Quantization (He et al., ACL Findings 2025)")
    arxiv = "2502.12665"
    needs_calibration = True
    signals = ("codes",)

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, codebook_size: int = 4096,
                 window: int = 64, sink: int = 8, relative_position: int = 2048):
        super().__init__(keep_ratio, keep_count)
        self.codebook_size = check_int(self.name, "codebook_size", codebook_size, min=1)
        self.window = check_int(self.name, "window", window, min=1, why="the window holds the current token")
        self.sink = check_int(self.name, "sink", sink, min=0)
        self.relative_position = check_int(self.name, "relative_position", relative_position, min=0)
        self.codebooks: Codebooks | None = None
        # (codes [B, H_kv, N], fingerprint) of every cache layer this method encoded, keyed weakly by the layer object
        self.codes: weakref.WeakKeyDictionary[object, tuple] = weakref.WeakKeyDictionary()

    def describe(self) -> str:
        cb = (f"codebooks of {self.codebooks.size} on {self.codebooks.tokens} tokens" if self.codebooks
              else "uncalibrated")
        return f"{super().describe()}, window={self.window}, sink={self.sink}, w={self.relative_position}, {cb}"

    # ------------------------------------------------------------------ calibration
    # `tokenreduce.calibrate(method, model, token_ids)` runs the token stream in chunks without a cache and hands
    # every full-attention layer's pre-RoPE keys and windowed-RoPE queries to `observe`; `fit` builds the codebooks.
    def begin_calibration(self) -> None:
        self._keys: dict[int, list[Tensor]] = {}
        self._grams: dict[int, Tensor] = {}

    def observe(self, k: int, keys_pre: Tensor, query_w: Tensor) -> None:
        b, hk, q, d = keys_pre.shape
        self._keys.setdefault(k, []).append(keys_pre.float().cpu().permute(1, 0, 2, 3).reshape(hk, b * q, d))
        g = query_w.shape[1] // hk
        qq = query_w.double().cpu().reshape(b, hk, g, q, d).permute(1, 0, 2, 3, 4).reshape(hk, -1, d)
        gram = qq.transpose(1, 2) @ qq  # this chunk's part of H = E[(R_w q)(R_w q)^T], per KV head
        self._grams[k] = gram if k not in self._grams else self._grams[k] + gram

    def fit(self, info: DecoderInfo, full: tuple[int, ...], tokens: int, model_name: str = "", *, iters: int = 30,
            seed: int = 0, epsilon: float = 1e-6) -> None:
        """Per layer and KV head: ``L = cholesky(H / rms(H) + epsilon I)``, k-means (``codebook_size``, ``iters``) on
        the pre-RoPE keys times ``L``; codewords are the clusters' mean keys."""
        keys, grams = self._keys, self._grams
        self._keys, self._grams = {}, {}
        gen = torch.Generator().manual_seed(seed)
        keys_all = torch.stack([torch.cat(keys[k], dim=1) for k in range(len(full))])  # [L, H_kv, N, D]
        n_layers, hk, n, d = keys_all.shape
        grams_all = torch.stack([grams[k] for k in range(len(full))])  # [L, H_kv, D, D] float64
        rms = grams_all.pow(2).mean((-2, -1), keepdim=True).sqrt()
        grams_all = grams_all / torch.where(rms > 0, rms, torch.ones_like(rms))
        factors = torch.linalg.cholesky(grams_all + epsilon * torch.eye(d, dtype=grams_all.dtype)).float()
        x = (keys_all @ factors).reshape(n_layers * hk, n, d)  # every (layer, KV head) run in one batch
        labels, cent_t = kmeans(x, self.codebook_size, iters, gen)
        # codewords in key space: cluster means of the keys (an empty cluster keeps its centroid, mapped back)
        flat_keys = keys_all.reshape(n_layers * hk, n, d)
        c = cent_t.shape[1]
        counts = torch.zeros(n_layers * hk, c).scatter_add_(1, labels, torch.ones(labels.shape))
        means = torch.zeros(cent_t.shape).scatter_add_(1, labels[..., None].expand(-1, -1, d), flat_keys)
        means = means / counts.clamp(min=1)[..., None]
        back = torch.linalg.solve_triangular(factors.reshape(-1, d, d), cent_t, upper=False, left=False)
        words = torch.where((counts > 0)[..., None], means, back).reshape(n_layers, hk, c, d)
        self.codebooks = Codebooks(words, factors, tuple(full), info.num_heads, self.relative_position, model_name,
                                   tokens)
        self.codes.clear()  # codes of earlier codebooks mean nothing now

    def save_codebooks(self, path) -> None:
        if self.codebooks is None:
            raise CalibrationError("a2ats: nothing to save; call tokenreduce.calibrate(method, model, token_ids) first")
        torch.save(self.codebooks.state(), path)

    def load_codebooks(self, path) -> A2ATS:
        s = torch.load(path, weights_only=True)
        s["layers"] = tuple(s["layers"])
        self.codebooks = Codebooks(**s)
        self.codes.clear()
        return self

    # ------------------------------------------------------------------ attach-time check
    def check(self, info: DecoderInfo, full: tuple[int, ...] | None = None) -> None:
        cb = self.codebooks
        if cb is None:
            raise CalibrationError(
                "a2ats needs codebooks calibrated on this model before use: call "
                "`tokenreduce.calibrate(method, model, token_ids)` (token ids of ordinary text, a few thousand tokens or more; the "
                "paper uses 64k tokens of FineWeb-Edu + 16k of random strings) or `method.load_codebooks(path)`")
        got = (tuple(cb.layers), cb.codewords.shape[1], cb.codewords.shape[3], cb.num_heads)
        want = (tuple(full if full is not None else info.compressible), info.num_kv_heads, info.head_dim, info.num_heads)
        if got != want:
            raise CalibrationError(f"a2ats codebooks were calibrated for a model with (full layers, KV heads, head dim, "
                                   f"heads) = {got}, this model has {want}: calibrate on this model")
        if cb.relative_position != self.relative_position:
            raise CalibrationError(f"a2ats codebooks were calibrated with relative_position={cb.relative_position}, the "
                                   f"method uses {self.relative_position}: recalibrate (the metric H depends on it)")

    # ------------------------------------------------------------------ encode, score, select
    def encode(self, k: int, keys_pre: Tensor, chunk: int = 256) -> Tensor:
        """Codes [B, H_kv, q] of pre-RoPE keys [B, H_kv, q, D]: nearest codeword in the query-aware metric."""
        cb = self.codebooks
        lower = cb.factors[k].to(keys_pre.device)
        words_t = cb.codewords_t[k].to(keys_pre.device)
        norms = cb.norms_t[k].to(keys_pre.device)[None, :, None, :]
        dtype = torch.int16 if cb.size <= 32767 else torch.int32
        out = []
        for i in range(0, keys_pre.shape[-2], chunk):
            x = keys_pre[..., i:i + chunk, :].float() @ lower
            out.append((norms - 2 * x @ words_t.transpose(-1, -2)).argmin(-1).to(dtype))
        return torch.cat(out, dim=-1)

    def approximate_scores(self, k: int, query_w: Tensor, codes: Tensor, scaling: float) -> Tensor:
        """``(R_w q) · c[code(n)] × scaling`` [B, H_kv, g, K] for decoding queries ``query_w`` [B, H, 1, D]."""
        words = self.codebooks.codewords[k].to(query_w.device)  # [H_kv, C, D]
        b, h, _, d = query_w.shape
        hk, n = words.shape[0], codes.shape[-1]
        g = h // hk
        table = query_w.float().reshape(b, hk, g, d) @ words.transpose(-1, -2)  # [B, H_kv, g, C]
        return table.gather(-1, codes.long()[:, :, None, :].expand(b, hk, g, n)) * scaling

    def retrieval_budget(self, lengths: Tensor) -> Tensor:
        """Entries retrieved per query head [B] for contexts of ``lengths`` real entries (before sink/window)."""
        n = lengths.to(torch.long)
        if self.count is not None:
            return n.clamp(max=self.count.count)
        return torch.floor(n.to(torch.float64) * self.budget.ratio + 1e-9).to(torch.long)

    def decode_selection(self, k: int, query_w: Tensor, codes: Tensor, valid: Tensor, scaling: float):
        """``(selected [B, H_kv, K], scores [B, H_kv, g, K], picked [B, H_kv, g, K])`` of one decoding step.

        ``valid`` [B, K]: real entries (left padding). Sink: each sample's first ``sink`` real
        entries; window: the last ``window`` slots (the current token included). ``picked``: each
        query head's top ``retrieval_budget`` among the rest by approximate score (keys sharing a
        code tie: the more recent wins, as `core.kv.select_kept`; the reference leaves it to topk).
        """
        scores = self.approximate_scores(k, query_w, codes, scaling)
        b, hk, g, n = scores.shape
        rank = valid.long().cumsum(-1) - 1
        forced = valid & ((rank < self.sink) | (torch.arange(n, device=valid.device) >= n - self.window))
        candidate = valid & ~forced
        budget = self.retrieval_budget(valid.sum(-1))
        top = int(min(int(budget.max()), n))
        if top > 0:
            masked = scores.masked_fill(~candidate[:, None, None, :], float("-inf"))
            # the budget-th best score of each row; everything above it is in, and among the entries equal to it
            # (keys sharing a code) the most recent ones fill the budget
            kth = masked.topk(top, dim=-1).values.gather(-1, (budget - 1).clamp(min=0).to(scores.device)
                                                          .view(b, 1, 1, 1).expand(b, hk, g, 1))
            above = masked > kth
            tied = (masked == kth) & candidate[:, None, None, :]
            need = budget.to(scores.device).view(b, 1, 1, 1) - above.sum(-1, keepdim=True)
            from_end = tied.flip(-1).cumsum(-1).flip(-1)  # ties at or after each position
            picked = (above | (tied & (from_end <= need))) & (budget > 0).to(scores.device).view(b, 1, 1, 1)
        else:
            picked = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        selected = (picked.any(2) | forced[:, None, :]) & valid[:, None, :]
        return selected, scores, picked

    def device_tensors(self) -> dict[str, Tensor]:
        """What the device holds besides the codes (for the placement figures)."""
        cb = self.codebooks
        return {"codebooks": cb.codewords, "codebooks_metric_space": cb.codewords_t, "codeword_norms": cb.norms_t,
                "cholesky_factors": cb.factors}

    def scoring_flops(self, length: int, rows: int, info: DecoderInfo) -> float:
        """One decoding step, one layer, one sample: score table, lookup, and encoding the new key."""
        c, d = self.codebook_size if self.codebooks is None else self.codebooks.size, info.head_dim
        return 2.0 * info.num_heads * c * d + info.num_heads * length + 2.0 * info.num_kv_heads * (d * d + c * d)
