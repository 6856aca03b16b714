# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Model classes of slim models whose layers may differ in size.

This file travels with every saved slim model (`save_pretrained` copies it, with `configuration_hesso.py`,
`architectures.py` and `journal.py`, next to the weights), so `AutoModel*.from_pretrained(dir,
trust_remote_code=True)` works in a Python that has never heard of `hf_hesso`. It must only import `torch`, `transformers` and its sibling files.

Every class subclasses a stock class (`HessoLlamaForCausalLM(LlamaForCausalLM)`): `__init__` builds the stock model
with the uniform sizes of the config, then cuts each layer's linears down to the sizes recorded in
`config.hesso_layer_shapes` (and every tensor along the residual stream to `config.hesso_hidden_size`, where
set) and updates the attributes the attention code reads at run time. Inside
`from_pretrained` the model is built on the meta device, so the temporary full-size layers cost no memory. The
same function, `apply_layer_shape`, is used by `hf_hesso.slim_model` to slice a trained model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from .architectures import (
    ARCHITECTURES,
    KV,
    LAYER_SHAPES_KEY,
    MLP,
    NO_STREAM_REASON,
    SHARED,
    ArchLayout,
    LayerShape,
    Proj,
    Q,
    Sublayer,
    current_hidden_size,
    get_submodule,
    layer_shapes_from_config,
    layout_of,
    normalize_config,
)
from .compat import (
    AUTO_MAPPING_NAMES,
    LOADING_CHECK_HOOK,
    WEIGHT_CONVERSIONS,
    Conv1D,
    auto_model_names,
    find_cache,
    loading_report,
    record_tokens,
)
from .configuration_hesso import HESSO_CONFIGS, hesso_config_class
from .journal import recover_for_loading


@dataclass(frozen=True)
class Tensors:
    """The weight (and bias) of one projection, with the dimensions that hold its output rows and input columns."""

    owner: nn.Module  # the module holding the weight (for a 3-D expert parameter: the experts module)
    weight_name: str
    out_dim: int
    in_dim: int
    has_bias: bool

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.weight_name)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.owner.bias if self.has_bias else None


def projection_tensors(layer: nn.Module, proj: Proj) -> Tensors | None:
    """Where the weight of `proj` lives in `layer`; None for an optional projection this config does not have.

    `nn.Linear` (and anything with a 2-D `weight` stored `(out, in)`), GPT-2's `Conv1D` (`(in, out)`), or a 3-D
    expert parameter `(experts, out, in)`.
    """
    parent_path, _, name = proj.path.rpartition(".")
    try:
        parent = get_submodule(layer, parent_path)
    except AttributeError:
        parent = None
    obj = getattr(parent, name, None) if parent is not None else None
    if obj is None:
        if proj.optional:
            return None
        raise ValueError(
            f"The layer has no `{proj.path}` ({type(layer).__name__}); the layout table entry does not match this "
            "model's modules."
        )
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 3:
            raise ValueError(f"`{proj.path}` is a {obj.dim()}-D parameter; expected a 3-D expert tensor.")
        return Tensors(parent, name, 1, 2, False)
    bias = getattr(obj, "bias", None) is not None
    if isinstance(obj, Conv1D):
        return Tensors(obj, "weight", 1, 0, bias)
    return Tensors(obj, "weight", 0, 1, bias)


class RemovedSublayer(nn.Module):
    """Stands in for a removed attention or MLP module: no compute, no parameters but an optional constant bias.

    The layer still calls it where it called the sublayer, and adds its output to the residual stream: a zero (a
    0-dim tensor, which broadcasts), or the bias that the sublayer's output projection kept adding once every head or
    channel was gone. Where the output projection lives outside the module (BERT's `attention.output.dense`, kept at
    zero input width with its bias), the output is an empty `(..., 0)` tensor for that projection to read.
    Attention modules return `(output, None)`. A removed attention still advances its slot of the key/value cache
    (`cache_layer`, the index the attention passed to the cache) by one number per token, so that the cache reports
    the same length and mask sizes as with the attention (see `compat.record_tokens`).
    """

    def __init__(
        self,
        bias: torch.Tensor | None,
        empty: bool,
        returns_tuple: bool,
        variant: int = 0,
        cache_layer: int | None = None,
        attention: bool = False,
    ):
        super().__init__()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.empty = empty
        self.returns_tuple = returns_tuple
        self.variant = variant  # which MLP variant of the layout this was (mixture-of-experts layouts have two)
        self.cache_layer = cache_layer
        # Whether it stands for the attention (in hybrid models one module path, `mixer`, can hold the attention in
        # some layers and the MLP in others).
        self.attention = attention

    def extra_repr(self) -> str:
        return f"empty={self.empty}, bias={self.bias is not None}"

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if self.cache_layer is not None:
            cache = find_cache(args[1:], kwargs)
            if cache is not None:
                record_tokens(cache, self.cache_layer, x)
        if self.empty:
            out = x.new_zeros(*x.shape[:-1], 0)
        elif self.bias is not None:
            out = self.bias
        else:
            out = x.new_zeros(())
        return (out, None) if self.returns_tuple else out


