"""Knowledge distillation from a frozen teacher while HESSO trains and prunes the student.

The loss of every micro-batch is `alpha * T^2 * KL(teacher || student) + (1 - alpha) * task loss`, where the KL is
taken between the softmaxes of the teacher's and the student's logits at temperature `T` (Hinton et al.; the `T^2`
keeps the gradient scale independent of `T`), on the positions the task loss counts: for a causal LM the positions
whose next-token label is not `-100` (or, without labels, whose next token is attended), for a sequence classifier
every example. With `top_k`, the two distributions are compared on `k + 1` buckets: the teacher's `k` largest logits of
each position and one bucket for all the other classes, both softmaxes taken over the whole vocabulary (a true KL
between two `(k + 1)`-way distributions, no larger than the full KL, equal to it when `k + 1 >= classes`).

The teacher is a separate module that takes no gradient and is never stepped:
- default: a frozen copy of the model as it was when the trainer was built (before any training step);
- with LoRA: the copy has its adapters merged (`merge_and_unload`). Disabling the adapters of the live model is not
  the starting model: HESSO fades and zeroes the frozen base slices of the selected groups in place, so the live
  base weights change during pruning;
- or a model (or a path) the user passes.

A checkpoint holds the teacher's weights (`distill_teacher.safetensors`), and a resumed run loads them back, so it
distils from the same teacher even when the trainer is rebuilt from another model.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from .groups.peft import is_peft_model
from .modeling.compat import get_last_checkpoint

TEACHER_WEIGHTS_NAME = "distill_teacher.safetensors"

logger = get_logger(__name__)


def check_distill_settings(alpha: float, temperature: float, top_k: int | None) -> None:
    """Raise a `ValueError` naming the bad distillation setting and the fix."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"`distill_alpha` must lie in [0, 1], got {alpha}: it weighs the KL term against the task loss "
            "(1: KL only, 0: task loss only)."
        )
    if not temperature > 0:
        raise ValueError(f"`distill_temperature` must be > 0, got {temperature}. Use 1.0 for the plain softmax.")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(
            f"`distill_top_k` must be a positive integer or None, got {top_k!r}. None compares the full "
            "distributions; e.g. 64 compares them on the teacher's 64 largest logits."
        )


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the masked positions of `KL(softmax(t / T) || softmax(s / T))`, and the number of those positions.

    Args:
        student_logits (`torch.Tensor`): `(..., classes)`; gradients flow through it.
        teacher_logits (`torch.Tensor`): same shape, no gradient needed.
        temperature (`float`): the softmax temperature `T`.
        top_k (`int`, *optional*): compare the two distributions on `top_k + 1` buckets: the teacher's `top_k`
            largest logits of each position, and one "rest" bucket holding the probability of all the other classes
            (see `top_k_log_probs`). Both softmaxes are taken over all the classes, so a student that puts its mass
            outside the teacher's top k pays for it, and the KL equals the full one when `top_k + 1 >= classes`.
        mask (`torch.Tensor`, *optional*): bool, `student_logits.shape[:-1]`; positions to count (all when None).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the float32 KL sum (a scalar) and the float32 count of positions.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"The teacher's logits have shape {tuple(teacher_logits.shape)} but the student's "
            f"{tuple(student_logits.shape)}: distillation needs the same output space (same vocabulary or labels). "
            "Pass a `teacher_model` of the student's architecture and tokenizer."
        )
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes)
    t = teacher_logits.detach().reshape(-1, classes)
    if mask is not None:
        keep = mask.reshape(-1).to(s.device, torch.bool)
        s, t = s[keep], t[keep]
    s = s.float() / temperature
    t = t.float() / temperature
    if top_k is not None and top_k < classes:
        index = t.topk(top_k, dim=-1).indices
        log_p_t = top_k_log_probs(t, index)
        log_p_s = top_k_log_probs(s, index)
    else:
        log_p_t = F.log_softmax(t, dim=-1)
        log_p_s = F.log_softmax(s, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl, torch.tensor(float(s.shape[0]), device=kl.device)


def top_k_log_probs(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The log-probabilities of `softmax(logits)` at `index`, and of everything else as one last "rest" bucket.

    Args:
        logits (`torch.Tensor`): float `(n, classes)`.
        index (`torch.Tensor`): `(n, k)` distinct class indices of each row, `k < classes`.

    Returns:
        `torch.Tensor`: `(n, k + 1)`, the log of a distribution over `k + 1` buckets (each row's exps sum to 1).

    The rest bucket is a log-sum-exp over the classes outside `index` (the indexed ones set to the most negative
    float, whose exp is 0), not `log(1 - sum of the top k)`: it stays exact when the rest holds a tiny mass (no
    cancellation) and finite when it holds none, and its gradient reaches every logit outside `index`. The
    normaliser over all the classes is then `logaddexp` of the top-k and the rest log-sum-exps.
    """
    top = logits.gather(-1, index)
    rest = logits.scatter(-1, index, torch.finfo(logits.dtype).min).logsumexp(-1, keepdim=True)
    total = torch.logaddexp(top.logsumexp(-1, keepdim=True), rest)
    return torch.cat([top, rest], dim=-1) - total


def prediction_mask(inputs: dict, shifts_labels: bool, logits: torch.Tensor) -> torch.Tensor | None:
    """The positions of `logits` the task loss counts (see the module docstring); None for all of them."""
    labels = inputs.get("labels")
    if shifts_labels:
        if labels is not None:
            valid = labels[..., 1:] != -100
        elif inputs.get("attention_mask") is not None:
            mask = inputs["attention_mask"].bool()
            valid = mask[..., 1:] & mask[..., :-1]
        else:
            valid = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)[..., 1:]
        # The last position predicts past the end of the sequence.
        return torch.nn.functional.pad(valid, (0, 1), value=False)
    if labels is not None and labels.shape == logits.shape[: labels.dim()] and labels.dim() == logits.dim() - 1:
        return labels != -100
    return None


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of `model` as it is now; a LoRA `PeftModel` is copied with its adapters merged."""
    teacher = copy.deepcopy(model)
    if is_peft_model(teacher):
        teacher = teacher.merge_and_unload()
    return freeze(teacher)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def pick_teacher(
    model: nn.Module | None, teacher_model: nn.Module | str | os.PathLike | None, distill: bool
) -> nn.Module | str | os.PathLike | None:
    """The teacher a trainer distils from, picked before it adds adapters to `model`: `None` without `distill`,
    `teacher_model` when given (a model, or a path that `setup_distillation` loads with the student's class), else a
    frozen copy of `model` as it is now (`frozen_copy`)."""
    if not distill:
        if teacher_model is not None:
            raise ValueError(
                "`teacher_model` was given but `args.distill` is False, so it would be ignored. Set `distill=True` in "
                "the `HESSOConfig`, or drop `teacher_model`."
            )
        return None
    if teacher_model is not None:
        return teacher_model
    if model is None:
        raise ValueError(
            "`distill=True` with `model_init` has no model to copy as the teacher. Pass `teacher_model=` (a model or "
            "a path)."
        )
    return frozen_copy(model)


def load_teacher(teacher: nn.Module | str | os.PathLike, student: nn.Module) -> nn.Module:
    """The teacher the user passed, as a frozen module: a module as is, a path loaded with the student's class."""
    if isinstance(teacher, (str, os.PathLike)):
        base = student.get_base_model() if is_peft_model(student) else student
        if not isinstance(base, PreTrainedModel):
            raise ValueError(
                f"`teacher_model`={str(teacher)!r} is a path, which is loaded with the student's class, but the "
                f"student is a {type(base).__name__}, not a `PreTrainedModel`. Load the teacher yourself and pass it."
            )
        device = next(student.parameters()).device
        return freeze(type(base).from_pretrained(teacher, dtype=next(base.parameters()).dtype).to(device))
    if not isinstance(teacher, nn.Module):
        raise ValueError(
            f"`teacher_model` must be a model or a path to one, got {type(teacher).__name__}. Leave it unset to "
            "distil from a frozen copy of the model as it was when training started."
        )
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError(
            f"`teacher_model` shares {len(shared)} parameter tensor(s) with the model being trained, so it would "
            "change as the student trains and is pruned. Pass a separate copy (e.g. `copy.deepcopy(model)`), or leave "
            "`teacher_model` unset to distil from a frozen copy of the model as it was when training started."
        )
    return freeze(teacher)


@dataclass
class DistillTerms:
    """The two terms of one micro-batch's loss, each multiplied by the same factor (see `Distiller.terms`)."""

    loss: torch.Tensor
    kl: torch.Tensor
    task: torch.Tensor


class Distiller:
    """Holds the frozen teacher and computes the distillation loss; accumulates its two terms for logging.

    Args:
        teacher (`nn.Module`): the frozen teacher (see `frozen_copy`, `load_teacher`).
        alpha (`float`): weight of the KL term, in `[0, 1]`.
        temperature (`float`): softmax temperature `T`, > 0.
        top_k (`int`, *optional*): the KL on the teacher's `top_k` largest logits plus one bucket for the rest.
    """

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float, top_k: int | None = None):
        check_distill_settings(alpha, temperature, top_k)
        self.teacher = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.top_k = top_k
        # Sums since the last log of the per-optimizer-step terms, as the Trainer sums its `loss`.
        self._kl_sum = 0.0
        self._task_sum = 0.0
        self._steps_logged = 0
        # The task term of the last micro-batch, as scaled for `backward` (what CRIC's probes read).
        self.last_task: torch.Tensor | None = None

    def settings(self) -> dict:
        """The distillation settings, as the model card records them (beside `HESSO.settings()`)."""
        return {
            "distill": True,
            "distill_alpha": self.alpha,
            "distill_temperature": self.temperature,
            "distill_top_k": self.top_k,
        }

    @torch.no_grad()
    def teacher_logits(self, inputs: dict) -> torch.Tensor:
        teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
        return self.teacher(**teacher_inputs).logits

    def terms(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        task_mean: torch.Tensor,
        mask: torch.Tensor | None,
        factor: torch.Tensor | float = 1.0,
    ) -> DistillTerms:
        """The loss of one micro-batch, `factor * (alpha * T^2 * KL + (1 - alpha) * task_mean)`.

        Args:
            task_mean (`torch.Tensor`): the task loss averaged over this micro-batch's items.
            factor (`torch.Tensor` or `float`): what the caller multiplies both terms by (e.g. the micro-batch's
                share of the label tokens of the accumulated batch). The KL is averaged over the micro-batch's
                positions like the task loss, and both terms get the same factor, so the mix stays `alpha`.
        """
        kl_sum, count = distillation_kl(student_logits, teacher_logits, self.temperature, self.top_k, mask)
        kl = kl_sum / count.clamp_min(1) * factor
        task = task_mean * factor
        loss = self.alpha * self.temperature**2 * kl + (1 - self.alpha) * task
        return DistillTerms(loss=loss, kl=kl, task=task)

    def record(self, terms: DistillTerms, divisor: float) -> None:
        """Add a micro-batch's terms (divided as the Trainer divides the loss for gradient accumulation)."""
        self.last_task = terms.task.detach().mean() / divisor
        self._kl_sum += float(terms.kl.detach()) / divisor
        self._task_sum += float(self.last_task)

    def step_done(self) -> None:
        self._steps_logged += 1

    def pop_metrics(self) -> dict[str, float]:
        """`distill/kl` and `distill/task` averaged over the optimizer steps since the last call (local values)."""
        if self._steps_logged == 0:
            return {}
        out = {"distill/kl": self._kl_sum / self._steps_logged, "distill/task": self._task_sum / self._steps_logged}
        self._kl_sum = self._task_sum = 0.0
        self._steps_logged = 0
        return out

    def save(self, directory: str) -> None:
        save_model(self.teacher, os.path.join(directory, TEACHER_WEIGHTS_NAME))

    def load(self, directory: str) -> bool:
        """Load the teacher's weights stored in a checkpoint; returns whether the checkpoint had them."""
        path = os.path.join(directory, TEACHER_WEIGHTS_NAME)
        if not os.path.isfile(path):
            return False
        device = next(self.teacher.parameters()).device
        load_model(self.teacher, path, strict=True, device=str(device))
        return True


class DistillCallback(TrainerCallback):
    """Counts optimizer steps for the distillation metrics and stores the teacher in every checkpoint."""

    def __init__(self, distiller: Distiller):
        self.distiller = distiller

    def on_step_end(self, args, state, control, **kwargs):
        self.distiller.step_done()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(directory):
                self.distiller.save(directory)


class DistillationMixin:
    """Distillation for a `transformers.Trainer` subclass (`class MyTrainer(DistillationMixin, Trainer)`).

    Call `setup_distillation(teacher, ...)` at the end of `__init__`; until then (and in evaluation) the loss is the
    Trainer's. [`HESSOTrainer`] uses it with the `distill*` fields of [`HESSOConfig`]; the quality benchmark uses it
    with the plain Trainer for its one-shot baselines.
    """

    distiller: Distiller | None = None

    def setup_distillation(
        self, teacher: nn.Module | str | os.PathLike, alpha: float, temperature: float = 1.0, top_k: int | None = None
    ) -> None:
        """Distil from `teacher` (a model, frozen here, or a path loaded with the student's class; moved to the
        training device) with these settings."""
        teacher = load_teacher(teacher, self.model)
        teacher.to(self.args.device)
        self.distiller = Distiller(freeze(teacher), alpha=alpha, temperature=temperature, top_k=top_k)
        self.add_callback(DistillCallback(self.distiller))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict,
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """`Trainer.compute_loss`; in training with a teacher, `alpha * T^2 * KL + (1 - alpha) * task loss`.

        Evaluation keeps the task loss. Both terms are means over the micro-batch multiplied by the same factor:
        when the Trainer counts the label tokens of the accumulated batch (`num_items_in_batch`), the model gets
        this micro-batch's count instead, so its loss is the micro-batch mean whether or not it reads the count
        (BERT's sequence classifier accepts `**kwargs` and ignores it), and both terms are multiplied by the
        micro-batch's share of the count and the Trainer's scale across processes; without a count, both are
        means that the Trainer divides by the accumulation steps.
        """
        if self.distiller is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.accelerator.autocast():
            teacher_logits = self.distiller.teacher_logits(inputs)
        mask = prediction_mask(inputs, self._loss_shifts_labels, teacher_logits)
        factor: torch.Tensor | float = 1.0
        micro_items = None
        if num_items_in_batch is not None:
            micro_items = self._micro_batch_items(inputs)
            total = torch.as_tensor(num_items_in_batch, device=micro_items.device).float().clamp_min(1)
            factor = micro_items.float() / total
        task, outputs = super().compute_loss(
            model, inputs, True, None if micro_items is None else micro_items.clamp_min(1)
        )
        # `Trainer.compute_loss` multiplies a loss normalised by a count by the number of processes (the count is
        # the global one); the task loss here is normalised by the local count, so the scale goes to both terms.
        scale = self._items_scale(micro_items is not None)
        if scale != 1:
            task = task / scale
            factor = factor * scale
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        terms = self.distiller.terms(logits, teacher_logits, task, mask, factor)
        # As `Trainer.training_step` decides whether to divide the loss by the accumulation steps.
        if self.loss_is_scaled_for_ga is not None:
            ga_scaled = self.loss_is_scaled_for_ga
        else:
            ga_scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        # Set by the training loop (the last cycle of an epoch may be shorter); a call outside it divides by the setting.
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        self.distiller.record(terms, 1.0 if ga_scaled else float(accumulation))
        return (terms.loss, outputs) if return_outputs else terms.loss

    def _micro_batch_items(self, inputs: dict) -> torch.Tensor:
        """The label tokens of this micro-batch, counted as `Trainer._get_num_items_in_batch` counts them."""
        if "shift_labels" in inputs:
            labels = inputs["shift_labels"]
        elif self._loss_shifts_labels:
            labels = inputs["labels"][..., 1:]
        else:
            labels = inputs["labels"]
        return labels.ne(-100).sum()

    def _items_scale(self, counted: bool) -> float:
        """The factor `Trainer.compute_loss` applies to a loss normalised by `num_items_in_batch`."""
        if not (
            counted
            and self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
        ):
            return 1
        return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu

    def task_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The task term of the last training micro-batch as scaled for `backward`; `loss` itself without a teacher.

        `loss` is what `training_step` returned for that micro-batch (the mixed loss when distilling).
        """
        if self.distiller is None or self.distiller.last_task is None:
            return loss
        task, self.distiller.last_task = self.distiller.last_task, None
        return task

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; a resumed run reloads the teacher stored in the checkpoint."""
        if self.distiller is not None and resume_from_checkpoint not in (None, False):
            path = (
                get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            )
            if path is not None and not self.distiller.load(path):
                logger.warning(
                    f"The checkpoint {path} holds no distillation teacher ({TEACHER_WEIGHTS_NAME}): the run distils "
                    "from the teacher built for this trainer.",
                    main_process_only=True,
                )
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `distill/kl` and `distill/task` (means over the steps since the last log and over processes)."""
        if self.distiller is not None and "loss" in logs:
            metrics = self.distiller.pop_metrics()
            if metrics and self.accelerator.num_processes > 1:
                # A collective: `log` runs on every rank at the same steps.
                values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.args.device)
                values = self.accelerator.reduce(values, reduction="mean")
                metrics = dict(zip(metrics, values.tolist(), strict=True))
            logs = {**logs, **metrics}
        super().log(logs, start_time)
