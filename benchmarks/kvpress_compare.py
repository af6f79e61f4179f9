"""The comparison step of benchmarks/kvpress_compare.sh: read both sides' outputs, print and write a Markdown table.

Per (method, compression): accuracy (RULER's score: the needle's number in the answer) on each
side, answer agreement (identical generated ids), median prefill seconds and median decode
ms/token on each side, the entries kept per layer (mean, each side), and the kept-set overlap
= mean over samples, layers and KV heads of |ours ∩ kvpress| / |kvpress kept| (SnapKV is the
one the issue asks for; the others are shown as checks: StreamingLLM, TOVA and key-norm should
be ~1, random ~ the keep ratio). Checks first that both sides fed the same token ids and that
the full-cache runs agree (the two environments run different transformers versions).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import torch

from tokenreduce.assets import haystack as hs
from tokenreduce.assets.llm import load_smollm2
from tokenreduce.bench.report import Column, markdown_table


def read(folder: Path) -> tuple[dict, dict, dict]:
    """(env, rows by (id, method, compression), kept positions by "id|method|compression") of one side."""
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        sys.exit(f"no results in {folder}; run benchmarks/kvpress_compare.sh")
    env, rows, kept = {}, {}, {}
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "env" in r:
                env = r["env"]
            else:
                rows[(r["id"], r["method"], r["compression"])] = r
        kept_file = path.with_name(path.name + ".kept.pt")
        if kept_file.exists():
            kept.update(torch.load(kept_file))
    return env, rows, kept


def overlaps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a ∩ b| / |b| per layer and head [L, H] for kept positions a [L, H, Ma], b [L, H, Mb]."""
    n = int(max(a.max(), b.max())) + 1
    ha = torch.zeros(*a.shape[:2], n, dtype=torch.bool).scatter_(-1, a.long(), True)
    hb = torch.zeros(*b.shape[:2], n, dtype=torch.bool).scatter_(-1, b.long(), True)
    return (ha & hb).sum(-1).float() / hb.sum(-1).float()


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over layers and heads of |a ∩ b| / |b|."""
    return float(overlaps(a, b).mean())


def ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def explain(method: str, samples: dict, kept_o: dict, kept_k: dict, window: int) -> str | None:
    """Where the kept sets of a deterministic method differ, and whether a known cause accounts for it.

    Known causes: SnapKV — a budget smaller than the window (kvpress ties the window entries);
    TOVA — kvpress always keeps the prefix's last entry, ours lets it compete on
    its score; key norm — at layer 0 a key depends on the token only and RoPE keeps its norm, so
    repeated tokens tie and the two top-k break the tie differently (ours: the later position).
    """
    layers, swaps, explained = set(), 0, 0
    for key, b in kept_k.items():
        sid, m, _ = key.split("|")
        if m != method or key not in kept_o:
            continue
        a = kept_o[key]
        ids = samples[sid]["prefix_ids"]
        for l in range(a.shape[0]):
            for h in range(a.shape[1]):
                only_o = sorted(set(a[l, h].tolist()) - set(b[l, h].tolist()))
                only_k = sorted(set(b[l, h].tolist()) - set(a[l, h].tolist()))
                if not only_k:  # every entry kvpress kept, ours kept too
                    continue
                layers.add(l)
                swaps += len(only_k)
                if method == "tova" and only_k == [len(ids) - 1]:
                    explained += 1
                elif method == "snapkv" and b.shape[-1] < window and min(only_o + only_k) >= len(ids) - window:
                    explained += len(only_k)
                elif method == "knorm" and l == 0 and not Counter(ids[p] for p in only_k) - Counter(ids[p] for p in only_o):
                    explained += len(only_k)  # each entry ours dropped has a same-token twin ours kept instead
    out = []
    if swaps:
        cause = {"tova": "kvpress forces the prefix's last entry in, ours lets it compete on its score",
                 "knorm": "layer 0, the same token at two positions: equal key norms (a layer-0 key depends on the "
                          "token only; RoPE keeps norms), a tie the two top-k break differently",
                 "snapkv": "a budget below the observation window: the window entries tie in kvpress (max + 1) and "
                           "its top-k keeps an arbitrary subset of them, ours the most recent"}.get(method, "no known cause")
        out.append(f"- {method}: {swaps} entries kept by kvpress are not kept by ours (summed over samples, "
                   f"compressions, layers and heads), at layers {ranges(sorted(layers))}; {explained} of them "
                   f"explained by: {cause}.")
    return "\n".join(out) or None


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu or platform.processor()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="folder with samples.jsonl and ours/, kvpress/ (one JSONL + .kept.pt per sample)")
    p.add_argument("--md", default="benchmarks/results/kvpress_compare.md")
    p.add_argument("--command", default="benchmarks/kvpress_compare.sh")
    args = p.parse_args()
    d = Path(args.dir)
    samples = {s["id"]: s for s in hs.load_samples(d / "samples.jsonl")}
    env_o, ours, kept_o = read(d / "ours")
    env_k, kvp, kept_k = read(d / "kvpress")
    _, tok = load_smollm2()

    missing = sorted(set(ours) ^ set(kvp))
    if missing:
        sys.exit(f"the two sides ran different settings, e.g. {missing[:3]}; rerun both with the same flags")
    bad_ids = [k for k in ours if ours[k]["ids_sha"] != kvp[k]["ids_sha"]]
    if bad_ids:
        sys.exit(f"the two sides fed different token ids for {bad_ids[:3]}")

    settings = sorted({(m, c) for _, m, c in ours}, key=lambda mc: (mc[0] != "none", mc[0], mc[1]))
    methods_order = ["none", "snapkv", "streaming_llm", "tova", "knorm", "kv_random"]
    settings.sort(key=lambda mc: (methods_order.index(mc[0]) if mc[0] in methods_order else 99, mc[1]))
    table = []
    for method, comp in settings:
        keys = [k for k in ours if k[1] == method and k[2] == comp]
        acc_o = statistics.mean(hs.score(samples[k[0]], tok.decode(ours[k]["ids"], skip_special_tokens=True)) for k in keys)
        acc_k = statistics.mean(hs.score(samples[k[0]], tok.decode(kvp[k]["ids"], skip_special_tokens=True)) for k in keys)
        agree = statistics.mean(float(ours[k]["ids"] == kvp[k]["ids"]) for k in keys)
        ov = [overlaps(kept_o[f"{i}|{m}|{c}"], kept_k[f"{i}|{m}|{c}"]) for i, m, c in keys
              if f"{i}|{m}|{c}" in kept_o and f"{i}|{m}|{c}" in kept_k]
        budgets = [(len(samples[i]["prefix_ids"]), kept_k[f"{i}|{m}|{c}"].shape[-1]) for i, m, c in keys
                   if f"{i}|{m}|{c}" in kept_k]
        table.append({
            "method": method, "compression": comp, "n": len(keys),
            "acc_ours": acc_o, "acc_kvpress": acc_k, "agree": agree,
            "prefill_ours": med(ours[k]["prefill_s"] for k in keys), "prefill_kvpress": med(kvp[k]["prefill_s"] for k in keys),
            "decode_ours": med(ours[k]["decode_ms_per_token"] for k in keys),
            "decode_kvpress": med(kvp[k]["decode_ms_per_token"] for k in keys),
            "kept_ours": statistics.mean(statistics.mean(ours[k]["kept_per_layer"]) for k in keys),
            "kept_kvpress": statistics.mean(statistics.mean(kvp[k]["kept_per_layer"]) for k in keys),
            "overlap": float(torch.stack(ov).mean()) if ov else None,
            "overlap_min": float(torch.stack(ov).min()) if ov else None,
            "min_budget": min(m for _, m in budgets) if budgets else None,
            "count_diff": sum(ours[k]["kept_per_layer"] != kvp[k]["kept_per_layer"] for k in keys),
        })

    cols = [
        Column("method", "method"), Column("compression", "compression", ".2f"),
        Column("acc_ours", "acc ours", ".2f"), Column("acc_kvpress", "acc kvpress", ".2f"),
        Column("agree", "same answer", ".2f"),
        Column("prefill_ours", "prefill s ours", ".2f"), Column("prefill_kvpress", "prefill s kvpress", ".2f"),
        Column("decode_ours", "decode ms/tok ours", ".0f"), Column("decode_kvpress", "decode ms/tok kvpress", ".0f"),
        Column("kept_ours", "kept ours", ".1f"), Column("kept_kvpress", "kept kvpress", ".1f"),
        Column("overlap", "kept-set overlap", ".3f"), Column("overlap_min", "min overlap", ".3f"),
    ]
    md_table = markdown_table(table, cols)

    # full-cache agreement of the two environments (transformers 5 vs 4) at the end of the prefix
    probe_diff = max(max(abs(a - b) for a, b in zip(ours[k]["probe"]["logits"], kvp[k]["probe"]["logits"]))
                     for k in ours if k[1] == "none")
    probe_same_top = all(ours[k]["probe"]["ids"][0] == kvp[k]["probe"]["ids"][0] for k in ours if k[1] == "none")
    n_tokens = [len(s["prefix_ids"]) for s in samples.values()]
    s_tokens = [len(s["suffix_ids"]) for s in samples.values()]
    depths = sorted(s["depth"] for s in samples.values())
    bench = next(iter(samples.values()))["bench"]
    text = f"""# tokenreduce vs kvpress: KV-cache compression side by side

