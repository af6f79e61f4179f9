"""Does the mini-LLaVA's attention find the answer tile of a large-scene question, and at which layer?

`coarse_to_fine` (arXiv 2503.07588) picks tiles by the attention of the prompt's last token to the coarse
view at one language-model layer ``k``. This probe runs the full model once per question (SDPA, plus the last
token's softmax row at every layer, mean over heads) on the task's *calibration* split and reports per layer:

- ``coarse votes``: coarse_to_fine's own rule (the top ``select_ratio`` of the coarse view's tokens vote for the
  tile under them; the tile with most votes first, ties by attention mass) — how often the first tile is the
  answer tile;
- ``coarse mass``: the tile under the most coarse-view attention mass;
- ``tile mass``: the tile whose *own* tokens (the fine tile images) get the most attention — a signal a one-pass
  in-LLM method has too, which the reference (it selects before encoding the fine tiles) does not;
- ``coarse top-1 share``: the largest single coarse token's share of the coarse view's attention (a sink shows
  as a share near 1).

Chance is 1/G² per question (0.25 or 0.11). Writes ``OUT.md`` and ``OUT.jsonl`` (per question and layer).

    OMP_NUM_THREADS=1 nice .venv/bin/python tools/tile_localisation.py --n 64 --out benchmarks/results/tile_localisation
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def _last_rows(store: list):
    """An attention function: the model's SDPA, plus the last query's softmax row (mean over heads) kept in ``store``."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # GQA: each query head's key head
        logits = (query[:, :, -1:] @ k.transpose(-1, -2)).float() * (scaling or query.shape[-1] ** -0.5)
        if attention_mask is not None:
            logits = logits + attention_mask[:, :, -1:, : k.shape[-2]].float()
        store.append(logits.softmax(-1)[0, :, 0].mean(0))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kw)

    return attention


def probe(n: int, select_ratio: float, seed: int, log=print) -> list[dict]:
    import torch
    from transformers import AttentionInterface

    from tokenreduce.assets.large_scene import large_scene_prompt, large_scene_samples
    from tokenreduce.assets.minillava import IMAGE_TOKEN_ID, load_vlm
    from tokenreduce.methods.coarse_to_fine import tile_of_coarse, visual_runs

    model, processor = load_vlm("minillava")
    rows: list = []
    AttentionInterface.register("tile_probe", _last_rows(rows))
    model.model.language_model.set_attn_implementation("tile_probe")  # the tower keeps its own
    out = []
    t0 = time.perf_counter()
    for q, sample in enumerate(large_scene_samples("calib", n, seed=seed)):
        inputs = large_scene_prompt(processor, [sample])
        rows.clear()
        with torch.no_grad():
            model(**inputs)
        visual = inputs["input_ids"][0] == IMAGE_TOKEN_ID
        where = visual.nonzero().flatten()
        sizes = visual_runs(visual)
        g, t = sample["grid"], sizes[0]
        under = tile_of_coarse(math.isqrt(t), g)
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
        for layer, full_row in enumerate(rows):
            row = full_row[where]  # [visual]: the last token's softmax row, mean over heads
            coarse = row[:t] / row[:t].sum()
            voters = coarse.sort(descending=True, stable=True).indices[: max(1, int(select_ratio * t))]
            votes = torch.bincount(under[voters], minlength=g * g)
            mass = torch.zeros(g * g).index_add_(0, under, coarse)
            first = sorted(range(g * g), key=lambda i: (-int(votes[i]), -float(mass[i]), i))[0]
            own = torch.stack([row[starts[1 + i]:starts[1 + i] + sizes[1 + i]].sum() for i in range(g * g)])
            out.append({"question": q, "layer": layer, "grid": g, "tile": sample["tile"], "votes_first": first,
                        "coarse_mass_first": int(mass.argmax()), "tile_mass_first": int(own.argmax()),
                        "coarse_top1_share": float(coarse.max()), "tile_share": float(own[sample["tile"]] / own.sum())})
        log(f"question {q + 1}/{n}: G={g} answer tile {sample['tile']} ({time.perf_counter() - t0:.0f} s)")
    return out


def summary(records: list[dict]) -> list[dict]:
    layers = sorted({r["layer"] for r in records})
    rows = []
    for layer in layers:
        rs = [r for r in records if r["layer"] == layer]
        hit = lambda key: sum(r[key] == r["tile"] for r in rs) / len(rs)  # noqa: E731
        rows.append({"layer": layer, "coarse votes": hit("votes_first"), "coarse mass": hit("coarse_mass_first"),
                     "tile mass": hit("tile_mass_first"),
                     "answer tile's share of tile mass": sum(r["tile_share"] for r in rs) / len(rs),
                     "coarse top-1 share": sum(r["coarse_top1_share"] for r in rs) / len(rs)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--select-ratio", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="tile_localisation")
    args = ap.parse_args()
    t0 = time.perf_counter()
    records = probe(args.n, args.select_ratio, args.seed)
    rows = summary(records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    chance = sum(1 / r["grid"] ** 2 for r in records if r["layer"] == 0) / args.n
    keys = list(rows[0])
    lines = [f"# Answer-tile localisation by the last token's attention (mini-LLaVA, large-scene calibration split, "
             f"n = {args.n}, chance {chance:.3f})", "",
             f"`python tools/tile_localisation.py --n {args.n} --select-ratio {args.select_ratio} --seed {args.seed}`; "
             f"{time.perf_counter() - t0:.0f} s. Columns: how often each rule's first tile is the answer tile; the "
             "answer tile's share of the attention on the fine tiles; the largest coarse token's share of the coarse "
             "view's attention.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
