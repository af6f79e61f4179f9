"""VFlowOpt — A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization (Yang, Xu, Cui,
Wang, Lin, Pang; ICCV 2025; arXiv 2508.05211). Official code: github.com/sihany077/VFlowOpt.

The paper builds an importance map of the visual tokens from the vision tower's own attention, keeps the
important tokens and folds the unimportant ones into a few "recycled" tokens, prunes again inside the language
model with the same map, and tunes the few hyperparameters of this strategy per model by an offline search that
keeps the last prompt token's representation close to the unpruned model's (`tokenreduce.search.vflowopt`).

The tower stage, per image, at the tower's select layer (the block whose output the projector reads; in the
reference block 25 of LLaVA-OneVision's SigLIP, whose 27th and last block it deletes):

1. Average the select layer's softmax attention map over heads: ``A`` [N, N] over all of the layer's tokens.
2. The attention each token *receives*, averaged over all queries: ``r_j = mean_i A[i, j]``.
3. The "global" tokens are those receiving more than ``t`` times the average: ``r_j > t * mean(r)``.
4. A visual token's importance is the attention the global tokens pay it, averaged over them:
   ``s_j = mean_{g in global} A[g, j]``, plus ``alpha * softmax(H)_j`` where ``H_j`` is the Shannon entropy of
   image patch j's grey-level histogram (256 bins). (The released configurations use ``alpha = 0``.)
5. Sort the visual tokens by ``s``; the lowest ones are *recycled*: grouped by the ``a x a`` cell of the patch
   grid they lie in (cell of the token at (row, col) = ``(floor(row / a), floor(col / a))``), each group becomes
   one token, the ``s``-weighted mean of its members. Every other token is kept as it is.
6. (The in-LLM method `methods.vflowopt_llm`, composed after this one.) At language-model layers 9 and 18 the
   visual tokens still present are pruned again, the lowest by the same tower map ``s``, to the fractions the search
   found. This method hands ``s`` of each output token over (`prior`; a recycled token has its strongest member's
   score, as in the reference).

Budget (every connector method's meaning): ``keep_ratio`` keeps ``k = floor(keep_ratio * n)`` tokens per image
(or ``keep_count``), recycled tokens included. The reference recycles its ``n - k`` lowest tokens plus
``int(n / a**2)`` more (an estimate of how many cells they occupy, so that the kept plus the recycled tokens come
to about ``k``). Here the number of extra recycled tokens is solved exactly: the fewest lowest tokens (at least
``n - k``) such that the kept ones plus one token per occupied cell are exactly ``k``. (Recycling one more token
lowers that total by one or leaves it, so this count exists whenever the cells of the whole grid number at most
``k``. When they number more — ``a`` too small for the budget — the reference's count is used and the recycled
tokens with the least summed importance are dropped until ``k`` remain.)

What the connector stage computes. The connector hands the method the tower select layer's whole softmax
map (``needs_attention_map``: `core.method.VisualContext.tower_attention`, [H, N, N], from the layer's own Q and
K in its routed attention call), so steps 1-4 run as above. ``scored_with`` says what the last plan used: "global
tokens" (the map), or "[CLS] row" for a caller that builds a context without the map (then the [CLS] token is
taken to be the only global token and ``t`` has no effect; on the mini-LLaVA, DINOv2-S at block -2, this is
the same for ``t`` from about 4 to 34: its [CLS] token receives 34-40 times the mean attention and the next
token 2-4 times, measured on calibration images). ``alpha`` must be 0: the entropy term needs the raw image,
which the connector never sees; `importance` and `patch_entropy` implement the term for callers that have it.

Differences from the reference code (sihany077/VFlowOpt at 129eeef: ``siglip_encoder.py``
``SigLipEncoderLayer.forward`` and ``SigLipVisionEmbeddings.forward``; ``llava_qwen_training_free.py``
``prepare_inputs_labels_for_multimodal``; ``modeling_qwen2.py`` ``forward_illava``; ``llava_ov_opt_all.py``
``generate_until``):

* The language-model drops (step 6) are a method of their own, `methods.vflowopt_llm`: the reference prunes
  again at LLM layers 9 and 18 with the tower's map (handed over through an environment variable); here this
  method gives each output token's score (``gives_prior``, `prior`), the connector hands the scores over with its
  rewritten rows, and ``apply(model, vflowopt, vflowopt_llm)`` drops by them (see that module for its
  differences). Alone, this method's ``keep_ratio`` is the fraction of visual tokens kept in every layer.
* The importance map: ``alpha != 0`` is refused (no pixels at the connector).
* When no token receives more than ``t`` times the mean (the reference then averages an empty set: NaN scores),
  the single most-attended token is the global set.
* The budget is exact (``k`` tokens per image, recycled ones included), as described above; the reference's
  count is ``k - int(n / a**2) + (occupied cells)``, which may differ from ``k`` either way.
* Place and order: the reference writes a recycled token at its most important member's index; here every
  output token sits at its earliest source's position (the connector's convention), kept tokens at their own
  (``renumber=True``: end-aligned renumbering, as the reference numbers the shorter prompt from 0 up).
* Tokens: the reference scores and recycles the projected features of the anyres base image and crops with
  27 x 27 and 729 hard-coded (newline tokens get score 1 so that they are always kept); here each image's
  tokens must be one raster grid (``VisualContext.grid``, e.g. LLaVA-1.5 / the mini-LLaVA), other layouts are
  refused. Scoring and merging work on the projected features, as in the reference.
* Batches: the reference runs batch 1 (asserted); here images are planned one by one and samples left-padded.
* Entropy (`patch_entropy`): the reference multiplies the *normalised* pixel values by 255 and casts them to
  uint8 (negative values wrap), with a hard-coded 14-pixel patch; ours takes pixels in [0, 1] (or [0, 255]) and
  the tower's patch size.
* Hyperparameters: the reference's released values (for a 27 x 27 grid of LLaVA-OneVision-7B) are
  ``t`` = 28.7 / 34.8 / 39.3 and ``a`` = 11.8 / 15.6 / 17.4 at 50 / 25 / 10 % of the tokens kept overall; the
  defaults here are the 25 % ones. Search them for your model (`tokenreduce.search.vflowopt`) and pass the saved
  file as ``params_file``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..core.budget import check_keep_count, check_keep_ratio
from ..core.errors import ParameterError, StageError
from ..core.method import ConnectorMethod, VisualContext
from ..core.params import check_bool, check_float
from ..core.reduction import Reduction
from ..core.registry import register

DEFAULT_T = 34.759552803070484  # the reference's released 25 % configuration (illava_vit_t)
DEFAULT_A = 15.580797034937687  # ... (illava_vit_m)
PARAMS_FORMAT = "tokenreduce.vflowopt-params"
PARAMS_VERSION = 1
SEARCHED = ("t", "a", "alpha")  # the hyperparameters a params file holds


# ---------------------------------------------------------------------------- the importance map
def importance(attention: Tensor, n: int, t: float, alpha: float = 0.0,
               entropy: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Steps 1-4: ``(scores [n], global token indices)`` of the last ``n`` tokens from the select layer's softmax map
    ``attention`` ([H, N, N] or [N, N], rows = queries) and, when ``alpha != 0``, the patches' ``entropy`` [n]."""
    a = attention.float()
    if a.dim() == 3:
        a = a.mean(0)
    received = a.mean(0)  # [N]: attention each token receives, averaged over the queries
    glob = (received > t * received.mean()).nonzero().flatten()
    if glob.numel() == 0:  # nobody stands out that much: the most-attended token alone
        glob = received.argmax().reshape(1)
    score = a[glob].mean(0)[-n:]
    if alpha:
        if entropy is None:
            raise StageError("vflowopt: alpha != 0 needs the patches' entropy")
        score = score + alpha * entropy.float().softmax(-1)
    return score, glob


