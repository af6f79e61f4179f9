"""TCA (arXiv 2410.14729) against a plain reference written from the paper's reference code (Jo-wang/TCA @ 0f846d6).

The plain reference runs a tiny CLIP tower image by image with eager attention: at each drop block the [CLS] row
(with the nearest class's domain anchor key concatenated to the keys once the reservoir is full), the top tokens
kept, the class-ambiguous ones merged by k-center greedy and inverse-distance weights, the rest fused by attention;
and, between images, the reservoir (entropy + similarity eviction) and the logits correction. It departs from the
reference code only where tca.py's docstring says the method does (the anchor is a key only, the [CLS] trace is
taken after each block's attention, the first centre comes from ``seed``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import IMAGE, PATCH, pixels, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenreduce as tr
from tokenreduce.core.budget import mean_kept
from tokenreduce.methods.tca import plan_image, rank_order, stage_sizes, token_counts

PATCHES = (IMAGE // PATCH) ** 2  # 64
LOCS = (1, 2, 3)  # the default drop blocks of a 4-block tower (a quarter, half, three quarters)


# ---------------------------------------------------------------------------- models and a test stream
def clip(factor: float = 4.0) -> tf.CLIPVisionModelWithProjection:
    """conftest's tiny CLIP with projection, Q and K scaled by ``factor``: random weights attend almost uniformly,
    sharper attention makes the heads differ, so the anchor's per-head scaling changes the ranking."""
    model = tiny("clip_proj")
    for layer in model.vision_model.encoder.layers:
        layer.self_attn.q_proj.weight.data *= factor
        layer.self_attn.k_proj.weight.data *= factor
    return model


def stream(model, n: int = 8):
    """Class embeddings [2, 32] (the features of two images) and a stream of ``n`` images alternating between
    noisy copies of them, so both classes fill up and the anchors switch on after four images."""
    base = pixels(2, 11)
    with torch.no_grad():
        emb = model(base).image_embeds
    g = torch.Generator().manual_seed(5)
    images = [base[i % 2] + 0.3 * torch.randn(base[0].shape, generator=g) for i in range(n)]
    return emb, images


# ---------------------------------------------------------------------------- the plain reference
def plain_coreset(tokens: torch.Tensor, k: int, first: int) -> list[torch.Tensor]:
    """k-center greedy from ``first``, nearest-centre clusters, inverse-distance weighted means (centre weight 1)."""
    centres = [first]
    dist = torch.norm(tokens - tokens[first], dim=1)
    for _ in range(k - 1):
        nxt = int(torch.argmax(dist))
        centres.append(nxt)
        dist = torch.minimum(dist, torch.norm(tokens - tokens[nxt], dim=1))
    assign = torch.stack([torch.norm(tokens - tokens[c], dim=1) for c in centres], 1).argmin(1)
    merged = []
    for i, c in enumerate(centres):
        members = tokens[assign == i]
        d = torch.norm(members - tokens[c], dim=1)
        w = torch.where(d == 0, torch.ones_like(d), 1 / d)
        merged.append(((w / w.sum())[:, None] * members).sum(0))
    return merged


