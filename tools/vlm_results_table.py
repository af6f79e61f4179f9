"""Collect the `bench vlm` results.jsonl files under benchmarks/results/ into one method x (task, budget) accuracy
table (markdown), as in the README: `python tools/vlm_results_table.py`."""
import json
R = "benchmarks/results/"  # run from the repository root
runs = {t: [f"vlm_{t}{tag}" for tag in ("", "_merge", "_pipelines", "_more", "_tower", "_dymu_vflowopt")] for t in ("easyvqa", "scenes")}
acc, ratio = {}, {}
for task, dirs in runs.items():
    for d in dirs:
        try:
            lines = open(R + d + "/results.jsonl").read().splitlines()
        except FileNotFoundError:
            continue
        for l in lines:
            r = json.loads(l)
            if r.get("record") == "header" or "method" not in r:
                continue
            acc.setdefault(r["method"], {})[(task, r.get("budget"))] = (r["accuracy"], r["n"])
            ratio.setdefault(r["method"], {})[(task, r.get("budget"))] = r.get("flops_ratio")
order = ["full", "blind", "fastervlm", "visionzip", "vflowopt", "visual_random", "visual_pool", "fastv", "pyramiddrop",
         "sparsevlm", "visiondrop", "llavolta", "flowcut", "dymu", "dymu_vtu", "flowcut_llm", "yopo", "visionzip+visiondrop",
         "fastervlm+fastv", "flowcut+flowcut_llm", "vflowopt+vflowopt_llm"]
cols = [(t, b) for t in ("easyvqa", "scenes") for b in (0.5, 0.25, 0.1)]
print("| method | " + " | ".join(f"{'easy-vqa' if t == 'easyvqa' else t} {b}" for t, b in cols) + " |")
print("|---|" + "---|" * len(cols))
for m in order:
    if m not in acc:
        continue
    cells = []
    for t, b in cols:
        v = acc[m].get((t, None if m in ("full", "blind") else b))
        if m in ("full", "blind") and b != 0.5:
            cells.append("")
        else:
            ran = any(task == t for task, _ in acc[m])  # "—": skipped (budget out of reach); "not run": no run
            cells.append(("—" if ran else "not run") if v is None else
                         f"{v[0]:.3f}" + ("" if v[1] >= 500 else f" (n={v[1]})"))
    print(f"| {m} | " + " | ".join(cells) + " |")
