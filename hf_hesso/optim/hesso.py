"""`HESSO`: an optimizer wrapper that trains and progressively prunes zero-invariant groups (Chen et al., 2024).

The wrapped base optimizer does every ordinary update; `HESSO` adds, per optimizer step, at most:
- multiplying the gradients of the groups pruned in earlier periods by zero (before the base step): with zero
  gradient, zero moments and a zero weight, every torch built-in optimizer leaves the weight exactly zero, so the
  pruned groups stay zero in the weights and in the base optimizer's state;
- at the first step of a period, scoring every group (saliency from the weights and the base optimizer's own update
  direction `d = (p_before - p_after) / lr`) and marking the globally least salient groups as this period's
  redundant set;
- multiplying this period's redundant groups by `(T - t - 1) / (T - t)`, which fades them linearly to exactly zero
  at the period's last step while they keep receiving gradient updates; at that step every base-optimizer state
  tensor shaped like the parameter is zeroed for them;
- for optimizers outside the known fixed-point set, re-zeroing the pruned weights after the step.
The per-step passes multiply each affected slice by a per-group vector (0 pruned / factor fading / 1 other), built
once per period: measured on CPU, one vectorised multiply over the slice beats `index_fill_`/`index_copy_` on the
affected rows and columns by 2-3x. Persistent extra state is O(number of groups): the step counter, the period that
selected each group and the latest scores.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ..groups import KINDS, QUERY_SLOT, SUBLAYER_KINDS, Block, GroupSet, Slice
from ..groups.peft import adapter_parameters, effective_weights
from .distributed import SliceOps, check_supported, group_squared_norms, local
from .saliency import SaliencyAccumulator, check_criteria, saliency_scores
from .selection import ParamCounter, block_capacity, select_redundant
from .uniform import LAYER_SHAPES, check_uniform_groups, select_uniform

_STATE_KEY = "hesso"
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


def _group_shape(s: Slice, p: torch.Tensor) -> list[int]:
    """Shape that broadcasts a per-group vector over `s.view(p)`."""
    shape = [1] * (p.dim() + 2)
    shape[s.dim + 1] = s.n
    return shape


def check_target(target_group_sparsity: float | None, target_param_sparsity: float | None) -> tuple[str, float]:
    """Check that exactly one target is set, in (0, 1); returns `(name, value)` of the one given."""
    given = {
        name: value
        for name, value in (
            ("target_group_sparsity", target_group_sparsity),
            ("target_param_sparsity", target_param_sparsity),
        )
        if value is not None
    }
    if len(given) != 1:
        raise ValueError(
            "Set exactly one of `target_group_sparsity` and `target_param_sparsity`, got "
            f"target_group_sparsity={target_group_sparsity}, target_param_sparsity={target_param_sparsity}. Use "
            "`target_group_sparsity` for a fraction of the groups (the paper's knob) or `target_param_sparsity` for "
            "a fraction of the prunable parameters."
        )
    ((name, value),) = given.items()
    if not 0 < value < 1:
        raise ValueError(f"`{name}` must lie in (0, 1), got {value}. Pass a fraction such as 0.4 (remove 40%).")
    return name, value


def check_saliency_steps(
    saliency_steps: int, start_pruning_step: int, pruning_steps: int, pruning_periods: int
) -> None:
    """Check that the `saliency_steps` window of every selection fits the schedule (see [`HESSO`])."""
    k = saliency_steps
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`saliency_steps` must be an integer >= 1, got {k!r}.")
    if k > start_pruning_step + 1:
        raise ValueError(
            f"`saliency_steps`={k} averages the first selection over its step and the {k - 1} steps before it, but "
            f"`start_pruning_step`={start_pruning_step} leaves only {start_pruning_step} warm-up steps. Raise "
            f"`start_pruning_step` to at least {k - 1} or lower `saliency_steps` to at most {start_pruning_step + 1}."
        )
    period = pruning_steps // pruning_periods
    if pruning_periods > 1 and k > period:
        raise ValueError(
            f"`saliency_steps`={k} is longer than a pruning period ({period} steps = `pruning_steps` // "
            "`pruning_periods`), so the windows of two selections would overlap. Lower `saliency_steps` or lengthen "
            "the periods."
        )


class HESSO(Optimizer):
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
        pruning_steps (`int`, *optional*, defaults to `1`):
            Optimizer steps over which pruning happens; `pruning_steps // pruning_periods` must be at least 2.
        importance_criteria (`dict[str, float]`, *optional*):
            Weights of the saliency criteria: the paper's `magnitude`, `avg_magnitude`, `cosine_similarity`,
            `taylor_first_order`, `taylor_second_order`, and `taylor_elementwise` (`sum |x * d|` over a group's
            elements; not in the paper). Missing ones weigh 0. Defaults to the paper's: 0.2 for each of its five.
        saliency_steps (`int`, *optional*, defaults to `1`):
            Number of optimizer steps whose scores every selection averages: the period's first step and the
            `saliency_steps - 1` steps just before it (the end of the warm-up for the first period, the end of the
            previous period for the others), each scored on its own batch, as the Taylor calibration of one-shot
            pruners sums over several batches. At most `start_pruning_step + 1` and, with several periods, at most
            the period length `pruning_steps // pruning_periods`. Every step in a window costs what a scoring step
            costs (one pass over the grouped weights; one O(groups) all-reduce under FSDP2); the running sum is
            O(groups) of state. Not used by [`CRIC`], which accumulates its own scores over its cycles.
        saliency_direction (`str`, *optional*, defaults to `"update"`):
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
        pruning_steps: int = 1,
        importance_criteria: dict[str, float] | None = None,
        group_divisible: int = 1,
        hold_zeros: str = "auto",
        saliency_direction: str = "update",
        saliency_steps: int = 1,
        layer_shapes: str = "free",
    ):
        if not isinstance(optimizer, Optimizer):
            raise ValueError(
                f"`optimizer` must be a `torch.optim.Optimizer` instance, got {type(optimizer).__name__}. Build the "
                "base optimizer first, e.g. `HESSO(torch.optim.AdamW(model.parameters(), lr=1e-4), groups, ...)`."
            )
        if not isinstance(groups, GroupSet):
            raise ValueError(f"`groups` must be a `GroupSet` from `build_groups(model)`, got {type(groups).__name__}.")
        if len(groups) == 0:
            raise ValueError("`groups` is empty: the model has no prunable groups. Build them with more kinds/layers.")
        target_name, target = check_target(target_group_sparsity, target_param_sparsity)
        for name, value, low in (
            ("start_pruning_step", start_pruning_step, 0),
            ("pruning_periods", pruning_periods, 1),
            ("group_divisible", group_divisible, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        if not isinstance(pruning_steps, int) or pruning_steps // pruning_periods < 2:
            raise ValueError(
                f"`pruning_steps` ({pruning_steps}) // `pruning_periods` ({pruning_periods}) must be at least 2 "
                "optimizer steps per period (T >= 2), so that a group can fade before it reaches zero. Raise "
                f"`pruning_steps` to at least {2 * pruning_periods} or lower `pruning_periods`."
            )
        check_saliency_steps(saliency_steps, start_pruning_step, pruning_steps, pruning_periods)
        if hold_zeros not in ("auto", "always"):
            raise ValueError(f"`hold_zeros` must be 'auto' or 'always', got {hold_zeros!r}.")
        if saliency_direction not in ("update", "gradient"):
            raise ValueError(
                f"`saliency_direction` must be 'update' (the base optimizer's step, the paper's) or 'gradient' (the "
                f"raw gradient), got {saliency_direction!r}."
            )
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
        self.layer_shapes = layer_shapes
        self.saliency_direction = saliency_direction
        self.saliency_steps = saliency_steps
        self.weights = check_criteria(importance_criteria)

        # Resolve the live parameters once and check that the base optimizer updates every one of them.
        # FSDP1 flat parameters and DeepSpeed ZeRO-3 partitions hide the rows and columns that the groups cut.
        base = {
            f"param_groups[{i}][{j}]": p
            for i, g in enumerate(optimizer.param_groups)
            for j, p in enumerate(g["params"])
        }
        check_supported(base, {})
        self._params = groups.parameters()
        check_supported(self._params, groups.param_shapes)
        # Per-slice operations on the (local shard of the) parameter; under FSDP2 they map local rows to groups.
        self._ops = {s: SliceOps(s, self._params[s.param]) for b in groups.blocks for s in b.slices}
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # Frozen parameters (`requires_grad=False`: a LoRA model's base weights) are faded and zeroed, never stepped.
        foreign = [name for name, p in self._params.items() if id(p) not in owned and p.requires_grad]
        if foreign:
            raise ValueError(
                f"`groups` slice parameters that `optimizer` does not update, e.g. {foreign[:3]} ({len(foreign)} in "
                "all). Build the optimizer from the same model's parameters (`model.parameters()`) and build the "
                "groups from that model (`build_groups(model)`)."
            )

        self.optimizer = optimizer
        self.groups = groups
        # Where the first grouped parameter sits in the optimizer: `_sync_params` notices when it is swapped.
        self._probe = self._probe_position(next(n for n, p in self._params.items() if id(p) in owned))
        self.target_group_sparsity = target_group_sparsity
        self.target_param_sparsity = target_param_sparsity
        self.start_pruning_step = start_pruning_step
        self.pruning_periods = pruning_periods
        self.pruning_steps = pruning_steps
        self.period_length = pruning_steps // pruning_periods
        self.group_divisible = group_divisible
        self.hold_zeros = hold_zeros

        self._counter = ParamCounter(groups)
        self._kinds = torch.tensor([KINDS.index(k) for k in groups.kinds()], dtype=torch.long)
        self._layers = groups.layers()
        capacity = block_capacity(groups, group_divisible)
        most = torch.zeros(len(groups), dtype=torch.bool)
        for block, cap in zip(groups.blocks, capacity.tolist(), strict=True):
            most[block.offset : block.offset + cap] = True
        if target_group_sparsity is not None:
            self._cost = torch.ones(len(groups), dtype=torch.float64)
            self._target_total = float(round(target_group_sparsity * len(groups)))
            limit, unit = float(most.sum()), "groups"
        else:
            self._cost = groups.numel.double()
            self._target_total = target_param_sparsity * self._counter.total
            limit, unit = self._counter.count(most), "parameters"
        if self._target_total < 1:
            raise ValueError(f"`{target_name}`={target} removes nothing from {len(groups)} groups. Raise it.")
        if self._target_total > limit:
            raise ValueError(
                f"`{target_name}`={target} asks to remove {self._target_total:.0f} {unit}, but at most {limit:.0f} can "
                f"go while every block keeps {group_divisible} group(s) (`group_divisible`={group_divisible}). Lower "
                f"`{target_name}` to at most {limit / (len(groups) if unit == 'groups' else self._counter.total):.3f}."
            )

        # Persistent state: the step counter and, per group, the period that selected it (-1: never).
        self._num_steps = 0
        self._selection_period = torch.full((len(groups),), -1, dtype=torch.long)
        self.last_scores = torch.zeros(len(groups), dtype=torch.float64)  # saliency at the latest selection
        # Sum of the scores of the steps of the current `saliency_steps` window before its selection step.
        self._saliency_sum = torch.zeros(len(groups), dtype=torch.float64)
        self._pruned_index: list[tuple[Block, torch.Tensor]] = []
        self._pruned_slices: list[tuple[Slice, torch.Tensor]] = []
        self._guarded_slices: list[tuple[Slice, torch.Tensor]] = []
        # (parameter name, view shape, exponent) per parameter dimension that fading groups cut: see `_fade`.
        self._fading: list[tuple[str, tuple[int, ...], torch.Tensor]] = []
        # Zero gradient + zero state keeps a zero weight exactly zero in these optimizers; any other optimizer also
        # gets its pruned weights re-zeroed after every step.
        self._fixed_point = type(optimizer) in _FIXED_POINT_OPTIMIZERS

        # What `torch.optim.Optimizer.__init__` sets up for step hooks and profiling; its parameter handling is
        # skipped on purpose, as `param_groups` belongs to the base optimizer.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    def _probe_position(self, name: str) -> tuple[int, int, str]:
        p = self._params[name]
        for i, group in enumerate(self.optimizer.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    return i, j, name
        raise ValueError(f"`optimizer` does not update {name!r}; build it from `model.parameters()`.")

    def _sync_params(self) -> None:
        """Re-resolve the parameters when they were replaced after construction (O(1) when they were not).

        Accelerate shards the model with FSDP2 *after* the Trainer built the optimizer, and swaps the optimizer's
        parameters for the sharded `DTensor` ones: the cached parameters and per-slice operations are then stale.
        """
        i, j, name = self._probe
        groups = self.optimizer.param_groups
        if i < len(groups) and j < len(groups[i]["params"]) and groups[i]["params"][j] is self._params[name]:
            return
        self._params = self.groups.parameters()
        check_supported(self._params, self.groups.param_shapes)
        owned = {id(p) for group in groups for p in group["params"]}
        foreign = [n for n, p in self._params.items() if id(p) not in owned and p.requires_grad]
        if foreign:
            raise ValueError(
                f"The model's parameters {foreign[:3]} are no longer the ones `optimizer` updates. Shard or wrap the "
                "model before building the optimizer and `HESSO`."
            )
        self._probe = self._probe_position(name)
        self._ops = {s: SliceOps(s, self._params[s.param]) for b in self.groups.blocks for s in b.slices}
        self._refresh_indices()

    # ---- Delegation to the base optimizer (never cache its param_groups: Accelerate and schedulers edit them) ----

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ---- Schedule ----

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken (steps without any gradient are not counted)."""
        return self._num_steps

    @property
    def pruning_end_step(self) -> int:
        """The step at which the last period ends: `start_pruning_step + pruning_steps`."""
        return self.start_pruning_step + self.pruning_steps

    @property
    def current_period(self) -> int:
        """-1 during warm-up, the period of the last step taken while pruning, `pruning_periods` after."""
        n = self._num_steps
        if n <= self.start_pruning_step:
            return -1
        if n >= self.pruning_end_step:
            return self.pruning_periods
        return min((n - self.start_pruning_step - 1) // self.period_length, self.pruning_periods - 1)

    def _period_length(self, period: int) -> int:
        if period < self.pruning_periods - 1:
            return self.period_length
        return self.pruning_steps - (self.pruning_periods - 1) * self.period_length

    def _period_end(self, period: int) -> int:
        return self.start_pruning_step + period * self.period_length + self._period_length(period)

    def _phase(self, n: int) -> tuple[int, int, int] | None:
        """`(period, t, period length)` of step `n` (t = 0 at the period's first step), or None outside pruning."""
        i = n - self.start_pruning_step - 1
        if not 0 <= i < self.pruning_steps:
            return None
        period = min(i // self.period_length, self.pruning_periods - 1)
        return period, i - period * self.period_length, self._period_length(period)

    def _pruned_mask(self) -> torch.Tensor:
        sel = self._selection_period
        ends = torch.tensor([self._period_end(p) for p in range(self.pruning_periods)], dtype=torch.long)
        return (sel >= 0) & (ends[sel.clamp_min(0)] <= self._num_steps)

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
        if not any(p.grad is not None for group in self.optimizer.param_groups for p in group["params"]):
            # Nothing to update: the base step is a no-op and the schedule must not move.
            self.optimizer.step()
            return loss
        self._sync_params()
        n = self._num_steps + 1
        phase = self._phase(n)
        # Zero gradients of pruned groups keep their (already zero) weights and moments at zero through the base step.
        self._mask_pruned(grads=True)
        if phase is not None and phase[1] == 0:
            self._step_and_select(phase[0])
        elif self._in_saliency_window(n):
            self._saliency_sum += self._step_and_score().cpu().double()
        else:
            self.optimizer.step()
        self._num_steps = n
        if phase is not None and phase[1] >= 1:
            period, t, length = phase
            self._fade((length - t - 1) / (length - t))
            if t == length - 1:
                # The fading groups are exactly zero now: clear their base-optimizer state and hold them there.
                self._refresh_indices()
                self._fill(self._pruned_index, weights=True, state=True)
                return loss
        if not self._fixed_point:
            self._mask_pruned(weights=True)
        return loss

    def _in_saliency_window(self, n: int) -> bool:
        """Whether step `n` is one of the `saliency_steps - 1` steps just before a selection step."""
        if self.saliency_steps == 1:
            return False
        i = n - self.start_pruning_step - 1  # selection steps are at i = period * period_length
        if i < 0:
            distance = -i
        else:
            upcoming = i // self.period_length + 1
            if upcoming >= self.pruning_periods:
                return False
            distance = upcoming * self.period_length - i
        return distance <= self.saliency_steps - 1

    def _step_and_select(self, period: int) -> None:
        """Base step, then score every group (averaged over the `saliency_steps` window) and select."""
        scores = self._saliency_sum + self._step_and_score().cpu().double()
        self._saliency_sum.zero_()
        self.last_scores = scores / self.saliency_steps
        self.select(self.last_scores, period)

    def _step_and_score(self) -> torch.Tensor:
        """Base step; returns the saliency of every group with direction `d = (p_before - p_after) / lr`."""
        if self.saliency_direction == "gradient":
            return self._step_and_score_gradient()
        # LoRA: projections are scored on the effective weight `W0 + s * B @ A` (under the base weight's name, whose
        # slices cover the same rows/columns); the adapter slices then add nothing on their own.
        adapters = self.groups.adapters
        skip = {n for ads in adapters.values() for ad in ads for n in (ad.a, ad.b, ad.b_bias) if n is not None}
        before = {
            name: p.detach().clone()
            for name, p in self._params.items()
            if name not in skip and name not in adapters and p.requires_grad
        }
        # The adapters' `A`/`B` of every LoRA projection, also those no group slices (`A` of a row-only projection).
        lora_params = {**adapter_parameters(self.groups), **self._params} if adapters else {}
        eff_before = effective_weights(adapters, lora_params) if adapters else {}
        lrs = {id(p): group["lr"] for group in self.optimizer.param_groups for p in group["params"]}
        self.optimizer.step()
        device = next(iter(self._params.values())).device
        acc = SaliencyAccumulator(self.groups, device=device)
        for name, x in effective_weights(adapters, lora_params).items() if adapters else ():
            lr = float(lrs[id(lora_params[adapters[name][0].b])])
            d = eff_before.pop(name).sub_(x)
            acc.add(name, x, d.div_(lr) if lr != 0 else d)
        for name, p in self._params.items():
            if name in skip or name in adapters:
                continue
            if not p.requires_grad:
                # A frozen parameter does not move: direction zero.
                acc.add(name, p.detach(), torch.zeros_like(p))
                continue
            lr = float(lrs[id(p)])
            x = before.pop(name)
            if lr != 0:
                d = x.float().sub_(p.float()).div_(lr)
            elif p.grad is not None:
                d = p.grad  # no step was taken: fall back to the raw gradient
            else:
                d = torch.zeros_like(p)
            acc.add(name, p.detach(), d)
        return self._scores(acc)

    def _step_and_score_gradient(self) -> torch.Tensor:
        """Base step; returns the saliency of every group with the raw gradient as direction (`x` after the step)."""
        self.optimizer.step()
        device = next(iter(self._params.values())).device
        acc = SaliencyAccumulator(self.groups, device=device)
        for name, p in self._params.items():
            acc.add(name, p.detach(), p.grad if p.grad is not None else torch.zeros_like(p))
        return self._scores(acc)

    def _scores(self, acc: SaliencyAccumulator) -> torch.Tensor:
        """The weighted criteria of the accumulated statistics (one all-reduce under FSDP2)."""
        # A parameter budget ranks groups of different kinds against each other: see `saliency_scores(kinds=)`.
        kinds = self._kinds if self.target_param_sparsity is not None else None
        return saliency_scores(acc.finish(), self.weights, kinds=kinds)

    def select(self, scores: torch.Tensor, period: int) -> torch.Tensor:
        """Add the least salient groups to the redundant set for `period`; returns their indices."""
        selected = self._selection_period >= 0
        fraction = (period + 1) / self.pruning_periods
        if self.target_group_sparsity is not None:
            budget = float(round(self._target_total * fraction))

            def removed(mask: torch.Tensor) -> float:
                return float(mask.sum())

        else:
            budget = self._target_total * fraction
            removed = self._counter.count
        scores = scores.cpu().double()
        if self.target_param_sparsity is not None:
            scores = self._kind_relative(scores / self._cost) * self._cost  # ranked by `scores / cost` below
        select = select_uniform if self.layer_shapes == "uniform" else select_redundant
        new = select(scores, selected, self.groups, self._cost, budget, removed, group_divisible=self.group_divisible)
        self._selection_period[new] = period
        self._refresh_indices()
        return new.nonzero().squeeze(1)

    def _kind_relative(self, per_param: torch.Tensor) -> torch.Tensor:
        """`per_param` divided by its mean over the groups of the same kind (see `target_param_sparsity`)."""
        sums = torch.zeros(len(KINDS), dtype=torch.float64).index_add_(0, self._kinds, per_param)
        counts = torch.bincount(self._kinds, minlength=len(KINDS)).clamp_min(1).double()
        means = (sums / counts)[self._kinds]
        return per_param / torch.where(means > 0, means, torch.ones_like(means))

    # ---- Index operations on the affected rows/columns only ----

    def _refresh_indices(self) -> None:
        """Per-block indices and per-slice multipliers of pruned and fading groups; rebuilt when they change."""
        pruned = self._pruned_mask()
        fading = (self._selection_period >= 0) & ~pruned
        self._pruned_index = self._block_indices(pruned)
        self._pruned_slices = []
        self._guarded_slices = []
        minimal = self.hold_zeros == "auto" and self._fixed_point
        for block, idx in self._pruned_index:
            p = self._params[block.slices[0].param]
            keep = torch.ones(block.n, dtype=p.dtype, device=p.device).index_fill_(0, idx, 0)
            for s in block.slices:
                entry = (s, self._ops[s].factor(keep))
                self._pruned_slices.append(entry)
                # See `hold_zeros`: only a pruned query slot's output columns (dim 1) can still get gradient, and a
                # pruned whole sublayer's output bias (the loss still reads it): those few slices are guarded.
                if not minimal or (block.kind == QUERY_SLOT and s.dim == 1) or block.kind in SUBLAYER_KINDS:
                    self._guarded_slices.append(entry)
        self._refresh_fading(self._block_indices(fading))

    def _refresh_fading(self, index: list[tuple[Block, torch.Tensor]]) -> None:
        """Merge the fading groups' slices per (parameter, dimension) into one exponent vector each.

        A fading step multiplies every affected tensor once, by `factor ** exponent` with one exponent per `unit`
        consecutive indices along the dimension (the number of fading groups that cover them: 0, 1, or 2 where a
        fading kv-group and a fading query slot share a head's rows), so its cost is one pass per tensor, whatever
        the number of kinds that cut it. The vectors hold one value per group-sized unit (per local row of a
        row-sharded parameter), not per element.
        """
        slices: dict[tuple[str, int], list[tuple[SliceOps, torch.Tensor]]] = {}
        for block, idx in index:
            for s in block.slices:
                slices.setdefault((s.param, s.dim), []).append((self._ops[s], idx))
        self._fading = []
        for (name, dim), entries in slices.items():
            t = local(self._params[name].data)
            unit = 1 if entries[0][0].rows is not None else math.gcd(*(ops.slice.inner for ops, _ in entries))
            exponent = torch.zeros(t.shape[dim] // unit, dtype=t.dtype, device=t.device)
            for ops, idx in entries:
                member = torch.zeros(ops.slice.n, dtype=t.dtype, device=t.device).index_fill_(0, idx, 1)
                exponent += ops.expand(member, unit)
            shape = (*t.shape[:dim], t.shape[dim] // unit, unit, *t.shape[dim + 1 :])
            self._fading.append((name, shape, exponent.view([-1 if i == dim else 1 for i in range(len(shape))])))

    def _block_indices(self, mask: torch.Tensor) -> list[tuple[Block, torch.Tensor]]:
        out = []
        for block in self.groups.blocks:
            idx = mask[block.offset : block.offset + block.n].nonzero().squeeze(1)
            if idx.numel():
                out.append((block, idx.to(self._params[block.slices[0].param].device)))
        return out

    # The per-step passes multiply whole slices by a per-group vector: measured on CPU, 2-3x faster than
    # index_fill_/index_copy_ on the affected rows and columns (and scattered columns touch every cache line anyway).
    def _mask_pruned(self, grads: bool = False, weights: bool = False) -> None:
        """Multiply the gradients (of the guarded slices, see `hold_zeros`) and/or weights of pruned groups by zero."""
        for s, keep in self._guarded_slices if grads else self._pruned_slices:
            p = self._params[s.param]
            for t in (p.grad if grads else None, p.data if weights else None):
                if t is not None:
                    self._ops[s].target(t).mul_(keep if keep.dtype == t.dtype else keep.to(t.dtype))

    def _fade(self, factor: float) -> None:
        """Multiply the weights of this period's redundant groups by `factor` (one pass per affected tensor)."""
        for name, shape, exponent in self._fading:
            local(self._params[name].data).view(shape).mul_(torch.pow(factor, exponent))

    def _fill(self, index: list[tuple[Block, torch.Tensor]], weights: bool = False, state: bool = False) -> None:
        """Set the given groups to exactly zero in the weights and/or every parameter-shaped base state tensor."""
        for block, idx in index:
            for s in block.slices:
                p = self._params[s.param]
                targets = [p.data] if weights else []
                if state:
                    targets.extend(
                        v
                        for v in self.optimizer.state.get(p, {}).values()
                        if isinstance(v, torch.Tensor) and v.shape == p.shape
                    )
                for t in targets:
                    self._ops[s].fill_(t, idx)

    def settings(self) -> dict[str, Any]:
        """The target, schedule and saliency settings, as the model card records them."""
        return {
            "target_group_sparsity": self.target_group_sparsity,
            "target_param_sparsity": self.target_param_sparsity,
            "start_pruning_step": self.start_pruning_step,
            "pruning_periods": self.pruning_periods,
            "pruning_steps": self.pruning_steps,
            "importance_criteria": {k: v for k, v in self.weights.items() if v},
            "saliency_direction": self.saliency_direction,
            "saliency_steps": self.saliency_steps,
            "group_divisible": self.group_divisible,
            "layer_shapes": self.layer_shapes,
        }

    # ---- Checkpointing ----

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a `"hesso"` entry (tensors and plain values only)."""
        out = dict(self.optimizer.state_dict())
        out[_STATE_KEY] = {
            "num_steps": self._num_steps,
            "selection_period": self._selection_period.clone(),
            "last_scores": self.last_scores.clone(),
            "num_groups": len(self.groups),
            "schedule": self._schedule(),
            "saliency_sum": self._saliency_sum.clone(),
        }
        return out

    def _schedule(self) -> list[int]:
        return [self.start_pruning_step, self.pruning_periods, self.pruning_steps, self.saliency_steps]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _STATE_KEY not in state_dict:
            raise ValueError(
                "`state_dict` has no 'hesso' entry: it was saved from a plain optimizer, not from `HESSO`. Load it "
                "into the base optimizer before wrapping (`HESSO(base, ...)` after `base.load_state_dict(...)`)."
            )
        state_dict = dict(state_dict)
        ours = state_dict.pop(_STATE_KEY)
        schedule = self._schedule()
        saved = [int(v) for v in ours["schedule"]]
        saved += [1] * (len(schedule) - len(saved))  # saved before `saliency_steps` existed: it was 1
        if int(ours["num_groups"]) != len(self.groups) or saved != schedule:
            raise ValueError(
                f"`state_dict` was saved for {ours['num_groups']} groups and schedule (start_pruning_step, "
                f"pruning_periods, pruning_steps, saliency_steps) = {saved}, but this optimizer has "
                f"{len(self.groups)} groups and {schedule}. Rebuild the optimizer with the settings of the run you "
                "resume."
            )
        self.optimizer.load_state_dict(state_dict)
        self._num_steps = int(ours["num_steps"])
        self._selection_period = torch.as_tensor(ours["selection_period"]).detach().to("cpu", torch.long).clone()
        self.last_scores = torch.as_tensor(ours["last_scores"]).detach().to("cpu", torch.float64).clone()
        if "saliency_sum" in ours:
            self._saliency_sum = torch.as_tensor(ours["saliency_sum"]).detach().to("cpu", torch.float64).clone()
        else:
            self._saliency_sum.zero_()
        self._refresh_indices()

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
        squares = group_squared_norms(self.groups, params, self._ops)
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
