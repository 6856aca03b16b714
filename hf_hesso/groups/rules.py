"""Config-aware grouping rules: which slices of which tensors form one removable structure.

No tracing: the layout table (`hf_hesso.modeling.architectures.ARCHITECTURES`) names the projections of each
family, the normalised config gives the head size, and the current tensor shapes give the per-layer head counts
and MLP widths (so a slim model, whose layers differ, is grouped just as well as a stock one).

Zero-invariance of every kind, for the families supported:
- `mlp_channel`: row `i` (and bias `i`) of every MLP input projection, column `i` of the output projection.
  `act(0) * 0 = 0` (SiLU/GELU of zero is zero), so a zeroed channel contributes nothing.
- `head` (every query head has its own key/value head): the head's q/k/v rows and biases and its columns of the
  attention output projection. Zero queries and keys give uniform attention over zero values: the head's output
  is exactly zero, whatever the mask. Qwen3's `q_norm`/`k_norm` act per head on `head_dim` with shared weights,
  and RMSNorm maps a zero vector to zero, so they keep the invariance.
- `kv_group`: the k/v rows of one key/value head, the q rows of every query head that reads it, and their output
  columns.
- `query_slot`: the q rows of the j-th query head of every key/value group, and their output columns; removing it
  keeps the same number of query heads per key/value group, as grouped-query attention requires.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..modeling.architectures import get_layout, get_submodule, normalize_config
from .group import HEAD, KINDS, KV_GROUP, MLP_CHANNEL, QUERY_SLOT, Block, GroupSet, Slice, exclude_frozen
from .peft import LoraAdapter, is_lora_linear, lora_adapters, unwrap_peft


def _transformers_base(model: nn.Module) -> nn.Module:
    """The transformers base model (`LlamaModel`) inside `model`; a peft `PeftModel` is looked through."""
    inner = unwrap_peft(model)
    return getattr(inner, "base_model", inner)


def _base_prefix(model: nn.Module) -> str:
    """Dotted path from `model` to its base model (`"model."` for `LlamaForCausalLM`, `""` for `LlamaModel`,
    `"base_model.model.model."` for a peft `PeftModel` around a `LlamaForCausalLM`)."""
    base = _transformers_base(model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name + "."
    raise ValueError(f"Cannot locate the base model inside {type(model).__name__}.")


def _linear(layer: nn.Module, path: str, where: str) -> tuple[nn.Linear, str, list[LoraAdapter]]:
    """The projection at `path` as `(base linear, its dotted path, LoRA adapters on it)`.

    A peft LoRA layer is looked through: the base slices cut its frozen `base_layer`, and the adapters' `lora_B`
    rows / `lora_A` columns join the groups (see `build_groups`).
    """
    module = get_submodule(layer, path)
    full = f"{where}.{path}"
    adapters: list[LoraAdapter] = []
    if is_lora_linear(module):
        adapters = lora_adapters(module, full)
        module, full = module.base_layer, f"{full}.base_layer"
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"Expected `{where}.{path}` to be an `nn.Linear` (or a peft LoRA `Linear` around one), found "
            f"{type(module).__name__}. Merge adapters (`merge_and_unload()`) or build the groups on the plain model."
        )
    return module, full, adapters


def build_groups(
    model: nn.Module,
    kinds: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
    prune_frozen: bool = False,
) -> GroupSet:
    """Build the zero-invariant groups of a supported model from its config, without tracing.

    Args:
        model (`nn.Module`): a transformers model of a supported `model_type` (bare, `*ForCausalLM`,
            `*ForSequenceClassification`, `*ForMaskedLM`), on any device including `meta`, stock or slim.
        kinds (`Iterable[str]`, *optional*): restrict to these kinds (`"mlp_channel"`, `"head"`, `"kv_group"`,
            `"query_slot"`). Default: all kinds the architecture supports.
        layers (`Iterable[int]`, *optional*): restrict to these layer indices. Default: every layer.
        prune_frozen (`bool`, *optional*, defaults to `False`): keep the groups that slice parameters with
            `requires_grad=False`. By default a block (one kind in one layer) that touches a frozen parameter is
            left out, with a warning that names it, so that HESSO never changes what the user froze. A LoRA model's
            frozen base is not concerned: its groups are kept and pruned through the adapters.

    Returns:
        `GroupSet`: the groups, block by block (one block = one kind in one layer). Blocks with fewer than two
        groups are left out, since a block is never emptied.
    """
    config = model.config
    layout = get_layout(config.model_type)
    norm = normalize_config(config)
    wanted = set(KINDS if kinds is None else kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"`kinds` contains unknown kinds {sorted(unknown)}; choose from {list(KINDS)}.")
    prefix = _base_prefix(model)
    layer_list = get_submodule(_transformers_base(model), layout.layers)
    layer_ids = range(len(layer_list)) if layers is None else sorted(set(layers))
    for i in layer_ids:
        if not 0 <= i < len(layer_list):
            raise ValueError(
                f"`layers` contains {i}, but the model has {len(layer_list)} layers (0..{len(layer_list) - 1})."
            )

    hd = norm.head_dim
    blocks: list[Block] = []
    shapes: dict[str, tuple[int, ...]] = {}
    adapters: dict[str, list[LoraAdapter]] = {}

    def add(layer_idx: int, kind: str, n: int, parts: list[tuple[tuple, int, int, int]]) -> None:
        # parts: ((module, dotted path, adapters), dim, outer, inner) for the weight; biases follow output rows.
        if n < 2 or kind not in wanted:
            return
        slices = []
        numel = 0
        for (module, path, lora), dim, outer, inner in parts:
            if lora:
                adapters[f"{path}.weight"] = lora
            # Group sizes count the base parameters only: those are what the merged slim model loses.
            entries = [(f"{path}.weight", module.weight, True)]
            if dim == 0:
                entries.append((f"{path}.bias", module.bias, True))
            entries.extend((name, t, False) for ad in lora for name, t in ad.tensors_along(dim))
            for full, tensor, counted in entries:
                if tensor is None:
                    continue
                s = Slice(full, dim, outer, n, inner)
                if tensor.shape[dim] != outer * n * inner:
                    raise ValueError(
                        f"`{full}` has {tensor.shape[dim]} entries along dim {dim}, expected {outer} x {n} x "
                        f"{inner} for {kind} groups. The module shapes disagree with the config."
                    )
                shapes[full] = tuple(tensor.shape)
                slices.append(s)
                if counted:
                    numel += s.numel_per_group(tensor.shape)
        offset = sum(b.n for b in blocks)
        blocks.append(Block(layer_idx, kind, n, tuple(slices), numel, offset))

    for i in layer_ids:
        layer = layer_list[i]
        where = f"{prefix}{layout.layers}.{i}"
        q, k, v, o = (_linear(layer, p, where) for p in (layout.q, layout.k, layout.v, layout.o))
        heads, kv_heads = q[0].out_features // hd, k[0].out_features // hd
        if heads * hd != q[0].out_features or kv_heads * hd != k[0].out_features or heads % kv_heads:
            raise ValueError(
                f"Layer {i}: q/k output sizes {q[0].out_features}/{k[0].out_features} are not whole heads of size {hd} "
                "with query heads a multiple of key/value heads."
            )
        rep = heads // kv_heads
        if rep == 1 and kv_heads == norm.num_key_value_heads == norm.num_attention_heads:
            add(i, HEAD, heads, [(q, 0, 1, hd), (k, 0, 1, hd), (v, 0, 1, hd), (o, 1, 1, hd)])
        else:
            add(
                i,
                KV_GROUP,
                kv_heads,
                [(k, 0, 1, hd), (v, 0, 1, hd), (q, 0, 1, rep * hd), (o, 1, 1, rep * hd)],
            )
            add(i, QUERY_SLOT, rep, [(q, 0, kv_heads, hd), (o, 1, kv_heads, hd)])
        mlp_in = [_linear(layer, p, where) for p in layout.mlp_in]
        width = mlp_in[0][0].out_features
        parts = [(m, 0, 1, 1) for m in mlp_in]
        parts.append((_linear(layer, layout.mlp_out, where), 1, 1, 1))
        add(i, MLP_CHANNEL, width, parts)
    groups = GroupSet(blocks, norm.model_type, shapes, model=model, adapters=adapters, prune_frozen=prune_frozen)
    return groups if prune_frozen else exclude_frozen(groups)
