"""The KV-cache benchmark: what each eviction method keeps of a causal LM's long-context recall, and what it buys.

Tasks are the seeded long-context retrieval samples of `tokenreduce.assets.haystack` (needle,
multi-key, multi-value, variable tracking; RULER-style prompts and scoring). For every sample,
in each of two settings —

* question-aware: the compressed prefix ends after the question (the method sees the query);
* question-agnostic: only the instruction and the context are compressed, the question comes
  after (the method cannot know what will be asked; the realistic setting for a reused cache)

— the full-cache model runs first, then every (method, keep_ratio) on the same prompt:

1. the prefix is prefilled into a ``DynamicCache`` compressed by the method. By default
   (``shared_prefill``) the prefix is prefilled once for all methods that compress at
   prefill (`prefill_once`: the same caches, bit for bit, as one prefill
   per method, because compression does not change a prefill's hidden states); their
   prefill time is that shared forward plus the method's own scoring and compression.
   Methods that re-position or retrieve (rolling StreamingLLM, A²ATS) and other stages
   (GemFilter) get their own prefill inside ``apply`` (`compressed_prefill`);
2. the suffix (rest of the prompt + the answer prefix) and the answer are greedy-decoded
   token by token with the method still attached (decode-time evicting methods need it),
   stopping at end-of-sequence / end-of-turn or the sample's ``max_new_tokens``;
3. the answer is scored with the task's own metric (`haystack.score`).

Per (setting, context length, method, keep_ratio): accuracy, physical KV-cache bytes (all cache
layers) after prefill and at the end of generation and their ratio to the full cache's on the
same samples, prefill time, decode tokens/s (one-token steps / their time), and peak memory
(sampled RSS delta on CPU, ``max_memory_allocated`` on CUDA). Timings are taken side by side:
the full cache and every method run on one sample before the next sample starts, so the ratios
to the full cache (``prefill_ratio``, ``decode_speedup``) compare numbers measured under the
same machine load; the absolute numbers drift with the load. Each ratio comes with the spread
of its per-sample ratios (`runner.pair_spread`); a spread over 25 % is flagged noisy.

The grid, the loop over samples, the environment and the report files are `runner`'s; this
module is the task: samples, prompts, prefill, decoding, scoring.

Model and tokenizer can be injected (`run_kv_bench(cfg, model=..., tokenizer=...)`), so the
runner is tested on a tiny random Llama and a toy tokenizer in seconds.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..core.errors import BudgetError
from . import runner
from .decoding import Decoded, cache_bytes, compressed_prefill, forkable, greedy_decode, shared_prefills  # noqa: F401
from .report import Column, markdown_table, sort_rows
from .runner import FULL, Cell, SpreadColumn, Task, Unit
from .timing import peak_memory

__all__ = ["KVBenchConfig", "SETTINGS", "TASKS", "MODELS", "FULL", "kv_method_names", "check_methods",
           "check_ratios", "check_lengths", "check_depths", "check_config", "load_model", "make_samples",
           "compressed_prefill", "greedy_decode", "stop_ids", "run_kv_bench", "kv_columns", "kv_tables",
           "write_kv_report"]

MIN_LENGTH = 64  # shortest context worth a haystack (the needle sentence + some essay)

# setting -> (question inside the compressed prefix?, the title every report uses)
SETTINGS = {
    "aware": (True, "question-aware (question inside the compressed prefix)"),
    "agnostic": (False, "question-agnostic (context compressed, question after)"),
}
TASKS = {"needle": "needle_samples", "multikey": "multikey_samples", "multivalue": "multivalue_samples",
         "vt": "variable_tracking_samples"}
MODELS = {"smollm2": ("load_smollm2", "SmolLM2-135M-Instruct"), "gemma3": ("load_gemma3_270m", "Gemma-3-270M")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")


@dataclass
class KVBenchConfig:
    methods: Sequence[str] | None = None  # None: every registered kv-cache method
    ratios: Sequence[float] = (0.5, 0.25, 0.1)  # keep_ratio (kvpress compression_ratio = 1 - keep_ratio)
    lengths: Sequence[int] = (1000, 3000)  # context tokens
    setting: str = "both"  # aware | agnostic | both
    task: str = "needle"
    depths: Sequence[float] | None = None  # None: n depths evenly spread over [0.1, 0.9]
    n: int = 5  # samples per context length
    seed: int = 0
    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    out: str | Path | None = "results/kv"
    cache_dir: str | Path | None = None
    warmup: bool = True  # one short untimed prefill + decode per method before the timed runs
    shared_prefill: bool = True  # one prefill per prompt for every prefill-time kv method (prefill_once)
    max_new_tokens: int | None = None  # cap on generated tokens (None: each sample's own budget)
    model_id: str | None = None  # name in the report (default: the model's name)


# ---------------------------------------------------------------------------- checks (before anything loads)
# ---------------------------------------------------------------------------- checks (before anything loads)
def kv_method_names() -> list[str]:
    return runner.method_names("kv-cache")


def check_methods(names: Sequence[str]) -> list[str]:
    """Registered kv-cache methods, or a `StageError` naming the known ones."""
    return runner.check_methods(names, "kv-cache", "on a KV cache", full_names=(FULL, "full"),
                                full_message="the full cache is always measured next to every method; do not list it")


def check_ratios(ratios: Sequence[float]) -> list[float]:
    return runner.check_keep_ratios(
        ratios, "ratio", "the keep_ratio, the fraction of the context's cache entries kept, in (0, 1] (kvpress's "
        "compression_ratio is 1 - keep_ratio)", "--ratios 0.5,0.25,0.1")


def check_lengths(lengths: Sequence[int], ratios: Sequence[float] = ()) -> list[int]:
    out = []
    for n in lengths:
        if isinstance(n, float) and not n.is_integer():
            raise ValueError(f"length {n} is not a whole number of tokens")
        n = int(n)
        if n < MIN_LENGTH:
            raise ValueError(f"length {n} is too short: context lengths are tokens of haystack, at least {MIN_LENGTH}, "
                             "e.g. --lengths 1000,3000")
        out.append(n)
    if not out:
        raise ValueError("no lengths given, e.g. --lengths 1000,3000")
    if len(set(out)) != len(out):
        raise ValueError(f"length listed twice: {', '.join(map(str, out))}")
    for r in ratios:
        if int(min(out) * r) < 1:
            raise BudgetError(f"keep_ratio {r:g} keeps no entry of a {min(out)}-token context; raise the ratio or "
                              "the length")
    return out


def check_depths(depths: Sequence[float] | None) -> list[float] | None:
    if depths is None:
        return None
    out = [float(d) for d in depths]
    if not out:
        raise ValueError("no depths given, e.g. --depths 0.1,0.5,0.9")
    for d in out:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth {d:g} is out of range: a depth is the fraction of the context before the "
                             "needle, in [0, 1]")
    return out


def check_config(cfg: KVBenchConfig) -> KVBenchConfig:
    """Every usage error, before a model or a sample is loaded. Returns a normalised copy."""
    from dataclasses import replace

    if cfg.setting not in (*SETTINGS, "both"):
        raise ValueError(f"setting must be one of {', '.join((*SETTINGS, 'both'))}; got {cfg.setting!r}")
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {cfg.task!r}")
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {cfg.model!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {cfg.dtype!r}")
    if int(cfg.n) < 1:
        raise ValueError(f"n (samples per length) must be >= 1, got {cfg.n}")
    if cfg.max_new_tokens is not None and int(cfg.max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    methods = check_methods(cfg.methods) if cfg.methods is not None else None
    ratios = check_ratios(cfg.ratios)
    return replace(cfg, methods=methods, ratios=ratios, lengths=check_lengths(cfg.lengths, ratios),
                   depths=check_depths(cfg.depths), n=int(cfg.n))


def _settings(setting: str) -> list[str]:
    return list(SETTINGS) if setting == "both" else [setting]


# ---------------------------------------------------------------------------- model, samples
def load_model(cfg: KVBenchConfig):
    """``(model, tokenizer)`` of ``cfg.model`` from `tokenreduce.assets.llm`, on ``cfg.device``."""
    from ..assets import llm

    loader = getattr(llm, MODELS[cfg.model][0])
    model, tokenizer = loader(cache_dir=cfg.cache_dir, dtype=DTYPES[cfg.dtype])
    return model.to(cfg.device).eval(), tokenizer


def llm_cache_valid(model: str) -> bool:
    """Whether ``model``'s converted weights are already cached (tests skip the real model without them)."""
    from ..assets import llm

    path = llm.smollm2_cache_path() if model == "smollm2" else llm.gemma3_cache_path()
    return llm._cache_valid(path)


