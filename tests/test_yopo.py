"""YOPO's layer skipping (methods/yopo.py) against a plain reference: the tiny LLaVA's language model run layer by layer
with every visual token deleted from the hidden states at layer K, by hand; and the runtime's support for a drop that
keeps no visual token (runtime/in_llm.py): FLOPs, cache length and positions after every visual token is gone."""

from __future__ import annotations

import pytest
import torch
from tiny_vlm import FAMILIES, IMAGE_ID, one, tiny_vlm, vlm_batch

import tokenreduce as tr
from tokenreduce.core.kv import CompressedLayer
from tokenreduce.core.method import DecoderInfo
from tokenreduce.runtime.in_llm import schedule_prefill_flops
from tokenreduce.runtime.prefill_filter import decoder_layer_flops
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

TEXTS = [(3, 5), (1, 2), (4, 7)]
VISUAL = 16  # the tiny llava's image tokens
LAYERS = 3


def info(layers: int) -> DecoderInfo:
    return DecoderInfo("llama", layers, 4, 2, 16, 64, tuple(range(layers)))


def lm_inputs(model, batch) -> torch.Tensor:
    """The language model's input embeddings (image features scattered in), as the VLM computes them."""
    got = {}
    lm = model.model.language_model
    def keep(module, args, kwargs):
        got["e"] = kwargs["inputs_embeds"]

    hook = lm.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return got["e"]


