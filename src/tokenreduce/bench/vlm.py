"""``tokenreduce bench vlm``: visual-token methods on the mini-LLaVA, side by side with the full model.

For one task (``easyvqa`` or ``scenes``, `assets.vqa`, or ``largescene``, `assets.large_scene`: the
coarse view then the G x G tiles of a big canvas, form "multi"; held-out split) and every (method,
budget) cell — tower methods (FlowCut, DyMU's DToMe alone or with virtual unmerging: they leave
``round(budget x visual tokens per image)``; DyMU calibrated for each budget on the task's calibration
split), connector methods (FasterVLM, VisionZip, random, pooling), in-LLM methods (FastV, PyramidDrop)
and pipelines ``first+in_llm`` — the same questions are answered by greedy ``generate`` (batches of
left-padded prompts) and scored by their first word. Every table has the full model's row
(``method: "full"``) and the blind row (``"blind"``: the same questions without the image);
``largescene`` adds the oracle row ``"focus (oracle)"``: the full model on the coarse view and the
answer tile only, and for a method that records the tiles it chose (``coarse_to_fine``), how often
its first tile is the answer tile (``tile_accuracy``) and how often the answer tile is among them.

Columns: accuracy; visual tokens the language model processed (per layer for in-LLM methods,
their mean over layers — ``keep_ratio``'s meaning); analytic FLOPs per sample by stage (tower,
projector, language-model prefill with the methods' scoring counted) and their ratio to the
full model; the prefill time ratio to the full model, measured side by side on one batch
(`runner.PairedTimer`, with the spread of the per-pair ratios); decode tokens/s ratio (same
pairing, on generate's steps after the prefill); KV-cache bytes after the prefill; peak memory.
Pictures of the kept visual tokens over the image (``kept/``) for a few samples per method.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core.errors import BudgetError, StageError
from ..core.stats import vit_attention_flops, vit_mlp_flops
from ..runtime.prefill_filter import decoder_layer_flops
from .checkpoint import CalibrationStore, check_resumable
from .report import Column
from .runner import (
    as_methods,
    FULL,
    Cell,
    Grid,
    PairedTimer,
    SpreadColumn,
    Task,
    Unit,
    build_grid,
    check_attachable,
    check_keep_ratios,
    environment,
    environment_note,
    run_grid,
    spread_note,
    write_markdown_report,
)

BLIND = "blind"
FULL_NAME = "full"
FOCUS = "focus (oracle)"  # largescene: the full model on the coarse view + the answer tile
LARGE_SCENE = "largescene"
NEW_TOKENS = 3


def vlm_tasks() -> tuple[str, ...]:
    """The tasks of ``bench vlm``: `assets.vqa`'s and the large-scene task."""
    from ..assets.vqa import TASKS

    return (*TASKS, LARGE_SCENE)


@dataclass
class VLMBenchConfig:
    model: str = "minillava"
    task: str = "scenes"
    methods: Sequence[str] = ("fastervlm", "visionzip", "visual_random", "visual_pool", "fastv", "pyramiddrop")
    budgets: Sequence[float] = (0.5, 0.25, 0.1)
    n: int = 200
    batch_size: int = 16
    timing: bool = True
    timing_repeats: int = 3
    timing_batch: int = 8  # prompts in the timed batch (prefill and decode)
    pictures: int = 3
    seed: int = 0
    out: str | None = "results/vlm"
    method_params: dict = field(default_factory=dict)  # name -> extra get_method kwargs
    calib: int = 32  # questions of the task's calibration split for methods that need calibration (DyMU)
    schedule: Any = None  # a `core.schedule.LayerSchedule`: each listed in-LLM method also runs it (one extra row each)
    resume: bool = False  # go on with the results saved in out/runs.jsonl by an interrupted run with the same arguments


def in_llm_method_names() -> list[str]:
    """The registered methods that drop visual tokens inside the language model (`LayerDropMethod`s)."""
    from ..core.method import LayerDropMethod
    from ..core.registry import registered

    return sorted(n for n, cls in registered().items() if issubclass(cls, LayerDropMethod))


def tower_method_names() -> list[str]:
    """The registered methods that reduce in the vision tower with a budget of the patch tokens left for the language
    model (`Method.tokens_left_budget`: FlowCut, DyMU's DToMe, DyMU with virtual unmerging): ``bench vlm`` has them
    leave ``round(budget x visual tokens per image)``."""
    from ..core.registry import registered

    return sorted(n for n, cls in registered().items() if cls.tokens_left_budget(1, 2) is not None)


def vlm_method_names() -> list[str]:
    from ..core.registry import list_methods

    return tower_method_names() + [i.name for i in list_methods() if i.stage == "connector"] + in_llm_method_names()


