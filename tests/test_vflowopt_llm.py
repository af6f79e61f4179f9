"""VFlowOpt's language-model drops (`methods.vflowopt_llm`, step 6 of arXiv 2508.05211) after its tower stage
(`methods.vflowopt`) on the tiny LLaVA: the visual tokens kept at each drop layer against a plain reference written
from the paper and the reference code, the connector's scores carried through two drops, keep_ratio=1.0, a padded
batch under ``generate``, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from test_vflowopt import SIDE, TEXTS, eager_map, plain_importance, plain_recycle, sharpen
from tiny_vlm import IMAGE_ID, one, tiny_vlm, vlm_batch

import tokenreduce as tr
from tokenreduce.methods.vflowopt import DEFAULT_T
from tokenreduce.methods.vflowopt_llm import REFERENCE_R, scaled_layers

KEEP, A = 9, 2.0  # the tower stage: 9 of the 16 visual tokens, a few of them recycled (2 x 2 cells)


def plain_tower(model, pixels: torch.Tensor) -> tuple[dict[int, float], list[float]]:
    """The tower stage's outputs ``{image position: score}`` (a recycled token at its earliest member's position,
    scored by its strongest member, as the reference keeps that member's map entry) and the patch scores."""
    score = plain_importance(eager_map(model, pixels), DEFAULT_T)
    return {pos: max(score[j] for j, _ in members) for pos, members in plain_recycle(score, KEEP, A)}, score


def plain_drops(prior: dict[int, float], drops: list[tuple[int, float]]) -> dict[int, list[int]]:
    """At each drop layer keep floor(fraction x n) of the n tokens the language model received, the lowest tower
    scores removed (ties: the earlier token first), the rest in prompt order."""
    n = len(prior)
    present, out = sorted(prior), {}
    for layer, frac in drops:
        k = max(1, math.floor(n * frac + 1e-9))
        ascending = sorted(present, key=lambda p: (prior[p], p))
        present = sorted(ascending[len(present) - k:])
        out[layer] = present
    return out


def image_start(ids: torch.Tensor) -> int:
    return int((ids == IMAGE_ID).nonzero()[0])


def kept_in_image(stats, layer: int, sample: int, start: int) -> list[int]:
    return [p - start for p in stats.kept_positions[layer][sample] if start <= p < start + SIDE * SIDE]


def pipeline(**llm):
    return tr.get_method("vflowopt", keep_count=KEEP, a=A), tr.get_method("vflowopt_llm", **llm)


# ---------------------------------------------------------------------------- the kept tokens
@pytest.mark.parametrize("llm, drops", [
    (dict(r=(0.75, 0.5)), [(1, 0.75), (2, 0.375)]),  # the reference's r: fractions of the tokens still present
    (dict(), [(1, REFERENCE_R[0]), (2, REFERENCE_R[0] * REFERENCE_R[1])]),  # the released 25 % configuration
    (dict(schedule=[(2, 0.4)]), [(2, 0.4)]),
])
def test_kept_tokens_equal_the_plain_reference_in_every_sample_of_a_padded_batch(llm, drops):
    model = sharpen(tiny_vlm("llava"))
    batch = vlm_batch(model, "llava", TEXTS)
    with torch.no_grad(), tr.apply(model, *pipeline(**llm)) as h:
        model(**batch)
    s = h.stats_by_stage["decoder"]
    for i in range(len(TEXTS)):
        prior, _ = plain_tower(model, batch["pixel_values"][i:i + 1])
        want = plain_drops(prior, drops)
        start = image_start(batch["input_ids"][i])
        assert sorted(s.kept_positions) == [k for k, _ in drops]
        for layer, kept in want.items():
            assert kept_in_image(s, layer, i, start) == kept, (i, layer)
    assert s.visual_tokens == KEEP and h.stats_by_stage["connector"].kept_visual_tokens == KEEP
    counts = {k: max(1, math.floor(KEEP * f + 1e-9)) for k, f in drops}
    assert s.visual_tokens_per_layer == [KEEP if i < drops[0][0] else counts[max(k for k in counts if k <= i)]
                                         for i in range(3)]


