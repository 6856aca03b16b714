"""`HESSOTrainer`: a `transformers.Trainer` that trains and structurally prunes in one run."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from .atomic import atomic_directory
from .card import PruningReport, render_model_card
from .config import HESSOConfig
from .groups import GroupSet, build_groups
from .lora import (
    ADAPTER_SUBDIR,
    FROZEN_SLICES_NAME,
    frozen_slices_state,
    is_peft_model,
    load_frozen_slices,
    merge_and_slim,
    slim_with_adapters,
)
from .optim import CRIC, HESSO
from .slim import SlimSummary, gather_full_model, slim_model

logger = get_logger(__name__)

MODEL_CARD_NAME = "README.md"


def _unwrap_hesso(optimizer: Any):
    """The `HESSO` instance inside the optimizer the Trainer holds (Accelerate wraps it), or `None`."""
    while optimizer is not None and not isinstance(optimizer, HESSO):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


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


class HESSOTrainer(Trainer):
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
    ):
        if not isinstance(args, HESSOConfig):
            raise ValueError(
                f"`args` must be a `HESSOConfig` (it holds the pruning target and schedule), got "
                f"{type(args).__name__}. Build it as `HESSOConfig(output_dir=..., target_group_sparsity=..., "
                "pruning_steps=..., ...)`."
            )
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
        self.groups = groups
        # True while `push_to_hub` runs: its internal `save_model` call must write the slim model.
        self._pushing = False
        self._report: PruningReport | None = None
        self.add_callback(_PruningProgressCallback())

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
            self.groups = build_groups(self._unwrapped_model(model), kinds=self.args.prune_kinds)
        if len(self.groups) == 0:
            raise ValueError(
                f"The model has no prunable groups of kinds {self.args.prune_kinds or 'any'} (blocks with fewer "
                "than 2 groups are never pruned). Allow more kinds with `prune_kinds`, or pass `groups=`."
            )
        args = self.args
        common = dict(
            target_group_sparsity=args.target_group_sparsity,
            target_param_sparsity=args.target_param_sparsity,
            pruning_steps=args.pruning_steps,
            importance_criteria=args.importance_criteria,
            group_divisible=args.group_divisible,
            saliency_direction=args.saliency_direction,
        )
        if args.cric:
            self.optimizer = CRIC(
                self.optimizer,
                self.groups,
                start_step=args.resolved_cric_start_step,
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
            self.optimizer = HESSO(
                self.optimizer,
                self.groups,
                start_pruning_step=args.start_pruning_step,
                pruning_periods=args.pruning_periods,
                saliency_steps=args.saliency_steps,
                **common,
            )
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """`Trainer.training_step`, then hand the loss to [`CRIC`] on the steps that read it.

        The returned loss is already scaled for gradient accumulation, so the optimizer sums the micro-batches'
        values; it is averaged across processes so that every rank takes the same decisions.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        cric = self.hesso_optimizer
        if isinstance(cric, CRIC) and cric.needs_loss:
            value = loss.detach().float().reshape(())
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
            logs = {**logs, **hesso.metrics()}
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

    def _slim_copy(self, full: nn.Module | None = None) -> tuple[nn.Module, PruningReport]:
        """Slim a deep copy of the trained model (never the live one, which may still train or be checkpointed).

        Under FSDP2 `full` is the gathered unsharded copy (`gather_full_model`, a collective all ranks join).
        """
        if full is None and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ValueError(
                "The slim model needs the full weights on one process; FSDP shards them. Call `trainer.save_model()` "
                "on every rank (it gathers them), or save a full checkpoint, load it and call "
                "`hf_hesso.slim_model(model)` before `save_pretrained`."
            )
        live = self._unwrapped_model() if full is None else full
        groups = self.groups if self.groups is not None else build_groups(live, kinds=self.args.prune_kinds)
        if is_peft_model(live):
            # Merge the adapters into a copy, then slice (the pruned groups are zero in base and adapters alike).
            slim, summary = merge_and_slim(live, groups)
            return slim, self._make_report(live, summary, len(groups))
        slim = copy.deepcopy(live) if full is None else full
        # Same blocks, resolved against the copy's parameters.
        groups = GroupSet(list(groups.blocks), groups.model_type, groups.param_shapes, model=slim)
        summary = slim_model(slim, groups)
        return slim, self._make_report(live, summary, len(groups))

    def _save_separately(self, output_dir: str) -> None:
        """Slim base model in `output_dir`, the adapters sliced alike in `output_dir/adapter`."""
        live = self._unwrapped_model()
        groups = self.groups if self.groups is not None else build_groups(live, kinds=self.args.prune_kinds)
        base, adapters, summary = slim_with_adapters(live, groups)
        self._report = report = self._make_report(live, summary, len(groups))
        with atomic_directory(output_dir) as tmp:
            base.save_pretrained(tmp)
            adapters.save_pretrained(os.path.join(tmp, ADAPTER_SUBDIR))
            self._write_beside_model(tmp, report)

    def _write_beside_model(self, directory: str, report: PruningReport) -> None:
        """The tokenizer (if any), the training arguments and the model card, next to a saved slim model."""
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        torch.save(self.args, os.path.join(directory, TRAINING_ARGS_NAME))
        with open(os.path.join(directory, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
            f.write(render_model_card(report))

    def _make_report(self, live: nn.Module, summary: SlimSummary, num_groups: int) -> PruningReport:
        args = self.args
        settings: dict[str, Any] = {
            "target_group_sparsity": args.target_group_sparsity,
            "target_param_sparsity": args.target_param_sparsity,
            "start_pruning_step": args.start_pruning_step,
            "pruning_periods": args.pruning_periods,
            "pruning_steps": args.pruning_steps,
            "importance_criteria": args.importance_criteria,
            "saliency_direction": args.saliency_direction,
            "saliency_steps": args.saliency_steps,
            "prune_kinds": args.prune_kinds or "all",
            "group_divisible": args.group_divisible,
            "prunable_groups": num_groups,
            "removed_groups": summary.removed_groups,
        }
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
        settings = {k: v for k, v in settings.items() if v is not None}
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
        return PruningReport(
            base_model=getattr(live.config, "_name_or_path", "") or "",
            model_name=Path(args.hub_model_id or args.output_dir).name,
            params_before=int(summary.params_before),
            params_after=int(summary.params_after),
            layers_before=list(summary.layers_before),
            layers_after=list(summary.layers),
            settings=settings,
            training=training,
        )

    def _save_slim(self, output_dir: str) -> None:
        # FSDP2: every rank takes part in gathering the full weights to rank 0 (FSDP1 is refused at optimizer set-up).
        full = gather_full_model(self.model) if self.is_fsdp_enabled else None
        if not self.args.should_save:
            return
        slim, report = self._slim_copy(full)
        self._report = report
        logger.info(
            f"Saving the slim model ({report.params_after:,} of {report.params_before:,} parameters) to {output_dir}",
            main_process_only=True,
        )
        with atomic_directory(output_dir) as tmp:
            slim.save_pretrained(tmp)
            self._write_beside_model(tmp, report)

    def save_model(
        self, output_dir: str | None = None, _internal_call: bool = False, merge_adapters: bool | None = None
    ) -> None:
        """Save the slim model (with its tokenizer/processor and model card) to `output_dir`, atomically.

        Checkpoints the Trainer writes during training (`_internal_call=True`) stay full size, so training can
        resume from them. The slim model is built from a copy: the live model keeps training.

        Args:
            output_dir (`str`, *optional*): where to save. Defaults to `args.output_dir`.
            merge_adapters (`bool`, *optional*): LoRA models only. `True`: one merged slim model; `False`: the slim
                base model plus the adapters sliced alike in `output_dir/adapter` (load with
                `PeftModel.from_pretrained(base, output_dir + "/adapter")`). Default: `not
                args.save_adapters_separately`.
        """
        if _internal_call and not self._pushing:
            super().save_model(output_dir, _internal_call=True)
            self._save_frozen_slices(output_dir if output_dir is not None else self.args.output_dir)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if merge_adapters is None:
            merge_adapters = not self.args.save_adapters_separately
        elif not merge_adapters and not is_peft_model(self._unwrapped_model()):
            raise ValueError(
                "`merge_adapters=False` keeps LoRA adapters apart from the slim base, but this model has no adapters. "
                "Call `save_model()` without `merge_adapters`."
            )
        if not merge_adapters and is_peft_model(self._unwrapped_model()):
            if self.args.should_save:
                self._save_separately(output_dir)
        else:
            self._save_slim(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

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
            groups = self.groups if self.groups is not None else build_groups(live, kinds=self.args.prune_kinds)
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
        """Write the pruning model card (`README.md`) to `args.output_dir`.

        It records the base model, parameters before and after, the kept heads / key-value groups / MLP channels
        of every layer, the HESSO settings and the training data and steps. The arguments are those of
        [`~transformers.Trainer.create_model_card`] and go into the card's metadata.
        """
        if not self.is_world_process_zero():
            return
        report = self._report if self._report is not None else self._slim_copy()[1]
        report = copy.copy(report)
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
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
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

        The arguments are those of [`~transformers.Trainer.push_to_hub`].
        """
        self._pushing = True
        try:
            return super().push_to_hub(
                commit_message=commit_message,
                blocking=blocking,
                token=token,
                revision=revision,
                private=private,
                **kwargs,
            )
        finally:
            self._pushing = False
