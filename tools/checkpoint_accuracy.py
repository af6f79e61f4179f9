"""Interim accuracy of a `bench vlm` run from its checkpoint (``OUT/runs.jsonl``), while it runs or after it stopped.

Only the questions every listed cell has finished count (the same questions in every row), so the rows compare;
the language model's prefill FLOPs are the saved analytic counts (the tower's are not summed here); the bench's own
report (at the end of the run) also gives the tower's FLOPs, tokens and timing.

    .venv/bin/python tools/checkpoint_accuracy.py benchmarks/results/vlm_largescene_500/runs.jsonl
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict


def main(path: str) -> None:
    lines = open(path).read().splitlines()
    head = json.loads(lines[0])
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        runs[rec["cell"]][rec["unit"]] = rec["run"]
    common = set.intersection(*(set(u) for u in runs.values()))
    n = sum(runs[next(iter(runs))][u]["n"] for u in common)
    print(f"{path}: {head['fingerprint']}\n{len(common)} units ({n} questions) finished by all {len(runs)} cells\n")
    print("| cell | accuracy | ± (95 %) | LM prefill FLOPs / full | first tile = answer tile | answer tile chosen |")
    print("|---|---|---|---|---|---|")
    for cell, by_unit in runs.items():
        rs = [by_unit[u] for u in sorted(common)]
        acc = sum(sum(r["correct"]) for r in rs) / n
        tiles = ("", "")
        if rs and "tile_first" in rs[0]:
            tiles = (f"{sum(sum(r['tile_first']) for r in rs) / n:.3f}", f"{sum(sum(r['tile_among']) for r in rs) / n:.3f}")
        flops = (f"{sum(r['lm_flops'] for r in rs) / sum(r['lm_flops_full'] for r in rs):.3f}"
                 if rs and "lm_flops" in rs[0] else "")
        print(f"| {cell} | {acc:.3f} | {1.96 * math.sqrt(acc * (1 - acc) / n):.3f} | {flops} | {tiles[0]} | "
              f"{tiles[1]} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/vlm_largescene_500/runs.jsonl")