class SkippedLayer(nn.Module):
    """A layer whose attention and MLP are both removed: the identity, with no parameters.

    It keeps its place in the layer list so that the indices of the other layers (their key/value cache slots,
    `config.layer_types`, checkpoint names) stay what they were; it costs one Python call. Like a removed attention,
    it advances its key/value cache slot (`cache_layer`) by one number per token.
    """

    def __init__(
        self,
        shape: LayerShape,
        mlp_variant: int = 0,
        attention_type: str | None = None,
        cache_layer: int | None = None,
    ):
        super().__init__()
        self.hesso_shape = shape
        self.mlp_variant = mlp_variant
        self.cache_layer = cache_layer
        if attention_type is not None:
            self.attention_type = attention_type  # read by some models' layer loops to pick the mask

    def forward(self, hidden_states, *args, **kwargs):
        if self.cache_layer is not None:
            cache = find_cache(args, kwargs)
            if cache is not None:
                record_tokens(cache, self.cache_layer, hidden_states)
        return hidden_states


def _cache_layer(attention: nn.Module | None) -> int | None:
    """The key/value cache slot an attention module writes (the `layer_idx` the stock attention passes to the cache;
    a removed attention keeps it), or None for a module that keeps no cache."""
    if isinstance(attention, (RemovedSublayer, SkippedLayer)):
        return attention.cache_layer
    for module in attention.modules() if attention is not None else ():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
    return None