def first_stage_method(name: str, fraction: float, per_image: int, params: dict | None = None):
    """A tower or connector method keeping ``fraction`` of each image's ``per_image`` visual tokens (a tower method:
    its `tokens_left_budget` for the rounded count, ``keep_ratio=1.0`` when that is all of them; a `BudgetError`
    if it is 0)."""
    import tokenreduce
    from ..core.registry import registered

    extra = dict(params or {})
    if name in tower_method_names() and fraction < 1:
        count = round(fraction * per_image)
        if count < 1:
            raise BudgetError(f"{name} would keep {fraction:g} x {per_image} = {fraction * per_image:.2f} visual "
                              f"tokens per image, under 1; give a larger budget")
        return tokenreduce.get_method(name, **registered()[name].tokens_left_budget(count, per_image), **extra)
    return tokenreduce.get_method(name, keep_ratio=fraction, **extra)


def schedule_method_names() -> list[str]:
    """The in-LLM methods that run any per-layer schedule alone (``--schedule``, `tokenreduce.search`): not those that
    rank by a connector method's scores (``needs_prior``: VFlowOpt's drops)."""
    from ..core.registry import registered

    return [n for n in in_llm_method_names() if registered()[n].runs_schedules and not registered()[n].needs_prior]


def check_schedule_methods(names: Sequence[str]) -> list[str]:
    """``--schedule`` runs in-LLM methods only: a `StageError` naming any other listed method."""
    in_llm = schedule_method_names()
    fixed = [n for n in names if n in in_llm_method_names() and n not in in_llm]
    if fixed:
        raise StageError(f"--schedule: {', '.join(fixed)} cannot run a per-layer schedule (no ranking of visual "
                         f"tokens); in-LLM methods that can: {', '.join(in_llm)}")
    other = [n for n in names if n not in in_llm]
    if other:
        raise StageError(f"--schedule gives a per-layer schedule to in-LLM methods ({', '.join(in_llm)}); "
                         f"{', '.join(other)} {'is a connector method' if len(other) == 1 else 'are connector methods'}"
                         f" with no layer schedule: list only in-LLM methods, e.g. --methods {in_llm[0]}")
    return list(names)


def schedule_label(name: str, schedule) -> str:
    """The table's method name of ``name`` running a loaded schedule: says it is the searched one."""
    return f"{name} (searched: {schedule.source.get('search') or 'given'})"


def prefill(model, inputs, method=None):
    """``generate``'s prefill: the whole prompt, the logits of the last position only (``method`` attached if given)."""
    import tokenreduce

    with torch.no_grad():
        if method is None:
            return model(**inputs, logits_to_keep=1)
        with tokenreduce.apply(model, *as_methods(method)):
            return model(**inputs, logits_to_keep=1)


def check_methods(names: Sequence[str]) -> list[str]:
    """The listed methods, checked; ``a+b`` is a pipeline: tower or connector method ``a``, then in-LLM method ``b``."""
    from ..core.registry import list_methods

    stages = {i.name: i.stage for i in list_methods()}
    known = ", ".join(vlm_method_names())
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise StageError(f"no methods given; known visual-token methods: {known}")
    for pipe in (n for n in names if "+" in n):
        parts = pipe.split("+")
        first_ok = stages.get(parts[0]) in ("connector", "encoder") and parts[0] in vlm_method_names()
        if len(parts) != 2 or not first_ok or parts[1] not in in_llm_method_names():
            raise StageError(f"pipeline {pipe!r}: write first+in_llm, e.g. visionzip+visiondrop (first: a tower "
                             f"method, {', '.join(n for n in tower_method_names() if stages[n] == 'encoder')}, or a "
                             "connector method, "
                             f"{', '.join(n for n in vlm_method_names() if stages[n] == 'connector')}; "
                             f"in-LLM: {', '.join(in_llm_method_names())})")
    for n in (n for n in names if "+" not in n):
        if n in (FULL, FULL_NAME, BLIND):
            raise StageError("the full model and the blind (image removed) rows are always measured; list methods only")
        if n not in stages:
            raise StageError(f"unknown method {n!r}; known visual-token methods: {known}")
        if n not in vlm_method_names():
            raise StageError(f"method {n!r} works at the {stages[n]} stage, not on visual tokens; known: {known}")
    if len(set(names)) != len(names):
        raise StageError(f"method listed twice: {', '.join(names)}")
    return names


# ---------------------------------------------------------------------------- analytic FLOPs
def tower_flops(model, visual_tokens: int) -> tuple[float, float]:
    """(tower, projector) FLOPs per image: every tower block on [CLS] + patches, the 2-layer projector."""
    tokens = visual_tokens + 1
    tower = model.config.vision_config.num_hidden_layers * tower_block_flops(model, tokens)
    proj = model.model.multi_modal_projector
    d_in, d_mid, d_out = proj.linear_1.in_features, proj.linear_1.out_features, proj.linear_2.out_features
    return tower, 2.0 * (tokens - 1) * (d_in * d_mid + d_mid * d_out)


