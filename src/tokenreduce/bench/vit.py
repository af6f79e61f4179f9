"""The vision-encoder benchmark: what each method keeps of DINOv2's features, and what it buys.

For the full model (method "none", budget 1.0, always row one) and every (method, budget):

1. accuracy — Fashion-MNIST [CLS] features (``pooler_output``, the layer-normed [CLS]) of a
   fixed, class-balanced test subset through classifiers fitted ONCE on the full model's
   features of a fixed, class-balanced train subset (cached on disk): weighted kNN and a
   linear probe (see `tasks_vit`);
2. fidelity — mean cosine between reduced and full [CLS] features of the bundled photos;
3. analytic GFLOPs per image, FLOPs ratio, scoring GFLOPs and tokens at the last block,
   from the attachment's own stats (averaged over the test batches);
4. measured throughput (median over repeats after a warm-up batch) and speedup against the
   full model timed batch by batch alternately with each method (`timing.measure_paired`,
   so both see the same machine load), and peak memory (see `timing`);
5. calibration time, for methods that need calibration.

Model and data can be injected (`run_vit_bench(config, model=..., data=...)`), so the whole
runner is tested on a tiny random model in seconds.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..core.errors import BudgetError, StageError
from .report import Column, markdown_table, sort_rows, to_jsonable, write_jsonl, write_markdown
from .tasks_vit import KNNClassifier, LazyPixels, LinearProbe, PixelSource, balanced_subset, extract_features, fidelity
from .timing import Timing, measure_paired, measure_throughput

__all__ = ["ViTBenchConfig", "ViTData", "load_vit_data", "encoder_method_names", "check_methods", "check_budgets",
           "run_vit_bench", "vit_columns", "vit_table", "write_vit_report", "train_features", "FULL"]

FULL = "none"  # the method name of the unreduced model's row
FEATURE_CACHE_VERSION = 1  # bump when feature extraction changes, so cached features are recomputed


@dataclass
class ViTBenchConfig:
    methods: Sequence[str] | None = None  # None: every registered encoder method
    budgets: Sequence[float] = (0.75, 0.5)  # the common keep_ratio
    n_train: int = 1000
    n_test: int = 300
    batch_size: int = 32
    image_size: int = 224
    timing_batches: int = 3
    timing: bool = True
    seed: int = 0
    out: str | Path | None = "results/vit"
    device: str = "cpu"
    cache: bool = True  # cache the full model's train features on disk
    cache_dir: str | Path | None = None  # default: tokenreduce.assets default_cache_dir()
    knn_k: int = 20
    probe_weight_decay: float = 1e-4
    calib_images: int = 64
    calib_batch: int = 32
    model_id: str = "dinov2-small-imgfocus"


@dataclass
class ViTData:
    """Everything the benchmark feeds the model. ``cache_key`` None: never cache its features."""

    train_pixels: PixelSource
    train_labels: Tensor
    test_pixels: PixelSource
    test_labels: Tensor
    photo_pixels: Tensor
    name: str = "custom"
    cache_key: str | None = None
    info: dict = field(default_factory=dict)


def load_vit_data(n_train: int = 1000, n_test: int = 300, image_size: int = 224, seed: int = 0) -> ViTData:
    """Fashion-MNIST subsets (class-balanced, seeded; train from the train split, test from the test split)
    and the bundled natural photos, all at ``image_size`` px."""
    from ..assets import fashion_to_pixels, load_fashion_mnist, natural_photos, preprocess

    tr_img, tr_lab = load_fashion_mnist("train")
    te_img, te_lab = load_fashion_mnist("test")
    itr = balanced_subset(tr_lab, n_train, seed)
    ite = balanced_subset(te_lab, n_test, seed + 1)

    def to_pixels(imgs):
        return fashion_to_pixels(imgs, size=image_size)

    photos = natural_photos()
    return ViTData(
        train_pixels=LazyPixels(tr_img[itr], to_pixels), train_labels=tr_lab[itr],
        test_pixels=LazyPixels(te_img[ite], to_pixels), test_labels=te_lab[ite],
        photo_pixels=preprocess([p for _, p in photos], size=image_size),
        name="fashion-mnist", cache_key=f"fmnist-train-n{n_train}-s{image_size}-seed{seed}",
        info={"photos": [n for n, _ in photos],
              "train_index_sha1": hashlib.sha1(itr.numpy().tobytes()).hexdigest()[:12]})


# ---------------------------------------------------------------------------- checks
def encoder_method_names() -> list[str]:
    from ..core.registry import list_methods

    return [i.name for i in list_methods(stage="encoder")]


def check_methods(names: Sequence[str]) -> list[str]:
    """Registered encoder methods, or a `StageError` naming the known ones."""
    from ..core.registry import list_methods

    stages = {i.name: i.stage for i in list_methods()}
    known = encoder_method_names()
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise StageError(f"no methods given; known encoder methods: {', '.join(known)}")
    for n in names:
        if n == FULL:
            raise StageError(f"{FULL!r} is the full model, always measured as row one; do not list it")
        if n not in stages:
            raise StageError(f"unknown method {n!r}; known encoder methods: {', '.join(known)}")
        if stages[n] != "encoder":
            raise StageError(f"method {n!r} works at the {stages[n]} stage, not in a vision encoder; "
                             f"known encoder methods: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise StageError(f"method listed twice: {', '.join(names)}")
    return names


def check_budgets(budgets: Sequence[float]) -> list[float]:
    out = []
    for b in budgets:
        b = float(b)
        if not 0.0 < b <= 1.0:
            raise BudgetError(f"budget {b:g} is out of range: a budget is the keep_ratio, a number in (0, 1] "
                              "(1.0 keeps every token), e.g. --budgets 0.75,0.5")
        out.append(b)
    if not out:
        raise BudgetError("no budgets given, e.g. --budgets 0.75,0.5")
    return out


# ---------------------------------------------------------------------------- pieces
def _fingerprint(model: nn.Module) -> str:
    """Hash of the weights, so cached features of another checkpoint are never reused."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _cache_path(cfg: ViTBenchConfig, model: nn.Module, data: ViTData) -> Path | None:
    if not cfg.cache or data.cache_key is None:
        return None
    from ..assets.dinov2 import default_cache_dir

    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else default_cache_dir()
    name = f"{cfg.model_id}-{_fingerprint(model)}-{data.cache_key}-v{FEATURE_CACHE_VERSION}.pt"
    return root / "bench-features" / name