def reference(model, embeds: torch.Tensor, visual: torch.Tensor, k: int | None, heads=None, window: int | None = None,
              prefill: int | None = None, weights: dict | None = None) -> torch.Tensor:
    """Plain reference, one unpadded sample of the tiny LLaVA (Llama), every layer written out: the visual rows
    deleted from the hidden states before layer ``k`` (text rows keep their positions; None: never); ``heads[i]``: the
    heads of layer ``i`` whose post-softmax weights on visual keys stay (the others' set to 0, not renormalised);
    ``window``: the first ``prefill`` rows' visual queries see only visual keys within that grid window (the image a
    4 x 4 grid). ``weights``: filled with each layer's softmax [H, n, n]. Logits of the rows present at the end."""
    lm = model.model.language_model
    cfg = model.config.text_config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // nh
    h, pos, vis = embeds, torch.arange(embeds.shape[1])[None], visual.clone()
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i == k:
                h, pos, vis = h[:, ~vis], pos[:, ~vis], vis[~vis]
            n = h.shape[1]
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(1, n, nh, d).transpose(1, 2)
            kk = a.k_proj(x).view(1, n, nkv, d).transpose(1, 2)
            v = a.v_proj(x).view(1, n, nkv, d).transpose(1, 2)
            cos, sin = lm.rotary_emb(x, pos)
            q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
            kk, v = kk.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            if window is not None and bool(vis.any()):
                idx = vis.nonzero().flatten()
                cell = torch.stack([torch.arange(idx.numel()) // 4, torch.arange(idx.numel()) % 4], 1)
                near = (cell[:, None] - cell[None]).abs().amax(-1) <= (window - 1) // 2
                block = allowed[idx][:, idx] & near
                rows = idx[idx < (prefill or n)]
                allowed[rows[:, None], idx[None]] = block[: rows.numel()]
            w = (q @ kk.transpose(-1, -2) * d ** -0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
            if weights is not None:
                weights[i] = w[0]
            if heads is not None and (k is None or i < k):
                off = torch.tensor([hd not in heads[i] for hd in range(nh)])
                w = w.masked_fill(off[None, :, None, None] & vis[None, None, None, :], 0.0)
            o = (w @ v).transpose(1, 2).reshape(1, n, nh * d)
            h = h + a.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.lm_head(lm.norm(h))


@pytest.mark.parametrize("k", [1, 2])
def test_skip_equals_deleting_every_visual_token_by_hand_at_layer_k(k):
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    singles = [one(batch, i) for i in range(len(TEXTS))]
    wants = [reference(model, lm_inputs(model, x), x["input_ids"][0] == IMAGE_ID, k) for x in singles]
    with torch.no_grad(), tr.apply(model, tr.get_method("yopo", skip_from=k)) as h:
        batched = model(**batch).logits
        stats = h.stats
        for i, (single, want) in enumerate(zip(singles, wants)):
            visual = single["input_ids"][0] == IMAGE_ID
            got = model(**single).logits
            assert got.shape == want.shape == (1, int((~visual).sum()), model.config.text_config.vocab_size)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched[i, -1], want[0, -1], atol=1e-5, rtol=1e-5)  # left-padded batch
    assert stats.visual_tokens_per_layer == [VISUAL] * k + [0] * (LAYERS - k)
    assert stats.kept_visual_fraction == pytest.approx(k / LAYERS)
    assert all(not any(batch["input_ids"][b, p] == IMAGE_ID for p in row) for b, row in
               enumerate(stats.kept_positions[k]))


def test_flops_cache_and_positions_after_every_visual_token_is_gone():
    """Prefill FLOPs: K layers on the whole prompt, the rest on its text; layers >= K cache only the text (logical
    length the prompt's); a decoding step then equals the reference run on the prompt plus that token."""
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    k = 1
    method = tr.get_method("yopo", skip_from=k)
    single = one(batch, 0)
    embeds = lm_inputs(model, single)
    ids = single["input_ids"]
    n, visual = ids.shape[1], ids[0] == IMAGE_ID
    with torch.no_grad(), tr.apply(model, method) as h:
        out = model(**single, use_cache=True)
        s = h.stats
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, past_key_values=cache, attention_mask=torch.ones(1, n + 1, dtype=torch.long),
                     use_cache=True).logits[0, -1]
    cfg = model.config.text_config
    inf = info(LAYERS)
    want = k * decoder_layer_flops(n, inf, cfg.intermediate_size) + \
        (LAYERS - k) * decoder_layer_flops(n - VISUAL, inf, cfg.intermediate_size)
    assert s.flops == pytest.approx(want)
    assert s.flops == pytest.approx(schedule_prefill_flops([(k, 0.0)], method, inf, cfg.intermediate_size, n,
                                                           VISUAL)[0])
    assert s.flops_full == pytest.approx(LAYERS * decoder_layer_flops(n, inf, cfg.intermediate_size))
    for i, layer in enumerate(cache.layers):
        phys = layer.keys.shape[-2]
        assert phys == (n + 1 if i < k else n - VISUAL + 1), i
        assert isinstance(layer, CompressedLayer) == (i >= k)
    assert cache.get_seq_length() == n + 1
    embeds = torch.cat([embeds, model.get_input_embeddings()(nxt)], 1)
    want = reference(model, embeds, torch.cat([visual, torch.tensor([False])]), k)[0, -1]
    torch.testing.assert_close(step, want, atol=1e-5, rtol=1e-5)


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), tr.apply(model, tr.get_method("yopo", keep_ratio=0.34)) as h:
        out = model.generate(**batch, **gen)[:, -4:]
        singles = [model.generate(**one(batch, i), **gen)[0, -4:] for i in range(len(TEXTS))]
    for i, single in enumerate(singles):
        assert torch.equal(out[i], single), i
    assert h.stats.visual_tokens_per_layer == [VISUAL, 0, 0]


@pytest.mark.parametrize("ratio, k", [(0.34, 1), (0.5, 2), (0.67, 2), (0.2, 1)])
def test_keep_ratio_is_skip_from_over_the_layers(ratio, k):
    m = tr.get_method("yopo", keep_ratio=ratio)
    assert m.schedule(info(LAYERS)) == [(k, 0.0)]
    assert m.mean_kept(m.schedule(info(LAYERS)), LAYERS) == pytest.approx(k / LAYERS)
    assert abs(k / LAYERS - ratio) <= 0.5 / LAYERS
    model = tiny_vlm("llava")
    with torch.no_grad(), tr.apply(model, m) as h:
        model(**vlm_batch(model, "llava", TEXTS))
    assert h.stats.kept_visual_fraction == pytest.approx(k / LAYERS)