def plain_tca(model, image, drop_rate, anchors=None, seed=0, head_rank=False):
    """One image through the tower with TCA: (output tokens [M, C], image embedding [E], trace [L, C], keys)."""
    enc = model.vision_model
    h = enc.pre_layrnorm(enc.embeddings(image[None]))[0]
    g = torch.Generator().manual_seed(seed)
    trace, keys = [], []
    for block, layer in enumerate(enc.encoder.layers):
        attn = layer.self_attn
        heads, d = attn.num_heads, attn.head_dim
        y = layer.layer_norm1(h)
        q, k, v = (proj(y).view(-1, heads, d).transpose(0, 1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
        h = h + attn.out_proj((probs @ v).transpose(0, 1).reshape(-1, heads * d))
        trace.append(h[0])
        if block in LOCS:
            keys.append(k[:, 0])
            u = float(torch.rand(1, generator=g))
            logits = (q[:, :1] @ k.transpose(-1, -2))[:, 0] * attn.scale  # [H, N]: the [CLS] query
            if anchors is not None and block > 0:
                a_trace, a_keys = anchors
                c = int(F.cosine_similarity(a_trace[:, block - 1], trace[block - 1][None], dim=-1).argmax())
                extra = (q[:, 0] * a_keys[c, LOCS.index(block)]).sum(-1, keepdim=True) * attn.scale
                row = torch.cat([extra, logits], 1).softmax(-1)[:, 1:]  # the anchor as one more key
            else:
                row = logits.softmax(-1)
            score = row[:, 1:].mean(0)
            n = len(score)
            left = math.ceil((1 - drop_rate) * n)
            m = n + 1 - left  # the reference's N - left_tokens, N counting [CLS]
            if left < n:
                if head_rank:
                    rank = row[:, 1:].argsort(1).argsort(1).float().mean(0)
                    top = sorted(range(n), key=lambda j: (-rank[j].item(), -score[j].item()))[:left]
                    top = torch.tensor(top)
                else:
                    top = score.topk(left).indices
                kept, amb = top[:left - 2 * m], top[left - 2 * m:]
                rest = torch.tensor([j for j in range(n) if j not in set(top.tolist())])
                patches = h[1:]
                merged = plain_coreset(patches[amb], min(4, len(amb)), min(int(u * len(amb)), len(amb) - 1))
                fused = (patches[rest] * score[rest, None]).sum(0)
                h = torch.cat([h[:1], patches[kept], torch.stack(merged), fused[None]])
        h = h + layer.mlp(layer.layer_norm2(h))
    embed = model.visual_projection(enc.post_layernorm(h[0]))
    return h, embed, torch.stack(trace), torch.stack(keys)


class PlainReservoir:
    """The reservoir of ``runner.py`` (update_reservoir_sim with --div --token_sim, compute_reservoir_logits)."""

    def __init__(self, classes, size=3, lam=3.0, beta=5.0, scale=0.1):
        self.w, self.size, self.lam, self.beta, self.scale = classes, size, lam, beta, scale
        self.items = {c: [] for c in range(len(classes))}

    def anchors(self):
        if not all(len(v) > 1 for v in self.items.values()):
            return None
        return (torch.stack([torch.stack([t for _, t, _ in v]).mean(0) for v in self.items.values()]),
                torch.stack([torch.stack([k for _, _, k in v]).mean(0) for v in self.items.values()]))

    def adapt(self, embed, trace, keys):
        f = embed / embed.norm()
        logits = 100 * f @ (self.w / self.w.norm(dim=-1, keepdim=True)).T
        entropy = float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum())
        items = self.items[int(logits.argmax())]
        items.append((entropy, trace, keys))
        if len(items) > self.size:
            feats = F.normalize(torch.stack([t.mean(0) for _, t, _ in items]), dim=1)
            sim = feats @ feats.T
            score = [e + float((sim[i].sum() - sim[i, i]) / (len(items) - 1)) for i, (e, _, _) in enumerate(items)]
            items.pop(max(range(len(score)), key=lambda i: (score[i], -i)))
        items.sort(key=lambda it: it[0])
        weights = torch.exp(torch.linspace(0, 1, len(trace), dtype=torch.float64) / self.scale)
        weights = (weights / weights.sum()).float()
        extra = torch.zeros_like(logits)
        for c, v in self.items.items():
            for _, t, _ in v:
                affinity = (F.cosine_similarity(trace, t, dim=-1) * weights).sum()
                extra[c] += torch.exp(-self.beta * (1 - affinity))
        return logits + self.lam * extra


# ---------------------------------------------------------------------------- (a) the plain reference
@pytest.mark.parametrize("score", ["attention", "head_rank"])
def test_a_stream_matches_the_plain_reference(score):
    """Eight images one at a time: outputs, corrected logits and reservoir match at every step, and the anchors
    switch on after four (and change what is kept)."""
    model = clip()
    emb, images = stream(model)
    method = tr.get_method("tca", drop_rate=0.25, class_embeddings=emb, score=score)
    ref = PlainReservoir(emb)
    anchored = 0
    with torch.no_grad(), tr.apply(model, method):
        for i, img in enumerate(images):
            anchors = ref.anchors()
            assert method.anchors_active == (anchors is not None), i
            out = model(img[None])
            logits = method.adapt(out.image_embeds)
            h, embed, trace, keys = plain_tca(model, img, 0.25, anchors, head_rank=score == "head_rank")
            assert out.last_hidden_state.shape[1] == h.shape[0]
            assert torch.allclose(out.last_hidden_state[0], h, atol=1e-5), i
            assert torch.allclose(out.image_embeds[0], embed, atol=1e-5), i
            want = ref.adapt(embed, trace, keys)
            assert torch.allclose(logits[0], want, atol=1e-4), (i, logits, want)
            assert method.reservoir_counts() == [len(v) for v in ref.items.values()]
            if anchors is not None:
                anchored += 1
                free = plain_tca(model, img, 0.25, None, head_rank=score == "head_rank")[0]
                assert not torch.allclose(free, h, atol=1e-4), "the anchor changed nothing"
    assert anchored >= 3
    assert method.reservoir_counts() == [3, 3]


def test_the_counts_are_the_reference_counts():
    """ViT-B/16 at the reference's drop rate 0.1: 196 patches -> 137 kept + 4 centres + 1 fused, and so on."""
    assert stage_sizes(196, 0.1, 4) == (137, 40, 4, 19)
    assert token_counts(197, 1, 12, (3, 6, 9), 0.1, 4) == [197] * 3 + [143] * 3 + [104] * 3 + [77] * 3
    assert stage_sizes(64, 0.001, 4) == (64, 0, 0, 0)  # drops nothing: no condensation
    assert stage_sizes(64, 0.5, 4) == (0, 32, 4, 32)  # left - 2m < 0: no kept tokens (the reference fails here)


# ---------------------------------------------------------------------------- the planner, as a property
@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 40), rate=st.floats(0.0, 0.95), centres=st.integers(1, 6), heads=st.integers(1, 3),
       head_rank=st.booleans(), u=st.floats(0.0, 0.999), seed=st.integers(0, 1000))
