"""No speed lost to the runtime re-housing: the code before it and after it, timed in one process.

The package as of a given commit (default 24e559e, the last before the runtime) is extracted
with ``git archive`` into a temporary folder under another name (``tokenreduce_before``, its
attention-function name changed so both registrations coexist) and imported beside the current
one. Then, alternating in rounds so that machine load hits every variant alike:

* ToMe at keep_ratio 0.5 on DINOv2-S/14, batch ``--batch`` of 224-px images: seconds per batch
  of the plain model, of ToMe before and of ToMe after; speed-ups are per round, paired.
* SnapKV at keep 0.1 on SmolLM2-135M: a ``--context``-token prompt prefilled once per variant,
  then ``--decode`` greedy tokens timed; decode tokens/s of the full cache, before and after.

    .venv/bin/python benchmarks/runtime_before_after.py --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]


def load_before(commit: str):
    tmp = Path(tempfile.mkdtemp(prefix="tr_before_"))
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src/tokenreduce"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    pkg = tmp / "src" / "tokenreduce"
    for f in pkg.rglob("*.py"):  # a second registration name, and no absolute self-imports
        text = f.read_text()
        text = text.replace('IMPL = "tokenreduce"', 'IMPL = "tokenreduce_before"')
        text = text.replace("from tokenreduce.", "from tokenreduce_before.").replace("import tokenreduce\n",
                                                                                     "import tokenreduce_before\n")
        f.write_text(text)
    pkg.rename(tmp / "src" / "tokenreduce_before")
    sys.path.insert(0, str(tmp / "src"))
    return importlib.import_module("tokenreduce_before")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def vit_part(args, new, old) -> dict:
    from tokenreduce.assets import load_dinov2_small, natural_photos, preprocess

    model = load_dinov2_small().eval()
    photos = [img for _, img in natural_photos()]
    x = preprocess([photos[i % len(photos)] for i in range(args.batch)])

    def run(tr_mod):
        if tr_mod is None:
            return lambda: model(pixel_values=x)

        def go():
            with tr_mod.apply(model, tr_mod.get_method("tome", keep_ratio=0.5)):
                model(pixel_values=x)
        return go

    variants = {"full": run(None), "before": run(old), "after": run(new)}
    times = {k: [] for k in variants}
    with torch.no_grad():
        for f in variants.values():
            f()  # warm-up
        for _ in range(args.rounds):
            for k, f in variants.items():
                times[k].append(timed(f))
    sp = {k: [f / t for f, t in zip(times["full"], times[k])] for k in ("before", "after")}
    return {"seconds_per_batch": {k: statistics.median(v) for k, v in times.items()},
            "speedup_median": {k: statistics.median(v) for k, v in sp.items()},
            "speedup_per_round": sp, "after_over_before_per_round": [a / b for a, b in zip(sp["after"], sp["before"])]}


def kv_part(args, new, old) -> dict:
    from tokenreduce.assets import haystack, llm

    model, tok = llm.load_smollm2()
    ids = tok(haystack.essays(), add_special_tokens=False)["input_ids"][:args.context]
    ids = torch.tensor([ids])

    def decode(tr_mod):
        def go():
            cache = DynamicCache()
            ctx = tr_mod.apply(model, tr_mod.get_method("snapkv", keep_ratio=0.1)) if tr_mod else None
            if ctx:
                ctx.__enter__()
            try:
                out = model(ids, past_key_values=cache)
                nxt = out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(args.decode):
                    out = model(nxt, past_key_values=cache)
                    nxt = out.logits[:, -1:].argmax(-1)
                return args.decode / (time.perf_counter() - t0)
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
        return go

    variants = {"full": decode(None), "before": decode(old), "after": decode(new)}
    rates = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(args.rounds):
            for k, f in variants.items():
                rates[k].append(f())
    ratio = {k: [r / f for r, f in zip(rates[k], rates["full"])] for k in ("before", "after")}
    return {"decode_tok_s": {k: statistics.median(v) for k, v in rates.items()},
            "ratio_to_full_median": {k: statistics.median(v) for k, v in ratio.items()},
            "ratio_per_round": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commit", default="24e559e")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=3000)
    ap.add_argument("--decode", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="vit,kv")
    ap.add_argument("--out", default="benchmarks/results/runtime_before_after.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tokenreduce as new

    old = load_before(args.commit)
    result = {"commit_before": args.commit, "args": vars(args)}
    if "vit" in args.parts:
        result["tome_dinov2"] = vit_part(args, new, old)
        print(json.dumps(result["tome_dinov2"], indent=1), flush=True)
    if "kv" in args.parts:
        result["snapkv_smollm2"] = kv_part(args, new, old)
        print(json.dumps(result["snapkv_smollm2"], indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
