"""Scoring: the base optimizer's step, the direction `d` it implies, and the per-group saliency of that step.

`Scorer.step_and_score` takes one base step and returns one score per group (high = important), from the weights
after the step and either the processed update direction `d = (p_before - p_after) / lr` (the paper's) or the raw
gradient. `SaliencyWindow` averages the scores of the `saliency_steps` steps of a selection's window and keeps a
batch whose scores are not usable (NaN, infinite, all zero) out of that average: a selection on such scores would
rank the groups by their index.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch.optim import Optimizer

from ..groups import GroupSet
from ..groups.peft import adapter_parameters, effective_weights
from .activation import ActivationRecorder
from .saliency import SaliencyAccumulator, saliency_scores

_ADVICE = (
    "Check the loss and the gradients of these steps (a NaN or infinite loss, an fp16 overflow, a learning rate so "
    "high that the weights diverged): lower the learning rate, clip the gradients (`max_grad_norm`), or start "
    "pruning later."
)


def score_problem(scores: torch.Tensor) -> str | None:
    """Why `scores` cannot rank groups (`"not finite"`, `"all zero"`), or None when they can."""
    if not bool(torch.isfinite(scores).all()):
        return f"not finite ({int((~torch.isfinite(scores)).sum())} of {scores.numel()} groups NaN or infinite)"
    if not bool(scores.any()):
        return "all zero"
    return None


class Scorer:
    """Takes the base optimizer's step and scores every group on it.

    Args:
        groups (`GroupSet`): the groups to score.
        weights (`dict[str, float]`): criterion weights (see `check_criteria`).
        direction (`str`): `"update"` or `"gradient"`.
        kinds (`torch.Tensor`, *optional*): kind id per group; when given, each criterion is normalised per kind
            (the scale of a parameter budget, see `saliency_scores`).
        activation (`ActivationRecorder`, *optional*): the forward hooks of the `activation` criterion.
    """

    def __init__(
        self,
        groups: GroupSet,
        weights: dict[str, float],
        direction: str,
        kinds: torch.Tensor | None = None,
        activation: ActivationRecorder | None = None,
    ):
        self.groups = groups
        self.weights = weights
        self.direction = direction
        self.kinds = kinds
        self.activation = activation

    def step_and_score(self, optimizer: Optimizer, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Base step; returns the saliency of every group (CPU, float64)."""
        if self.direction == "gradient":
            return self._step_and_score_gradient(optimizer, params)
        # LoRA: projections are scored on the effective weight `W0 + s * B @ A` (under the base weight's name, whose
        # slices cover the same rows/columns); the adapter slices then add nothing on their own.
        adapters = self.groups.adapters
        skip = {n for ads in adapters.values() for ad in ads for n in (ad.a, ad.b, ad.b_bias) if n is not None}
        before = {
            name: p.detach().clone()
            for name, p in params.items()
            if name not in skip and name not in adapters and p.requires_grad
        }
        # The adapters' `A`/`B` of every LoRA projection, also those no group slices (`A` of a row-only projection).
        lora_params = {**adapter_parameters(self.groups), **params} if adapters else {}
        eff_before = effective_weights(adapters, lora_params) if adapters else {}
        lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        optimizer.step()
        acc = SaliencyAccumulator(self.groups, device=next(iter(params.values())).device)
        for name, x in effective_weights(adapters, lora_params).items() if adapters else ():
            lr = float(lrs[id(lora_params[adapters[name][0].b])])
            d = eff_before.pop(name).sub_(x)
            acc.add(name, x, d.div_(lr) if lr != 0 else d)
        for name, p in params.items():
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
        return self._finish(acc)

    def _step_and_score_gradient(self, optimizer: Optimizer, params: dict[str, torch.Tensor]) -> torch.Tensor:
        optimizer.step()
        acc = SaliencyAccumulator(self.groups, device=next(iter(params.values())).device)
        for name, p in params.items():
            acc.add(name, p.detach(), p.grad if p.grad is not None else torch.zeros_like(p))
        return self._finish(acc)

    def _finish(self, acc: SaliencyAccumulator) -> torch.Tensor:
        """The weighted criteria of the accumulated statistics (one all-reduce under FSDP2)."""
        stats = acc.finish()
        if self.activation is not None:
            # The groups' output norms recorded by forward hooks on this step's batch (the `activation` criterion).
            stats = dataclasses.replace(stats, act=self.activation.pop())
        return saliency_scores(stats, self.weights, kinds=self.kinds).cpu().double()


class SaliencyWindow:
    """Running sum of the usable scores of the steps of a selection's window, and how many steps it holds.

    A step whose scores are not usable (`score_problem`) is left out with a warning; a selection with no usable
    step in its window raises (see `average`).
    """

    def __init__(self, num_groups: int):
        self.sum = torch.zeros(num_groups, dtype=torch.float64)
        self.count = 0

    def add(self, scores: torch.Tensor, step: int) -> bool:
        """Add one window step's scores; returns False (and warns) when they were left out."""
        problem = score_problem(scores)
        if problem is not None:
            warnings.warn(
                f"HESSO: the saliency scores of optimizer step {step} are {problem}; that batch is left out of the "
                f"average of the next selection. {_ADVICE}",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        self.sum += scores
        self.count += 1
        return True

    def average(self, scores: torch.Tensor, step: int, period: int, first_step: int) -> torch.Tensor:
        """The selection step's scores averaged with the window's usable ones; resets the window.

        Raises `RuntimeError` when no step of the window (`first_step ... step`) has usable scores.
        """
        total, count = self.sum.clone(), self.count
        self.sum.zero_()
        self.count = 0
        problem = score_problem(scores)
        if problem is None:
            return (total + scores) / (count + 1)
        if count == 0:
            window = f"step {step}" if first_step >= step else f"every step of its window (steps {first_step}-{step})"
            raise RuntimeError(
                f"HESSO cannot select the redundant groups of pruning period {period + 1} at optimizer step {step}: "
                f"the saliency scores of {window} are {problem}, and selecting on them would remove groups in index "
                f"order. {_ADVICE} With `saliency_steps` > 1 a selection skips such batches as long as one step of "
                "its window scores normally."
            )
        warnings.warn(
            f"HESSO: the saliency scores of optimizer step {step} are {problem}; the selection of pruning period "
            f"{period + 1} uses the average of the {count} other step(s) of its window. {_ADVICE}",
            RuntimeWarning,
            stacklevel=4,
        )
        return total / count