def patch_entropy(pixels: Tensor, patch: int) -> Tensor:
    """The Shannon entropy (bits) of each ``patch x patch`` patch's grey-level histogram, in raster order [P].

    ``pixels`` [3, H, W] in [0, 1] (or [0, 255]); grey = the mean of the three channels, rounded to 0..255."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise StageError(f"vflowopt: patch_entropy takes one RGB image [3, H, W]; got {tuple(pixels.shape)}")
    x = pixels.float()
    if float(x.max()) <= 1.0:
        x = x * 255.0
    grey = x.mean(0).round().clamp(0, 255).long()
    h, w = grey.shape[0] // patch, grey.shape[1] // patch
    tiles = grey[: h * patch, : w * patch].reshape(h, patch, w, patch).permute(0, 2, 1, 3).reshape(h * w, -1)
    hist = torch.zeros(h * w, 256, dtype=torch.float32, device=x.device)
    hist.scatter_add_(1, tiles, torch.ones_like(tiles, dtype=torch.float32))
    p = hist / hist.sum(-1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


# ---------------------------------------------------------------------------- recycling
def cells_of(grid: tuple[int, int], a: float, device=None) -> Tensor:
    """The ``a x a`` cell of each token of a raster ``grid`` (rows, cols), numbered row by row [rows * cols]."""
    rows, cols = grid
    idx = torch.arange(rows * cols, device=device)
    r = torch.floor((idx // cols).double() / a).long()
    c = torch.floor((idx % cols).double() / a).long()
    per_row = int(math.floor((cols - 1) / a)) + 1
    return r * per_row + c


def recycle(score: Tensor, grid: tuple[int, int], budget: int, a: float) -> tuple[Tensor, Tensor, int]:
    """Step 5 within ``budget`` (see the module docstring): ``(dest [n], coef [n], outputs)``, outputs in the order
    of their earliest source; a recycled token is its members' ``score``-weighted mean (uniform if they sum to 0)."""
    n = score.numel()
    dev = score.device
    cell = cells_of(grid, a, device=dev).tolist()
    order = torch.sort(score.float(), stable=True).indices.tolist()  # ascending; ties: the earlier token first
    seen: set[int] = set()
    low = n - budget
    for j in order[:low]:
        seen.add(cell[j])
    while n - low + len(seen) > budget and low < n:
        seen.add(cell[order[low]])
        low += 1
    drop_groups = 0
    if n - low + len(seen) > budget:  # more cells than the budget: the reference's count, the weakest groups dropped
        low = min(n, n - budget + int(n / a ** 2))
        drop_groups = n - low + len({cell[j] for j in order[:low]}) - budget
    kept = order[low:]
    groups: dict[int, list[int]] = {}
    for j in order[:low]:
        groups.setdefault(cell[j], []).append(j)
    s = score.float().tolist()
    members = [[j] for j in kept] + list(groups.values())
    if drop_groups > 0:
        recycled = sorted(groups.values(), key=lambda g: (sum(s[j] for j in g), -min(g)))
        gone = {min(g) for g in recycled[:drop_groups]}
        members = [[j] for j in kept] + [g for g in groups.values() if min(g) not in gone]
    members.sort(key=min)
    dest = torch.full((n,), -1, dtype=torch.long)
    coef = torch.zeros(n, dtype=torch.float32)
    for slot, group in enumerate(members):
        total = sum(s[j] for j in group)
        for j in group:
            dest[j] = slot
            coef[j] = 1.0 if len(group) == 1 else (s[j] / total if total > 0 else 1.0 / len(group))
    return dest.to(dev), coef.to(dev), len(members)