def _module_or_none(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_submodule(layer, path)
    except AttributeError:
        return None


def removed(layer: nn.Module, sub: Sublayer) -> bool:
    """Whether `sub` of `layer` has been removed (the layer is skipped, or the module is a `RemovedSublayer`)."""
    if not sub.projections:  # a sublayer the layer does not have (`NO_ATTENTION`, `NO_MLP`)
        return False
    return isinstance(layer, SkippedLayer) or isinstance(_module_or_none(layer, sub.module), RemovedSublayer)


def _inside(proj: Proj, sub: Sublayer) -> bool:
    return proj.path.startswith(sub.module + ".")


# Stand-ins for a sublayer that a layer of an inferred layout does not have, or has in a form the layout does not
# describe (hybrid models: a Mamba, linear-attention or latent-attention mixer in some or all layers). It has no
# projections, so it holds no groups, is never removed, and the layer's module is left exactly as it is; its index
# spaces are absent from `space_sizes`, and `LayerShape`s record the config's sizes for them (unchanged).
NO_ATTENTION = Sublayer(module="(no attention)", projections=())
NO_MLP = Sublayer(module="(no mlp)", projections=())


def _has_projections(layer: nn.Module, sub: Sublayer) -> bool:
    """Every non-optional projection of `sub` exists in `layer`."""
    for proj in sub.projections:
        try:
            projection_tensors(layer, proj)
        except ValueError:
            return False
    return bool(sub.projections)


def attention_of(layer: nn.Module, layout: ArchLayout) -> Sublayer:
    """The attention sublayer of `layer`: `layout.attention`, or `NO_ATTENTION` where a layer of an inferred layout
    does not have it (table layouts have it in every layer, and a mismatch raises when its tensors are read)."""
    sub = layout.attention
    if isinstance(layer, SkippedLayer) or not layout.inferred:
        return sub
    if not sub.projections:
        return NO_ATTENTION
    module = _module_or_none(layer, sub.module)
    if isinstance(module, RemovedSublayer):
        return sub if module.attention else NO_ATTENTION
    return sub if _has_projections(layer, sub) else NO_ATTENTION


def mlp_variant(layer: nn.Module, layout: ArchLayout) -> Sublayer:
    """The MLP variant of `layout` this layer has (the first whose projections exist); `NO_MLP` for a layer of an
    inferred layout that has none of them."""
    if isinstance(layer, SkippedLayer):
        return layout.mlps[layer.mlp_variant]
    for variant in layout.mlps:
        module = _module_or_none(layer, variant.module)
        if isinstance(module, RemovedSublayer) and not module.attention:
            return layout.mlps[module.variant]
    for variant in layout.mlps:
        if layout.inferred:
            if _has_projections(layer, variant):
                return variant
            continue
        try:
            projection_tensors(layer, variant.projections[0])
        except ValueError:
            continue
        return variant
    if layout.inferred:
        return NO_MLP
    raise ValueError(
        f"None of the MLP layouts of {layout.name} matches this layer ({type(layer).__name__}): looked for "
        f"{[v.projections[0].path for v in layout.mlps]}."
    )


def layer_sublayers(layer: nn.Module, layout: ArchLayout) -> tuple[Sublayer, Sublayer]:
    """`(attention, mlp)` of `layer`; either may be `NO_ATTENTION` / `NO_MLP` in a layer of an inferred layout."""
    return attention_of(layer, layout), mlp_variant(layer, layout)


def space_sizes(layer: nn.Module, layout: ArchLayout) -> dict[str, int]:
    """The current size of every index space of `layer`, read from its tensors.

    Input columns name one space each; output rows of a fused projection give the one space left unknown.
    """
    sizes: dict[str, int] = {}
    if isinstance(layer, SkippedLayer):
        shape = layer.hesso_shape
        return {Q: 0, KV: 0, MLP: 0, **({} if shape.shared_intermediate_size is None else {SHARED: 0})}
    projections = []
    for sub in layer_sublayers(layer, layout):
        if removed(layer, sub):
            # A removed sublayer's spaces are empty; only projections outside its module remain (at width zero).
            for p in sub.projections:
                for space in (*p.rows, p.cols):
                    if space is not None:
                        sizes[space] = 0
            projections += [p for p in sub.projections if not _inside(p, sub)]
        else:
            projections += list(sub.projections)
    found = [(p, projection_tensors(layer, p)) for p in projections]
    found = [(p, t) for p, t in found if t is not None]
    for p, t in found:
        if p.cols is not None:
            sizes[p.cols] = t.weight.shape[t.in_dim]
    for p, t in found:
        unknown = [s for s in p.rows if s not in sizes]
        if unknown:
            known = sum(sizes[s] for s in p.rows if s in sizes)
            share, rest = divmod(t.weight.shape[t.out_dim] - known, len(unknown))
            if rest or len(set(unknown)) != 1 or share < 0:
                raise ValueError(f"Cannot read the sizes of {p.rows} from `{p.path}` {tuple(t.weight.shape)}.")
            sizes[unknown[0]] = share
    return sizes


def _arange(n: int) -> torch.Tensor:
    # Explicit CPU: `from_pretrained` builds the model under a meta-device context.
    return torch.arange(n, dtype=torch.long, device="cpu")


def rows_to_keep(proj: Proj, kept: dict[str, torch.Tensor], sizes: dict[str, int], head_dim: int) -> torch.Tensor:
    """The output rows of `proj` that survive, given the kept indices of every index space."""
    if not proj.interleaved:
        parts, offset = [], 0
        for space in proj.rows:
            parts.append(kept[space] + offset)
            offset += sizes[space]
        return torch.cat(parts)
    # One block of `len(rows)` parts per head; every part is head-major with the same head count.
    width = len(proj.rows) * head_dim
    heads = kept[proj.rows[0]].view(-1, head_dim)[:, 0] // head_dim
    return (heads.view(-1, 1) * width + _arange(width).view(1, -1)).reshape(-1)


def _select(t: Tensors, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Keep only the output `rows` and input `cols` of one projection, in place (None keeps all)."""
    with torch.no_grad():
        weight = t.weight
        new = weight
        if rows is not None:
            new = new.index_select(t.out_dim, rows.to(weight.device))
        if cols is not None:
            new = new.index_select(t.in_dim, cols.to(weight.device))
        setattr(t.owner, t.weight_name, nn.Parameter(new.contiguous(), requires_grad=weight.requires_grad))
        if t.has_bias and rows is not None:
            bias = t.owner.bias
            t.owner.bias = nn.Parameter(bias.index_select(0, rows.to(bias.device)), requires_grad=bias.requires_grad)
    module = t.owner
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, Conv1D):
        module.nx, module.nf = module.weight.shape


def _indices(size: int, kept: torch.Tensor) -> torch.Tensor | None:
    """`kept` as indices along a dimension of current size `size`; None when nothing changes."""
    if kept.numel() == size and bool((kept.cpu() == _arange(size)).all()):
        return None
    return kept.to(dtype=torch.long)


def apply_layer_shape(
    layer: nn.Module,
    layout: ArchLayout,
    shape: LayerShape,
    head_dim: int,
    kept: dict[str, torch.Tensor] | None = None,
) -> None:
    """Give one transformer layer the sizes `shape`, in place, and update its run-time attributes.

    Args:
        layer (`nn.Module`): one layer of a supported model (stock or already slim).
        layout (`ArchLayout`): the layout of its family.
        shape (`LayerShape`): the target query heads, key/value heads and MLP widths.
        head_dim (`int`): the size of one head (unchanged by pruning).
        kept (`dict[str, torch.Tensor]`, *optional*): the indices to keep per index space (`"q"` query rows, `"kv"`
            key/value rows, `"mlp"` MLP channels, `"shared"` shared-expert channels), sorted, in rows of the current
            tensors. A missing entry keeps the first rows, which is what a freshly built model needs (its weights
            are loaded afterwards).
    """
    kept = dict(kept or {})
    sizes = space_sizes(layer, layout)
    targets = shape.space_sizes(head_dim)
    for space, current in sizes.items():
        target = targets.get(space)
        if target is None:
            raise ValueError(f"The layer has a `{space}` index space that the shape {shape.to_dict()} does not size.")
        idx = kept.get(space)
        if idx is None:
            if target > current:
                raise ValueError(
                    f"Cannot grow `{space}` from {current} to {target} rows: a slim layer can only shrink. The config "
                    f"`{LAYER_SHAPES_KEY}` asks for more than the stock sizes."
                )
            kept[space] = _arange(target)
        elif idx.numel() != target:
            raise ValueError(f"`kept[{space!r}]` has {idx.numel()} indices but the shape asks for {target} rows.")
        else:
            kept[space] = idx.cpu().to(torch.long)
    changed = {space: _indices(sizes[space], kept[space]) is not None for space in sizes}

    attention, mlp = sublayers = layer_sublayers(layer, layout)
    # Sublayers that go now (their module is replaced, its projections with it) or went before. A sublayer the layer
    # does not have (`NO_ATTENTION`, `NO_MLP`) never goes: its module is not the layout's.
    goes = {id(attention): bool(attention.projections) and not shape.has_attention,
            id(mlp): bool(mlp.projections) and not shape.has_mlp}  # fmt: skip
    for sub in sublayers:
        if not goes[id(sub)] and removed(layer, sub):
            raise ValueError(
                f"The shape {shape.to_dict()} asks for a `{sub.module}` that this layer no longer has: a removed "
                "sublayer cannot come back."
            )
        for proj in sub.projections:
            if goes[id(sub)] and (_inside(proj, sub) or removed(layer, sub)):
                continue
            t = projection_tensors(layer, proj)
            if t is None:
                continue
            rows = rows_to_keep(proj, kept, sizes, head_dim) if any(changed[s] for s in proj.rows) else None
            cols = kept[proj.cols] if proj.cols is not None and changed[proj.cols] else None
            if rows is not None or cols is not None:
                _select(t, rows, cols)

    for sub, keep_bias in ((attention, shape.attention_bias), (mlp, shape.mlp_bias)):
        if goes[id(sub)] and not removed(layer, sub):
            _remove_sublayer(layer, layout, sub, keep_bias)

    heads, kv_heads = shape.num_attention_heads, shape.num_key_value_heads
    quantities = {
        "heads": heads,
        "kv_heads": kv_heads,
        "groups": heads // kv_heads if kv_heads else 0,
        "q_width": heads * head_dim,
        "mlp": shape.intermediate_size,
        "shared": shape.shared_intermediate_size,
    }
    for sub in sublayers:
        if goes[id(sub)]:
            continue
        for path, quantity in sub.attributes:
            parent_path, _, name = path.rpartition(".")
            setattr(get_submodule(layer, parent_path), name, quantities[quantity])


def _remove_sublayer(layer: nn.Module, layout: ArchLayout, sub: Sublayer, keep_bias: bool) -> None:
    """Replace `sub`'s module by a `RemovedSublayer` and its own norms by `nn.Identity`, in place."""
    out = next((p for p in sub.projections if p.cols is not None), None)
    empty = out is not None and not _inside(out, sub)
    bias = None
    if keep_bias:
        t = projection_tensors(layer, out) if out is not None and not empty else None
        if t is None or t.bias is None:
            raise ValueError(
                f"The shape keeps a bias for the removed `{sub.module}`, but its output projection has none."
            )
        bias = t.bias
    variant = layout.mlps.index(sub) if sub in layout.mlps else 0
    attention = sub is layout.attention
    cache_layer = _cache_layer(get_submodule(layer, sub.module)) if attention else None
    parent_path, _, name = sub.module.rpartition(".")
    replacement = RemovedSublayer(bias, empty, sub.returns_tuple, variant, cache_layer, attention)
    setattr(get_submodule(layer, parent_path), name, replacement)
    for norm in sub.norms:
        parent_path, _, name = norm.rpartition(".")
        setattr(get_submodule(layer, parent_path), name, nn.Identity())


def skip_layer(layers: nn.ModuleList, index: int, layout: ArchLayout, shape: LayerShape) -> None:
    """Put a `SkippedLayer` in place of `layers[index]` when `shape` empties it and the family allows it."""
    layer = layers[index]
    if not (shape.empty and layout.pre_norm) or isinstance(layer, SkippedLayer):
        return
    variant = layout.mlps.index(mlp_variant(layer, layout))
    cache_layer = _cache_layer(_module_or_none(layer, layout.attention.module))
    layers[index] = SkippedLayer(shape, variant, getattr(layer, "attention_type", None), cache_layer)


def layer_modules(model: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` of transformer layers of a supported model (bare or with a head)."""
    layout = layout_of(model.config)
    return get_submodule(model.base_model, layout.layers)


def apply_layer_shapes(model: nn.Module, shapes: list[LayerShape]) -> None:
    """Give every layer of `model` the sizes `shapes[i]` (keeping the first rows), in place."""
    layout = layout_of(model.config)
    layers = layer_modules(model)
    if len(shapes) != len(layers):
        raise ValueError(
            f"`{LAYER_SHAPES_KEY}` has {len(shapes)} entries but the model has {len(layers)} layers; give one shape "
            "per layer."
        )
    head_dim = normalize_config(model.config).head_dim
    for i, shape in enumerate(shapes):
        apply_layer_shape(layers[i], layout, shape, head_dim)
        skip_layer(layers, i, layout, shape)


# Roles of the tensors that hold the residual stream's channels (see `stream_tensors`).
EMBED, READ, WRITE, READ_NORM, WRITE_NORM, FINAL_NORM, HEAD_READ = (
    "embed", "read", "write", "read_norm", "write_norm", "final_norm", "head"
)  # fmt: skip


@dataclass(frozen=True)
class StreamTensor:
    """One tensor with a dimension `dim` along the residual stream's channels, and what it does with them."""

    owner: nn.Module
    attr: str
    dim: int
    role: str

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)


def stream_tensors(model: nn.Module, layout: ArchLayout | None = None) -> list[StreamTensor]:
    """Every tensor of `model` that has a dimension along the residual stream, once each (tied heads skipped).

    The embedding (columns), every projection that reads the normalised stream (input columns) or writes into it
    (output rows and bias, a removed sublayer's kept bias), the routers and gates of `Stream.readers`, the norms on
    the stream (reader and writer norms, the final norm), and every linear head outside the base model (columns).

    Raises:
        `ValueError`: the family has no `Stream` (exact hidden-size pruning is impossible there), or a module outside
            the base model is not a linear head reading the stream.
    """
    layout = layout or layout_of(model.config)
    if layout.stream is None:
        raise ValueError(f"{layout.name} has no prunable hidden size: {NO_STREAM_REASON}.")
    stream = layout.stream
    base = model.base_model
    embed = base.get_input_embeddings()
    out = [StreamTensor(embed, "weight", 1, EMBED)]
    for layer in layer_modules(model):
        if isinstance(layer, SkippedLayer):
            continue
        for sub in layer_sublayers(layer, layout):
            module = _module_or_none(layer, sub.module)
            if isinstance(module, RemovedSublayer):
                if module.bias is not None:
                    out.append(StreamTensor(module, "bias", 0, WRITE))
                continue
            for proj in sub.projections:
                t = projection_tensors(layer, proj)
                if t is None:
                    continue
                if proj.cols is not None:
                    out.append(StreamTensor(t.owner, t.weight_name, t.out_dim, WRITE))
                    if t.has_bias:
                        out.append(StreamTensor(t.owner, "bias", 0, WRITE))
                else:
                    out.append(StreamTensor(t.owner, t.weight_name, t.in_dim, READ))
        for path in stream.readers:
            module = _module_or_none(layer, path)
            if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
                out.append(StreamTensor(module, "weight", module.weight.dim() - 1, READ))
        for role, paths in ((READ_NORM, stream.reader_norms), (WRITE_NORM, stream.writer_norms)):
            for path in paths:
                module = _module_or_none(layer, path)
                if isinstance(getattr(module, "weight", None), torch.Tensor):
                    out.append(StreamTensor(module, "weight", 0, role))
    out.append(StreamTensor(get_submodule(base, stream.final_norm), "weight", 0, FINAL_NORM))
    inside = {id(m) for m in base.modules()}
    for name, module in model.named_modules():
        if id(module) in inside or not any(True for _ in module.parameters(recurse=False)):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"`{name}` ({type(module).__name__}) sits outside the base model and is not a linear head reading the "
                "hidden channels; hidden-size pruning handles `lm_head` / `score`-like heads only."
            )
        if module.weight is not embed.weight:  # a tied head is the embedding, listed once
            out.append(StreamTensor(module, "weight", 1, HEAD_READ))
    return out


def apply_hidden_size(model: nn.Module, kept: torch.Tensor, layout: ArchLayout | None = None) -> None:
    """Keep only the residual-stream channels `kept` (sorted indices) in every tensor along the stream, in place.

    Tied tensors stay tied; `nn.Linear` / `nn.Embedding` sizes and the modules' `hidden_size` / `hidden_dim`
    attributes follow. No rescaling: `hf_hesso.slim_model` rescales first where the norms need it.
    """
    kept = kept.to(dtype=torch.long)
    # Tensors already at the target width are left alone: a `*ForSequenceClassification` builds its base model
    # (which cuts itself) before its head, and then cuts the head.
    entries = [e for e in stream_tensors(model, layout) if e.tensor.shape[e.dim] != kept.numel()]
    widths = {e.tensor.shape[e.dim] for e in entries}
    if not entries:
        return
    if len(widths) != 1:
        raise ValueError(f"The tensors along the residual stream have different widths {sorted(widths)}.")
    width = widths.pop()
    new: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for e in entries:
            old = e.tensor
            if id(old) not in new:
                sliced = old.detach().index_select(e.dim, kept.to(old.device)).contiguous()
                new[id(old)] = nn.Parameter(sliced, requires_grad=old.requires_grad)
    # Every reference to a sliced tensor (a tied head included) gets the new one.
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                module._parameters[name] = new[id(p)]
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
        for attr in ("hidden_size", "hidden_dim"):
            if getattr(module, attr, None) == width and isinstance(getattr(module, attr), int):
                setattr(module, attr, kept.numel())


_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h)\.(\d+)\.")


def _stock_code() -> bool:
    return False


class HessoModelMixin:
    """Builds the stock model, then applies the per-layer sizes of `config.hesso_layer_shapes`."""

    # The bare slim class of the same family (set below for every generated class).
    _hesso_bare_class: type | None = None

    def __init__(self, config, *args, **kwargs):
        # `LlamaForSequenceClassification` and its siblings build their base model with
        # `AutoModel.from_config(config)`, which looks the config class object up. When loaded as remote code the
        # config class comes from its own copy of `configuration_hesso.py` (transformers hashes each entry file
        # separately), so register exactly `type(config)` here, right before it is needed.
        if self._hesso_bare_class is not None:
            transformers.AutoModel.register(type(config), self._hesso_bare_class, exist_ok=True)
        super().__init__(config, *args, **kwargs)
        if getattr(config, LAYER_SHAPES_KEY, None):
            apply_layer_shapes(self, layer_shapes_from_config(config))
        hidden = current_hidden_size(config)
        if hidden != config.hidden_size:
            apply_hidden_size(self, _arange(hidden))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        # `AutoModel*.from_pretrained` read config.json before this class was known. When the last save of the
        # directory was interrupted after its commit point, finish it (journal.py) and read the config again, so
        # that the config and the weights both come from the new save.
        if recover_for_loading(pretrained_model_name_or_path) and config is not None and not isinstance(config, str):
            config = None
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    def initialize_weights(self):
        # transformers takes a class defined outside it for custom code, whose `_init_weights` it does not trust to
        # leave loaded tensors alone: after loading it skips every module all of whose own tensors were loaded, and
        # so every module with no tensors of its own. Some stock models fill non-persistent buffers of their layers
        # from such a module's `_init_weights` (Falcon-H1's `FalconH1Model` sets each Mamba mixer's `mup_vector`), which
        # would then stay uninitialised memory. A slim class runs the stock `_init_weights`, which sets only what was
        # not loaded: initialise as for the stock class.
        self.is_custom_code = _stock_code  # an instance attribute, shadowing the class method while this runs
        try:
            return super().initialize_weights()
        finally:
            del self.is_custom_code

    def _check_loaded_weights(self, *args, **kwargs):
        # Installed below as transformers' load-report hook (`compat.LOADING_CHECK_HOOK`). transformers
        # re-initialises a weight whose checkpoint shape differs from the model (and only then raises, without naming
        # the tensor, unless `ignore_mismatched_sizes=True`, where it stays silent). A slim model must never be
        # silently re-initialised: name the layer and the tensor and stop.
        result = getattr(super(), LOADING_CHECK_HOOK)(*args, **kwargs)
        loading_info = loading_report(*args, **kwargs)
        problems = []
        shapes = layer_shapes_from_config(self.config)
        for key, ckpt_shape, model_shape in sorted(loading_info.mismatched_keys):
            match = _LAYER_INDEX.search("." + key)
            where = f"layer {match.group(1)}" if match else "outside the layers"
            expected = f" (config: {shapes[int(match.group(1))].to_dict()})" if match else ""
            problems.append(
                f"{where}: tensor `{key}` has shape {tuple(ckpt_shape)} in the checkpoint but {tuple(model_shape)} "
                f"in the model built from config.json{expected}"
            )
        layout = layout_of(self.config)
        prunable = {f".{p.path}." for sub in layout.sublayers for p in sub.projections}
        for key in sorted(loading_info.missing_keys):
            match = _LAYER_INDEX.search("." + key)
            if match and any(p in f".{key}." for p in prunable):
                problems.append(f"layer {match.group(1)}: tensor `{key}` is missing from the checkpoint")
        if problems:
            # Cleared so that transformers' own report does not replace this error with a less precise one.
            loading_info.mismatched_keys.clear()
            raise ValueError(
                "The checkpoint does not match its per-layer config `"
                + LAYER_SHAPES_KEY
                + "`; refusing to re-initialise weights:\n  "
                + "\n  ".join(problems)
                + "\nThe weights and config.json were written by different models: save the slim model again with "
                "`model.save_pretrained(dir)`."
            )
        return result


setattr(HessoModelMixin, LOADING_CHECK_HOOK, HessoModelMixin._check_loaded_weights)
# transformers renames some checkpoints on save and load (fused MoE experts <-> per-expert legacy tensors), picking the
# renaming by class name or `model_type`, which a slim class matches only partly: a slim Mixtral could be saved in the
# legacy layout and then not be renamed back on load. A slim checkpoint always holds the tensors exactly as the model
# does: no renaming on save (on load, legacy patterns match none of these names).
setattr(HessoModelMixin, WEIGHT_CONVERSIONS, property(lambda self: [], lambda self, value: None, lambda self: None))


# stock class name (`LlamaForCausalLM`) -> slim class (`HessoLlamaForCausalLM`).
HESSO_MODELS: dict[str, type] = {}


def _make_class(model_type: str, stock: type, auto_class: str | None) -> type:
    name = "Hesso" + stock.__name__
    cls = type(
        name,
        (HessoModelMixin, stock),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"`{stock.__name__}` whose layers may differ in size (see `config.{LAYER_SHAPES_KEY}`).",
            "config_class": HESSO_CONFIGS[model_type],
        },
    )
    if auto_class is not None:
        # Shipped code: `save_pretrained` writes `auto_map` and copies this file beside the weights.
        cls.register_for_auto_class(auto_class)
    return cls


def _mapped(auto: str, model_type: str | None) -> list[str]:
    """The class names the Auto class `auto` maps `model_type` to (transformers' name tables)."""
    return auto_model_names(auto, model_type)


def _add_class(model_type: str, stock: type, auto_class: str | None) -> type:
    """The slim class of `stock`, made once and kept as a module attribute (so that `auto_map` resolves by name),
    with the slim class of its family's bare model (which the heads of some families build through `AutoModel`)."""
    name = "Hesso" + stock.__name__
    cls = globals().get(name)
    if cls is None or stock not in cls.__mro__:
        cls = _make_class(model_type, stock, auto_class)
        globals()[name] = cls
    HESSO_MODELS[stock.__name__] = cls
    if cls._hesso_bare_class is None:
        bare_names = _mapped("AutoModel", stock.config_class.model_type)
        bare = getattr(transformers, bare_names[0], None) if bare_names else None
        if bare is stock:
            cls._hesso_bare_class = cls
        elif isinstance(bare, type) and issubclass(bare, transformers.PreTrainedModel):
            cls._hesso_bare_class = _add_class(model_type, bare, "AutoModel")
    return cls


def register_layout(model_type: str, layout: ArchLayout, model_classes: list[tuple[type, str]]) -> list[type]:
    """Add a layout for `model_type` (e.g. one inferred from a module tree) and make its slim classes.

    The classes are registered with the transformers Auto* factories of this process, and for `save_pretrained`:
    a slim model of such a layout records the layout in its config (`hesso_layout`) and ships this code, which
    makes the same classes again by name in a process that has only torch and transformers (see `__getattr__`),
    provided the stock classes are part of transformers.

    Args:
        model_type (`str`): the stock `model_type`.
        layout (`ArchLayout`): its layout.
        model_classes (`list[tuple[type, str]]`): stock model classes with the name of their Auto class
            (`"AutoModelForCausalLM"`).
    """
    ARCHITECTURES[model_type] = layout
    config_cls = hesso_config_class(model_type, model_classes[0][0].config_class)
    transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    made = []
    for stock, auto in model_classes:
        cls = _add_class(model_type, stock, auto)
        getattr(transformers, auto).register(config_cls, cls, exist_ok=True)
        made.append(cls)
    return made


def slim_class_of(stock: type) -> type | None:
    """The slim class of the stock transformers class `stock` (made on first use, with the slim config of its
    model type); None when `stock` is not a transformers model class."""
    model_type = getattr(getattr(stock, "config_class", None), "model_type", None)
    if not (isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel) and model_type):
        return None
    if getattr(transformers, stock.__name__, None) is not stock:
        return None
    hesso_config_class(model_type, stock.config_class)
    auto = next((a for a in AUTO_MAPPING_NAMES if stock.__name__ in _mapped(a, model_type)), None)
    return _add_class(model_type, stock, auto)


