"""`HESSOConfig`: the training arguments of `HESSOTrainer`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from .groups import KINDS
from .optim.cric import check_cric_settings
from .optim.hesso import check_saliency_steps, check_target
from .optim.saliency import CRITERIA

# Saliency criteria of HESSO (the paper's five in its order, then `taylor_elementwise`); `HESSOConfig` has one
# `importance_<name>` weight each.
IMPORTANCE_CRITERIA = tuple(CRITERIA)


# `HESSOConfig` settings that score groups with the elementwise Taylor criterion on the raw gradient: measured to
# rank an LLM's groups far better than the paper's mix (README, *Quality*). Not with LoRA (see `saliency_direction`).
GRADIENT_SALIENCY: dict[str, Any] = {
    **{f"importance_{name}": 0.0 for name in IMPORTANCE_CRITERIA},
    "importance_taylor_elementwise": 1.0,
    "saliency_direction": "gradient",
}


@dataclass
class HESSOConfig(TrainingArguments):
    r"""
    Training arguments of [`HESSOTrainer`]: every argument of [`~transformers.TrainingArguments`], plus the knobs of
    HESSO (train and structurally prune in one run). All step counts are optimizer steps, i.e. after gradient
    accumulation, the same unit as `max_steps`.

    Parameters:
        target_group_sparsity (`float`, *optional*):
            Fraction of all prunable groups (MLP channels, attention heads, key/value groups, query slots) to remove,
            in `(0, 1)`. Every group counts as one unit whatever its size. Set exactly one of `target_group_sparsity`
            and `target_param_sparsity`.
        target_param_sparsity (`float`, *optional*):
            Fraction of the parameters held by prunable groups to remove, in `(0, 1)`, with a cost-aware ranking
            (a large attention head weighs more than a small MLP channel). Set exactly one of the two targets.
        start_pruning_step (`int`, *optional*, defaults to `0`):
            Optimizer steps of plain training (warm-up) before the first selection of redundant groups.
        pruning_periods (`int`, *optional*, defaults to `1`):
            Number of periods the removal is split into; each period selects `1 / pruning_periods` of the target
            and fades those groups to exactly zero over the period.
        pruning_steps (`int`, *optional*):
            Optimizer steps over which pruning happens, starting at `start_pruning_step`; each period lasts
            `pruning_steps // pruning_periods` steps, which must be at least 2. Required: pruning must end at or
            before the last planned optimizer step.
        importance_magnitude (`float`, *optional*, defaults to `0.2`):
            Weight of the saliency criterion `||x_g||` (group norm).
        importance_avg_magnitude (`float`, *optional*, defaults to `0.2`):
            Weight of the saliency criterion `||x_g|| / n_g` (group norm per element).
        importance_cosine_similarity (`float`, *optional*, defaults to `0.2`):
            Weight of the saliency criterion `cos(x_g, d_g) + 1` (alignment of the group with its update direction).
        importance_taylor_first_order (`float`, *optional*, defaults to `0.2`):
            Weight of the saliency criterion `|<x_g, d_g>|` (first-order Taylor estimate of the loss change).
        importance_taylor_second_order (`float`, *optional*, defaults to `0.2`):
            Weight of the saliency criterion `0.5 * <x_g, d_g>^2`.
        importance_taylor_elementwise (`float`, *optional*, defaults to `0.0`):
            Weight of the criterion `sum_i |x_i * d_i|` over a group's elements (not in the paper; LLM-Pruner's
            element-wise importance). With `saliency_direction="gradient"` it ranks LLM groups far better than the
            paper's mix (README, *Quality*); the LLaMA recipe uses that pair.
        saliency_direction (`str`, *optional*, defaults to `"update"`):
            Direction `d_g` of the criteria: `"update"`, the base optimizer's processed step (the paper's), or
            `"gradient"`, the raw gradient of the scoring step (no transient copy of the grouped weights; not with
            LoRA). See [`HESSO`].
        saliency_steps (`int`, *optional*, defaults to `1`):
            Number of optimizer steps (each on its own batch) whose scores every selection averages: the period's
            first step and the `saliency_steps - 1` steps before it. At most `start_pruning_step + 1` and, with
            several periods, at most the period length. Not with `cric` (CRIC accumulates its own scores over its
            cycles). See [`HESSO`].
        prune_kinds (`list[str]`, *optional*):
            Which kinds of groups may be pruned, among `"mlp_channel"`, `"head"`, `"kv_group"`, `"query_slot"`,
            `"expert_channel"`, `"shared_expert_channel"` and the whole-sublayer kinds `"attention_sublayer"` and
            `"mlp_sublayer"` (see docs/depth.md). Default: every width kind the architecture supports (no sublayers).
        group_divisible (`int`, *optional*, defaults to `1`):
            The number of groups kept in every block (one kind in one layer) is rounded to a multiple of this value,
            e.g. 8 or 64 for MLP widths that suit matrix kernels and tensor parallelism.
        layer_shapes (`str`, *optional*, defaults to `"free"`):
            `"free"`: every layer ends with its own sizes; the slim model ships its code (`trust_remote_code`).
            `"uniform"`: every layer keeps the same number of heads / key-value groups / MLP channels and only whole
            layers go (with `prune_kinds` including both `"attention_sublayer"` and `"mlp_sublayer"`), so that the
            saved model is the stock class (`to_stock`), loadable with nothing imported and by serving engines. A
            kind whose reachable counts the stock config cannot express (Llama's `hidden_size % heads`) is refused
            before training, with the fix. See docs/depth.md.
        cric (`bool`, *optional*, defaults to `False`):
            Identify the redundant groups with the Corrective Redundant Identification Cycle ([`CRIC`]) before one
            HESSO period of `pruning_steps` steps projects them to zero: block probing by the loss, then corrective
            cycles. Requires `pruning_periods=1`. The Trainer hands the loss of each step to the optimizer.
        cric_start_step (`int`, *optional*):
            Warm-up optimizer steps before CRIC starts. Defaults to `start_pruning_step`.
        cric_sampling_steps (`int`, *optional*, defaults to `10`):
            Optimizer steps per cycle (a candidate set fades to zero over them), at least 2.
        cric_max_cycles (`int`, *optional*, defaults to `5`):
            Most corrective cycles, at least 1. The run must plan for the worst case: CRIC then takes
            `1 + blocks * len(cric_trial_ratios) + cric_max_cycles * cric_sampling_steps` steps before the projection.
        cric_tolerance (`int`, *optional*, defaults to `0`):
            A cycle that finds at most this many new violating groups ends the search.
        cric_trial_ratios (`list[float]`, *optional*, defaults to `[0.25, 0.5, 0.75]`):
            Fractions of every block that the probes zero, each in `(0, 1)`.
        cric_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the block-sensitivity penalty from the probes' loss ratios, `>= 0`.
    """

    target_group_sparsity: float | None = field(
        default=None,
        metadata={"help": "Fraction of all prunable groups to remove, in (0, 1). Set exactly one target."},
    )
    target_param_sparsity: float | None = field(
        default=None,
        metadata={"help": "Fraction of the prunable parameters to remove, in (0, 1). Set exactly one target."},
    )
    start_pruning_step: int = field(
        default=0, metadata={"help": "Optimizer steps of plain training before the first selection."}
    )
    pruning_periods: int = field(default=1, metadata={"help": "Number of pruning periods."})
    pruning_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps over which pruning happens (each period lasts at least 2 steps)."},
    )
    importance_magnitude: float = field(default=0.2, metadata={"help": "Weight of the group-norm criterion."})
    importance_avg_magnitude: float = field(
        default=0.2, metadata={"help": "Weight of the group-norm-per-element criterion."}
    )
    importance_cosine_similarity: float = field(
        default=0.2, metadata={"help": "Weight of the cosine(weight, update direction) criterion."}
    )
    importance_taylor_first_order: float = field(
        default=0.2, metadata={"help": "Weight of the first-order Taylor criterion."}
    )
    importance_taylor_second_order: float = field(
        default=0.2, metadata={"help": "Weight of the second-order Taylor criterion."}
    )
    importance_taylor_elementwise: float = field(
        default=0.0, metadata={"help": "Weight of the elementwise Taylor criterion sum |x * d| (not in the paper)."}
    )
    saliency_direction: str = field(
        default="update",
        metadata={
            "help": "Direction of the saliency criteria: 'update' (base optimizer step, the paper's) or 'gradient'.",
            "choices": ["update", "gradient"],
        },
    )
    saliency_steps: int = field(
        default=1,
        metadata={"help": "Optimizer steps (batches) whose scores every selection averages (the last is its first)."},
    )
    prune_kinds: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Kinds of groups that may be pruned, among {list(KINDS)}. Default: every width kind (add "
            "attention_sublayer / mlp_sublayer to let HESSO remove whole sublayers)."
        },
    )
    group_divisible: int = field(
        default=1, metadata={"help": "Round the number of kept groups of every block to a multiple of this."}
    )

    save_adapters_separately: bool = field(
        default=False,
        metadata={
            "help": "For a peft LoRA model: `save_model()` writes the slim base model plus the sliced adapter (in "
            "`adapter/`) instead of one merged slim model."
        },
    )

    cric: bool = field(default=False, metadata={"help": "Identify the redundant groups with CRIC first."})
    cric_start_step: int | None = field(
        default=None, metadata={"help": "Optimizer steps before CRIC starts (default: start_pruning_step)."}
    )
    cric_sampling_steps: int = field(default=10, metadata={"help": "Optimizer steps per CRIC cycle (>= 2)."})
    cric_max_cycles: int = field(default=5, metadata={"help": "Most CRIC cycles (>= 1)."})
    cric_tolerance: int = field(
        default=0, metadata={"help": "A cycle with at most this many new violating groups ends the search."}
    )
    cric_trial_ratios: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        metadata={"help": "Fractions of every block zeroed by the CRIC probes, each in (0, 1)."},
    )
    cric_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the CRIC block-sensitivity penalty."})
    layer_shapes: str = field(
        default="free",
        metadata={
            "help": "'free': every layer ends with its own sizes (the slim model ships its code). 'uniform': every "
            "layer keeps the same counts and only whole layers go, so the result saves as the stock class "
            "(checked before training)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_target(self.target_group_sparsity, self.target_param_sparsity)
        if self.start_pruning_step < 0:
            raise ValueError(f"`start_pruning_step` must be >= 0, got {self.start_pruning_step}.")
        if self.pruning_periods < 1:
            raise ValueError(f"`pruning_periods` must be >= 1, got {self.pruning_periods}.")
        if self.pruning_steps is None:
            raise ValueError(
                "`pruning_steps` is required: the number of optimizer steps over which the groups are removed, "
                f"e.g. `pruning_steps={2 * self.pruning_periods * 10}` for {self.pruning_periods} period(s) of 20 steps."
            )
        if self.pruning_steps // self.pruning_periods < 2:
            raise ValueError(
                f"`pruning_steps` ({self.pruning_steps}) // `pruning_periods` ({self.pruning_periods}) = "
                f"{self.pruning_steps // self.pruning_periods} optimizer steps per period, but a period needs at "
                f"least 2. Raise `pruning_steps` to at least {2 * self.pruning_periods} or lower `pruning_periods`."
            )
        if self.max_steps > 0:
            self.check_schedule_fits(self.max_steps)
        if self.layer_shapes not in ("free", "uniform"):
            raise ValueError(f"`layer_shapes` must be 'free' or 'uniform', got {self.layer_shapes!r}.")
        if self.layer_shapes == "uniform" and self.cric:
            raise ValueError(
                "`layer_shapes='uniform'` is not available with `cric=True` (CRIC ranks single groups); use HESSO "
                "(`cric=False`) or `layer_shapes='free'`."
            )
        if self.saliency_direction not in ("update", "gradient"):
            raise ValueError(
                f"`saliency_direction` must be 'update' (the paper's) or 'gradient', got {self.saliency_direction!r}."
            )
        self._check_saliency_steps()
        weights = self.importance_criteria
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative or not any(weights.values()):
            raise ValueError(
                f"The importance weights must be >= 0 with at least one > 0, got {weights}. Set e.g. "
                "`importance_magnitude=1.0` and the others to 0 to rank by group norm only."
            )
        if self.prune_kinds is not None:
            if isinstance(self.prune_kinds, str):
                self.prune_kinds = [self.prune_kinds]
            unknown = [k for k in self.prune_kinds if k not in KINDS]
            if unknown or not self.prune_kinds:
                raise ValueError(
                    f"`prune_kinds` must be a non-empty list of kinds among {list(KINDS)}, got {self.prune_kinds}. "
                    "Leave it unset to prune every kind the architecture supports."
                )
        if self.group_divisible < 1:
            raise ValueError(
                f"`group_divisible` must be >= 1, got {self.group_divisible}. Use 1 for no rounding of kept counts."
            )
        self._check_cric()

    def _check_saliency_steps(self) -> None:
        k = self.saliency_steps
        check_saliency_steps(k, self.start_pruning_step, self.pruning_steps, self.pruning_periods)
        if k > 1 and self.cric:
            raise ValueError(
                f"`saliency_steps`={k} applies to HESSO's periods; with `cric=True` CRIC accumulates its own scores "
                "over its cycles. Leave `saliency_steps` at 1 with CRIC."
            )

    def _check_cric(self) -> None:
        ratios = check_cric_settings(
            self.resolved_cric_start_step,
            self.cric_sampling_steps,
            self.cric_max_cycles,
            self.cric_tolerance,
            self.cric_trial_ratios,
            self.cric_loss_weight,
            prefix="cric_",
        )
        self.cric_trial_ratios = list(ratios)
        if self.cric and self.pruning_periods != 1:
            raise ValueError(
                f"`cric=True` projects the final set in one period, but `pruning_periods`={self.pruning_periods}. "
                "Set `pruning_periods=1` (`pruning_steps` is then the length of that period)."
            )

    @property
    def resolved_cric_start_step(self) -> int:
        """The step at which CRIC starts: `cric_start_step`, or `start_pruning_step` when unset."""
        return self.start_pruning_step if self.cric_start_step is None else self.cric_start_step

    @property
    def pruning_end_step(self) -> int:
        """The optimizer step at which the last pruning period ends (`start_pruning_step + pruning_steps`)."""
        return self.start_pruning_step + self.pruning_steps

    @property
    def importance_criteria(self) -> dict[str, float]:
        """The saliency weights as the `importance_criteria` dict of [`HESSO`]."""
        return {name: getattr(self, f"importance_{name}") for name in IMPORTANCE_CRITERIA}

    def check_schedule_fits(self, planned_steps: int) -> None:
        """Raise a `ValueError` when pruning does not end by `planned_steps`, the number of optimizer steps."""
        if self.pruning_end_step > planned_steps:
            unit = "`max_steps`" if self.max_steps > 0 else "the planned number of optimizer steps"
            raise ValueError(
                f"The pruning schedule ends at optimizer step `start_pruning_step` + `pruning_steps` = "
                f"{self.start_pruning_step} + {self.pruning_steps} = {self.pruning_end_step}, after {unit} "
                f"({planned_steps}; optimizer steps count after gradient accumulation). Lower `start_pruning_step` "
                f"or `pruning_steps` so that they sum to at most {planned_steps}, or train longer."
            )


def parse_script_args(script_class: type, defaults: dict[str, Any], argv: list[str] | None = None) -> tuple:
    """Parse a script's own dataclass and `HESSOConfig` from the command line, with script-specific defaults.

    `defaults` override `HESSOConfig`'s defaults (any flag given on the command line wins). As `HESSOConfig` takes
    exactly one target, a `--target_group_sparsity` flag drops a default `target_param_sparsity`.

    Returns:
        `tuple`: `(script_args, hesso_config)`.
    """
    argv = sys.argv[1:] if argv is None else argv
    defaults = dict(defaults)
    if any(arg.split("=")[0] == "--target_group_sparsity" for arg in argv):
        defaults.pop("target_param_sparsity", None)
    parser = HfArgumentParser((script_class, HESSOConfig))
    parser.set_defaults(**defaults)
    return tuple(parser.parse_args_into_dataclasses(args=argv))
