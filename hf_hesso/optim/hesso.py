"""`HESSO`: an optimizer wrapper that trains and progressively prunes zero-invariant groups (Chen et al., 2024).

The wrapped base optimizer does every ordinary update; `HESSO` adds, per optimizer step, at most:
- multiplying the gradients of the groups pruned in earlier periods by zero (before the base step): with zero
  gradient, zero moments and a zero weight, every torch built-in optimizer leaves the weight exactly zero, so the
  pruned groups stay zero in the weights and in the base optimizer's state;
- at the first step of a period, scoring every group (saliency from the weights and a direction: the raw gradient
  for the default `saliency="taylor"`, or the base optimizer's own update `d = (p_before - p_after) / lr`) and
  marking the globally least salient groups as this period's redundant set;
- multiplying this period's redundant groups by `(T - t - 1) / (T - t)`, which fades them linearly to exactly zero
  at the period's last step while they keep receiving gradient updates; at that step every base-optimizer state
  tensor shaped like the parameter is zeroed for them;
- for optimizers outside the known fixed-point set, re-zeroing the pruned weights after the step.
The per-step passes multiply each affected slice by a per-group vector (0 pruned / factor fading / 1 other), built
once per period: measured on CPU, one vectorised multiply over the slice beats `index_fill_`/`index_copy_` on the
affected rows and columns by 2-3x. Persistent extra state is O(number of groups): the step counter, the period that
selected each group and the latest scores.

The work is split across `hf_hesso.optim`: `schedule` (step arithmetic and every settings check, shared with
`HESSOConfig`), `scoring` (base step, direction, saliency of a step, the saliency window), `selection` (global
ranking under a budget), `masking` (fading, masking and zeroing passes), `state` (checkpoint entry and its
validation), `facade` (the `Optimizer` that delegates to the base optimizer). This module ties them together.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ..groups import KINDS, GroupSet
from .activation import ActivationRecorder
from .distributed import check_supported, group_squared_norms
from .facade import WrappedOptimizer, check_base_optimizer
from .masking import GroupMasks
from .presets import default_saliency_steps, resolve_saliency
from .schedule import Schedule, check_pruning_settings
from .scoring import SaliencyWindow, Scorer, score_problem
from .selection import ParamCounter, block_capacity, reachable_groups, select_redundant
from .state import STATE_KEY, PruningState, pack_state, unpack_state
from .uniform import LAYER_SHAPES, check_uniform_groups, select_uniform

_FIXED_POINT_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
)


def frozen_parameters(groups: GroupSet, params: dict[str, torch.Tensor]) -> list[str]:
    """Names of grouped parameters with `requires_grad=False` that are not a LoRA model's frozen base."""
    if groups.adapters:
        return []  # peft freezes the whole base model; its slices are faded through the adapter groups
    return [name for name, p in params.items() if not p.requires_grad]