def _spread(n: int) -> list[float]:
    return [0.5] if n == 1 else [round(0.1 + 0.8 * i / (n - 1), 4) for i in range(n)]


def make_samples(tokenizer, task: str, length: int, n: int, seed: int,
                 depths: Sequence[float] | None = None) -> list[dict]:
    """``n`` samples of ``task`` with ``length``-token contexts.

    Default depths: ``n`` depths evenly spread over [0.1, 0.9], one sample each. Given
    ``depths``, sample ``i`` sits at ``depths[i % len(depths)]``. Sample ``i`` of a depth is
    the haystack module's sample ``i`` of that depth, so adding samples never changes the others.
    """
    from ..assets import haystack

    make = getattr(haystack, TASKS[task])
    if depths is None:
        return [s for d in _spread(n) for s in make(tokenizer, length, [d], 1, seed)]
    counts = [len(range(j, n, len(depths))) for j in range(len(depths))]
    per_depth = [make(tokenizer, length, [d], c, seed) if c else [] for d, c in zip(depths, counts)]
    return [per_depth[i % len(depths)][i // len(depths)] for i in range(n)]


def stop_ids(tokenizer) -> list[int]:
    """End-of-sequence and end-of-turn token ids the tokenizer knows."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for name in _END_OF_TURN:
        if name in vocab and int(vocab[name]) not in ids:
            ids.append(int(vocab[name]))
    return ids


# ---------------------------------------------------------------------------- one prompt
def run_prompt(model: nn.Module, tokenizer, sample: dict, prefix: list[int], suffix: list[int], method=None,
               stop: Sequence[int] = (), device="cpu", max_new_tokens: int | None = None,
               prefilled: tuple | None = None) -> dict:
    """One sample, one setting, one method (None: full cache): answer, score, bytes, times, memory."""
    from ..assets import haystack

    device = torch.device(device)
    a = torch.tensor([prefix], device=device)
    b = torch.tensor([suffix], device=device)
    gc.collect()
    with peak_memory(device) as mem:
        with compressed_prefill(model, a, method, prefilled) as (cache, stats, prefill_s):
            kv_prefill = cache_bytes(cache)
            budget = int(sample["max_new_tokens"])
            dec = greedy_decode(model, cache, b, min(budget, max_new_tokens or budget), stop)
            kv_end = cache_bytes(cache)
        del cache
    text = tokenizer.decode(dec.tokens, skip_special_tokens=True)
    out = {"score": haystack.score(sample, text), "output": text, "prefill_s": prefill_s, "suffix_s": dec.suffix_s,
           "decode_s": dec.decode_s, "steps": dec.steps, "generated": len(dec.tokens), "kv_bytes_prefill": kv_prefill,
           "kv_bytes_end": kv_end, "peak_mem_mb": mem["mb"], "prefix_tokens": len(prefix),
           "suffix_tokens": len(suffix)}
    if stats is not None and stats.kv_layers:
        out["kv_kept"] = sum(stats.kv_kept_per_layer) / len(stats.kv_kept_per_layer)
        out["kv_layers"] = len(stats.kv_layers)
        out["scoring_gflops"] = stats.scoring_flops / 1e9
    return out


def _warmup(model, prefix: list[int], suffix: list[int], cells: Sequence[Cell], device, log) -> None:
    """One short untimed prefill + 2 decoding steps per method, so one-off costs stay out of the timings."""
    d = torch.device(device)
    short, rest = torch.tensor([prefix[:256]], device=d), torch.tensor([suffix], device=d)
    t0 = time.perf_counter()
    for method in [None] + [c.obj for c in cells]:
        with compressed_prefill(model, short, method) as (cache, _, _):
            greedy_decode(model, cache, rest, 3)
    log(f"warm-up: {time.perf_counter() - t0:.1f} s")


def _tok_s(run: dict) -> float | None:
    return run["steps"] / run["decode_s"] if run["decode_s"] > 0 and run["steps"] else None


def _aggregate(runs: list[dict], full: list[dict]) -> dict:
    """Means over samples; ratios against the full cache's runs of the same samples (sums over sums), with the
    spread of the per-sample ratios (`runner.spread_fields`)."""
    n = len(runs)

    def tot(rs, k):
        return float(sum(r[k] for r in rs))

    steps, decode_s = tot(runs, "steps"), tot(runs, "decode_s")
    f_steps, f_decode_s = tot(full, "steps"), tot(full, "decode_s")
    tok_s = steps / decode_s if decode_s > 0 and steps else None
    f_tok_s = f_steps / f_decode_s if f_decode_s > 0 and f_steps else None
    row = {
        "accuracy": tot(runs, "score") / n, "n": n,
        "kv_bytes_prefill": tot(runs, "kv_bytes_prefill") / n, "kv_bytes_end": tot(runs, "kv_bytes_end") / n,
        "kv_ratio": tot(runs, "kv_bytes_prefill") / tot(full, "kv_bytes_prefill"),
        "kv_end_ratio": tot(runs, "kv_bytes_end") / tot(full, "kv_bytes_end"),
        "prefill_s": tot(runs, "prefill_s") / n, "prefill_ratio": tot(runs, "prefill_s") / tot(full, "prefill_s"),
        "full_prefill_s": tot(full, "prefill_s") / n,
        "suffix_s": tot(runs, "suffix_s") / n,
        "decode_tok_s": tok_s, "decode_ms_per_tok": 1000.0 / tok_s if tok_s else None,
        "full_decode_tok_s": f_tok_s,
        "decode_speedup": tok_s / f_tok_s if tok_s and f_tok_s else None,
        "generated": tot(runs, "generated") / n, "decode_steps": int(steps),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in runs),
        "prefix_tokens": tot(runs, "prefix_tokens") / n, "suffix_tokens": tot(runs, "suffix_tokens") / n,
        "scores": [r["score"] for r in runs], "outputs": [r["output"] for r in runs],
    }
    row["kv_mb_prefill"] = row["kv_bytes_prefill"] / 2**20
    row["kv_mb_end"] = row["kv_bytes_end"] / 2**20
    row.update(runner.spread_fields("prefill_ratio", [r["prefill_s"] / f["prefill_s"] for r, f in zip(runs, full)]))
    pairs = [(_tok_s(r), _tok_s(f)) for r, f in zip(runs, full)]
    row.update(runner.spread_fields("decode_speedup", [a / b if a and b else None for a, b in pairs]))
    if all("kv_kept" in r for r in runs):
        row["kv_kept"] = tot(runs, "kv_kept") / n
        row["kv_layers"] = runs[0]["kv_layers"]
        row["scoring_gflops"] = tot(runs, "scoring_gflops") / n
    return row


class _KVTask(Task):
    """Long-context retrieval per (sample, setting): the full cache, then every cell on the same prompt."""

    bench = "kv"

    def __init__(self, cfg: KVBenchConfig, model: nn.Module, tokenizer, names: list[str], cells: list[Cell], log):
        self.cfg, self.model, self.tokenizer, self.names, self.cells, self.log = cfg, model, tokenizer, names, cells, log
        self.device, self.stop, self.settings = torch.device(cfg.device), stop_ids(tokenizer), _settings(cfg.setting)
        self.shared_for, self.shared = None, {}

    def prepare(self, out):
        from ..assets import haystack

        cfg = self.cfg
        self.samples = {n: make_samples(self.tokenizer, cfg.task, n, cfg.n, cfg.seed, cfg.depths) for n in cfg.lengths}
        if out is not None:
            haystack.save_samples([s for n in cfg.lengths for s in self.samples[n]], out / "samples.jsonl")
        self.out = out

    def header(self, grid):
        cfg = self.cfg
        return {"methods": list(self.names), "ratios": list(cfg.ratios), "lengths": list(cfg.lengths),
                "settings": {s: SETTINGS[s][1] for s in self.settings}, "n": cfg.n,
                "depths": cfg.depths if cfg.depths is not None else _spread(cfg.n), "skipped": grid.skipped,
                "max_new_tokens": cfg.max_new_tokens, "stop_ids": self.stop,
                "samples_file": "samples.jsonl" if self.out is not None else None, "shared_prefill": cfg.shared_prefill}

    def groups(self):
        from ..assets import haystack

        for length in self.cfg.lengths:
            yield length, [Unit(setting, (sample, *haystack.encode_prompt(self.tokenizer, *haystack.chat_prompt(
                self.tokenizer, sample, question_in_prefix=SETTINGS[setting][0]))))
                           for sample in self.samples[length] for setting in self.settings]

    def warmup(self, unit, cells):
        if self.cfg.warmup:
            _warmup(self.model, unit.data[1], unit.data[2], cells, self.device, self.log)

    def run(self, group, unit, cell):
        sample, prefix, suffix = unit.data
        if not cell.full and self.cfg.shared_prefill and self.shared_for is not unit:
            self.shared_for, self.shared = unit, {}  # one prefill for every method that compresses at prefill only
            todo = [c for c in self.cells if forkable(c.obj)]
            if todo:
                made = shared_prefills(self.model, torch.tensor([prefix], device=self.device), [c.obj for c in todo])
                self.shared = dict(zip(todo, made))
                del made
        res = run_prompt(self.model, self.tokenizer, sample, prefix, suffix, cell.obj, self.stop, self.device,
                         self.cfg.max_new_tokens, prefilled=self.shared.pop(cell, None))
        res["sample_id"] = sample["id"]
        return res

    def row(self, length, setting, cell, runs, full_runs):
        method, samples = cell.obj, self.samples[length]
        return {"record": "result", "setting": setting, "setting_title": SETTINGS[setting][1],
                "question_in_prefix": SETTINGS[setting][0], "length": length, "method": cell.method,
                "keep_ratio": cell.budget, "compression": round(1.0 - cell.budget, 10),
                "params": runner.method_params(method, drop=("budget", "count")) if method is not None else {},
                "params_text": runner.params_text(method) if method is not None else None,
                "method_repr": repr(method) if method is not None else "full cache",
                "evicts_during_decode": bool(getattr(method, "evicts_during_decode", False)),
                **_aggregate(runs, full_runs), "sample_ids": [r["sample_id"] for r in runs],
                "depths": [s["depth"] for s in samples],
                "context_tokens": sum(s["context_tokens"] for s in samples) / len(samples)}

    def log_line(self, row, full_row):
        return (f"{row['setting']}, {row['length']} tokens, {row['method']} @ {row['keep_ratio']:g}: accuracy "
                f"{row['accuracy']:.2f} (full cache {full_row['accuracy']:.2f}), KV {row['kv_ratio']:.3f} of full, "
                f"prefill x{row['prefill_ratio']:.2f}, decode {row['decode_tok_s'] or 0:.1f} tok/s")

    def report(self, rows, out, header):
        write_kv_report(rows, out, header)


def run_kv_bench(cfg: KVBenchConfig | None = None, model: nn.Module | None = None, tokenizer=None,
                 progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run the benchmark; returns the result rows (full-cache rows first) and, if ``cfg.out``, writes the report.

    ``model``/``tokenizer``: a causal LM the kv-cache stage supports and its tokenizer
    (default: ``cfg.model`` from `tokenreduce.assets.llm`).
    """
    cfg = check_config(cfg or KVBenchConfig())
    t_start = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    names = cfg.methods if cfg.methods is not None else kv_method_names()
    # bad parameters fail before the model loads
    grid = runner.build_grid(names, cfg.ratios, skip_calibrated=True, skip_bad_budgets=True, log=log)
    if model is None or tokenizer is None:
        if model is not None or tokenizer is not None:
            raise ValueError("inject both model and tokenizer, or neither")
        model, tokenizer = load_model(cfg)
        model_id = cfg.model_id or MODELS[cfg.model][1]
    else:
        model = model.to(cfg.device).eval()
        model_id = cfg.model_id or Path(getattr(model.config, "_name_or_path", "") or "").name or type(model).__name__
    grid = runner.check_attachable(model, grid, log)
    common = {"bench": "kv", "model": model_id, "task": cfg.task, "seed": cfg.seed,
              **runner.environment(cfg.device, model)}
    task = _KVTask(cfg, model, tokenizer, list(names), grid.cells, log)
    return runner.run_grid(task, grid, cfg.out, common, progress, log, t_start=t_start)


# ---------------------------------------------------------------------------- report
def kv_columns(rows: Sequence[dict]) -> list[Column]:
    kinds = {r.get("mem_kind") for r in rows if r.get("mem_kind")}
    mem = kinds.pop() if len(kinds) == 1 else "peak memory (MB)"
    return [
        Column("method", fmt=lambda v: "full cache" if v == FULL else v),
        Column("keep_ratio", "keep_ratio", ".2f"), Column("compression", "compression", ".2f"),
        Column("accuracy", "accuracy", ".3f"), Column("n", "n"),
        Column("kv_mb_prefill", "KV MB prefill", ".2f"), Column("kv_mb_end", "KV MB end", ".2f"),
        Column("kv_ratio", "KV / full", ".3f"),
        Column("prefill_s", "prefill s", ".2f"), SpreadColumn("prefill_ratio", "prefill / full", ".2f"),
        Column("decode_tok_s", "decode tok/s", ".1f"), SpreadColumn("decode_speedup", "decode / full", ".2f"),
        Column("peak_mem_mb", mem, ".1f"), Column("params_text", "params"),
    ]


def _sorted(rows: Sequence[dict]) -> list[dict]:
    return sort_rows(rows, first=lambda r: r.get("method") == FULL, keys=("method", "-keep_ratio"))


def _groups(rows: Sequence[dict]) -> list[tuple[str, int, list[dict]]]:
    """(setting, length, rows) in the order settings and lengths were run."""
    keys: list[tuple[str, int]] = []
    for r in rows:
        k = (r["setting"], r["length"])
        if k not in keys:
            keys.append(k)
    order = {s: i for i, s in enumerate(SETTINGS)}
    keys.sort(key=lambda k: (order.get(k[0], 99), k[1]))
    return [(s, n, _sorted([r for r in rows if (r["setting"], r["length"]) == (s, n)])) for s, n in keys]


_RECALLED = {"needle": "needles recalled", "multikey": "asked keys' values recalled",
             "multivalue": "expected values recalled", "vt": "chain variables named"}


def kv_legend(rows: Sequence[dict]) -> str:
    """The line under the tables: what accuracy is and what the ratios compare."""
    task = next((r.get("task") for r in rows), None)
    line = (f"accuracy = fraction of {_RECALLED.get(task, 'expected values recalled')}; full cache = the uncompressed "
            "cache on the same samples; KV / full, prefill / full and decode / full are ratios to it, measured side "
            "by side, sample by sample")
    if any(r.get("prefill_ratio_noisy") or r.get("decode_speedup_noisy") for r in rows):
        line += f"; noisy = the per-sample ratios spread by more than {runner.NOISY_SPREAD:.0%} of their median"
    return line + "."


def _tables(rows: Sequence[dict]) -> list[tuple[str, list[dict], list[Column]]]:
    return [(f"{SETTINGS[setting][1]} — {length}-token contexts", group, kv_columns(group))
            for setting, length, group in _groups(rows)]


def kv_tables(rows: Sequence[dict]) -> str:
    """One Markdown table per (setting, length), each under a heading that names the setting, then `kv_legend`."""
    rows = [r for r in rows if r.get("record", "result") == "result"]
    return "\n".join([f"## {h}\n\n" + markdown_table(g, c) + "\n" for h, g, c in _tables(rows)] + [kv_legend(rows)])


def write_kv_report(rows: Sequence[dict], out: str | Path, header: dict | None = None) -> dict[str, Path]:
    """``results.md`` and ``pareto.png`` (+ ``pareto-<length>.png`` per length when several) under ``out``."""
    from .plot import Panel, pareto_plot

    out = Path(out)
    rows = [r for r in rows if r.get("record", "result") == "result"]
    if not rows:
        raise ValueError("no result rows to report")
    r0 = rows[0]
    header = header or {}
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    n_depths = header.get("depths")
    notes = [
        f"Model {r0.get('model')} ({r0.get('dtype')}, {r0.get('device')}, {r0.get('threads')} threads); task "
        f"{r0.get('task')} (`tokenreduce.assets.haystack`, seed {r0.get('seed')}), {r0.get('n')} samples per context "
        f"length" + (f" at depths {', '.join(f'{d:g}' for d in n_depths)}" if n_depths else "")
        + "; the samples are in samples.jsonl. Greedy decoding up to the sample's max_new_tokens, stopping at "
          "end-of-sequence / end-of-turn; accuracy = the task's score (fraction of expected values in the answer).",
        "Settings: " + "; ".join(f"**{SETTINGS[s][1]}**" for s in settings) + ". The full prompt is the same in both; "
        "only where the compressed prefix ends differs. The full-cache row of each table ran on the same samples, "
        "side by side with the methods (sample by sample).",
        "keep_ratio = fraction of the compressed prefix's cache entries kept per layer and KV head; compression = "
        "1 - keep_ratio (kvpress's compression_ratio). KV MB = physical bytes of keys + values of every cache layer, "
        "after prefill and at the end of generation (mean per sample); KV / full = after-prefill bytes over the "
        "full cache's on the same samples.",
        "Times: prefill s = the compressed prefix's forward (scoring and eviction included), mean per sample; "
        "decode tok/s = one-token steps after the suffix / their total time. prefill / full and decode / full are "
        "ratios to the full cache timed on the same samples in the same minutes (the machine's load changes the "
        "absolute numbers, much less the ratios).",
    ]
    if str(r0.get("mem_kind", "")).startswith("peak RSS"):
        notes.append("Memory: peak RSS delta, sampled every 2 ms over prefill + decoding of one sample, minus the "
                     "resident size just before (max over samples); a coarse CPU measure that includes activations.")
    else:
        notes.append("Memory: CUDA max_memory_allocated over prefill + decoding of one sample, minus the allocation "
                     "before it (max over samples): cache + activations.")
    if header.get("skipped"):
        notes.append("Skipped: " + "; ".join(f"{s['method']}" + (f" @ {s['keep_ratio']:g}" if "keep_ratio" in s
                                                                   else "") + f" ({s['reason']})"
                                            for s in header["skipped"]))
    if any(r.get("prefill_ratio_noisy") or r.get("decode_speedup_noisy") for r in rows):
        notes.append(runner.spread_note("A prefill / full or decode / full ratio", "one per sample"))
    notes.append(runner.environment_note(r0, header))
    md = runner.write_markdown_report(out / "results.md", "tokenreduce bench kv", notes, _tables(rows), kv_legend(rows))

    short = {"aware": "aware", "agnostic": "agnostic"}
    pngs = {}
    for length in lengths:
        sel = [r for r in rows if r["length"] == length]
        name = "pareto.png" if length == lengths[-1] else f"pareto-{length}.png"
        pngs[length] = pareto_plot(
            sel, out / name, y="accuracy", ylabel=f"accuracy ({r0.get('task')})",
            panels=[Panel("kv_ratio", "KV-cache bytes after prefill / full cache's"),
                    Panel("decode_tok_s", "decode tokens/s (measured)")],
            is_reference=lambda r: r.get("method") == FULL,
            label=lambda r: "full cache" if r.get("method") == FULL else f"{r['method']} ({short[r['setting']]})",
            annotate="keep_ratio", title=f"{r0.get('model')}, {length}-token contexts, "
                                         + " vs ".join(short[s] for s in settings))
        if len(lengths) > 1 and length == lengths[-1]:
            # every length has its own file; pareto.png is the longest one's
            import shutil

            shutil.copyfile(pngs[length], out / f"pareto-{length}.png")
    return {"jsonl": out / "results.jsonl", "md": md, "png": out / "pareto.png",
            **{f"png_{n}": p for n, p in pngs.items()}}