def test_the_plan_covers_each_token_once(n, rate, centres, heads, head_rank, u, seed):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(heads, n, generator=g)
    patches = torch.randn(n, 8, generator=g)
    order = rank_order(attn, torch.ones(n, dtype=torch.bool), "head_rank" if head_rank else "attention")
    kept, groups = plan_image(order, attn.mean(0), patches, rate, centres, u)
    k, amb, c, fused = stage_sizes(n, rate, centres)
    members = kept.tolist() + [j for idx, _ in groups for j in idx.tolist()]
    assert sorted(members) == list(range(n)), "every patch goes to exactly one output token"
    if not fused:
        assert kept.tolist() == list(range(n)) and groups == []
        return
    assert len(kept) == k and len(groups) == c + 1
    assert kept.tolist() == order[:k].tolist()  # the best ones, best first
    if not head_rank:
        assert bool((attn.mean(0)[kept].min() if k else math.inf) >= attn.mean(0)[groups[-1][0]].max())
    for idx, w in groups[:-1]:  # each cluster: a weighted mean
        assert len(idx) >= 1 and abs(float(w.sum()) - 1.0) < 1e-5
    idx, w = groups[-1]
    assert torch.equal(w, attn.mean(0)[idx]) and len(idx) == fused  # the fused token: attention-weighted sum


# ---------------------------------------------------------------------------- (b) nothing to condense
@pytest.mark.parametrize("params", [dict(keep_ratio=1.0), dict(drop_rate=0.0), dict(drop_rate=0.01)])
def test_nothing_to_condense_is_bit_identical(params):
    model = clip()
    emb, images = stream(model)
    x = torch.stack(images[:2])
    with torch.no_grad():
        ref = model(x)
        m = tr.get_method("tca", class_embeddings=emb, **params)
        with tr.apply(model, m) as h:
            out = model(x)
            if "drop_rate" in params:  # the test-time adaptation runs; the anchors only act where tokens drop
                for img in images:
                    m.adapt(model(img[None]).image_embeds)
                assert m.anchors_active
                again = model(x)
                assert torch.equal(again.image_embeds, ref.image_embeds)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.image_embeds, ref.image_embeds)
    assert h.stats.mlp_tokens_per_layer == [PATCHES + 1.0] * 4