class HESSO(WrappedOptimizer):
    r"""
    HESSO (Hybrid Efficient Structured Sparse Optimizer): wraps a torch optimizer and, over a schedule of optimizer
    steps, drives the least salient groups (MLP channels, attention heads, key/value groups, query slots) to exactly
    zero, so that `slim_model` can then remove them physically.

    Schedule, in optimizer steps `n = 1, 2, ...` (a step without any gradient, or one that a `GradScaler` skips,
    is not counted): `start_pruning_step` steps of warm-up, then `pruning_periods` periods of
    `T = pruning_steps // pruning_periods` steps (the last period also takes the remainder steps). At the first step
    of every period the groups are scored and the least salient ones not yet selected are added (one global
    ranking over all kinds and layers); over the period's remaining steps they fade linearly to exactly zero, and
    from the period's end they are held at zero, in the weights and in the base optimizer's state.

    Args:
        optimizer (`torch.optim.Optimizer`):
            The base optimizer (AdamW with no-decay parameter groups, SGD with momentum, foreach/fused variants...).
            It must update every parameter the groups slice.
        groups ([`GroupSet`]):
            The prunable groups, from `build_groups(model)` on the model being trained.
        target_group_sparsity (`float`, *optional*):
            Fraction of the groups to remove, in `(0, 1)`; each group counts as one unit (the paper's knob).
        target_param_sparsity (`float`, *optional*):
            Fraction of the parameters held by the groups to remove, in `(0, 1)`; groups are then ranked by saliency
            per parameter, relative to the mean saliency per parameter of their kind. The kind-relative scale is
            needed because the criteria do not grow alike with a group's size (a norm grows with the square root
            of it, a cosine not at all): ranked by raw saliency per parameter, the largest structures (key/value
            groups, heads) always look least salient and go first, which on SmolLM2 removed two of three key/value
            groups in most layers. Set exactly one of the two targets.
        start_pruning_step (`int`, *optional*, defaults to `0`):
            Optimizer steps of plain training before the first selection.
        pruning_periods (`int`, *optional*, defaults to `1`):
            Number of periods; each selects `1 / pruning_periods` of the target.
        pruning_steps (`int`):
            Optimizer steps over which pruning happens; `pruning_steps // pruning_periods` must be at least 2.
            Required (keyword-only), as in `HESSOConfig`.
        saliency (`str`, *optional*, defaults to `"taylor"`, or `"custom"` when `importance_criteria` is given):
            A preset of the criteria weights and the direction (`hf_hesso.optim.presets`): `"taylor"`
            (`taylor_elementwise` on the raw gradient; with LoRA `taylor_first_order` on the update), `"paper"` (the
            paper's mix, 0.2 for each of its five criteria, on the update), `"activation"` (the magnitude of each
            group's output, as Minitron), or `"custom"` (the `importance_criteria` given). See docs/saliency.md.
        importance_criteria (`dict[str, float]`, *optional*):
            Weights of the saliency criteria for `saliency="custom"`: the paper's `magnitude`, `avg_magnitude`,
            `cosine_similarity`, `taylor_first_order`, `taylor_second_order`, `taylor_elementwise` (`sum |x * d|`
            over a group's elements; not in the paper) and `activation`. Missing ones weigh 0. Defaults to the
            weights of the `saliency` preset (`{"taylor_elementwise": 1.0}` for the default `"taylor"`).
        saliency_steps (`int`, *optional*, defaults to `min(4, start_pruning_step + 1, period length)`):
            Number of optimizer steps whose scores every selection averages: the period's first step and the
            `saliency_steps - 1` steps just before it (the end of the warm-up for the first period, the end of the
            previous period for the others), each scored on its own batch, as the Taylor calibration of one-shot
            pruners sums over several batches. At most `start_pruning_step + 1` and, with several periods, at most
            the period length `pruning_steps // pruning_periods` (the default takes the period cap only with several
            periods). Every step in a window costs what a scoring step costs (one pass over the grouped weights; one
            O(groups) all-reduce under FSDP2); the running sum is O(groups) of state. Not used by [`CRIC`], which
            accumulates its own scores over its cycles.
        saliency_direction (`str`, *optional*, defaults to the `saliency` preset's: `"gradient"` for `"taylor"`):
            The direction `d` of the criteria. `"update"` (the paper's): the base optimizer's processed step,
            `d = (p_before - p_after) / lr` at the scoring step (for Adam a preconditioned, almost sign-like
            vector). `"gradient"`: the raw gradient of the scoring step, which makes the Taylor criteria estimates
            of the loss change; it also skips the transient copy of the grouped parameters the update direction
            needs. Not available for LoRA models (the gradient of the effective weight is never formed).
        group_divisible (`int`, *optional*, defaults to `1`):
            Within every block (one kind in one layer) groups are removed so that the number kept is a multiple of
            this value and at least this value; a block of `group_divisible` groups or fewer is never pruned. A
            whole-sublayer group (`attention_sublayer`, `mlp_sublayer`: one per layer) may go, but never every one
            of its kind.
        layer_shapes (`str`, *optional*, defaults to `"free"`):
            `"free"`: every layer ends with its own sizes. `"uniform"`: every layer keeps the same number of heads /
            key-value groups / query slots / MLP channels (the `j`-th least salient group of a kind in every layer
            goes as one unit) and whole layers (their attention and MLP sublayer groups together) may go, so that
            `to_stock` can express the result. See `hf_hesso.optim.uniform` and docs/depth.md.
        hold_zeros (`str`, *optional*, defaults to `"auto"`):
            How pruned groups are held at zero after their period. `"always"` zeroes the gradient of every slice of
            every pruned group before each step. `"auto"` only zeroes the slices whose gradient can be non-zero:
            once all slices of an MLP channel, head or key/value group are zero, the model's gradient on them is
            exactly zero (zero rows in, zero columns out), and with zero state a torch built-in optimizer keeps them
            exactly zero; only the output-projection columns of a pruned query slot still receive gradient (the
            slot's attention output is the mean of its key/value group's values). Use `"always"` when the loss
            adds a term on the weights whose gradient at zero is not zero. Optimizers that are not torch built-ins
            get their pruned weights re-zeroed after every step either way.

    All settings are checked by `hf_hesso.optim.schedule` (the same checks as `HESSOConfig`): a value of the wrong
    type raises `TypeError`, a value out of range `ValueError`. With `group_divisible > 1` a target that the kept
    multiples cannot reach exactly warns with the reachable figure. Groups that slice frozen parameters
    (`requires_grad=False`, outside a LoRA model's base) are refused unless built with `prune_frozen=True`.

    Interface for schedules built on HESSO (used by [`CRIC`], documented in `docs/optimizer.md`):
    `schedule` ([`Schedule`]), `num_steps`, `groups`, `grouped_parameters`, `base_step()`, `score_step()`,
    `budget_mask(scores, selected, fraction)`, `select(scores, period)`, `zero_groups(mask)`, `fade(mask, factor)`,
    `begin_projection(step)`, and the two hooks `pruning_step(n)` and `selection_scores(period, n)`.

    Robustness: a selection whose scores are NaN, infinite or all zero never falls back to index order (the
    window's other batches are used with a warning, or the step raises); stepping after the model's parameters
    were replaced (e.g. by `slim_model`) raises; a restored state is validated field by field.

    Example:

    ```python
    groups = build_groups(model)
    opt = HESSO(torch.optim.AdamW(model.parameters(), lr=1e-4), groups,
                target_group_sparsity=0.5, start_pruning_step=10, pruning_periods=4, pruning_steps=40)
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    ```
    """

    def __init__(
        self,
        optimizer: Optimizer,
        groups: GroupSet,
        *,
        target_group_sparsity: float | None = None,
        target_param_sparsity: float | None = None,
        start_pruning_step: int = 0,
        pruning_periods: int = 1,
        pruning_steps: int,
        importance_criteria: dict[str, float] | None = None,
        group_divisible: int = 1,
        hold_zeros: str = "auto",
        saliency_direction: str | None = None,
        saliency_steps: int | None = None,
        saliency: str | None = None,
        layer_shapes: str = "free",
    ):
        check_base_optimizer(optimizer)
        if not isinstance(groups, GroupSet):
            raise TypeError(f"`groups` must be a `GroupSet` from `build_groups(model)`, got {type(groups).__name__}.")
        if len(groups) == 0:
            raise ValueError("`groups` is empty: the model has no prunable groups. Build them with more kinds/layers.")
        if saliency_steps is None:
            saliency_steps = (
                default_saliency_steps(start_pruning_step, pruning_steps, pruning_periods)
                if all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (pruning_steps, pruning_periods)
                )
                and isinstance(start_pruning_step, int)
                else 1  # a bad schedule is reported by `Schedule` with its own message
            )
        saliency, importance_criteria, saliency_direction = resolve_saliency(
            saliency, importance_criteria, saliency_direction, lora=bool(groups.adapters)
        )
        target_name, target, weights = check_pruning_settings(
            target_group_sparsity=target_group_sparsity,
            target_param_sparsity=target_param_sparsity,
            importance_criteria=importance_criteria,
            group_divisible=group_divisible,
            hold_zeros=hold_zeros,
            saliency_direction=saliency_direction,
        )
        schedule = Schedule(start_pruning_step, pruning_periods, pruning_steps, saliency_steps)
        if saliency_direction == "gradient" and groups.adapters:
            raise ValueError(
                "`saliency_direction='gradient'` needs the gradient of every scored weight, but a LoRA model's "
                "projections are scored on the effective weight `W0 + s * B @ A`, whose gradient is never formed. "
                "Use `saliency_direction='update'` with LoRA."
            )
        if layer_shapes not in LAYER_SHAPES:
            raise ValueError(f"`layer_shapes` must be one of {list(LAYER_SHAPES)}, got {layer_shapes!r}.")
        if layer_shapes == "uniform":
            check_uniform_groups(groups)

        # Resolve the live parameters once and check that the base optimizer updates every one of them.
        # FSDP1 flat parameters and DeepSpeed ZeRO-3 partitions hide the rows and columns that the groups cut.
        base = {
            f"param_groups[{i}][{j}]": p
            for i, g in enumerate(optimizer.param_groups)
            for j, p in enumerate(g["params"])
        }
        check_supported(base, {})
        params = groups.parameters()
        check_supported(params, groups.param_shapes)
        frozen = frozen_parameters(groups, params)
        if frozen and not getattr(groups, "prune_frozen", False):
            raise ValueError(
                f"`groups` slice parameters with `requires_grad=False`, e.g. {frozen[:3]} ({len(frozen)} in all): "
                "HESSO never prunes what you froze unless asked. Build the groups after freezing, "
                "`build_groups(model)` leaves the groups of frozen parameters out, or pass "
                "`build_groups(model, prune_frozen=True)` to prune (change) frozen parameters on purpose."
            )
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # Frozen parameters (a LoRA model's base weights) are faded and zeroed, never stepped.
        foreign = [name for name, p in params.items() if id(p) not in owned and p.requires_grad]
        if foreign:
            raise ValueError(
                f"`groups` slice parameters that `optimizer` does not update, e.g. {foreign[:3]} ({len(foreign)} in "
                "all). Build the optimizer from the same model's parameters (`model.parameters()`) and build the "
                "groups from that model (`build_groups(model)`)."
            )

        super().__init__(optimizer)
        self.groups = groups
        self.schedule = schedule
        self.target_group_sparsity = target_group_sparsity
        self.target_param_sparsity = target_param_sparsity
        self.group_divisible = group_divisible
        self.hold_zeros = hold_zeros
        self.saliency = saliency
        self.layer_shapes = layer_shapes
        self.saliency_direction = saliency_direction
        self.weights = weights
        # The activation criterion reads the groups' outputs through forward hooks, on the scoring steps only.
        self._activation = ActivationRecorder(groups) if weights.get("activation") else None

        self._counter = ParamCounter(groups)
        self._kinds = torch.tensor([KINDS.index(k) for k in groups.kinds()], dtype=torch.long)
        self._layers = groups.layers()
        self._init_budget(target_name, target)

        # Persistent state (see `state.py`): the step counter and, per group, the period that selected it.
        fresh = PruningState.fresh(len(groups))
        self._num_steps = fresh.num_steps
        self._selection_period = fresh.selection_period
        self.last_scores = fresh.last_scores  # saliency at the latest selection
        self._window = SaliencyWindow(len(groups))
        kinds = self._kinds if target_param_sparsity is not None else None
        self._scorer = Scorer(groups, weights, saliency_direction, kinds=kinds, activation=self._activation)
        # Zero gradient + zero state keeps a zero weight exactly zero in these optimizers; any other optimizer also
        # gets its pruned weights re-zeroed after every step.
        self._masks = GroupMasks(groups, hold_zeros, fixed_point=type(optimizer) in _FIXED_POINT_OPTIMIZERS)
        self._bind(params)
        # After `load_state_dict`, the next step checks that the groups the state calls pruned are zero.
        self._verify_restored = False
        if self._activation is not None:
            self._activation.enabled = self.is_scoring_step(1)

    def _init_budget(self, target_name: str, target: float) -> None:
        groups, div = self.groups, self.group_divisible
        capacity = block_capacity(groups, div)
        most = torch.zeros(len(groups), dtype=torch.bool)
        for block, cap in zip(groups.blocks, capacity.tolist(), strict=True):
            most[block.offset : block.offset + cap] = True
        if self.target_group_sparsity is not None:
            self._cost = torch.ones(len(groups), dtype=torch.float64)
            self._target_total = float(round(target * len(groups)))
            limit, unit, total = float(most.sum()), "groups", len(groups)
        else:
            self._cost = groups.numel.double()
            self._target_total = target * self._counter.total
            limit, unit, total = self._counter.count(most), "parameters", self._counter.total
        if self._target_total < 1:
            raise ValueError(f"`{target_name}`={target} removes nothing from {len(groups)} groups. Raise it.")
        if self._target_total > limit:
            raise ValueError(
                f"`{target_name}`={target} asks to remove {self._target_total:.0f} {unit}, but at most {limit:.0f} can "
                f"go while every block keeps {div} group(s) (`group_divisible`={div}). Lower "
                f"`{target_name}` to at most {limit / total:.3f}."
            )
        if div > 1:
            # Kept counts are multiples of `group_divisible`: the removable counts per block are steps of it.
            if self.target_group_sparsity is not None:
                reachable = float(reachable_groups(groups, div, int(self._target_total)))
            else:
                scores = torch.zeros(len(groups), dtype=torch.float64)
                none = torch.zeros(len(groups), dtype=torch.bool)
                chosen = select_redundant(
                    scores, none, groups, self._cost, self._target_total, self._counter.count, group_divisible=div
                )
                reachable = self._counter.count(chosen)
            if reachable < 1:
                raise ValueError(
                    f"`{target_name}`={target} with `group_divisible`={div} can remove nothing: no block can lose a "
                    f"multiple of {div} groups within the target. Raise `{target_name}` or lower `group_divisible`."
                )
            # A parameter budget is met to within a chunk's size anyway: warn about a real shortfall only.
            short = self._target_total - (
                1e-9 if self.target_group_sparsity is not None else 0.01 * self._target_total
            )
            if reachable < short:
                warnings.warn(
                    f"HESSO: `{target_name}`={target} asks to remove {self._target_total:.0f} {unit}, but with "
                    f"`group_divisible`={div} (every block keeps a multiple of {div} groups) at most {reachable:.0f} "
                    f"can go: the run will end at about {reachable / total:.3f} instead of {target}. Lower "
                    "`group_divisible` to reach the target.",
                    UserWarning,
                    stacklevel=3,
                )

    def _bind(self, params: dict[str, torch.Tensor]) -> None:
        self._params = params
        # (owning module, attribute, parameter): the per-step check that the model still holds these parameters
        # costs one dict lookup per grouped parameter in `nn.Module._parameters` (where `register_parameter` and
        # `setattr` put parameters; resolving dotted names with `get_parameter` every step costs ~100x more).
        model = self.groups.model
        self._owners = [
            (model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], p) for name, p in params.items()
        ]
        self._masks.bind(params)
        self._refresh(self._num_steps)

    # ---- The model behind the groups ----

    def _check_model(self) -> None:
        """Re-resolve the parameters when the model's were replaced after construction; raise when they no longer
        match the groups.

        Accelerate shards the model with FSDP2 *after* the Trainer built the optimizer, and swaps the optimizer's
        parameters for the sharded `DTensor` ones: the cached parameters and per-slice operations are then re-bound.
        `slim_model` instead gives the sliced projections new, smaller parameters that the base optimizer does not
        hold: the groups and the optimizer must then be rebuilt, and the step raises.
        """
        if all(module._parameters.get(attr) is p for module, attr, p in self._owners):
            return
        try:
            params = self.groups.parameters()
        except ValueError:
            params = None
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        foreign = [] if params is None else [n for n, p in params.items() if id(p) not in owned and p.requires_grad]
        shapes = (
            []
            if params is None
            else [
                n
                for n, p in params.items()
                if tuple(p.shape) != tuple(self.groups.param_shapes[n]) and not hasattr(p, "device_mesh")
            ]
        )
        if params is None or foreign or shapes:
            example = (foreign or shapes or ["(parameters missing)"])[:3]
            raise RuntimeError(
                f"The model's parameters {example} are no longer the ones this HESSO optimizer and its groups were "
                "built for (`slim_model` replaces the pruned projections, and wrapping or sharding the model after "
                "building the optimizer replaces parameters too). Rebuild the groups and the optimizer from the "
                "model as it is now: `groups = build_groups(model)`, then "
                "`HESSO(torch.optim.AdamW(model.parameters(), ...), groups, ...)`."
            )
        check_supported(params, self.groups.param_shapes)
        self._bind(params)

    # ---- Schedule ----

    @property
    def start_pruning_step(self) -> int:
        return self.schedule.start_pruning_step

    @property
    def pruning_periods(self) -> int:
        return self.schedule.pruning_periods

    @property
    def pruning_steps(self) -> int:
        return self.schedule.pruning_steps

    @property
    def period_length(self) -> int:
        return self.schedule.period_length

    @property
    def saliency_steps(self) -> int:
        return self.schedule.saliency_steps

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken (steps without any gradient are not counted)."""
        return self._num_steps

    @property
    def pruning_end_step(self) -> int:
        """The step at which the last period ends: `start_pruning_step + pruning_steps`."""
        return self.schedule.end_step

    @property
    def current_period(self) -> int:
        """-1 during warm-up, the period of the last step taken while pruning, `pruning_periods` after."""
        return self.schedule.current_period(self._num_steps)

    def _pruned_mask(self, n: int | None = None) -> torch.Tensor:
        """Bool per group: selected in a period that has ended by step `n` (default: the steps taken)."""
        n = self._num_steps if n is None else n
        sel = self._selection_period
        return (sel >= 0) & (self.schedule.period_ends()[sel.clamp_min(0)] <= n)

    def _refresh(self, n: int) -> None:
        pruned = self._pruned_mask(n)
        self._masks.refresh(pruned, (self._selection_period >= 0) & ~pruned)

    @property
    def selection_period(self) -> torch.Tensor:
        """Long per group: the period that selected it, -1 if none did (a copy)."""
        return self._selection_period.clone()

    @property
    def selected_mask(self) -> torch.Tensor:
        """Bool per group: selected so far (fading or pruned)."""
        return self._selection_period >= 0

    @property
    def grouped_parameters(self) -> dict[str, torch.Tensor]:
        """`name -> live parameter` of every parameter a group slices (re-resolved if the model was re-wrapped)."""
        return dict(self._params)

    @property
    def redundant_groups(self) -> torch.Tensor:
        """Global indices of every group selected so far (fading or pruned), ascending."""
        return (self._selection_period >= 0).nonzero().squeeze(1)

    @property
    def pruned_groups(self) -> torch.Tensor:
        """Global indices of the groups already held at exactly zero, ascending."""
        return self._pruned_mask().nonzero().squeeze(1)

    # ---- Step ----

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One base-optimizer step plus the HESSO schedule; returns the closure's loss (if any)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.has_gradients():
            # Nothing to update: the base step is a no-op and the schedule must not move.
            self.optimizer.step()
            return loss
        self._check_model()
        if self._verify_restored:
            self._verify_restored_zeros()
        n = self._num_steps + 1
        self.pruning_step(n)
        self._num_steps = n
        if self._activation is not None:
            self._activation.enabled = self.is_scoring_step(n + 1)
        return loss

    def is_scoring_step(self, n: int) -> bool:
        """Whether step `n` scores the groups (a selection step or a step of its `saliency_steps` window)."""
        phase = self.schedule.phase(n)
        return (phase is not None and phase[1] == 0) or self.schedule.in_saliency_window(n)

    def pruning_step(self, n: int) -> None:
        """Optimizer step `n` of the schedule, base step included (the counter moves to `n` after it returns).

        The hook a subclass overrides to run another schedule before HESSO's (see [`CRIC`]).
        """
        phase = self.schedule.phase(n)
        # Zero gradients of pruned groups keep their (already zero) weights and moments at zero through the base step.
        self._masks.mask_pruned(grads=True)
        if phase is not None and phase[1] == 0:
            self.last_scores = self.selection_scores(phase[0], n)
            self.select(self.last_scores, phase[0])
        elif self.schedule.in_saliency_window(n):
            self._window.add(self.score_step(), n)
        else:
            self.base_step()
        if phase is not None and phase[1] >= 1:
            period, t, length = phase
            self._masks.fade((length - t - 1) / (length - t))
            if t == length - 1:
                # The fading groups are exactly zero now: clear their base-optimizer state and hold them there.
                self._refresh(n)
                self._masks.fill_pruned(self.optimizer.state)
                return
        if not self._masks.fixed_point:
            self._masks.mask_pruned(weights=True)

    def selection_scores(self, period: int, n: int) -> torch.Tensor:
        """At the selection step `n` of `period`: base step, then the scores to select on.

        HESSO's: this step's scores averaged over the `saliency_steps` window (batches whose scores are NaN,
        infinite or all zero are left out with a warning; none usable raises). [`CRIC`] overrides it.
        """
        first = n - self.saliency_steps + 1
        return self._window.average(self.score_step(), n, period, first)

    # ---- The interface CRIC (and other schedules) build on ----

    def base_step(self) -> None:
        """The base optimizer's step alone."""
        self.optimizer.step()

    def score_step(self) -> torch.Tensor:
        """The base optimizer's step, then the saliency of every group on it (CPU float64, high = important)."""
        return self._scorer.step_and_score(self.optimizer, self._params)

    def budget_mask(
        self, scores: torch.Tensor, selected: torch.Tensor | None = None, fraction: float = 1.0
    ) -> torch.Tensor:
        """Bool per group: the least salient groups outside `selected` that bring the removal to `fraction` of the
        target (one global ranking; every block keeps `group_divisible`, kept counts stay multiples of it).

        With `target_param_sparsity` groups are ranked by saliency per parameter relative to their kind's mean.
        Raises `RuntimeError` when `scores` are NaN, infinite or all zero (the ranking would follow group indices).
        """
        scores = scores.detach().cpu().double()
        problem = score_problem(scores)
        if problem is not None:
            raise RuntimeError(
                f"HESSO cannot rank the groups at optimizer step {self._num_steps + 1}: their scores are {problem}, "
                "and a selection on them would remove groups in index order. Check the loss and the gradients "
                "(NaN or infinite loss, fp16 overflow, a learning rate so high that the weights diverged)."
            )
        if selected is None:
            selected = torch.zeros(len(self.groups), dtype=torch.bool)
        if self.target_group_sparsity is not None:
            budget = float(round(self._target_total * fraction))

            def removed(mask: torch.Tensor) -> float:
                return float(mask.sum())

        else:
            budget = self._target_total * fraction
            removed = self._counter.count
            scores = self._kind_relative(scores / self._cost) * self._cost  # ranked by `scores / cost` below
        select = select_uniform if self.layer_shapes == "uniform" else select_redundant
        return select(scores, selected, self.groups, self._cost, budget, removed, group_divisible=self.group_divisible)

    def select(self, scores: torch.Tensor, period: int) -> torch.Tensor:
        """Add the least salient groups to the redundant set for `period`; returns their indices."""
        new = self.budget_mask(scores, self._selection_period >= 0, (period + 1) / self.pruning_periods)
        self._selection_period[new] = period
        self._refresh(self._num_steps)
        return new.nonzero().squeeze(1)

    def zero_groups(self, mask: torch.Tensor) -> None:
        """Set the weights of the groups in `mask` (bool per group) to exactly zero (not their optimizer state)."""
        self._masks.zero_groups(mask)

    def fade(self, mask: torch.Tensor, factor: float) -> None:
        """Multiply every slice of the groups in `mask` (bool per group) by `factor`."""
        self._masks.fade_groups(mask, factor)

    def begin_projection(self, step: int) -> None:
        """Start HESSO's pruning periods right after optimizer step `step`: for a schedule that decides late, as CRIC
        does once its cycles end (and when it restores such a state). Call it before the first selection."""
        self.schedule = Schedule(step, self.schedule.pruning_periods, self.schedule.pruning_steps, 1)
        self._refresh(self._num_steps)

    def _kind_relative(self, per_param: torch.Tensor) -> torch.Tensor:
        """`per_param` divided by its mean over the groups of the same kind (see `target_param_sparsity`)."""
        sums = torch.zeros(len(KINDS), dtype=torch.float64).index_add_(0, self._kinds, per_param)
        counts = torch.bincount(self._kinds, minlength=len(KINDS)).clamp_min(1).double()
        means = (sums / counts)[self._kinds]
        return per_param / torch.where(means > 0, means, torch.ones_like(means))

    def settings(self) -> dict[str, Any]:
        """The target, schedule and saliency settings, as resolved here (preset weights, default saliency steps).

        The one source of the *HESSO settings* of a model card: `save_slim(..., optimizer=)` and
        `HESSOTrainer.save_model()` both record this dict (with the settings the optimizer does not know: the group
        kinds, the distillation). `CRIC` adds its own.
        """
        return {
            "target_group_sparsity": self.target_group_sparsity,
            "target_param_sparsity": self.target_param_sparsity,
            "start_pruning_step": self.start_pruning_step,
            "pruning_periods": self.pruning_periods,
            "pruning_steps": self.pruning_steps,
            "importance_criteria": {k: v for k, v in self.weights.items() if v},
            "saliency": self.saliency,
            "saliency_direction": self.saliency_direction,
            "saliency_steps": self.saliency_steps,
            "group_divisible": self.group_divisible,
            "layer_shapes": self.layer_shapes,
        }

    # ---- Checkpointing ----

    def _pruning_state(self) -> PruningState:
        return PruningState(
            self._num_steps, self._selection_period, self.last_scores, self._window.sum, self._window.count
        )

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a `"hesso"` entry (tensors and plain values only)."""
        out = dict(self.optimizer.state_dict())
        out[STATE_KEY] = pack_state(self._pruning_state(), self.schedule)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`; its `"hesso"` entry is validated field by field (see `state.py`)."""
        if STATE_KEY not in state_dict:
            raise ValueError(
                "`state_dict` has no 'hesso' entry: it was saved from a plain optimizer, not from `HESSO`. Load it "
                "into the base optimizer before wrapping (`HESSO(base, ...)` after `base.load_state_dict(...)`)."
            )
        state_dict = dict(state_dict)
        restored = unpack_state(state_dict.pop(STATE_KEY), self.schedule, len(self.groups))
        self.optimizer.load_state_dict(state_dict)
        self._num_steps = restored.num_steps
        self._selection_period = restored.selection_period
        self.last_scores = restored.last_scores
        self._window.sum = restored.saliency_sum
        self._window.count = restored.saliency_count
        self._refresh(self._num_steps)
        self._verify_restored = True

    def _verify_restored_zeros(self) -> None:
        """The groups a restored state calls pruned must be exactly zero in the model (checked at the next step,
        when the model's weights are surely loaded too)."""
        self._verify_restored = False
        pruned = self._pruned_mask()
        if not bool(pruned.any()):
            return
        params = {name: p.detach() for name, p in self._params.items()}
        squares = group_squared_norms(self.groups, params, self._masks.ops)
        alive = pruned & (squares > 0)
        if bool(alive.any()):
            raise ValueError(
                f"The restored HESSO state (`num_steps`={self._num_steps}, `selection_period`) says "
                f"{int(pruned.sum())} groups are pruned, but {int(alive.sum())} of them are not zero in the model. "
                "The optimizer state does not belong to these weights (or was edited): resume the model and the "
                "optimizer from the same checkpoint, and load the model's weights before stepping."
            )

    # ---- Metrics ----

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Flat `hesso/*` metrics: sparsity, pruned groups per kind and per layer, parameters removed, norms."""
        selected = self._selection_period >= 0
        pruned = self._pruned_mask()
        num = len(self.groups)
        removed = self._counter.count(pruned)
        out = {
            "hesso/step": float(self._num_steps),
            "hesso/period": float(self.current_period),
            "hesso/selected_groups": float(selected.sum()),
            "hesso/pruned_groups": float(pruned.sum()),
            "hesso/group_sparsity": float(pruned.sum()) / num,
            "hesso/params_removed": removed,
            "hesso/param_sparsity": removed / self._counter.total,
        }
        for i, kind in enumerate(KINDS):
            of_kind = self._kinds == i
            if bool(of_kind.any()):
                out[f"hesso/pruned_groups/{kind}"] = float((pruned & of_kind).sum())
        for layer in torch.unique(self._layers).tolist():
            out[f"hesso/pruned_groups/layer_{layer}"] = float((pruned & (self._layers == layer)).sum())
        params = {name: p.detach() for name, p in self._params.items()}
        squares = group_squared_norms(self.groups, params, self._masks.ops)
        out["hesso/norm_important"] = float(squares[~selected].sum().sqrt())
        out["hesso/norm_redundant"] = float(squares[selected].sum().sqrt())
        return out

    def __repr__(self) -> str:
        target = (
            f"target_group_sparsity={self.target_group_sparsity}"
            if self.target_group_sparsity is not None
            else f"target_param_sparsity={self.target_param_sparsity}"
        )
        return (
            f"HESSO({type(self.optimizer).__name__}, groups={len(self.groups)}, {target}, "
            f"start_pruning_step={self.start_pruning_step}, pruning_periods={self.pruning_periods}, "
            f"pruning_steps={self.pruning_steps}, step={self._num_steps})"
        )
