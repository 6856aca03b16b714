"""peft introspection: LoRA layers, their adapters, and the effective weight `W0 + s * B @ A`.

With LoRA the effective weight of a projection is `W = W0 + s * B @ A` (`A`: `lora_A` weight, `(r, in)`; `B`:
`lora_B` weight, `(out, r)`; `s`: the adapter's scaling). Zeroing rows of `W0` and the same rows of `B` zeroes
those rows of `W`; zeroing columns of `W0` and the same columns of `A` zeroes those columns of `W`. So a group
made of the base slices plus these adapter slices is zero-invariant, and multiplying all of them by `f` multiplies
the group's part of `W` by `f`: HESSO fades the effective weight linearly to exactly zero although `W0` is frozen
(the frozen slices are multiplied, never stepped).

A leaf of `hf_hesso.groups`: it imports torch and peft, nothing of hf_hesso.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft `PeftModel` (`model` itself for anything else)."""
    if is_peft_model(model):
        return model.get_base_model()
    return model


def is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def is_lora_layer(module: nn.Module) -> bool:
    """True for any peft LoRA layer (around an `nn.Linear`, a `Conv1D`, an embedding, ...)."""
    return isinstance(module, LoraLayer)


def is_lora_linear(module: nn.Module) -> bool:
    """True for a peft LoRA layer wrapping an `nn.Linear` (`peft.tuners.lora.Linear`)."""
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
