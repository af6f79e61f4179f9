"""The ``tokenreduce`` command line.

    tokenreduce list                      registered methods and their papers
    tokenreduce bench vit [options]       DINOv2-S: accuracy / fidelity / FLOPs / throughput per method and budget
    tokenreduce bench kv [options]        SmolLM2: long-context recall, KV bytes, prefill/decode time per method and ratio
    tokenreduce bench vlm [options]       mini-LLaVA: VQA accuracy / FLOPs by stage / prefill time per visual-token method
    tokenreduce search-schedule [options] an in-LLM method's per-layer schedule searched on calibration questions

Exit status: 0 on success, 2 for a usage error (unknown method, budget out of range, ...),
1 when a run fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser", "methods_table"]


def _comma_floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], e.g. 0.75,0.5; got {text!r}")


def _comma_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, e.g. 1000,3000; got {text!r}")


def _comma_names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce",
                                     description="Training-free token reduction: methods and benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="{list,bench,search-schedule}")
    sub.required = True

    p_list = sub.add_parser("list", help="table of registered methods")
    p_list.add_argument("--stage", default=None, help="only methods of this stage (encoder, connector, decoder, ...)")
    p_list.set_defaults(subparser=p_list)

    p_bench = sub.add_parser("bench", help="run a benchmark")
    bsub = p_bench.add_subparsers(dest="bench", metavar="{vit,kv,vlm}")
    bsub.required = True

    v = bsub.add_parser("vit", help="DINOv2-S on Fashion-MNIST and photos: accuracy, fidelity, FLOPs, throughput",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--methods", type=_comma_names, default=None,
                   help="comma-separated method names (default: every registered encoder method)")
    v.add_argument("--budgets", type=_comma_floats, default=[0.75, 0.5],
                   help="comma-separated keep_ratio budgets in (0, 1]")
    v.add_argument("--n-train", type=_positive_int, default=1000,
                   help="class-balanced train images for the classifiers")
    v.add_argument("--n-test", type=_positive_int, default=300, help="class-balanced test images")
    v.add_argument("--batch-size", type=_positive_int, default=32)
    v.add_argument("--image-size", type=_positive_int, default=224, help="pixels (a multiple of 14)")
    v.add_argument("--timing-batches", type=_positive_int, default=3, help="timed batches (after one warm-up)")
    v.add_argument("--no-timing", action="store_true", help="skip throughput and memory measurement")
    v.add_argument("--out", default="results/vit", help="output folder (results.jsonl, results.md, pareto.png)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    v.add_argument("--cache-dir", default=None,
                   help="model and feature cache (default: $TOKENREDUCE_CACHE or ~/.cache/tokenreduce)")
    v.add_argument("--no-cache", action="store_true", help="recompute the full model's train features; write no cache")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v.set_defaults(subparser=v)  # its usage line for errors found after parsing

    k = bsub.add_parser(
        "kv", help="KV-cache eviction on a small LM: long-context recall, cache bytes, prefill/decode time, memory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run each kv-cache method at each keep_ratio on seeded long-context retrieval samples, in two "
                    "settings, next to the full cache on the same samples.",
        epilog="settings:\n"
               "  aware     question-aware: the question is inside the compressed prefix\n"
               "  agnostic  question-agnostic: the context is compressed first, the question comes after\n\n"
               "keep_ratio = fraction of the prefix's cache entries kept per layer and KV head;\n"
               "compression = 1 - keep_ratio (kvpress's compression_ratio).\n"
               "Writes results.jsonl (a header record, then one row per setting x length x method x ratio),\n"
               "results.md (one table per setting and length), pareto.png, samples.jsonl under --out.")
    k.add_argument("--methods", type=_comma_names, default=None,
                   help="comma-separated kv-cache methods (default: every registered one)")
    k.add_argument("--ratios", type=_comma_floats, default=[0.5, 0.25, 0.1],
                   help="comma-separated keep_ratios in (0, 1] (default: 0.5,0.25,0.1)")
    k.add_argument("--lengths", type=_comma_ints, default=[1000, 3000],
                   help="comma-separated context lengths in tokens (default: 1000,3000)")
    k.add_argument("--setting", choices=["aware", "agnostic", "both"], default="both",
                   help="question-aware, question-agnostic, or both (default: both)")
    k.add_argument("--task", choices=["needle", "multikey", "multivalue", "vt"], default="needle",
                   help="haystack task: one needle, several keys, several values, variable tracking "
                        "(default: needle)")
    k.add_argument("--depths", type=_comma_floats, default=None,
                   help="needle depths in [0, 1], cycled over the samples (default: --n depths spread over 0.1..0.9)")
    k.add_argument("--n", type=_positive_int, default=5, help="samples per context length (default: 5)")
    k.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="cap on generated tokens (default: the task's own budget, e.g. 12 for one 7-digit number)")
    k.add_argument("--seed", type=int, default=0, help="sample seed (default: 0)")
    k.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2",
                   help="SmolLM2-135M-Instruct or Gemma 3 270M, from the offline asset packages (default: smollm2)")
    k.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    k.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model dtype (default: float32)")
    k.add_argument("--out", default="results/kv", help="output folder (default: results/kv)")
    k.add_argument("--cache-dir", default=None,
                   help="model cache (default: $TOKENREDUCE_CACHE or ~/.cache/tokenreduce)")
    k.add_argument("--no-warmup", action="store_true", help="skip the short untimed warm-up run of every method")
    k.add_argument("--separate-prefill", action="store_true",
                   help="prefill every method on its own inside apply (default: one shared prefill per prompt for the "
                        "methods that compress at prefill; the same caches, bit for bit, and much faster)")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(subparser=k)

    s = bsub.add_parser("vlm", help="mini-LLaVA VQA: accuracy, visual tokens, FLOPs by stage, prefill time",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", default="minillava", help="the bundled VLM")
    s.add_argument("--task", default="scenes", choices=("easyvqa", "scenes", "largescene"),
                   help="held-out questions of this task (largescene: a coarse view then G x G tiles)")
    s.add_argument("--methods", type=_comma_names, default=None,
                   help="comma-separated connector / in-LLM methods (default: fastervlm, visionzip, visual_random, "
                        "visual_pool, fastv, pyramiddrop; with --schedule: the in-LLM methods)")
    s.add_argument("--budgets", type=_comma_floats, default=[0.5, 0.25, 0.1],
                   help="comma-separated keep_ratio budgets: the fraction of visual tokens kept")
    s.add_argument("--n", type=_positive_int, default=200, help="questions")
    s.add_argument("--batch-size", type=_positive_int, default=16)
    s.add_argument("--pictures", type=int, default=3, help="samples per method drawn with their kept tokens")
    s.add_argument("--timing-repeats", type=_positive_int, default=3, help="paired prefill timings per method")
    s.add_argument("--no-timing", action="store_true", help="skip prefill / decode timing and memory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/vlm", help="output folder (results.jsonl, results.md, pareto.png, kept/)")
    s.add_argument("--param", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="an extra parameter of a listed method (or of a pipeline's part), repeatable, e.g. "
                        "--param coarse_to_fine.k=14 (VALUE read as JSON: 14, 0.5, true, \"text\"; else as text)")
    s.add_argument("--schedule", default=None, metavar="FILE",
                   help="a saved per-layer schedule (tokenreduce search-schedule): each listed in-LLM method also runs "
                        "it, one extra row each, labelled 'searched'")
    s.add_argument("--resume", action="store_true",
                   help="go on with an interrupted run: every result is saved in OUT/runs.jsonl as it finishes, and "
                        "with --resume (and the same task, --n, --seed, --batch-size) only the missing ones run")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(subparser=s)

    g = sub.add_parser(
        "search-schedule", help="search an in-LLM method's per-layer visual-token schedule on calibration questions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search the visual tokens an in-LLM method (fastv, pyramiddrop, sparsevlm, ...: `tokenreduce "
                    "list`) keeps at each layer of the mini-LLaVA's language model, on questions of the task's "
                    "calibration split (never the held-out ones bench vlm reports), and save the schedule as JSON "
                    "for bench vlm --schedule or "
                    "get_method(name, schedule=FILE). Searches from arXiv 2412.00556.",
        epilog="searches:\n"
               "  g          G-Search: shallow to deep, the fewest tokens each layer keeps with the calibration score\n"
               "             held (>= unreduced - --tolerance)\n"
               "  p-sigmoid  P-Sigmoid: a decreasing sigmoid over depth, tuned by Bayesian optimisation (Optuna) for\n"
               "             the best calibration score within --budget's FLOPs\n\n"
               "--budget is a keep_ratio: the FLOPs budget is what the method's own schedule at that keep_ratio\n"
               "costs, so the searched schedule and the method's fixed one compare at the same FLOPs.")
    g.add_argument("--method", default="fastv",
                   help="the in-LLM method whose scoring runs the schedule (default: fastv)")
    g.add_argument("--search", default="g", help="g or p-sigmoid (default: g)")
    g.add_argument("--task", default="scenes", choices=("easyvqa", "scenes"), help="calibration questions of this task")
    g.add_argument("--n", type=_positive_int, default=64, help="calibration questions (default: 64)")
    g.add_argument("--budget", type=float, default=None,
                   help="p-sigmoid: a keep_ratio in (0, 1) whose FLOPs the schedule may spend, e.g. 0.25")
    g.add_argument("--tolerance", type=float, default=None,
                   help="g: the calibration score drop allowed (default: 0, no drop)")
    g.add_argument("--layers", type=_comma_ints, default=None,
                   help="g: candidate drop layers, e.g. 2,4,6,8 (default: every layer from 1; fewer is faster)")
    g.add_argument("--trials", type=_positive_int, default=None, help="p-sigmoid: optimiser trials (default: 30)")
    g.add_argument("--sampler", default="gp", choices=("gp", "tpe"),
                   help="p-sigmoid: Optuna's Gaussian-process BO (gp) or TPE (default: gp)")
    g.add_argument("--objective", default="accuracy", choices=("accuracy", "agreement"),
                   help="first-token accuracy on the answers, or agreement with the unreduced model (default: "
                        "accuracy)")
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--seed", type=int, default=0, help="calibration sample and optimiser seed (default: 0)")
    g.add_argument("--out", default="schedule.json", help="where to save the schedule (default: schedule.json)")
    g.add_argument("--no-progress", action="store_true", help="no line per evaluation")
    g.set_defaults(subparser=g)
    return parser


def methods_table(stage: str | None = None) -> str:
    from .bench.report import Column, markdown_table
    from .core.registry import list_methods

    rows = [{"name": i.name, "stage": i.stage, "arxiv": i.arxiv, "paper": i.paper,
             "training_free": "yes" if i.training_free else "no",
             "calibration": "yes" if i.needs_calibration else "no",
             "params": i.params_text() or "—"} for i in list_methods(stage)]
    cols = [Column("name"), Column("stage"), Column("arxiv", "arXiv"), Column("paper"),
            Column("training_free", "training-free"), Column("calibration"), Column("params", "native params (defaults)")]
    return markdown_table(rows, cols)


def _bench_vit(args, parser) -> int:
    from .bench.vit import ViTBenchConfig, check_budgets, check_methods, run_vit_bench, vit_table
    from .core.errors import TokenReduceError

    try:  # usage errors first, before anything slow
        methods = check_methods(args.methods) if args.methods is not None else None
        budgets = check_budgets(args.budgets)
    except TokenReduceError as e:
        parser.error(str(e))
    if args.image_size % 14:
        parser.error(f"--image-size must be a multiple of DINOv2's patch size 14 (e.g. 224); got {args.image_size}")
    try:
        import torch

        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    cfg = ViTBenchConfig(methods=methods, budgets=budgets, n_train=args.n_train, n_test=args.n_test,
                         batch_size=args.batch_size, image_size=args.image_size, timing_batches=args.timing_batches,
                         timing=not args.no_timing, seed=args.seed, out=args.out, device=args.device,
                         cache=not args.no_cache, cache_dir=args.cache_dir)
    t0 = time.perf_counter()
    rows = run_vit_bench(cfg, progress=not args.no_progress)
    print(vit_table(rows))
    print(f"\nwrote {args.out}/results.jsonl, results.md, pareto.png in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return 0


def _check_device(text: str, parser) -> None:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as e:
        parser.error(f"--device {text!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text}: CUDA is not available on this machine; use --device cpu")


def _bench_kv(args, parser) -> int:
    from .bench.kv import KVBenchConfig, check_config, kv_tables, run_kv_bench
    from .core.errors import TokenReduceError

    cfg = KVBenchConfig(methods=args.methods, ratios=args.ratios, lengths=args.lengths, setting=args.setting,
                        task=args.task, depths=args.depths, n=args.n, seed=args.seed, model=args.model,
                        device=args.device, dtype=args.dtype, out=args.out, cache_dir=args.cache_dir,
                        warmup=not args.no_warmup, max_new_tokens=args.max_new_tokens,
                        shared_prefill=not args.separate_prefill)
    try:  # usage errors first, before anything slow
        cfg = check_config(cfg)
    except (TokenReduceError, ValueError) as e:
        parser.error(str(e))
    _check_device(args.device, parser)
    t0 = time.perf_counter()
    rows = run_kv_bench(cfg, progress=not args.no_progress)
    print(kv_tables(rows))
    print(f"\nwrote {args.out}/results.jsonl, results.md, pareto.png, samples.jsonl in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return 0


def parse_method_params(items: Sequence[str], methods: Sequence[str]) -> dict[str, dict]:
    """``--param METHOD.NAME=VALUE`` items -> ``{method: {name: value}}``; a `ParameterError` for a malformed item, a
    method not listed (a pipeline ``a+b`` lists ``a`` and ``b``) or a name the method does not take."""
    import json

    from .core.errors import ParameterError
    from .core.registry import method_params, registered

    listed = {part for m in methods for part in m.split("+")}
    out: dict[str, dict] = {}
    for item in items:
        key, eq, text = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not (eq and dot and method and name.isidentifier()):
            raise ParameterError(f"--param {item!r}: write METHOD.NAME=VALUE, e.g. --param coarse_to_fine.k=14")
        if method not in listed:
            raise ParameterError(f"--param {item!r}: {method!r} is not among the listed methods "
                                 f"({', '.join(sorted(listed))}); list it with --methods")
        known = [n for n, _ in method_params(registered()[method]) if n != "keep_ratio"]
        if name not in known:
            raise ParameterError(f"--param {item!r}: {method} takes no parameter {name!r}; its parameters: "
                                 f"{', '.join(known) or 'none'} (the budget comes from --budgets)")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out.setdefault(method, {})[name] = value
    return out


def _bench_vlm(args, parser) -> int:
    from .bench.runner import check_keep_ratios
    from .bench.vlm import VLMBenchConfig, check_methods, check_schedule_methods, run_vlm_bench, schedule_method_names
    from .core.errors import TokenReduceError
    from .core.schedule import load

    schedule = None
    try:  # usage errors first, before anything slow
        names = args.methods
        if names is None:
            names = (schedule_method_names() if args.schedule is not None else
                     ["fastervlm", "visionzip", "visual_random", "visual_pool", "fastv", "pyramiddrop"])
        methods = check_methods(names)
        params = parse_method_params(args.param, methods)
        budgets = check_keep_ratios(args.budgets, "budget", "the fraction of visual tokens kept", "--budgets 0.5,0.25")
        if args.schedule is not None:
            check_schedule_methods(methods)
            schedule = load(args.schedule)
    except FileNotFoundError as e:
        parser.error(f"--schedule: {e}")
    except TokenReduceError as e:
        parser.error(str(e))
    cfg = VLMBenchConfig(model=args.model, task=args.task, methods=methods, budgets=budgets, n=args.n,
                         batch_size=args.batch_size, timing=not args.no_timing, timing_repeats=args.timing_repeats,
                         pictures=args.pictures, seed=args.seed, out=args.out, schedule=schedule,
                         method_params=params, resume=args.resume)
    t0 = time.perf_counter()
    run_vlm_bench(cfg, progress=not args.no_progress)
    print((Path(args.out) / "results.md").read_text())
    print(f"\nwrote {args.out}/results.jsonl, results.md, pareto.png, kept/ in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return 0


def _search_schedule(args, parser) -> int:
    from .core.errors import TokenReduceError
    from .search.vlm import SearchConfig, check_config, run_schedule_search

    cfg = SearchConfig(method=args.method, search=args.search, task=args.task, n=args.n, budget=args.budget,
                       tolerance=args.tolerance, trials=args.trials, layers=args.layers, objective=args.objective,
                       sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, out=args.out)
    try:  # usage errors first, before the model loads
        cfg = check_config(cfg)
    except TokenReduceError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    result = run_schedule_search(cfg, log=lambda m: print(m, file=sys.stderr), progress=not args.no_progress)
    print(result.schedule.to_json())
    print(f"\nwrote {args.out} in {time.perf_counter() - t0:.0f} s; run it on held-out questions with "
          f"tokenreduce bench vlm --methods {args.method} --schedule {args.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .core.errors import TokenReduceError

    try:
        if args.command == "list":
            try:
                table = methods_table(args.stage)
            except TokenReduceError as e:  # an unknown --stage is a usage error
                args.subparser.error(str(e))
            print(table)
            return 0
        if args.command == "search-schedule":
            return _search_schedule(args, args.subparser)
        if args.bench == "vit":
            return _bench_vit(args, args.subparser)
        if args.bench == "kv":
            return _bench_kv(args, args.subparser)
        return _bench_vlm(args, args.subparser)
    except (TokenReduceError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"tokenreduce: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tokenreduce: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