# ---------------------------------------------------------------------------- (c) a batch is its images
def test_a_batch_equals_its_images_from_the_same_reservoir():
    model = clip()
    emb, images = stream(model)
    m = tr.get_method("tca", drop_rate=0.25, class_embeddings=emb)
    x = pixels(3, 7)
    with torch.no_grad(), tr.apply(model, m):
        for img in images:  # fill the reservoir: the anchors are on
            m.adapt(model(img[None]).image_embeds)
        assert m.anchors_active
        state = copy.deepcopy(m._reservoir)
        batch = model(x)
        logits = m.adapt(batch.image_embeds)
        m._reservoir = copy.deepcopy(state)  # the same reservoir for the images one at a time
        singles = [model(x[i:i + 1]) for i in range(3)]  # forwards read the reservoir, adapt writes it
        for i, s in enumerate(singles):
            assert torch.allclose(batch.last_hidden_state[i], s.last_hidden_state[0], atol=1e-5), i
        m._reservoir = copy.deepcopy(state)
        for i in range(3):  # adapt inserts and corrects a batch's images in order, as a stream of single images
            model(x[i:i + 1])
            one = m.adapt(singles[i].image_embeds)
            assert torch.allclose(logits[i], one[0], atol=1e-4), i


def test_reset_empties_the_reservoir_and_the_forward_is_the_plain_condensation_again():
    model = clip()
    emb, images = stream(model)
    m = tr.get_method("tca", drop_rate=0.25, class_embeddings=emb)
    with torch.no_grad(), tr.apply(model, m):
        first = model(images[0][None]).last_hidden_state
        for img in images:
            m.adapt(model(img[None]).image_embeds)
        assert not torch.allclose(model(images[0][None]).last_hidden_state, first, atol=1e-4)
        m.reset()
        assert m.reservoir_counts() == [0, 0] and not m.anchors_active
        assert torch.equal(model(images[0][None]).last_hidden_state, first)


# ---------------------------------------------------------------------------- (d) removing restores the model
def test_leaving_apply_restores_the_model_whatever_the_reservoir_holds():
    model = clip()
    emb, images = stream(model)
    x = torch.stack(images[:2])
    with torch.no_grad():
        ref = model(x)
        m = tr.get_method("tca", drop_rate=0.25, class_embeddings=emb)
        with tr.apply(model, m):
            for img in images:
                m.adapt(model(img[None]).image_embeds)
            assert model(x).last_hidden_state.shape[1] < PATCHES + 1
        out = model(x)
    assert m.anchors_active  # the state stays with the method object
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state) and torch.equal(out.image_embeds, ref.image_embeds)
    assert all("forward" not in layer.__dict__ for layer in model.vision_model.encoder.layers)


# ---------------------------------------------------------------------------- budgets
def test_keep_ratio_picks_the_drop_rate_that_meets_it():
    model, x = clip(), pixels(2)
    for ratio in (0.4, 0.6, 0.85):
        m = tr.get_method("tca", keep_ratio=ratio)
        with torch.no_grad(), tr.apply(model, m) as h:
            model(x)
        got = mean_kept(h.stats.mlp_tokens_per_layer, PATCHES + 1)
        assert abs(got - ratio) < 0.02, (ratio, got, m._rate)


