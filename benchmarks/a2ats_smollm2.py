"""A²ATS (arXiv 2502.12665) on the real SmolLM2-135M-Instruct, CPU.

1. Calibrate the codebooks on a token stream: Paul Graham essays (``haystack.essays()``, 80 %) +
   random UUID strings (20 %), as the reference calibrates on FineWeb-Edu + random UUIDs. The
   essays are also the haystack of the needle task (the needle sentences are not in the stream).
2. Needle-in-a-haystack at ``--context`` tokens (one needle per sample, depths spread over
   [0.1, 0.9]): the whole prompt is prefilled exactly, decoding retrieves ``keep_ratio`` of the
   context per query head (+ sink 8 + window 64, GQA union). Accuracy vs the full model.
3. Retrieval quality on one sample, first decoding steps: share of the *true* attention mass (full
   softmax with RoPE) that falls on the attended entries, per layer / query head.
4. Decode ms/token, paired with the full model (alternating runs on the same prefilled context,
   ``--decode-steps`` forced-greedy steps each, cache cropped back after each run) and prefill
   seconds, paired. The attachment is attached/removed outside the timed region.

    .venv/bin/python benchmarks/a2ats_smollm2.py --out benchmarks/results/a2ats_smollm2
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import tokenreduce as tr
from tokenreduce.assets import haystack as hs
from tokenreduce.assets.llm import load_smollm2
from tokenreduce.bench.report import Column, write_jsonl, write_markdown


def calibration_ids(tok, n_tokens: int, seed: int) -> list[int]:
    essays = tok(hs.essays(), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    uuids = ", ".join("-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4, 4, 12))
                      for _ in range(n_tokens // 8))
    rand = tok(uuids, add_special_tokens=False)["input_ids"]
    n_rand = n_tokens // 5
    return essays[: n_tokens - n_rand] + rand[:n_rand]


def stop_ids(tok):
    return [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def answer(model, tok, ids, sample, method=None):
    kw = dict(max_new_tokens=sample["max_new_tokens"], do_sample=False, eos_token_id=stop_ids(tok),
              pad_token_id=tok.eos_token_id)
    x = torch.tensor([ids])
    if method is None:
        out, stats = model.generate(x, **kw), None
    else:
        with tr.apply(model, method) as h:
            out = model.generate(x, **kw)
        stats = h.stats
    return tok.decode(out[0, len(ids):], skip_special_tokens=True), stats


def attention_mass(model, method, ids, steps: int = 4) -> dict:
    """Share of the true attention mass on the attended entries (mean over steps, layers, query heads)."""
    with torch.no_grad(), tr.apply(model, method) as h:
        att = h.attachments["kv-cache"]
        cache = DynamicCache()
        t = model(torch.tensor([ids]), past_key_values=cache).logits[:, -1:].argmax(-1)
        att.trace = []
        for _ in range(steps):
            t = model(t, past_key_values=cache).logits[:, -1:].argmax(-1)
        trace, att.trace = att.trace, None
    per_layer: dict[int, list[float]] = {}
    oracle: dict[int, list[float]] = {}
    retrieved_only = []

    def forced_of(r):  # sink + window [B, H_kv, 1, K]: selected but picked by no query head
        return (r["selected"] & ~r["picked"].any(2))[:, :, None, :]

    for r in trace:
        q, k = r["query"].float(), r["key"].float()  # [1, H, 1, D], [1, H_kv, K, D] post-RoPE
        hk = k.shape[1]
        g = q.shape[1] // hk
        p = ((q.reshape(1, hk, g, -1) @ k.transpose(-1, -2)) * r["scaling"]).softmax(-1)  # [1, H_kv, g, K]
        sel = r["selected"][:, :, None, :].expand_as(p)
        per_layer.setdefault(r["layer"], []).append(float((p * sel).sum(-1).mean()))
        # oracle with the same budget: each query head's exact top-k (true RoPE scores) instead of the VQ top-k
        cand = r["valid"][:, None, None, :] & ~forced_of(r)
        kk = int(r["picked"].sum(-1).max())
        top = p.masked_fill(~cand, -1.0).topk(kk, dim=-1).indices if kk else None
        best = torch.zeros_like(r["picked"])
        if top is not None:
            best.scatter_(-1, top, True)
        osel = (best.any(2) | forced_of(r)[:, :, 0, :])[:, :, None, :].expand_as(p)
        oracle.setdefault(r["layer"], []).append(float((p * osel).sum(-1).mean()))
        # the same for the retrieved part alone: mass on picked entries / mass outside sink + window
        forced = r["selected"] & ~r["picked"].any(2)
        rest = 1 - (p * forced[:, :, None, :]).sum(-1)
        got = (p * r["picked"]).sum(-1)
        retrieved_only.append(float((got / rest.clamp(min=1e-12)).mean()))
    layers = {k: statistics.mean(v) for k, v in sorted(per_layer.items())}
    best = {k: statistics.mean(v) for k, v in sorted(oracle.items())}
    return {"mass_attended": statistics.mean(layers.values()), "mass_oracle_same_budget": statistics.mean(best.values()),
            "mass_oracle_per_layer": best, "mass_attended_min_layer": min(layers.values()),
            "mass_retrieved_of_outside_window": statistics.mean(retrieved_only), "mass_per_layer": layers}


def timed_decode(model, cache, first, steps: int) -> float:
    t = first
    start = time.perf_counter()
    for _ in range(steps):
        t = model(t, past_key_values=cache).logits[:, -1:].argmax(-1)
    elapsed = time.perf_counter() - start
    cache.crop(-steps)
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--keep-ratio", type=float, default=0.1)
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--codebooks", type=Path, default=None, help="cache file: loaded if present, else written")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/a2ats_smollm2"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    method = tr.get_method("a2ats", keep_ratio=args.keep_ratio, codebook_size=args.codebook_size)
    calib_s = None
    if args.codebooks is not None and args.codebooks.exists():
        method.load_codebooks(args.codebooks)
    else:
        ids = calibration_ids(tok, args.calib_tokens, args.seed)
        start = time.perf_counter()
        tr.calibrate(method, model, ids, chunk_size=2048, max_tokens=args.calib_tokens, iters=args.iters, seed=args.seed)
        calib_s = time.perf_counter() - start
        if args.codebooks is not None:
            method.save_codebooks(args.codebooks)
    print(f"calibrated: {method!r} in {calib_s} s", flush=True)
    common = dict(model="SmolLM2-135M-Instruct", device="cpu", threads=torch.get_num_threads(), host=platform.node(),
                  context=args.context, keep_ratio=args.keep_ratio, codebook_size=method.codebooks.size,
                  calib_tokens=method.codebooks.tokens, calib_s=calib_s, window=method.window, sink=method.sink,
                  relative_position=method.relative_position)
    depths = [0.1 + 0.8 * i / max(args.samples - 1, 1) for i in range(args.samples)]
    samples = [hs.needle_samples(tok, args.context, [d], 1, seed=args.seed)[0] for d in depths]
    rows = []
    prompts = []
    with torch.no_grad():
        for s in samples:
            a, b = hs.encode_prompt(tok, *hs.chat_prompt(tok, s, question_in_prefix=True))
            ids = a + b
            prompts.append(ids)
            for name, m in (("full", None), ("a2ats", method)):
                text, stats = answer(model, tok, ids, s, m)
                row = dict(common, kind="needle", method=name, depth=s["depth"], prompt_tokens=len(ids),
                           answer=s["answer"], text=text, score=hs.score(s, text))
                if stats is not None:
                    row.update(attended=stats.attended, context_entries=stats.context,
                               attended_fraction=stats.attended_fraction, decode_steps=stats.kv_decode_steps)
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("method", "depth", "score", "text")}), flush=True)
        mass = attention_mass(model, method, prompts[0])
        rows.append(dict(common, kind="attention_mass", method="a2ats", **mass))
        print("attention mass", json.dumps(mass), flush=True)

        # paired decode timing on the first sample's prompt
        x = torch.tensor([prompts[0]])
        ref_cache, a_cache = DynamicCache(), DynamicCache()
        first = model(x, past_key_values=ref_cache).logits[:, -1:].argmax(-1)
        with tr.apply(model, method):
            model(x, past_key_values=a_cache)
        ref_t, a_t, placement, frac = [], [], None, None
        for r in range(args.repeats + 1):  # the first pair warms up
            t_ref = timed_decode(model, ref_cache, first, args.decode_steps)
            h = tr.patch(model, method)
            t_a = timed_decode(model, a_cache, first, args.decode_steps)
            placement, frac = h.stats.placement, h.stats.attended_fraction
            h.remove()
            if r:
                ref_t.append(1000 * t_ref / args.decode_steps)
                a_t.append(1000 * t_a / args.decode_steps)
        pre_ref, pre_a = [], []
        for _ in range(2):
            start = time.perf_counter()
            model(x, past_key_values=DynamicCache())
            pre_ref.append(time.perf_counter() - start)
            with tr.apply(model, method):
                start = time.perf_counter()
                model(x, past_key_values=DynamicCache())
                pre_a.append(time.perf_counter() - start)
    timing = dict(common, kind="timing", method="a2ats", prompt_tokens=len(prompts[0]), decode_steps=args.decode_steps,
                  repeats=args.repeats, full_decode_ms=statistics.median(ref_t), a2ats_decode_ms=statistics.median(a_t),
                  full_decode_ms_all=ref_t, a2ats_decode_ms_all=a_t,
                  decode_speedup=statistics.median(ref_t) / statistics.median(a_t),
                  full_prefill_s=min(pre_ref), a2ats_prefill_s=min(pre_a), attended_fraction=frac, placement=placement)
    rows.append(timing)
    print(json.dumps({k: v for k, v in timing.items() if k not in common}), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, args.out.with_suffix(".jsonl"))
    needle = [r for r in rows if r["kind"] == "needle"]
    acc = {m: statistics.mean(r["score"] for r in needle if r["method"] == m) for m in ("full", "a2ats")}
    summary = [
        dict(method="full", accuracy=acc["full"], attended_fraction=1.0, decode_ms=timing["full_decode_ms"],
             prefill_s=timing["full_prefill_s"]),
        dict(method=f"a2ats keep_ratio={args.keep_ratio}", accuracy=acc["a2ats"],
             attended_fraction=statistics.mean(r["attended_fraction"] for r in needle if r["method"] == "a2ats"),
             decode_ms=timing["a2ats_decode_ms"], prefill_s=timing["a2ats_prefill_s"],
             mass=mass["mass_attended"]),
    ]
    cols = [Column("method"), Column("accuracy", "needle accuracy", ".2f"),
            Column("attended_fraction", "attended / context (per KV head)", ".3f"),
            Column("mass", "true attention mass attended", ".3f"), Column("decode_ms", "decode ms/token", ".1f"),
            Column("prefill_s", "prefill s", ".2f")]
    note = (f"SmolLM2-135M-Instruct, CPU ({torch.get_num_threads()} threads, shared machine), needle at "
            f"{args.context} tokens, {len(samples)} samples; codebooks {method.codebooks.size} x 64 per layer/KV head "
            f"calibrated on {method.codebooks.tokens} tokens; window {method.window}, sink {method.sink}, "
            f"w={method.relative_position}. Decode ms/token: median of {args.repeats} paired runs of "
            f"{args.decode_steps} steps. Device/host bytes in the .jsonl are computed, not measured.")
    write_markdown(summary, cols, args.out.with_suffix(".md"), title="A²ATS on SmolLM2 (needle at ~2k tokens)",
                   notes=[note, "command: .venv/bin/python benchmarks/a2ats_smollm2.py " + " ".join(sys.argv[1:])])
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
