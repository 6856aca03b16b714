"""The pruning schedule and every check of HESSO's and CRIC's settings, in one place.

[`HESSO`], [`CRIC`] and `HESSOConfig` all validate through this module, so each rule has one message:

- `Schedule`: the frozen step arithmetic (warm-up, periods, saliency windows), validated on construction;
- `check_pruning_settings`: the target, the saliency criteria and direction, `group_divisible`, `hold_zeros`;
- `check_cric_settings`: CRIC's knobs.

Types are checked before values: a step count that is not an `int` (or is a `bool`), criteria that are not a
dict, a target that is not a number raise `TypeError`; a value out of range raises `ValueError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import torch

from .saliency import CRITERIA, PAPER_CRITERIA

DEFAULT_WEIGHT = 0.2
DEFAULT_TRIAL_RATIOS = (0.25, 0.5, 0.75)
HOLD_ZEROS = ("auto", "always")
SALIENCY_DIRECTIONS = ("update", "gradient")


def check_int(name: str, value, low: int, why: str = "") -> int:
    """`value` as an `int >= low`: `TypeError` for a non-integer (or a `bool`), `ValueError` below `low`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer >= {low}{why}, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}{why}, got {value!r}.")
    return value


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    return float(value)


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
    value = _check_real(name, value)
    if not 0 < value < 1:
        raise ValueError(f"`{name}` must lie in (0, 1), got {value}. Pass a fraction such as 0.4 (remove 40%).")
    return name, value


def check_criteria(importance_criteria: dict[str, float] | None) -> dict[str, float]:
    """Validate the saliency weights; missing criteria weigh 0, `None` gives the paper's five `DEFAULT_WEIGHT` each.

    `HESSOConfig` passes its `importance_<name>` fields as this dict, so the messages name both spellings.
    """
    if importance_criteria is None:
        return {name: DEFAULT_WEIGHT if name in PAPER_CRITERIA else 0.0 for name in CRITERIA}
    if not isinstance(importance_criteria, dict):
        raise TypeError(
            f"`importance_criteria` must be a dict of criterion name -> weight, got {importance_criteria!r}. "
            f"Pass e.g. {{'magnitude': 1.0}}; criteria: {list(CRITERIA)}."
        )
    unknown = [name for name in importance_criteria if name not in CRITERIA]
    if unknown:
        raise ValueError(f"`importance_criteria` names unknown criteria {unknown}. Choose among {list(CRITERIA)}.")
    weights = {name: _check_real(f"importance_{name}", importance_criteria.get(name, 0.0)) for name in CRITERIA}
    bad = {k: v for k, v in weights.items() if not (v >= 0 and math.isfinite(v))}
    if bad or not any(weights.values()):
        raise ValueError(
            f"The importance weights (`importance_criteria`, or the `importance_<criterion>` fields of HESSOConfig) "
            f"must be finite and >= 0 with at least one > 0, got {importance_criteria}. Set e.g. "
            "{'magnitude': 1.0} (`importance_magnitude=1.0` and the others 0) to rank by group norm only."
        )
    return weights


def check_choice(name: str, value, choices: Sequence[str], meaning: str = "") -> str:
    if not isinstance(value, str) or value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be {options}{meaning}, got {value!r}.")
    return value


def check_pruning_settings(
    *,
    target_group_sparsity: float | None,
    target_param_sparsity: float | None,
    importance_criteria: dict[str, float] | None,
    group_divisible: int,
    hold_zeros: str = "auto",
    saliency_direction: str = "update",
) -> tuple[str, float, dict[str, float]]:
    """Every setting of HESSO but the schedule; returns `(target name, target, criteria weights)`."""
    target_name, target = check_target(target_group_sparsity, target_param_sparsity)
    check_int("group_divisible", group_divisible, 1, " (use 1 for no rounding of the kept counts)")
    check_choice("hold_zeros", hold_zeros, HOLD_ZEROS)
    check_choice(
        "saliency_direction",
        saliency_direction,
        SALIENCY_DIRECTIONS,
        " (the base optimizer's step, the paper's; or the raw gradient)",
    )
    return target_name, target, check_criteria(importance_criteria)


def check_cric_settings(
    start_step: int,
    sampling_steps: int,
    max_cycles: int,
    tolerance: int,
    trial_ratios: Sequence[float],
    loss_weight: float,
    prefix: str = "",
) -> tuple[float, ...]:
    """Validate the CRIC knobs (named `{prefix}<knob>` in the errors; the first is `HESSOConfig.cric_start_step` with
    the prefix `"cric_"`, `CRIC(start_pruning_step=...)` without); returns the trial ratios as a tuple."""
    check_int(f"{prefix}start_step" if prefix else "start_pruning_step", start_step, 0)
    check_int(
        f"{prefix}sampling_steps",
        sampling_steps,
        2,
        " (a candidate set fades over the steps of a cycle, so a cycle needs 2)",
    )
    check_int(f"{prefix}max_cycles", max_cycles, 1)
    check_int(f"{prefix}tolerance", tolerance, 0)
    if isinstance(trial_ratios, (int, float)):
        trial_ratios = [trial_ratios]
    ratios = tuple(trial_ratios) if trial_ratios is not None else ()
    if not ratios or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < 1 for r in ratios):
        raise ValueError(
            f"`{prefix}trial_ratios` must be a non-empty list of fractions in (0, 1), got {trial_ratios!r}. Use e.g. "
            f"{list(DEFAULT_TRIAL_RATIOS)} (the paper's ratios)."
        )
    loss_weight = _check_real(f"{prefix}loss_weight", loss_weight)
    if not (loss_weight >= 0 and math.isfinite(loss_weight)):
        raise ValueError(
            f"`{prefix}loss_weight` must be a finite number >= 0, got {loss_weight!r}. Use 0 to ignore the probing "
            "sensitivity, 1.0 for the default penalty."
        )
    return tuple(float(r) for r in ratios)


