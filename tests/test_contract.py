"""Registry-driven contract tests: every registered method keeps the same five promises.

`CONTRACT` holds one row per registered method (the tiny model it runs on, a reducing
configuration, its set-up, and where a promise does not apply, why). Every test is
parametrized over `tokenreduce.list_methods()`, so a method registered later is covered
automatically, and one without a row fails until a row is added here.

A row may add variants (further configurations or models, test ids ``name+variant``). A
contract the current code breaks is listed in `KNOWN_FAILURES` with its reason and runs as a
strict xfail, so a fix shows up as XPASS and the entry must go.

The promises (README "How it attaches" / "Budgets", `core/method.py`, `core/budget.py`):

1. ``keep_ratio=1.0`` reduces nothing: outputs bit-identical to the model without the method
   (encoder: every output tensor; kv-cache / decoder: prefill logits, the cache's keys and
   values, greedy ``generate`` on one prompt and on a left-padded batch).
2. Everything is undone on exit, also on an exception (after a forward, or raised in the
   middle of one): the same modules, classes, instance attributes, hooks, configs and
   parameters, and bit-identical outputs; a forward aborted mid-way leaves the attachment
   clean for the next one.
3. A batch equals its samples one at a time (encoder to 1e-5, as tests/test_attach.py;
   kv-cache / decoder: the same greedy tokens for a left-padded batch of prompts of different
   lengths), unless the row documents why not.
4. An attached method that never fires raises `NeverFiredError`: always when the attached
   model does not run at all, and for a configuration that cannot fire on the row's model
   where the method has one.
5. The budget means what it says: encoder: mean tokens per block MLP / input tokens is
   ``keep_ratio`` within the row's tolerance; kv-cache: ``floor(n * keep_ratio)`` entries per
   sample and layer; decoder (prompt filtering): ``floor(n * keep_ratio)`` prompt tokens;
   connector: ``floor(n * keep_ratio)`` visual tokens per image (pooling: its largest grid within
   that); in-LLM: visual tokens kept averaged over the layers within one token of ``keep_ratio``.

Visual-token rows (``vlm``) run on the tiny VLMs of tiny_vlm.py with image prompts: promise 1
compares logits and greedy ``generate`` (one prompt, a left-padded batch), promise 2 aborts in the
language model's last layer, promise 3 compares a left-padded batch of three image prompts with
each alone under ``generate``.

Only the public API and the tiny models of conftest.py / tiny_lm.py are used.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import IMAGE, main_output, pixels, tiny
from tiny_lm import greedy, left_pad, prompt, tiny_lm
from tiny_vlm import one, tiny_vlm, vlm_batch
from torch import nn
from transformers import DynamicCache

import tokenreduce as tr

HOW_TO_ADD = "add a row to CONTRACT in tests/test_contract.py"


# ---------------------------------------------------------------------------- models and set-up
def vision(family: str) -> Callable[[], nn.Module]:
    """A tiny random encoder of conftest (112 px, 14 px patches: 64 patches + prefix, 4 blocks)."""
    return functools.partial(tiny, family)


def sharpened_clip(factor: float = 32.0) -> nn.Module:
    """conftest's tiny CLIP with every attention's Q and K weights scaled by ``factor``: random tiny weights attend
    almost uniformly ([CLS] entropy ~0.9995), trained towers do not; a method whose counts follow the [CLS]
    attention's entropy (flowcut) then drops tokens before its last block, and per image."""
    model = tiny("clip")
    for layer in model.encoder.layers:
        layer.self_attn.q_proj.weight.data *= factor
        layer.self_attn.k_proj.weight.data *= factor
    return model


def lm(arch: str, layers: int = 2) -> Callable[[], nn.Module]:
    """A tiny random causal LM of tiny_lm (4 query heads, 2 KV heads, vocabulary 128)."""
    return functools.partial(tiny_lm, arch, layers=layers)


def varied_images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Images of varying detail (smooth fields of a few cells plus some noise): DyMU merges a different number of
    tokens in each, so its per-image counts really differ and the batch is padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        cells = 2 + (i + seed) % 4
        field_ = torch.randn(1, 3, cells, cells, generator=g)
        smooth = nn.functional.interpolate(field_, size=IMAGE, mode="bilinear", align_corners=False)[0]
        out.append(smooth + 0.25 * ((i + seed) % 3) * torch.randn(3, IMAGE, IMAGE, generator=g))
    return torch.stack(out)


def dymu_calibration_batches() -> list[torch.Tensor]:
    """Three batches of four varied images."""
    return [varied_images(4, seed) for seed in range(10, 13)]


def calibrate_dymu(method, model) -> None:
    tr.calibrate(method, model, dymu_calibration_batches())