def train_features(cfg: ViTBenchConfig, model: nn.Module, data: ViTData, bar: Callable | None = None,
                   log: Callable[[str], None] = print) -> tuple[Tensor, bool]:
    """Full-model train features, from the disk cache when present. Returns (features, from_cache)."""
    path = _cache_path(cfg, model, data)
    n = len(data.train_pixels)
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["features"].shape[0] == n and torch.equal(saved["labels"], data.train_labels.cpu()):
                log(f"train features: cached {path}")
                return saved["features"], True
        except Exception as e:  # a broken file is recomputed, not fatal
            log(f"train features: ignoring unreadable cache {path} ({e})")
    with bar(n, "train features (full model)") as b:
        feats = extract_features(model, data.train_pixels, cfg.batch_size, cfg.device, on_batch=b.update)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"features": feats, "labels": data.train_labels.cpu()}, tmp)
        tmp.replace(path)
        log(f"train features: cached to {path}")
    return feats, False


class _StatsAverager:
    """Batch-size-weighted mean of a handle's per-forward stats over the test batches."""

    def __init__(self, handle):
        self.handle, self.n = handle, 0
        self.flops = self.flops_full = self.scoring = 0.0
        self.tokens: list[float] = []
        self.mlp_tokens: list[float] = []

    def __call__(self):
        s = self.handle.stats
        b = s.batch_size
        self.n += b
        self.flops += s.flops * b
        self.flops_full += s.flops_full * b
        self.scoring += s.scoring_flops * b
        self.tokens = _add(self.tokens, s.tokens_per_layer, b)
        self.mlp_tokens = _add(self.mlp_tokens, s.mlp_tokens_per_layer, b)

    def as_row(self) -> dict:
        n = max(self.n, 1)
        tokens = [t / n for t in self.tokens]
        mlp = [t / n for t in self.mlp_tokens]
        return {"gflops": self.flops / n / 1e9, "gflops_full": self.flops_full / n / 1e9,
                "flops_ratio": self.flops / self.flops_full if self.flops_full else 1.0,
                "scoring_gflops": self.scoring / n / 1e9, "final_tokens": mlp[-1] if mlp else None,
                "tokens_per_layer": tokens, "mlp_tokens_per_layer": mlp}


def _add(acc: list[float], values: Sequence[float], w: float) -> list[float]:
    if not acc:
        return [v * w for v in values]
    return [a + v * w for a, v in zip(acc, values)]


