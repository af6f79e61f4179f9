"""Collect the `bench vlm` results.jsonl files under benchmarks/results/ into one method x (task, budget) accuracy
table (markdown), as in the README: `python tools/vlm_results_table.py [--task easyvqa,scenes] [--flops]`.

`--flops` adds each cell's analytic FLOPs ratio to the full model (tower, projector and language model) in
brackets, so rows can be read at equal cost. A cell is "—" where the run skipped it (the method's stages cannot
reach that budget) and "not run" where no run of that task has the method."""
import argparse

from tokenreduce.bench.report import read_jsonl

R = "benchmarks/results/"  # run from the repository root
RUNS = {t: [f"vlm_{t}{tag}" for tag in ("", "_merge", "_pipelines", "_more", "_tower", "_dymu_vflowopt")]
        for t in ("easyvqa", "scenes")}
RUNS["largescene"] = ["vlm_largescene_500", "vlm_largescene_500_more"]
# a run with other than the method's default parameters (each row's "params") gets its own row
VARIANTS = {("coarse_to_fine", "k=4"): "coarse_to_fine (k=4)"}
ORDER = ["full", "blind", "focus (oracle)", "fastervlm", "visionzip", "vflowopt", "visual_random", "visual_pool",
         "fastv", "pyramiddrop", "sparsevlm", "visiondrop", "llavolta", "flowcut", "dymu", "dymu_vtu", "flowcut_llm",
         "yopo", "coarse_to_fine", "coarse_to_fine (k=4)", "visionzip+visiondrop", "fastervlm+fastv",
         "flowcut+flowcut_llm", "vflowopt+vflowopt_llm"]
UNBUDGETED = ("full", "blind", "focus (oracle)")
NAMES = {"easyvqa": "easy-vqa", "largescene": "large-scene"}


def collect(tasks):
    """{method: {(task, budget): (accuracy, n, flops_ratio)}} over every run folder of the tasks."""
    cells = {}
    for task in tasks:
        for d in RUNS[task]:
            try:
                rows = read_jsonl(R + d + "/results.jsonl")
            except FileNotFoundError:
                continue
            for r in rows:
                if r.get("record") == "header" or "method" not in r:
                    continue
                params = (r.get("params") or "").split(", ")
                name = next((v for (m, p), v in VARIANTS.items() if m == r["method"] and p in params), r["method"])
                cells.setdefault(name, {})[(task, r.get("budget"))] = (r["accuracy"], r["n"], r.get("flops_ratio"))
    return cells


def table(tasks, flops=False):
    cells = collect(tasks)
    cols = [(t, b) for t in tasks for b in (0.5, 0.25, 0.1)]
    out = ["| method | " + " | ".join(f"{NAMES.get(t, t)} {b}" for t, b in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in ORDER + sorted(set(cells) - set(ORDER)):
        if m not in cells:
            continue
        row = []
        for t, b in cols:
            if m in UNBUDGETED and b != 0.5:
                row.append("")
                continue
            v = cells[m].get((t, None if m in UNBUDGETED else b))
            if v is None:
                row.append("—" if any(task == t for task, _ in cells[m]) else "not run")
                continue
            text = f"{v[0]:.3f}" + ("" if v[1] >= 500 else f" (n={v[1]})")
            row.append(text + (f" [{v[2]:.3f}]" if flops and v[2] is not None else ""))
        out.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="easyvqa,scenes", help="comma-separated: easyvqa, scenes, largescene")
    ap.add_argument("--flops", action="store_true", help="add each cell's analytic FLOPs ratio in brackets")
    args = ap.parse_args()
    tasks = args.task.split(",")
    unknown = [t for t in tasks if t not in RUNS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {sorted(RUNS)}")
    print(table(tasks, args.flops))