def calibrate_a2ats(method, model) -> None:
    """A²ATS's codebooks from a short random token stream (256 tokens, 2 chunks)."""
    tr.calibrate(method, model, prompt(256, seed=7)[0], chunk_size=128, iters=20)


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    """How one method is held to the contract."""

    model: Callable[[], nn.Module]  # a fresh tiny model (the same weights at every call)
    params: dict  # native parameters of the reducing configuration, besides keep_ratio
    keep_ratio: float = 0.5  # the reducing budget
    setup: Callable | None = None  # (method, model) -> None, e.g. calibration, before attaching
    # promise 3 ("deterministic" per sample): True, or why a batch differs from its samples (the test is skipped)
    batch_invariant: bool | str = True
    batch_atol: float = 1e-5  # encoder: per-sample outputs of a batch vs. one at a time
    padded: bool = False  # encoder: per-image token counts, the batch is padded (compare each image's real tokens)
    images: Callable[..., torch.Tensor] = pixels  # encoder inputs (batch, seed)
    # promise 4: get_method kwargs of a configuration that cannot fire on the row's model, or why none exists
    never_fires: dict | str = ""
    # promise 5. kv-cache rows: "" (floor(n * keep_ratio) per sample at every layer), "layers-mean" (per-layer
    # budgets whose mean over the layers is exact), "retrieval" (the whole cache stays; floor(n * keep_ratio)
    # entries retrieved per query head and decoding step)
    budget: str = ""
    # encoder rows: |mean MLP tokens / input tokens - keep_ratio| allowed, why that much, and on which images
    budget_tol: float = 0.0
    budget_why: str = ""
    budget_images: Callable[[], list[torch.Tensor]] | None = None  # default: one batch of two of ``images``
    # further configurations held to the same contract, as test ids ``name+variant``: variant -> Row fields to
    # override (``params`` are merged into the row's)
    variants: dict = field(default_factory=dict)
    vlm: str = ""  # a visual-token method: the tiny_vlm family its model is (inputs: image prompts)
    # methods composed ahead of it in every apply (fresh each time), for a method that reads another stage's output
    ahead: Callable[[], tuple] | None = None


ALWAYS_FIRES_KV = ("a kv-cache method compresses at every prefill that runs through the attached decoder; the only "
                   "silent case is a forward that skips the decoder (test_never_fired_when_its_model_does_not_run)")
ALWAYS_FIRES_ENC = ("plans at every block of any encoder it attaches to (no layer selection), so it fires on every "
                    "forward that runs the encoder; only a forward that skips the encoder is silent")
MERGE_STEP = ("keep_ratio solves an integer r per block (ToMe's schedule, nearest value): one step of r moves the "
              "mean by (1+2+3+4)/4/65 = 0.038 on 4 blocks of 65 tokens, so the nearest r is within half a step")

GEMMA3 = lm("gemma3", layers=6)


def vlm(family: str) -> Callable[[], nn.Module]:
    """A tiny random VLM of tiny_vlm (3 tower blocks, 16 visual tokens per image, 3 language-model layers)."""
    return functools.partial(tiny_vlm, family)


ALWAYS_FIRES_VLM = ("reduces the visual tokens of every prompt that carries them; a text-only prompt is a documented "
                    "no-op counted in the stats (no_visual_forwards), and layers out of range are refused at attach")  # five sliding-window layers (left alone) and one global layer (compressed)

