"""peft LoRA support: groups that include the adapter slices, effective-weight saliency, and the two exports.

With LoRA the effective weight of a projection is `W = W0 + s * B @ A` (`A`: `lora_A` weight, `(r, in)`; `B`:
`lora_B` weight, `(out, r)`; `s`: the adapter's scaling). Zeroing rows of `W0` and the same rows of `B` zeroes
those rows of `W`; zeroing columns of `W0` and the same columns of `A` zeroes those columns of `W`. So a group
made of the base slices plus these adapter slices is zero-invariant, and multiplying all of them by `f` multiplies
the group's part of `W` by `f`: HESSO fades the effective weight linearly to exactly zero although `W0` is frozen
(the frozen slices are multiplied, never stepped).

This module imports only torch at import time: `hf_hesso.groups` uses it, and peft is optional.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import nn

# Checkpoint file holding the frozen base slices HESSO has changed (peft checkpoints store only the adapters).
FROZEN_SLICES_NAME = "hesso_frozen_slices.pt"
ADAPTER_SUBDIR = "adapter"


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft `PeftModel` (`model` itself for anything else)."""
    if is_peft_model(model):
        return model.get_base_model()
    return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional
        return False
    return isinstance(model, PeftModel)


def is_lora_linear(module: nn.Module) -> bool:
    """True for a peft LoRA layer wrapping an `nn.Linear` (`peft.tuners.lora.Linear`)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer) and isinstance(getattr(module, "base_layer", None), nn.Linear)


@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter on one projection: parameter names of its `A`/`B` weights and its scaling."""

    module: str  # dotted path of the peft LoRA layer
    name: str  # adapter name ("default")
    a: str  # full parameter name of `lora_A[name].weight`, (r, in)
    b: str  # full parameter name of `lora_B[name].weight`, (out, r)
    b_bias: str | None  # `lora_B[name].bias` when the adapter has one (`lora_bias=True`)
    scaling: float
    _layer: nn.Module | None = field(default=None, compare=False, repr=False)

    def tensors_along(self, dim: int) -> list[tuple[str, torch.Tensor]]:
        """The adapter tensors a base slice along `dim` extends to: `B` rows (and bias) for 0, `A` columns for 1."""
        layer = self._layer
        if dim == 0:
            out = [(self.b, layer.lora_B[self.name].weight)]
            if self.b_bias is not None:
                out.append((self.b_bias, layer.lora_B[self.name].bias))
            return out
        return [(self.a, layer.lora_A[self.name].weight)]


def lora_adapters(layer: nn.Module, path: str) -> list[LoraAdapter]:
    """The LoRA adapters of the peft layer `layer` at dotted path `path` (DoRA is refused)."""
    out = []
    for name in layer.lora_A:
        if layer.use_dora.get(name, False):
            raise ValueError(
                f"`{path}` uses DoRA (`use_dora=True`) for adapter {name!r}: its per-row magnitude rescaling is not "
                "zero-invariant (a zero row has no direction). Use plain LoRA (`use_dora=False`)."
            )
        a, b = layer.lora_A[name], layer.lora_B[name]
        if not isinstance(a, nn.Linear) or not isinstance(b, nn.Linear):
            raise ValueError(
                f"`{path}` adapter {name!r} is not a linear LoRA adapter; only `nn.Linear` LoRA is supported."
            )
        out.append(
            LoraAdapter(
                module=path,
                name=name,
                a=f"{path}.lora_A.{name}.weight",
                b=f"{path}.lora_B.{name}.weight",
                b_bias=f"{path}.lora_B.{name}.bias" if b.bias is not None else None,
                scaling=float(layer.scaling[name]),
                _layer=layer,
            )
        )
    return out


