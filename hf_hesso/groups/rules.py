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
- `hidden_channel` (opt-in, RMSNorm families): one channel of the residual stream (or `hidden_unit` consecutive
  ones) in the whole model: its embedding column, its row (and bias) of every projection that writes into the
  stream (attention output, MLP and expert down projections), its column of every projection that reads the stream
  (q/k/v, gate/up, routers, the LM head; a tied head is the embedding, counted once), and its weight in every norm on
  the stream. The embedding column and the writer rows being zero make the channel exactly zero in the whole stream
  (an RMSNorm maps a zero channel to zero, Gemma's `1 + w` too); slimming then rescales the stream so that every
  RMSNorm over the kept channels computes what it computed over all of them (`hf_hesso.slim.core`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

from ..modeling.architectures import (
    ATTENTION_SUBLAYER,
    EXPERT_CHANNEL,
    EXPERT_CHANNEL_UNIT,
    HEAD,
    HIDDEN_CHANNEL,
    HIDDEN_LAYER,
    KINDS,
    KV,
    KV_GROUP,
    MLP,
    MLP_CHANNEL,
    MLP_SUBLAYER,
    NO_STREAM_REASON,
    OPT_IN_KINDS,
    QUERY_SLOT,
    SHARED,
    SHARED_EXPERT_CHANNEL,
    ArchLayout,
    Proj,
    Q,
    get_submodule,
    normalize_config,
)
from ..modeling.modeling_hesso import (
    SkippedLayer,
    layer_sublayers,
    projection_tensors,
    removed,
    space_sizes,
    stream_tensors,
)
from .group import Block, GroupSet, Slice, exclude_frozen
from .infer import resolve_layout
from .peft import LoraAdapter, is_lora_layer, is_lora_linear, lora_adapters, unwrap_peft

# The kinds `build_groups` offers by default: everything but whole sublayers and hidden channels.
WIDTH_KINDS = tuple(k for k in KINDS if k not in OPT_IN_KINDS)

# A kind's partition of an index space: group `g` owns `o * n * inner + g * inner + j` (see `Slice`).
Partition = tuple[int, int, int]


class InexpressibleKind(ValueError):
    """A group kind that a projection's layout cannot cut (e.g. query slots of a fused GQA projection)."""


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


def kind_partitions(sizes: dict[str, int], head_dim: int, mha: bool, experts: bool) -> dict[str, dict[str, Partition]]:
    """Every group kind of a layer with these index-space sizes, as `{kind: {space: (outer, n, inner)}}`."""
    heads, kv_heads = sizes[Q] // head_dim, sizes[KV] // head_dim
    out: dict[str, dict[str, Partition]] = {}
    if mha:
        out[HEAD] = {Q: (1, heads, head_dim), KV: (1, heads, head_dim)}
    else:
        rep = heads // kv_heads
        out[KV_GROUP] = {Q: (1, kv_heads, rep * head_dim), KV: (1, kv_heads, head_dim)}
        # Query head g * rep + j reads key/value head g and sits in slot j.
        out[QUERY_SLOT] = {Q: (kv_heads, rep, head_dim)}
    if MLP in sizes:
        if experts:
            unit = math.gcd(sizes[MLP], EXPERT_CHANNEL_UNIT)
            out[EXPERT_CHANNEL] = {MLP: (1, sizes[MLP] // unit, unit)}
        else:
            out[MLP_CHANNEL] = {MLP: (1, sizes[MLP], 1)}
    if SHARED in sizes:
        out[SHARED_EXPERT_CHANNEL] = {SHARED: (1, sizes[SHARED], 1)}
    return out


def projection_cuts(proj: Proj, partition: dict[str, Partition]) -> list[tuple[str, Partition]]:
    """How one kind cuts one projection: `[("rows" | "cols", (outer, n, inner))]`.

    Raises `InexpressibleKind` when the kind touches only some parts of a fused output, or parts of different
    layouts (e.g. key/value groups of a fused QKV with grouped-query attention): one `Slice` cannot describe it.
    """
    cuts = []
    touched = [space in partition for space in proj.rows]
    if any(touched):
        parts = [partition.get(space) for space in proj.rows]
        if not all(touched) or len(set(parts)) != 1:
            raise InexpressibleKind(
                f"`{proj.path}` fuses {list(proj.rows)}; a group that cuts {sorted(partition)} does not cut every part "
                "of it alike, so its rows are not one regular slice."
            )
        outer, n, inner = parts[0]
        m = len(parts)
        if proj.interleaved:
            if outer != 1:
                raise InexpressibleKind(f"`{proj.path}` interleaves heads; a group spread over heads cannot cut it.")
            cuts.append(("rows", (1, n, m * inner)))
        else:
            cuts.append(("rows", (m * outer, n, inner)))
    if proj.cols is not None and proj.cols in partition:
        cuts.append(("cols", partition[proj.cols]))
    return cuts


def build_groups(
    model: nn.Module,
    kinds: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
    layout: ArchLayout | None = None,
    prune_frozen: bool = False,
    hidden_unit: int | None = None,
) -> GroupSet:
    """Build the zero-invariant groups of a supported model from its config, without tracing.

    Args:
        model (`nn.Module`): a transformers model (bare, `*ForCausalLM`, `*ForSequenceClassification`,
            `*ForMaskedLM`), on any device including `meta`, stock or slim. A `model_type` outside the layout table
            gets a layout inferred from its module tree, each group kind numerically checked on a tiny instance of
            its class (once per class in a process; see `hf_hesso.check_architecture`): the kinds that failed are
            not offered, and a log message names them with the reason.
        kinds (`Iterable[str]`, *optional*): restrict to these kinds (`"mlp_channel"`, `"head"`, `"kv_group"`,
            `"query_slot"`, `"expert_channel"`, `"shared_expert_channel"`, and the whole-sublayer kinds
            `"attention_sublayer"`, `"mlp_sublayer"`, and `"hidden_channel"`). Default: every width kind the
            architecture supports; the sublayer kinds are opt-in (they let HESSO remove a layer's whole attention or
            MLP), and so is `"hidden_channel"` (residual-stream channels, RMSNorm families only; see
            docs/hidden.md).
        layers (`Iterable[int]`, *optional*): restrict to these layer indices. Default: every layer. The
            `hidden_channel` block spans the whole model whatever `layers` says.
        layout (`ArchLayout`, *optional*): the layout to read; default the table entry of `config.model_type` (or
            the inferred and checked one).
        prune_frozen (`bool`, *optional*, defaults to `False`): keep the groups that slice parameters with
            `requires_grad=False`. By default a block (one kind in one layer) that touches a frozen parameter is
            left out, with a warning that names it, so that HESSO never changes what the user froze. A LoRA model's
            frozen base is not concerned: its groups are kept and pruned through the adapters.
        hidden_unit (`int`, *optional*): residual-stream channels per `hidden_channel` group (consecutive
            channels; e.g. 8 or 64 keeps the slim hidden size a multiple of it). Must divide the hidden size.
            Default 1, and 8 (`EXPERT_CHANNEL_UNIT`) in mixture-of-experts families, whose fused expert kernels need
            rows of a multiple of 16 bytes (a multiple of 8 is required there).

    Returns:
        `GroupSet`: the groups, block by block (one block = one kind in one layer). Blocks with fewer than two
        groups are left out, since a block is never emptied.

    Raises:
        `TypeError`: `model` is not a transformers model (no `config` with a `model_type`).
        `ValueError`: its `model_type` is not supported, or `kinds` / `layers` name what it does not have.
    """
    config = getattr(model, "config", None)
    if not isinstance(getattr(config, "model_type", None), str):
        raise TypeError(
            f"`build_groups` reads the architecture from a transformers model's `config`, but "
            f"{type(model).__name__} has {'no `config`' if config is None else 'a `config` without `model_type`'}. "
            "Pass a transformers `PreTrainedModel` (e.g. from `AutoModelForCausalLM.from_pretrained(...)`) of a "
            "supported `model_type` (`python -m hf_hesso.check <model_type>` lists what each supports), or a peft "
            "`PeftModel` around one."
        )
    layout = layout or resolve_layout(model)
    norm = normalize_config(config, layout)
    wanted = set(WIDTH_KINDS if kinds is None else kinds)
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

    excluded = {kind for kind, _ in layout.excluded}
    hd = norm.head_dim
    mha_config = norm.num_key_value_heads == norm.num_attention_heads
    blocks: list[Block] = []
    shapes: dict[str, tuple[int, ...]] = {}
    adapters: dict[str, list[LoraAdapter]] = {}

    for i in layer_ids:
        layer = layer_list[i]
        if isinstance(layer, SkippedLayer):
            continue
        where = f"{prefix}{layout.layers}.{i}"
        _refuse_lora_on_non_linear(layer, layout, where)
        sizes = space_sizes(layer, layout)
        # A layer without the layout's attention (`NO_ATTENTION`, hybrid models) has no `q`/`kv` spaces: no heads.
        heads, kv_heads = sizes.get(Q, 0) // hd, sizes.get(KV, 0) // hd
        if heads * hd != sizes.get(Q, 0) or kv_heads * hd != sizes.get(KV, 0) or (heads and heads % kv_heads):
            raise ValueError(
                f"Layer {i}: query/key widths {sizes.get(Q, 0)}/{sizes.get(KV, 0)} are not whole heads of size {hd} with query "
                "heads a multiple of key/value heads."
            )
        attention, mlp = layer_sublayers(layer, layout)
        mha = heads == kv_heads and mha_config
        partitions = kind_partitions(sizes, hd, mha, mlp.experts) if heads else {}
        if not heads:  # the attention is removed: only the MLP's kinds remain
            partitions = {k: v for k, v in kind_partitions({**sizes, Q: hd, KV: hd}, hd, True, mlp.experts).items()
                          if k not in (HEAD, KV_GROUP, QUERY_SLOT)}  # fmt: skip
        for kind, partition in partitions.items():
            n = next(iter(partition.values()))[1]
            if n < 2 or kind not in wanted or kind in excluded:
                continue
            slices: list[Slice] = []
            numel = 0
            for sub in (attention, mlp):
                for proj in sub.projections:
                    cuts = projection_cuts(proj, partition)
                    if not cuts:
                        continue
                    entries = _tensor_entries(layer, proj, where, adapters)
                    if entries is None:
                        continue
                    t, weight_name, bias_name, lora = entries
                    for side, (outer, n_, inner) in cuts:
                        dim = t.out_dim if side == "rows" else t.in_dim
                        # (name, tensor, dim, counted): a bias is 1-D, its dimension 0 follows the output rows.
                        named = [(weight_name, t.weight, dim, True)]
                        if side == "rows" and bias_name is not None:
                            named.append((bias_name, t.bias, 0, True))
                        # LoRA (nn.Linear only): `lora_B` rows follow output rows, `lora_A` columns input columns.
                        named.extend((name, x, dim, False) for ad in lora for name, x in ad.tensors_along(dim))
                        for full, tensor, d, counted in named:
                            if tensor.shape[d] != outer * n_ * inner:
                                raise ValueError(
                                    f"`{full}` has {tensor.shape[d]} entries along dim {d}, expected {outer} x {n_} x "
                                    f"{inner} for {kind} groups. The module shapes disagree with the config."
                                )
                            s = Slice(full, d, outer, n_, inner)
                            shapes[full] = tuple(tensor.shape)
                            slices.append(s)
                            if counted:
                                # Group sizes count the base parameters only: what the slim model loses.
                                numel += s.numel_per_group(tensor.shape)
            offset = sum(b.n for b in blocks)
            blocks.append(Block(i, kind, n, tuple(slices), numel, offset))
        for kind, sub in ((ATTENTION_SUBLAYER, attention), (MLP_SUBLAYER, mlp)):
            if kind in wanted and sub.projections and not removed(layer, sub):
                slices, numel = _sublayer_slices(layer, sub, where, adapters, shapes)
                blocks.append(Block(i, kind, 1, slices, numel, sum(b.n for b in blocks)))
    if HIDDEN_CHANNEL in wanted:
        blocks.extend(_hidden_blocks(model, layout, hidden_unit, adapters, shapes, sum(b.n for b in blocks)))
    groups = GroupSet(blocks, norm.model_type, shapes, model=model, adapters=adapters, prune_frozen=prune_frozen)
    return groups if prune_frozen else exclude_frozen(groups)


def _hidden_blocks(model: nn.Module, layout: ArchLayout, unit: int | None, adapters: dict, shapes: dict,
                   offset: int) -> list[Block]:  # fmt: skip
    """The one model-wide block of `hidden_channel` groups (none when it would hold fewer than two groups)."""
    if layout.stream is None:
        raise ValueError(
            f"`hidden_channel` is not offered for {layout.name} (`{model.config.model_type}`): {NO_STREAM_REASON}. "
            "Leave `hidden_channel` out of the kinds (`prune_kinds`)."
        )
    if adapters or unwrap_peft(model) is not model:
        raise ValueError(
            "`hidden_channel` groups are not built for peft models: the residual stream runs through the frozen "
            "embedding and every projection. Prune hidden channels on the plain model, or leave `hidden_channel` out "
            "of the kinds."
        )
    experts = any(mlp.experts for mlp in layout.mlps)
    if unit is None:
        unit = EXPERT_CHANNEL_UNIT if experts else 1
    if not isinstance(unit, int) or unit < 1:
        raise ValueError(f"`hidden_unit` is {unit!r}; give a positive integer number of channels per group.")
    if experts and unit % EXPERT_CHANNEL_UNIT:
        raise ValueError(
            f"`hidden_unit={unit}` on {layout.name}: its fused experts run `grouped_mm`, whose kernels need every "
            f"weight row to span a multiple of 16 bytes, so the hidden size must stay a multiple of "
            f"{EXPERT_CHANNEL_UNIT}. Use a multiple of {EXPERT_CHANNEL_UNIT} (the default for this family)."
        )
    entries = stream_tensors(model, layout)
    width = entries[0].tensor.shape[1]
    if width % unit:
        raise ValueError(
            f"`hidden_unit={unit}` does not divide the hidden size {width}; choose a divisor of {width} (e.g. 1, 8 "
            "or 64 where they divide it)."
        )
    n = width // unit
    if n < 2:
        return []
    names = {id(p): name for name, p in model.named_parameters()}
    slices, numel = [], 0
    for e in entries:
        tensor = e.tensor
        name = names.get(id(tensor))
        if name is None:
            raise ValueError(
                f"A tensor along the residual stream ({type(e.owner).__name__}.{e.attr}) is not a parameter."
            )
        s = Slice(name, e.dim, 1, n, unit)
        shapes[name] = tuple(tensor.shape)
        slices.append(s)
        numel += s.numel_per_group(tensor.shape)
    return [Block(HIDDEN_LAYER, HIDDEN_CHANNEL, n, tuple(slices), numel, offset)]


def _sublayer_slices(layer: nn.Module, sub, where: str, adapters: dict, shapes: dict) -> tuple[tuple[Slice, ...], int]:
    """The one group of a whole sublayer: every projection's whole weight and bias (and LoRA `B`), and its size.

    Zeroing them makes the sublayer's output exactly zero (zero queries and keys give uniform attention over zero
    values; `act(0) * 0 = 0` in an MLP; a zero expert output stays zero under any routing weight), which is what
    the residual stream gets once the sublayer is removed. Its own norms (`Sublayer.norms`) are not in the group: a
    zero output does not depend on them, and they go with the sublayer when it is sliced out.
    """
    slices: list[Slice] = []
    numel = 0
    for proj in sub.projections:
        entries = _tensor_entries(layer, proj, where, adapters)
        if entries is None:
            continue
        t, weight_name, bias_name, lora = entries
        named = [(weight_name, t.weight, t.out_dim, True)]
        if bias_name is not None:
            named.append((bias_name, t.bias, 0, True))
        named.extend((name, x, t.out_dim, False) for ad in lora for name, x in ad.tensors_along(t.out_dim))
        for full, tensor, d, counted in named:
            s = Slice(full, d, 1, 1, tensor.shape[d])
            shapes[full] = tuple(tensor.shape)
            slices.append(s)
            if counted:
                numel += tensor.numel()
    return tuple(slices), numel


def _refuse_lora_on_non_linear(layer: nn.Module, layout: ArchLayout, where: str) -> None:
    for sub in layout.sublayers:
        for proj in sub.projections:
            parent_path, _, name = proj.path.rpartition(".")
            try:
                module = getattr(get_submodule(layer, parent_path), name, None)
            except AttributeError:
                continue
            if module is not None and is_lora_layer(module) and not is_lora_linear(module):
                raise ValueError(
                    f"`{where}.{proj.path}` is a peft LoRA layer around a {type(module.base_layer).__name__}; hf_hesso "
                    "groups LoRA adapters on `nn.Linear` projections only. Merge the adapters first "
                    "(`model = model.merge_and_unload()`), or target other modules with `LoraConfig(target_modules=...)`."
                )


def _tensor_entries(layer: nn.Module, proj: Proj, where: str, adapters: dict):
    """`(Tensors, weight name, bias name or None, LoRA adapters)` of one projection; None when it is absent.

    A peft LoRA layer is looked through: the base slices cut its frozen `base_layer`, and the adapters' `lora_B`
    rows / `lora_A` columns join the groups.
    """
    full = f"{where}.{proj.path}"
    lora: list[LoraAdapter] = []
    parent_path, _, name = proj.path.rpartition(".")
    module = getattr(get_submodule(layer, parent_path), name, None)
    if module is not None and is_lora_linear(module):
        lora = lora_adapters(module, full)
        adapters[f"{full}.base_layer.weight"] = lora
        full = f"{full}.base_layer"
        t = projection_tensors(module, Proj("base_layer", proj.rows, proj.cols, proj.interleaved))
    else:
        t = projection_tensors(layer, proj)
    if t is None:
        return None
    if t.weight_name != "weight":  # a 3-D expert parameter, named by its own path
        return t, full, None, lora
    return t, f"{full}.weight", (f"{full}.bias" if t.has_bias else None), lora