CONTRACT: dict[str, Row] = {
    # ------------------------------------------------------------------ encoder
    "tome": Row(vision("vit"), {}, never_fires=ALWAYS_FIRES_ENC, budget_tol=0.02, budget_why=MERGE_STEP),
    "token_transforming": Row(vision("siglip"), dict(k=2, temperature=0.1), never_fires=ALWAYS_FIRES_ENC,
                              budget_tol=0.02, budget_why=MERGE_STEP),
    "evit": Row(vision("dinov2_cls"), {}, never_fires=dict(keep_rate=0.5, locations=(10,)), budget_tol=0.02,
                budget_why="keep_ratio solves EViT's keep rate (a float), but ceil() of kept tokens at 3 of 4 blocks "
                           "plus the fused token leaves ~1 token per block of slack (1/65 = 0.015)"),
    "flowcut": Row(sharpened_clip, {}, budget_tol=0.04,
                   never_fires="scores from block 0 of any encoder it attaches to (no layer selection; block 0 runs "
                               "even with nothing to drop), so it fires on every forward that runs the encoder; only a "
                               "forward that skips the encoder is silent",
                   budget_why="FlowCut's counts follow each image's [CLS] attention entropy H; keep_ratio picks the "
                              "target whose schedule at H = 0 (the largest drops) meets it, and an image keeps more "
                              "(flowcut.py docstring). Here H ~ 1/3 at the drop blocks (4 heads, each concentrated on "
                              "its own token), so drops are ~(1 - H^2) = 0.89 of the largest: 0.531 measured"),
    "random": Row(vision("deit"), {}, never_fires=dict(keep_rate=0.5, locations=(10,)), budget_tol=0.02,
                  batch_invariant="draws its scores over the whole batch [B, N] from one seeded generator, so a "
                                  "sample's kept tokens depend on its place in the batch (not documented as "
                                  "per-sample, unlike kv_random)",
                  budget_why="EViT's schedule without the fused token: ceil() leaves ~1 token per block of slack"),
    "pool": Row(vision("clip"), {}, never_fires=dict(kernel=2, layer=10), budget_tol=0.04,
                budget_why="keep_ratio picks one block and a window k in {2, 3, 4} (nearest mean): on 4 blocks of "
                           "1 + 8x8 tokens the achievable means are a coarse grid; nearest to 0.5 is k=4 from block 2, "
                           "(2*65 + 2*5) / (4*65) = 0.538"),
    "mctf": Row(vision("clip_proj"), {}, never_fires=dict(r=2, layers=(10,)), budget_tol=0.02,
                budget_why="keep_ratio solves an integer r fused before blocks 1..3 (nearest value): one step of r "
                           "moves the mean by (1+2+3)/4/65 = 0.023"),
    "dymu": Row(vision("dinov2"), {}, setup=calibrate_dymu, images=varied_images, padded=True, batch_atol=1e-4,
                never_fires=ALWAYS_FIRES_ENC, budget_tol=0.05, budget_images=dymu_calibration_batches,
                variants={"dinov2_cls": dict(model=vision("dinov2_cls"))},  # a head pooling over all tokens
                budget_why="DToMe merges by calibrated thresholds: keep_ratio is met on average over the calibration "
                           "distribution, not per image (dymu.py docstring), so it is measured on the calibration "
                           "batches; each threshold is a mean over batches, so even there only approximately "
                           "(test_dymu allows 25 %)"),
    "tca": Row(vision("clip"), {}, never_fires=dict(drop_rate=0.1, locations=(10,)), budget_tol=0.01,
               budget_why="keep_ratio solves TCA's drop rate (a float), but each drop block's counts move in whole "
                          "tokens (ceil, and the centres and fused token): 0.504 measured on 4 blocks of 65 tokens"),
    # ------------------------------------------------------------------ kv-cache, at prefill
    "snapkv": Row(lm("llama"), dict(window_size=4), keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV,
                  variants={"gemma3": dict(model=GEMMA3)}),
    "pyramidkv": Row(lm("qwen2", layers=3), dict(window_size=4), keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV,
                     budget="layers-mean"),
    "streaming_llm": Row(lm("llama"), dict(n_sink=2), keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV,
                         variants={"rolling": dict(params=dict(rolling=True))}),
    "tova": Row(lm("qwen3"), {}, keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV),
    "knorm": Row(lm("mistral"), {}, keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV),
    "kvcrush": Row(lm("llama"), dict(base="snapkv", base_params=dict(window_size=4), crush_fraction=0.5),
                   keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV),
    "kv_random": Row(lm("phi3"), dict(seed=1), keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV),
    # ------------------------------------------------------------------ kv-cache, while decoding
    "h2o": Row(lm("llama"), {}, keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV, variants={"gemma3": dict(model=GEMMA3)}),
    "keyformer": Row(lm("llama"), dict(seed=3), keep_ratio=0.3, never_fires=ALWAYS_FIRES_KV,
                     batch_invariant="its Gumbel noise is drawn over the batch's padded layout, so a padded batch is "
                                     "a different draw than its samples alone (README, keyformer.py docstring)"),
    "a2ats": Row(lm("llama"), dict(codebook_size=16, window=4, sink=2), keep_ratio=0.3, setup=calibrate_a2ats,
                 never_fires=ALWAYS_FIRES_KV, budget="retrieval", variants={"gemma3": dict(model=GEMMA3)}),
    # ------------------------------------------------------------------ decoder (prompt filtering)
    "gemfilter": Row(lm("llama", layers=3), dict(layer=1), keep_ratio=0.3,
                     never_fires="filters every prompt prefilled through the attached decoder (its layer is checked "
                                 "in range at attach time); only a forward that skips the decoder is silent"),
    # ------------------------------------------------------------------ connector (visual tokens of a VLM)
    "fastervlm": Row(vlm("llava"), {}, vlm="llava", never_fires=ALWAYS_FIRES_VLM,
                     variants={"dinov2": dict(model=vlm("llava_dinov2"), vlm="llava_dinov2"),
                               "renumber": dict(params=dict(renumber=True))}),
    "visionzip": Row(vlm("llava_dinov2"), {}, vlm="llava_dinov2", never_fires=ALWAYS_FIRES_VLM),
    "vflowopt": Row(vlm("llava"), dict(a=2.0), vlm="llava", never_fires=ALWAYS_FIRES_VLM,
                    variants={"dinov2": dict(model=vlm("llava_dinov2"), vlm="llava_dinov2")}),
    "visual_random": Row(vlm("llava"), dict(seed=3), vlm="llava", never_fires=ALWAYS_FIRES_VLM),
    "visual_pool": Row(vlm("llava"), {}, keep_ratio=0.25, vlm="llava", never_fires=ALWAYS_FIRES_VLM),
    # ------------------------------------------------------------------ decoder (visual tokens inside the LLM)
    "fastv": Row(vlm("llava"), dict(k=1), keep_ratio=0.6, vlm="llava", never_fires=ALWAYS_FIRES_VLM),
    "pyramiddrop": Row(vlm("llava"), dict(layers=[1, 2]), keep_ratio=0.6, vlm="llava", never_fires=ALWAYS_FIRES_VLM,
                       variants={"previous": dict(params=dict(scores_from="previous"))}),
    "llavolta": Row(vlm("llava"), dict(layer=1), keep_ratio=0.6, vlm="llava", never_fires=ALWAYS_FIRES_VLM),
    # coarse_to_fine: the contract's prompts hold one image; grid=1 reads its 16 tokens as a coarse view + one tile of 8
    "coarse_to_fine": Row(vlm("llava"), dict(k=1, grid=1), keep_ratio=0.6, vlm="llava", never_fires=ALWAYS_FIRES_VLM,
                          variants={"previous": dict(params=dict(scores_from="previous"))}),
    "visiondrop": Row(vlm("llava"), dict(layers=[1, 2]), keep_ratio=0.6, vlm="llava", never_fires=ALWAYS_FIRES_VLM,
                      variants={"previous": dict(params=dict(scores_from="previous"))}),
    "flowcut_llm": Row(vlm("llava"), dict(layer=1), keep_ratio=0.6, vlm="llava", never_fires=ALWAYS_FIRES_VLM),
    # vflowopt_llm ranks by the tower scores vflowopt hands over (refused alone): vflowopt at keep_ratio=1.0 goes ahead,
    # itself bit-identical to the model (its own row), so every promise here is the in-LLM stage's
    "vflowopt_llm": Row(vlm("llava"), {}, keep_ratio=0.6, vlm="llava", never_fires=ALWAYS_FIRES_VLM,
                        ahead=lambda: (tr.get_method("vflowopt", keep_ratio=1.0, a=2.0),)),
    "sparsevlm": Row(vlm("llava"), dict(layers=[1, 2]), keep_ratio=0.6, vlm="llava", never_fires=ALWAYS_FIRES_VLM,
                     variants={"v2": dict(params=dict(version="v2"))}),
    # yopo: keep_ratio = K / L, K = round(keep_ratio L); 0.67 of 3 layers is K = 2 (every visual token deleted there)
    "yopo": Row(vlm("llava"), {}, keep_ratio=0.67, vlm="llava", never_fires=ALWAYS_FIRES_VLM,
                variants={"k1": dict(params=dict(), keep_ratio=0.34),
                          "all_parts": dict(params=dict(parts=("skip", "heads", "neighbour"),
                                                        heads=[[0, 1, 2, 3], [1], [0, 2]]))}),
}



