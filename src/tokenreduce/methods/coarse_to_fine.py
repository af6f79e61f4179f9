"""Coarse-to-fine text-guided token pruning — When Large Vision-Language Model Meets Large Remote Sensing Imagery:
Coarse-to-Fine Text-Guided Token Pruning (Luo et al., ICCV 2025, arXiv 2503.07588).

A large image is shown as a pyramid: a coarse view of the whole scene, then the tiles of a finer
level. The text decides where to look: the attention from the prompt's last token to the coarse
view's visual tokens (the Region Focus Module's signal) picks the tiles worth reading at the finer
level (the Dynamic Image Pyramid step), and inside what is kept the same attention prunes tokens.
With a two-level pyramid — the prompt holds the coarse view, then the ``G x G`` tiles in raster
order, every image its own run of visual tokens — one drop layer ``K`` of the language model does it
(`runtime.in_llm`), per sample:

1. score: layer ``K``'s norm, Q/K projections and RoPE on its input (``scores_from="own"``, as the
   reference's RFM scores with its last layer's projections), the last prompt token's query against
   every key, softmax *restricted to the coarse view's tokens* (each head renormalised over them),
   mean over heads;
2. tile selection: the top ``floor(select_ratio * T)`` coarse tokens (at least 1; ``T`` tokens on a
   ``s x s`` raster) each vote for the tile under it — coarse token ``(r, c)`` lies over tile
   ``(floor(r G / s), floor(c G / s))``; every tile with a vote is selected, ranked by votes (ties: the
   larger attention mass of the coarse tokens over it, then the earlier tile), at most ``max_tiles``;
3. every token of the tiles not selected is dropped;
4. prune: the coarse view's tokens and the selected tiles' tokens are ranked by the same row, softmax
   restricted to them (each head renormalised), mean over heads; the top ``budget`` are kept (ties:
   the earlier token). When they are fewer than the budget all of them stay (the kept count is then
   below the schedule's; the stats count what was kept).

Layout, two kinds. **LLaVA-NeXT's AnyRes** (the model tiles a big image itself): the base view is the coarse view
and the crops are the tiles, read from the model's own packing (`families.vlms.anyres_tiles`: unpadding and the
row-ending newlines included); the crop under a base token is the one at the same relative place of the crops'
raster (both span the whole image), grids need not be square (1 x 2, 3 x 1, ...), newline tokens stay in the
pruning pool (they belong to no crop), and one AnyRes image per prompt is required. **Separate images** (the
large-scene prompt on LLaVA): ``grid=None`` reads the images from the prompt — each maximal run of visual tokens (images
separated by text, as the large-scene prompt's ``<image>\\n<image>\\n...``) is one image; there must be
``1 + G * G`` runs for some ``G >= 1``. ``grid=G`` splits each sample's visual tokens into ``1 + G * G``
images of equal size in prompt order (coarse first), for prompts whose images touch. For ``G >= 2``
the coarse view's token count must be a square (its raster). Anything else raises `StageError`.

The selected tiles of every sample are appended to ``choices`` (one dict per sample and prefill:
``grid`` (G, or AnyRes's ``(rows, columns)``), ``tiles`` ranked (row-major, 0-based), ``votes`` per tile, ``kept``);
clear it between batches to read them.

Budget: ``k`` (default 2) and ``r`` (the fraction of visual tokens dropped at ``k``; default 0.5) natively,
or ``keep_ratio`` = the fraction of visual tokens kept averaged over the language model's layers, which
with ``k`` fixes ``r = (1 - keep_ratio) L / (L - k)`` (below ``k / L`` unreachable, refused), or a
``schedule`` with exactly one drop layer.

Reference read: VisionXLab/LRS-VQA @ 1b3b6cd (``LRS-VQA-Code/llava/model/multimodal_projector/builder.py``:
``PyramidPruneModule.forward``, ``get_text_image_attn``, ``select_attention_indices_via_ratio``,
``get_next_level_fea``, ``prune_and_construct_features``; ``llava/mm_utils.py`` ``pyramid_crop``).
Differences:

* Where it runs. The reference is a connector-side pre-pass: its RFM is a separate stack of decoder
  layers *initialised from the LLM's and trained by attention distillation*; it runs the RFM on
  [global view, level-0 tiles, question], encodes only the selected higher-resolution tiles with the
  vision tower, runs the RFM again on [global, selected tiles, question], prunes, and hands the
  language model the short sequence. Training-free and in one forward, ours takes the signal from
  the language model's own layer ``K`` and works on a prompt that already holds every tile. So
  ours saves language-model compute from layer ``K`` on (layers ``>= K`` and their cache see the kept
  tokens only), *not* the tower on the unselected tiles and not layers ``< K``; the reference saves
  both but pays for its RFM passes.
* AnyRes. The reference builds its own pyramid of crops (``pyramid_crop``) around a LLaVA-style model; on
  LLaVA-NeXT ours takes the model's own AnyRes crops as the finer level and its base image as the coarse one,
  so nothing about the model's input changes.
* Levels. The reference's pyramid has a global thumbnail (always kept whole) and levels from coarse to
  fine; its released code selects tiles once (level 0 -> level 1) and prunes at level 1. With two levels
  our coarse view is both the thumbnail and the scored level.
* Budget. The reference keeps the whole global view plus ``pruning_ratio`` (0.25) of the selected
  tiles' tokens, so its count varies per image; ours meets the schedule's count, so the coarse view
  is pruned too, ranked in one pool with the selected tiles' tokens. ``select_ratio`` is the
  reference's ``pruning_ratio`` in its tile-selection role.
* Second scoring. The reference re-runs the RFM with only the selected tiles in the sequence; ours
  ranks them with the one row computed while every tile is present (renormalised over the pool).
* ``max_tiles``: the reference's evaluation scripts set ``next_level_max_select_num`` (6), but
  ``get_next_level_fea`` overwrites it with the number of voted tiles, so every voted tile is taken;
  ``max_tiles=None`` (default) does the same, an integer applies the cap the scripts intended.
* Not copied: the reference adds every row's ``image_newline`` token to the voting tokens, and those sit
  in the last column, so the rightmost tile of every row is always selected; and without
  ``llm_use_last_text`` its inference path has no query at all. Ours votes with visual tokens only and
  always uses the last prompt token's query.
* Batches: the reference runs batch 1 with hard-coded layouts; samples here are left-padded, each with
  its own layout (G = 2 and G = 3 prompts in one batch), and keep their original positions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.errors import BudgetError, StageError
from ..core.method import DecoderInfo, LayerContext, LayerDropMethod
from ..core.params import check_choice, check_float, check_int
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.schedule import one_drop


def visual_runs(visual: Tensor) -> list[int]:
    """Lengths of the maximal runs of consecutive visual rows (``visual`` [n] bool), in order."""
    rows = visual.nonzero().flatten()
    if rows.numel() == 0:
        return []
    breaks = ((rows[1:] - rows[:-1]) > 1).nonzero().flatten() + 1
    edges = [0, *breaks.tolist(), rows.numel()]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def tile_of_coarse(side: int, grid: int) -> Tensor:
    """The tile (row-major, ``grid x grid``) under each token of a ``side x side`` coarse raster [side * side]."""
    r = torch.arange(side * side) // side
    c = torch.arange(side * side) % side
    return (r * grid // side) * grid + c * grid // side


def renormalised(rows: Tensor, columns: Tensor) -> Tensor:
    """Softmax rows [H, v] restricted to ``columns`` (each head renormalised over them), mean over heads [len]."""
    a = rows[:, columns]
    return (a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)).mean(0)


class _Tiles(NamedTuple):
    """A sample's layout over its visual tokens: the coarse view's (a ``side x side`` raster), each token's tile
    (``member``: >= 0 a tile, -1 the coarse view, -2 a layout token that always stays in the pool), the tile under
    each coarse token, the number of tiles and the grid as recorded in ``choices``."""

    coarse: Tensor
    member: Tensor
    under: Tensor
    tiles: int
    grid: object


@register
class CoarseToFine(LayerDropMethod):
    name = "coarse_to_fine"
    paper = ("When Large Vision-Language Model Meets Large Remote Sensing Imagery: Coarse-to-Fine Text-Guided "
             "Token Pruning (Luo et al., 2025)")
    arxiv = "2503.07588"
    scores_from = "own"
    attention_rows = "last"
    needs_tiles = True  # LLaVA-NeXT's AnyRes images: the base view and crops from the model's own packing

    def __init__(self, keep_ratio: float | None = None, k: int | None = None, r: float | None = None,
                 grid: int | None = None, select_ratio: float = 0.25, max_tiles: int | None = None,
                 scores_from: str = "own", schedule=None):
        super().__init__(keep_ratio, schedule)
        self.one_drop_budget(k, r, "the drop layer (0-based) where tiles are chosen and tokens pruned; None = 2")
        self.grid = check_int(self.name, "grid", grid, min=1, optional=True,
                              why="tiles per side after the coarse view; None = one image per run of visual tokens")
        self.select_ratio = check_float(self.name, "select_ratio", select_ratio, min=0.0, max=1.0, min_open=True,
                                        why="the share of coarse tokens that vote for tiles (the reference's 0.25)")
        self.max_tiles = check_int(self.name, "max_tiles", max_tiles, min=1, optional=True,
                                   why="the most tiles selected; None = every tile with a vote, as the reference")
        self.scores_from = check_choice(self.name, "scores_from", scores_from, ("own", "previous"),
                                        why="'own' = layer k's projections (the reference's RFM); 'previous' = "
                                            "layer k-1's attention call (M-RoPE models)")
        self.choices: list[dict] = []

    def describe(self) -> str:
        if self.given_schedule is not None:
            return super().describe()
        what = f"keep_ratio={self.budget.ratio}" if self.budget else f"r={self.r}"
        extra = "".join(f", {n}={getattr(self, n)}" for n in ("grid", "max_tiles") if getattr(self, n) is not None)
        return f"{what}, k={self.k}" + extra

    # ------------------------------------------------------------------ budget
    def schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        pairs = super().schedule(info)
        if len(pairs) != 1:
            raise BudgetError(f"{self.name}: chooses tiles once, at one drop layer; the schedule has {len(pairs)} "
                              f"({[k for k, _ in pairs]}): give a schedule with one (layer, fraction) pair")
        return pairs

    def native_schedule(self, info: DecoderInfo) -> list[tuple[int, float]]:
        return one_drop(self.name, info.num_layers, self.k, None if self.budget is None else self.budget.ratio, self.r)

    # ------------------------------------------------------------------ layout
    def layout(self, ctx: LayerContext) -> _Tiles:
        """The sample's coarse view and tiles: from the model's AnyRes packing (``ctx.tiles``: a base view then crops),
        else from the prompt (coarse view first, then ``G * G`` tile images, as runs of visual tokens or ``grid``)."""
        if ctx.tiles is not None:
            return self._anyres(ctx.tiles)
        g, sizes = self.runs_layout(ctx.visual)
        t = sizes[0]
        member = torch.repeat_interleave(torch.arange(-1, g * g), torch.tensor(sizes))
        under = tile_of_coarse(math.isqrt(t), g) if g > 1 else torch.zeros(t, dtype=torch.long)
        return _Tiles(torch.arange(t), member, under, g * g, g)

    def runs_layout(self, visual: Tensor) -> tuple[int, list[int]]:
        """``(G, sizes)``: the sample's images in prompt order (coarse first, then ``G * G`` tiles), as token counts."""
        v = int(visual.sum())
        if self.grid is not None:
            g = self.grid
            if v % (1 + g * g):
                raise StageError(f"{self.name}: a sample's {v} visual tokens do not split into 1 + {g}*{g} = "
                                 f"{1 + g * g} images of equal size; pass the grid of this prompt (coarse view first, "
                                 "then the G*G tiles), or grid=None to read the images from the prompt")
            sizes = [v // (1 + g * g)] * (1 + g * g)
        else:
            sizes = visual_runs(visual)
            g = math.isqrt(max(len(sizes) - 1, 0))
            if len(sizes) < 2 or g * g != len(sizes) - 1:
                raise StageError(f"{self.name}: the prompt has {len(sizes)} image(s) (runs of visual tokens separated "
                                 f"by text), not 1 + G*G for a grid G >= 1 (a coarse view, then the G*G tiles); build "
                                 "the prompt that way, or pass grid=G if the images touch")
        side = math.isqrt(sizes[0])
        if g > 1 and side * side != sizes[0]:
            raise StageError(f"{self.name}: the coarse view has {sizes[0]} tokens, not a square raster; tiles are "
                             "found under its tokens only on a square grid")
        return g, sizes

    def _anyres(self, images: list) -> _Tiles:
        """One AnyRes image: the base view is the coarse view, the crops are the tiles, newlines stay in the pool;
        the crop under a base token is the one at the same place of the crops' raster (both span the whole image)."""
        if len(images) != 1:
            raise StageError(f"{self.name}: picks the crops of one big image, but the prompt holds {len(images)} "
                             "AnyRes images; give one image per prompt")
        img = images[0]
        if self.grid is not None:
            raise StageError(f"{self.name}: grid={self.grid} describes a prompt of separate tile images, but this model "
                             f"packs its own crops ({img.grid[0]} x {img.grid[1]}); leave grid=None")
        s, (h, w) = img.side, img.raster.shape
        r, c = torch.arange(s * s) // s, torch.arange(s * s) % s
        at = img.raster[((r + 0.5) * h / s).long(), ((c + 0.5) * w / s).long()]
        member = torch.where(img.part > 0, img.part - 1, torch.where(img.part == 0, -1, -2))
        return _Tiles((img.part == 0).nonzero().flatten(), member, img.part[at] - 1, img.grid[0] * img.grid[1],
                      img.grid)

    # ------------------------------------------------------------------ the algorithm
    def plan(self, ctx: LayerContext) -> Reduction:
        lay = self.layout(ctx)
        dev = ctx.hidden.device
        v = int(ctx.visual.sum())
        rows = ctx.attention[:, -1][:, ctx.visual].float()  # [H, v]: the last prompt token's softmax row
        coarse, member, under = lay.coarse.to(dev), lay.member.to(dev), lay.under.to(dev)
        # 1-2: the coarse view's tokens vote for the tiles under them
        score = renormalised(rows, coarse)
        voters = score.sort(descending=True, stable=True).indices[: max(1, int(self.select_ratio * coarse.numel()))]
        votes = torch.bincount(under[voters], minlength=lay.tiles)
        mass = torch.zeros(lay.tiles, device=dev).index_add_(0, under, score)
        ranked = sorted((i for i in range(lay.tiles) if votes[i] > 0), key=lambda i: (-int(votes[i]), -float(mass[i]), i))
        chosen = ranked[: self.max_tiles] if self.max_tiles is not None else ranked
        # 3-4: the coarse view (and layout tokens) with the chosen tiles, pruned by the same row
        pool = (member < 0) | torch.isin(member, torch.tensor(chosen, dtype=torch.long, device=dev))
        pool = pool.nonzero().flatten()
        order = renormalised(rows, pool).sort(descending=True, stable=True).indices[: ctx.budget]
        keep = pool[order].sort().values
        self.choices.append({"grid": lay.grid, "tiles": chosen, "votes": votes.tolist(), "kept": int(keep.numel())})
        return Reduction.keep(keep[None], v)

    def scoring_flops(self, length: int, info: DecoderInfo) -> float:
        qd, kvd, h = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim, info.hidden_size
        projections = 2.0 * h * (qd + length * kvd) if self.scores_from == "own" else 0.0  # layer k's Q (1 row), K
        return projections + super().scoring_flops(length, info)
