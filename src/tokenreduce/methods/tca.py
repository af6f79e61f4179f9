"""TCA — Is Less More? Exploring Token Condensation as Training-free Test-time Adaptation (Zixin Wang, Dong Gong,
Sen Wang, Zi Huang and Yadan Luo, ICCV 2025, arXiv 2410.14729; v1 titled "Tokens on Demand: Token Condensation as
Training-free Test-time Adaptation").

TCA condenses the visual tokens of a CLIP tower image by image while it classifies a test stream, and keeps a small
*reservoir* of past test images per pseudo-class whose [CLS] tokens guide the condensation and correct the logits.
The algorithm, as the reference code runs it (batch size 1, ViT-B/16, condensation at blocks 3, 6 and 9 of 12):

1. **Condensation** at each drop block, after the attention residual and before the MLP, on the ``P`` patch tokens
   (every token but [CLS]) with drop rate ``r``: score each patch by the [CLS] attention row averaged over the heads;
   ``left = ceil((1 - r) P)`` tokens survive, ``m = P - left + 1``. The best ``left - 2m`` are kept as they are (in
   descending score order); the next ``2m`` (*class-ambiguous*) are merged into ``num_centers`` = 4 centres by a
   coreset: k-center greedy (a random first centre, then repeatedly the token farthest from every chosen centre),
   each ambiguous token assigned to its nearest centre, each cluster averaged with weights ``1 / ||t - centre||``
   (the centre itself weight 1), normalised; the remaining ``P - left`` (*class-irrelevant*) tokens are fused into
   one token, their sum weighted by their [CLS] attention (EViT's fused token, not normalised). Output order:
   [CLS], kept tokens, the centres, the fused token. Later blocks treat centres and fused token as ordinary tokens.
2. **Domain anchor tokens.** Once the reservoir holds at least two images of *every* class, each class has a
   domain anchor token per block: the mean of its reservoir images' [CLS] tokens. At a drop block each image takes
   the anchor of the class whose anchor (at the block before) is closest in cosine to its own [CLS] (there), and the
   anchor joins that block's attention as an extra token: [CLS] then attends to it too, so each head's [CLS] row over
   the patches is scaled down by the share the anchor takes, which changes the head average that ranks the tokens
   and the fused token's weights.
3. **Reservoir update**, after each image: zero-shot logits ``100 cos(feature, class embedding)``, their entropy
   and the pseudo-label (argmax). The image's per-block [CLS] tokens join its pseudo-class's list with the entropy;
   a list over ``reservoir_size`` (3) drops the image of highest ``entropy + mean cosine similarity to the others``
   (the similarity of the [CLS] tokens averaged over blocks: uncertain or redundant images leave), and is kept in
   ascending entropy order.
4. **Logits correction**: each reservoir image ``k`` (the current one included) adds
   ``lambda exp(-beta (1 - a_k))`` to its class's logit, ``a_k = sum_l w_l cos(cls_l, cls_l^k)`` over the blocks
   ``l``, ``w = softmax(linspace(0, 1, L) / scale)``. Defaults (``configs/imagenet.yaml``; other datasets' configs
   differ): ``reservoir_size=3``, ``scale=0.1``, ``lambda=3``, ``beta=5`` — here ``reservoir_size``,
   ``layer_temperature``, ``correction_weight``, ``beta``.

Here steps 1-2 run inside the tower (an encoder-stage method); steps 3-4 run when the caller hands the tower's
output features to `TCA.adapt`, which needs ``class_embeddings`` [C, E] in the output space (CLIP: the normalised
text embeddings; a tower without text: class prototypes, e.g. the mean pooled feature of a few labelled images per
class — then "zero-shot" is a nearest-prototype classifier, and nothing else changes). Without ``adapt`` the
reservoir stays empty and TCA is its condensation alone, which is what the reference runs until every class has
two reservoir images::

    tca = get_method("tca", drop_rate=0.1, class_embeddings=text_embeds)
    with apply(model, tca):
        for pixels in stream:
            logits = tca.adapt(model(pixel_values=pixels).image_embeds)

The reservoir is test-time state on the method object: it survives forwards and ``apply`` contexts until
`TCA.reset`; forwards only read it (their anchors are fixed when a forward starts), ``adapt`` writes it. Leaving
``apply`` restores the model exactly whatever the reservoir holds.

Follows the reference code (github.com/Jo-wang/TCA @ 0f846d6: ``clip/model.py`` ``ResidualAttentionBlock_Ours``,
``VisionTransformer``, ``CLIP.update_cls_token``; ``clip/utils.py`` ``k_center_greedy``, ``coreset_averaging``;
``runner.py`` ``update_reservoir_sim``, ``compute_reservoir_logits``, ``run_test_tca``; ``utils.py``
``cls_feature_similarity``, ``get_clip_logits``): the same counts, ranking, coreset, weights and output order, the
same reservoir rule, activation condition, order of update and correction, and correction formula. The paper's
text beyond its abstract was not available here; where the v1 abstract describes *cross-head consensus* (tokens
that rank low in every head), the reference computes each token's rank averaged over the heads but ranks by the
head-averaged attention: ``score="attention"`` (default) is the code, ``score="head_rank"`` the abstract.

Differences from the reference code:

* The anchor as an extra token. The reference prepends the anchor to a drop block's attention input, so it is a
  key *and a value* there: besides rescaling the [CLS] row (step 2) its value enters every token's attention
  output. An encoder method plans reductions from a block's signals and cannot add a key or value to the block's
  attention, so here the anchor only rescales the [CLS] row — exactly, from the anchor's key, the [CLS] query and
  the row itself (``row * 1 / (1 + exp(s q.k_anchor) / Z)``) — and the hidden states do not see it. Its key is the
  mean of the reservoir images' [CLS] keys at that block (the reference: the key of the mean [CLS] hidden state;
  equal up to the layer norm's nonlinearity).
* The [CLS] tokens recorded per block (reservoir, anchors, correction) are the [CLS] hidden state after the block's
  attention residual (what the method sees), not the block's output after its MLP; the nearest anchor at block
  ``i`` is chosen at block ``i - 1`` in the same way. No anchor at block 0 (the reference would read the last
  block's, a negative index).
* Batches: the reference runs one image at a time and records the [CLS] tokens of the batch's first image only.
  Here every image is condensed on its own (anchors per image), a forward's images share the anchors of the
  reservoir as it was when the forward started, and ``adapt`` inserts and corrects the images one by one in batch
  order, each corrected right after its own insertion, as a stream of single images would be. A batch therefore
  equals its images one at a time from the same reservoir.
* Randomness: the reference draws each k-center greedy's first centre from torch's global generator; here from a
  CPU generator seeded with ``seed`` at every forward, one uniform draw ``u`` per drop block (first centre
  ``floor(u n)`` of the ``n`` ambiguous tokens), shared by the batch's images: forwards are reproducible.
* Edge cases the reference gets wrong: with fewer ambiguous tokens than centres (or ``left - 2m < 0``, where
  ``topk`` fails) the reference appends all-zero tokens for its empty clusters and, when nothing is dropped, an
  all-zero fused token; here ``min(num_centers, ambiguous)`` centres and ``max(left - 2m, 0)`` kept tokens, no fused
  token when nothing is dropped, and a block that would drop nothing condenses nothing. A cluster left empty by
  exactly duplicated tokens is a padded (masked) slot, not a zero token.
* Precision: scores, distances and weights in float32 whatever the model's dtype (the reference: fp16 on GPU);
  the coreset distances are computed directly (``cdist`` without its matrix-product shortcut).
* Depth and prefix: drop blocks default to a quarter, half and three quarters of the depth (3, 6, 9 of 12, the
  reference's fixed ``drop_loc``); the correction's layer weights span the tower's depth (the reference: 12 or 24).
  Further protected prefix tokens (DeiT's distillation token, DINOv2's registers) are kept in front like [CLS] and
  never scored; ``m`` counts the patches as the reference does with one prefix token. SigLIP has no [CLS]
  (refused; the paper's SigLIP runs are not in the reference code).
* Only the reference's default reservoir scoring (``--div``, ``--token_sim``, ``--flag``: entropy plus similarity,
  [CLS] tokens as features, anchors updated); its other switches and the batch-of-augmentations path of
  ``get_clip_logits`` are not offered.
* Budgets: ``drop_rate`` (the reference's ``Ours-<rate>``; ``runner.py`` defaults to 0.1, its README shows
  0.035) or ``keep_ratio`` (the common encoder budget, `core.budget`), which picks the drop rate whose counts meet
  it; counts depend only on the token count, so every image keeps the same number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.budget import mean_kept, solve_float
from ..core.errors import BudgetError, ParameterError, StageError
from ..core.method import EncoderInfo, EncoderMethod
from ..core.params import check_choice, check_float, check_int, check_ints, check_seed, fail
from ..core.reduction import Reduction
from ..core.registry import register
from ..core.tokens import TokenState
from .evit import default_locations


# ---------------------------------------------------------------------------- counts
def stage_sizes(patches: int, drop_rate: float, num_centers: int) -> tuple[int, int, int, int]:
    """(kept, ambiguous, centres, fused) of one condensation of ``patches`` tokens; ``fused`` is the number of
    tokens fused into the one fused token (0: none). A stage that drops nothing condenses nothing:
    ``(patches, 0, 0, 0)``."""
    left = math.ceil((1.0 - drop_rate) * patches)
    dropped = patches - left
    if dropped <= 0:
        return patches, 0, 0, 0
    m = dropped + 1
    kept = max(left - 2 * m, 0)
    ambiguous = left - kept
    return kept, ambiguous, min(num_centers, ambiguous), dropped


def condensed_patches(patches: int, drop_rate: float, num_centers: int) -> int:
    kept, _, centres, fused = stage_sizes(patches, drop_rate, num_centers)
    return kept + centres + (1 if fused else 0)


def token_counts(num_tokens: int, num_prefix: int, num_layers: int, locations, drop_rate: float,
                 num_centers: int) -> list[int]:
    """Tokens each block's MLP processes under TCA's condensation."""
    counts, n = [], num_tokens - num_prefix
    for layer in range(num_layers):
        if layer in locations:
            n = condensed_patches(n, drop_rate, num_centers)
        counts.append(num_prefix + n)
    return counts


# ---------------------------------------------------------------------------- the condensation of one image
def k_center_greedy(tokens: Tensor, k: int, first: int) -> list[int]:
    """Indices of ``k`` centres among ``tokens`` [n, C]: ``first``, then each time the token farthest from its
    nearest chosen centre (the first such token on ties)."""
    centres = [first]
    nearest = (tokens - tokens[first]).norm(dim=1)
    for _ in range(k - 1):
        nxt = int(nearest.argmax())
        centres.append(nxt)
        nearest = torch.minimum(nearest, (tokens - tokens[nxt]).norm(dim=1))
    return centres


def coreset_weights(tokens: Tensor, centres: list[int]) -> tuple[Tensor, Tensor]:
    """(cluster [n] of each token, weight [n]): the nearest centre (the first on ties), and within each cluster
    ``1 / ||t - centre||`` normalised to sum 1, the centre itself (distance 0) weighing 1."""
    centre_tokens = tokens[centres]
    cluster = torch.cdist(tokens, centre_tokens, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    dist = (tokens - centre_tokens[cluster]).norm(dim=1)
    raw = torch.where(dist == 0, torch.ones_like(dist), 1.0 / dist.clamp_min(torch.finfo(dist.dtype).tiny))
    total = torch.zeros(len(centres), dtype=raw.dtype, device=raw.device).scatter_add_(0, cluster, raw)
    return cluster, raw / total[cluster]


def plan_image(order: Tensor, attention: Tensor, patches: Tensor, drop_rate: float, num_centers: int,
               u: float) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """One image's condensation: (kept, groups), the output tokens after the prefix in order.

    ``order`` [P]: the image's real patch indices, best first; ``attention`` [n]: each patch's head-averaged [CLS]
    attention; ``patches`` [n, C] float32. ``kept`` [K]: the patches kept as they are; each group
    ``(indices, coefficients)`` makes one more output token: a centre's cluster (weights summing to 1), then the
    fused token (the dropped patches weighted by their attention). A stage that drops nothing keeps every patch in
    token order.
    """
    kept, ambiguous, centres, fused = stage_sizes(len(order), drop_rate, num_centers)
    if not fused:
        return order.sort().values, []
    groups = []
    amb = order[kept:kept + ambiguous]
    tokens = patches[amb]
    first = min(int(u * ambiguous), ambiguous - 1)
    cluster, w = coreset_weights(tokens, k_center_greedy(tokens, centres, first))
    for c in range(centres):
        members = cluster == c
        groups.append((amb[members], w[members]))
    rest = order[kept + ambiguous:]
    groups.append((rest, attention[rest].float().clamp_min(0)))
    return order[:kept], groups


def rank_order(attention: Tensor, real: Tensor, score: str) -> Tensor:
    """Real patch indices, best first. ``attention`` [H, n]: the image's (anchor-scaled) [CLS] rows over its
    patches. ``"attention"``: by the head average; ``"head_rank"``: by each patch's rank averaged over the heads
    (rank 0 = least attended), ties by the head average."""
    mean = attention.mean(0).masked_fill(~real, -math.inf)
    order = mean.argsort(descending=True, stable=True)
    if score == "head_rank":
        ranks = attention.masked_fill(~real, -math.inf).argsort(dim=1, stable=True).argsort(dim=1).float().mean(0)
        order = order[ranks[order].argsort(descending=True, stable=True)]
    return order[: int(real.sum())]


def anchor_scale(row: Tensor, q_cls: Tensor, k_cls: Tensor, k_anchor: Tensor, scale: float) -> Tensor:
    """The factor [B, H] on each head's [CLS] row when an anchor key joins the keys: ``Z / (Z + exp(l_anchor))``,
    with ``log Z`` recovered from the [CLS] column (``s q.k_cls - log row_cls``; its key bias is 0)."""
    log_z = scale * (q_cls * k_cls).sum(-1) - row[..., 0].clamp_min(torch.finfo(row.dtype).tiny).log()
    return torch.sigmoid(log_z - scale * (q_cls * k_anchor).sum(-1))


def layer_weights(num_layers: int, temperature: float) -> Tensor:
    """The correction's weights over the blocks: ``exp(linspace(0, 1, L) / T)``, normalised."""
    return torch.softmax(torch.linspace(0, 1, num_layers, dtype=torch.float64) / temperature, 0).float()