Command: `{args.command}`
Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; machine: {machine()} (shared with other jobs: timings are medians, indicative only).
Ours: tokenreduce {env_o.get('tokenreduce')} (git {env_o.get('git', '?')}), transformers {env_o.get('transformers')}, torch {env_o.get('torch')}, {env_o.get('threads')} thread(s).
kvpress: kvpress {env_k.get('kvpress')}, transformers {env_k.get('transformers')}, torch {env_k.get('torch')}, {env_k.get('threads')} thread(s) (`.cache/kvpress-venv`).

Model: SmolLM2-135M-Instruct (our fp32 conversion of the Q4_1 GGUF; 30 layers, 9 query / 3 KV heads), SDPA.
Task: {len(samples)} needle-in-a-haystack samples (`haystack.needle_samples`, seed 0), depths {', '.join(f'{x:g}' for x in depths)};
question-agnostic: the compressed prefix is system prompt + instruction + context ({min(n_tokens)}–{max(n_tokens)} tokens),
then the question + answer prefix ({min(s_tokens)}–{max(s_tokens)} tokens) and up to {max(s["max_new_tokens"] for s in samples.values())} greedy tokens are decoded on the
compressed cache. Both sides read the same token ids (checked: a digest of the ids each side fed) and run the
same prefill / decoding code (`benchmarks/kvpress_side.py`: model called directly, no pipeline); only the
compression differs: `tokenreduce.apply(model, get_method(name, keep_ratio=1 - compression))` vs
`press(model)`. Settings matched to kvpress's defaults: SnapKV window {bench['window_size']}, avg-pool kernel
{bench['kernel_size']}; StreamingLLM {bench['n_sink']} sinks; random seed {bench['seed']} (different generators: random is
compared on accuracy only). Full cache (`none`): top logit at the end of the prefix identical on both sides:
{probe_same_top}; largest difference among the top-5 logits {probe_diff:.2g}.

