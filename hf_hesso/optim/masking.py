"""Masking, fading and zeroing of groups in the weights, the gradients and the base optimizer's state.

`GroupMasks` holds, per period, the per-slice multipliers of the pruned groups and the per-tensor exponent vectors
of the fading ones, so that every per-step pass is one vectorised multiply per affected tensor. Measured on CPU,
one multiply over the slice beats `index_fill_`/`index_copy_` on the affected rows and columns by 2-3x (scattered
columns touch every cache line anyway). Everything else (probes, corrective cycles) goes through
`zero_groups`/`fade_groups`, which take a bool mask over the groups.
"""

from __future__ import annotations

import math

import torch

from ..groups import QUERY_SLOT, SUBLAYER_KINDS, Block, GroupSet, Slice
from .distributed import SliceOps, local


def block_indices(
    groups: GroupSet, mask: torch.Tensor, params: dict[str, torch.Tensor]
) -> list[tuple[Block, torch.Tensor]]:
    """`(block, local indices of the groups of mask in that block)` for every block that has any, on its device."""
    out = []
    for block in groups.blocks:
        idx = mask[block.offset : block.offset + block.n].nonzero().squeeze(1)
        if idx.numel():
            out.append((block, idx.to(params[block.slices[0].param].device)))
    return out


class GroupMasks:
    """The masking passes of HESSO over the live parameters.

    Args:
        groups (`GroupSet`): the groups.
        hold_zeros (`str`): `"auto"` or `"always"` (see [`HESSO`]).
        fixed_point (`bool`): whether the base optimizer keeps a zero weight with zero gradient and state at zero.
    """

    def __init__(self, groups: GroupSet, hold_zeros: str, fixed_point: bool):
        self.groups = groups
        self.hold_zeros = hold_zeros
        self.fixed_point = fixed_point
        self.params: dict[str, torch.Tensor] = {}
        self.ops: dict[Slice, SliceOps] = {}
        self.pruned_index: list[tuple[Block, torch.Tensor]] = []
        self.pruned_slices: list[tuple[Slice, torch.Tensor]] = []
        self.guarded_slices: list[tuple[Slice, torch.Tensor]] = []
        # (parameter name, view shape, exponent) per parameter dimension that fading groups cut: see `fade`.
        self.fading: list[tuple[str, tuple[int, ...], torch.Tensor]] = []

    def bind(self, params: dict[str, torch.Tensor]) -> None:
        """Use these live parameters (after construction, or when FSDP2 swapped them for sharded ones)."""
        self.params = params
        # Per-slice operations on the (local shard of the) parameter; under FSDP2 they map local rows to groups.
        self.ops = {s: SliceOps(s, params[s.param]) for b in self.groups.blocks for s in b.slices}

    def refresh(self, pruned: torch.Tensor, fading: torch.Tensor) -> None:
        """Rebuild the per-slice multipliers of the `pruned` groups and the exponents of the `fading` ones."""
        self.pruned_index = block_indices(self.groups, pruned, self.params)
        self.pruned_slices = []
        self.guarded_slices = []
        minimal = self.hold_zeros == "auto" and self.fixed_point
        for block, idx in self.pruned_index:
            p = self.params[block.slices[0].param]
            keep = torch.ones(block.n, dtype=p.dtype, device=p.device).index_fill_(0, idx, 0)
            for s in block.slices:
                entry = (s, self.ops[s].factor(keep))
                self.pruned_slices.append(entry)
                # See `hold_zeros`: only a pruned query slot's output columns (dim 1) can still get gradient.
                # A pruned whole sublayer's output bias is read by the loss too: guarded as well.
                if not minimal or (block.kind == QUERY_SLOT and s.dim == 1) or block.kind in SUBLAYER_KINDS:
                    self.guarded_slices.append(entry)
        self._refresh_fading(block_indices(self.groups, fading, self.params))

    def _refresh_fading(self, index: list[tuple[Block, torch.Tensor]]) -> None:
        """Merge the fading groups' slices per (parameter, dimension) into one exponent vector each.

        A fading step multiplies every affected tensor once, by `factor ** exponent` with one exponent per `unit`
        consecutive indices along the dimension (the number of fading groups that cover them: 0, 1, or 2 where a
        fading kv-group and a fading query slot share a head's rows), so its cost is one pass per tensor, whatever
        the number of kinds that cut it. The vectors hold one value per group-sized unit (per local row of a
        row-sharded parameter), not per element.
        """
        slices: dict[tuple[str, int], list[tuple[SliceOps, torch.Tensor]]] = {}
        for block, idx in index:
            for s in block.slices:
                slices.setdefault((s.param, s.dim), []).append((self.ops[s], idx))
        self.fading = []
        for (name, dim), entries in slices.items():
            t = local(self.params[name].data)
            unit = 1 if entries[0][0].rows is not None else math.gcd(*(ops.slice.inner for ops, _ in entries))
            exponent = torch.zeros(t.shape[dim] // unit, dtype=t.dtype, device=t.device)
            for ops, idx in entries:
                member = torch.zeros(ops.slice.n, dtype=t.dtype, device=t.device).index_fill_(0, idx, 1)
                exponent += ops.expand(member, unit)
            shape = (*t.shape[:dim], t.shape[dim] // unit, unit, *t.shape[dim + 1 :])
            self.fading.append((name, shape, exponent.view([-1 if i == dim else 1 for i in range(len(shape))])))

    def mask_pruned(self, grads: bool = False, weights: bool = False) -> None:
        """Multiply the gradients (of the guarded slices, see `hold_zeros`) and/or weights of pruned groups by zero."""
        for s, keep in self.guarded_slices if grads else self.pruned_slices:
            p = self.params[s.param]
            for t in (p.grad if grads else None, p.data if weights else None):
                if t is not None:
                    self.ops[s].target(t).mul_(keep if keep.dtype == t.dtype else keep.to(t.dtype))

    def fade(self, factor: float) -> None:
        """Multiply the weights of the fading groups by `factor` (one pass per affected tensor)."""
        for name, shape, exponent in self.fading:
            local(self.params[name].data).view(shape).mul_(torch.pow(factor, exponent))

    def fill_pruned(self, state: dict | None = None) -> None:
        """Set the pruned groups to exactly zero in the weights and in every parameter-shaped tensor of `state`."""
        for block, idx in self.pruned_index:
            for s in block.slices:
                p = self.params[s.param]
                targets = [p.data]
                if state is not None:
                    targets.extend(
                        v for v in state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.shape == p.shape
                    )
                for t in targets:
                    self.ops[s].fill_(t, idx)

    def zero_groups(self, mask: torch.Tensor) -> None:
        """Set the weights of the groups in `mask` (bool per group) to exactly zero."""
        for block, idx in block_indices(self.groups, mask, self.params):
            for s in block.slices:
                p = self.params[s.param]
                self.ops[s].fill_(p.data, idx.to(local(p).device))

    def fade_groups(self, mask: torch.Tensor, factor: float) -> None:
        """Multiply every slice of the groups in `mask` (bool per group) by `factor`."""
        for block in self.groups.blocks:
            part = mask[block.offset : block.offset + block.n]
            if not bool(part.any()):
                continue
            for s in block.slices:
                p = self.params[s.param]
                ops = self.ops[s]
                scale = part.to(device=local(p).device, dtype=p.dtype) * (factor - 1) + 1
                ops.target(p.data).mul_(ops.factor(scale))
