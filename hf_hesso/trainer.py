"""`HESSOTrainer`: a `transformers.Trainer` that trains and structurally prunes in one run.

This file holds what the Trainer subclass needs: its construction, the optimizer wiring, the training step, the
logs, the saving and the Hub upload. The callbacks it adds and the console line live in `callbacks.py`, the
checkpoint checks of a resumed run in `resume.py`, the save itself in `export/save.py`.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .callbacks import PruningProgressCallback, SelectionDiagnostics, find_hesso, quiet_console
from .config import HESSOConfig
from .distill import DistillationMixin, pick_teacher
from .export import SavedSlim, save_slim
from .export.atomic import adopting_new_files, atomic_save
from .export.card import card_metadata, check_evaluation, training_facts, write_model_card
from .export.save import upload_folder
from .groups import GroupSet, build_groups
from .groups.peft import is_peft_model
from .modeling.compat import TRAINING_ARGS_NAME
from .optim import CRIC, HESSO
from .optim.distributed import check_backend
from .resume import (
    check_checkpoint,
    has_frozen_slices,
    load_available_state,
    restore_frozen_slices,
    save_frozen_slices,
)
from .slim import gather_full_model
from .slim.core import uniform_stock_problem


class HESSOTrainer(DistillationMixin, Trainer):
    r"""
    A [`~transformers.Trainer`] that trains and structurally prunes the model in one run (HESSO).

    It wraps the optimizer the Trainer builds from `args` (its `optim` choice, weight-decay parameter groups and
    learning-rate scheduler are kept) in [`HESSO`], which progressively drives the least important groups (attention
    heads, key/value groups, query slots, MLP channels) to exactly zero. Pruning metrics (`hesso/*`) are merged into
    every training log, so every reporter sees them.

    [`~HESSOTrainer.save_model`], the route to a slim checkpoint, writes the *slim* model (physically smaller,
    loadable with `from_pretrained(..., trust_remote_code=True)`) with its tokenizer/processor and a model card;
    checkpoints written during training stay full size, so `train(resume_from_checkpoint=...)` works (see
    `resume.py`). [`~HESSOTrainer.push_to_hub`] uploads the slim model and its card.

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
        teacher = pick_teacher(model, teacher_model, args.distill)  # before the adapters are added
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
        self._saved: SavedSlim | None = None  # the last slim save (its card's report, its files)
        self._card_evaluation: list[dict] | None = None  # scores for the card (`save_model(evaluation=...)`)
        self.add_callback(PruningProgressCallback())
        self.selection_diagnostics = SelectionDiagnostics()
        self.add_callback(self.selection_diagnostics)
        if teacher is not None:
            self.setup_distillation(teacher, args.distill_alpha, args.distill_temperature, args.distill_top_k)
        # The reporters (TensorBoard, W&B, ...) are other callbacks: they still receive every `hesso/*` metric.
        quiet_console(self.callback_handler.callbacks)

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
        return find_hesso(self.optimizer)

    def _unwrapped_model(self, model: nn.Module | None = None) -> nn.Module:
        return self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the optimizer `args` asks for, as `Trainer` does, and wrap it in [`HESSO`]."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        check_backend(self.is_deepspeed_enabled, getattr(plugin, "fsdp_version", 1) if self.is_fsdp_enabled else None)
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
        args.check_direction(lora=self._is_lora())
        if args.layer_shapes == "uniform":
            problem = uniform_stock_problem(self._unwrapped_model(model), self.groups, args.group_divisible)
            if problem is not None:
                raise ValueError(problem)
        self.optimizer = (CRIC if args.cric else HESSO)(self.optimizer, self.groups, **args.optimizer_kwargs())
        if args.cric and planned and planned > 0:
            args.check_cric_fits(planned, self.optimizer.pruning_end_step, len(self.groups.blocks))
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """`Trainer.training_step`, then hand the task loss to [`CRIC`] on the steps that read it: the task loss
        also when distilling, as scaled for gradient accumulation (CRIC sums the micro-batches' values), averaged
        across processes so that every rank takes the same decisions."""
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
        if self.groups is not None:  # the groups bound to `live` (a gathered copy under FSDP2)
            groups = GroupSet(list(self.groups.blocks), self.groups.model_type, self.groups.param_shapes, model=live)
        else:
            groups = build_groups(live, kinds=self.args.prune_kinds, hidden_unit=self.args.hidden_channel_unit)

        def write_extra(directory: str) -> None:
            torch.save(self.args, os.path.join(directory, TRAINING_ARGS_NAME))

        saved = save_slim(
            live,
            output_dir,
            groups,
            tokenizer=self.processing_class or getattr(self.data_collator, "tokenizer", None),
            # The card's settings: the optimizer's own (`HESSO.settings()`), and those of the groups and the teacher.
            optimizer=self.hesso_optimizer,
            settings={
                "prune_kinds": self.args.prune_kinds or "all",
                **(self.distiller.settings() if self.distiller is not None else {}),
            },
            training=training_facts(self.args, self.state, self.train_dataset),
            evaluation=self._card_evaluation,
            merge_adapters=merge_adapters,
            write_extra=write_extra,
            stock=self.args.layer_shapes == "uniform" and merge_adapters,
        )
        saved.report.model_name = Path(self.args.hub_model_id or self.args.output_dir).name
        self._saved = saved

    def save_model(
        self,
        output_dir: str | None = None,
        _internal_call: bool = False,
        merge_adapters: bool | None = None,
        evaluation: list[dict] | None = None,
    ) -> None:
        """Save the slim model of the run to `output_dir`: THE route to a slim checkpoint from a Trainer.

        This is [`save_slim`] with the Trainer's settings: its tokenizer/processor, `training_args.bin`, and the card
        with the optimizer's `settings()` and the training facts. The slim model is a CPU copy built layer by layer
        (the live model keeps training), written atomically; only the files of the save are written or removed, and
        a file hf_hesso did not write is never replaced (see `save_slim` and `docs/saving.md`). A
        `layer_shapes="uniform"` run is saved as the stock class and config (`save_slim(..., stock=True)`). Called
        before `train()`, it warns that the model is unpruned. The checkpoints the Trainer writes during training
        (`_internal_call=True`) stay full size, so training can resume from them.

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
        if _internal_call:  # the Trainer's own checkpoint: full size, plus HESSO's frozen LoRA slices
            super().save_model(output_dir, _internal_call=True)
            if hesso is not None and self.args.should_save and self._is_lora():
                save_frozen_slices(hesso, output_dir)  # peft checkpoints hold the adapters only
            return
        if (hesso is None or hesso.num_steps == 0) and self.args.should_save:
            warnings.warn(
                "`save_model()` before `train()`: the model has not been pruned. It writes the full-size model as a "
                f"slim-format checkpoint (`hesso_*` config, shipped code, model card; only groups that are already "
                f"all zero are removed) to {str(output_dir)!r}. Call `trainer.train()` first to prune, or use "
                "`model.save_pretrained(dir)` for a stock checkpoint.",
                UserWarning,
                stacklevel=2,
            )
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
        """`Trainer._push_from_checkpoint` (`push_to_hub=True` while training) copies the checkpoint's files into
        `args.output_dir`; they are recorded as owned by the last save (its manifest), so that the slim save at the
        end replaces them (or removes them), where it refuses to replace a file hf_hesso did not write."""
        if not self.is_world_process_zero():
            return super()._push_from_checkpoint(checkpoint_folder)
        with adopting_new_files(self.args.output_dir):
            super()._push_from_checkpoint(checkpoint_folder)

    # ---- Resuming (the checks live in `resume.py`) ----

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Load the optimizer (HESSO's schedule included) and scheduler states; a checkpoint without HESSO's state
        is refused, or with `args.restart_pruning_schedule` loaded as far as it goes (see `hf_hesso.resume`)."""
        if checkpoint is None or self.is_deepspeed_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        problems, hesso_state_ok = check_checkpoint(
            checkpoint, cric=self.args.cric, lora=self._is_lora(), fsdp=self.is_fsdp_enabled
        )
        if not problems:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_available_state(
            checkpoint,
            problems,
            hesso_state_ok,
            optimizer=self.optimizer,
            hesso=self.hesso_optimizer,
            lr_scheduler=self.lr_scheduler,
            restart_pruning_schedule=self.args.restart_pruning_schedule,
            step=self.state.global_step,
            max_steps=self.state.max_steps,
            fsdp=self.is_fsdp_enabled,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        live = self._unwrapped_model(model)
        if has_frozen_slices(resume_from_checkpoint) and is_peft_model(live):
            if self.groups is None:
                self.groups = build_groups(
                    live, kinds=self.args.prune_kinds, hidden_unit=self.args.hidden_channel_unit
                )
            restore_frozen_slices(resume_from_checkpoint, self.groups, live)

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
        """Write the card of the last `save_model()` again into `args.output_dir`, with the metadata given here
        (the arguments of [`~transformers.Trainer.create_model_card`]), by the writer `save_slim` uses: a
        `README.md` hf_hesso did not write is kept, with a warning."""
        if not self.is_world_process_zero():
            return
        if self._saved is None:
            raise ValueError("No slim model was saved yet: call `trainer.save_model()` before `create_model_card()`.")
        report = copy.copy(self._saved.report)
        if model_name is not None:
            report.model_name = model_name
        if finetuned_from is not None:
            report.base_model = finetuned_from
        report.metadata = card_metadata(language, license, tags, tasks, dataset_tags, dataset)
        # The card joins the files of the last save (its manifest), replaced atomically like them.
        with atomic_save(self.args.output_dir, update=True) as save:
            write_model_card(save, report)

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
        saved = self._saved
        # The files of the save just made, when it went to `output_dir`; else they are read from its manifest.
        same = saved is not None and os.path.realpath(saved.directory) == os.path.realpath(self.args.output_dir)
        return upload_folder(
            self.args.output_dir,
            self.hub_model_id,
            token=token if token is not None else self.args.hub_token,
            message=commit_message or "Upload slim model (hf_hesso)",
            revision=revision,
            files=saved.files if same else None,
        )