def test_each_drop_ranks_the_rows_by_their_own_tower_scores():
    """The scores survive the first drop's compaction: the second drop's context holds, at each visual row, the
    tower score of the token that row holds (a recycled token: its strongest member's); text rows hold NaN."""
    model = sharpen(tiny_vlm("llava"))
    batch = vlm_batch(model, "llava", TEXTS)
    vf, llm = pipeline(r=(0.75, 0.5))
    seen = []
    plan = llm.plan
    llm.plan = lambda ctx: (seen.append(ctx), plan(ctx))[1]
    with torch.no_grad(), tr.apply(model, vf, llm) as h:
        model(**batch)
    s = h.stats_by_stage["decoder"]
    assert [c.layer for c in seen] == [1, 1, 1, 2, 2, 2]
    for i, (first, second) in enumerate(zip(seen[:3], seen[3:])):
        prior, _ = plain_tower(model, batch["pixel_values"][i:i + 1])
        start = image_start(batch["input_ids"][i])
        for ctx, rows in ((first, sorted(prior)), (second, kept_in_image(s, 1, i, start))):
            assert ctx.prior is not None and bool(ctx.prior[~ctx.visual].isnan().all())
            got = ctx.prior[ctx.visual].tolist()
            assert got == pytest.approx([prior[p] for p in rows], abs=1e-6), (i, ctx.layer)
        # the second drop's result: its own rows' highest scores, not the first drop's ranking re-used
        assert kept_in_image(s, 2, i, start) == plain_drops(prior, [(1, 0.75), (2, 0.375)])[2]


# ---------------------------------------------------------------------------- identity, batches
def test_keep_ratio_one_is_bit_identical_to_the_tower_stage_alone():
    model = sharpen(tiny_vlm("llava"))
    batch = vlm_batch(model, "llava", TEXTS)
    with torch.no_grad():
        with tr.apply(model, tr.get_method("vflowopt", keep_count=KEEP, a=A)):
            ref = model(**batch).logits
            ref_gen = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with tr.apply(model, *pipeline(keep_ratio=1.0)) as h:
            out = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)
    assert h.stats_by_stage["connector"].kept_visual_tokens == KEEP


def test_a_left_padded_batch_under_generate_equals_its_samples_one_at_a_time():
    model = sharpen(tiny_vlm("llava"))
    batch = vlm_batch(model, "llava", TEXTS)
    with torch.no_grad(), tr.apply(model, *pipeline(r=(0.75, 0.5))) as h:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:]
        assert h.stats_by_stage["decoder"].visual_tokens_per_layer == [KEEP, 6, 3]
        singles = [model.generate(**one(batch, i), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, -4:]
                   for i in range(len(TEXTS))]
    for i, s in enumerate(singles):
        assert torch.equal(out[i], s), i


# ---------------------------------------------------------------------------- refusals and budgets
@pytest.mark.parametrize("before", [(), ("fastervlm",), ("flowcut",)])
def test_without_a_connector_method_that_scores_its_tokens_it_is_refused_before_any_work(before):
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 0)
    with torch.no_grad():
        ref = model(**inputs).logits
    first = [tr.get_method(n, **({"target_num": 8} if n == "flowcut" else {"keep_ratio": 0.5})) for n in before]
    with pytest.raises(tr.StageError, match=r"compose one \(connector methods that do: vflowopt\), e\.g\. "
                                            r"tokenreduce\.apply\(model, get_method\('vflowopt'"):
        tr.patch(model, *first, tr.get_method("vflowopt_llm"))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # nothing left attached


def test_layers_scale_with_the_depth_and_budgets_say_what_is_wrong():
    assert scaled_layers(28) == [9, 18] and scaled_layers(3) == [1, 2] and scaled_layers(32) == [10, 21]
    assert scaled_layers(2) == [1, 2]  # the second falls past the last layer: folded into the first

    class Info:
        num_layers = 2

    cum = REFERENCE_R[0] * REFERENCE_R[1]
    assert tr.get_method("vflowopt_llm").native_schedule(Info) == [(1, pytest.approx(cum))]
    Info.num_layers = 28
    m = tr.get_method("vflowopt_llm", keep_ratio=0.7)
    sched = m.native_schedule(Info)
    assert [k for k, _ in sched] == [9, 18] and m.mean_kept(sched, 28) == pytest.approx(0.7, abs=1e-9)
    p = math.log(sched[1][1]) / math.log(cum)  # one power of the native fractions
    assert sched[0][1] == pytest.approx(REFERENCE_R[0] ** p)
    with pytest.raises(tr.BudgetError, match="give keep_ratio or r, not both"):
        tr.get_method("vflowopt_llm", keep_ratio=0.5, r=(0.5, 0.5))
    with pytest.raises(tr.BudgetError, match="give layers or schedule"):
        tr.get_method("vflowopt_llm", schedule=[(2, 0.5)], layers=[1])
    with pytest.raises(tr.BudgetError, match="3 layers need as many fractions r"):
        tr.get_method("vflowopt_llm", layers=[1, 2, 3])
    with pytest.raises(tr.BudgetError, match="below what drops at layers"):
        tr.get_method("vflowopt_llm", keep_ratio=0.3).native_schedule(Info)
    with pytest.raises(tr.ParameterError, match="r must be a list of numbers in"):
        tr.get_method("vflowopt_llm", r=(1.5, 0.5))