def calibrate_dymu_vlm(method, model) -> None:
    """DyMU's tower thresholds on a VLM: three left-padded batches of image prompts (VLM inputs)."""
    tr.calibrate(method, model, [vlm_batch(model, "llava", VLM_TEXTS, seed=s) for s in range(20, 23)])


CONTRACT["dymu_vtu"] = Row(
    vlm("llava"), {}, keep_ratio=0.6, setup=calibrate_dymu_vlm, vlm="llava", never_fires=ALWAYS_FIRES_VLM,
    budget_tol=0.1,
    budget_why="the whole DyMU pipeline: its keep_ratio is DToMe's, met on average over the calibration prompts (dymu.py "
               "docstring), not per image; the tiny tower merges in one block (its select layer is block 1), where one "
               "merge moves the visual fraction by 1/16")

# Contracts the current code does not keep: (test, case id) -> precise reason. Each is a strict xfail: once the
# code is fixed the case XPASSes and fails, and its entry must go.
DYMU_HEAD = ("DyMU pads per-image token counts with zero rows, and Dinov2ForImageClassification's head averages "
             "sequence_output[:, 1:] over the padded width: a padded batch's logits differ from the same images one at "
             "a time (max |diff| ~0.01-0.02 here). The attachment masks padding in attention but not in the head's "
             "mean pooling")
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("batch", "dymu+dinov2_cls"): DYMU_HEAD,
}

INFOS = {i.name: i for i in tr.list_methods()}


def cases() -> list[str]:
    """Every registered method (rows or not), plus the rows' extra variants as ``name+variant``."""
    out = []
    for name in sorted(INFOS):
        out.append(name)
        row = CONTRACT.get(name)
        out += [f"{name}+{v}" for v in (row.variants if row else {})]
    return out


TESTS = ("identity", "restore", "batch", "never_fired_model", "never_fired_config", "budget")


def params_for(test: str) -> list:
    """The cases of one of `TESTS`, known failures marked."""
    assert test in TESTS
    return [pytest.param(c, id=c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(test, c)]))
            if (test, c) in KNOWN_FAILURES else pytest.param(c, id=c) for c in cases()]


@dataclass
class Case:
    name: str  # registry name
    row: Row  # the method's row, a variant's overrides applied

    @property
    def stage(self) -> str:
        return INFOS[self.name].stage

    def model(self) -> nn.Module:
        try:
            return self.row.model()
        except ImportError as e:  # a model class this transformers lacks: nothing to hold the method to
            pytest.skip(f"tiny model for {self.name} unavailable: {e}")

    def method(self, model, keep_ratio: float | None = None):
        """The configured method (reducing budget unless ``keep_ratio`` says otherwise), set up on ``model``."""
        ratio = self.row.keep_ratio if keep_ratio is None else keep_ratio
        m = tr.get_method(self.name, **self.row.params, keep_ratio=ratio)
        if self.row.setup is not None:
            self.row.setup(m, model)
        return m

    def attach(self, model, m):
        """``tr.apply(model, m)``, the row's ``ahead`` methods composed before ``m``."""
        return tr.apply(model, *(self.row.ahead() if self.row.ahead else ()), m)


def case(case_id: str) -> Case:
    name, _, variant = case_id.partition("+")
    row = CONTRACT.get(name)
    if row is None:
        pytest.fail(f"method {name!r} is registered but has no contract row: {HOW_TO_ADD}")
    if variant:
        over = dict(row.variants[variant])
        over["params"] = {**row.params, **over.get("params", {})}
        row = dataclasses.replace(row, **over, variants={})
    return Case(name, row)


# ---------------------------------------------------------------------------- inputs and runs
N, LENGTHS, NEW = 23, (23, 17, 30), 6  # one prompt, a left-padded batch of three; greedy tokens generated


def lm_batch():
    return left_pad([prompt(n, seed=10 + i)[0] for i, n in enumerate(LENGTHS)])


def prefill(model, ids, mask=None):
    """(logits, cache) of a prefill into a fresh DynamicCache."""
    cache = DynamicCache(config=model.config)
    out = model(ids, attention_mask=mask, past_key_values=cache)
    return out.logits, cache


def generate(model, ids, mask=None):
    """Greedy ``generate`` with every step's logits."""
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True)


def encoder_outputs(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------- exact-restore snapshot
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
              "_load_state_dict_pre_hooks")


