# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Shared pieces of the benchmarks: one-shot group scores, the budgeted selection of HESSO, machine description."""

from __future__ import annotations

import os
import platform

import torch

from hf_hesso.groups import GroupSet
from hf_hesso.optim import HESSO
from hf_hesso.optim.selection import ParamCounter


def machine() -> str:
    """One line naming the machine the benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return (
        f"{platform.platform()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def magnitude_scores(groups: GroupSet) -> torch.Tensor:
    """Per group, the L2 norm of all its elements (over every slice), in group order."""
    params = {n: p.detach() for n, p in groups.parameters().items()}
    return torch.cat([b.squared_norms(params) for b in groups.blocks]).double().sqrt()


def select_budget(
    groups: GroupSet, scores: torch.Tensor, param_sparsity: float, layer_shapes: str = "free"
) -> torch.Tensor:
    """The groups HESSO would select with these saliency `scores` for `target_param_sparsity=param_sparsity`.

    Runs `HESSO.select` itself (one period holding the whole budget), so the kind-relative per-parameter ranking,
    `select_redundant` and the `ParamCounter` accounting are exactly those of HESSO; only the scores differ. The
    throw-away AdamW allocates no state (nothing is stepped).

    Returns:
        `torch.Tensor`: global indices of the selected groups.
    """
    params = list(groups.parameters().values())
    hesso = HESSO(
        torch.optim.AdamW(params, lr=0.0),
        groups,
        target_param_sparsity=param_sparsity,
        start_pruning_step=0,
        pruning_periods=1,
        pruning_steps=2,
        layer_shapes=layer_shapes,
    )
    return hesso.select(scores.double().cpu(), period=0)


def removed_fraction(groups: GroupSet, model=None) -> float:
    """Fraction of the prunable parameters whose groups are exactly zero now (each element counted once)."""
    counter = ParamCounter(groups)
    return counter.count(groups.zero_mask(model)) / counter.total