# ---------------------------------------------------------------------------- DINOv2: class prototypes
def test_dinov2_with_class_prototypes_adapts_a_stream():
    """A tower without text: the prototypes (mean pooled feature of two labelled images per class) stand in for the
    text embeddings; the reservoir fills, the anchors switch on, DINOv2's registers stay in front."""
    torch.manual_seed(0)
    model = tf.Dinov2Model(tf.Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                           image_size=IMAGE, patch_size=PATCH, mlp_ratio=2)).eval()
    labelled = [pixels(2, 20 + c) + 2.0 * c for c in range(3)]  # three classes, two images each
    with torch.no_grad():
        prototypes = torch.stack([model(x).pooler_output.mean(0) for x in labelled])
        m = tr.get_method("tca", drop_rate=0.25, class_embeddings=prototypes, logit_scale=50.0)
        with tr.apply(model, m) as h:
            for i in range(12):
                x = labelled[i % 3][i % 2:i % 2 + 1] + 0.1 * torch.randn(1, 3, IMAGE, IMAGE)
                logits = m.adapt(model(x).pooler_output)
                assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert m.reservoir_counts() == [3, 3, 3] and m.anchors_active
    assert h.stats.mlp_tokens_per_layer[-1] < PATCHES + 1


# ---------------------------------------------------------------------------- (e) errors
@pytest.mark.parametrize("params, error, match", [
    (dict(drop_rate=1.0), tr.BudgetError, "drop_rate must be a number in \\[0, 1\\)"),
    (dict(drop_rate=-0.1), tr.BudgetError, "drop_rate"),
    (dict(drop_rate=True), tr.BudgetError, "drop_rate"),
    (dict(drop_rate=0.1, keep_ratio=0.5), tr.BudgetError, "not both"),
    (dict(keep_ratio=0.0), tr.BudgetError, "keep_ratio"),
    (dict(num_centers=0), tr.ParameterError, "num_centers must be an integer >= 1"),
    (dict(reservoir_size=0), tr.ParameterError, "reservoir_size"),
    (dict(layer_temperature=0.0), tr.ParameterError, "layer_temperature"),
    (dict(beta=-1.0), tr.ParameterError, "beta"),
    (dict(score="rank"), tr.ParameterError, "score must be one of 'attention', 'head_rank'"),
    (dict(locations=(1.5,)), tr.ParameterError, "locations"),
    (dict(seed=-1), tr.ParameterError, "seed"),
    (dict(class_embeddings=torch.zeros(3)), tr.ParameterError, "class_embeddings must be a finite float tensor"),
    (dict(class_embeddings=[[0.0, 1.0]]), tr.ParameterError, "got \\[\\[0.0, 1.0\\]\\]"),
    (dict(class_embeddings=torch.tensor([[0.0, math.nan]])), tr.ParameterError, "not all finite"),
    (dict(class_embeddings=torch.ones(2, 4, dtype=torch.long)), tr.ParameterError, "class_embeddings"),
    (dict(reservoir=3), tr.UnknownParameterError, "did you mean 'reservoir_size'"),
])
def test_bad_parameters_are_refused_at_construction(params, error, match):
    with pytest.raises(error, match=match):
        tr.get_method("tca", **params)


def test_adapt_is_refused_without_what_it_needs():
    model = clip()
    emb, images = stream(model)
    with torch.no_grad():
        plain = tr.get_method("tca", drop_rate=0.2)
        with tr.apply(model, plain):
            out = model(images[0][None])
            with pytest.raises(tr.ParameterError, match="needs class_embeddings"):
                plain.adapt(out.image_embeds)
        m = tr.get_method("tca", drop_rate=0.2, class_embeddings=emb)
        with pytest.raises(tr.StageError, match="forward just run"):
            m.adapt(out.image_embeds)
        with tr.apply(model, m):
            out = model(torch.stack(images[:2]))
            with pytest.raises(tr.ParameterError, match=r"features \[2, 32\]"):
                m.adapt(out.image_embeds[:1])
            m.adapt(out.image_embeds)
            with pytest.raises(tr.StageError, match="once"):
                m.adapt(out.image_embeds)


def test_a_tower_without_cls_is_refused_and_blocks_out_of_range_never_fire():
    with pytest.raises(tr.StageError, match="no \\[CLS\\]"):
        tr.patch(tiny("siglip"), tr.get_method("tca", drop_rate=0.1))
    model = clip()
    with torch.no_grad(), pytest.raises(tr.NeverFiredError), tr.apply(model, tr.get_method("tca", locations=(10,))):
        model(pixels(1))
