"""A per-layer schedule (`core.schedule.LayerSchedule`) run by any in-LLM method on tiny VLMs, and the calibration
evaluator of ``tokenreduce search-schedule`` on a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch
from tiny_vlm import IMAGE_ID, one, tiny_vlm, vlm_batch

import tokenreduce as tr
from tokenreduce.core.schedule import LayerSchedule

TEXTS = [(3, 5), (1, 2), (4, 7)]
VISUAL = 16  # the tiny llava's image tokens


def visual_counts(model, batch) -> list[int]:
    return ((batch["input_ids"] == IMAGE_ID) & batch["attention_mask"].bool()).sum(-1).tolist()


@pytest.mark.parametrize("name, extra", [("fastv", {}), ("pyramiddrop", {}),
                                         ("pyramiddrop", {"scores_from": "previous"})])
def test_a_given_schedule_keeps_exactly_its_counts_at_every_layer(name, extra):
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    assert visual_counts(model, batch) == [VISUAL] * 3
    schedule = LayerSchedule(((1, 11 / VISUAL), (2, 3 / VISUAL)))
    with torch.no_grad(), tr.apply(model, tr.get_method(name, schedule=schedule, **extra)) as h:
        model(**batch)
    assert h.stats.visual_tokens_per_layer == [16, 11, 3]
    assert [len([p for p in row if batch["input_ids"][i, p] == IMAGE_ID]) for i, row in
            enumerate(h.stats.kept_positions[2])] == [3, 3, 3]
    assert h.stats.kept_visual_fraction == pytest.approx(schedule.mean_kept(3))


@pytest.mark.parametrize("name, native, pairs", [
    ("fastv", dict(k=1, r=0.5), [(1, 0.5)]),
    ("fastv", dict(k=2, keep_ratio=0.8), None),
    ("pyramiddrop", dict(layers=[1, 2], lambda_=0.5), [(1, 0.5), (2, 0.25)]),
    ("pyramiddrop", dict(layers=[1, 2], keep_ratio=0.6, scores_from="previous"), None),
])
def test_the_native_schedule_given_as_a_schedule_gives_identical_outputs(name, native, pairs):
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    own = tr.get_method(name, **native)
    from tokenreduce.families.decoders import decoder_info, find_decoder

    fam, backbone = find_decoder(model)
    got_pairs = own.schedule(decoder_info(fam, backbone, ()))
    if pairs is not None:
        assert got_pairs == pairs
    extra = {"scores_from": native["scores_from"]} if "scores_from" in native else {}
    given = tr.get_method(name, schedule=got_pairs, **extra)
    with torch.no_grad():
        with tr.apply(model, own) as h1:
            logits1 = model(**batch).logits
            gen1 = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with tr.apply(model, given) as h2:
            logits2 = model(**batch).logits
            gen2 = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(logits1, logits2) and torch.equal(gen1, gen2)
    assert h1.stats.visual_tokens_per_layer == h2.stats.visual_tokens_per_layer
    assert h1.stats.kept_positions == h2.stats.kept_positions


def test_a_schedule_file_is_a_schedule(tmp_path):
    path = LayerSchedule(((1, 0.5),), 3, VISUAL, {"search": "g-search"}).save(tmp_path / "s.json")
    model = tiny_vlm("llava")
    inputs = one(vlm_batch(model, "llava", TEXTS), 0)
    with torch.no_grad(), tr.apply(model, tr.get_method("fastv", schedule=str(path))) as h:
        model(**inputs)
    assert h.stats.visual_tokens_per_layer == [16, 8, 8]
    assert "g-search" in repr(tr.get_method("fastv", schedule=path))


def test_a_schedule_excludes_keep_ratio_and_the_native_budget():
    s = [(1, 0.5)]
    for name, native in [("fastv", dict(keep_ratio=0.5)), ("fastv", dict(r=0.5)), ("fastv", dict(k=1)),
                         ("pyramiddrop", dict(keep_ratio=0.5)), ("pyramiddrop", dict(lambda_=0.5)),
                         ("pyramiddrop", dict(layers=[1, 2]))]:
        with pytest.raises(tr.BudgetError, match="not both"):
            tr.get_method(name, schedule=s, **native)
    with pytest.raises(tr.BudgetError, match="drops no visual token"):
        tr.get_method("fastv", schedule=[])
    with pytest.raises(tr.BudgetError, match="ascending"):
        tr.get_method("pyramiddrop", schedule=[(2, 0.5), (1, 0.25)])


def test_a_schedule_beyond_the_language_model_is_refused_at_attach():
    model = tiny_vlm("llava")
    with pytest.raises(tr.BudgetError, match="beyond this language model's 3 layers"):
        tr.patch(model, tr.get_method("fastv", schedule=LayerSchedule(((1, 0.5), (5, 0.25)), 30)))


# ---------------------------------------------------------------------------- the calibration evaluator
class _Tokenizer:
    def encode(self, word, add_special_tokens=False):
        return [2 + sum(map(ord, word.strip().lower())) % 100]


class _Processor:
    """Questions -> tiny-LLaVA batches: each question is "a,b" (text tokens before and after the image)."""

    num_image_tokens = VISUAL

    def __init__(self, model):
        self.model, self.tokenizer = model, _Tokenizer()

    def __call__(self, images=None, text=None):
        texts = [tuple(int(v) for v in q.split(",")) for q in text]
        return vlm_batch(self.model, "llava", texts, seed=sum(a * 7 + b for a, b in texts))


def test_the_calibration_evaluator_scores_first_tokens_and_counts_analytic_flops():
    from tokenreduce.search.vlm import CalibrationEvaluator

    model = tiny_vlm("llava")
    samples = [{"image": None, "question": f"{1 + i % 3},{2 + i % 4}", "answer": "red"} for i in range(6)]
    ev = CalibrationEvaluator(model, _Processor(model), samples, "fastv", objective="agreement", batch_size=4)
    assert ev.num_layers == 3 and ev.visual_tokens == VISUAL and ev.full_score == 1.0
    assert ev(LayerSchedule(())) == 1.0 and ev.evaluations == 0
    score = ev(LayerSchedule(((1, 1 / VISUAL),)))
    assert 0.0 <= score <= 1.0 and ev.evaluations == 1
    assert ev(LayerSchedule(((1, 1.0),))) == 1.0  # keeps every token: the same first tokens
    assert ev.flops(LayerSchedule(())) == 1.0
    assert ev.flops(LayerSchedule(((1, 0.5),))) < ev.flops(LayerSchedule(((2, 0.5),))) < 1.0
    native = ev.native(0.8)
    assert native.drops == ((2, pytest.approx(0.4)),)  # FastV k=2 of 3 layers: (1 + 1 + 0.4) / 3 = 0.8
    # the analytic count is the attachment's on a batch of one
    inputs = one(vlm_batch(model, "llava", [(2, 3)]), 0)
    with torch.no_grad(), tr.apply(model, tr.get_method("fastv", schedule=[(1, 0.5)])) as h:
        model(**inputs)
    from tokenreduce.runtime.in_llm import schedule_prefill_flops

    flops, full = schedule_prefill_flops([(1, 0.5)], tr.get_method("fastv", schedule=[(1, 0.5)]), ev.info,
                                         ev.mlp_size, inputs["input_ids"].shape[1], VISUAL)
    assert flops == pytest.approx(h.stats.flops) and full == pytest.approx(h.stats.flops_full)
    accuracy = CalibrationEvaluator(model, _Processor(model), samples, "pyramiddrop", objective="accuracy")
    assert 0.0 <= accuracy.full_score <= 1.0


def test_g_search_on_the_tiny_llava_holds_the_unreduced_agreement():
    from tokenreduce.search import g_search
    from tokenreduce.search.vlm import CalibrationEvaluator

    model = tiny_vlm("llava")
    samples = [{"image": None, "question": f"{1 + i % 3},{2 + i % 4}", "answer": "red"} for i in range(4)]
    ev = CalibrationEvaluator(model, _Processor(model), samples, "fastv", objective="agreement")
    schedule, log = g_search(ev, ev.num_layers, ev.visual_tokens, source={"model": "tiny-llava"})
    assert ev(schedule) == 1.0 and schedule.source["score"] == 1.0
    assert schedule.num_layers == 3 and schedule.source["model"] == "tiny-llava"
    assert len(log) == len({tuple(map(tuple, e["drops"])) for e in log})  # each schedule evaluated once


def test_bench_vlm_adds_one_labelled_row_per_in_llm_method_running_the_schedule():
    from tokenreduce.bench.runner import Grid, check_attachable
    from tokenreduce.bench.vlm import VLMBenchConfig, schedule_cells

    model = tiny_vlm("llava")
    schedule = LayerSchedule(((1, 0.5), (2, 0.25)), 3, VISUAL, {"search": "p-sigmoid"})
    cfg = VLMBenchConfig(methods=["fastv", "pyramiddrop"], schedule=schedule)
    cells = schedule_cells(model, ["fastv", "pyramiddrop"], cfg)
    assert [c.method for c in cells] == ["fastv (searched: p-sigmoid)", "pyramiddrop (searched: p-sigmoid)"]
    assert all(c.budget == pytest.approx((1 + 0.5 + 0.25) / 3) for c in cells)
    assert [c.obj.given_schedule for c in cells] == [schedule, schedule]
    assert check_attachable(model, Grid(cells), log=lambda _: None).cells == cells
    deep = VLMBenchConfig(methods=["fastv"], schedule=LayerSchedule(((1, 0.5), (12, 0.25)), 30))
    with pytest.raises(tr.BudgetError, match="--schedule: drop layer 12 is beyond"):
        schedule_cells(model, ["fastv"], deep)
