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
   prefill (`adapters.decoder.prefill_once`: the same caches, bit for bit, as one prefill
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
same machine load; the absolute numbers drift with the load.

Model and tokenizer can be injected (`run_kv_bench(cfg, model=..., tokenizer=...)`), so the
runner is tested on a tiny random Llama and a toy tokenizer in seconds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..core.errors import BudgetError, StageError, UnsupportedModelError
from .report import Column, markdown_table, sort_rows, to_jsonable, write_jsonl
from .timing import RSSSampler, memory_label, sync

__all__ = ["KVBenchConfig", "SETTINGS", "TASKS", "MODELS", "FULL", "kv_method_names", "check_methods",
           "check_ratios", "check_lengths", "check_depths", "check_config", "load_model", "make_samples",
           "compressed_prefill", "greedy_decode", "stop_ids", "run_kv_bench", "kv_columns", "kv_tables",
           "write_kv_report"]

FULL = "none"  # the method name of the full-cache rows (as in bench vit)
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
def kv_method_names() -> list[str]:
    from ..core.registry import list_methods

    return [i.name for i in list_methods(stage="kv-cache")]


def check_methods(names: Sequence[str]) -> list[str]:
    """Registered kv-cache methods, or a `StageError` naming the known ones."""
    from ..core.registry import list_methods

    stages = {i.name: i.stage for i in list_methods()}
    known = ", ".join(kv_method_names())
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise StageError(f"no methods given; known kv-cache methods: {known}")
    for n in names:
        if n in (FULL, "full"):
            raise StageError("the full cache is always measured next to every method; do not list it")
        if n not in stages:
            raise StageError(f"unknown method {n!r}; known kv-cache methods: {known}")
        if stages[n] != "kv-cache":
            raise StageError(f"method {n!r} works at the {stages[n]} stage, not on a KV cache; "
                             f"known kv-cache methods: {known}")
    if len(set(names)) != len(names):
        raise StageError(f"method listed twice: {', '.join(names)}")
    return names


def check_ratios(ratios: Sequence[float]) -> list[float]:
    out = [float(r) for r in ratios]
    if not out:
        raise BudgetError("no ratios given, e.g. --ratios 0.5,0.25,0.1")
    for r in out:
        if not 0.0 < r <= 1.0:
            raise BudgetError(f"ratio {r:g} is out of range: a ratio is the keep_ratio, the fraction of the context's "
                              "cache entries kept, in (0, 1] (kvpress's compression_ratio is 1 - keep_ratio), "
                              "e.g. --ratios 0.5,0.25,0.1")
    if len(set(out)) != len(out):
        raise BudgetError(f"ratio listed twice: {', '.join(f'{r:g}' for r in out)}")
    return out


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
def _cache_bytes(cache) -> int:
    from ..core.kv import kv_bytes

    return sum(kv_bytes(layer) for layer in cache.layers)


@contextlib.contextmanager
def compressed_prefill(model: nn.Module, prefix_ids: torch.Tensor, method=None, prefilled: tuple | None = None
                       ) -> Iterator[tuple]:
    """Prefill ``prefix_ids`` [1, N] into a fresh cache compressed by ``method`` (None: the full cache).

    A context manager yielding ``(cache, stats, seconds)``: ``stats`` the attachment's
    `Stats` (None for the full cache), ``seconds`` the prefill's wall time (the model's
    forward, synchronised). The method stays attached until the block exits, so decoding
    inside the block runs with it (decode-time eviction needs that).

    ``prefilled``: ``(cache, stats, seconds)`` already made by `shared_prefills`; then no
    forward runs here, the method is only attached for decoding.
    """
    import tokenreduce
    from transformers import DynamicCache

    device = prefix_ids.device
    with torch.inference_mode(), (tokenreduce.apply(model, method) if method is not None
                                  else contextlib.nullcontext()) as handle:
        # with the config, as generate() makes it: sliding-window layers (Gemma 3) then hold only their window
        if prefilled is not None:
            yield prefilled
            return
        cache = DynamicCache(config=model.config)
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=prefix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(device)
        seconds = time.perf_counter() - t0
        yield cache, (handle.stats if handle is not None else None), seconds


def forkable(method) -> bool:
    """Whether `prefill_once` can make ``method``'s cache (a kv method that compresses at prefill only)."""
    from ..core.method import KVMethod

    return isinstance(method, KVMethod) and not method.repositions and not getattr(method, "retrieval", False)


def shared_prefills(model: nn.Module, prefix_ids: torch.Tensor, methods: list) -> list[tuple]:
    """``(cache, stats, seconds)`` per method from one prefill: seconds = the shared forward + the method's own
    compression."""
    from ..adapters.decoder import prefill_once

    device = prefix_ids.device
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        _, forks = prefill_once(model, prefix_ids, methods, logits_to_keep=1)
        sync(device)
        total = time.perf_counter() - t0
    forward = total - sum(f[2] for f in forks)
    return [(cache, stats, forward + own) for cache, stats, own in forks]


@dataclass
class Decoded:
    tokens: list[int]  # generated ids (the stop token included, if one came)
    suffix_s: float  # the suffix's forward (the rest of the prompt), which also yields the first token
    decode_s: float  # the one-token steps after it
    steps: int  # one-token forwards run


def greedy_decode(model: nn.Module, cache, suffix_ids: torch.Tensor, max_new_tokens: int,
                  stop: Sequence[int] = ()) -> Decoded:
    """Greedy decoding after a prefilled ``cache``: the suffix in one forward, then one token at a time.

    The first new token comes from the suffix's forward; every further one costs one step.
    Stops after a token in ``stop`` or ``max_new_tokens`` tokens. Written out (not
    ``generate``) so the steps are timed exactly and nothing else runs in between.
    """
    device = suffix_ids.device
    stop = {int(s) for s in stop}
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=suffix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        sync(device)
        suffix_s = time.perf_counter() - t0
        tokens = [token]
        step = torch.empty(1, 1, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        while len(tokens) < max_new_tokens and token not in stop:
            step.fill_(token)
            out = model(input_ids=step, past_key_values=cache, use_cache=True)
            token = int(out.logits[0, -1].argmax())  # .item() synchronises
            tokens.append(token)
        sync(device)
        decode_s = time.perf_counter() - t0
    return Decoded(tokens, suffix_s, decode_s, len(tokens) - 1)


@contextlib.contextmanager
def _peak_memory(device: torch.device):
    """Yields a dict whose ``mb`` is set on exit: CUDA allocator peak or sampled RSS delta, in MiB."""
    box: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield box
        box["mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with RSSSampler() as s:
            yield box
        box["mb"] = s.peak_delta / 2**20


def run_prompt(model: nn.Module, tokenizer, sample: dict, prefix: list[int], suffix: list[int], method=None,
               stop: Sequence[int] = (), device="cpu", max_new_tokens: int | None = None,
               prefilled: tuple | None = None) -> dict:
    """One sample, one setting, one method (None: full cache): answer, score, bytes, times, memory."""
    from ..assets import haystack

    device = torch.device(device)
    a = torch.tensor([prefix], device=device)
    b = torch.tensor([suffix], device=device)
    gc.collect()
    with _peak_memory(device) as mem:
        with compressed_prefill(model, a, method, prefilled) as (cache, stats, prefill_s):
            kv_prefill = _cache_bytes(cache)
            budget = int(sample["max_new_tokens"])
            dec = greedy_decode(model, cache, b, min(budget, max_new_tokens or budget), stop)
            kv_end = _cache_bytes(cache)
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


# ---------------------------------------------------------------------------- runner
def _method_params(method) -> dict:
    params = {k: v for k, v in vars(method).items() if not k.startswith("_") and k not in ("budget", "count")}
    return to_jsonable(params)


def _params_text(method) -> str:
    """``describe()`` without the budget, which has its own columns."""
    parts = [p.strip() for p in method.describe().split(",")]
    return ", ".join(p for p in parts if not p.startswith(("keep_ratio=", "keep_count="))) or "—"


def _build_runs(names: Sequence[str], ratios: Sequence[float], log) -> tuple[list[tuple], list[dict]]:
    """(name, ratio, method) for every runnable pair, and the skipped ones with their reasons."""
    import tokenreduce

    infos = {i.name: i for i in tokenreduce.list_methods("kv-cache")}
    runs, skipped = [], []
    for name in names:
        if infos[name].needs_calibration:
            skipped.append({"method": name, "reason": "needs calibration (not run by this benchmark)"})
            continue
        for r in ratios:
            try:
                runs.append((name, r, tokenreduce.get_method(name, keep_ratio=r)))
            except BudgetError as e:
                skipped.append({"method": name, "keep_ratio": r, "reason": f"no keep_ratio budget: {e}"})
    for s in skipped:
        log(f"skipping {s['method']}" + (f" @ {s['keep_ratio']:g}" if "keep_ratio" in s else "") + f": {s['reason']}")
    return runs, skipped


def _check_attachable(model: nn.Module, runs: list[tuple], log) -> tuple[list[tuple], list[dict]]:
    """Attach each method once (no forward): an unsupported model fails now, a method that refuses it is skipped."""
    import tokenreduce

    ok, skipped, refused = [], [], {}
    for name, r, method in runs:
        if name in refused:
            continue
        try:
            with tokenreduce.apply(model, method):
                pass
        except UnsupportedModelError:
            raise
        except StageError as e:
            refused[name] = str(e)
            skipped.append({"method": name, "reason": f"refuses this model: {e}"})
            log(f"skipping {name}: refuses this model: {e}")
            continue
        ok.append((name, r, method))
    return [run for run in ok if run[0] not in refused], skipped


def _environment(cfg: KVBenchConfig, model: nn.Module) -> dict:
    import transformers

    import tokenreduce

    dtype = next(model.parameters()).dtype
    env = {"device": str(cfg.device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "tokenreduce": tokenreduce.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "mem_kind": memory_label(cfg.device)}
    if torch.device(cfg.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    return env


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(progress: bool, total: int):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench kv", unit="run", leave=False, file=sys.stderr, dynamic_ncols=True)


def _warmup(model, prefix: list[int], suffix: list[int], runs, device, log) -> None:
    """One short untimed prefill + 2 decoding steps per method, so one-off costs stay out of the timings."""
    d = torch.device(device)
    short, rest = torch.tensor([prefix[:256]], device=d), torch.tensor([suffix], device=d)
    t0 = time.perf_counter()
    for method in [None] + [m for _, _, m in runs]:
        with compressed_prefill(model, short, method) as (cache, _, _):
            greedy_decode(model, cache, rest, 3)
    log(f"warm-up: {time.perf_counter() - t0:.1f} s")


def _aggregate(runs: list[dict], full: list[dict]) -> dict:
    """Means over samples; ratios against the full cache's runs of the same samples (sums over sums)."""
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
    if all("kv_kept" in r for r in runs):
        row["kv_kept"] = tot(runs, "kv_kept") / n
        row["kv_layers"] = runs[0]["kv_layers"]
        row["scoring_gflops"] = tot(runs, "scoring_gflops") / n
    return row


def run_kv_bench(cfg: KVBenchConfig | None = None, model: nn.Module | None = None, tokenizer=None,
                 progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run the benchmark; returns the result rows (full-cache rows first) and, if ``cfg.out``, writes the report.

    ``model``/``tokenizer``: a causal LM the kv-cache stage supports and its tokenizer
    (default: ``cfg.model`` from `tokenreduce.assets.llm`).
    """
    cfg = check_config(cfg or KVBenchConfig())
    log = log or (lambda msg: print(msg, file=sys.stderr))
    names = cfg.methods if cfg.methods is not None else kv_method_names()
    runs, skipped = _build_runs(names, cfg.ratios, log)  # bad parameters fail before the model loads
    settings = _settings(cfg.setting)
    t_start = time.perf_counter()
    load_start = _loadavg()

    if model is None or tokenizer is None:
        if model is not None or tokenizer is not None:
            raise ValueError("inject both model and tokenizer, or neither")
        model, tokenizer = load_model(cfg)
        model_id = cfg.model_id or MODELS[cfg.model][1]
    else:
        model = model.to(cfg.device).eval()
        model_id = cfg.model_id or Path(getattr(model.config, "_name_or_path", "") or "").name or type(model).__name__
    runs, refused = _check_attachable(model, runs, log)
    skipped += refused
    if not runs:
        raise StageError("no method left to run: " + "; ".join(f"{s['method']}: {s['reason']}" for s in skipped))
    device = torch.device(cfg.device)
    stop = stop_ids(tokenizer)
    env = _environment(cfg, model)
    common = {"bench": "kv", "model": model_id, "task": cfg.task, "seed": cfg.seed, **env}

    out = Path(cfg.out) if cfg.out is not None else None
    jsonl = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        jsonl = out / "results.jsonl"
        jsonl.write_text("")

    from ..assets import haystack

    all_samples: dict[int, list[dict]] = {}
    for length in cfg.lengths:
        all_samples[length] = make_samples(tokenizer, cfg.task, length, cfg.n, cfg.seed, cfg.depths)
    if out is not None:
        haystack.save_samples([s for length in cfg.lengths for s in all_samples[length]], out / "samples.jsonl")

    header = {"record": "header", **common, "methods": [n for n in names], "ratios": list(cfg.ratios),
              "lengths": list(cfg.lengths), "settings": {s: SETTINGS[s][1] for s in settings}, "n": cfg.n,
              "depths": cfg.depths if cfg.depths is not None else _spread(cfg.n), "skipped": skipped,
              "max_new_tokens": cfg.max_new_tokens, "stop_ids": stop, "samples_file": "samples.jsonl" if out is not None else None,
              "loadavg_start": load_start, "shared_prefill": cfg.shared_prefill,
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if jsonl is not None:
        write_jsonl([header], jsonl)

    total = len(cfg.lengths) * cfg.n * len(settings) * (1 + len(runs))
    bar = _bar(progress, total)
    rows: list[dict] = []
    first = True
    try:
        for length in cfg.lengths:
            samples = all_samples[length]
            results: dict[tuple, list[dict]] = {}
            for sample in samples:
                for setting in settings:
                    prefix, suffix = haystack.encode_prompt(
                        tokenizer, *haystack.chat_prompt(tokenizer, sample, question_in_prefix=SETTINGS[setting][0]))
                    if first and cfg.warmup:
                        _warmup(model, prefix, suffix, runs, device, log)
                        first = False
                    # the full cache first, then every method on the same prompt, side by side
                    shared = {}
                    for name, ratio, method in [(FULL, 1.0, None)] + runs:
                        if method is not None and cfg.shared_prefill and not shared:
                            todo = [(n, r, m) for n, r, m in runs if forkable(m)]
                            if todo:
                                a = torch.tensor([prefix], device=device)
                                made = shared_prefills(model, a, [m for _, _, m in todo])
                                shared = {(n, r): f for (n, r, _), f in zip(todo, made)}
                                del made
                        res = run_prompt(model, tokenizer, sample, prefix, suffix, method, stop, device,
                                         cfg.max_new_tokens, prefilled=shared.pop((name, ratio), None))
                        res["sample_id"] = sample["id"]
                        results.setdefault((setting, name, ratio), []).append(res)
                        bar.update(1)
            new_rows = []
            for setting in settings:
                full = results[(setting, FULL, 1.0)]
                for name, ratio, method in [(FULL, 1.0, None)] + runs:
                    res = results[(setting, name, ratio)]
                    row = {"record": "result", "setting": setting, "setting_title": SETTINGS[setting][1],
                           "question_in_prefix": SETTINGS[setting][0], "length": length, "method": name,
                           "keep_ratio": ratio, "compression": round(1.0 - ratio, 10),
                           "params": _method_params(method) if method is not None else {},
                           "params_text": _params_text(method) if method is not None else None,
                           "method_repr": repr(method) if method is not None else "full cache",
                           "evicts_during_decode": bool(getattr(method, "evicts_during_decode", False)),
                           **_aggregate(res, full), "sample_ids": [r["sample_id"] for r in res],
                           "depths": [s["depth"] for s in samples],
                           "context_tokens": sum(s["context_tokens"] for s in samples) / len(samples),
                           **common,
                           "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
                    new_rows.append(row)
                    if name != FULL:
                        log(f"{setting}, {length} tokens, {name} @ {ratio:g}: accuracy {row['accuracy']:.2f} "
                            f"(full cache {_acc(new_rows, setting):.2f}), KV {row['kv_ratio']:.3f} of full, "
                            f"prefill x{row['prefill_ratio']:.2f}, decode {row['decode_tok_s'] or 0:.1f} tok/s")
            rows += new_rows
            if jsonl is not None:
                write_jsonl(new_rows, jsonl, append=True)
    finally:
        bar.close()

    elapsed = time.perf_counter() - t_start
    header["run_s"] = elapsed
    header["loadavg_end"] = _loadavg()
    for r in rows:
        r["run_s"] = elapsed
    if out is not None:
        write_jsonl([header] + rows, jsonl)  # rewrite: run time and the load at the end
        write_kv_report(rows, out, header)
    return rows


def _acc(rows: list[dict], setting: str) -> float:
    return next(r["accuracy"] for r in rows if r["setting"] == setting and r["method"] == FULL)


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
        Column("prefill_s", "prefill s", ".2f"), Column("prefill_ratio", "prefill / full", ".2f"),
        Column("decode_tok_s", "decode tok/s", ".1f"), Column("decode_speedup", "decode / full", ".2f"),
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


def kv_tables(rows: Sequence[dict]) -> str:
    """One Markdown table per (setting, length), each under a heading that names the setting."""
    rows = [r for r in rows if r.get("record", "result") == "result"]
    parts = []
    for setting, length, group in _groups(rows):
        parts.append(f"## {SETTINGS[setting][1]} — {length}-token contexts\n\n"
                     + markdown_table(group, kv_columns(group)) + "\n")
    return "\n".join(parts)


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
    load = ""
    if header.get("loadavg_start") and header.get("loadavg_end"):
        load = f"; load average {header['loadavg_start'][0]:.2f} at start, {header['loadavg_end'][0]:.2f} at end"
    notes.append(f"torch {r0.get('torch')}, transformers {r0.get('transformers')}, tokenreduce {r0.get('tokenreduce')}; "
                 f"{r0.get('timestamp')}; run {r0.get('run_s', 0):.0f} s{load}.")
    text = "# tokenreduce bench kv\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + kv_tables(rows)
    md = out / "results.md"
    out.mkdir(parents=True, exist_ok=True)
    md.write_text(text, encoding="utf-8")

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