def test_skip_from_defaults_to_the_reference_depth_and_keep_ratio_scales_with_it():
    assert tr.get_method("yopo").schedule(info(28)) == [(24, 0.0)]  # the reference's layer 24 of 28
    assert tr.get_method("yopo").schedule(info(32)) == [(27, 0.0)]
    assert tr.get_method("yopo", keep_ratio=0.5).schedule(info(28)) == [(14, 0.0)]
    assert tr.get_method("yopo", skip_from=5).schedule(info(28)) == [(5, 0.0)]


def test_bad_skip_layers_and_budgets_are_refused_with_what_to_do():
    model = tiny_vlm("llava")
    with pytest.raises(tr.BudgetError, match=r"skip_from=3 is outside .* layers 1\.\.2"):
        tr.patch(model, tr.get_method("yopo", skip_from=3))
    with pytest.raises(tr.BudgetError, match=r"round\(24/28 x 3\) = 3 is outside"):
        tr.patch(model, tr.get_method("yopo"))
    with pytest.raises(tr.BudgetError, match=r"keep_ratio=0.1 gives skip_from = round\(0.1 x 3\) = 0.*keep_ratio in"):
        tr.patch(model, tr.get_method("yopo", keep_ratio=0.1))
    with pytest.raises(tr.ParameterError, match="skip_from"):
        tr.get_method("yopo", skip_from=0)
    with pytest.raises(tr.ParameterError, match="skip_from"):
        tr.get_method("yopo", skip_from=1.5)
    with pytest.raises(tr.BudgetError, match="not both"):
        tr.get_method("yopo", skip_from=1, keep_ratio=0.5)
    with pytest.raises(tr.BudgetError, match="no ranking of visual tokens"):
        tr.get_method("yopo", schedule=[(1, 0.5)])


def test_a_prompt_of_visual_tokens_only_is_refused():
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", [(0, 0)])
    with tr.apply(model, tr.get_method("yopo", skip_from=1)), pytest.raises(tr.StageError, match="all visual tokens"):
        with torch.no_grad():
            model(**batch)


def test_a_text_only_prompt_passes_unchanged():
    model = tiny_vlm("llava")
    ids = torch.randint(2, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with tr.apply(model, tr.get_method("yopo", skip_from=1)) as h:
            got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert h.stats.no_visual_forwards == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_keep_ratio_one_is_bit_identical_and_a_padded_batch_is_its_samples(name):
    """As tests/test_vlm.py's family loop: keep_ratio=1.0 leaves the logits bit for bit; skipping from layer 1 (every
    visual token gone), a left-padded batch generates what each prompt generates alone."""
    model = tiny_vlm(name)
    batch = vlm_batch(model, name, TEXTS)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model(**batch).logits
        with tr.apply(model, tr.get_method("yopo", keep_ratio=1.0)):
            assert torch.equal(model(**batch).logits, want)
        with tr.apply(model, tr.get_method("yopo", skip_from=1)) as h:
            out = model.generate(**batch, **gen)[:, -4:]
            s = h.stats
            singles = [model.generate(**one(batch, i), **gen)[0, -4:] for i in range(len(TEXTS))]
    assert s.visual_tokens > 0 and s.visual_tokens_per_layer[1:] == [0, 0]
    for i, single in enumerate(singles):
        assert torch.equal(out[i], single), i


# ---------------------------------------------------------------------------- parts 2 and 3: masks on visual keys
HEADS = [[0, 1, 2, 3], [1], [0, 2]]  # per layer, the heads that keep attending to visual keys


def prefill_and_step(model, method, single):
    """Logits of the prefill and of one decoding step (the prefill's greedy token) under ``method``."""
    n = single["input_ids"].shape[1]
    with torch.no_grad(), tr.apply(model, method) as h:
        out = model(**single, use_cache=True)
        stats = h.stats
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True,
                     attention_mask=torch.ones(1, n + 1, dtype=torch.long)).logits[0, -1]
    return out.logits, step, nxt, stats


