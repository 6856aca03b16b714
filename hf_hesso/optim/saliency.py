"""Saliency of groups: per-group reductions, the five criteria of HESSO and one elementwise Taylor criterion.

Scoring works in two stages so that sharded training can add one collective in one place:

1. `SaliencyAccumulator.add` reduces one parameter at a time into per-group partial sums of `<x, x>`, `<d, d>`,
   `<x, d>` and `sum |x * d|`, stored in one `(4, num_groups)` tensor (one tensor op per slice, never a loop over
   groups), so only one parameter's float copy of the direction is alive at a time.
2. `SaliencyAccumulator.finish` turns the partial sums into `GroupStatistics`. A distributed version all-reduces
   the `(4, num_groups)` tensor there, before anything is combined.

The criteria are small functions of the statistics (high = important); `saliency_scores` normalises each by its
L2 norm over all groups and sums them with the user's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..groups import GroupSet, Slice
from .distributed import ShardReduction, SliceOps, is_dtensor, statistic_sums


@dataclass(frozen=True)
class GroupStatistics:
    """Per-group reductions of the parameters `x` and the update direction `d`, each of shape `(num_groups,)`."""

    xx: torch.Tensor  # ||x_g||^2
    dd: torch.Tensor  # ||d_g||^2
    xd: torch.Tensor  # <x_g, d_g>
    axd: torch.Tensor  # sum_i |x_i * d_i| over the group's elements
    numel: torch.Tensor  # n_g, as float
    act: torch.Tensor | None = None  # ||a_g||: the group's output over the scoring batches (`ActivationRecorder`)


def magnitude(stats: GroupStatistics) -> torch.Tensor:
    """`||x_g||`."""
    return stats.xx.sqrt()


def avg_magnitude(stats: GroupStatistics) -> torch.Tensor:
    """`||x_g|| / n_g`."""
    return stats.xx.sqrt() / stats.numel


def cosine_similarity(stats: GroupStatistics) -> torch.Tensor:
    """`cos(x_g, d_g) + 1`; a group with a zero weight or a zero direction counts as orthogonal (1)."""
    denom = (stats.xx * stats.dd).sqrt()
    cos = torch.where(denom > 0, stats.xd / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0.0)
    return cos + 1


def taylor_first_order(stats: GroupStatistics) -> torch.Tensor:
    """`|<x_g, d_g>|`."""
    return stats.xd.abs()


def taylor_second_order(stats: GroupStatistics) -> torch.Tensor:
    """`0.5 * <x_g, d_g>^2` (the reference code squares the first-order term; no Hessian)."""
    return 0.5 * stats.xd.square()


def taylor_elementwise(stats: GroupStatistics) -> torch.Tensor:
    """`sum_i |x_i * d_i|` over the group's elements: the first-order estimate of removing each element alone, summed.

    Not one of the paper's five (its weight defaults to 0). `taylor_first_order` is the first-order estimate of
    removing the group at once, where positive and negative terms cancel; this sum (LLM-Pruner's element-wise group
    importance) keeps every element's sensitivity. Measured on SmolLM2-135M (`benchmarks/quality.py`), with
    `saliency_direction="gradient"` it ranks groups far better than the paper's mix; see the README.
    """
    return stats.axd


def activation(stats: GroupStatistics) -> torch.Tensor:
    """`||a_g||`: the magnitude of the group's output on the scoring batches (Minitron's activation criterion).

    Forward-only, from the hooks of `hf_hesso.optim.activation.ActivationRecorder`, which `HESSO` installs when this
    criterion has a weight.
    """
    if stats.act is None:
        raise ValueError(
            "The `activation` criterion needs the activations recorded on the scoring batches; `HESSO` records them "
            "when `importance_criteria` gives `activation` a weight (or `saliency='activation'`)."
        )
    return stats.act


# name -> criterion: the paper's five in its order, then `taylor_elementwise`, then `activation`.
CRITERIA: dict[str, Callable[[GroupStatistics], torch.Tensor]] = {
    "magnitude": magnitude,
    "avg_magnitude": avg_magnitude,
    "cosine_similarity": cosine_similarity,
    "taylor_first_order": taylor_first_order,
    "taylor_second_order": taylor_second_order,
    "taylor_elementwise": taylor_elementwise,
    "activation": activation,
}
PAPER_CRITERIA = ("magnitude", "avg_magnitude", "cosine_similarity", "taylor_first_order", "taylor_second_order")


def saliency_scores(
    stats: GroupStatistics, weights: dict[str, float], kinds: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted sum of the criteria, each normalised (high = important).

    Without `kinds` (the paper), each criterion is divided by its L2 norm over all groups. With `kinds` (an integer
    kind id per group), each criterion is divided by its root mean square over the groups of the same kind, so a
    score says how a group compares with its peers: the scale used to rank groups of different sizes against a
    parameter budget. There, an all-groups norm would let the criteria that grow with a group's size (magnitude)
    dominate the large kinds and the size-free ones (cosine) dominate the small kinds, so one kind's scores would
    spread far more than another's.
    """
    total = torch.zeros_like(stats.xx)
    for name, weight in weights.items():
        if weight == 0:
            continue
        values = CRITERIA[name](stats)
        if kinds is None:
            norm = values.norm()
            if norm > 0:
                values = values / norm
        else:
            num_kinds = int(kinds.max()) + 1 if kinds.numel() else 0
            counts = torch.bincount(kinds, minlength=num_kinds).clamp_min(1).to(values.dtype)
            squares = torch.zeros(num_kinds, dtype=values.dtype, device=values.device).index_add_(
                0, kinds.to(values.device), values.square()
            )
            rms = (squares / counts).sqrt()[kinds]
            values = values / torch.where(rms > 0, rms, torch.ones_like(rms))
        total += weight * values
    return total