def _full_stats(model: nn.Module, pixels: Tensor, device) -> dict:
    """FLOPs and tokens of the unreduced model, by the library's own accounting.

    Attaches any encoder method at keep_ratio=1.0 (by contract it reduces nothing) for one
    forward of one image, so the full row is counted exactly like the reduced rows.
    """
    import tokenreduce

    infos = [i for i in tokenreduce.list_methods("encoder") if not i.needs_calibration]
    plain = [i.name for i in infos if not i.signals] or [i.name for i in infos]
    method = tokenreduce.get_method("random" if "random" in plain else plain[0], keep_ratio=1.0)
    with torch.inference_mode(), tokenreduce.apply(model, method) as h:
        model(pixel_values=pixels[:1].to(device))
        avg = _StatsAverager(h)
        avg()
    row = avg.as_row()
    row["scoring_gflops"] = 0.0
    return row


def _timing_batch(pixels: PixelSource, batch_size: int) -> Tensor:
    x = pixels[0:batch_size]
    while x.shape[0] < batch_size:  # fewer test images than one batch: repeat them
        x = torch.cat([x, x[: batch_size - x.shape[0]]])
    return x


def _method_params(method) -> dict:
    params = {k: v for k, v in vars(method).items() if not k.startswith("_") and k != "budget"}
    return to_jsonable(params)


