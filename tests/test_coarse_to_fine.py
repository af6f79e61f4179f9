"""Coarse-to-fine text-guided token pruning (`methods.coarse_to_fine`): tiles chosen and tokens kept against a plain
reference written from the paper, on the tiny LLaVA with multi-image prompts (a coarse view, then G x G tiles);
budgets; layout and parameter errors; the ``largescene`` task of ``bench vlm``."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from tiny_vlm import IMAGE_ID, VOCAB, tiny_vlm

import tokenreduce as tr

T = 16  # visual tokens per image of the tiny LLaVA (32 px, 8 px patches: a 4 x 4 raster)
SEP = 7  # the text token between images ("\n" in the large-scene prompt)


def multi_prompt(grids: list[int], texts: list[tuple[int, int]], seed: int = 0, touching: bool = False,
                 images: list[int] | None = None) -> dict:
    """A left-padded batch: sample i is texts[i][0] text tokens, then 1 + G_i^2 images (``images[i]`` if given), each
    followed by SEP unless ``touching``, then texts[i][1] question tokens; pixel_values of every image in order."""
    g = torch.Generator().manual_seed(seed)
    rows, total = [], 0
    counts = images or [1 + grid * grid for grid in grids]
    for count, (a, b) in zip(counts, texts):
        parts = [torch.randint(10, VOCAB - 2, (a,), generator=g)]
        for _ in range(count):
            parts.append(torch.full((T,), IMAGE_ID))
            if not touching:
                parts.append(torch.tensor([SEP]))
            total += 1
        parts.append(torch.randint(10, VOCAB - 2, (b,), generator=g))
        rows.append(torch.cat(parts))
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(total, 3, 32, 32, generator=g)}


def alone(batch: dict, grids: list[int], i: int) -> dict:
    keep = batch["attention_mask"][i].bool()
    start = sum(1 + g * g for g in grids[:i])
    return {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
            "pixel_values": batch["pixel_values"][start:start + 1 + grids[i] ** 2]}


def own_row(model, inputs: dict, k: int, name: str = "llava") -> torch.Tensor:
    """Layer k's norm, Q/K projections and RoPE on its input; the last token's softmax row over every key (each query
    head with its KV head) [H, n] — one unpadded prompt, on the tiny ``name`` VLM."""
    eager = tiny_vlm(name, attn="eager")
    with torch.no_grad():
        out = eager(**inputs, output_hidden_states=True)
        layer = eager.model.language_model.layers[k]
        x = layer.input_layernorm(out.hidden_states[k])
        a, n, hd = layer.self_attn, x.shape[1], 16
        q = a.q_proj(x).view(1, n, 4, hd).transpose(1, 2)
        key = a.k_proj(x).view(1, n, 2, hd).transpose(1, 2)
        cos, sin = eager.model.language_model.rotary_emb(x, torch.arange(n)[None])
        q, key = tf.models.llama.modeling_llama.apply_rotary_pos_emb(q, key, cos, sin)
        key = key.repeat_interleave(2, dim=1)
        return ((q[:, :, -1:] @ key.transpose(-1, -2)) / hd ** 0.5).softmax(-1)[0, :, 0]


def previous_row(inputs: dict, k: int) -> torch.Tensor:
    """Layer k-1's own attention: the last token's softmax row [H, n] (eager attentions) — one unpadded prompt."""
    with torch.no_grad():
        out = tiny_vlm("llava", attn="eager")(**inputs, output_attentions=True)
    return out.attentions[k - 1][0, :, -1]


def plain_reference(row: torch.Tensor, grid: int, budget: int, select_ratio: float = 0.25, max_tiles=None):
    """The paper's steps on one prompt's row over its visual tokens [H, v] (coarse view first, then the tiles, T each):
    coarse scores = each head's softmax renormalised over the coarse tokens, mean over heads; the top
    floor(select_ratio T) vote for the tile under them; tiles with votes by (votes, mass); then the coarse view and
    the chosen tiles ranked by the row renormalised over them; the top ``budget`` kept (visual indices)."""
    side = math.isqrt(T)
    coarse = row[:, :T] / row[:, :T].sum(-1, keepdim=True)
    score = coarse.mean(0).tolist()
    voters = sorted(range(T), key=lambda i: (-score[i], i))[:max(1, int(select_ratio * T))]
    votes, mass = [0] * grid * grid, [0.0] * grid * grid
    for i in range(T):
        r, c = divmod(i, side)
        tile = math.floor(r * grid / side) * grid + math.floor(c * grid / side)
        mass[tile] += score[i]
        votes[tile] += i in voters
    tiles = sorted((t for t in range(grid * grid) if votes[t]), key=lambda t: (-votes[t], -mass[t], t))[:max_tiles]
    pool = list(range(T)) + [T * (1 + t) + j for t in sorted(tiles) for j in range(T)]
    sub = row[:, pool] / row[:, pool].sum(-1, keepdim=True)
    s = sub.mean(0).tolist()
    keep = sorted(sorted(range(len(pool)), key=lambda i: (-s[i], i))[:budget])
    return tiles, [pool[i] for i in keep]


def kept_visual(stats, inputs: dict, k: int, sample: int = 0) -> list[int]:
    """The visual tokens (indices among the prompt's visual tokens) kept from layer k on."""
    ids = inputs["input_ids"][sample]
    visual = (ids == IMAGE_ID).nonzero().flatten().tolist()
    where = {p: i for i, p in enumerate(visual)}
    return [where[p] for p in stats.kept_positions[k][sample] if p in where]


@pytest.mark.parametrize("grid,given,max_tiles,r", [(2, None, None, 0.5), (2, 2, 1, 0.7), (3, None, 2, 0.8)])
def test_tiles_and_kept_tokens_equal_a_plain_reference(grid, given, max_tiles, r):
    model = tiny_vlm("llava")
    inputs = multi_prompt([grid], [(3, 6)])
    v = (1 + grid * grid) * T
    budget = math.floor(v * (1 - r) + 1e-9)
    tiles, want = plain_reference(own_row(model, inputs, 1)[:, (inputs["input_ids"][0] == IMAGE_ID)], grid, budget,
                                  max_tiles=max_tiles)
    m = tr.get_method("coarse_to_fine", k=1, r=r, grid=given, max_tiles=max_tiles)
    with torch.no_grad(), tr.apply(model, m) as h:
        model(**inputs)
    assert m.choices[0]["tiles"] == tiles and m.choices[0]["grid"] == grid
    assert kept_visual(h.stats, inputs, 1) == want
    assert h.stats.visual_tokens_per_layer == [v, len(want), len(want)]
    dropped = set(range(grid * grid)) - set(tiles)  # every token of a tile not chosen is gone
    assert not [i for i in want if i >= T and (i - T) // T in dropped]


def test_previous_layer_scores_on_a_padded_batch_of_different_grids():
    """scores_from='previous' (layer k-1's attention call): a left-padded batch of a G=1 and a G=2 prompt (layouts read
    from the prompt) equals the plain reference per sample, and generate equals each prompt alone."""
    model = tiny_vlm("llava")
    grids = [2, 1]
    batch = multi_prompt(grids, [(2, 5), (4, 3)])
    m = tr.get_method("coarse_to_fine", k=2, r=0.6, scores_from="previous")
    with torch.no_grad(), tr.apply(model, m) as h:
        model(**batch)
        stats = h.stats
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:]
        singles = [model.generate(**alone(batch, grids, i), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, -4:]
                   for i in range(2)]
    for i, g in enumerate(grids):
        inputs = alone(batch, grids, i)
        row = previous_row(inputs, 2)[:, inputs["input_ids"][0] == IMAGE_ID]
        v = (1 + g * g) * T
        tiles, want = plain_reference(row, g, math.floor(v * 0.4 + 1e-9))
        assert m.choices[i]["tiles"] == tiles
        assert kept_visual(stats, batch, 2, i) == want
        assert torch.equal(out[i], singles[i])


def test_budget_keep_ratio_and_a_pool_smaller_than_the_budget():
    model = tiny_vlm("llava")
    inputs = multi_prompt([2], [(3, 6)])
    v = 5 * T
    m = tr.get_method("coarse_to_fine", keep_ratio=0.6, k=1)  # 3 layers: r = 0.4 * 3 / 2 = 0.6, 32 of 80 kept
    with torch.no_grad(), tr.apply(model, m) as h:
        model(**inputs)
    assert h.stats.visual_tokens_per_layer == [v, 32, 32]
    assert abs(h.stats.kept_visual_fraction - 0.6) * v <= 1
    # one tile at most: the coarse view and that tile are 32 tokens, fewer than the 48 of r=0.4: all of them stay
    m = tr.get_method("coarse_to_fine", r=0.4, k=1, max_tiles=1)
    with torch.no_grad(), tr.apply(model, m) as h:
        model(**inputs)
    tile = m.choices[0]["tiles"][0]
    assert kept_visual(h.stats, inputs, 1) == list(range(T)) + list(range(T * (1 + tile), T * (2 + tile)))
    assert m.choices[0]["kept"] == 2 * T


def test_keep_ratio_one_reduces_nothing():
    model = tiny_vlm("llava")
    inputs = multi_prompt([2], [(3, 6)])
    with torch.no_grad():
        want = model(**inputs).logits
        with tr.apply(model, tr.get_method("coarse_to_fine", keep_ratio=1.0)):
            assert torch.equal(model(**inputs).logits, want)


def test_layout_errors_say_what_to_pass():
    model = tiny_vlm("llava")
    cases = [
        (dict(grid=4), multi_prompt([2], [(3, 6)]), r"80 visual tokens do not split into 1 \+ 4\*4 = 17 images"),
        (dict(), multi_prompt([2], [(3, 6)], touching=True), r"1 image\(s\).*pass grid=G if the images touch"),
        (dict(), multi_prompt([2], [(3, 6)], images=[3]), r"3 image\(s\).*not 1 \+ G\*G"),
        (dict(grid=2), multi_prompt([2], [(3, 6)], images=[10], touching=True), "32 tokens, not a square raster"),
    ]
    for params, inputs, match in cases:
        with pytest.raises(tr.StageError, match=match), torch.no_grad(), \
                tr.apply(model, tr.get_method("coarse_to_fine", k=1, r=0.5, **params)):
            model(**inputs)
    # grid=1 splits one 16-token image into a coarse view and one tile of 8: G=1 needs no raster
    m = tr.get_method("coarse_to_fine", k=1, r=0.5, grid=1)
    with torch.no_grad(), tr.apply(model, m):
        model(**multi_prompt([2], [(3, 6)], images=[1]))
    assert m.choices[0]["tiles"] == [0] and m.choices[0]["votes"] == [2]


def test_bad_k_budget_and_schedule_are_refused():
    model = tiny_vlm("llava")
    with pytest.raises(tr.ParameterError, match="k must be"):
        tr.get_method("coarse_to_fine", k=0)
    with pytest.raises(tr.BudgetError, match="k=3 is beyond this language model's 3 layers"):
        tr.patch(model, tr.get_method("coarse_to_fine", k=3, r=0.5))
    with pytest.raises(tr.BudgetError, match="lowest reachable is 0.667"):
        tr.patch(model, tr.get_method("coarse_to_fine", k=2, keep_ratio=0.5))
    with pytest.raises(tr.BudgetError, match="give keep_ratio or r"):
        tr.get_method("coarse_to_fine", keep_ratio=0.5, r=0.5)
    with pytest.raises(tr.BudgetError, match="one drop layer; the schedule has 2"):
        tr.patch(model, tr.get_method("coarse_to_fine", schedule=[(1, 0.5), (2, 0.25)]))
    for bad in (dict(select_ratio=0.0), dict(max_tiles=0), dict(grid=0), dict(scores_from="last")):
        with pytest.raises(tr.ParameterError):
            tr.get_method("coarse_to_fine", **bad)


# ---------------------------------------------------------------------------- bench vlm --task largescene
def test_bench_largescene_rows_and_tile_accuracy(tmp_path):
    """The task plumbing on a tiny LLaVA with the mini-LLaVA's layout (4 tokens per 28 px image): full, blind, the
    oracle focus row and the method's rows, visual tokens per sample from the multi-image prompts, tile picks."""
    from tiny_vlm import tiny_minillava

    from tokenreduce.bench.vlm import FOCUS, VLMBenchConfig, run_vlm_bench, vlm_tasks

    assert "largescene" in vlm_tasks()
    model, proc = tiny_minillava(image_size=28)
    cfg = VLMBenchConfig(task="largescene", methods=["coarse_to_fine", "fastv"], budgets=[0.8], n=6, batch_size=3,
                         timing=False, pictures=0, out=str(tmp_path))
    rows = run_vlm_bench(cfg, model=model, processor=proc, log=lambda s: None, progress=False)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "blind", FOCUS, "coarse_to_fine", "fastv"}
    from tokenreduce.assets.large_scene import large_scene_samples

    grids = [s["grid"] for s in large_scene_samples("test", 6)]
    assert by["full"]["visual_tokens"] == pytest.approx(sum(4 * (1 + g * g) for g in grids) / 6)
    assert by[FOCUS]["visual_tokens"] == 8 and by[FOCUS]["budget"] is None
    c2f = by["coarse_to_fine"]
    assert 0 <= c2f["tile_accuracy"] <= c2f["tile_recall"] <= 1 and c2f["tiles_chosen"] >= 1
    assert "tile_accuracy" not in by["fastv"]
    assert "first tile = answer tile" in (tmp_path / "results.md").read_text()


