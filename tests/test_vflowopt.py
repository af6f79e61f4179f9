"""VFlowOpt (arXiv 2508.05211) on tiny VLMs: the tower stage's kept and recycled tokens against a plain reference
written from the reference code, its budget and batch behaviour, its errors, and the calibration search."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_vlm import IMAGE_ID, one, tiny_vlm, vlm_batch

import tokenreduce as tr
from tokenreduce.core.method import VisualContext
from tokenreduce.families.encoders import find_encoders
from tokenreduce.methods.vflowopt import importance, load_params, patch_entropy, save_params
from tokenreduce.search.vflowopt import LastTokenEvaluator, VFlowOptSearchConfig, run_vflowopt_search, vflowopt_search

TEXTS = [(3, 5), (1, 2), (4, 7)]
SIDE = 4  # the tiny llava: 32 px, 8 px patches -> 4 x 4 visual tokens after [CLS]


def sharpen(model, factor: float = 4.0):
    """Random tiny towers attend almost uniformly; scaled Q and K weights give a trained tower's peaked maps."""
    for block in find_encoders(model.model.vision_tower)[0][2]:
        block.self_attn.q_proj.weight.data *= factor
        block.self_attn.k_proj.weight.data *= factor
    return model


def eager_map(model, pixels: torch.Tensor) -> torch.Tensor:
    """The select block's softmax map [H, N, N] (eager attention, output_attentions) of one image."""
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixels, output_attentions=True)
    finally:
        tower.config._attn_implementation = impl
    blocks = find_encoders(tower)[0][2]
    return out.attentions[len(blocks) - 2][0]  # vision_feature_layer = -2


