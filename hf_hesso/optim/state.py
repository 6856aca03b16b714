"""HESSO's persistent state: what `state_dict()` stores beside the base optimizer's state, and its validation.

The state is O(number of groups): the step counter, the period that selected each group (-1: never), the scores
of the latest selection and the running sum of the current saliency window. `unpack_state` checks a restored entry
field by field (types, shapes, ranges of period ids, step counts against the schedule) and names the field in
its error, so an edited or mismatched checkpoint fails at load with a clear message instead of deep inside a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .schedule import Schedule

STATE_KEY = "hesso"


@dataclass
class PruningState:
    """The persistent state of [`HESSO`] (all tensors on the CPU)."""

    num_steps: int
    selection_period: torch.Tensor  # long (num_groups,): period that selected the group, -1 never
    last_scores: torch.Tensor  # float64 (num_groups,): scores of the latest selection
    saliency_sum: torch.Tensor  # float64 (num_groups,): sum of the usable scores of the current window
    saliency_count: int  # number of window steps in `saliency_sum`

    @classmethod
    def fresh(cls, num_groups: int) -> PruningState:
        return cls(
            num_steps=0,
            selection_period=torch.full((num_groups,), -1, dtype=torch.long),
            last_scores=torch.zeros(num_groups, dtype=torch.float64),
            saliency_sum=torch.zeros(num_groups, dtype=torch.float64),
            saliency_count=0,
        )


def schedule_key(schedule: Schedule) -> list[int]:
    return [schedule.start_pruning_step, schedule.pruning_periods, schedule.pruning_steps, schedule.saliency_steps]


def pack_state(state: PruningState, schedule: Schedule) -> dict[str, Any]:
    """The `"hesso"` entry of `HESSO.state_dict()` (tensors and plain values only: loadable with `weights_only`)."""
    return {
        "num_steps": state.num_steps,
        "selection_period": state.selection_period.clone(),
        "last_scores": state.last_scores.clone(),
        "num_groups": len(state.selection_period),
        "schedule": schedule_key(schedule),
        "saliency_sum": state.saliency_sum.clone(),
        "saliency_count": state.saliency_count,
    }


def state_error(field: str, problem: str, entry: str = "HESSO") -> ValueError:
    """The error of an invalid restored field (`entry` names the optimizer whose state it is)."""
    return ValueError(
        f"The restored {entry} state is invalid: `{field}` {problem}. The checkpoint's optimizer state was edited or "
        "belongs to another run; resume from an unmodified checkpoint of this run."
    )


def restored_int(ours: dict[str, Any], field: str, entry: str = "HESSO") -> int:
    """`ours[field]` as an `int` (a one-element integer tensor is accepted), else `state_error`."""
    value = ours.get(field)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise state_error(field, f"must be an integer, got {value!r}", entry)
    return value


def restored_tensor(
    ours: dict[str, Any], field: str, shape: tuple[int, ...], dtype: torch.dtype, entry: str = "HESSO"
) -> torch.Tensor:
    """`ours[field]` as a CPU tensor of `shape` and `dtype`, else `state_error` naming the field."""
    value = ours.get(field)
    try:
        t = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError):
        raise state_error(field, f"must be a tensor of shape {shape}, got {type(value).__name__}", entry) from None
    if tuple(t.shape) != tuple(shape):
        what = " (one value per group)" if len(shape) == 1 else ""
        raise state_error(field, f"has shape {tuple(t.shape)}, expected {tuple(shape)}{what}", entry)
    if dtype.is_floating_point and t.is_complex():
        raise state_error(field, f"has dtype {t.dtype}, expected floating point", entry)
    if not dtype.is_floating_point and t.is_floating_point():
        raise state_error(field, f"has dtype {t.dtype}, expected integers", entry)
    return t.to("cpu", dtype).clone()


def unpack_state(ours: dict[str, Any], schedule: Schedule, num_groups: int) -> PruningState:
    """Validate a restored `"hesso"` entry against this optimizer's groups and schedule; raises `ValueError`."""
    if not isinstance(ours, dict):
        raise state_error("hesso", f"must be a dict, got {type(ours).__name__}")
    missing = [k for k in ("num_steps", "selection_period", "last_scores", "num_groups", "schedule") if k not in ours]
    if missing:
        raise state_error(missing[0], "is missing")
    key = schedule_key(schedule)
    try:
        saved = [int(v) for v in ours["schedule"]]
    except (TypeError, ValueError):
        raise state_error("schedule", f"must be a list of integers, got {ours['schedule']!r}") from None
    saved += [1] * (len(key) - len(saved))  # saved before `saliency_steps` existed: it was 1
    saved_groups = restored_int(ours, "num_groups")
    if saved_groups != num_groups or saved != key:
        raise ValueError(
            f"`state_dict` was saved for {saved_groups} groups and schedule (start_pruning_step, "
            f"pruning_periods, pruning_steps, saliency_steps) = {saved}, but this optimizer has "
            f"{num_groups} groups and {key}. Rebuild the optimizer with the settings of the run you "
            "resume."
        )
    num_steps = restored_int(ours, "num_steps")
    if num_steps < 0:
        raise state_error("num_steps", f"is {num_steps}, but a step count is >= 0")
    period = restored_tensor(ours, "selection_period", (num_groups,), torch.long)
    periods = schedule.pruning_periods
    low, high = int(period.min()) if num_groups else -1, int(period.max()) if num_groups else -1
    if low < -1 or high >= periods:
        raise state_error(
            "selection_period",
            f"holds period ids from {low} to {high}, but they must lie in -1 (never selected) ... {periods - 1} "
            f"(`pruning_periods`={periods})",
        )
    if high >= 0 and schedule.selection_step(high) > num_steps:
        raise state_error(
            "num_steps",
            f"is {num_steps}, but groups were selected in pruning period {high + 1}, which starts at step "
            f"{schedule.selection_step(high)}",
        )
    last_scores = restored_tensor(ours, "last_scores", (num_groups,), torch.float64)
    if "saliency_sum" in ours:
        saliency_sum = restored_tensor(ours, "saliency_sum", (num_groups,), torch.float64)
    else:
        saliency_sum = torch.zeros(num_groups, dtype=torch.float64)
    taken = schedule.window_steps_taken(num_steps)
    if "saliency_count" in ours:
        count = restored_int(ours, "saliency_count")
        if not 0 <= count <= taken:
            raise state_error(
                "saliency_count",
                f"is {count}, but after step {num_steps} the saliency window holds {taken} step(s) at most",
            )
    else:
        count = taken  # saved before the count existed: every window step counted
    return PruningState(num_steps, period, last_scores, saliency_sum, count)
