"""Which input form of a large-scene question can the mini-LLaVA answer? (`tokenreduce.assets.large_scene`)

For each grid G and each form (``multi``: coarse view + G*G tiles; ``tiles``; ``coarse``; ``answer_tile``, the
oracle; ``focus``, the coarse view + the answer tile; ``blind``, the question without an image) the same held-out
questions are answered by greedy ``generate`` (at most 3 new tokens) and scored by their first word
(`assets.vqa.is_correct`). Prints and writes accuracy (overall and per question kind), the prompt length in tokens
(visual tokens among them) and the seconds per question on this machine; the JSONL next to the output also keeps
each question's answer and generated text.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python tools/large_scene_probe.py --n 100 --workers 2

``--workers 2`` runs each grid in its own process (one thread each); ``--labels`` puts "Overview:" /
"Tile k (row r, column c):" before each image; ``--background texture`` uses the textured canvas.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FORMS = ("multi", "tiles", "coarse", "answer_tile", "focus", "blind")


def run_grid(g: int, args, emit) -> None:
    import torch

    from tokenreduce.assets.large_scene import large_scene_prompt, large_scene_samples
    from tokenreduce.assets.minillava import IMAGE_TOKEN_ID, load_vlm
    from tokenreduce.assets.vqa import is_correct

    torch.manual_seed(0)
    model, processor = load_vlm("minillava")
    samples = large_scene_samples(args.split, args.n, seed=args.seed, grid=g, background=args.background)
    for form in args.forms:
        correct, kinds, lengths, visual, seconds, said = [], [], [], [], 0.0, []
        for b in range(0, len(samples), args.batch):
            batch = samples[b:b + args.batch]
            if form == "blind":
                inputs = processor(text=[s["question"] for s in batch])
            else:
                inputs = large_scene_prompt(processor, batch, form, labels=args.labels)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            seconds += time.perf_counter() - t0
            texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += [is_correct(s, t) for s, t in zip(batch, texts)]
            kinds += [s["kind"] for s in batch]
            said += [[s["answer"], t.strip()] for s, t in zip(batch, texts)]
            lengths += inputs["attention_mask"].sum(-1).tolist()
            visual += (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(-1).tolist()
        by_kind = {k: sum(c for c, kk in zip(correct, kinds) if kk == k) / kinds.count(k) for k in dict.fromkeys(kinds)}
        emit({"grid": g, "form": form, "labels": args.labels, "background": args.background, "n": len(correct),
              "accuracy": sum(correct) / len(correct), "by_kind": by_kind,
              "prompt_tokens": sum(lengths) / len(lengths), "visual_tokens": sum(visual) / len(visual),
              "s_per_question": seconds / len(correct), "batch": args.batch,
              "said": said})  # [answer, generated] per question, in the JSONL only


def render(rows: list[dict], args) -> str:
    head = (f"large-scene probe: mini-LLaVA, split={args.split}, seed={args.seed}, n={args.n} per cell, "
            f"background={args.background}, labels={args.labels}, greedy, first word, batch {args.batch}\n"
            f"command: {' '.join(sys.argv)}\n\n")
    cols = "| G | form | accuracy | by kind | prompt tokens (visual) | s / question |\n|---:|---|---:|---|---:|---:|\n"
    order = {f: i for i, f in enumerate(FORMS)}
    lines = [f"| {r['grid']} | {r['form']} | {r['accuracy']:.3f} | "
             + " · ".join(f"{k} {v:.2f}" for k, v in r["by_kind"].items())
             + f" | {r['prompt_tokens']:.0f} ({r['visual_tokens']:.0f}) | {r['s_per_question']:.2f} |"
             for r in sorted(rows, key=lambda r: (r["grid"], order[r["form"]]))]
    return head + cols + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--grids", default="2,3")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--labels", action="store_true")
    p.add_argument("--background", default="plain")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default="/tmp/large_scene_probe.txt")
    p.add_argument("--jsonl", default=None, help="append each cell's row here (default: OUT with .jsonl)")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # a worker: no table on stdout
    args = p.parse_args(argv)
    args.forms = [f for f in args.forms.split(",") if f]
    bad = [f for f in args.forms if f not in FORMS]
    if bad:
        p.error(f"unknown form(s) {', '.join(bad)}; choose from {', '.join(FORMS)}")
    grids = [int(g) for g in args.grids.split(",")]
    jsonl = Path(args.jsonl or str(Path(args.out).with_suffix(".jsonl")))
    rows: list[dict] = []
    if args.workers > 1 and len(grids) > 1:  # one process per grid, each writing its own JSONL
        parts = [jsonl.with_suffix(f".g{g}.jsonl") for g in grids]
        for part in parts:
            part.unlink(missing_ok=True)
        base = [a for a in (argv if argv is not None else sys.argv[1:])]
        procs = [subprocess.Popen([sys.executable, __file__, *base, "--workers", "1", "--quiet", "--grids", str(g),
                                  "--jsonl", str(part), "--out", str(part.with_suffix(".txt"))])
                 for g, part in zip(grids, parts)]
        if any(pr.wait() for pr in procs):
            raise SystemExit("a worker failed")
        rows = [json.loads(line) for part in parts for line in part.read_text().splitlines()]
    else:
        jsonl.unlink(missing_ok=True)

        def emit(row: dict) -> None:
            rows.append(row)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"G={row['grid']} {row['form']:>11}: accuracy {row['accuracy']:.3f} {row['by_kind']}, prompt "
                  f"{row['prompt_tokens']:.0f} tokens ({row['visual_tokens']:.0f} visual), "
                  f"{row['s_per_question']:.2f} s/question", flush=True)

        for g in grids:
            run_grid(g, args, emit)
    text = render(rows, args)
    Path(args.out).write_text(text)
    if not args.quiet:
        print(text)


if __name__ == "__main__":
    main()
