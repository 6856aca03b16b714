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

from .config import HESSOConfig
from .export import MODEL_CARD_NAME, PruningReport, render_model_card, save_slim
from .export.save import upload_folder
from .groups import GroupSet, build_groups
from .groups.peft import is_peft_model
from .optim import CRIC, HESSO
from .optim.frozen import FROZEN_SLICES_NAME, frozen_slices_state, load_frozen_slices
from .slim import gather_full_model, uniform_stock_problem

logger = get_logger(__name__)


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

    def _card_settings(self, num_groups: int) -> dict[str, Any]:
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
        return settings

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
        return build_groups(model, kinds=self.args.prune_kinds)

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
        self, output_dir: str | None = None, _internal_call: bool = False, merge_adapters: bool | None = None
    ) -> None:
        """Save the slim model (with its tokenizer/processor and model card) to `output_dir`, atomically.

        This is `hf_hesso.save_slim` with the Trainer's settings: the slim model is a CPU copy built layer by layer,
        and the live model keeps training. The checkpoints the Trainer writes during training (`_internal_call=True`)
        stay full size, so training can resume from them.

        Args:
            output_dir (`str`, *optional*): where to save. Defaults to `args.output_dir`.
            merge_adapters (`bool`, *optional*): LoRA models only. `True`: one merged slim model; `False`: the slim
                base model plus the adapters sliced alike in `output_dir/adapter` (load with
                `PeftModel.from_pretrained(base, output_dir + "/adapter")`). Default: `not
                args.save_adapters_separately`.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
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
