"""`HESSOTrainer`: a `transformers.Trainer` that trains and structurally prunes in one run."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn
from transformers import Trainer, TrainerCallback

from .config import HESSOConfig, check_update_direction
from .diagnostics import SelectionDiagnostics
from .distill import DistillationMixin, frozen_copy, load_teacher
from .export import save_slim
from .export.atomic import adopt_files, atomic_save, owned_by_last_save
from .export.card import MODEL_CARD_NAME, PruningReport, check_evaluation, render_model_card
from .export.save import upload_folder
from .groups import KINDS, GroupSet, build_groups
from .groups.peft import is_peft_model
from .modeling.compat import (
    OPTIMIZER_NAME,
    OPTIMIZER_NAME_BIN,
    SCHEDULER_NAME,
    TRAINING_ARGS_NAME,
    PrinterCallback,
    ProgressCallback,
)
from .optim import CRIC, HESSO
from .optim.frozen import FROZEN_SLICES_NAME, frozen_slices_state, load_frozen_slices
from .optim.presets import resolve_saliency
from .slim import gather_full_model
from .slim.core import uniform_stock_problem

logger = get_logger(__name__)


def _unwrap_hesso(optimizer: Any):
    """The `HESSO` instance inside the optimizer the Trainer holds (Accelerate wraps it), or `None`."""
    while optimizer is not None and not isinstance(optimizer, HESSO):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _top_level_files(directory: str) -> dict[str, tuple[int, int, int]]:
    """Name -> (size, mtime in ns, inode) of the regular files directly in `directory`."""
    out = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return out
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            out[entry.name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


class _PruningProgressCallback(TrainerCallback):
    """Logs one line whenever the pruning schedule enters a new period (main process only)."""

    def __init__(self):
        self.period: int | None = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        hesso = _unwrap_hesso(optimizer)
        if hesso is None:
            return
        period = int(hesso.current_period)
        if period == self.period:
            return
        previous, self.period = self.period, period
        # Resuming inside warm-up is not news; every other change is.
        if previous is None and period < 0:
            return
        periods = args.pruning_periods
        if period >= periods:
            what = "pruning finished"
        else:
            what = f"pruning period {period + 1}/{periods} started"
        logger.info(
            f"HESSO step {state.global_step}/{state.max_steps}: {what}, {len(hesso.redundant_groups)} groups selected, "
            f"{len(hesso.pruned_groups)} at zero.",
            main_process_only=True,
        )


# Metrics that reach the reporters (TensorBoard, W&B, ...) but not the console, where one summary stands for them.
_CONSOLE_HIDDEN = ("hesso/", "cric/")


# The longest string transformers' progress callback prints (`ProgressCallback(max_str_len=100)`); a longer one is
# replaced by "[String too long to display, ...]".
CONSOLE_MAX_LEN = 100


def _chunks(items: list[str], max_len: int) -> list[str]:
    """`items` joined with ", " into as few strings as fit `max_len` characters each (an item longer is cut)."""
    out: list[str] = []
    for item in items:
        item = item[:max_len]
        if out and len(out[-1]) + 2 + len(item) <= max_len:
            out[-1] += ", " + item
        else:
            out.append(item)
    return out


def console_summary(logs: dict[str, Any], pruning_periods: int, max_len: int = CONSOLE_MAX_LEN) -> dict[str, str]:
    """HESSO's progress from the `hesso/*` (and `cric/*`) metrics of a log, as a few short console entries.

    Each value fits `max_len` characters, so that transformers' progress callback prints it whole:

    - `hesso`: the phase and the sparsity, e.g. `period 2/4, 25.0% of groups, 11.3% of params pruned`;
    - `hesso_pruned`: the pruned groups per kind, e.g. `mlp_channel 40, kv_group 2` (continued in `hesso_pruned_2`,
      ... when the kinds do not fit one entry);
    - `cric`: CRIC's phase and cycles, e.g. `probing, 0 cycles`.

    Empty when the log has no HESSO metrics.
    """
    if "hesso/period" not in logs:
        return {}
    period = int(logs["hesso/period"])
    if period < 0:
        phase = "warm-up"
    elif period >= pruning_periods:
        phase = "pruning done"
    else:
        phase = f"period {period + 1}/{pruning_periods}"
    out = {
        "hesso": f"{phase}, {logs.get('hesso/group_sparsity', 0.0):.1%} of groups, "
        f"{logs.get('hesso/param_sparsity', 0.0):.1%} of params pruned"[:max_len]
    }
    kinds = [
        f"{kind} {int(logs[f'hesso/pruned_groups/{kind}'])}" for kind in KINDS if f"hesso/pruned_groups/{kind}" in logs
    ]
    for i, chunk in enumerate(_chunks(kinds, max_len)):
        out["hesso_pruned" if i == 0 else f"hesso_pruned_{i + 1}"] = chunk
    if "cric/phase" in logs:
        phases = ("warmup", "probing", "cycles", "done")
        out["cric"] = f"{phases[int(logs['cric/phase'])]}, {int(logs.get('cric/cycles', 0))} cycles"
    return out


def console_logs(logs: dict[str, Any], pruning_periods: int, max_len: int = CONSOLE_MAX_LEN) -> dict[str, Any]:
    """The logs as the console shows them: without the `hesso/*` and `cric/*` keys, with the `console_summary`."""
    out = {k: v for k, v in logs.items() if not k.startswith(_CONSOLE_HIDDEN)}
    out.update(console_summary(logs, pruning_periods, max_len))
    return out


class _HESSOProgressCallback(ProgressCallback):
    """The progress bar's log lines, with a short HESSO summary instead of the per-kind and per-layer metrics."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = console_logs(logs or {}, getattr(args, "pruning_periods", 1), self.max_str_len)
        return super().on_log(args, state, control, logs=logs, **kwargs)