def tower_block_flops(model, tokens: float) -> float:
    """One tower block (attention and MLP) on ``tokens`` tokens of one image."""
    vc = model.config.vision_config
    hidden, mlp = vc.hidden_size, vc.hidden_size * getattr(vc, "mlp_ratio", 4)
    return vit_attention_flops(tokens, hidden) + vit_mlp_flops(tokens, hidden, mlp)


def reduced_tower_flops(model, stats) -> float:
    """A tower method's tower FLOPs per image: its stage's count of the blocks it ran in (scoring included), and the
    blocks from the projector's select layer on, which run on the tokens it left (not hooked, so not in its stats)."""
    after = model.config.vision_config.num_hidden_layers - len(stats.tokens_per_layer)
    return stats.flops + after * tower_block_flops(model, stats.final_tokens)


# ---------------------------------------------------------------------------- the task
def task_samples(task: str, split: str, n: int, seed: int) -> list[dict]:
    """``n`` questions of the task's ``split`` (`assets.vqa`, or `assets.large_scene` for ``largescene``)."""
    if task == LARGE_SCENE:
        from ..assets.large_scene import large_scene_samples

        return large_scene_samples(split, n, seed)
    from ..assets.vqa import samples

    return samples(task, split, n, seed)


def task_prompt(processor, task: str, batch, form: str = "multi"):
    """The model inputs of a batch of the task's samples (largescene: the ``form`` of `large_scene_prompt`)."""
    if task == LARGE_SCENE:
        from ..assets.large_scene import large_scene_prompt

        return large_scene_prompt(processor, batch, form)
    return processor(images=[s["image"] for s in batch], text=[s["question"] for s in batch])


