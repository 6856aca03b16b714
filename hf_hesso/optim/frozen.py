"""Checkpointing of the frozen base slices HESSO changes (LoRA): part of HESSO's own state.

peft checkpoints store only the trainable adapters, but HESSO multiplies the frozen base rows/columns of the
selected groups (see `hf_hesso.groups.peft`), so a resumed run needs those slices too. The Trainer writes them
beside each checkpoint as `FROZEN_SLICES_NAME`.
"""

from __future__ import annotations

import torch
from torch import nn

# Checkpoint file holding the frozen base slices HESSO has changed (peft checkpoints store only the adapters).
FROZEN_SLICES_NAME = "hesso_frozen_slices.pt"


def frozen_slices_state(hesso) -> dict[str, torch.Tensor]:
    """`param name -> tensor` of every frozen grouped parameter that HESSO has changed (faded or zeroed).

    peft checkpoints store only the trainable adapters; the frozen base rows/columns of selected groups are
    multiplied by HESSO, so a resumed run needs them too. Only the selected groups' slices are stored, as
    `(index list, values)` per slice: `{f"{param}|{dim}|{k}": values, f"{param}|{dim}|{k}|idx": group indices}`.
    """
    out: dict[str, torch.Tensor] = {}
    selected = hesso.selected_mask
    if not bool(selected.any()):
        return out
    params = hesso.grouped_parameters
    for k, block in enumerate(hesso.groups.blocks):
        idx = selected[block.offset : block.offset + block.n].nonzero().squeeze(1)
        if not idx.numel():
            continue
        for s in block.slices:
            p = params[s.param]
            if p.requires_grad:
                continue
            key = f"{s.param}|{s.dim}|{k}"
            out[key] = s.view(p.detach()).index_select(s.dim + 1, idx.to(p.device)).cpu().clone()
            out[key + "|idx"] = idx.clone()
    return out


def load_frozen_slices(hesso_or_groups, state: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    """Write back what `frozen_slices_state` saved into the live frozen parameters."""
    blocks = hesso_or_groups.blocks
    with torch.no_grad():
        for key, values in state.items():
            if key.endswith("|idx"):
                continue
            name, dim, k = key.rsplit("|", 2)
            idx = state[key + "|idx"]
            s = next(s for s in blocks[int(k)].slices if s.param == name and s.dim == int(dim))
            p = params[name]
            s.view(p.data).index_copy_(s.dim + 1, idx.to(p.device), values.to(p.device, p.dtype))
