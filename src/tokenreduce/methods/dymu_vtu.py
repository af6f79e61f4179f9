"""DyMU's Virtual Token Unmerging (VTU) — Dynamic Merging and Virtual Unmerging (Wang et al., arXiv 2504.17040).

DToMe (`methods.dymu`) merges similar patches in the vision tower, so the language model receives
fewer visual tokens. VTU lets a language model trained on full-length visual sequences run on the
merged ones: in every decoder layer, with the per-token work (norms, Q/K/V/O projections, MLP) on
the merged rows,

1. expand Q, K, V back to the original length: one copy of a merged token per patch it stands for;
2. apply RoPE at the original patches' positions;
3. attend over the full-length sequence (causal);
4. each merged token's output is the mean of its copies' outputs (scatter-mean), then ``o_proj``.

For one layer this is exactly the language model run on the expanded sequence (every merged token
repeated at its patches' positions) with the copies' outputs averaged. Over the stack it is an
approximation: after the first layer the copies of a merged token would differ in the full model
(they attend from different positions), and VTU keeps one mean state per merged token.

``dymu_vtu`` is the whole pipeline as one method: with a budget (``keep_ratio``, ``r`` or
``r_total``, as `dymu`) it brings its own DToMe (``.tower``), which `apply` attaches in the vision
tower (before the projector's select layer) and ``tokenreduce.calibrate(method, vlm, batches)``
calibrates (batches of VLM inputs, e.g. dicts with ``input_ids`` and ``pixel_values``). With
``tower=False`` it only unmerges what the tower methods given to the same `apply` merged
(``apply(vlm, dymu, dymu_vtu(tower=False))``, or with ``tome``). Model plumbing: `runtime.unmerge`.

Reference read: MikeWangWZHL/dymu at c57d75a1 (``LLaVA/llava/model/language_model/llava_llama.py``,
the default "direct expansion + SDPA" path; ``llava_llama_w_exact_vtu_attn.py``, the low-rank
kernel; ``llava_arch.py``, ``mapping_indices``). Same algorithm: projections at the merged length,
``index_select`` expansion, RoPE at positions 0..N-1 of the full prompt, SDPA, ``scatter_mean``
of the attention output before ``o_proj``; the KV cache holds the expanded keys and values (full
length: no memory saving; decoding continues at the original positions). So against DToMe alone,
whose language model caches and attends over the merged rows only, VTU gives back DToMe's KV-cache
and attention savings and keeps the linear/MLP ones (its prefill costs more FLOPs than DToMe's).
Differences:

* Batches: the reference asserts batch size 1 (one 1-D ``mapping_indices``); here each sample has
  its own map and the caller's left padding is masked, so a batch equals its samples.
* Placement: the reference builds the merged prompt with the image's merged tokens in one block
  and expands it back by ``mapping_indices``; here the connector puts each merged token at its
  earliest patch's place and hands the language model a per-position row map. The expanded
  sequence is the same (each position holds its merged token, in prompt order).
* The exact low-rank VTU kernel (``vtu_atten_kernal``, eager only, slower per its own note) is not
  ported; we attend over the expanded Q/K/V as the reference's default path does. FLOPs are counted
  for what runs: projections and MLP on the merged rows, both attention products over the full
  prompt (`runtime.unmerge.unmerged_layer_flops`).
* RoPE: the attention module's own RoPE is given identity tables (cos 1, sin 0: exact) and the
  expanded Q/K are rotated with the model's ``apply_rotary_pos_emb`` at the original positions.
* A prefill in which nothing merged runs the model's own path (bit-identical), and so does
  ``keep_ratio=1.0``. Pruned tokens (a pruning connector method) are refused: VTU unmerges merges.
* The reference's text tokens go through the same scatter-mean (a one-copy mean, exact); so here.
"""

from __future__ import annotations

from ..core.errors import BudgetError, CalibrationError, ParameterError
from ..core.method import UnmergeMethod
from ..core.params import check_bool, check_choice, check_int, check_per_layer_r
from ..core.registry import register
from .dymu import DToMe


@register
class DyMUVTU(UnmergeMethod):
    name = "dymu_vtu"
    paper = "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs"
    arxiv = "2504.17040"
    needs_calibration = True

    def __init__(self, keep_ratio: float | None = None, r: int | list | tuple | None = None,
                 r_total: int | None = None, r_schedule: str = "constant", prop_attn: bool = True,
                 tower: bool = True):
        self.own_tower = check_bool(self.name, "tower", tower)
        # the tower's parameters, checked under this method's name (DToMe checks them again under its own)
        check_per_layer_r(self.name, "r", r)
        check_int(self.name, "r_total", r_total, min=0, optional=True, error=BudgetError,
                  why="tokens merged over all blocks")
        check_choice(self.name, "r_schedule", r_schedule, ("constant", "linear", "reverse_linear"))
        check_bool(self.name, "prop_attn", prop_attn)
        if not self.own_tower:
            given = [k for k, v in (("keep_ratio", keep_ratio), ("r", r), ("r_total", r_total)) if v is not None]
            if given:
                raise ParameterError(f"dymu_vtu(tower=False) only unmerges what the tower methods of the same apply() "
                                     f"merged and has no budget of its own; got {given[0]}. Give the budget to the "
                                     "tower method (e.g. dymu(keep_ratio=0.5)), or use dymu_vtu(keep_ratio=...)")
            super().__init__(None)
            self.tower = None
            return
        super().__init__(keep_ratio)
        try:
            self.tower = DToMe(r=r, keep_ratio=keep_ratio, r_total=r_total, r_schedule=r_schedule,
                               prop_attn=prop_attn)
        except BudgetError as e:
            raise type(e)(str(e).replace("dymu needs", "dymu_vtu needs", 1)) from None

    def describe(self) -> str:
        return "tower=False" if self.tower is None else self.tower.describe()

    @classmethod
    def tokens_left_budget(cls, left: int, patches: int) -> dict:
        return DToMe.tokens_left_budget(left, patches)  # its own tower's budget

    @property
    def reduces_nothing(self) -> bool:
        return self.tower is not None and self.tower.reduces_nothing

    # calibration, saving and loading are the tower's (DToMe's thresholds)
    @property
    def calibrated(self) -> bool:
        return self.tower is None or self.tower.calibrated

    def _need_tower(self, what: str) -> DToMe:
        if self.tower is None:
            raise CalibrationError(f"dymu_vtu(tower=False) has nothing to {what}: calibrate the tower method "
                                   "attached with it")
        return self.tower

    def state_dict(self) -> dict:
        return {**self._need_tower("save").state_dict(), "method": self.name}

    def load_state_dict(self, state: dict) -> "DyMUVTU":
        self._need_tower("load").load_state_dict(state)
        return self