def snapshot(model: nn.Module) -> dict:
    """Everything attaching may touch: which module objects sit where, their classes' forward, their instance
    attributes (keys and objects), hooks, configs (object, ``_attn_implementation``, values), parameters."""
    mods = dict(model.named_modules())
    configs = {n: m.config for n, m in mods.items() if hasattr(getattr(m, "config", None), "to_dict")}
    return dict(
        modules={n: m for n, m in mods.items()},
        classes={n: (type(m), type(m).forward) for n, m in mods.items()},
        attrs={n: dict(m.__dict__) for n, m in mods.items()},
        hooks={n: tuple(tuple(getattr(m, d, {}).keys()) for d in HOOK_DICTS) for n, m in mods.items()},
        configs={n: (c, c._attn_implementation, c.to_dict()) for n, c in configs.items()},
        params={k: (p, p.detach().clone()) for k, p in model.named_parameters()},
        buffers={k: b.clone() for k, b in model.named_buffers()},
    )


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # values without a plain truth value
        return False


def assert_restored(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now["modules"].keys() == before["modules"].keys()
    for n, m in before["modules"].items():
        assert now["modules"][n] is m, f"module {n!r} was replaced"
        assert now["classes"][n] == before["classes"][n], f"{n!r}: class or class forward changed"
        a, b = before["attrs"][n], now["attrs"][n]
        assert set(a) == set(b), f"{n!r}: instance attributes {sorted(set(a) ^ set(b))} added or left behind"
        changed = [k for k in a if not _same(a[k], b[k])]
        assert not changed, f"{n!r}: instance attributes {changed} are not the same objects/values"
        assert now["hooks"][n] == before["hooks"][n], f"{n!r}: hooks left behind"
    for n, (cfg, impl, values) in before["configs"].items():
        c, i, v = now["configs"][n]
        assert c is cfg and i == impl, f"{n!r}: config object or _attn_implementation ({impl!r} -> {i!r})"
        assert v == values, f"{n!r}: config values changed"
    for k, (p, value) in before["params"].items():
        assert now["params"][k][0] is p and torch.equal(now["params"][k][1], value), f"parameter {k!r}"
    assert now["buffers"].keys() == before["buffers"].keys()
    assert all(torch.equal(now["buffers"][k], v) for k, v in before["buffers"].items())


class Bystander(nn.Module):
    """Holds the attached model but runs only another module: the attached model never runs."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.other = inner, nn.Linear(4, 4)

    def forward(self, x):
        return self.other(x)


# ---------------------------------------------------------------------------- the registry is covered
@pytest.mark.parametrize("name", sorted(INFOS))
def test_every_registered_method_has_a_row(name):
    if name not in CONTRACT:
        pytest.fail(f"method {name!r} ({INFOS[name].stage}) is registered but has no contract row: {HOW_TO_ADD}")


def test_every_row_is_a_registered_method():
    stale = sorted(set(CONTRACT) - set(INFOS))
    assert not stale, f"CONTRACT rows for unregistered methods: {stale}; remove them from tests/test_contract.py"
    assert all(isinstance(r.never_fires, dict) or r.never_fires for r in CONTRACT.values()), \
        "a row without a never-firing configuration must say why (a string)"
    assert all(r.batch_invariant is True or (isinstance(r.batch_invariant, str) and r.batch_invariant)
               for r in CONTRACT.values()), "batch_invariant is True or the reason why not"
    unknown = sorted(k for k in KNOWN_FAILURES if k[0] not in TESTS or k[1] not in cases())
    assert not unknown, f"KNOWN_FAILURES entries for no test case: {unknown}"


# ---------------------------------------------------------------------------- 1. keep_ratio=1.0 is the model
@pytest.mark.parametrize("cid", params_for("identity"))
def test_keep_ratio_one_is_bit_identical(cid):
    c = case(cid)
    model = c.model()
    if c.row.vlm:
        return _vlm_identity(c, model)
    with torch.no_grad():
        if c.stage == "encoder":
            x = c.row.images(2, 0)
            ref = encoder_outputs(model(x))
            m = c.method(model, keep_ratio=1.0)
            with tr.apply(model, m) as h:
                out = encoder_outputs(model(x))
            assert out.keys() == ref.keys()
            for k in ref:
                assert torch.equal(out[k], ref[k]), f"{k} differs at keep_ratio=1.0"
            assert h.stats.flops_ratio == 1.0
            return
        ids, (bids, bmask) = prompt(N), lm_batch()
        ref_logits, ref_cache = prefill(model, ids)
        ref_tokens, ref_batch = generate(model, ids), generate(model, bids, bmask)
        m = c.method(model, keep_ratio=1.0)
        with tr.apply(model, m):
            logits, cache = prefill(model, ids)
            tokens, batch = generate(model, ids), generate(model, bids, bmask)
    assert torch.equal(logits, ref_logits), "prefill logits differ at keep_ratio=1.0"
    assert len(cache.layers) == len(ref_cache.layers)
    for i, (a, b) in enumerate(zip(cache.layers, ref_cache.layers)):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), f"layer {i}'s cache differs"
    for what, out, ref in (("one prompt", tokens, ref_tokens), ("a left-padded batch", batch, ref_batch)):
        assert torch.equal(out.sequences, ref.sequences), f"greedy generate on {what} differs at keep_ratio=1.0"
        for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
            assert torch.equal(a, b), f"generate on {what}: step {step}'s logits differ at keep_ratio=1.0"


# ---------------------------------------------------------------------------- 2. restored after an exception
class Boom(Exception):
    pass


def last_block(model: nn.Module) -> nn.Module:
    """The last block of the model's (first) block list: encoder blocks or decoder layers."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    return lists[0][-1]


def boom_at(call: int):
    """A forward hook that raises `Boom` on its ``call``-th call (1 = the first)."""
    seen = [0]

    def hook(module, args, output):
        seen[0] += 1
        if seen[0] == call:
            raise Boom()

    return hook


def reduced(stats) -> bool:
    """Whether the last forward really reduced something (whatever the stage's stats hold)."""
    if hasattr(stats, "kept_visual_fraction"):  # visual tokens inside the language model
        return stats.kept_visual_fraction < 1.0
    if getattr(stats, "prompt_tokens", 0):  # prompt filtering and the connector
        return stats.kept_tokens < stats.prompt_tokens
    if stats.kv_kept_per_layer:  # kv-cache eviction
        return sum(stats.kv_kept_per_layer) < sum(stats.kv_entries_per_layer)
    if stats.mlp_tokens_per_layer:  # encoder
        return stats.mlp_tokens_per_layer[-1] < stats.tokens_per_layer[0]
    return getattr(stats, "attended_fraction", 1.0) < 1.0  # retrieval


@pytest.mark.parametrize("cid", params_for("restore"))
def test_restored_exactly_after_an_exception(cid):
    """An exception inside ``with apply(...)`` (after a forward, and one raised in the middle of a forward) leaves
    the model exactly as it was; a forward aborted mid-way leaves no state behind in the attachment either."""
    c = case(cid)
    model = c.model()
    enc = c.stage == "encoder"
    if c.row.vlm:
        inputs = one(vlm_batch(model, c.row.vlm, VLM_TEXTS), 0)

    def run():
        if c.row.vlm:
            return {"tokens": vlm_greedy(model, inputs, 3)}
        return encoder_outputs(model(x)) if enc else {"tokens": greedy(model, x, new=3)}

    def logits():
        return model(**inputs).logits if c.row.vlm else model(x).logits

    # a VLM's language model (its last decoder layer), not its tower
    target = last_block(model.model.language_model) if c.row.vlm else last_block(model)
    with torch.no_grad():
        x = c.row.images(2, 1) if enc else prompt(N)
        ref = encoder_outputs(model(x)) if enc else {"logits": logits()}
        ref_tokens = None if enc else (vlm_greedy(model, inputs, NEW) if c.row.vlm else greedy(model, x, new=NEW))
        m = c.method(model)  # set-up (calibration) may run the model through its own apply first
        with c.attach(model, m) as h:
            ref_reduced = run()
        before = snapshot(model)
        # aborted in the middle of a forward: in the last block of the encoder, in the last decoder layer at the
        # prefill and at the first decoding step
        for call in ((1,) if enc else (1, 2)):
            with pytest.raises(Boom), c.attach(model, m):
                hook = target.register_forward_hook(boom_at(call))
                try:
                    run()
                finally:
                    hook.remove()
            assert_restored(model, before)
        # raised after forwards, the same attachment first going on after an aborted one
        with pytest.raises(Boom), c.attach(model, m) as h:
            hook = target.register_forward_hook(boom_at(1))
            try:
                with pytest.raises(Boom):
                    run()
            finally:
                hook.remove()
            again = run()
            assert reduced_visual(h) if c.row.vlm else reduced(h.stats), "the reducing configuration reduced nothing"
            raise Boom()
        assert again.keys() == ref_reduced.keys()
        for k in ref_reduced:
            assert torch.equal(again[k], ref_reduced[k]), f"after an aborted forward, {k} differs from a clean run"
        assert_restored(model, before)
        if enc:
            out = encoder_outputs(model(x))
            assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)
        else:
            assert torch.equal(logits(), ref["logits"])
            again = vlm_greedy(model, inputs, NEW) if c.row.vlm else greedy(model, x, new=NEW)
            assert torch.equal(again, ref_tokens)
    assert_restored(model, before)