def _environment(cfg: ViTBenchConfig) -> dict:
    import transformers

    import tokenreduce

    return {"device": cfg.device, "dtype": "float32", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenreduce": tokenreduce.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}


class _NoBar:
    def __init__(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bar_factory(progress: bool):
    if not progress:
        return lambda total, desc: _NoBar()
    from tqdm.auto import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr,
                                    dynamic_ncols=True)


# ---------------------------------------------------------------------------- runner
def run_vit_bench(cfg: ViTBenchConfig | None = None, model: nn.Module | None = None, data: ViTData | None = None,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows (full model first) and, if ``cfg.out``, writes the report.

    ``model``: a transformers vision encoder whose output has ``pooler_output`` (default:
    DINOv2-S from `tokenreduce.assets`). ``data``: a `ViTData` (default: `load_vit_data`).
    """
    import tokenreduce

    cfg = cfg or ViTBenchConfig()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    names = check_methods(cfg.methods if cfg.methods is not None else encoder_method_names())
    budgets = check_budgets(cfg.budgets)
    for key in ("n_train", "n_test", "batch_size", "image_size", "timing_batches"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    # Build every method first, so a bad parameter fails before minutes of feature extraction.
    runs = [(n, b, tokenreduce.get_method(n, keep_ratio=b)) for n in names for b in budgets]
    bar = _bar_factory(progress)
    t_start = time.perf_counter()

    if model is None:
        from ..assets import load_dinov2_small

        model = load_dinov2_small(cache_dir=cfg.cache_dir)
    model = model.to(cfg.device).eval()
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if patch and cfg.image_size % patch:
        raise ValueError(f"image-size {cfg.image_size} is not a multiple of the model's patch size {patch}")
    data = data or load_vit_data(cfg.n_train, cfg.n_test, cfg.image_size, cfg.seed)

    env = _environment(cfg)
    common = {"bench": "vit", "model": cfg.model_id, "dataset": data.name, "batch_size": cfg.batch_size,
              "image_size": cfg.image_size, "n_train": len(data.train_pixels), "n_test": len(data.test_pixels),
              "n_photos": int(data.photo_pixels.shape[0]), "seed": cfg.seed, "timing_batches": cfg.timing_batches,
              "knn": f"k={cfg.knn_k}, cosine, exp(sim/0.07)-weighted votes",
              "probe": "multinomial logistic regression, centred then L2-normalised features, L-BFGS, "
                       f"wd={cfg.probe_weight_decay:g}",
              **env}

    jsonl = None
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        jsonl = out / "results.jsonl"
        jsonl.write_text("")  # rows are appended as they finish, so an interrupted run keeps them

    feats_train, cached = train_features(cfg, model, data, bar, log)
    knn = KNNClassifier(k=cfg.knn_k).fit(feats_train, data.train_labels)
    probe = LinearProbe(weight_decay=cfg.probe_weight_decay, seed=cfg.seed).fit(feats_train, data.train_labels)
    timing_batch = _timing_batch(data.test_pixels, cfg.batch_size).to(cfg.device)
    photos = data.photo_pixels.to(cfg.device)
    rows: list[dict] = []

    def finish(row: dict):
        row.update(common)
        row["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        rows.append(row)
        if jsonl is not None:
            write_jsonl([row], jsonl, append=True)

    # --- the full model
    t0 = time.perf_counter()
    with bar(len(data.test_pixels), "test features (full model)") as b:
        feats_full = extract_features(model, data.test_pixels, cfg.batch_size, cfg.device, on_batch=b.update)
    eval_s = time.perf_counter() - t0
    photos_full = extract_features(model, photos, cfg.batch_size, cfg.device)
    # the full row's fidelity comes from a second forward, so a leftover patch or a
    # non-deterministic kernel would show as < 1
    photos_again = extract_features(model, photos, cfg.batch_size, cfg.device)
    full = {"method": FULL, "budget": 1.0, "params": {}, "method_repr": "full model",
            "knn_acc": knn.score(feats_full, data.test_labels), "probe_acc": probe.score(feats_full, data.test_labels),
            "probe_train_acc": probe.score(feats_train, data.train_labels),
            "fidelity": fidelity(photos_again, photos_full), "eval_s": eval_s, "calib_s": None,
            "train_features_cached": cached}
    full.update(_full_stats(model, photos, cfg.device))
    def full_forward():
        with torch.inference_mode():
            model(pixel_values=timing_batch)

    full_times: list[float] = []  # every timed full-model batch of the run
    if cfg.timing:
        log("timing the full model")
        t = measure_throughput(full_forward, timing_batch.shape[0], cfg.timing_batches, warmup=1, device=cfg.device)
        full_times += t.times
        full.update(_timing_fields(t, t))
    finish(full)

    # --- each (method, budget)
    for name, budget, method in runs:
        row = {"method": name, "budget": budget, "params": _method_params(method), "method_repr": repr(method),
               "calib_s": None}
        if type(method).info().needs_calibration:
            calib = [data.train_pixels[i:min(i + cfg.calib_batch, cfg.calib_images)].to(cfg.device)
                     for i in range(0, min(cfg.calib_images, len(data.train_pixels)), cfg.calib_batch)]
            t0 = time.perf_counter()
            method.calibrate(model, calib)
            row["calib_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with tokenreduce.apply(model, method) as h:
            avg = _StatsAverager(h)
            with bar(len(data.test_pixels), f"{name} @ {budget:g}") as b:
                feats = extract_features(model, data.test_pixels, cfg.batch_size, cfg.device, on_batch=b.update,
                                         after_forward=avg)
            row["eval_s"] = time.perf_counter() - t0
            row.update(avg.as_row())
            row["fidelity"] = fidelity(extract_features(model, photos, cfg.batch_size, cfg.device), photos_full)
        row["knn_acc"] = knn.score(feats, data.test_labels)
        row["probe_acc"] = probe.score(feats, data.test_labels)
        if cfg.timing:
            def reduced_forward(method=method):  # attaching costs ~0.4 ms, nothing next to a batch
                with torch.inference_mode(), tokenreduce.apply(model, method):
                    model(pixel_values=timing_batch)

            ref, t = measure_paired(full_forward, reduced_forward, timing_batch.shape[0], cfg.timing_batches,
                                    warmup=1, device=cfg.device)
            full_times += ref.times
            row.update(_timing_fields(t, ref))
            row["full_img_per_s_paired"] = ref.items_per_s
        log(f"{name} @ {budget:g}: probe {row['probe_acc']:.3f}, kNN {row['knn_acc']:.3f}, "
            f"fidelity {row['fidelity']:.4f}, GFLOPs {row['gflops']:.2f}"
            + (f", {row['img_per_s']:.1f} img/s, speedup {row['speedup']:.2f}" if cfg.timing else ""))
        finish(row)

    if cfg.timing:
        # the full row: every full-model batch timed in the run, pooled
        pooled = Timing(items=timing_batch.shape[0], times=full_times, peak_mem_mb=full["peak_mem_mb"],
                        mem_kind=full["mem_kind"])
        full.update(_timing_fields(pooled, pooled))
        paired = [r["full_img_per_s_paired"] for r in rows if "full_img_per_s_paired" in r] or [pooled.items_per_s]
        full["full_img_per_s_min"], full["full_img_per_s_max"] = min(paired), max(paired)
    elapsed = time.perf_counter() - t_start
    for r in rows:
        r["run_s"] = elapsed
    if cfg.out is not None:
        write_jsonl(rows, jsonl)  # rewrite: run_s, and the full row's timing pooled over the whole run
        write_vit_report(rows, cfg.out)
    return rows


def _timing_fields(t: Timing, ref: Timing) -> dict:
    speedup = t.items_per_s / ref.items_per_s
    return {"img_per_s": t.items_per_s, "ms_per_img": t.ms_per_item, "speedup": speedup, "time_ratio": 1.0 / speedup,
            "batch_times_s": t.times, "peak_mem_mb": t.peak_mem_mb, "mem_kind": t.mem_kind}


# ---------------------------------------------------------------------------- report
def vit_columns(rows: Sequence[dict]) -> list[Column]:
    kinds = {r.get("mem_kind") for r in rows if r.get("mem_kind")}
    mem = kinds.pop() if len(kinds) == 1 else "peak memory (MB)"
    return [
        Column("method"), Column("budget", fmt=".2f"),
        Column("knn_acc", "kNN acc", ".3f"), Column("probe_acc", "probe acc", ".3f"),
        Column("fidelity", "fidelity (cos)", ".4f"),
        Column("gflops", "GFLOPs/img", ".3f"), Column("flops_ratio", "FLOPs ratio", ".3f"),
        Column("scoring_gflops", "scoring GFLOPs", ".4f"), Column("final_tokens", "tokens@last", ".1f"),
        Column("img_per_s", "img/s", ".2f"), Column("ms_per_img", "ms/img", ".1f"),
        Column("speedup", "speedup", ".2f"), Column("peak_mem_mb", mem, ".0f"),
        Column("calib_s", "calib s", ".2f"),
    ]


def _sorted(rows: Sequence[dict]) -> list[dict]:
    return sort_rows(rows, first=lambda r: r.get("method") == FULL, keys=("method", "-budget"))


def vit_table(rows: Sequence[dict]) -> str:
    rows = _sorted(rows)
    return markdown_table(rows, vit_columns(rows))


def write_vit_report(rows: Sequence[dict], out: str | Path) -> dict[str, Path]:
    """``results.md`` and ``pareto.png`` under ``out`` (``results.jsonl`` is written by the runner)."""
    from .plot import Panel, pareto_plot

    out = Path(out)
    rows = _sorted(rows)
    r0 = rows[0]
    notes = [
        f"Model {r0.get('model')}, {r0.get('dataset')}: {r0.get('n_train')} train / {r0.get('n_test')} test images "
        f"(class-balanced, seed {r0.get('seed')}), {r0.get('image_size')} px; fidelity on {r0.get('n_photos')} photos.",
        f"Classifiers fitted once on the full model's train features: kNN ({r0.get('knn')}); "
        f"probe ({r0.get('probe')}).",
        "budget = keep_ratio (mean over blocks of tokens each MLP sees / input tokens); GFLOPs are analytic, per "
        "image, encoder blocks only, scoring included.",
        f"Timing: batch {r0.get('batch_size')}, {r0.get('device')}, {r0.get('threads')} threads, median of "
        f"{r0.get('timing_batches')} batches after 1 warm-up; speedup = img/s / full-model img/s, the full model "
        "timed alternately with each method, batch by batch (the full row pools all its timed batches).",
    ]
    if r0.get("full_img_per_s_min"):
        notes.append(f"Full model img/s across the run: {r0['full_img_per_s_min']:.2f} to "
                     f"{r0['full_img_per_s_max']:.2f} (machine load drift; the paired speedups cancel most of it).")
    if r0.get("mem_kind", "").startswith("peak RSS"):
        notes.append("Memory: peak RSS delta, sampled — process resident memory sampled every 2 ms during the timed "
                     "forwards, minus the baseline just before them; a coarse CPU measure.")
    notes.append(f"torch {r0.get('torch')}, transformers {r0.get('transformers')}, tokenreduce "
                 f"{r0.get('tokenreduce')}; {r0.get('timestamp')}; run {r0.get('run_s', 0):.0f} s.")
    md = write_markdown(rows, vit_columns(rows), out / "results.md", title="tokenreduce bench vit", notes=notes)
    png = pareto_plot(rows, out / "pareto.png", y="probe_acc", ylabel="linear-probe accuracy",
                      panels=[Panel("gflops", "GFLOPs / image (analytic)"),
                              Panel("time_ratio", "measured time / full model's (paired, same load)")],
                      is_reference=lambda r: r.get("method") == FULL, label=lambda r: "full model" if
                      r.get("method") == FULL else r["method"], annotate="budget",
                      title=f"{r0.get('model')} on {r0.get('dataset')}")
    return {"jsonl": out / "results.jsonl", "md": md, "png": png}
