"""Gather an FSDP2-sharded model's full weights into a plain model on rank 0 (for slimming and saving)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule


def gather_full_model(model: nn.Module, into: nn.Module | None = None) -> nn.Module | None:
    """The full, unsharded weights of an FSDP2-sharded (`fully_shard`) `model` in a plain model on rank 0.

    A collective: call it on every rank. The full state dict is gathered to rank 0's CPU
    (`get_model_state_dict(..., full_state_dict=True, cpu_offload=True)`) and loaded into `into`, by default a new
    CPU instance of the model's own class built from `model.config`; then `slim_model` and `save_pretrained` on
    rank 0 write the same checkpoint as a single-process run. Rank 0 needs CPU memory for one full copy.

    Args:
        model (`nn.Module`): the sharded model (a plain model also works; then this is a copy).
        into (`nn.Module`, *optional*): an unsharded model of the same architecture to load the weights into.

    Returns:
        `nn.Module | None`: the full model on rank 0, `None` on the other ranks.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    if into is None:
        # `fully_shard` swaps the class for a `FSDP<Class>` subclass; build the plain class underneath.
        cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        dtype = next(iter(state.values())).dtype if state else torch.get_default_dtype()
        into = cls(copy.deepcopy(model.config)).to(dtype)
    into.load_state_dict(state)
    return into
