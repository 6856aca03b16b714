"""`HESSOConfig`: the training arguments of `HESSOTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from .distill import check_distill_settings
from .groups import KINDS
from .optim.presets import SALIENCY_CHOICES, default_saliency_steps, resolve_saliency
from .optim.saliency import CRITERIA
from .optim.schedule import Schedule, check_cric_settings, check_pruning_settings
from .optim.uniform import LAYER_SHAPES

# Saliency criteria of HESSO (the paper's five in its order, then `taylor_elementwise`, `activation`); `HESSOConfig`
# has one `importance_<name>` weight each.
IMPORTANCE_CRITERIA = tuple(CRITERIA)
# The criteria that read the direction `d` (the others read only the weights or the activations).
DIRECTION_CRITERIA = ("cosine_similarity", "taylor_first_order", "taylor_second_order", "taylor_elementwise")


def check_update_direction(
    saliency: str, weights: dict[str, float], direction: str, learning_rate: float, lora: bool
) -> None:
    """Refuse scoring on the update direction with `learning_rate=0`: every update is zero, so the criteria that
    read it (`DIRECTION_CRITERIA`) are constant and the selection silently rests on the others alone."""
    used = [name for name in DIRECTION_CRITERIA if weights.get(name)]
    if direction != "update" or not used or learning_rate != 0:
        return
    rest = [name for name, w in weights.items() if w and name not in DIRECTION_CRITERIA]
    outcome = f"on {', '.join(rest)} alone" if rest else "on nothing (ties)"
    fix = (
        "With LoRA the gradient of the merged weight is not available: use a positive `learning_rate`, or "
        "`saliency='activation'`."
        if lora
        else "Use `saliency='taylor'` (the default: it reads the raw gradient, whatever the learning rate), or "
        "`saliency_direction='gradient'`, or a positive `learning_rate`."
    )
    raise ValueError(
        f"`saliency={saliency!r}`{' with LoRA' if lora else ''} scores groups with {', '.join(used)} on the update "
        "direction (the base optimizer's step), but `learning_rate` is 0: every update is zero, so those criteria "
        f"are the same for every group and the groups would be selected {outcome}. {fix}"
    )


@dataclass
class HESSOConfig(TrainingArguments):
    r"""
    Training arguments of [`HESSOTrainer`]: every argument of [`~transformers.TrainingArguments`], plus the knobs of
    HESSO (train and structurally prune in one run). All step counts are optimizer steps, i.e. after gradient
    accumulation, the same unit as `max_steps`.

    Parameters:
        > Targets and schedule: what to remove, and over which optimizer steps

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

        > Saliency: how the groups are ranked

        saliency (`str`, *optional*):
            Saliency preset: `"taylor"` (the default: elementwise Taylor on the raw gradient; with LoRA,
            `taylor_first_order` on the update), `"paper"` (HESSO's mix, 0.2 each of its five criteria, update
            direction), `"activation"` (the activation criterion) or `"custom"` (the `importance_*` weights you set).
            Default: `"custom"` when any `importance_*` weight is set, else `"taylor"`. See `docs/saliency.md`.
            A criterion on the update direction with `learning_rate=0` is refused (every update is zero).
        saliency_direction (`str`, *optional*):
            Direction `d_g` of the criteria: `"update"`, the base optimizer's processed step (the paper's), or
            `"gradient"`, the raw gradient of the scoring step (no transient copy of the grouped weights; not with
            LoRA). Default: the preset's (`"gradient"` for `"taylor"`, `"update"` for `"paper"`, for `"custom"` and,
            with LoRA, for every preset). See [`HESSO`].
        saliency_steps (`int`, *optional*):
            Number of optimizer steps (each on its own batch) whose scores every selection averages: the period's
            first step and the `saliency_steps - 1` steps before it. At most `start_pruning_step + 1` and, with
            several periods, at most the period length. Default: `min(4, start_pruning_step + 1, period length)` (4
            measured better than 1, `benchmarks/README.md`, *Schedule search*); 1 with `cric` (CRIC accumulates its
            own scores over its cycles). See [`HESSO`].
        importance_magnitude (`float`, *optional*):
            Weight of the saliency criterion `||x_g||` (group norm). Setting any `importance_*` weight scores with
            your own weights (`saliency="custom"`; the weights not set count 0).
        importance_avg_magnitude (`float`, *optional*):
            Weight of the saliency criterion `||x_g|| / n_g` (group norm per element).
        importance_cosine_similarity (`float`, *optional*):
            Weight of the saliency criterion `cos(x_g, d_g) + 1` (alignment of the group with its update direction).
        importance_taylor_first_order (`float`, *optional*):
            Weight of the saliency criterion `|<x_g, d_g>|` (first-order Taylor estimate of the loss change).
        importance_taylor_second_order (`float`, *optional*):
            Weight of the saliency criterion `0.5 * <x_g, d_g>^2`.
        importance_taylor_elementwise (`float`, *optional*):
            Weight of the criterion `sum_i |x_i * d_i|` over a group's elements (not in the paper; LLM-Pruner's
            element-wise importance): the default preset `saliency="taylor"` (see `docs/saliency.md`).
        importance_activation (`float`, *optional*):
            Weight of the activation criterion `||a_g||`, the magnitude of the group's output on the scoring batches
            (Minitron; forward-only, through forward hooks). Not with `cric`.

        > Kinds and shapes: which groups may go, and what shapes the layers may end with

        prune_kinds (`list[str]`, *optional*):
            Which kinds of groups may be pruned, among `"mlp_channel"`, `"head"`, `"kv_group"`, `"query_slot"`,
            `"expert_channel"`, `"shared_expert_channel"`, the whole-sublayer kinds `"attention_sublayer"` and
            `"mlp_sublayer"` (see docs/depth.md), and `"hidden_channel"` (residual-stream channels, RMSNorm
            families; see docs/hidden.md). Default: every width kind the architecture supports (no sublayers, no
            hidden channels).
        hidden_channel_unit (`int`, *optional*):
            Residual-stream channels per `hidden_channel` group (consecutive); must divide the hidden size. Default
            1, and 8 in mixture-of-experts families (their fused expert kernels need a multiple of 8).
        group_divisible (`int`, *optional*, defaults to `1`):
            The number of groups kept in every block (one kind in one layer) is rounded to a multiple of this value,
            e.g. 8 or 64 for MLP widths that suit matrix kernels and tensor parallelism. When the target cannot be
            reached exactly with such multiples, building the optimizer warns with the reachable figure.
        layer_shapes (`str`, *optional*, defaults to `"free"`):
            `"free"`: every layer ends with its own sizes; the slim model ships its code (`trust_remote_code`).
            `"uniform"`: every layer keeps the same number of heads / key-value groups / MLP channels and only whole
            layers go (with `prune_kinds` including both `"attention_sublayer"` and `"mlp_sublayer"`), so that the
            saved model is the stock class (`to_stock`), loadable with nothing imported and by serving engines. A
            kind whose reachable counts the stock config cannot express (Llama's `hidden_size % heads`) is refused
            before training, with the fix. See docs/depth.md.
        prune_frozen (`bool`, *optional*, defaults to `False`):
            Whether groups that slice parameters with `requires_grad=False` may be pruned. By default they are left
            out (logged at `build_groups`) and frozen parameters never change. A LoRA model's frozen base is not
            concerned: it is pruned through its adapters either way.

        > CRIC: the Corrective Redundant Identification Cycle

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

        > Distillation: training against a frozen teacher

        distill (`bool`, *optional*, defaults to `False`):
            Distil from a frozen teacher while training and pruning: the training loss becomes
            `distill_alpha * distill_temperature**2 * KL(teacher || student) + (1 - distill_alpha) * task loss`. The
            teacher is a frozen copy of the model as it was when the trainer was built, or `HESSOTrainer(...,
            teacher_model=...)`. See `docs/distillation.md`.
        distill_alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the KL term, in `[0, 1]` (1: KL only, as Minitron; 0: the task loss only).
        distill_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature `T` of both distributions, `> 0`.
        distill_top_k (`int`, *optional*):
            Compare the two distributions on `k + 1` buckets: the teacher's `k` largest logits of each position and
            one bucket for all the other classes (both softmaxes over the whole vocabulary, so the student's mass
            outside the teacher's top k counts). Default: the full distributions.

        > Saving and resuming

        save_adapters_separately (`bool`, *optional*, defaults to `False`):
            For a peft LoRA model: `save_model()` writes the slim base model plus the sliced adapter (in `adapter/`)
            instead of one merged slim model.
        restart_pruning_schedule (`bool`, *optional*, defaults to `False`):
            `train(resume_from_checkpoint=...)` refuses a checkpoint that lacks HESSO's state (no `optimizer.pt`,
            as with `save_only_model=True`; no `scheduler.pt`; an `optimizer.pt` without the `"hesso"` or `"cric"`
            entry; or, with LoRA, no `hesso_frozen_slices.pt` once groups were selected), since the pruning
            schedule would silently start again from step 0. Set this to `True` to resume anyway: the weights (and
            whatever optimizer state exists) are loaded, and the pruning schedule starts over from the resumed step
            (`start_pruning_step` counts from there). See `docs/saving.md`.

        > TrainingArguments defaults changed

        dataloader_pin_memory (`bool`, *optional*):
            As in `TrainingArguments`, but the default is `True` only when an accelerator is available (pinning
            memory on a CPU-only run only makes the DataLoader warn).
    """

    # Targets and schedule
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

    # Saliency
    saliency: str | None = field(
        default=None,
        metadata={
            "help": "Saliency preset: 'taylor' (default), 'paper', 'activation', or 'custom' (your importance_* "
            "weights; the default when any is set).",
            "choices": list(SALIENCY_CHOICES),
        },
    )
    saliency_direction: str | None = field(
        default=None,
        metadata={
            "help": "Direction of the saliency criteria: 'update' (base optimizer step, the paper's) or 'gradient'.",
            "choices": ["update", "gradient"],
        },
    )
    saliency_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps (batches) whose scores every selection averages (the last is its first)."},
    )
    importance_magnitude: float | None = field(default=None, metadata={"help": "Weight of the group-norm criterion."})
    importance_avg_magnitude: float | None = field(
        default=None, metadata={"help": "Weight of the group-norm-per-element criterion."}
    )
    importance_cosine_similarity: float | None = field(
        default=None, metadata={"help": "Weight of the cosine(weight, update direction) criterion."}
    )
    importance_taylor_first_order: float | None = field(
        default=None, metadata={"help": "Weight of the first-order Taylor criterion."}
    )
    importance_taylor_second_order: float | None = field(
        default=None, metadata={"help": "Weight of the second-order Taylor criterion."}
    )
    importance_taylor_elementwise: float | None = field(
        default=None, metadata={"help": "Weight of the elementwise Taylor criterion sum |x * d| (not in the paper)."}
    )
    importance_activation: float | None = field(
        default=None, metadata={"help": "Weight of the activation criterion ||a_g|| (group output, forward-only)."}
    )

    # Kinds and shapes
    prune_kinds: list[str] | None = field(
        default=None,
        metadata={
            "help": "Kinds of groups that may be pruned. Default: every width kind (add attention_sublayer / "
            "mlp_sublayer to let HESSO remove whole sublayers, hidden_channel for the hidden size).",
            "choices": list(KINDS),
        },
    )
    hidden_channel_unit: int | None = field(
        default=None,
        metadata={
            "help": "Residual-stream channels per hidden_channel group; must divide the hidden size. Default 1 (8 in "
            "mixture-of-experts families)."
        },
    )
    group_divisible: int = field(
        default=1, metadata={"help": "Round the number of kept groups of every block to a multiple of this."}
    )
    layer_shapes: str = field(
        default="free",
        metadata={
            "help": "'free': every layer ends with its own sizes (the slim model ships its code). 'uniform': every "
            "layer keeps the same counts and only whole layers go, so the result saves as the stock class "
            "(checked before training).",
            "choices": list(LAYER_SHAPES),
        },
    )
    prune_frozen: bool = field(
        default=False,
        metadata={
            "help": "Also prune groups that slice parameters with requires_grad=False (outside LoRA's frozen base). "
            "Default: such groups are left out of pruning and their parameters never change."
        },
    )

    # CRIC
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

    # Distillation
    distill: bool = field(
        default=False, metadata={"help": "Distil from a frozen teacher (default: the model as it was at the start)."}
    )
    distill_alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term, in [0, 1]."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term (> 0)."})
    distill_top_k: int | None = field(
        default=None,
        metadata={"help": "KL on the teacher's top-k classes plus one bucket for the rest. Default: all logits."},
    )

    # Saving and resuming
    save_adapters_separately: bool = field(
        default=False,
        metadata={
            "help": "For a peft LoRA model: `save_model()` writes the slim base model plus the sliced adapter (in "
            "`adapter/`) instead of one merged slim model."
        },
    )
    restart_pruning_schedule: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint that lacks HESSO's state (optimizer.pt, scheduler.pt, the 'hesso' / "
            "'cric' entry, LoRA's hesso_frozen_slices.pt) by starting the pruning schedule over, instead of refusing."
        },
    )

    # TrainingArguments defaults changed
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Pin the DataLoader's memory. Default: True when an accelerator is available, else False."},
    )

    def __post_init__(self):
        if self.dataloader_pin_memory is None:
            # Pinned memory only helps a copy to an accelerator; on a CPU-only run the DataLoader warns about it.
            self.dataloader_pin_memory = not self.use_cpu and _accelerator_available()
        super().__post_init__()
        self._check_saliency()
        self._default_saliency_steps()
        # The same checks, with the same messages, as `HESSO` and `CRIC` (`hf_hesso.optim.schedule`).
        _, weights, direction = resolve_saliency(
            self.saliency, self.explicit_importance, self.saliency_direction, lora=False
        )
        check_pruning_settings(
            target_group_sparsity=self.target_group_sparsity,
            target_param_sparsity=self.target_param_sparsity,
            importance_criteria=self.importance_criteria,
            group_divisible=self.group_divisible,
            saliency_direction=direction,
        )
        check_update_direction(self.saliency, weights, direction, self.learning_rate, lora=False)
        Schedule(self.start_pruning_step, self.pruning_periods, self.pruning_steps, self.saliency_steps)
        if self.max_steps > 0:
            self.check_schedule_fits(self.max_steps)
        if self.layer_shapes not in ("free", "uniform"):
            raise ValueError(f"`layer_shapes` must be 'free' or 'uniform', got {self.layer_shapes!r}.")
        if self.layer_shapes == "uniform" and self.cric:
            raise ValueError(
                "`layer_shapes='uniform'` is not available with `cric=True` (CRIC ranks single groups); use HESSO "
                "(`cric=False`) or `layer_shapes='free'`."
            )
        if self.saliency_steps > 1 and self.cric:
            raise ValueError(
                f"`saliency_steps`={self.saliency_steps} applies to HESSO's periods; with `cric=True` CRIC accumulates "
                "its own scores over its cycles. Leave `saliency_steps` at 1 with CRIC."
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
        if self.hidden_channel_unit is not None and (
            not isinstance(self.hidden_channel_unit, int) or self.hidden_channel_unit < 1
        ):
            raise ValueError(
                f"`hidden_channel_unit` must be a positive integer (channels per hidden_channel group), got "
                f"{self.hidden_channel_unit!r}."
            )
        self._check_cric()
        check_distill_settings(self.distill_alpha, self.distill_temperature, self.distill_top_k)

    @property
    def explicit_importance(self) -> dict[str, float] | None:
        """The `importance_*` weights that were set (the others count 0), or None when none was."""
        given = {name: getattr(self, f"importance_{name}") for name in IMPORTANCE_CRITERIA}
        if all(v is None for v in given.values()):
            return None
        return {name: 0.0 if v is None else float(v) for name, v in given.items()}

    def _check_saliency(self) -> None:
        explicit = self.explicit_importance
        # The weights and the direction are checked with HESSO's own messages (`check_pruning_settings`).
        self.saliency, weights, _ = resolve_saliency(self.saliency, explicit, self.saliency_direction, lora=False)
        if self.cric and weights.get("activation"):
            raise ValueError(
                "The activation criterion records the groups' outputs on HESSO's scoring steps, which CRIC does not "
                "use. With `cric=True` choose `saliency='taylor'` or 'paper'."
            )

    def _default_saliency_steps(self) -> None:
        """`saliency_steps=None`: 1 with CRIC, else `default_saliency_steps` of the schedule (see `optim.presets`)."""
        if self.saliency_steps is not None:
            return
        schedule = (self.start_pruning_step, self.pruning_steps, self.pruning_periods)
        if self.cric or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in schedule[1:]):
            self.saliency_steps = 1  # a bad schedule is reported by `Schedule` with its own message
        else:
            self.saliency_steps = default_saliency_steps(*schedule)

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
        """The saliency weights of every criterion (the `saliency` preset's without LoRA, or the `importance_*`)."""
        _, weights, _ = resolve_saliency(self.saliency, self.explicit_importance, self.saliency_direction, lora=False)
        return {name: float(weights.get(name, 0.0)) for name in IMPORTANCE_CRITERIA}

    def check_direction(self, lora: bool) -> None:
        """`check_update_direction` of the saliency as resolved with (or without) LoRA: `__post_init__` checks it
        without; with LoRA 'taylor' reads the update direction too, so `HESSOTrainer` checks again."""
        preset, weights, direction = resolve_saliency(
            self.saliency, self.explicit_importance, self.saliency_direction, lora=lora
        )
        check_update_direction(preset, weights, direction, self.learning_rate, lora=lora)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the optimizer this configuration asks for: `CRIC` with `cric=True`, else `HESSO`
        (`HESSOTrainer` builds it as `cls(base_optimizer, groups, **args.optimizer_kwargs())`)."""
        kwargs: dict[str, Any] = dict(
            target_group_sparsity=self.target_group_sparsity,
            target_param_sparsity=self.target_param_sparsity,
            pruning_steps=self.pruning_steps,
            saliency=self.saliency,
            importance_criteria=self.explicit_importance,
            group_divisible=self.group_divisible,
            saliency_direction=self.saliency_direction,
        )
        if self.cric:
            kwargs.update(
                start_pruning_step=self.resolved_cric_start_step,
                sampling_steps=self.cric_sampling_steps,
                max_cycles=self.cric_max_cycles,
                tolerance=self.cric_tolerance,
                trial_ratios=self.cric_trial_ratios,
                loss_weight=self.cric_loss_weight,
            )
        else:
            kwargs.update(
                start_pruning_step=self.start_pruning_step,
                pruning_periods=self.pruning_periods,
                saliency_steps=self.saliency_steps,
                layer_shapes=self.layer_shapes,
            )
        return kwargs

    def check_cric_fits(self, planned_steps: int, end_step: int, num_blocks: int) -> None:
        """Raise a `ValueError` when CRIC's pruning may end (`end_step`, all `cric_max_cycles` cycles run) after
        `planned_steps` optimizer steps; `num_blocks` blocks are probed."""
        if end_step <= planned_steps:
            return
        raise ValueError(
            f"With `cric=True` pruning may end as late as optimizer step {end_step} (CRIC from step "
            f"{self.resolved_cric_start_step}, {num_blocks} blocks x {len(self.cric_trial_ratios)} probe steps, up "
            f"to `cric_max_cycles` ({self.cric_max_cycles}) x `cric_sampling_steps` ({self.cric_sampling_steps}), "
            f"then `pruning_steps` ({self.pruning_steps})), after the planned {planned_steps} optimizer steps. Train "
            "longer, or lower `cric_max_cycles`, `cric_sampling_steps`, `pruning_steps` or the number of "
            "`cric_trial_ratios`."
        )

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


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