# ---------------------------------------------------------------------------- 3. a batch is its samples
@pytest.mark.parametrize("cid", params_for("batch"))
def test_batch_equals_samples_one_at_a_time(cid):
    c = case(cid)
    if c.row.batch_invariant is not True:
        pytest.skip(c.row.batch_invariant)
    model = c.model()
    if c.row.vlm:
        return _vlm_batch(c, model)
    with torch.no_grad():
        m = c.method(model)
        if c.stage == "encoder":
            x = c.row.images(3, 2)
            with tr.apply(model, m):
                batch = main_output(model(x))
                singles = [main_output(model(x[i:i + 1])) for i in range(len(x))]
            for i, s in enumerate(singles):
                k = s.shape[1]
                if not c.row.padded:
                    assert batch.shape[1] == k, (batch.shape, s.shape)
                err = (batch[i, :k] - s[0]).abs().max().item()
                assert err <= c.row.batch_atol, f"sample {i}: max |batch - alone| = {err:.3g}"
            if c.row.padded and batch.dim() == 3:  # the images really keep different counts: padding is exercised
                assert len({s.shape[1] for s in singles}) > 1, [s.shape for s in singles]
            return
        ids, mask = lm_batch()
        with tr.apply(model, m):
            out = greedy(model, ids, mask, new=NEW)
            singles = [greedy(model, ids[i:i + 1, ids.shape[1] - n:], new=NEW)[0] for i, n in enumerate(LENGTHS)]
    for i, s in enumerate(singles):
        assert torch.equal(out[i], s), f"sample {i} ({LENGTHS[i]} tokens): {out[i].tolist()} vs alone {s.tolist()}"