Columns: accuracy = mean RULER score (the number is in the answer); same answer = fraction of samples whose
generated ids are identical; prefill = seconds of the compressed prefill (prefix only, compression included),
median over samples; decode = ms per generated token after the question (median); kept = cache entries per
layer and KV head (mean); kept-set overlap = mean over samples, layers and KV heads of |ours ∩ kvpress| /
|kvpress kept|.

{md_table}
"""
    notes = []
    diff = sorted({(c, len(samples[i]["prefix_ids"])) for i, m, c in ours
                   if ours[(i, m, c)]["kept_per_layer"] != kvp[(i, m, c)]["kept_per_layer"]})
    if diff:
        notes.append("- Budgets differ for (compression, prefix length) " + ", ".join(f"({c:g}, {n})" for c, n in diff)
                     + ": kvpress keeps `int(n * (1 - compression))`, and 1 - 0.9 = 0.09999999999999998 in floating "
                     "point, so it keeps n/10 - 1 entries when n is a multiple of 10; ours (`floor(n * keep_ratio + "
                     "1e-9)`) keeps n/10. The extra entry does not lower the overlap (taken over kvpress's kept set) but can "
                     "change an answer.")
    for r in table:
        if r["method"] == "snapkv" and r["min_budget"] is not None and r["min_budget"] < bench["window_size"]:
            notes.append(f"- snapkv at {r['compression']:.2f}: the budget ({r['min_budget']}) is smaller than the "
                         f"{bench['window_size']}-query window; kvpress gives every window entry the same score "
                         "(max + 1) and `topk` picks among the tie arbitrarily, ours keeps the most recent: "
                         "overlap below 1 is expected there.")
    for method in ("streaming_llm", "tova", "knorm", "snapkv"):
        why = explain(method, samples, kept_o, kept_k, bench["window_size"])
        if why:
            notes.append(why)
    snap = [r for r in table if r["method"] == "snapkv" and r["overlap"] is not None]
    if snap:
        notes.append(f"- SnapKV kept-set overlap: mean {min(r['overlap'] for r in snap):.4f} at worst over the "
                     f"compressions, smallest single (sample, layer, KV head) {min(r['overlap_min'] for r in snap):.4f}.")
    if any(r["method"] == "kv_random" for r in table):
        notes.append("- kv_random: the two sides draw from different generators, so answers and kept sets differ "
                     "(overlap ≈ the keep ratio, as for independent draws); compare its accuracy only.")
    if notes:
        text += "\nNotes (computed from this run):\n\n" + "\n".join(notes) + "\n"
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {args.md}")


if __name__ == "__main__":
    main()