# ---------------------------------------------------------------------------- the plain reference
def plain_recycle(score: list[float], k: int, a: float) -> list[tuple[int, list[tuple[int, float]]]]:
    """Kept and recycled tokens as ``(position, [(source, weight)])``, by position. Written from the reference's
    loop (sort ascending, group the lowest by a x a cell, score-weighted mean), its extra count solved for k."""
    n = len(score)
    order = sorted(range(n), key=lambda j: (score[j], j))

    def cell(j):
        return (math.floor((j // SIDE) / a), math.floor((j % SIDE) / a))

    def outputs(low):
        return n - low + len({cell(j) for j in order[:low]})

    low = n - k
    while low < n and outputs(low) > k:
        low += 1
    too_fine = outputs(low) > k
    if too_fine:
        low = min(n, n - k + int(n / a ** 2))
    groups = {}
    for j in order[:low]:
        groups.setdefault(cell(j), []).append(j)
    recycled = list(groups.values())
    if too_fine:
        recycled.sort(key=lambda g: sum(score[j] for j in g))
        recycled = recycled[outputs(low) - k:]
    out = [(j, [(j, 1.0)]) for j in order[low:]]
    for g in recycled:
        total = sum(score[j] for j in g)
        out.append((min(g), [(j, score[j] / total) for j in g]))
    return sorted(out)


def run_connector(model, inputs, method):
    """(kept positions relative to the image, the language model's input rows of the image)."""
    seen = {}
    lm = model.model.language_model
    with torch.no_grad(), tr.apply(model, method) as h:
        hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    ids = inputs["input_ids"][0]
    start = int((ids == IMAGE_ID).nonzero()[0])
    kept = h.stats.kept_positions[0]
    rows = [i for i, p in enumerate(kept) if start <= p < start + SIDE * SIDE]
    return [kept[i] - start for i in rows], seen["e"][0, rows]


@pytest.mark.parametrize("keep, a", [(6, 2.0), (9, 3.0), (3, 2.0), (5, 15.58)])
def test_kept_and_recycled_tokens_equal_the_plain_reference(keep, a):
    """Through the runtime: the connector hands over the select layer's whole map and the global tokens score;
    (3, 2.0) has more cells (4) than the budget: the weakest recycled token goes."""
    model = sharpen(tiny_vlm("llava"))
    inputs = one(vlm_batch(model, "llava", TEXTS), 0)
    score = plain_importance(eager_map(model, inputs["pixel_values"]), 34.76)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    want = plain_recycle(score, keep, a)
    method = tr.get_method("vflowopt", keep_count=keep, a=a)
    got_pos, got = run_connector(model, inputs, method)
    assert method.scored_with == "global tokens"
    assert got_pos == [p for p, _ in want] and len(got_pos) == keep
    expected = torch.stack([sum(w * feats[j] for j, w in members) for _, members in want])
    assert torch.allclose(got, expected, atol=1e-5)


def plain_importance(attn: torch.Tensor, t: float) -> list[float]:
    """Steps 1-4: tokens receiving more than t x the mean attention are global; a patch's score is their mean row."""
    m = attn.mean(0)
    n = m.shape[-1]
    received = [float(m[:, j].mean()) for j in range(n)]
    mean = sum(received) / n
    glob = [j for j in range(n) if received[j] > t * mean] or [max(range(n), key=lambda j: received[j])]
    return [sum(float(m[g, 1 + j]) for g in glob) / len(glob) for j in range(n - 1)]


@pytest.mark.parametrize("t", [1.0, 1e6])
def test_the_whole_map_path_equals_the_plain_reference(t):
    """Steps 1-4 on the select layer's whole map, planned directly from a context: global tokens
    receive more than t x the mean; score = their rows' mean (t=1e6: nobody qualifies, the most-attended alone)."""
    model = sharpen(tiny_vlm("llava"))
    inputs = one(vlm_batch(model, "llava", TEXTS), 1)
    attn = eager_map(model, inputs["pixel_values"])  # [H, 17, 17]
    m = attn.mean(0)
    received = [float(m[:, j].mean()) for j in range(17)]
    mean = sum(received) / 17
    glob = [j for j in range(17) if received[j] > t * mean] or [max(range(17), key=lambda j: received[j])]
    assert 1 <= len(glob) < 17
    score = [sum(float(m[g, 1 + j]) for g in glob) / len(glob) for j in range(16)]
    feats = torch.randn(16, 8)
    ctx = VisualContext(features=feats, budget=7, cls_attention=attn[:, 0, 1:], tower_keys=torch.randn(2, 16, 4),
                        grid=(SIDE, SIDE))
    ctx.tower_attention = attn
    method = tr.get_method("vflowopt", keep_count=7, t=t, a=2.0)
    red = method.plan(ctx)
    assert method.scored_with == "global tokens"
    want = plain_recycle(score, 7, 2.0)
    assert red.anchors()[0].tolist() == [p for p, _ in want]
    expected = torch.stack([sum(w * feats[j] for j, w in members) for _, members in want])
    assert torch.allclose(red.apply(feats[None])[0], expected, atol=1e-6)
    got, got_glob = importance(attn, 16, t)
    assert got_glob.tolist() == glob and torch.allclose(got, torch.tensor(score), atol=1e-6)


def test_entropy_term_equals_the_plain_reference():
    """Step 4's entropy: a patch's grey-level (channel mean, 0..255) histogram entropy in bits, softmaxed, x alpha."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 8, 12, generator=g)
    img[:, :4, :4] = 0.5  # one flat patch: entropy 0
    got = patch_entropy(img, 4)
    grey = (img * 255).mean(0).round()
    want = []
    for r in range(2):
        for c in range(3):
            vals = grey[4 * r:4 * r + 4, 4 * c:4 * c + 4].flatten().tolist()
            counts = {v: vals.count(v) for v in set(vals)}
            want.append(-sum(k / 16 * math.log2(k / 16) for k in counts.values()))
    assert torch.allclose(got, torch.tensor(want), atol=1e-5) and got[0] == 0
    attn = torch.rand(2, 7, 7, generator=g).softmax(-1)
    base, _ = importance(attn, 6, 1.0)
    mixed, _ = importance(attn, 6, 1.0, alpha=0.5, entropy=got)
    assert torch.allclose(mixed, base + 0.5 * got.softmax(-1))


def test_keep_ratio_one_is_bit_identical():
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    with torch.no_grad():
        ref = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with tr.apply(model, tr.get_method("vflowopt", keep_ratio=1.0, a=2.0)):
            out = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)


def test_a_left_padded_batch_under_generate_equals_one_at_a_time():
    model = sharpen(tiny_vlm("llava"))
    batch = vlm_batch(model, "llava", TEXTS)
    with torch.no_grad(), tr.apply(model, tr.get_method("vflowopt", keep_count=5, a=2.0)) as h:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:]
        assert h.stats.kept_visual_tokens == 5
        singles = [model.generate(**one(batch, i), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, -4:]
                   for i in range(len(TEXTS))]
    for i, s in enumerate(singles):
        assert torch.equal(out[i], s), i


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, match", [
    (dict(keep_ratio=0.5, t=-1.0), r"t must be a number >= 0"),
    (dict(keep_ratio=0.5, a=0.5), r"a must be a number >= 1"),
    (dict(keep_ratio=0.5, a=True), r"a must be"),
    (dict(keep_ratio=0.5, alpha=0.3), r"alpha=0.3: the patch-entropy term needs the raw image"),
    (dict(keep_ratio=0.5, tt=3.0), r"tt"),
    (dict(t=3.0), r"exactly one budget"),
    (dict(keep_ratio=0.5, params_file=3), r"params_file must be a path"),
])
def test_bad_parameters_raise_clear_errors(kw, match):
    with pytest.raises(tr.ParameterError if "budget" not in match else tr.BudgetError, match=match):
        tr.get_method("vflowopt", **kw)


def test_params_files_load_and_bad_ones_say_why(tmp_path):
    path = save_params(tmp_path / "p.json", {"t": 7.5, "a": 3.0, "alpha": 0.0}, keep_ratio=0.3, source={"x": 1})
    m = tr.get_method("vflowopt", params_file=str(path))  # the budget comes from the file
    assert (m.t, m.a, m.alpha, m.budget.ratio, m.params_source) == (7.5, 3.0, 0.0, 0.3, {"x": 1})
    assert tr.get_method("vflowopt", keep_count=4, params_file=str(path)).count.count == 4
    with pytest.raises(tr.ParameterError, match="give a or params_file, not both"):
        tr.get_method("vflowopt", keep_ratio=0.5, a=2.0, params_file=str(path))
    with pytest.raises(tr.ParameterError, match="does not exist"):
        tr.get_method("vflowopt", keep_ratio=0.5, params_file=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "tokenreduce.schedule", "version": 1}))
    with pytest.raises(tr.ParameterError, match="tokenreduce.vflowopt-params"):
        load_params(bad)
    bad.write_text(json.dumps({"format": "tokenreduce.vflowopt-params", "version": 1, "params": {"a": 0.2}}))
    with pytest.raises(tr.ParameterError, match="a must be a number >= 1"):
        tr.get_method("vflowopt", keep_ratio=0.5, params_file=str(bad))
    with pytest.raises(tr.ParameterError, match="unknown hyperparameters"):
        save_params(tmp_path / "q.json", {"t": 1.0, "r": 0.5})


def test_tokens_that_are_not_one_grid_and_towers_without_cls_are_refused():
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    with pytest.raises(tr.StageError, match="not one raster grid"), torch.no_grad():
        with tr.apply(model, tr.get_method("tome", keep_ratio=0.8), tr.get_method("vflowopt", keep_ratio=0.5)):
            model(**batch)
    ov = tiny_vlm("llava_onevision")
    with pytest.raises(tr.UnsupportedModelError, match=r"\[CLS\]"):
        tr.patch(ov, tr.get_method("vflowopt", keep_ratio=0.5))


# ---------------------------------------------------------------------------- the search
def test_search_finds_the_optimum_of_a_stub_objective():
    seen = []

    def stub(params):
        seen.append(params)
        return -((params["a"] - 6.0) ** 2) / 100 - ((params["t"] - 20.0) ** 2) / 1000

    for sampler in ("gp", "tpe"):
        before = len(seen)
        result = vflowopt_search(stub, trials=14, startup=6, sampler=sampler, seed=1)
        assert len(result.log) == 14 and result.score == max(e["score"] for e in result.log)
        assert len(seen) - before == sum(not e["cached"] for e in result.log)  # a repeated proposal runs once
        assert abs(result.params["a"] - 6.0) < 4.0 and result.params["alpha"] == 0.0
    assert all(3.0 <= p["a"] <= 24.0 and 0.0 <= p["t"] <= 50.0 for p in seen)
    for space, match in [({"alpha": (0, 1)}, "alpha stays 0"), ({"a": (0.5, 2)}, "1 <= low < high"), ({}, "empty")]:
        with pytest.raises(tr.ParameterError, match=match):
            vflowopt_search(stub, space=space, trials=2)
    with pytest.raises(tr.BudgetError, match="startup"):
        vflowopt_search(stub, trials=2, startup=3)


def test_search_without_optuna_says_what_to_install(no_optuna):
    with pytest.raises(ImportError, match=r"pip install 'tokenreduce\[search\]'"):
        vflowopt_search(lambda p: 0.0, trials=2)


def test_last_token_objective_on_a_tiny_vlm():
    """The objective: cosine of the final-norm last hidden state, pruned vs not (1.0 when nothing is pruned)."""
    model = sharpen(tiny_vlm("llava"))
    batch = vlm_batch(model, "llava", TEXTS)
    ev = LastTokenEvaluator(model, [batch], keep_ratio=1.0)
    assert ev({"a": 2.0}) == pytest.approx(1.0, abs=1e-6)
    ev = LastTokenEvaluator(model, [batch], keep_count=3)
    with torch.no_grad():
        full = model.model(**batch).last_hidden_state[:, -1]
        with tr.apply(model, tr.get_method("vflowopt", keep_count=3, a=2.0)):
            pruned = model.model(**batch).last_hidden_state[:, -1]
    want = torch.nn.functional.cosine_similarity(full, pruned, dim=-1).mean()
    assert ev({"a": 2.0, "t": None}) == pytest.approx(float(want), abs=1e-5) and ev.scored_with == "global tokens"


def test_the_search_runs_end_to_end_on_a_tiny_vlm(tmp_path):
    """The driver (calibration questions -> prompts -> probe -> search -> params file) with the tiny llava and a
    stub processor; the connector hands over the whole map, so t and a are both searched; the file loads as a
    method."""
    model = sharpen(tiny_vlm("llava"))

    def processor(images, text):
        return vlm_batch(model, "llava", [(2 + i % 3, 3) for i in range(len(text))])

    out = tmp_path / "vflowopt.json"
    lines = []
    cfg = VFlowOptSearchConfig(task="scenes", n=4, keep_ratio=0.25, trials=4, startup=2, sampler="tpe",
                               batch_size=2, space={"t": (0.0, 50.0), "a": (1.0, 4.0)}, out=str(out))
    result = run_vflowopt_search(cfg, model=model, processor=processor, log=lines.append)
    assert not any("t has no effect" in s for s in lines)
    assert 0.0 <= result.params["t"] <= 50.0 and 1.0 <= result.params["a"] <= 4.0 and len(result.log) == 4
    saved = json.loads(out.read_text())
    assert saved["params"] == result.params and saved["keep_ratio"] == 0.25
    assert saved["source"]["scored_with"] == "global tokens"
    assert saved["source"]["space"] == {"t": [0.0, 50.0], "a": [1.0, 4.0]}
    method = tr.get_method("vflowopt", params_file=str(out))
    assert method.a == result.params["a"] and method.budget.ratio == 0.25
    with torch.no_grad(), tr.apply(model, method) as h:
        model(**vlm_batch(model, "llava", TEXTS))
    assert h.stats.kept_visual_tokens == 4