# ---------------------------------------------------------------------------- the params file
def save_params(path: str | Path, params: Mapping[str, Any], keep_ratio: float | None = None,
                source: Mapping[str, Any] | None = None) -> Path:
    """Write VFlowOpt's hyperparameters (``t``, ``a``, ``alpha``; e.g. found by `tokenreduce.search.vflowopt`) as a
    small versioned JSON file that ``get_method("vflowopt", params_file=path)`` reads."""
    unknown = sorted(set(params) - set(SEARCHED))
    if unknown:
        raise ParameterError(f"vflowopt: unknown hyperparameters {unknown}; a params file holds {list(SEARCHED)}")
    clean = _check_params({k: params.get(k) for k in SEARCHED}, "vflowopt params")
    data = {"format": PARAMS_FORMAT, "version": PARAMS_VERSION, "params": clean, "keep_ratio": keep_ratio,
            "source": dict(source or {})}
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def load_params(path: str | Path) -> dict[str, Any]:
    """``{"params": {t, a, alpha}, "keep_ratio": ..., "source": {...}}`` of a params file, checked."""
    where = f"vflowopt: params_file {path}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ParameterError(f"{where} does not exist") from e
    except (OSError, ValueError) as e:
        raise ParameterError(f"{where} is not readable JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != PARAMS_FORMAT:
        raise ParameterError(f"{where}: expected a JSON object with \"format\": \"{PARAMS_FORMAT}\" (written by "
                             "tokenreduce.search.vflowopt or save_params)")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= PARAMS_VERSION:
        raise ParameterError(f"{where}: version {version!r} is not supported (this tokenreduce reads versions "
                             f"1..{PARAMS_VERSION})")
    params = data.get("params")
    if not isinstance(params, dict) or sorted(set(params) - set(SEARCHED)):
        raise ParameterError(f"{where}: \"params\" must be an object with keys among {list(SEARCHED)}")
    ratio = data.get("keep_ratio")
    if ratio is not None:
        ratio = check_keep_ratio("vflowopt", ratio)
    return {"params": _check_params({k: params.get(k) for k in SEARCHED}, where), "keep_ratio": ratio,
            "source": data.get("source") or {}}


def _check_params(p: Mapping[str, Any], where: str) -> dict[str, Any]:
    t = check_float(where, "t", p.get("t"), min=0.0, optional=True,
                    why="global tokens receive more than t times the mean attention")
    a = check_float(where, "a", p.get("a"), min=1.0, optional=True, why="the side of the recycling cells, in tokens")
    alpha = p.get("alpha")
    alpha = 0.0 if alpha is None else check_float(where, "alpha", alpha, min=0.0, why="the weight of the entropy term")
    return {"t": t, "a": a, "alpha": alpha}


# ---------------------------------------------------------------------------- the method
@register
class VFlowOpt(ConnectorMethod):
    name = "vflowopt"
    paper = ("VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization "
             "(Yang et al., ICCV 2025)")
    arxiv = "2508.05211"
    needs_cls = True
    needs_attention_map = True
    gives_prior = True

    def __init__(self, keep_ratio: float | None = None, keep_count: int | None = None, t: float | None = None,
                 a: float | None = None, alpha: float | None = None, params_file: str | None = None,
                 renumber: bool = False):
        loaded = None
        if params_file is not None:
            if not isinstance(params_file, (str, Path)):
                raise ParameterError(f"vflowopt: params_file must be a path (str); got {params_file!r}")
            given = [k for k, v in (("t", t), ("a", a), ("alpha", alpha)) if v is not None]
            if given:
                raise ParameterError(f"vflowopt: give {given[0]} or params_file, not both (the file fixes "
                                     f"{', '.join(SEARCHED)})")
            loaded = load_params(params_file)
            t, a, alpha = (loaded["params"][k] for k in SEARCHED)
            if keep_ratio is None and keep_count is None:
                keep_ratio = loaded["keep_ratio"]  # the budget the parameters were searched at
        keep_ratio = check_keep_ratio(self.name, keep_ratio)
        keep_count = check_keep_count(self.name, keep_count)
        super().__init__(keep_ratio, keep_count)
        p = _check_params({"t": t, "a": a, "alpha": alpha}, self.name)
        self.t = DEFAULT_T if p["t"] is None else p["t"]
        self.a = DEFAULT_A if p["a"] is None else p["a"]
        self.alpha = p["alpha"]
        if self.alpha != 0.0:
            raise ParameterError(f"vflowopt: alpha={alpha!r}: the patch-entropy term needs the raw image, which the "
                                 "connector stage does not receive (VisualContext has no pixels); use alpha=0, the "
                                 "value of the reference's released configurations")
        self.params_file = None if params_file is None else str(params_file)
        self.params_source = loaded["source"] if loaded else None
        self.renumber = check_bool(self.name, "renumber", renumber, why="True = the reference's renumbered positions")
        self.scored_with: str | None = None  # "global tokens" (the whole map) or "[CLS] row", set by each plan

    def describe(self) -> str:
        return f"{super().describe()}, t={self.t:.4g}, a={self.a:.4g}"

    def scores(self, ctx: VisualContext) -> Tensor:
        """The importance of each of the image's tokens [n] (steps 1-4, or the [CLS] row; module docstring)."""
        n = ctx.features.shape[0]
        full = getattr(ctx, "tower_attention", None)
        if full is not None:
            if full.dim() != 3 or full.shape[-1] != full.shape[-2] or full.shape[-1] < n:
                raise StageError(f"vflowopt: tower_attention must be [H, N, N] with the image's {n} tokens last; got "
                                 f"{tuple(full.shape)}")
            self.scored_with = "global tokens"
            return importance(full, n, self.t)[0]
        if ctx.cls_attention is None:
            raise StageError("vflowopt scores visual tokens by the tower's attention, and this call carries neither "
                             "the select layer's map nor its [CLS] row")
        self.scored_with = "[CLS] row"
        return ctx.cls_attention.float().mean(0)

    def plan(self, ctx: VisualContext) -> Reduction:
        n = ctx.features.shape[0]
        dev = ctx.features.device
        if ctx.budget >= n:
            return Reduction.identity(1, n, device=dev)
        if ctx.grid is None or ctx.grid[0] * ctx.grid[1] != n:
            raise StageError(f"vflowopt recycles tokens within a x a cells of the patch grid, and this image's {n} "
                             "tokens are not one raster grid (a tower reduction ran before it, or tiles / newline "
                             "tokens); use it on single-grid images (LLaVA-1.5 style) or use fastervlm / visionzip")
        dest, coef, m = recycle(self.scores(ctx), ctx.grid, ctx.budget, self.a)
        return Reduction(num_out=m, dest=dest[None], coef=coef[None])

    def prior(self, ctx: VisualContext, plan: Reduction) -> Tensor:
        """The tower map ``s`` of each output token of ``plan`` [num_out]: a kept token its own, a recycled token its
        strongest member's (the reference writes the recycled token at that member's index and keeps that index's
        score for the language-model drops)."""
        score = self.scores(ctx).float()
        out = torch.full((plan.num_out,), float("-inf"), dtype=torch.float32, device=score.device)
        if plan.dest is not None:
            dest = plan.dest[0].to(score.device)
            mine = dest >= 0
            return out.scatter_reduce(0, dest[mine], score[mine], reduce="amax")
        members = plan.to_dense()[0].to(score.device) != 0  # [M, n]
        return torch.where(members, score[None], out[:, None]).amax(-1)

    def scoring_flops(self, n: int, ctx: VisualContext) -> float:
        h, d = ctx.tower_keys.shape[0], ctx.tower_keys.shape[-1]
        full = getattr(ctx, "tower_attention", None)
        if full is not None:  # the whole map: every query against every key
            return 2.0 * h * full.shape[-1] ** 2 * d + 2.0 * n
        return 2.0 * h * (n + 1) * d + 2.0 * n  # the [CLS] row; the weighted means
