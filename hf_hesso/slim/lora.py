"""LoRA exports of a slimmed model: merged (`merge_and_slim`) or the slim base plus adapters sliced alike.

The pruned groups are zero in the frozen base slices and in the adapter slices alike (see
`hf_hesso.groups.peft`), so merging and then slicing, or slicing base and adapters with one plan, both give a
model that computes what the trained `PeftModel` computed.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from peft import get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from ..groups import Block, GroupSet, build_groups
from ..groups.peft import is_lora_linear, unwrap_peft
from ..modeling.architectures import get_submodule, layout_of, normalize_config
from ..modeling.modeling_hesso import layer_modules, layer_sublayers, rows_to_keep, space_sizes
from .core import cpu_copy_memo, keep_plan, slim_model

# Sub-folder of a saved slim base model that holds the sliced adapters (`merge_adapters=False`).
ADAPTER_SUBDIR = "adapter"


def base_param_name(name: str) -> str:
    """Name of a grouped base parameter of a `PeftModel` in the merged/unloaded transformers model."""
    prefix = "base_model.model."
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def merged_groups(groups, model: nn.Module):
    """`groups` (built on a `PeftModel`) as groups of the merged model `model`: base slices only, renamed."""
    blocks = []
    for b in groups.blocks:
        slices = tuple(
            type(s)(base_param_name(s.param), s.dim, s.outer, s.n, s.inner)
            for s in b.slices
            if ".lora_" not in s.param
        )
        blocks.append(Block(b.layer, b.kind, b.n, slices, b.group_numel, b.offset))
    shapes = {base_param_name(k): v for k, v in groups.param_shapes.items() if ".lora_" not in k}
    return GroupSet(blocks, groups.model_type, shapes, model=model)


def merge_and_slim(peft_model: nn.Module, groups=None, **kwargs):
    """CPU copy of `peft_model` with the adapters merged in, slimmed: `(slim transformers model, SlimSummary)`."""
    if groups is None:
        groups = build_groups(peft_model)
    # The copy goes straight to the CPU: nothing extra on the training device.
    merged = copy.deepcopy(peft_model, cpu_copy_memo(peft_model)).merge_and_unload()
    summary = slim_model(merged, merged_groups(groups, merged), **kwargs)
    return merged, summary


def slim_with_adapters(peft_model: nn.Module, groups=None):
    """CPU copy of `peft_model` split into a slim base model and its adapters sliced alike (not merged).

    `lora_B` rows follow the kept output rows of their projection, `lora_A` columns its kept input columns; the
    rank is unchanged. Returns `(slim_base, adapters, summary)`: save `slim_base` with `save_pretrained` and the
    `SlimAdapters` with `adapters.save_pretrained(dir)`; `PeftModel.from_pretrained(slim_base, dir)` then
    reproduces the trained model's outputs.
    """
    if groups is None:
        groups = build_groups(peft_model)
    work = copy.deepcopy(peft_model, cpu_copy_memo(peft_model))
    groups = type(groups)(list(groups.blocks), groups.model_type, groups.param_shapes, model=work)
    _, plans = keep_plan(unwrap_peft(work), groups, zero=groups.zero_mask(work).cpu())
    # Slice the adapters with the plan decided on the whole groups (base + adapter slices all zero).
    base_model = unwrap_peft(work)
    layout = layout_of(base_model.config)
    hd = normalize_config(base_model.config).head_dim
    for layer, (_, kept) in zip(layer_modules(base_model), plans, strict=True):
        sizes = space_sizes(layer, layout)
        for sub in layer_sublayers(layer, layout):
            for proj in sub.projections:
                module = get_submodule(layer, proj.path)
                rows = rows_to_keep(proj, kept, sizes, hd) if proj.rows else None
                cols = kept[proj.cols] if proj.cols is not None else None
                _slice_lora(module, rows=rows, cols=cols)
    # Take the sliced adapter weights before `unload()` takes the adapter layers out of the model.
    adapters = SlimAdapters(
        {name: copy.deepcopy(cfg) for name, cfg in work.peft_config.items()},
        {name: get_peft_model_state_dict(work, adapter_name=name) for name in work.peft_config},
    )
    slim_base = work.unload()  # the base layers without the adapters (not merged)
    summary = slim_model(slim_base, merged_groups(groups, slim_base))
    expected = [shape for shape, _ in plans]
    if summary.layers != expected:
        raise RuntimeError(f"Base and adapter plans disagree: {summary.layers} vs {expected}.")
    return slim_base, adapters, summary


@dataclass
class SlimAdapters:
    """The sliced adapters of a slimmed LoRA model: peft config and weights per adapter name."""

    configs: dict
    state_dicts: dict[str, dict[str, torch.Tensor]]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write what `PeftModel.save_pretrained` writes: `adapter_config.json` and `adapter_model.safetensors`
        (the `"default"` adapter in `directory`, any other in `directory/<name>`, as peft lays them out)."""
        for name, config in self.configs.items():
            target = os.path.join(str(directory), "" if name == "default" else name)
            os.makedirs(target, exist_ok=True)
            config.inference_mode = True
            config.save_pretrained(target)
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dicts[name].items()}
            save_file(tensors, os.path.join(target, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})


def _slice_lora(layer: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    if not is_lora_linear(layer):
        return
    for name in layer.lora_A:
        if rows is not None:
            b = layer.lora_B[name]
            b.weight = nn.Parameter(b.weight.detach().index_select(0, rows.to(b.weight.device)).clone())
            if b.bias is not None:
                b.bias = nn.Parameter(b.bias.detach().index_select(0, rows.to(b.bias.device)).clone())
            b.out_features = len(rows)
        if cols is not None:
            a = layer.lora_A[name]
            a.weight = nn.Parameter(a.weight.detach().index_select(1, cols.to(a.weight.device)).clone())
            a.in_features = len(cols)