# ---------------------------------------------------------------------------- 4. never fired
@pytest.mark.parametrize("cid", params_for("never_fired_model"))
def test_never_fired_when_its_model_does_not_run(cid):
    c = case(cid)
    inner = c.model()
    m = c.method(inner)
    outer = Bystander(inner)
    before = snapshot(outer)
    with torch.no_grad(), pytest.raises(tr.NeverFiredError), c.attach(outer, m):
        outer(torch.zeros(1, 4))
    assert_restored(outer, before)


@pytest.mark.parametrize("cid", params_for("never_fired_config"))
def test_never_fired_configuration_raises(cid):
    c = case(cid)
    if isinstance(c.row.never_fires, str):
        pytest.skip(c.row.never_fires)
    model = c.model()
    m = tr.get_method(c.name, **c.row.never_fires)
    if c.row.setup is not None:
        c.row.setup(m, model)
    x = c.row.images(1, 3) if c.stage == "encoder" else prompt(N)
    with torch.no_grad():
        ref = main_output(model(x)) if c.stage == "encoder" else model(x).logits
        before = snapshot(model)
        with pytest.raises(tr.NeverFiredError), tr.apply(model, m):
            model(x)
        out = main_output(model(x)) if c.stage == "encoder" else model(x).logits
    assert torch.equal(out, ref)  # restored after the error
    assert_restored(model, before)


# ---------------------------------------------------------------------------- 5. the budget
def _encoder_budget(c: Case):
    """Mean over blocks of the tokens each block's MLP processed, over the input tokens (core/budget.py)."""
    model = c.model()
    m = c.method(model)
    batches = c.row.budget_images() if c.row.budget_images else [c.row.images(2, 4)]
    kept = []
    with torch.no_grad():
        n0 = model(batches[0], output_hidden_states=True).hidden_states[0].shape[1]  # tokens entering the encoder
        with tr.apply(model, m) as h:
            for x in batches:
                model(x)
                s = h.stats
                assert s.tokens_per_layer[0] == n0
                kept.append(sum(s.mlp_tokens_per_layer) / (len(s.mlp_tokens_per_layer) * n0))
    ratio = sum(kept) / len(kept)
    assert abs(ratio - c.row.keep_ratio) <= c.row.budget_tol, (
        f"mean MLP tokens / input tokens = {ratio:.4f}, keep_ratio {c.row.keep_ratio} "
        f"(tolerance {c.row.budget_tol}: {c.row.budget_why})")
    assert ratio < 1.0


def floor_budget(n: int, r: float) -> int:
    return math.floor(n * r + 1e-9)


def _kv_budget(c: Case):
    """floor(n * keep_ratio) entries per sample, layer and KV head after the prefill (core/method.py KVMethod), at
    every layer the method compresses (``stats.kv_layers``: sliding-window layers are left alone)."""
    model = c.model()
    r = c.row.keep_ratio
    m = c.method(model)
    want, want_batch = floor_budget(N, r), [floor_budget(n, r) for n in LENGTHS]
    per_layer = c.row.budget != "layers-mean"
    with torch.no_grad(), tr.apply(model, m) as h:
        _, cache = prefill(model, prompt(N))
        s = h.stats
        mine = list(s.kv_layers)
        assert mine, "no cache layer was compressed"
        sizes = [cache.layers[i].keys.shape[-2] for i in mine]
        assert s.kv_entries_per_layer == [float(N)] * len(mine)
        if per_layer:
            assert sizes == [want] * len(mine), f"physical entries per layer {sizes}, want floor({N} * {r}) = {want}"
            assert s.kv_kept_per_layer == [float(want)] * len(mine)
        else:
            assert sum(sizes) == want * len(mine) and len(set(sizes)) > 1, sizes
            assert sum(s.kv_kept_per_layer) == want * len(mine)
        # while decoding: a method that evicts during decoding stays at its budget, the others only append
        for t in range(1, 5):
            model(prompt(1, seed=100 + t), past_key_values=cache)
            now = [cache.layers[i].keys.shape[-2] for i in mine]
            grow = 0 if m.evicts_during_decode else t
            assert now == [k + grow for k in sizes], (t, now, sizes)
        # per sample of a left-padded batch
        ids, mask = lm_batch()
        batch_cache = DynamicCache(config=model.config)
        model(ids, attention_mask=mask, past_key_values=batch_cache)
        kept = h.stats.kv_kept_per_layer
        assert h.stats.kv_layers == mine
    mean = sum(want_batch) / len(want_batch)
    if per_layer:
        assert kept == pytest.approx([mean] * len(mine), rel=1e-6), (kept, want_batch)
        assert all(batch_cache.layers[i].keys.shape[-2] == max(want_batch) for i in mine)  # left-padded slots
    else:
        assert sum(kept) / len(mine) == pytest.approx(mean, rel=1e-6), (kept, want_batch)
    valid = [getattr(batch_cache.layers[i], "slot_valid", None) for i in mine]
    if all(v is not None for v in valid):  # real entries per sample, where the cache layer says
        per_sample = torch.stack([v.sum(-1) for v in valid])  # [L, B]
        if per_layer:
            assert per_sample.tolist() == [want_batch] * len(mine)
        else:
            assert per_sample.sum(0).tolist() == [w * len(mine) for w in want_batch]