@dataclass(frozen=True)
class Schedule:
    """HESSO's pruning schedule in optimizer steps `n = 1, 2, ...`; validated on construction.

    `start_pruning_step` steps of warm-up, then `pruning_periods` periods of `period_length = pruning_steps //
    pruning_periods` steps (the last one also takes the remainder). Period `p` selects at its first step
    `start_pruning_step + p * period_length + 1` and ends (its groups are exactly zero) at `period_end(p)`. Every
    selection averages the scores of a window of `saliency_steps` steps that ends at its selection step.
    """

    start_pruning_step: int
    pruning_periods: int
    pruning_steps: int
    saliency_steps: int = 1

    def __post_init__(self):
        check_int("start_pruning_step", self.start_pruning_step, 0)
        check_int("pruning_periods", self.pruning_periods, 1)
        if self.pruning_steps is None:
            raise ValueError(
                "`pruning_steps` is required: the number of optimizer steps over which the groups are removed, "
                f"e.g. `pruning_steps={20 * self.pruning_periods}` for {self.pruning_periods} period(s) of 20 steps."
            )
        check_int("pruning_steps", self.pruning_steps, 1)
        if self.pruning_steps // self.pruning_periods < 2:
            raise ValueError(
                f"`pruning_steps` ({self.pruning_steps}) // `pruning_periods` ({self.pruning_periods}) = "
                f"{self.pruning_steps // self.pruning_periods} optimizer steps per period, but a period needs at least "
                "2 (T >= 2) so that a group can fade before it reaches zero. Raise `pruning_steps` to at least "
                f"{2 * self.pruning_periods} or lower `pruning_periods`."
            )
        k = check_int("saliency_steps", self.saliency_steps, 1)
        if k > self.start_pruning_step + 1:
            raise ValueError(
                f"`saliency_steps`={k} averages the first selection over its step and the {k - 1} steps before it, "
                f"but `start_pruning_step`={self.start_pruning_step} leaves only {self.start_pruning_step} warm-up "
                f"steps. Raise `start_pruning_step` to at least {k - 1} or lower `saliency_steps` to at most "
                f"{self.start_pruning_step + 1}."
            )
        if self.pruning_periods > 1 and k > self.period_length:
            raise ValueError(
                f"`saliency_steps`={k} is longer than a pruning period ({self.period_length} steps = `pruning_steps` "
                "// `pruning_periods`), so the windows of two selections would overlap. Lower `saliency_steps` or "
                "lengthen the periods."
            )

    @property
    def period_length(self) -> int:
        """`T = pruning_steps // pruning_periods` (the last period also takes the remainder)."""
        return self.pruning_steps // self.pruning_periods

    @property
    def end_step(self) -> int:
        """The step at which the last period ends: `start_pruning_step + pruning_steps`."""
        return self.start_pruning_step + self.pruning_steps

    def length(self, period: int) -> int:
        """Number of steps of `period`."""
        if period < self.pruning_periods - 1:
            return self.period_length
        return self.pruning_steps - (self.pruning_periods - 1) * self.period_length

    def selection_step(self, period: int) -> int:
        """The step at which `period` selects its groups (its first step)."""
        return self.start_pruning_step + period * self.period_length + 1

    def period_end(self, period: int) -> int:
        """The step at whose end the groups of `period` are exactly zero."""
        return self.start_pruning_step + period * self.period_length + self.length(period)

    def period_ends(self) -> torch.Tensor:
        """`period_end(p)` for every period, as a long tensor."""
        return torch.tensor([self.period_end(p) for p in range(self.pruning_periods)], dtype=torch.long)

    def phase(self, n: int) -> tuple[int, int, int] | None:
        """`(period, t, period length)` of step `n` (t = 0 at the period's first step), or None outside pruning."""
        i = n - self.start_pruning_step - 1
        if not 0 <= i < self.pruning_steps:
            return None
        period = min(i // self.period_length, self.pruning_periods - 1)
        return period, i - period * self.period_length, self.length(period)

    def current_period(self, n: int) -> int:
        """After `n` steps: -1 during warm-up, the period of step `n` while pruning, `pruning_periods` after."""
        if n <= self.start_pruning_step:
            return -1
        if n >= self.end_step:
            return self.pruning_periods
        return min((n - self.start_pruning_step - 1) // self.period_length, self.pruning_periods - 1)

    def window_position(self, n: int) -> int | None:
        """For a step `n` of a saliency window before a selection: how many window steps precede it (0-based).

        None when `n` is not one of the `saliency_steps - 1` steps just before a selection step.
        """
        if self.saliency_steps == 1:
            return None
        i = n - self.start_pruning_step - 1  # selection steps are at i = period * period_length
        if i < 0:
            distance = -i
        else:
            upcoming = i // self.period_length + 1
            if upcoming >= self.pruning_periods:
                return None
            distance = upcoming * self.period_length - i
        if distance > self.saliency_steps - 1:
            return None
        return self.saliency_steps - 1 - distance

    def in_saliency_window(self, n: int) -> bool:
        """Whether step `n` is one of the `saliency_steps - 1` steps just before a selection step."""
        return self.window_position(n) is not None

    def window_steps_taken(self, n: int) -> int:
        """After `n` steps: how many steps of the next selection's window (before its selection step) are done."""
        position = self.window_position(n)
        return 0 if position is None else position + 1
