"""Our side of benchmarks/kvpress_compare.sh (runs in our venv: tokenreduce + transformers 5).

Writes the samples (needle-in-a-haystack, one needle per sample at depths spread over [0, 1]) with
the exact token ids both sides feed the model: ``prefix_ids`` = system prompt + instruction +
context (the span compressed: question-agnostic, ``chat_prompt(..., question_in_prefix=False)``),
``suffix_ids`` = question + end of turn + generation prompt + answer prefix. Then runs each
method with ``tokenreduce.get_method(name, keep_ratio=1 - compression)`` under the settings that
match kvpress's defaults (SnapKV window 64 and avg-pool kernel 5, StreamingLLM 4 sinks), using
the same `prefill` / `greedy` functions as the kvpress side (imported from kvpress_side.py).

Writes one JSON line per (sample, method, compression) and the kept cache positions of every
layer and KV head (``CompressedLayer.kept``) to ``<out>.kept.pt``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvpress_side import (
    greedy,
    ids_digest,
    parse_common,
    pick,
    prefill,
    probe,
    read_samples,
    settings,
    split_list,
    warm_up,
)

import tokenreduce as tr
from tokenreduce.assets import haystack as hs
from tokenreduce.assets.llm import load_smollm2
from tokenreduce.core.kv import CompressedLayer

# kvpress 0.5.x defaults (SnapKVPress.window_size / kernel_size, StreamingLLMPress.n_sink); RandomPress seed
BENCH = {"window_size": 64, "kernel_size": 5, "n_sink": 4, "seed": 0}


def method_for(name: str, compression: float):
    keep = 1.0 - compression
    if name == "snapkv":
        return tr.get_method("snapkv", keep_ratio=keep, window_size=BENCH["window_size"],
                             kernel_size=BENCH["kernel_size"], pooling="avgpool")
    if name == "streaming_llm":
        return tr.get_method("streaming_llm", keep_ratio=keep, n_sink=BENCH["n_sink"])
    if name == "kv_random":
        return tr.get_method("kv_random", keep_ratio=keep, seed=BENCH["seed"])
    return tr.get_method(name, keep_ratio=keep)


def make_samples(tok, n: int, length: int, seed: int) -> list[dict]:
    depths = [i / (n - 1) for i in range(n)] if n > 1 else [0.5]
    samples = hs.needle_samples(tok, length, depths, 1, seed=seed)
    stop = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    for s in samples:
        prefix, suffix = hs.chat_prompt(tok, s, question_in_prefix=False)
        a, b = hs.encode_prompt(tok, prefix, suffix)
        joint = tok(prefix + suffix, add_special_tokens=False)["input_ids"]
        if list(joint) != a + b:  # the split must not change the tokens the model sees
            raise SystemExit(f"{s['id']}: prefix/suffix tokenised apart differ from the whole prompt's tokens")
        s.update(prefix_ids=a, suffix_ids=b, stop_ids=stop, bench=BENCH)
    return samples


def main() -> None:
    p = parse_common(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10, help="samples (one needle each, depths spread over [0, 1])")
    p.add_argument("--length", type=int, default=1000, help="context tokens per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--make-samples", action="store_true", help="write the samples JSONL (--n, --length, --seed) and exit")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    model, tok = load_smollm2()
    if args.make_samples:
        hs.save_samples(make_samples(tok, args.n, args.length, args.seed), args.samples)
        return
    samples = pick(read_samples(args.samples), args.index)
    if not args.out:
        raise SystemExit("--out is required (the results JSONL)")
    runs = settings(split_list(args.methods), split_list(args.compressions, float))
    warm_up(model, samples, DynamicCache())
    env = {"side": "ours", "tokenreduce": _dist("tokenreduce"), "transformers": transformers.__version__,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
           "git": _git()}
    kept_all: dict[str, torch.Tensor] = {}
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"env": env}) + "\n")
        for s in samples:
            for method, comp in runs:
                cache = DynamicCache()
                if method == "none":
                    logits, pre_s = prefill(model, s["prefix_ids"], cache)
                else:
                    with tr.apply(model, method_for(method, comp)):
                        logits, pre_s = prefill(model, s["prefix_ids"], cache)
                layers = list(cache.layers)
                kept_per_layer = [int(layer.keys.shape[-2]) for layer in layers]
                if method != "none":
                    if not all(isinstance(layer, CompressedLayer) for layer in layers):
                        raise SystemExit(f"{method}: not every cache layer was compressed")
                    kept_all[f"{s['id']}|{method}|{comp}"] = torch.stack([l.kept[0].to(torch.int16) for l in layers])
                g = greedy(model, cache, len(s["prefix_ids"]), s["suffix_ids"], s["max_new_tokens"], s["stop_ids"])
                text = tok.decode(g["ids"], skip_special_tokens=True)
                row = {"id": s["id"], "method": method, "compression": comp, "prefill_s": pre_s,
                       "ids_sha": ids_digest(s["prefix_ids"], s["suffix_ids"]),
                       "kept_per_layer": kept_per_layer, "probe": probe(logits), **g}
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(f"ours    {s['id']:>28} {method:>13} {comp:.2f} prefill {pre_s:5.2f}s "
                      f"kept {kept_per_layer[0]:4d}/{len(s['prefix_ids'])}  {text!r} (answer {s['answer']})",
                      flush=True)
    torch.save(kept_all, args.out + ".kept.pt")


def _git() -> str:
    """The commit our side ran, with '+ modified src/' when the work tree differs from it."""
    import subprocess

    def run(*cmd):
        return subprocess.run(["git", *cmd], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip()

    commit = run("rev-parse", "--short", "HEAD") or "?"
    return commit + (" + modified src/" if run("status", "--porcelain", "src") else "")


def _dist(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