def _retrieval_budget(c: Case):
    """The whole cache stays; floor(n * keep_ratio) entries are retrieved per query head per decoding step (n: the
    sample's real entries at that step), besides sink and window (a2ats.py)."""
    model = c.model()
    r = c.row.keep_ratio
    m = c.method(model)
    seen = []
    select = m.decode_selection

    def recording(k, query_w, codes, valid, scaling):
        selected, scores, picked = select(k, query_w, codes, valid, scaling)
        seen.append((k, valid.sum(-1), picked.sum(-1)))
        return selected, scores, picked

    m.decode_selection = recording
    ids, mask = lm_batch()
    with torch.no_grad(), tr.apply(model, m):
        cache = DynamicCache(config=model.config)
        greedy(model, ids, mask, new=NEW, past_key_values=cache)
    full = {k for k, _, _ in seen}
    assert full and len(seen) == (NEW - 1) * len(full), "not every decoding step of every full layer retrieved"
    for _, n, picked in seen:
        want = torch.floor(n.double() * r + 1e-9).long()
        assert (picked == want[:, None, None]).all(), (n.tolist(), picked.tolist())
    for layer in cache.layers:  # the full cache stays
        assert getattr(layer, "is_sliding", False) or layer.keys.shape[-2] == ids.shape[1] + NEW - 1


def _filter_budget(c: Case):
    """floor(n * keep_ratio) prompt tokens kept per sample, and so cache entries per layer (gemfilter.py)."""
    model = c.model()
    r = c.row.keep_ratio
    m = c.method(model)
    want = floor_budget(N, r)
    with torch.no_grad(), tr.apply(model, m) as h:
        _, cache = prefill(model, prompt(N))
        assert h.stats.prompt_tokens == N and h.stats.kept_tokens == want
        assert [len(k) for k in h.stats.kept_positions] == [want]
        assert [layer.keys.shape[-2] for layer in cache.layers] == [want] * len(cache.layers)
        ids, mask = lm_batch()
        model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config))
        assert [len(k) for k in h.stats.kept_positions] == [floor_budget(n, r) for n in LENGTHS]


@pytest.mark.parametrize("cid", params_for("budget"))
def test_budget_holds_its_documented_meaning(cid):
    c = case(cid)
    if c.row.vlm:
        _vlm_budget(c)
    elif c.stage == "encoder":
        _encoder_budget(c)
    elif c.stage == "decoder":
        _filter_budget(c)
    elif c.row.budget == "retrieval":
        _retrieval_budget(c)
    else:
        _kv_budget(c)


# ---------------------------------------------------------------------------- visual-token methods (VLM rows)
VLM_TEXTS = [(3, 5), (1, 2), (4, 7)]  # (text before, text after) the image of each sample of the batch


def vlm_greedy(model, inputs: dict, new: int) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=0)[:, -new:]


def _vlm_identity(c: Case, model) -> None:
    batch = vlm_batch(model, c.row.vlm, VLM_TEXTS)
    single = one(batch, 0)
    with torch.no_grad():
        ref = model(**single).logits
        ref_one, ref_batch = vlm_greedy(model, single, NEW), vlm_greedy(model, batch, NEW)
        with c.attach(model, c.method(model, keep_ratio=1.0)):
            out = model(**single).logits
            got_one, got_batch = vlm_greedy(model, single, NEW), vlm_greedy(model, batch, NEW)
    assert torch.equal(out, ref), "logits differ at keep_ratio=1.0"
    assert torch.equal(got_one, ref_one) and torch.equal(got_batch, ref_batch), "generate differs at keep_ratio=1.0"


def _vlm_batch(c: Case, model) -> None:
    batch = vlm_batch(model, c.row.vlm, VLM_TEXTS)
    with torch.no_grad(), c.attach(model, c.method(model)) as h:
        out = vlm_greedy(model, batch, NEW)
        assert reduced_visual(h), "the reducing configuration reduced nothing"
        singles = [vlm_greedy(model, one(batch, i), NEW)[0] for i in range(len(VLM_TEXTS))]
    for i, s in enumerate(singles):
        assert torch.equal(out[i], s), f"sample {i}: {out[i].tolist()} vs alone {s.tolist()}"


def reduced_visual(h) -> bool:
    """Whether a stage that counts visual tokens reduced them (a row's ``ahead`` stage may keep them all)."""
    for s in h.stats_by_stage.values():
        if hasattr(s, "kept_visual_tokens") and s.kept_visual_tokens < s.visual_tokens:
            return True
        if hasattr(s, "kept_visual_fraction") and s.kept_visual_fraction < 1.0:
            return True
    return False


def _vlm_budget(c: Case) -> None:
    """Connector: floor(n * keep_ratio) visual tokens kept per image (visual_pool: at most that, its grid's
    largest pooled partition); decoder: visual tokens kept, averaged over the layers, close to keep_ratio (each
    drop layer keeps floor(fraction * n))."""
    model = c.model()
    r = c.row.keep_ratio
    batch = vlm_batch(model, c.row.vlm, VLM_TEXTS)
    with torch.no_grad(), c.attach(model, c.method(model)) as h:
        model(**batch)
        s = h.stats_by_stage[c.stage]  # the method's own stage (a pipeline's tower stage comes first)
    n = s.visual_tokens
    assert n == 16
    if c.stage == "connector":
        want = floor_budget(16, r)
        assert s.kept_visual_tokens <= want and (s.kept_visual_tokens == want or c.name == "visual_pool"), \
            (s.kept_visual_tokens, want)
        assert s.kept_visual_tokens >= want / 2
        return
    tol = max(1.0 / n, c.row.budget_tol)  # floor: under a token (a row may document more: c.row.budget_why)
    assert abs(s.kept_visual_fraction - r) <= tol, (getattr(s, "visual_tokens_per_layer", None), r, c.row.budget_why)
