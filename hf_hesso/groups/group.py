"""Immutable descriptions of zero-invariant groups.

A *group* is a set of slices of several tensors that together form one removable structure (one MLP channel,
one attention head, one key/value group, one query slot). Groups of one kind in one layer form a *block*, and a
block is stored as a whole: every slice of a block cuts one dimension of one tensor into `outer x n x inner`
positions, and group `i` of the block owns the positions whose middle index is `i`. This one pattern covers all
kinds (see `hf_hesso.groups.rules`) and lets every per-group reduction run as one vectorised tensor operation per
slice instead of one Python loop iteration per group: a Llama-3-8B has ~460k MLP channels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

# The kinds of groups (defined beside the layout data, which names them; re-exported by `hf_hesso.groups`).
from ..modeling.architectures import KINDS


@dataclass(frozen=True)
class Slice:
    """One dimension `dim` of the parameter `param` (size `outer * n * inner`), cut into `n` groups.

    Group `i` owns the positions `o * n * inner + i * inner + j` for all `o < outer`, `j < inner`, and every
    index of the other dimensions.
    """

    param: str
    dim: int
    outer: int
    n: int
    inner: int

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` reshaped so that dimension `dim + 1` indexes the groups (a view, no copy)."""
        shape = tensor.shape
        if shape[self.dim] != self.outer * self.n * self.inner:
            raise ValueError(
                f"Tensor {self.param!r} has size {shape[self.dim]} along dim {self.dim}, but its groups expect "
                f"{self.outer} x {self.n} x {self.inner} = {self.outer * self.n * self.inner}. The groups were "
                "built for a model of another shape: call `build_groups(model)` again after slimming."
            )
        return tensor.view(*shape[: self.dim], self.outer, self.n, self.inner, *shape[self.dim + 1 :])

    def sum_per_group(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over everything but the group axis: shape `(n,)`."""
        v = self.view(tensor)
        axis = self.dim + 1
        dims = [d for d in range(v.dim()) if d != axis]
        return v.sum(dim=dims) if dims else v

    def numel_per_group(self, shape: torch.Size | tuple[int, ...]) -> int:
        return math.prod(shape) // self.n

    def indices(self, group: int) -> torch.Tensor:
        """Flat indices along `dim` that group `group` owns (sorted)."""
        base = torch.arange(self.outer).unsqueeze(1) * (self.n * self.inner) + group * self.inner
        return (base + torch.arange(self.inner)).reshape(-1)

    def kept_indices(self, keep: torch.Tensor) -> torch.Tensor:
        """Flat indices along `dim` that survive when only the groups where `keep` is True are kept."""
        mask = keep.view(1, self.n, 1).expand(self.outer, self.n, self.inner).reshape(-1)
        return mask.nonzero().squeeze(1)


@dataclass(frozen=True)
class Block:
    """The `n` groups of one kind in one layer; they share their slices and their size."""

    layer: int
    kind: str
    n: int
    slices: tuple[Slice, ...]
    group_numel: int
    offset: int  # index of the block's first group in the whole `GroupSet`

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(s.param for s in self.slices)

    def sum_per_group(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over all slices of the block of a per-element tensor, per group: shape `(n,)`."""
        total = None
        for s in self.slices:
            part = s.sum_per_group(tensors[s.param])
            total = part if total is None else total + part
        return total

    def squared_norms(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.sum_per_group({s.param: tensors[s.param].float().square() for s in self.slices})

    def zero_mask(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean `(n,)`: True where every element of the group is exactly zero."""
        nonzero = None
        for s in self.slices:
            v = s.view(tensors[s.param] != 0)
            axis = s.dim + 1
            dims = [d for d in range(v.dim()) if d != axis]
            part = v.any(dim=dims) if dims else v
            nonzero = part if nonzero is None else nonzero | part
        return ~nonzero


@dataclass(frozen=True)
class Group:
    """One removable structure: layer, kind, index within its block, and parameter count."""

    layer: int
    kind: str
    index: int
    numel: int
    block: int
    slices: tuple[Slice, ...]

    def indices(self) -> dict[str, tuple[int, torch.Tensor]]:
        """`param name -> (dim, flat indices along dim)` of every slice of this group."""
        return {s.param: (s.dim, s.indices(self.index)) for s in self.slices}


class GroupSet:
    """All prunable groups of one model, stored block by block.

    Groups are numbered globally: the groups of `blocks[b]` are `blocks[b].offset ... blocks[b].offset + n - 1`.
    Iterating yields `Group` objects (built on demand); `numel`, `block_ids`, `layers` and `kinds` give the same
    facts as tensors for vectorised use.
    """

    def __init__(
        self,
        blocks: list[Block],
        model_type: str,
        param_shapes: dict[str, tuple[int, ...]],
        model: nn.Module | None = None,
        adapters: dict | None = None,
    ):
        # The model the names resolve against; parameters are looked up when needed, so a model whose parameter
        # objects are replaced after grouping (FSDP2 `fully_shard`, `to_empty`) still resolves to the live ones.
        self.model = model
        # peft LoRA: base weight name -> its `hf_hesso.lora.LoraAdapter`s, whose `lora_B` rows / `lora_A` columns the
        # blocks also slice. HESSO scores such projections on the effective weight `W0 + s * B @ A`.
        self.adapters = dict(adapters or {})
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.model_type = model_type
        self.param_shapes = dict(param_shapes)
        self.num_groups = sum(b.n for b in self.blocks)
        # `torch.cat` of an empty list fails: an empty set (e.g. `kinds=["head"]` on a GQA model) gets empty tensors.
        self.numel = torch.cat(
            [torch.full((b.n,), b.group_numel, dtype=torch.long) for b in self.blocks]
            + [torch.zeros(0, dtype=torch.long)]
        )
        self.block_ids = torch.cat(
            [torch.full((b.n,), i, dtype=torch.long) for i, b in enumerate(self.blocks)]
            + [torch.zeros(0, dtype=torch.long)]
        )

    def __len__(self) -> int:
        return self.num_groups

    def __iter__(self) -> Iterator[Group]:
        for b_id, b in enumerate(self.blocks):
            for i in range(b.n):
                yield Group(b.layer, b.kind, i, b.group_numel, b_id, b.slices)

    def __getitem__(self, index: int) -> Group:
        if not -self.num_groups <= index < self.num_groups:
            raise IndexError(f"group index {index} out of range for {self.num_groups} groups")
        index %= self.num_groups
        b_id = int(torch.searchsorted(torch.tensor([b.offset for b in self.blocks]), index, right=True)) - 1
        b = self.blocks[b_id]
        return Group(b.layer, b.kind, index - b.offset, b.group_numel, b_id, b.slices)

    def __repr__(self) -> str:
        kinds = {k: sum(b.n for b in self.blocks if b.kind == k) for k in KINDS}
        counts = ", ".join(f"{k}={v}" for k, v in kinds.items() if v)
        return (
            f"GroupSet(model_type={self.model_type!r}, groups={self.num_groups}, blocks={len(self.blocks)}, {counts})"
        )

    @property
    def param_names(self) -> list[str]:
        """Names of every parameter some group slices, in first-seen order."""
        return list(dict.fromkeys(s.param for b in self.blocks for s in b.slices))

    @property
    def total_numel(self) -> int:
        """Number of parameters that belong to some group (overlapping kinds counted once per group)."""
        return int(self.numel.sum())

    def kinds(self) -> list[str]:
        return [b.kind for b in self.blocks for _ in range(b.n)]

    def layers(self) -> torch.Tensor:
        return torch.cat(
            [torch.full((b.n,), b.layer, dtype=torch.long) for b in self.blocks] + [torch.zeros(0, dtype=torch.long)]
        )

    def parameters(self, model: nn.Module | None = None) -> dict[str, nn.Parameter]:
        """Resolve the parameter names against `model` (default: the model the groups were built from)."""
        model = self._model(model)
        named = dict(model.named_parameters())
        missing = [name for name in self.param_names if name not in named]
        if missing:
            raise ValueError(
                f"The groups name parameters that `model` does not have, e.g. {missing[:3]}. Build the groups "
                "from the same model object you train: `groups = build_groups(model)`."
            )
        return {name: named[name] for name in self.param_names}

    def _model(self, model: nn.Module | None) -> nn.Module:
        if model is None:
            if self.model is None:
                raise ValueError("These groups hold no model; pass `model=`.")
            return self.model
        return model

    def zero_mask(self, model: nn.Module | None = None) -> torch.Tensor:
        """Boolean `(num_groups,)`: True for every group whose slices are all exactly zero."""
        params = {n: p.detach() for n, p in self.parameters(model).items()}
        return (
            torch.cat([b.zero_mask(params) for b in self.blocks]) if self.blocks else torch.zeros(0, dtype=torch.bool)
        )

    def zero_(self, model: nn.Module | None, groups: torch.Tensor | list[int]) -> None:
        """Set every slice of the given groups (global indices) to exactly zero, in place."""
        selected = torch.zeros(self.num_groups, dtype=torch.bool)
        selected[torch.as_tensor(groups, dtype=torch.long)] = True
        params = self.parameters(model)
        with torch.no_grad():
            for b in self.blocks:
                drop = selected[b.offset : b.offset + b.n]
                if not bool(drop.any()):
                    continue
                for s in b.slices:
                    p = params[s.param]
                    shape = [1] * (p.dim() + 2)
                    shape[s.dim + 1] = b.n
                    s.view(p.data).masked_fill_(drop.to(p.device).view(shape), 0)