# ---------------------------------------------------------------------------- LLaVA-NeXT AnyRes: base view + crops
# The tiny LLaVA-NeXT's tower sees 32 px images in 8 px patches: a 4 x 4 base view; crops from pinpoints 32x32, 32x64,
# 64x32. Hand-written layouts (not read from the model), as transformers packs them: the base view's 16 tokens, then
# the crops' raster, unpadded to the image's aspect ratio, a newline ending each row.
ANYRES = {  # (height, width): (raster rows, raster columns, crop of each raster column / row)
    (32, 64): (4, 8, lambda i, j: j // 4),  # a 1 x 2 grid, nothing unpadded
    (40, 64): (4, 6, lambda i, j: (j + 1) // 4),  # 1 x 2, one column cut on each side: crop columns 1-3 | 4-6
    (64, 40): (6, 4, lambda i, j: (i + 1) // 4),  # 2 x 1, one row cut at the top and the bottom
}


def anyres_prompt(sizes: list[tuple[int, int]], texts: list[tuple[int, int]], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for (h, w), (a, b) in zip(sizes, texts):
        rr, cc, _ = ANYRES[(h, w)]
        count = 16 + rr * (cc + 1)
        rows.append(torch.cat([torch.randint(2, VOCAB - 8, (a,), generator=g), torch.full((count,), IMAGE_ID),
                               torch.randint(2, VOCAB - 8, (b,), generator=g)]))
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(len(rows), 3, 3, 32, 32, generator=g),
            "image_sizes": torch.tensor(sizes)}


def anyres_reference(row: torch.Tensor, size: tuple[int, int], budget: int, select_ratio: float = 0.25):
    """The paper's steps on one AnyRes prompt's row over its visual tokens [H, v]: the base view votes for the crop
    under each of its tokens (the raster place at the same relative position), the base view, the newlines and the
    chosen crops ranked by the row renormalised over them, the top ``budget`` kept."""
    rr, cc, crop_at = ANYRES[size]
    score = (row[:, :16] / row[:, :16].sum(-1, keepdim=True)).mean(0).tolist()
    under = [crop_at(int((r + 0.5) * rr / 4), int((c + 0.5) * cc / 4)) for r in range(4) for c in range(4)]
    voters = sorted(range(16), key=lambda i: (-score[i], i))[:max(1, int(select_ratio * 16))]
    votes, mass = [0, 0], [0.0, 0.0]
    for i in range(16):
        votes[under[i]] += i in voters
        mass[under[i]] += score[i]
    tiles = sorted((t for t in range(2) if votes[t]), key=lambda t: (-votes[t], -mass[t], t))
    crop_of = {16 + i * (cc + 1) + j: crop_at(i, j) for i in range(rr) for j in range(cc)}
    pool = [p for p in range(row.shape[1]) if p < 16 or p not in crop_of or crop_of[p] in tiles]
    sub = row[:, pool] / row[:, pool].sum(-1, keepdim=True)
    s = sub.mean(0).tolist()
    return tiles, [pool[i] for i in sorted(sorted(range(len(pool)), key=lambda i: (-s[i], i))[:budget])]


def test_anyres_layout_is_the_models_packing():
    """The layout read from LLaVA-NeXT's own pack_image_features equals the hand-written one, unpadding included."""
    from tokenreduce.families.vlms import anyres_tiles, find_vlm

    inner = find_vlm(tiny_vlm("llava_next")).inner
    for size, (rr, cc, crop_at) in ANYRES.items():
        t = anyres_tiles(inner, torch.tensor([size]))[0]
        want = [0] * 16 + [x for i in range(rr) for x in [1 + crop_at(i, j) for j in range(cc)] + [-1]]
        assert t.part.tolist() == want and t.side == 4 and tuple(t.raster.shape) == (rr, cc)
        assert t.grid == ((1, 2) if size[1] > size[0] else (2, 1))
        assert t.raster[1, 0] == 16 + cc + 1  # the second raster row starts after the first row's newline


@pytest.mark.parametrize("size", list(ANYRES))
def test_anyres_crops_and_kept_tokens_equal_a_plain_reference(size):
    model = tiny_vlm("llava_next")
    inputs = anyres_prompt([size], [(3, 6)])
    visual = inputs["input_ids"][0] == IMAGE_ID
    v = int(visual.sum())
    budget = math.floor(v * 0.4 + 1e-9)
    tiles, want = anyres_reference(own_row(model, inputs, 1, "llava_next")[:, visual], size, budget)
    m = tr.get_method("coarse_to_fine", k=1, r=0.6)
    with torch.no_grad(), tr.apply(model, m) as h:
        model(**inputs)
    assert m.choices[0]["tiles"] == tiles and m.choices[0]["grid"] == ((1, 2) if size[1] > size[0] else (2, 1))
    assert kept_visual(h.stats, inputs, 1) == want and len(want) == budget


def test_anyres_padded_batch_of_two_aspect_ratios_under_generate_equals_one_at_a_time():
    model = tiny_vlm("llava_next")
    sizes = [(40, 64), (64, 40)]
    batch = anyres_prompt(sizes, [(2, 5), (4, 3)], seed=1)
    m = tr.get_method("coarse_to_fine", k=1, r=0.5)
    with torch.no_grad(), tr.apply(model, m):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, -4:]
        both = list(m.choices[:2])
        for i in range(2):
            keep = batch["attention_mask"][i].bool()
            single = {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
                      "pixel_values": batch["pixel_values"][i:i + 1], "image_sizes": batch["image_sizes"][i:i + 1]}
            m.choices.clear()
            alone_out = model.generate(**single, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, -4:]
            assert torch.equal(out[i], alone_out) and m.choices[0]["tiles"] == both[i]["tiles"]


def test_anyres_refuses_a_grid_and_two_images():
    model = tiny_vlm("llava_next")
    with torch.no_grad(), tr.apply(model, tr.get_method("coarse_to_fine", k=1, r=0.5, grid=2)):
        with pytest.raises(tr.StageError, match="packs its own crops"):
            model(**anyres_prompt([(32, 64)], [(3, 6)]))
    two = anyres_prompt([(32, 64)], [(3, 6)])  # the same image twice in one prompt, text between
    image = torch.full((52,), IMAGE_ID)
    two["input_ids"] = torch.cat([torch.tensor([5, 6]), image, torch.tensor([7]), image, torch.tensor([8, 9])])[None]
    two["attention_mask"] = torch.ones_like(two["input_ids"])
    two["pixel_values"], two["image_sizes"] = two["pixel_values"].repeat(2, 1, 1, 1, 1), two["image_sizes"].repeat(2, 1)
    with torch.no_grad(), tr.apply(model, tr.get_method("coarse_to_fine", k=1, r=0.5)):
        with pytest.raises(tr.StageError, match="holds 2 AnyRes images"):
            model(**two)