class SaliencyAccumulator:
    """Collects per-group partial sums of `<x,x>`, `<d,d>`, `<x,d>`, `sum |x*d|`, one parameter at a time.

    Args:
        groups (`GroupSet`): the groups to score.
        device (`torch.device`): where the `(4, num_groups)` partial sums live (the parameters' device).
    """

    def __init__(self, groups: GroupSet, device: torch.device | str = "cpu"):
        self.groups = groups
        self.partials = torch.zeros(4, groups.num_groups, dtype=torch.float32, device=device)
        self._slices = slices_by_param(groups)
        # Partial sums of FSDP2-sharded parameters (local shards only), all-reduced once in `finish`.
        self._shard_partials: torch.Tensor | None = None
        self._reduction = ShardReduction()

    def add(self, name: str, x: torch.Tensor, d: torch.Tensor) -> None:
        """Add the contribution of parameter `name` (value `x`, direction `d`, same shape) to every group."""
        if is_dtensor(x):
            self._add_sharded(name, x, d)
            return
        x = x.float()
        d = d.float()
        for offset, s in self._slices[name]:
            sums = statistic_sums(s.view(x), s.view(d), s.dim + 1)
            self.partials[:, offset : offset + s.n] += sums.to(self.partials.device)

    def _add_sharded(self, name: str, x: torch.Tensor, d: torch.Tensor) -> None:
        """The local shard's contribution of a row-sharded `DTensor` parameter (no communication here)."""
        contributes = self._reduction.contributes(x)
        if self._shard_partials is None:
            self._shard_partials = torch.zeros_like(self.partials, device=x.to_local().device)
        if not contributes:
            return
        for offset, s in self._slices[name]:
            sums, rows = SliceOps(s, x).partial_sums(x, d)
            if rows is None:
                self._shard_partials[:, offset : offset + s.n] += sums
            else:
                self._shard_partials.index_add_(1, rows + offset, sums)

    def finish(self) -> GroupStatistics:
        partials = self.partials
        if self._shard_partials is not None:
            # One all-reduce per scoring step adds the shards' partial sums; every rank then holds the same totals.
            self._reduction.all_reduce(self._shard_partials)
            partials = partials + self._shard_partials.to(partials.device)
        xx, dd, xd, axd = partials.double().cpu()
        return GroupStatistics(xx=xx, dd=dd, xd=xd, axd=axd, numel=self.groups.numel.double())


def slices_by_param(groups: GroupSet) -> dict[str, list[tuple[int, Slice]]]:
    """`param name -> [(offset of the block's first group, slice)]` for every slice of every block."""
    out: dict[str, list[tuple[int, Slice]]] = {}
    for block in groups.blocks:
        for s in block.slices:
            out.setdefault(s.param, []).append((block.offset, s))
    return out