# ---------------------------------------------------------------------------- the method
@register
class TCA(EncoderMethod):
    name = "tca"
    paper = "Is Less More? Exploring Token Condensation as Training-free Test-time Adaptation"
    arxiv = "2410.14729"
    signals = ("cls_attn", "queries", "keys", "scale")
    needs_cls = True

    def __init__(self, drop_rate: float | None = None, keep_ratio: float | None = None, locations=None,
                 num_centers: int = 4, class_embeddings: Tensor | None = None, reservoir_size: int = 3,
                 logit_scale: float = 100.0, correction_weight: float = 3.0, beta: float = 5.0,
                 layer_temperature: float = 0.1, score: str = "attention", seed: int = 0):
        super().__init__(keep_ratio)
        n = self.name
        drop_rate = check_float(n, "drop_rate", drop_rate, min=0.0, max=1.0, max_open=True, optional=True,
                                error=BudgetError, why="fraction of a drop block's patch tokens condensed away")
        if drop_rate is not None and keep_ratio is not None:
            raise BudgetError(f"{n}: give keep_ratio or drop_rate, not both (got keep_ratio={keep_ratio}, "
                              f"drop_rate={drop_rate})")
        self.drop_rate = drop_rate if drop_rate is not None else (None if keep_ratio is not None else 0.1)
        self.locations = check_ints(n, "locations", locations, optional=True, why="0-based block indices")
        self.num_centers = check_int(n, "num_centers", num_centers, min=1, why="coreset centres per drop block")
        self.class_embeddings = _check_embeddings(n, class_embeddings)
        self.reservoir_size = check_int(n, "reservoir_size", reservoir_size, min=1, why="images kept per class")
        self.logit_scale = check_float(n, "logit_scale", logit_scale, min=0.0, min_open=True)
        self.correction_weight = check_float(n, "correction_weight", correction_weight, min=0.0,
                                             why="the reference's lambd")
        self.beta = check_float(n, "beta", beta, min=0.0, why="sharpness of the reservoir affinity")
        self.layer_temperature = check_float(n, "layer_temperature", layer_temperature, min=0.0, min_open=True,
                                             why="the reference's scale: temperature of the weights over blocks")
        self.score = check_choice(n, "score", score, ("attention", "head_rank"))
        self.seed = check_seed(n, "seed", seed)
        self.reset()

    def describe(self) -> str:
        budget = f"drop_rate={self.drop_rate}" if self.budget is None else super().describe()
        return budget + f", reservoir {self.reservoir_counts()}" if self._reservoir else budget

    # ------------------------------------------------------------------ the reservoir (test-time state)
    def reset(self) -> None:
        """Empty the reservoir (its anchors go with it) and forget the last forward."""
        self._reservoir: dict[int, list[dict]] = {}
        self._last: tuple[Tensor, Tensor] | None = None

    def reservoir_counts(self) -> list[int]:
        """Images the reservoir holds per class (empty list before any ``adapt`` or without class embeddings)."""
        if self.class_embeddings is None:
            return []
        return [len(self._reservoir.get(c, [])) for c in range(self.class_embeddings.shape[0])]

    @property
    def anchors_active(self) -> bool:
        """Whether forwards use domain anchor tokens: every class holds at least two reservoir images."""
        counts = self.reservoir_counts()
        return bool(counts) and min(counts) >= 2

    def adapt(self, features: Tensor) -> Tensor:
        """Steps 3-4 for the images of the last forward: their output ``features`` [B, E] (e.g. CLIP's
        ``image_embeds``) give zero-shot logits, entropies and pseudo-labels; each image enters the reservoir in
        batch order and gets its corrected logits [B, C] (float32) right after its own insertion."""
        if self.class_embeddings is None:
            raise ParameterError(f"{self.name}.adapt needs class_embeddings [C, E] (text embeddings, or class "
                                 "prototypes for a tower without text): get_method('tca', class_embeddings=...)")
        if self._last is None:
            raise StageError(f"{self.name}.adapt corrects the images of the forward just run, once: run the model "
                             "with the method attached (drop_rate > 0 or any drop_rate; keep_ratio=1.0 runs nothing), "
                             "then call adapt with that forward's features")
        trace, keys = self._last
        w = self.class_embeddings
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != trace.shape[0] \
                or features.shape[1] != w.shape[1]:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ParameterError(f"{self.name}.adapt takes the last forward's features [{trace.shape[0]}, "
                                 f"{w.shape[1]}] (batch, class-embedding width); got {got}")
        self._last = None
        f = F.normalize(features.detach().float(), dim=-1)
        logits = self.logit_scale * f @ F.normalize(w.to(f.device).float(), dim=-1).T
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        labels = logits.argmax(-1)
        out = []
        for b in range(features.shape[0]):
            self._insert(int(labels[b]), float(entropy[b]), trace[b], keys[b])
            out.append(logits[b] + self._correction(trace[b], logits.shape[1]))
        return torch.stack(out)

    def _insert(self, label: int, entropy: float, trace: Tensor, keys: Tensor) -> None:
        items = self._reservoir.setdefault(label, [])
        items.append({"entropy": entropy, "trace": trace, "keys": keys})
        if len(items) > self.reservoir_size:
            feats = F.normalize(torch.stack([i["trace"].mean(0) for i in items]), dim=1)
            sim = feats @ feats.T
            redundancy = (sim.sum(1) - sim.diagonal()) / (len(items) - 1)
            score = torch.tensor([i["entropy"] for i in items], dtype=sim.dtype, device=sim.device) + redundancy
            items.pop(int(score.argmax()))
        items.sort(key=lambda i: i["entropy"])

    def _correction(self, trace: Tensor, num_classes: int) -> Tensor:
        labels = [c for c in sorted(self._reservoir) for _ in self._reservoir[c]]
        stored = torch.stack([i["trace"] for c in sorted(self._reservoir) for i in self._reservoir[c]])  # [K, L, D]
        weights = layer_weights(trace.shape[0], self.layer_temperature).to(trace.device)
        affinity = (F.cosine_similarity(trace[None], stored, dim=-1) * weights).sum(1)  # [K]
        onehot = F.one_hot(torch.tensor(labels, device=trace.device), num_classes).float()
        return self.correction_weight * (-self.beta * (1 - affinity)).exp() @ onehot

    # ------------------------------------------------------------------ the forward
    def start(self, info: EncoderInfo, num_tokens: int) -> None:
        self._layers = info.num_layers
        locs = self.locations if self.locations is not None else default_locations(info.num_layers)
        self._locs = tuple(sorted({loc for loc in locs if loc < info.num_layers}))
        if self.budget is not None:
            counts = lambda keep: mean_kept(token_counts(num_tokens, info.num_prefix, info.num_layers, self._locs,
                                                         1.0 - keep, self.num_centers), num_tokens)
            self._rate = 1.0 - solve_float(counts, self.budget.ratio, 1e-3, 1.0)
        else:
            self._rate = self.drop_rate
        self._generator = torch.Generator().manual_seed(self.seed)
        self._trace: list[Tensor] = []
        self._keys: list[Tensor] = []
        self._last = None
        self._anchors = self._anchor_tokens(info) if self.anchors_active else None
        self._condensed: dict[int, int] = {}

    def _anchor_tokens(self, info: EncoderInfo) -> tuple[Tensor, Tensor]:
        """Per class: the mean reservoir [CLS] trace [C, L, D] and [CLS] keys at the drop blocks [C, n, H, d]."""
        items = [self._reservoir[c] for c in range(self.class_embeddings.shape[0])]
        trace = torch.stack([torch.stack([i["trace"] for i in its]).mean(0) for its in items])
        keys = torch.stack([torch.stack([i["keys"] for i in its]).mean(0) for its in items])
        head_dim = info.hidden_size // info.num_heads
        if trace.shape[1:] != (info.num_layers, info.hidden_size) or \
                keys.shape[1:] != (len(self._locs), info.num_heads, head_dim):
            raise StageError(f"{self.name}: the reservoir was filled on another encoder (or other drop blocks) than "
                             f"this {info.num_layers}-block {info.family} one; call reset() before adapting to it")
        return trace, keys

    def wants_signals(self, layer: int) -> bool:
        return bool(self._locs)  # every block records the [CLS] token; no drop block in range: never fires

    def reduce(self, layer: int, x: Tensor, tokens: TokenState, signals: dict) -> Reduction | None:
        self._trace.append(x[:, 0].detach().float())
        drop = layer in self._locs
        if drop:
            self._keys.append(signals["keys"][:, :, 0].detach().float())
        if layer == self._layers - 1:  # the forward is complete: adapt() may use it
            keys = torch.stack(self._keys, 1) if self._keys else x.new_zeros(x.shape[0], 0, 0, 0, dtype=torch.float32)
            self._last = (torch.stack(self._trace, 1), keys)
        if not drop:
            return None
        u = float(torch.rand(1, generator=self._generator))
        if self._rate <= 0.0:
            return None
        return self._condense(layer, x, tokens, signals, u)

    def _condense(self, layer: int, x: Tensor, tokens: TokenState, signals: dict, u: float) -> Reduction | None:
        b, n, _ = x.shape
        p = tokens.num_prefix
        real = tokens.valid[:, p:] if tokens.valid is not None else x.new_ones(b, n - p, dtype=torch.bool)
        sizes = [stage_sizes(int(r), self._rate, self.num_centers) for r in real.sum(1).tolist()]
        if all(s[3] == 0 for s in sizes):
            return None
        row = signals["cls_attn"].float()  # [B, H, N]
        if self._anchors is not None and layer > 0:
            row = row * self._anchor_factor(layer, row, signals)[..., None]
        patches = x[:, p:].detach().float()
        dest = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        coef = torch.zeros(b, n, dtype=torch.float32, device=x.device)
        dest[:, :p] = torch.arange(p, device=x.device)
        coef[:, :p] = 1.0
        num_out = p
        for i in range(b):
            order = rank_order(row[i, :, p:], real[i], self.score)
            kept, groups = plan_image(order, row[i, :, p:].mean(0), patches[i], self._rate, self.num_centers, u)
            k = len(kept)
            dest[i, p + kept] = p + torch.arange(k, device=x.device)
            coef[i, p + kept] = 1.0
            for slot, (members, weights) in enumerate(groups, start=p + k):
                dest[i, p + members] = slot
                coef[i, p + members] = weights.to(coef.dtype)
            num_out = max(num_out, p + k + len(groups))
        self._condensed[layer] = n
        return Reduction(num_out=num_out, dest=dest, coef=coef)

    def _anchor_factor(self, layer: int, row: Tensor, signals: dict) -> Tensor:
        """Each image's nearest class anchor (cosine of the [CLS] tokens at the block before) and the factor it puts
        on each head's [CLS] row at this block [B, H]."""
        trace, keys = self._anchors
        current = self._trace[layer - 1]  # [B, D]
        sims = F.cosine_similarity(trace[None, :, layer - 1].to(current.device), current[:, None], dim=-1)  # [B, C]
        nearest = sims.argmax(1)
        k_anchor = keys[:, self._locs.index(layer)].to(current.device)[nearest]  # [B, H, d]
        q_cls = signals["queries"][:, :, 0].float()
        k_cls = signals["keys"][:, :, 0].float()
        return anchor_scale(row, q_cls, k_cls, k_anchor, float(signals["scale"]))

    def scoring_flops(self, layer: int, num_tokens: int, info: EncoderInfo) -> float:
        c = info.hidden_size
        flops = 2.0 * num_tokens * c  # the [CLS] row, computed at every block
        if self._condensed.get(layer) == num_tokens:
            _, ambiguous, centres, _ = stage_sizes(num_tokens - info.num_prefix, self._rate, self.num_centers)
            flops += 3.0 * ambiguous * c * 2 * centres  # k-center distances and the assignment
        return flops


def _check_embeddings(method: str, value) -> Tensor | None:
    """``class_embeddings``: None, or a finite float tensor [C, E] (C, E >= 1)."""
    if value is None:
        return None
    accepted = "a finite float tensor [C, E]"
    why = "one embedding per class in the tower's output space: text embeddings, or class prototypes"
    if not isinstance(value, Tensor):
        fail(method, "class_embeddings", accepted, value, why=why, optional=True)
    if not (value.dim() == 2 and value.shape[0] >= 1 and value.shape[1] >= 1 and value.is_floating_point()
            and bool(torch.isfinite(value).all())):
        finite = "" if not value.is_floating_point() or bool(torch.isfinite(value).all()) else ", not all finite"
        raise ParameterError(f"{method}: class_embeddings must be {accepted} ({why}) or None; got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}{finite}")
    return value.detach()