def effective_weights(
    adapters: dict[str, list[LoraAdapter]], params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`base weight name -> W0 + sum s * B @ A` in float32, for every LoRA-wrapped grouped projection."""
    out = {}
    for base, ads in adapters.items():
        w = params[base].detach().float().clone()
        for ad in ads:
            w.addmm_(params[ad.b].detach().float(), params[ad.a].detach().float(), alpha=ad.scaling)
        out[base] = w
    return out


def adapter_parameters(groups) -> dict[str, nn.Parameter]:
    """`name -> live parameter` of every `A`/`B` of the adapters in `groups.adapters`."""
    names = {n for ads in groups.adapters.values() for ad in ads for n in (ad.a, ad.b)}
    return {n: p for n, p in groups.model.named_parameters() if n in names}


# ---- Export ----


def base_param_name(name: str) -> str:
    """Name of a grouped base parameter of a `PeftModel` in the merged/unloaded transformers model."""
    prefix = "base_model.model."
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def merged_groups(groups, model: nn.Module):
    """`groups` (built on a `PeftModel`) as groups of the merged model `model`: base slices only, renamed."""
    from .groups import Block, GroupSet

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
    """Deep copy of `peft_model` with the adapters merged in, slimmed: `(slim transformers model, SlimSummary)`."""
    from .groups import build_groups
    from .slim import slim_model

    if groups is None:
        groups = build_groups(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    summary = slim_model(merged, merged_groups(groups, merged), **kwargs)
    return merged, summary


def slim_with_adapters(peft_model: nn.Module, groups=None):
    """Deep copy of `peft_model` split into a slim base model and its adapters sliced alike (not merged).

    `lora_B` rows follow the kept output rows of their projection, `lora_A` columns its kept input columns; the
    rank is unchanged. Returns `(slim_base, adapters, summary)`: save `slim_base` with `save_pretrained` and the
    `SlimAdapters` with `adapters.save_pretrained(dir)`; `PeftModel.from_pretrained(slim_base, dir)` then
    reproduces the trained model's outputs.
    """
    from .groups import build_groups
    from .modeling.architectures import get_layout, get_submodule
    from .modeling.modeling_hesso import layer_modules
    from .slim import keep_plan, slim_model

    if groups is None:
        groups = build_groups(peft_model)
    work = copy.deepcopy(peft_model)
    groups = type(groups)(list(groups.blocks), groups.model_type, groups.param_shapes, model=work)
    _, plans = keep_plan(unwrap_peft(work), groups, zero=groups.zero_mask(work).cpu())
    # Slice the adapters with the plan decided on the whole groups (base + adapter slices all zero).
    base_model = unwrap_peft(work)
    layout = get_layout(base_model.config.model_type)
    for layer, (_, kept) in zip(layer_modules(base_model), plans, strict=True):
        rows = {layout.q: kept["q"], layout.k: kept["kv"], layout.v: kept["kv"]}
        rows.update(dict.fromkeys(layout.mlp_in, kept["mlp"]))
        cols = {layout.o: kept["q"], layout.mlp_out: kept["mlp"]}
        for path, idx in rows.items():
            _slice_lora(get_submodule(layer, path), rows=idx)
        for path, idx in cols.items():
            _slice_lora(get_submodule(layer, path), cols=idx)
    from peft import get_peft_model_state_dict

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
        from peft.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import save_file

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


# ---- Checkpoints: the frozen base slices HESSO changed ----


def frozen_slices_state(hesso) -> dict[str, torch.Tensor]:
    """`param name -> tensor` of every frozen grouped parameter that HESSO has changed (faded or zeroed).

    peft checkpoints store only the trainable adapters; the frozen base rows/columns of selected groups are
    multiplied by HESSO, so a resumed run needs them too. Only the selected groups' slices are stored, as
    `(index list, values)` per slice: `{f"{param}|{dim}|{k}": values, f"{param}|{dim}|{k}|idx": group indices}`.
    """
    out: dict[str, torch.Tensor] = {}
    selected = hesso._selection_period >= 0
    if not bool(selected.any()):
        return out
    params = hesso._params
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