@pytest.mark.parametrize("parts, kw, k, heads, window", [
    (("heads",), dict(heads=HEADS), None, HEADS, None),
    (("neighbour",), {}, None, None, 1),
    (("neighbour",), dict(window=3), None, None, 3),
    (("skip", "heads", "neighbour"), dict(skip_from=2, heads=HEADS, window=3), 2, HEADS, 3),
])
def test_visual_heads_and_neighbour_windows_equal_the_plain_reference(parts, kw, k, heads, window):
    """Prefill logits and one decoding step (prompt + the greedy token: inactive heads stay off visual keys, the
    window acts in the prefill only), each sample alone; a left-padded batch's last logits equal each sample's."""
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    with torch.no_grad(), tr.apply(model, tr.get_method("yopo", parts=parts, **kw)):
        batched = model(**batch).logits
    for i in range(len(TEXTS)):
        single = one(batch, i)
        visual = single["input_ids"][0] == IMAGE_ID
        embeds = lm_inputs(model, single)
        logits, step, nxt, stats = prefill_and_step(model, tr.get_method("yopo", parts=parts, **kw), single)
        want = reference(model, embeds, visual, k, heads, window)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[i, -1], want[0, -1], atol=1e-5, rtol=1e-5)
        n = embeds.shape[1]
        longer = torch.cat([embeds, model.get_input_embeddings()(nxt)], 1)
        want_step = reference(model, longer, torch.cat([visual, torch.tensor([False])]), k, heads, window, prefill=n)
        torch.testing.assert_close(step, want_step[0, -1], atol=1e-5, rtol=1e-5)
        assert stats.flops <= stats.flops_full  # masks save nothing: flops are the unpruned model's (or the skip's)
        if k is None:
            assert stats.flops == stats.flops_full and stats.visual_tokens_per_layer == [VISUAL] * LAYERS


def test_the_masks_change_the_outputs():
    """The references above would pass for a no-op if the masks did nothing: they do not."""
    model = tiny_vlm("llava")
    single = one(vlm_batch(model, "llava", TEXTS), 0)
    with torch.no_grad():
        full = model(**single).logits
        for kw in (dict(parts=("heads",), heads=HEADS), dict(parts=("neighbour",))):
            with tr.apply(model, tr.get_method("yopo", **kw)):
                assert (model(**single).logits - full).abs().max() > 1e-3, kw


def test_masked_attention_flops_count_what_a_skipping_kernel_would_save():
    """QK^T and AV (4 x head_dim FLOPs per pair) of each masked (query, visual key) pair of the causal prefill: inactive
    heads lose every visual key before them; a window-1 visual query keeps only itself of the visual keys."""
    model = tiny_vlm("llava")
    single = one(vlm_batch(model, "llava", TEXTS), 0)
    n = single["input_ids"].shape[1]
    where = (single["input_ids"][0] == IMAGE_ID).nonzero().flatten().tolist()
    d = 16
    pairs = sum(n - p for p in where)  # rows at or after each visual key
    off = sum(4 - len(h) for h in HEADS)
    with torch.no_grad(), tr.apply(model, tr.get_method("yopo", parts=("heads",), heads=HEADS)) as h:
        model(**single)
    assert h.stats.masked_attention_flops == pytest.approx(4 * d * off * pairs)
    with torch.no_grad(), tr.apply(model, tr.get_method("yopo", parts=("neighbour",))) as h:
        model(**single)
    masked = sum(j for j in range(VISUAL))  # visual query j loses the j visual keys before it
    assert h.stats.masked_attention_flops == pytest.approx(4 * d * 4 * masked * LAYERS)


def test_calibration_ranks_heads_by_the_last_rows_visual_attention_share():
    """Per head, the unpruned model's last prompt row: attention mass on visual keys / mass on the others, averaged
    over the prompts (plain reference); heads of layers >= 2 kept by rank, layers 0 and 1 whole."""
    model = tiny_vlm("llava")
    batch = vlm_batch(model, "llava", TEXTS)
    method = tr.get_method("yopo", parts=("skip", "heads"), skip_from=2, head_keep=0.5)
    assert tr.calibrate(method, model, [one(batch, 0), {k: v[1:] for k, v in batch.items()}]) is method
    ratios = []
    for i in range(len(TEXTS)):
        single = one(batch, i)
        visual = single["input_ids"][0] == IMAGE_ID
        weights = {}
        reference(model, lm_inputs(model, single), visual, None, weights=weights)
        ratios.append(torch.stack([w[:, -1, visual].sum(-1) / w[:, -1, ~visual].sum(-1) for w in weights.values()]))
    want = torch.stack(ratios).double().mean(0)  # [layers, H]
    for layer in range(LAYERS):
        torch.testing.assert_close(method.head_ratio[layer], want[layer], atol=1e-5, rtol=1e-5)
    top = want[2].argsort(descending=True)[:2].sort().values.tolist()
    assert method.heads == ((0, 1, 2, 3), (0, 1, 2, 3), tuple(top))
    with torch.no_grad(), tr.apply(model, method) as h:  # calibrated, it runs (skip from 2; layers 0, 1: every head)
        model(**batch)
    assert h.stats.visual_tokens_per_layer == [VISUAL, VISUAL, 0]


