"""GemFilter on the real SmolLM2-135M-Instruct, CPU: which filter layer finds the needle, prefill time, accuracy.

Two parts (``--part sweep``, ``--part time``, or both):

* sweep — the filter-layer choice. For needle prompts (``needle_samples``, ``--sweep-tokens``
  tokens, depths 0.1..0.9) one plain forward records, at EVERY layer, GemFilter's score (the
  last query's raw ``q.k`` summed over heads, pooled; ``GemFilter.score`` itself) through a
  probe in transformers' attention registry, and reports per layer the fraction of the
  needle's number tokens that fall in the top ``--sweep-keep`` (default 1/8 of the prompt).
* time — at ``--tokens`` (6k) tokens: prefill time of the plain model vs. GemFilter keeping
  ``--keep`` (1/8) of the prompt, measured paired (``bench.timing.measure_paired``: full,
  gemfilter, full, gemfilter, ...; the ratio of medians is load-drift free), and needle accuracy
  (greedy answer contains the number) on ``--samples`` samples, plain vs. GemFilter.

    .venv/bin/python benchmarks/gemfilter_prefill_cpu.py --part both --out benchmarks/results/gemfilter_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import tokenreduce as tr
from tokenreduce.assets import haystack as hs
from tokenreduce.assets.llm import load_smollm2
from tokenreduce.bench.timing import measure_paired

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def encode(tok, sample) -> list[int]:
    a, b = hs.encode_prompt(tok, *hs.chat_prompt(tok, sample, question_in_prefix=True))
    return a + b


def answer_positions(tok, ids: list[int], answer: str) -> list[int]:
    """Positions of the needle's number in the prompt (the digits' tokens)."""
    target = tok(answer, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(target) + 1):
        if ids[start:start + len(target)] == target:
            return list(range(start, start + len(target)))
    spaced = tok(" " + answer, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(spaced) + 1):
        if ids[start:start + len(spaced)] == spaced:
            return list(range(start, start + len(spaced)))
    raise ValueError(f"needle number {answer} not found in the prompt's tokens")


_PROBE: dict = {}


def _probe(module, query, key, value, attention_mask, **kwargs):
    gem = _PROBE["method"]
    valid = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool)
    _PROBE["scores"][module.layer_idx] = gem.score(query[:, :, -1], key, valid)[0]
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("gemfilter_probe", _probe)


def sweep(model, tok, args) -> dict:
    gem = tr.get_method("gemfilter", keep_count=1)
    attns = [layer.self_attn for layer in model.model.layers]
    saved = [a.config for a in attns]
    for a in attns:
        cfg = copy.copy(a.config)
        cfg._attn_implementation_internal = "gemfilter_probe"
        a.config = cfg
    _PROBE["method"] = gem
    hits = {i: [] for i in range(len(attns))}
    try:
        for seed in range(args.sweep_seeds):
            for s in hs.needle_samples(tok, args.sweep_tokens, DEPTHS, 1, seed=seed):
                ids = encode(tok, s)
                pos = answer_positions(tok, ids, s["answer"])
                keep = max(1, int(len(ids) * args.sweep_keep))
                _PROBE["scores"] = {}
                with torch.inference_mode():
                    model(torch.tensor([ids]), use_cache=False)
                for i, sc in _PROBE["scores"].items():
                    top = set(torch.topk(sc, keep).indices.tolist())
                    hits[i].append(sum(p in top for p in pos) / len(pos))
                print(f"  sweep {s['id']}: n={len(ids)} keep={keep} best layers "
                      f"{sorted(hits, key=lambda i: -hits[i][-1])[:6]}", flush=True)
    finally:
        for a, cfg in zip(attns, saved):
            a.config = cfg
    recall = {i: statistics.mean(v) for i, v in hits.items()}
    full = [i for i, r in recall.items() if r == 1.0]
    print("layer recall of the needle's number tokens (top %.3f of the prompt):" % args.sweep_keep)
    print("  " + " ".join(f"{i}:{recall[i]:.2f}" for i in recall))
    return {"sweep_tokens": args.sweep_tokens, "sweep_keep": args.sweep_keep, "samples": len(hits[0]),
            "recall_per_layer": recall, "layers_with_full_recall": full}


def answer(model, tok, ids, sample, method=None):
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    kw = dict(max_new_tokens=sample["max_new_tokens"], do_sample=False, eos_token_id=stop, pad_token_id=tok.eos_token_id)
    x = torch.tensor([ids])
    with torch.inference_mode():
        if method is None:
            out = model.generate(x, **kw)
            stats = None
        else:
            with tr.apply(model, method) as h:
                out = model.generate(x, **kw)
            stats = h.stats
    return tok.decode(out[0, len(ids):], skip_special_tokens=True), stats


def timing(model, tok, args) -> dict:
    samples = [hs.needle_samples(tok, args.tokens, [d], 1, seed=100 + i)[0]
               for i, d in enumerate(DEPTHS[:args.samples] if args.samples <= len(DEPTHS) else DEPTHS)]
    ids = encode(tok, samples[0])
    n = len(ids)
    method = tr.get_method("gemfilter", keep_ratio=args.keep, **({"layer": args.layer} if args.layer is not None else {}))
    x = torch.tensor([ids])

    def full():
        with torch.inference_mode():
            model(x, logits_to_keep=1)

    def gem():
        with torch.inference_mode(), tr.apply(model, method):
            model(x, logits_to_keep=1)

    ref_t, gem_t = measure_paired(full, gem, items=1, repeats=args.repeats, warmup=1, reference_warmup=1,
                                  measure_memory=True)
    ratio = gem_t.median_s / ref_t.median_s
    pairs = [g / f for f, g in zip(ref_t.times, gem_t.times)]
    print(f"prefill {n} tokens: full {ref_t.median_s:.2f} s, gemfilter (keep {args.keep}) {gem_t.median_s:.2f} s, "
          f"ratio {ratio:.3f} (per pair {[round(p, 3) for p in pairs]})", flush=True)
    with torch.inference_mode(), tr.apply(model, method) as h:
        model(x, logits_to_keep=1)
    s = h.stats
    rows = []
    for sample in samples:
        sids = encode(tok, sample)
        text_full, _ = answer(model, tok, sids, sample)
        text_gem, st = answer(model, tok, sids, sample, method)
        kept_text = tok.decode([sids[i] for i in st.kept_positions[0]])
        row = {"id": sample["id"], "tokens": len(sids), "depth": sample["depth"], "answer": sample["answer"],
               "full": text_full, "full_score": hs.score(sample, text_full), "gemfilter": text_gem,
               "gemfilter_score": hs.score(sample, text_gem), "needle_kept": sample["answer"] in kept_text}
        rows.append(row)
        print(f"  {row['id']}: full {row['full_score']:.0f} {text_full!r} | gemfilter {row['gemfilter_score']:.0f} "
              f"{text_gem!r} | number kept by the filter: {row['needle_kept']}", flush=True)
    return {
        "tokens": n, "keep_ratio": args.keep, "filter_layer": s.filter_layer, "kept_tokens": s.kept_tokens,
        "full_prefill_s": ref_t.times, "gemfilter_prefill_s": gem_t.times, "full_median_s": ref_t.median_s,
        "gemfilter_median_s": gem_t.median_s, "time_ratio": ratio, "pair_ratios": pairs,
        "full_peak_rss_mb": ref_t.peak_mem_mb, "gemfilter_peak_rss_mb": gem_t.peak_mem_mb,
        "flops_ratio": s.flops_ratio, "kv_bytes_ratio": s.kv_bytes_ratio,
        "accuracy_full": statistics.mean(r["full_score"] for r in rows),
        "accuracy_gemfilter": statistics.mean(r["gemfilter_score"] for r in rows), "samples": rows,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("sweep", "time", "both"), default="both")
    p.add_argument("--sweep-tokens", type=int, default=2000)
    p.add_argument("--sweep-keep", type=float, default=0.125)
    p.add_argument("--sweep-seeds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=6000)
    p.add_argument("--keep", type=float, default=0.125)
    p.add_argument("--layer", type=int, default=None, help="filter layer (default: gemfilter's default for SmolLM2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or
              platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.part in ("sweep", "both"):
        result["sweep"] = sweep(model, tok, args)
    if args.part in ("time", "both"):
        result["time"] = timing(model, tok, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