class _VLMTask(Task):
    bench = "vlm"

    def __init__(self, cfg: VLMBenchConfig, model, processor, samples: list[dict], log: Callable[[str], None]):
        self.cfg, self.model, self.processor, self.samples, self.log = cfg, model, processor, samples, log
        self.batches = [samples[i:i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
        self.large = cfg.task == LARGE_SCENE
        self.inputs = [self._prompt(b) for b in self.batches]
        self.blind_inputs = [processor(text=[s["question"] for s in b]) for b in self.batches]
        self.visual = processor.num_image_tokens
        self.tower, self.projector = tower_flops(model, self.visual)
        if self.large:  # several images per prompt: visual tokens and tower FLOPs per sample (means)
            per_image = self.visual
            self.focus_inputs = [self._prompt(b, "focus") for b in self.batches]
            self.visual = self._mean_visual(self.inputs)
            self.tower, self.projector = (f * self.visual / per_image for f in (self.tower, self.projector))
            self.focus_visual = self._mean_visual(self.focus_inputs)
        self.pictures: dict[str, list] = {}
        self.skipped: list[dict] = []
        self.timing_inputs = self._prompt(self.batches[0][:cfg.timing_batch])
        self.timing_blind = processor(text=[s["question"] for s in self.batches[0][:cfg.timing_batch]])
        if cfg.timing:
            self.timer = PairedTimer(lambda: self._prefill(self.timing_inputs, None),
                                     items=self.timing_inputs["input_ids"].shape[0], repeats=cfg.timing_repeats,
                                     unit="sample")

    def _prompt(self, batch, form: str = "multi"):
        return task_prompt(self.processor, self.cfg.task, batch, form)

    def _mean_visual(self, inputs: list) -> float:
        """Visual tokens per sample, averaged over every batch of ``inputs``."""
        from ..assets.minillava import IMAGE_TOKEN_ID

        counts = torch.cat([(x["input_ids"] == IMAGE_TOKEN_ID).sum(-1) for x in inputs])
        return float(counts.float().mean())

    def _prefill(self, inputs, method):
        return prefill(self.model, inputs, method)

    def groups(self):
        yield self.cfg.task, [Unit(self.cfg.task, i) for i in range(len(self.batches))]

    def fingerprint(self) -> dict:
        return run_fingerprint(self.cfg)

    def forward(self, cell: Cell):
        if cell.method == BLIND:
            return lambda: self._prefill(self.timing_blind, None)
        if cell.method == FOCUS:
            focus = self._prompt(self.batches[0][:self.cfg.timing_batch], "focus")
            return lambda: self._prefill(focus, None)
        return lambda: self._prefill(self.timing_inputs, cell.obj)

    def run(self, group, unit: Unit, cell: Cell) -> dict:
        import tokenreduce
        from ..assets.vqa import is_correct

        blind = cell.method in (BLIND, FOCUS)  # no method attached
        inputs = (self.blind_inputs if cell.method == BLIND else self.focus_inputs if cell.method == FOCUS
                  else self.inputs)[unit.data]
        batch = self.batches[unit.data]
        seen: dict = {}

        def after_prefill(module, args, kwargs, output):  # generate's first forward: the prefill's stats and cache
            if "kv_bytes" not in seen:
                from ..core.kv import kv_bytes

                cache = getattr(output, "past_key_values", None)
                seen["kv_bytes"] = sum(kv_bytes(layer) for layer in cache.layers) // len(batch) if cache else 0
                if handle is not None:
                    seen["stats"] = dict(handle.stats_by_stage)

        handle = None
        with torch.no_grad():
            if cell.full or blind:
                hook = self.model.register_forward_hook(after_prefill, with_kwargs=True)
                try:
                    out = self._generate(inputs)
                finally:
                    hook.remove()
            else:
                choosers = [m for m in as_methods(cell.obj) if isinstance(getattr(m, "choices", None), list)]
                for m in choosers:  # methods that record the tiles they chose, one entry per sample
                    m.choices.clear()
                with tokenreduce.apply(self.model, *as_methods(cell.obj)) as handle:
                    hook = self.model.register_forward_hook(after_prefill, with_kwargs=True)
                    try:
                        out = self._generate(inputs)
                    finally:
                        hook.remove()
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        run = {"correct": [is_correct(s, t) for s, t in zip(batch, texts)], "kinds": [s["kind"] for s in batch],
               "n": len(batch),
               "kv_bytes": seen.get("kv_bytes", 0)}
        if not (cell.full or blind) and self.large and choosers:
            picked = [c["tiles"] for c in choosers[0].choices]
            if len(picked) == len(batch):
                run["tile_first"] = [bool(t) and t[0] == s["tile"] for s, t in zip(batch, picked)]
                run["tile_among"] = [s["tile"] in t for s, t in zip(batch, picked)]
                run["tiles_chosen"] = [len(t) for t in picked]
        if "stats" in seen:
            run.update(self._prefill_fields(seen["stats"], inputs))
            if unit.data == 0 and not self.large:  # pictures of one image per prompt
                self._keep_picture(cell, batch, inputs, run)
            run.pop("kept_positions", None)  # used by the pictures only; large, and not worth saving in the checkpoint
        return run

    def _generate(self, inputs):
        return self.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)

    def _prefill_fields(self, stages: dict, inputs) -> dict:
        """The prefill's fields from its stages' stats; a pipeline (connector then in-LLM method): the in-LLM stage's
        tokens, plus the connector's planning FLOPs and its count of the prompt's visual tokens; a tower method: the
        tower's FLOPs (per image) and the visual tokens it left for the projector."""
        if set(stages) == {"encoder"}:  # a tower method at keep_ratio=1.0: nothing reduced, no later stage attached
            from ..assets.minillava import IMAGE_TOKEN_ID

            visual = float((inputs["input_ids"] == IMAGE_TOKEN_ID).sum(-1).float().mean())
            lm = self._lm_flops(inputs)
            tower = stages["encoder"]
            return {"lm_flops": lm, "lm_flops_full": lm, "scoring_flops": tower.scoring_flops, "kept_positions": None,
                    "visual_tokens": visual, "visual_kept": visual, "projected": visual,
                    "tower_flops": reduced_tower_flops(self.model, tower)}
        s = stages.get("decoder") or stages.get("connector") or next(iter(stages.values()))
        out = {"lm_flops": s.flops, "lm_flops_full": s.flops_full, "scoring_flops": s.scoring_flops,
               "kept_positions": getattr(s, "kept_positions", None), "visual_tokens": s.visual_tokens}
        if hasattr(s, "visual_tokens_per_layer"):
            out["visual_per_layer"] = s.visual_tokens_per_layer
            out["visual_kept"] = s.kept_visual_fraction * s.visual_tokens
        else:
            out["visual_kept"] = s.kept_visual_tokens
        first = stages.get("connector")
        if first is not None and s is not first:
            out["lm_flops"] += first.flops
            out["lm_flops_full"] = first.flops_full
            out["scoring_flops"] += first.scoring_flops
            out["visual_tokens"] = first.visual_tokens
        tower = stages.get("encoder")
        if tower is not None:  # a tower method: its blocks' FLOPs, and the projector runs on what it left
            out["tower_flops"] = reduced_tower_flops(self.model, tower)
            out["projected"] = (first or s).kept_visual_tokens
            out["scoring_flops"] += tower.scoring_flops
        return out

    def _keep_picture(self, cell: Cell, batch, inputs, prefill) -> None:
        kept = prefill.get("kept_positions")
        if not kept or self.cfg.pictures <= 0:
            return
        if isinstance(kept, dict):  # in-LLM: after the last drop layer
            kept = kept[max(kept)]
        ids = inputs["input_ids"]
        from ..assets.minillava import IMAGE_TOKEN_ID

        pics = []
        for i, s in enumerate(batch[: self.cfg.pictures]):
            pos = (ids[i] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
            start = pos[0] if pos else 0
            pics.append((s, [p - start for p in kept[i] if p in set(pos)]))
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cell.method)  # a file name
        self.pictures[f"{name}_{cell.budget:g}"] = pics

    def row(self, group, key, cell: Cell, runs: list[dict], full_runs: list[dict]) -> dict:
        n = sum(r["n"] for r in runs)
        acc = sum(sum(r["correct"]) for r in runs) / n
        method = FULL_NAME if cell.full else cell.method
        row: dict[str, Any] = {"task": self.cfg.task, "method": method, "budget": None if cell.full or
                               cell.method in (BLIND, FOCUS) else cell.budget, "accuracy": acc, "n": n,
                               "accuracy_by_kind": accuracy_by_kind(runs),
                               "kv_bytes_per_sample": sum(r["kv_bytes"] * r["n"] for r in runs) / n}
        visual = self.visual
        lm_full = full_runs[0].get("lm_flops_full") or self._lm_full_flops()
        if cell.full:
            row.update(visual_tokens=visual, visual_kept=visual, tower_flops=self.tower,
                       projector_flops=self.projector, lm_flops=lm_full)
        elif cell.method == BLIND:
            row.update(visual_tokens=0, visual_kept=0, tower_flops=0.0, projector_flops=0.0,
                       lm_flops=self._lm_flops(self.blind_inputs[0]))
        elif cell.method == FOCUS:
            scale = self.focus_visual / visual
            row.update(visual_tokens=self.focus_visual, visual_kept=self.focus_visual,
                       tower_flops=self.tower * scale, projector_flops=self.projector * scale,
                       lm_flops=sum(self._lm_flops(x) for x in self.focus_inputs) / len(self.focus_inputs))
        else:
            mean = lambda k: sum(r[k] * r["n"] for r in runs) / n  # noqa: E731
            row.update(visual_tokens=mean("visual_tokens"), visual_kept=mean("visual_kept"),
                       tower_flops=self.tower, projector_flops=self.projector, lm_flops=mean("lm_flops"),
                       scoring_flops=mean("scoring_flops"))
            if "tower_flops" in runs[0]:  # a tower method: the tower per image times images per sample
                row.update(tower_flops=mean("tower_flops") * visual / self.processor.num_image_tokens,
                           projector_flops=self.projector * mean("projected") / visual)
            if "visual_per_layer" in runs[0]:
                layers = len(runs[0]["visual_per_layer"])
                row["visual_per_layer"] = [sum(r["visual_per_layer"][i] * r["n"] for r in runs) / n
                                           for i in range(layers)]
            row["params"] = " + ".join(m.describe() for m in as_methods(cell.obj))
            if "tile_first" in runs[0]:
                row["tile_accuracy"] = sum(sum(r["tile_first"]) for r in runs) / n
                row["tile_recall"] = sum(sum(r["tile_among"]) for r in runs) / n
                row["tiles_chosen"] = sum(sum(r["tiles_chosen"]) for r in runs) / n
        row["flops"] = row["tower_flops"] + row["projector_flops"] + row["lm_flops"]
        row["flops_full"] = self.tower + self.projector + lm_full
        row["flops_ratio"] = row["flops"] / row["flops_full"]
        if "scoring_flops" in row:  # the method's own work (scores, plans) as a share of its reduced prefill
            row["scoring_share"] = row["scoring_flops"] / row["flops"]
        row["lm_flops_ratio"] = row["lm_flops"] / lm_full
        row["visual_kept_ratio"] = row["visual_kept"] / visual if visual else None
        if self.cfg.timing and not cell.full:
            row.update(self._decode_ratio(cell))
        return row

    def _lm_full_flops(self) -> float:
        if self.large:  # prompts of 5 or 10 images: every batch
            return sum(self._lm_flops(x) for x in self.inputs) / len(self.inputs)
        return self._lm_flops(self.inputs[0])

    def _lm_flops(self, inputs) -> float:
        from ..families.decoders import decoder_info, find_decoder

        fam, backbone = find_decoder(self.model)
        info = decoder_info(fam, backbone, ())
        n = float(inputs["attention_mask"].sum(-1).float().mean())
        return info.num_layers * decoder_layer_flops(n, info, backbone.config.intermediate_size)

    def _decode_ratio(self, cell: Cell) -> dict:
        """Decoding tokens/s after the prefill, the full model's measured right before on the same batch: the
        prefill runs untimed, then 8 one-token steps on its cache are timed (as ``generate`` runs them)."""
        import tokenreduce
        from transformers import DynamicCache

        batch = self.timing_blind if cell.method == BLIND else self.timing_inputs
        if cell.method == FOCUS:
            batch = self._prompt(self.batches[0][:self.cfg.timing_batch], "focus")
        steps = 8

        def rate(method) -> float:
            with torch.no_grad(), (tokenreduce.apply(self.model, *as_methods(method)) if method is not None
                                   else contextlib.nullcontext()):
                cache = DynamicCache(config=self.model.config.text_config)
                out = self.model(**batch, past_key_values=cache, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                mask = batch["attention_mask"]
                t0 = time.perf_counter()
                for _ in range(steps):
                    mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                    out = self.model(input_ids=token, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                return steps * token.shape[0] / (time.perf_counter() - t0)

        obj = None if cell.method in (BLIND, FOCUS) else cell.obj
        full, mine = rate(None), rate(obj)
        return {"decode_tok_s": mine, "decode_tok_s_full": full, "decode_ratio": mine / full}

    def log_line(self, row: dict, full_row: dict) -> str:
        return (f"{row['method']:>13} @ {row['budget'] if row['budget'] is not None else '-':>5}: accuracy "
                f"{row['accuracy']:.3f} (full {full_row['accuracy']:.3f}), visual tokens {row['visual_kept']:.1f}, "
                f"FLOPs x{row['flops_ratio']:.3f}" + (f", prefill x{row['time_ratio']:.3f}" if "time_ratio" in row
                                                      else ""))

    def report(self, rows: list[dict], out: Path, header) -> None:
        write_vlm_report(rows, out, self.skipped)
        draw_kept(self.pictures, out / "kept", self.processor.num_image_tokens)


def accuracy_by_kind(runs: Sequence[dict]) -> dict[str, float]:
    """Accuracy per question kind (colour, shape, ...), in the order the kinds first appear."""
    hits: dict[str, list[bool]] = {}
    for r in runs:
        for kind, ok in zip(r["kinds"], r["correct"]):
            hits.setdefault(kind, []).append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


# ---------------------------------------------------------------------------- report
def vlm_columns(rows: Sequence[dict]) -> list[Column]:
    cols = [Column("method"), Column("budget", "keep_ratio", ".2f"), Column("accuracy", "accuracy", ".3f"),
            Column("accuracy_by_kind", "by question kind",
                   lambda v: " · ".join(f"{k} {a:.2f}" for k, a in v.items()) if v else "—"),
            Column("n"), Column("visual_kept", "visual tokens (mean over layers)", ".1f"),
            Column("visual_per_layer", "per layer (first, last)",
                   lambda v: f"{v[0]:.0f} → {v[-1]:.0f}" if v else "—"),
            Column("tower_flops", "tower GFLOPs", lambda v: f"{v / 1e9:.3f}"),
            Column("projector_flops", "projector GFLOPs", lambda v: f"{v / 1e9:.3f}"),
            Column("lm_flops", "LM prefill GFLOPs", lambda v: f"{v / 1e9:.3f}"),
            Column("flops_ratio", "FLOPs ratio", ".3f"),
            Column("scoring_share", "scoring share of FLOPs", ".3f")]
    if any("tile_accuracy" in r for r in rows):
        cols += [Column("tile_accuracy", "first tile = answer tile", ".3f"),
                 Column("tile_recall", "answer tile chosen", ".3f"), Column("tiles_chosen", "tiles chosen", ".2f")]
    if any("time_ratio" in r for r in rows):
        cols += [SpreadColumn("time_ratio", "prefill time ratio", ".3f"), Column("decode_ratio", "decode tok/s ratio",
                                                                                 ".2f"),
                 Column("peak_mem_mb", "peak RSS delta (MB)", ".0f")]
    cols += [Column("kv_bytes_per_sample", "KV bytes / sample", lambda v: f"{v / 2**20:.2f} MiB")]
    return cols


def write_vlm_report(rows: Sequence[dict], out: str | Path, skipped: Sequence[dict] = ()) -> dict[str, Path]:
    from .plot import Panel, pareto_plot

    out = Path(out)
    order = {FULL_NAME: 0, BLIND: 1, FOCUS: 1}
    rows = sorted(rows, key=lambda r: (order.get(r["method"], 2), r["method"], -(r.get("budget") or 0)))
    notes = [f"Task: {rows[0]['task']} (held-out questions, n = {rows[0]['n']}); mini-LLaVA "
             "(DINOv2-S/14 + SmolLM2-135M, 144 visual tokens per image); greedy answers scored by their first word."
             + (" largescene: the coarse view then the G x G tiles (G = 2 or 3), 720 or 1,440 visual tokens; "
                f"'{FOCUS}': the coarse view and the answer tile only." if rows[0]["task"] == LARGE_SCENE else ""),
             "keep_ratio: the fraction of visual tokens kept (in-LLM methods: averaged over the language model's "
             "layers). FLOPs: analytic, per sample, scoring included; the blind row has no image. Scoring share: the "
             "method's own work (scores, plans) as a fraction of its reduced prefill's FLOPs.",
             environment_note(rows[0])]
    if any("time_ratio" in r for r in rows):
        notes.append(spread_note("prefill time ratio", "batches"))
    notes += [f"not run: {s['method']}" + (f" @ {s['keep_ratio']:g}" if "keep_ratio" in s else "") + f" — {s['reason']}"
              for s in skipped]
    md = write_markdown_report(out / "results.md", "bench vlm", notes, [(None, rows, vlm_columns(rows))])
    plot = pareto_plot([r for r in rows if r["method"] not in (BLIND, FOCUS)], out / "pareto.png", y="accuracy",
                       panels=[Panel("flops_ratio", "FLOPs ratio (analytic)"),
                               Panel("visual_kept_ratio", "visual tokens kept (fraction)")]
                       + ([Panel("time_ratio", "prefill time ratio (measured)")] if any("time_ratio" in r for r in rows)
                          else []),
                       is_reference=lambda r: r["method"] == FULL_NAME, annotate="budget",
                       title=f"mini-LLaVA, {rows[0]['task']}")
    return {"markdown": md, "plot": plot}


def draw_kept(pictures: dict[str, list], out: Path, num_tokens: int) -> None:
    """Each sample's image with the dropped visual tokens greyed out."""
    from PIL import Image, ImageDraw

    side = int(round(num_tokens ** 0.5))
    out.mkdir(parents=True, exist_ok=True)
    for name, pics in pictures.items():
        for i, (sample, kept) in enumerate(pics):
            img = sample["image"].convert("RGB").resize((side * 16, side * 16))
            shade = Image.new("RGBA", img.size, (0, 0, 0, 0))
            draw = ImageDraw.Draw(shade)
            keep = set(kept)
            for t in range(side * side):
                if t not in keep:
                    r, c = divmod(t, side)
                    draw.rectangle((c * 16, r * 16, c * 16 + 15, r * 16 + 15), fill=(255, 255, 255, 190))
            canvas = Image.alpha_composite(img.convert("RGBA"), shade).convert("RGB")
            ImageDraw.Draw(canvas).text((2, 2), f"{sample['question']} ({sample['answer']})", fill=(0, 0, 0))
            canvas.save(out / f"{name}_{i}.png")


# ---------------------------------------------------------------------------- entry point
def tower_cells(names: Sequence[str], budgets: Sequence[float], per_image: int, params: dict | None = None,
                log: Callable[[str], None] = print) -> Grid:
    """Cells of the tower methods: each keeps ``budget`` of the image's visual tokens at the end of the tower."""
    cells, skipped = [], []
    for name in names:
        for b in budgets:
            try:
                cells.append(Cell(name, b, first_stage_method(name, b, per_image, (params or {}).get(name))))
            except BudgetError as e:
                skipped.append({"method": name, "keep_ratio": b, "reason": f"no keep_ratio budget: {e}"})
                log(f"skipping {name} @ {b:g}: {e}")
    return Grid(cells, skipped)


def pipeline_cells(model, pipes: Sequence[str], budgets: Sequence[float], per_image: int, params: dict | None = None,
                   log: Callable[[str], None] = print) -> Grid:
    """Cells of ``first+in_llm`` pipelines: the in-LLM method at its native schedule, the first (tower or connector)
    method's budget set so that the visual tokens the language model keeps, averaged over its layers, are ``budget``
    of the image's."""
    import tokenreduce
    from ..families.decoders import decoder_info, find_decoder

    fam, backbone = find_decoder(model)
    info = decoder_info(fam, backbone, ())
    params = params or {}
    cells, skipped = [], []
    for pipe in pipes:
        first, second = pipe.split("+")
        inner = tokenreduce.get_method(second, **params.get(second, {}))
        later = inner.mean_kept(inner.schedule(info), info.num_layers)
        for b in budgets:
            try:
                if b / later > 1:
                    raise BudgetError(f"{second}'s own schedule keeps {later:.3f} on average, above {b}")
                cells.append(Cell(pipe, b, (first_stage_method(first, b / later, per_image, params.get(first)),
                                            tokenreduce.get_method(second, **params.get(second, {})))))
            except BudgetError as e:
                skipped.append({"method": pipe, "keep_ratio": b, "reason": f"no keep_ratio budget: {e}"})
                log(f"skipping {pipe} @ {b:g}: {e}")
    return Grid(cells, skipped)


def schedule_cells(model, names: Sequence[str], cfg: VLMBenchConfig) -> list[Cell]:
    """One cell per listed in-LLM method running ``cfg.schedule`` (checked against the model's layers); its budget
    column is the schedule's mean kept fraction (``keep_ratio``'s meaning)."""
    import tokenreduce
    from ..families.decoders import decoder_info, find_decoder

    fam, backbone = find_decoder(model)
    layers = decoder_info(fam, backbone, ()).num_layers
    schedule = cfg.schedule.check(layers, "--schedule")
    return [Cell(schedule_label(n, schedule), schedule.mean_kept(layers),
                 tokenreduce.get_method(n, schedule=schedule, **cfg.method_params.get(n, {}))) for n in names]


def run_fingerprint(cfg: VLMBenchConfig) -> dict:
    """What makes two runs' saved results (and calibrations) interchangeable, for `checkpoint`."""
    import transformers

    c = cfg
    return {"bench": "vlm", "model": c.model, "task": c.task, "n": c.n, "seed": c.seed, "batch_size": c.batch_size,
            "calib": c.calib, "torch": torch.__version__, "transformers": transformers.__version__}


def calibrate_cells(model, processor, grid: Grid, cfg: VLMBenchConfig, log: Callable[[str], None]) -> None:
    """Calibrate every cell's methods that need it (DyMU's thresholds, for the budget each was built with) on
    ``cfg.calib`` questions of the task's calibration split, never the held-out ones. With ``cfg.out`` each state
    is saved (`checkpoint.CalibrationStore`), and a resumed run loads it instead of calibrating again."""
    import tokenreduce

    needing = [m for c in grid.cells for m in as_methods(c.obj) if type(m).needs_calibration]
    if not needing:
        return
    store = CalibrationStore(cfg.out, run_fingerprint(cfg), cfg.resume) if cfg.out is not None else None
    batches = None
    for m in needing:
        key = CalibrationStore.key(m)
        state = store.get(key) if store is not None else None
        if state is not None:
            m.load_state_dict(state)
            log(f"loaded the calibration of {m!r} saved in {store.path}")
            continue
        if batches is None:
            data = task_samples(cfg.task, "calib", cfg.calib, cfg.seed)
            batches = [dict(task_prompt(processor, cfg.task, data[i:i + cfg.batch_size]))
                       for i in range(0, len(data), cfg.batch_size)]
        t0 = time.perf_counter()
        tokenreduce.calibrate(m, model, batches)
        log(f"calibrated {m!r} on {len(data)} calibration questions in {time.perf_counter() - t0:.0f} s")
        if store is not None:
            store.put(key, m.state_dict())


def run_vlm_bench(cfg: VLMBenchConfig | None = None, model=None, processor=None, log: Callable[[str], None] = print,
                  progress: bool = True) -> list[dict]:
    cfg = cfg or VLMBenchConfig()
    t_start = time.perf_counter()
    if cfg.task not in vlm_tasks():
        raise StageError(f"unknown task {cfg.task!r}; choose one of {', '.join(vlm_tasks())}")
    names = check_methods(cfg.methods)
    budgets = check_keep_ratios(cfg.budgets, "budget", "the fraction of visual tokens kept", "--budgets 0.5,0.25")
    if cfg.schedule is not None:
        check_schedule_methods(names)
    if cfg.model != "minillava":
        raise StageError(f"unknown VLM {cfg.model!r}; the bundled one is 'minillava'")
    if cfg.resume and cfg.out is not None:
        check_resumable(cfg.out, run_fingerprint(cfg))  # a different run is refused before loading or calibrating
    pipes = [n for n in names if "+" in n]
    towers = [n for n in names if n in tower_method_names()]
    grid = build_grid([n for n in names if "+" not in n and n not in towers], budgets, skip_bad_budgets=True, log=log,
                      params=cfg.method_params)
    if model is None:
        from ..assets.minillava import load_vlm

        model, processor = load_vlm(cfg.model)
    for more in (tower_cells(towers, budgets, processor.num_image_tokens, cfg.method_params, log),
                 pipeline_cells(model, pipes, budgets, processor.num_image_tokens, cfg.method_params, log)):
        grid = Grid(grid.cells + more.cells, grid.skipped + more.skipped)
    if cfg.schedule is not None:
        grid = Grid(grid.cells + schedule_cells(model, names, cfg), grid.skipped)
    calibrate_cells(model, processor, grid, cfg, log)
    grid = check_attachable(model, grid, log=log)
    grid = Grid(grid.cells + [Cell(BLIND, 0.0, BLIND)] + ([Cell(FOCUS, 0.0, FOCUS)] if cfg.task == LARGE_SCENE
                                                           else []), grid.skipped)
    data = task_samples(cfg.task, "test", cfg.n, cfg.seed)
    task = _VLMTask(cfg, model, processor, data, log)
    task.skipped = grid.skipped
    common = {"model": cfg.model, "task": cfg.task, **environment("cpu", model)}
    return run_grid(task, grid, cfg.out, common, progress=progress, log=log, t_start=t_start, resume=cfg.resume)
