"""The activation criterion: score a group by the magnitude of what it outputs on the scoring batches (Minitron).

A group's output is what it feeds into the projection that reads it: an attention head's (query slot's, key/value
group's query heads') columns of the output projection (`o_proj`, BERT's `attention.output.dense`), an MLP channel's
column of the down projection (`down_proj`, BERT's `output.dense`). Every group has such an input-channel slice, so
one forward pre-hook per reading projection collects, per input channel, the sum over all tokens of the squared
input; a group's criterion is the square root of the sum over its channels, `||a_g||` over the scoring batches.

Forward-only: no gradient, no direction. The hooks only record while `enabled` (HESSO enables them for the forward
passes of its scoring steps); padding tokens count like the others. Under DDP every rank records its own batches and
`pop` sums the ranks (one all-reduce of `num_groups` values), so every rank ranks the same totals.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..groups import GroupSet, Slice


def _reading_slices(groups: GroupSet, model: nn.Module) -> dict[str, list[tuple[int, Slice]]]:
    """`module name -> [(offset of the block, input-channel slice)]`: one slice per block, on an `nn.Linear`."""
    modules = dict(model.named_modules())
    out: dict[str, list[tuple[int, Slice]]] = {}
    missing = []
    for block in groups.blocks:
        for s in block.slices:
            module_name, _, leaf = s.param.rpartition(".")
            module = modules.get(module_name)
            if s.dim == 1 and leaf == "weight" and isinstance(module, nn.Linear) and "lora_" not in s.param:
                out.setdefault(module_name, []).append((block.offset, s))
                break
        else:
            missing.append(f"{block.kind} of layer {block.layer}")
    if missing:
        raise ValueError(
            f"The activation criterion needs every group to feed a linear projection, but {missing[:3]} "
            f"({len(missing)} blocks) have no input-channel slice of an `nn.Linear` weight (e.g. fused MoE experts). "
            "Use another criterion (`saliency='taylor'`), or `prune_kinds` without those kinds."
        )
    return out


class ActivationRecorder:
    """Forward pre-hooks that sum each group's squared output over the tokens of the recorded batches.

    Args:
        groups (`GroupSet`): the groups; `groups.model` (the model they were built from) gets the hooks.
    """

    def __init__(self, groups: GroupSet):
        if groups.model is None:
            raise ValueError(
                "The activation criterion records the model's activations, but these groups hold no model. Build "
                "them with `build_groups(model)`."
            )
        self.groups = groups
        self.enabled = True
        self._sums: torch.Tensor | None = None
        self._handles = []
        modules = dict(groups.model.named_modules())
        for name, slices in _reading_slices(groups, groups.model).items():
            self._handles.append(modules[name].register_forward_pre_hook(self._hook(slices)))

    def _hook(self, slices: list[tuple[int, Slice]]):
        def record(module: nn.Module, args: tuple) -> None:
            if not self.enabled or not module.training or not args:
                return
            with torch.no_grad():
                x = args[0].detach()
                channels = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0).view(1, -1)
                if self._sums is None:
                    self._sums = torch.zeros(self.groups.num_groups, dtype=torch.float32, device=x.device)
                for offset, s in slices:
                    self._sums[offset : offset + s.n] += s.sum_per_group(channels)

        return record

    def pop(self) -> torch.Tensor:
        """`||a_g||` per group (float64, CPU) over everything recorded since the last call; then start afresh."""
        sums = self._sums
        if sums is None:
            device = next(self.groups.model.parameters()).device
            sums = torch.zeros(self.groups.num_groups, dtype=torch.float32, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
        self._sums = None
        return sums.double().cpu().sqrt()

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
