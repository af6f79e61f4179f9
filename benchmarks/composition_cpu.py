"""Composition on real models: two methods in one `apply`, next to each alone (CPU).

* ``--part vit``: ToMe then EViT inside the real DINOv2-S/14 (each at ``--keep``), kNN accuracy
  on Fashion-MNIST (bank: the full model's [CLS] features of ``--n-train`` images; ``--n-test``
  test images) and the analytic FLOPs ratio, next to ToMe alone, EViT alone and the full model.
* ``--part kv``: GemFilter then SnapKV on SmolLM2-135M-Instruct, ``--n`` needle samples at
  ``--length`` tokens (question-aware: the question is in the prompt), next to each alone and the
  full cache: accuracy, prefill seconds (paired: every variant on the same sample in turn) and KV
  bytes after prefill.

    .venv/bin/python benchmarks/composition_cpu.py --part vit --n-train 1000 --n-test 300
    .venv/bin/python benchmarks/composition_cpu.py --part kv --n 10 --length 3000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import tokenreduce as tr


def vit_part(args) -> dict:
    from tokenreduce.assets import load_dinov2_small
    from tokenreduce.bench.tasks_vit import KNNClassifier, extract_features
    from tokenreduce.bench.vit import load_vit_data

    model = load_dinov2_small().eval()
    data = load_vit_data(args.n_train, args.n_test)
    bank = extract_features(model, data.train_pixels, batch_size=32)
    knn = KNNClassifier().fit(bank, data.train_labels)
    configs = {
        "full": [],
        "tome": [("tome", {})],
        "evit": [("evit", {})],
        "tome+evit": [("tome", {}), ("evit", {})],
    }
    rows = {}
    for label, spec in configs.items():
        methods = [tr.get_method(name, keep_ratio=args.keep, **kw) for name, kw in spec]
        ratios = []
        t0 = time.perf_counter()
        if methods:
            with tr.apply(model, *methods) as h:
                feats = extract_features(model, data.test_pixels, batch_size=32,
                                         after_forward=lambda: ratios.append(h.stats.flops_ratio))
        else:
            feats = extract_features(model, data.test_pixels, batch_size=32)
        rows[label] = {"knn": knn.score(feats, data.test_labels),
                       "flops_ratio": statistics.mean(ratios) if ratios else 1.0,
                       "seconds": time.perf_counter() - t0}
        print(label, rows[label], flush=True)
    return rows


def kv_part(args) -> dict:
    from tokenreduce.assets import haystack, llm
    from tokenreduce.bench.kv import make_samples, stop_ids

    model, tok = llm.load_smollm2()
    samples = make_samples(tok, "needle", args.length, args.n, args.seed)
    stops = stop_ids(tok)

    def variants():
        return {
            "full": [],
            "gemfilter": [tr.get_method("gemfilter", keep_ratio=args.gem_keep)],
            "snapkv": [tr.get_method("snapkv", keep_ratio=args.kv_keep)],
            "gemfilter+snapkv": [tr.get_method("gemfilter", keep_ratio=args.gem_keep),
                                 tr.get_method("snapkv", keep_ratio=args.kv_keep)],
        }

    out = {k: {"correct": 0, "prefill_s": [], "kv_bytes": []} for k in variants()}
    for i, s in enumerate(samples):
        prefix, suffix = haystack.encode_prompt(tok, *haystack.chat_prompt(tok, s, question_in_prefix=True))
        ids = torch.tensor([prefix + suffix])  # one prefill: GemFilter scores with the prompt's last query
        for label, methods in variants().items():
            cache = DynamicCache()
            with torch.no_grad():
                ctx = tr.apply(model, *methods) if methods else None
                h = ctx.__enter__() if ctx else None
                try:
                    t0 = time.perf_counter()
                    first = model(ids, past_key_values=cache)
                    out[label]["prefill_s"].append(time.perf_counter() - t0)
                    nxt = first.logits[:, -1:].argmax(-1)
                    gen = [int(nxt)]
                    for _ in range(args.max_new_tokens - 1):
                        if gen[-1] in stops:
                            break
                        nxt = model(nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
                        gen.append(int(nxt))
                finally:
                    if ctx:
                        ctx.__exit__(None, None, None)
            kv = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers) if h is None else \
                h.stats.kv_bytes_after
            out[label]["kv_bytes"].append(kv)
            out[label]["correct"] += haystack.score(s, tok.decode(gen, skip_special_tokens=True))
        print(i, {k: v["correct"] for k, v in out.items()}, flush=True)
    full_t = out["full"]["prefill_s"]
    rows = {}
    for label, v in out.items():
        rows[label] = {"accuracy": v["correct"] / len(samples),
                       "prefill_s_median": statistics.median(v["prefill_s"]),
                       "prefill_ratio_median": statistics.median(t / f for t, f in zip(v["prefill_s"], full_t)),
                       "kv_bytes_after_mean": statistics.mean(v["kv_bytes"])}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["vit", "kv"], required=True)
    ap.add_argument("--keep", type=float, default=0.75, help="keep_ratio of each encoder method")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--length", type=int, default=3000)
    ap.add_argument("--gem-keep", type=float, default=0.25)
    ap.add_argument("--kv-keep", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = vit_part(args) if args.part == "vit" else kv_part(args)
    out = Path(args.out or f"benchmarks/results/composition_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