class _HESSOPrinterCallback(PrinterCallback):
    """`PrinterCallback` (`disable_tqdm=True`) with a short HESSO summary instead of the per-layer metrics."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = console_logs(logs or {}, getattr(args, "pruning_periods", 1))
        return super().on_log(args, state, control, logs=logs, **kwargs)


class HESSOTrainer(DistillationMixin, Trainer):
    r"""
    A [`~transformers.Trainer`] that trains and structurally prunes the model in one run (HESSO).

    It wraps the optimizer the Trainer builds from `args` (its `optim` choice, weight-decay parameter groups and
    learning-rate scheduler are kept) in [`HESSO`], which progressively drives the least important groups (attention
    heads, key/value groups, query slots, MLP channels) to exactly zero. Pruning metrics (`hesso/*`) are merged into
    every training log, so every reporter sees them.

    [`~HESSOTrainer.save_model`] called by the user writes the *slim* model, physically smaller and loadable with
    `from_pretrained(..., trust_remote_code=True)`, with its tokenizer/processor and a model card, atomically;
    checkpoints written during training stay full size so that `train(resume_from_checkpoint=...)` works.
    [`~HESSOTrainer.push_to_hub`] uploads the slim model and its card.

    Args:
        model ([`~transformers.PreTrainedModel`]): the model to train and prune, of a supported `model_type`.
        args ([`HESSOConfig`]): the training arguments with the HESSO knobs.
        groups ([`GroupSet`], *optional*): the prunable groups. Default: `build_groups(model, kinds=args.prune_kinds)`.
        peft_config (`peft.LoraConfig`, *optional*): wrap `model` with `peft.get_peft_model(model, peft_config)`
            first. `model` may also be a LoRA `PeftModel` already. With LoRA the groups include the adapters'
            `lora_B` rows / `lora_A` columns, the frozen base slices are faded and zeroed with them, and
            `save_model()` writes the merged slim model (or, with `save_adapters_separately`, the slim base and
            the sliced adapter in `adapter/`).
        teacher_model (`nn.Module` or `str`, *optional*): with `args.distill=True`, the teacher to distil from: a
            model (frozen here, never stepped; it must not share parameters with `model`) or a path loaded with the
            student's class. Default: a frozen copy of `model` as it is when the trainer is built (with LoRA, the
            copy has the adapters merged). See `docs/distillation.md`.
        The other arguments are those of [`~transformers.Trainer`].
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: HESSOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics=None,
        groups: GroupSet | None = None,
        peft_config=None,
        teacher_model: nn.Module | str | os.PathLike | None = None,
    ):
        if not isinstance(args, HESSOConfig):
            raise ValueError(
                f"`args` must be a `HESSOConfig` (it holds the pruning target and schedule), got "
                f"{type(args).__name__}. Build it as `HESSOConfig(output_dir=..., target_group_sparsity=..., "
                "pruning_steps=..., ...)`."
            )
        if teacher_model is not None and not args.distill:
            raise ValueError(
                "`teacher_model` was given but `args.distill` is False, so it would be ignored. Set `distill=True` in "
                "the `HESSOConfig`, or drop `teacher_model`."
            )
        # The teacher is the model before the adapters are added: a plain copy, nothing to merge.
        teacher = frozen_copy(model) if args.distill and teacher_model is None and model is not None else None
        if peft_config is not None:
            if is_peft_model(model):
                raise ValueError(
                    "`peft_config` was given but `model` is already a `PeftModel`. Pass either the plain model with "
                    "`peft_config=`, or the `PeftModel` without it."
                )
            from peft import get_peft_model

            # As trl's trainers do: the adapters are added here, so `model` is then the `PeftModel`.
            model = get_peft_model(model, peft_config)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._check_train_dataset()
        self.groups = groups
        self._report: PruningReport | None = None
        self._card_evaluation: list[dict] | None = None  # scores for the card (`save_model(evaluation=...)`)
        self.add_callback(_PruningProgressCallback())
        self.selection_diagnostics = SelectionDiagnostics()
        self.add_callback(self.selection_diagnostics)
        if args.distill:
            if teacher is None:
                if teacher_model is None:
                    raise ValueError(
                        "`distill=True` with `model_init` has no model to copy as the teacher. Pass `teacher_model=` "
                        "(a model or a path)."
                    )
                teacher = load_teacher(teacher_model, self.model)
            self.setup_distillation(teacher, args.distill_alpha, args.distill_temperature, args.distill_top_k)
        self._quiet_console()

    def _quiet_console(self) -> None:
        """Swap the console callbacks for ones that print one HESSO summary per log instead of every `hesso/*` key.

        The reporters (TensorBoard, W&B, ...) are other callbacks: they still receive every metric.
        """
        callbacks = self.callback_handler.callbacks
        for i, cb in enumerate(callbacks):
            if type(cb) is ProgressCallback:
                quiet = _HESSOProgressCallback(max_str_len=getattr(cb, "max_str_len", 100))
            elif type(cb) is PrinterCallback:
                quiet = _HESSOPrinterCallback()
            else:
                continue
            callbacks[i] = quiet

    def _check_train_dataset(self) -> None:
        """Refuse an empty training dataset with its name (torch's sampler would say only `num_samples=0`)."""
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__"):
            return
        try:
            size = len(dataset)
        except TypeError:  # `__len__` that cannot tell (some iterable wrappers)
            return
        if size == 0:
            info = getattr(dataset, "info", None)
            name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
            raise ValueError(
                f"`train_dataset` ({type(dataset).__name__}{f' {name!r}' if name else ''}) has no examples: HESSO has "
                "nothing to train and score the groups on. Check the split and any filtering or `select` that "
                "emptied it (e.g. sequences dropped as too short), and pass a dataset with at least "
                "`per_device_train_batch_size` examples."
            )

    def get_train_dataloader(self):
        """`Trainer.get_train_dataloader`, after refusing an empty `train_dataset` with a clear error."""
        self._check_train_dataset()
        return super().get_train_dataloader()

    # ---- Optimizer ----

    @property
    def hesso_optimizer(self):
        """The [`HESSO`] optimizer once training has set it up, else `None`."""
        return _unwrap_hesso(self.optimizer)

    def _unwrapped_model(self, model: nn.Module | None = None) -> nn.Module:
        return self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the optimizer `args` asks for, as `Trainer` does, and wrap it in [`HESSO`]."""
        self._check_distributed_backend()
        super().create_optimizer(model)
        # Already wrapped: a second `train()` call, or the user passed a `HESSO` in `optimizers`.
        if self.hesso_optimizer is not None:
            return self.optimizer
        # `state.max_steps` holds the planned number of optimizer steps once `train()` has sized the run.
        planned = self.state.max_steps
        if planned and planned > 0:
            self.args.check_schedule_fits(planned)
        if self.groups is None:
            self.groups = build_groups(
                self._unwrapped_model(model),
                kinds=self.args.prune_kinds,
                prune_frozen=self.args.prune_frozen,
                hidden_unit=self.args.hidden_channel_unit,
            )
        if len(self.groups) == 0:
            raise ValueError(
                f"The model has no prunable groups of kinds {self.args.prune_kinds or 'any'} (blocks with fewer "
                "than 2 groups are never pruned). Allow more kinds with `prune_kinds`, or pass `groups=`."
            )
        args = self.args
        # `HESSOConfig` checked this without LoRA; with it, 'taylor' reads the update direction too.
        preset, weights, direction = resolve_saliency(
            args.saliency, args.explicit_importance, args.saliency_direction, lora=self._is_lora()
        )
        check_update_direction(preset, weights, direction, args.learning_rate, lora=self._is_lora())
        common = dict(
            target_group_sparsity=args.target_group_sparsity,
            target_param_sparsity=args.target_param_sparsity,
            pruning_steps=args.pruning_steps,
            saliency=args.saliency,
            importance_criteria=args.explicit_importance,
            group_divisible=args.group_divisible,
            saliency_direction=args.saliency_direction,
        )
        if args.cric:
            self.optimizer = CRIC(
                self.optimizer,
                self.groups,
                start_pruning_step=args.resolved_cric_start_step,
                sampling_steps=args.cric_sampling_steps,
                max_cycles=args.cric_max_cycles,
                tolerance=args.cric_tolerance,
                trial_ratios=args.cric_trial_ratios,
                loss_weight=args.cric_loss_weight,
                **common,
            )
            worst = self.optimizer.pruning_end_step
            if planned and planned > 0 and worst > planned:
                raise ValueError(
                    f"With `cric=True` pruning may end as late as optimizer step {worst} (CRIC from step "
                    f"{args.resolved_cric_start_step}, {len(self.groups.blocks)} blocks x "
                    f"{len(args.cric_trial_ratios)} probe steps, up to `cric_max_cycles` ({args.cric_max_cycles}) x "
                    f"`cric_sampling_steps` ({args.cric_sampling_steps}), then `pruning_steps` "
                    f"({args.pruning_steps})), after the planned {planned} optimizer steps. Train longer, or lower "
                    "`cric_max_cycles`, `cric_sampling_steps`, `pruning_steps` or the number of `cric_trial_ratios`."
                )
        else:
            if args.layer_shapes == "uniform":
                problem = uniform_stock_problem(self._unwrapped_model(model), self.groups, args.group_divisible)
                if problem is not None:
                    raise ValueError(problem)
            self.optimizer = HESSO(
                self.optimizer,
                self.groups,
                start_pruning_step=args.start_pruning_step,
                pruning_periods=args.pruning_periods,
                saliency_steps=args.saliency_steps,
                layer_shapes=args.layer_shapes,
                **common,
            )
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """`Trainer.training_step`, then hand the task loss to [`CRIC`] on the steps that read it.

        CRIC's probes read the task loss, also when distilling (the KL term is left out), as scaled for gradient
        accumulation, so the optimizer sums the micro-batches' values; it is averaged across processes so that
        every rank takes the same decisions.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.selection_diagnostics.observe_loss(loss)
        task = self.task_loss(loss)
        cric = self.hesso_optimizer
        if isinstance(cric, CRIC) and cric.needs_loss:
            value = task.detach().float().reshape(())
            if self.accelerator.num_processes > 1:
                value = self.accelerator.reduce(value.clone(), reduction="mean")
            cric.observe_loss(value)
        return loss

    # ---- Logging ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the pruning metrics (`hesso/*`) into every training log, then log as `Trainer` does."""
        hesso = self.hesso_optimizer
        if hesso is not None and not any(k.startswith(("eval_", "test_")) for k in logs):
            # Every rank scores the same all-reduced gradients, so the metrics agree without a gather.
            logs = {**logs, **hesso.metrics(), **self.selection_diagnostics.pop_metrics()}
        super().log(logs, start_time)

    # ---- Saving ----

    def _check_distributed_backend(self) -> None:
        """Refuse the backends that flatten parameters (the groups are rows and columns of whole weight matrices)."""
        if self.is_deepspeed_enabled:
            raise ValueError(
                "HESSOTrainer does not support DeepSpeed: its ZeRO optimizers flatten and partition the parameters, "
                "which hides the rows and columns HESSO prunes. Use FSDP2 instead (`--fsdp full_shard` with "
                "`--fsdp_config '{\"version\": 2}'`, or `accelerate launch --config_file "
                "recipes/accelerate_configs/fsdp2.yaml`), or DDP."
            )
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                f"HESSOTrainer does not support FSDP version {getattr(plugin, 'fsdp_version', 1)}: FSDP1 flattens the "
                "parameters of each wrapped module into one flat parameter, which hides the rows and columns HESSO "
                "prunes. Use FSDP2 instead: `fsdp_version: 2` in the Accelerate config "
                "(recipes/accelerate_configs/fsdp2.yaml) or `--fsdp_config '{\"version\": 2}'`."
            )

    def _card_settings(self, num_groups: int) -> dict[str, Any]:
        args = self.args
        settings: dict[str, Any] = {
            "target_group_sparsity": args.target_group_sparsity,
            "target_param_sparsity": args.target_param_sparsity,
            "start_pruning_step": args.start_pruning_step,
            "pruning_periods": args.pruning_periods,
            "pruning_steps": args.pruning_steps,
            **self._saliency_settings(),
            "prune_kinds": args.prune_kinds or "all",
            "group_divisible": args.group_divisible,
            "prunable_groups": num_groups,
        }
        if args.distill:
            settings.update(
                distill=True,
                distill_alpha=args.distill_alpha,
                distill_temperature=args.distill_temperature,
                distill_top_k=args.distill_top_k,
            )
        if args.cric:
            settings.update(
                cric=True,
                cric_start_step=args.resolved_cric_start_step,
                cric_sampling_steps=args.cric_sampling_steps,
                cric_max_cycles=args.cric_max_cycles,
                cric_tolerance=args.cric_tolerance,
                cric_trial_ratios=list(args.cric_trial_ratios),
                cric_loss_weight=args.cric_loss_weight,
            )
        return settings

    def _saliency_settings(self) -> dict[str, Any]:
        """The saliency the run scores with: the preset, its weights and direction as resolved (LoRA included)."""
        hesso = self.hesso_optimizer
        if hesso is not None:
            settings = hesso.settings()
            names = ("saliency", "importance_criteria", "saliency_direction", "saliency_steps")
            return {name: settings[name] for name in names}
        args = self.args
        preset, weights, direction = resolve_saliency(
            args.saliency, args.explicit_importance, args.saliency_direction, lora=self._is_lora()
        )
        return {
            "saliency": preset,
            "importance_criteria": {k: v for k, v in weights.items() if v},
            "saliency_direction": direction,
            "saliency_steps": args.saliency_steps,
        }

    def _card_training(self) -> dict[str, Any]:
        args = self.args
        training: dict[str, Any] = {}
        dataset = self.train_dataset
        info = getattr(dataset, "info", None)
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
        if name:
            training["Dataset"] = name
        if dataset is not None and hasattr(dataset, "__len__"):
            training["Training examples"] = len(dataset)
        training["Optimizer steps"] = self.state.global_step
        if self.state.epoch is not None:
            training["Epochs"] = round(float(self.state.epoch), 4)
        training["Total batch size"] = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        training["Learning rate"] = args.learning_rate
        training["Optimizer"] = str(getattr(args.optim, "value", args.optim))
        training["Mixed precision"] = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        return training

    def _groups_of(self, model: nn.Module) -> GroupSet:
        if self.groups is not None:
            return GroupSet(list(self.groups.blocks), self.groups.model_type, self.groups.param_shapes, model=model)
        return build_groups(model, kinds=self.args.prune_kinds, hidden_unit=self.args.hidden_channel_unit)

    def _save_slim(self, output_dir: str, merge_adapters: bool) -> None:
        """Gather (FSDP2), then write the slim model with `hf_hesso.save_slim` on the main process."""
        if self.is_fsdp_enabled:
            # A collective: every rank takes part in gathering the full weights to rank 0's CPU.
            live = gather_full_model(self.model)
        elif self.is_deepspeed_enabled:
            raise ValueError("HESSOTrainer does not support DeepSpeed; use FSDP2 or DDP.")
        else:
            live = self._unwrapped_model()
        if not self.args.should_save:
            return
        groups = self._groups_of(live)

        def write_extra(directory: str) -> None:
            torch.save(self.args, os.path.join(directory, TRAINING_ARGS_NAME))

        saved = save_slim(
            live,
            output_dir,
            groups,
            tokenizer=self.processing_class or getattr(self.data_collator, "tokenizer", None),
            settings=self._card_settings(len(groups)),
            training=self._card_training(),
            evaluation=self._card_evaluation,
            merge_adapters=merge_adapters,
            write_extra=write_extra,
            stock=self.args.layer_shapes == "uniform" and merge_adapters,
        )
        saved.report.model_name = Path(self.args.hub_model_id or self.args.output_dir).name
        self._report = saved.report
        logger.info(
            f"Saved the slim model ({saved.summary.params_after:,} of {saved.summary.params_before:,} parameters) to "
            f"{output_dir}",
            main_process_only=True,
        )

    def save_model(
        self,
        output_dir: str | None = None,
        _internal_call: bool = False,
        merge_adapters: bool | None = None,
        evaluation: list[dict] | None = None,
    ) -> None:
        """Save the slim model (with its tokenizer/processor, `training_args.bin` and model card) to `output_dir`.

        This is `hf_hesso.save_slim` with the Trainer's settings: the slim model is a CPU copy built layer by layer,
        and the live model keeps training. The save writes only its own files (weights, config, shipped code,
        tokenizer, card, training arguments, `adapter/`), each replaced atomically after all are on disk, and
        removes only the files of the previous hf_hesso save there that it does not write again (its manifest):
        your other files and the `checkpoint-*` folders in `output_dir` are never touched. A `README.md` that
        hf_hesso did not write is kept (the card is then skipped, with a warning); any other file of a name the save
        writes that hf_hesso did not write (your own `model.safetensors`) makes it raise before anything moves. See
        `docs/saving.md`.

        Called before `train()`, it warns that the model is unpruned and writes it in the slim format anyway.
        The checkpoints the Trainer writes during training (`_internal_call=True`) stay full size, so training can
        resume from them.

        Args:
            output_dir (`str`, *optional*): where to save. Defaults to `args.output_dir`.
            merge_adapters (`bool`, *optional*): LoRA models only. `True`: one merged slim model; `False`: the slim
                base model plus the adapters sliced alike in `output_dir/adapter` (load with
                `PeftModel.from_pretrained(base, output_dir + "/adapter")`). Default: `not
                args.save_adapters_separately`.
            evaluation (`list[dict]`, *optional*): scores for the model card's *Evaluation* section, one dict per
                text with the keys `text`, `metric`, `tokens`, `before` (the unpruned model) and `after` (the pruned
                one), e.g. in-domain and general-text perplexity; kept for later saves and `push_to_hub`.
        """
        if evaluation is not None:
            self._card_evaluation = check_evaluation(evaluation)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        hesso = self.hesso_optimizer
        if not _internal_call and (hesso is None or hesso.num_steps == 0) and self.args.should_save:
            warnings.warn(
                "`save_model()` before `train()`: the model has not been pruned. It writes the full-size model as a "
                f"slim-format checkpoint (`hesso_*` config, shipped code, model card; only groups that are already "
                f"all zero are removed) to {str(output_dir)!r}. Call `trainer.train()` first to prune, or use "
                "`model.save_pretrained(dir)` for a stock checkpoint.",
                UserWarning,
                stacklevel=2,
            )
        if _internal_call:
            # The Trainer's own checkpoint: full size, plus HESSO's frozen LoRA slices.
            super().save_model(output_dir, _internal_call=True)
            self._save_frozen_slices(output_dir)
            return
        lora = is_peft_model(self._unwrapped_model())
        if merge_adapters is None:
            merge_adapters = not (self.args.save_adapters_separately and lora)
        elif not merge_adapters and not lora:
            raise ValueError(
                "`merge_adapters=False` keeps LoRA adapters apart from the slim base, but this model has no adapters. "
                "Call `save_model()` without `merge_adapters`."
            )
        self._save_slim(output_dir, merge_adapters)
        if self.args.push_to_hub:
            self._upload(commit_message="Model save", revision=self.args.hub_revision)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """`Trainer._push_from_checkpoint` (`push_to_hub=True` while training), which copies the checkpoint's
        weights, config, tokenizer and training arguments into `args.output_dir`; the files it wrote there are then
        recorded as owned by the last save (its manifest), so that the slim save at the end replaces them (and
        removes those it does not write again), where it refuses to replace a file hf_hesso did not write."""
        output_dir = self.args.output_dir
        before = _top_level_files(output_dir) if self.is_world_process_zero() else {}
        super()._push_from_checkpoint(checkpoint_folder)
        if not self.is_world_process_zero() or not os.path.isdir(output_dir):
            return
        after = _top_level_files(output_dir)
        written = sorted(name for name, stat in after.items() if before.get(name) != stat)
        if written:
            adopt_files(output_dir, written)

    # ---- Resuming ----

    def _resume_state_problems(self, checkpoint: str) -> tuple[list[str], bool]:
        """What of HESSO's state `checkpoint` lacks, and whether its optimizer state still holds HESSO's entries.

        Returns `(problems, hesso_state_ok)`: one sentence per missing piece; `hesso_state_ok` is `True` when
        `optimizer.pt` holds the full state of this optimizer (base + 'hesso' + 'cric' with CRIC) and, with LoRA,
        the frozen slices are there whenever groups were selected.
        """
        problems: list[str] = []
        hesso_state_ok = True
        path = os.path.join(checkpoint, OPTIMIZER_NAME)
        has_optimizer = os.path.isfile(path) or os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME_BIN))
        if not has_optimizer and self.is_fsdp_enabled:
            # FSDP writes the optimizer state into a folder (`optimizer_0`).
            has_optimizer = any(
                e.startswith("optimizer") and os.path.isdir(os.path.join(checkpoint, e))
                for e in os.listdir(checkpoint)
            )
        if not has_optimizer:
            problems.append(
                f"`{OPTIMIZER_NAME}` is missing: it holds the base optimizer's state and HESSO's pruning schedule "
                "(a checkpoint saved with `save_only_model=True` has none)"
            )
            hesso_state_ok = False
        elif os.path.isfile(path):
            try:  # memory-mapped: reading the keys does not load the moments into memory
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            needed = ["hesso"] + (["cric"] if self.args.cric else [])
            absent = [key for key in needed if key not in state]
            if absent:
                hesso_state_ok = False
                problems.append(
                    f"`{OPTIMIZER_NAME}` has no {' or '.join(repr(k) for k in absent)} entry: it was saved by a "
                    f"{'HESSO (not CRIC) ' if absent == ['cric'] else 'plain (not HESSO) '}optimizer"
                )
            elif is_peft_model(self._unwrapped_model()) and not os.path.isfile(
                os.path.join(checkpoint, FROZEN_SLICES_NAME)
            ):
                selection = state["hesso"].get("selection_period")
                if selection is not None and bool((torch.as_tensor(selection) >= 0).any()):
                    hesso_state_ok = False
                    problems.append(
                        f"`{FROZEN_SLICES_NAME}` is missing, but HESSO had already selected "
                        f"{int((torch.as_tensor(selection) >= 0).sum())} groups: the frozen base weights it faded or "
                        "zeroed (peft checkpoints hold only the adapters) cannot be restored"
                    )
        if not os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME)):
            problems.append(
                f"`{SCHEDULER_NAME}` is missing: transformers then loads neither the learning-rate schedule nor the "
                "optimizer state"
            )
        return problems, hesso_state_ok

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Load the optimizer (HESSO's schedule included) and scheduler states, refusing an incomplete checkpoint.

        Without HESSO's state the pruning schedule would silently start again from step 0 and the run would end
        below its target. Unless `args.restart_pruning_schedule` is set, a missing piece raises a `ValueError` that
        names it. With the flag, whatever exists is loaded; the pruning schedule starts over from the resumed step
        when HESSO's own state is missing or incomplete.
        """
        if checkpoint is None or self.is_deepspeed_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        problems, hesso_state_ok = self._resume_state_problems(checkpoint)
        if not problems:
            return super()._load_optimizer_and_scheduler(checkpoint)
        listed = "; ".join(problems)
        if not self.args.restart_pruning_schedule:
            raise ValueError(
                f"Cannot resume from {checkpoint!r} without HESSO's state: {listed}. Resuming would restart the "
                "pruning schedule from step 0 (or lose the pruned LoRA base weights) and end below the target "
                "sparsity without a word. Resume from a checkpoint written with `save_only_model=False` (the "
                "default), or set `restart_pruning_schedule=True` in HESSOConfig to resume the weights and start "
                "the pruning schedule over from the resumed step."
            )
        self._load_available_state(checkpoint, hesso_state_ok)
        hesso = self.hesso_optimizer
        step = self.state.global_step
        if not hesso_state_ok:
            end = step + int(getattr(hesso, "pruning_end_step", self.args.pruning_end_step))
            if self.state.max_steps > 0 and end > self.state.max_steps:
                raise ValueError(
                    f"`restart_pruning_schedule=True` starts the pruning schedule over at the resumed step {step}, so "
                    f"pruning would end at step {end}, after the {self.state.max_steps} planned optimizer steps. "
                    f"Train longer (max_steps >= {end}) or lower `start_pruning_step` / `pruning_steps`."
                )
        logger.warning(
            f"Resuming from {checkpoint} with `restart_pruning_schedule=True` although {listed}. "
            + (
                f"HESSO's pruning schedule starts over at step {step}."
                if not hesso_state_ok
                else "HESSO's state is restored; the missing pieces start fresh."
            ),
            main_process_only=True,
        )

    def _load_available_state(self, checkpoint: str, hesso_state_ok: bool) -> None:
        """`restart_pruning_schedule=True`: load the optimizer and scheduler states that exist (HESSO's entries only
        when complete)."""
        path = os.path.join(checkpoint, OPTIMIZER_NAME)
        if os.path.isfile(path) and not self.is_fsdp_enabled:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if hesso_state_ok:
                self.optimizer.load_state_dict(state)
            else:
                base = {k: v for k, v in state.items() if k not in ("hesso", "cric")}
                self.hesso_optimizer.optimizer.load_state_dict(base)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))

    # ---- LoRA checkpoints ----

    def _save_frozen_slices(self, output_dir: str) -> None:
        """peft checkpoints hold the adapters only: also store the frozen base slices HESSO has faded or zeroed."""
        hesso = self.hesso_optimizer
        if hesso is None or not self.args.should_save or not is_peft_model(self._unwrapped_model()):
            return
        state = frozen_slices_state(hesso)
        if state:
            torch.save(state, os.path.join(output_dir, FROZEN_SLICES_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, FROZEN_SLICES_NAME)
        live = self._unwrapped_model(model)
        if os.path.isfile(path) and is_peft_model(live):
            groups = self.groups
            if groups is None:
                groups = build_groups(live, kinds=self.args.prune_kinds, hidden_unit=self.args.hidden_channel_unit)
            self.groups = groups
            load_frozen_slices(groups, torch.load(path, weights_only=True), groups.parameters(live))

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the pruning model card (`README.md`) to `args.output_dir` (unless a `README.md` not written by
        hf_hesso is there: it is kept, with a warning).

        It records the base model, parameters before and after, the kept heads / key-value groups / MLP channels
        of every layer, the HESSO settings and the training data and steps. The arguments are those of
        [`~transformers.Trainer.create_model_card`] and go into the card's metadata.
        """
        if not self.is_world_process_zero():
            return
        if self._report is None:
            raise ValueError("No slim model was saved yet: call `trainer.save_model()` before `create_model_card()`.")
        report = copy.copy(self._report)
        if model_name is not None:
            report.model_name = model_name
        if finetuned_from is not None:
            report.base_model = finetuned_from
        datasets = [d for d in (dataset, dataset_tags) if d is not None]
        report.metadata = {
            "language": language,
            "license": license,
            "tags": tags,
            "pipeline_tag": tasks if isinstance(tasks, str) else None,
            "datasets": [x for d in datasets for x in ([d] if isinstance(d, str) else d)] or None,
        }
        if not owned_by_last_save(self.args.output_dir, MODEL_CARD_NAME):
            warnings.warn(
                f"{os.path.join(self.args.output_dir, MODEL_CARD_NAME)!r} was not written by hf_hesso (or was edited "
                "since): it is kept and the model card is not written. Delete or rename it to get the card.",
                UserWarning,
                stacklevel=2,
            )
            return
        # The card joins the files of the last save (its manifest), replaced atomically like them.
        with atomic_save(self.args.output_dir, update=True) as staging:
            with open(os.path.join(staging, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
                f.write(render_model_card(report))

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the slim model and its card to `args.output_dir` and upload them to `args.hub_model_id`.

        The arguments are those of [`~transformers.Trainer.push_to_hub`]; extra keyword arguments go to
        [`~HESSOTrainer.create_model_card`].
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self._save_slim(self.args.output_dir, not (self.args.save_adapters_separately and self._is_lora()))
        if not self.is_world_process_zero():
            return None
        if kwargs:
            self.create_model_card(**kwargs)
        # The upload is blocking either way (`blocking` is accepted for compatibility with `Trainer.push_to_hub`).
        return self._upload(commit_message, revision or self.args.hub_revision, token=token)

    def _is_lora(self) -> bool:
        return is_peft_model(self._unwrapped_model())

    def _upload(self, commit_message: str | None, revision: str | None, token: str | None = None):
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self._finish_current_push()
        return upload_folder(
            self.args.output_dir,
            self.hub_model_id,
            token=token if token is not None else self.args.hub_token,
            message=commit_message or "Upload slim model (hf_hesso)",
            revision=revision,
        )