def __getattr__(name: str) -> type:
    # A slim class of a model type outside the layout table (`HessoPhi3ForCausalLM`), named by `auto_map` in the
    # config of a slim model whose layout is recorded there: made from the stock transformers class on first use.
    stock = getattr(transformers, name.removeprefix("Hesso"), None) if name.startswith("Hesso") else None
    cls = slim_class_of(stock) if isinstance(stock, type) else None
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls


for _model_type, _layout in ARCHITECTURES.items():
    if _model_type not in HESSO_CONFIGS:
        continue
    _family = []
    for _stock_name, _auto in _layout.model_classes:
        # This file is shipped beside every slim model and may run under another transformers version: a family
        # whose classes that version lacks is skipped rather than breaking the import for all the others.
        _stock = getattr(transformers, _stock_name, None)
        if _stock is None:
            continue
        _cls = _make_class(_model_type, _stock, _auto)
        # A real module attribute, so `auto_map` ("modeling_hesso.HessoLlamaForCausalLM") resolves by name.
        globals()[_cls.__name__] = _cls
        HESSO_MODELS[_stock_name] = _cls
        _family.append((_cls, _auto))
    _bare = next((c for c, auto in _family if auto == "AutoModel"), None)
    for _cls, _ in _family:
        _cls._hesso_bare_class = _bare