def test_bad_parts_heads_and_windows_are_refused_with_what_to_do():
    model = tiny_vlm("llava")
    with pytest.raises(tr.ParameterError, match="parts must be"):
        tr.get_method("yopo", parts=("skip", "ffn"))
    with pytest.raises(tr.ParameterError, match="parts must be"):
        tr.get_method("yopo", parts="skip")
    with pytest.raises(tr.BudgetError, match="budget of the 'skip' part"):
        tr.get_method("yopo", parts=("heads",), keep_ratio=0.5, heads=HEADS)
    with pytest.raises(tr.ParameterError, match="add 'heads' to parts"):
        tr.get_method("yopo", heads=HEADS)
    with pytest.raises(tr.ParameterError, match="heads must be"):
        tr.get_method("yopo", parts=("heads",), heads=[[0, 0]])
    with pytest.raises(tr.ParameterError, match="window"):
        tr.get_method("yopo", parts=("neighbour",), window=2)
    with pytest.raises(tr.ParameterError, match="not both"):
        tr.get_method("yopo", parts=("heads",), heads=HEADS, head_keep=0.5)
    with pytest.raises(tr.CalibrationError, match="tokenreduce.calibrate"):
        tr.patch(model, tr.get_method("yopo", parts=("heads",)))
    with pytest.raises(tr.BudgetError, match="heads lists 2 layers; this language model has 3"):
        tr.patch(model, tr.get_method("yopo", parts=("heads",), heads=HEADS[:2]))
    with pytest.raises(tr.BudgetError, match="head 7 at layer 1"):
        tr.patch(model, tr.get_method("yopo", parts=("heads",), heads=[[0], [7], [0]]))
    with pytest.raises(tr.StageError, match="needs no calibration"):
        tr.calibrate(tr.get_method("yopo", parts=("neighbour",)), model, [])
    nxt = tiny_vlm("llava_next")
    with tr.apply(nxt, tr.get_method("yopo", parts=("neighbour",), window=3)), \
            pytest.raises(tr.StageError, match="not a square"), torch.no_grad():
        nxt(**vlm_batch(nxt, "llava_next", TEXTS))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_runs_all_three_parts_and_a_padded_batch_is_its_samples(name):
    model = tiny_vlm(name)
    batch = vlm_batch(model, name, TEXTS)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    method = tr.get_method("yopo", parts=("skip", "heads", "neighbour"), skip_from=2, heads=HEADS)
    with torch.no_grad(), tr.apply(model, method) as h:
        out = model.generate(**batch, **gen)[:, -4:]
        s = h.stats
        singles = [model.generate(**one(batch, i), **gen)[0, -4:] for i in range(len(TEXTS))]
    assert s.masked_attention_flops > 0 and s.visual_tokens_per_layer[2] == 0
    for i, single in enumerate(singles):
        assert torch.equal(out[i], single), i


def test_eager_attention_gives_what_sdpa_gives():
    """Additive (eager) masks and boolean (SDPA) masks: the same edits, the same outputs."""
    out = {}
    for attn in ("sdpa", "eager"):
        model = tiny_vlm("llava", attn=attn)
        batch = vlm_batch(model, "llava", TEXTS)
        method = tr.get_method("yopo", parts=("skip", "heads", "neighbour"), skip_from=2, heads=HEADS, window=3)
        with torch.no_grad(), tr.apply(model, method):
            out[attn] = (model(**batch).logits[:, -1],
                         model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:])
    torch.testing.assert_close(out["eager"][0], out["sdpa"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out["eager"][1], out["sdpa"][1])
