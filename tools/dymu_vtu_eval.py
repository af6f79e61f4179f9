"""DToMe alone vs DToMe + VTU (DyMU's virtual token unmerging) on the mini-LLaVA, at the same merge thresholds.

For each ``keep_ratio`` DToMe is calibrated once on the VLM (``train``-split questions, the language model's
answers ignored) and the same calibrated object then runs twice on the held-out questions:

* ``dymu``: merged visual tokens enter the language model with ordinary attention (each at its earliest patch's
  place and position);
* ``dymu+vtu``: the same merged tokens, attention unmerged (``dymu_vtu(tower=False)`` composed with it).

Greedy ``generate`` (3 new tokens), scored by the first word as ``tokenreduce bench vlm`` does. FLOPs are the
attachments' analytic counts per sample: the tower blocks before the projector's select layer (``encoder``) and
the language model's prefill (``lm``), each with the full model's count. Output: one JSON line per row and a
Markdown table.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python tools/dymu_vtu_eval.py --n 200 --out results/dymu_vtu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tokenreduce as tr
from tokenreduce.assets.minillava import load_vlm
from tokenreduce.assets.vqa import is_correct, vqa_samples


def batches(samples, size):
    return [samples[i:i + size] for i in range(0, len(samples), size)]


def evaluate(model, processor, groups, methods, log) -> dict:
    correct, n, acc = 0, 0, {"visual": [], "visual_kept": [], "enc": [], "enc_full": [], "lm": [], "lm_full": []}
    for i, group in enumerate(groups):
        inputs = processor(images=[s["image"] for s in group], text=[s["question"] for s in group])
        seen = {}

        def grab(module, args, kwargs, output):
            if "stats" not in seen and handle is not None:
                seen["stats"] = dict(handle.stats_by_stage)

        handle = None
        with torch.no_grad():
            if methods:
                with tr.apply(model, *methods) as handle:
                    hook = model.register_forward_hook(grab, with_kwargs=True)
                    try:
                        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
                    finally:
                        hook.remove()
            else:
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(is_correct(s, t) for s, t in zip(group, texts))
        n += len(group)
        if "stats" in seen:
            st = seen["stats"]
            enc, con, dec = st["encoder"], st["connector"], st.get("decoder")
            acc["visual"].append(con.visual_tokens)
            acc["visual_kept"].append(con.kept_visual_tokens)
            acc["enc"].append(enc.flops)
            acc["enc_full"].append(enc.flops_full)
            acc["lm"].append(dec.flops if dec is not None else con.flops)
            acc["lm_full"].append(con.flops_full)
        log(f"  batch {i + 1}/{len(groups)}: {correct}/{n}")
    row = {"accuracy": correct / n, "n": n}
    for k, v in acc.items():
        if v:
            row[k] = sum(v) / len(v)
    if acc["lm"]:
        row["lm_ratio"] = row["lm"] / row["lm_full"]
        row["enc_ratio"] = row["enc"] / row["enc_full"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--calib", type=int, default=64, help="train-split questions to calibrate DToMe on")
    ap.add_argument("--budgets", default="0.7,0.5,0.3", help="DToMe keep_ratios (tower MLP tokens, mean over blocks)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--task", default="easyvqa")
    ap.add_argument("--out", default="results/dymu_vtu")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    model, processor = load_vlm()
    test = batches(vqa_samples(args.task, "test", args.n, 0), args.batch)
    calib = [dict(processor(images=[s["image"] for s in g], text=[s["question"] for s in g]))
             for g in batches(vqa_samples(args.task, "train", args.calib, 1), args.batch)]
    rows = []

    def record(name, ratio, row, extra=None):
        row = {"task": args.task, "method": name, "keep_ratio": ratio, **row, **(extra or {})}
        rows.append(row)
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        log(json.dumps(row))

    t0 = time.time()
    log(f"full model, n={args.n}")
    record("full", 1.0, evaluate(model, processor, test, [], log))
    for ratio in [float(b) for b in args.budgets.split(",")]:
        dtome = tr.get_method("dymu", keep_ratio=ratio)
        tr.calibrate(dtome, model, calib)
        extra = {"thresholds": dtome.thresholds, "calib_mlp_tokens": dtome.calibration["mlp_tokens_per_layer"]}
        log(f"dymu keep_ratio={ratio}: calibrated on {args.calib} questions")
        record("dymu", ratio, evaluate(model, processor, test, [dtome], log), extra)
        record("dymu+vtu", ratio, evaluate(model, processor, test, [dtome, tr.get_method("dymu_vtu", tower=False)],
                                           log))
    log(f"done in {time.time() - t0:.0f} s")
    lines = ["| method | keep_ratio | accuracy | visual tokens into the LM | tower FLOPs ratio (blocks before select) "
             "| LM prefill GFLOPs / sample | LM FLOPs ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "lm" in r:
            lines.append(f"| {r['method']} | {r['keep_ratio']} | {r['accuracy']:.3f} | {r['visual_kept']:.1f} / "
                         f"{r['visual']:.0f} | {r['enc_ratio']:.3f} | {r['lm'] / 1e9:.3f} | {r['lm_ratio']:.3f} |")
        else:
            lines.append(f"| {r['method']} | - | {r['accuracy']:.3f} | all | 1 | - | 1 |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    log("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
