"""Infer a layout (`ArchLayout`) for a model type that is not in the table, from its module tree.

Only the usual Hugging Face conventions are recognised: a `nn.ModuleList` of `num_hidden_layers` (or `num_layers`)
layers; attention with separate query/key/value projections (`q_proj`, `query`, `query_proj`, `wq`, `project_q`,
...) or one fused projection (`qkv_proj`, `query_key_value`, `c_attn`, `Wqkv`, `W_pack`), and an output projection
(`o_proj`, `out_proj`, `dense`, `c_proj`, `Wo`, `attention_out`, ...), in the attention module or in a sibling
`output` module (BERT); a gated MLP (`gate_proj`/`up_proj`/`down_proj`, `w1`/`w3`/`w2`, `w_in.w_0`/`w_in.w_1`/`w_out`),
a fused gated MLP (`gate_up_proj`, `Wi`) or a plain one (`fc1`/`fc2`, `c_fc`/`c_proj`, `dense_h_to_4h`/`dense_4h_to_h`,
`intermediate.dense`/`output.dense`). Shapes are checked against the config. A fused QKV may be `[q; k; v]` or
interleaved per head: both candidates are returned, and the numerical check (`hf_hesso.slim.selfcheck`) keeps the one
that is exact.

Nothing here is trusted without that check: a name match says where the pieces probably are, not that removing a
group is exact.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..modeling.architectures import (
    ARCHITECTURES,
    ATTENTION_SUBLAYER,
    HEAD,
    KV,
    KV_GROUP,
    LAYOUT_KEY,
    MLP,
    QUERY_SLOT,
    ArchLayout,
    Proj,
    Q,
    Sublayer,
    base_model_type,
    layout_of,
    unsupported_message,
)
from ..modeling.compat import Conv1D
from .peft import unwrap_peft

ATTENTION_Q = ("q_proj", "query", "query_proj", "wq", "Wq", "q", "project_q")
ATTENTION_K = ("k_proj", "key", "key_proj", "wk", "Wk", "k", "project_k")
ATTENTION_V = ("v_proj", "value", "value_proj", "wv", "Wv", "v", "project_v")
ATTENTION_FUSED = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "qkv")
ATTENTION_OUT = ("o_proj", "out_proj", "dense", "c_proj", "Wo", "wo", "o", "output.dense", "attention_out")
MLP_GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("w_in.w_0", "w_in.w_1", "w_out"))
MLP_FUSED_GATED = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))
MLP_PLAIN = (("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"), ("up_proj", "down_proj"),
             ("fc_in", "fc_out"), ("0", "2"))  # fmt: skip  # ("0", "2"): `nn.Sequential(Linear, act, Linear)`
# Routed experts in fused 3-D parameters (transformers 5): `experts.gate_up_proj` (experts, 2 x width, hidden) and
# `experts.down_proj` (experts, hidden, width).
EXPERTS = ("experts", "gate_up_proj", "down_proj")
# Expert-module attributes that hold the width of every expert.
EXPERT_WIDTH_ATTRIBUTES = ("intermediate_dim", "intermediate_size", "expert_dim", "ffn_dim")
# BERT keeps the MLP output in a sibling of the MLP input module.
MLP_SPLIT = (("intermediate.dense", "output.dense"),)
# Attributes that attention/MLP code commonly reads at run time, and the quantity each follows.
RUNTIME_ATTRIBUTES = {
    "num_key_value_groups": "groups",
    "num_heads": "heads",
    "num_attention_heads": "heads",
    "n_head": "heads",  # OpenAI GPT
    "n_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "all_head_size": "q_width",
    "split_size": "q_width",
}
MLP_ATTRIBUTES = {"intermediate_size": "mlp"}


class UnrecognisedArchitecture(ValueError):
    """The module tree does not follow a convention `infer_layouts` knows."""


def _shape(module: nn.Module) -> tuple[int, int] | None:
    """`(in, out)` of a projection module, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


# Config fields of the head size (CPM-Ant: `dim_head`); without one the head size is `hidden_size // heads`.
HEAD_DIM_FIELDS = ("head_dim", "dim_head")
# Config fields that count the layers of the layer list where `num_hidden_layers` counts something else (LongCat-Flash:
# `num_hidden_layers` counts attention sublayers, two to a layer of `num_layers`).
LAYER_COUNT_FIELDS = ("num_hidden_layers", "num_layers")


def _find_layers(base: nn.Module, config) -> tuple[str, str]:
    """The layer list and the config field that counts it: the outermost `nn.ModuleList` as long as one of the layer
    counts (a list inside a layer is never taken for the layers); among equally deep ones, `num_hidden_layers` first,
    then the first registered (Gemma-3n's `layers` before its `altup_projections`)."""
    counts = [(f, getattr(config, f)) for f in LAYER_COUNT_FIELDS if isinstance(getattr(config, f, None), int)]
    found = [
        (name.count("."), rank, order, name, field)
        for order, (name, module) in enumerate(base.named_modules())
        if isinstance(module, nn.ModuleList) and name
        for rank, (field, count) in enumerate(counts)
        if len(module) == count
    ]
    if found:
        *_, name, field = min(found)
        return name, field
    fields = ", ".join(f"`{f}`={getattr(config, f)}" for f in LAYER_COUNT_FIELDS if hasattr(config, f))
    raise UnrecognisedArchitecture(f"no `nn.ModuleList` of {fields} layers under {type(base).__name__}")


def _head_dim_field(config) -> str | None:
    """The config field that holds the head size, or None (the head size is then `hidden_size // heads`)."""
    return next((f for f in HEAD_DIM_FIELDS if getattr(config, f, None)), None)


def _config_sizes(config) -> tuple[int, int, int | None, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    field = _head_dim_field(config)
    head_dim = getattr(config, field) if field else hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return hidden, heads * head_dim, kv * head_dim, head_dim


def _attention(layer: nn.Module, hidden: int, q_width: int, kv_width: int) -> list[tuple[str, tuple[Proj, ...]]]:
    """Candidate attention sublayers `(module path, projections)`; fused QKV gives a concatenated and an
    interleaved candidate."""
    modules = dict(layer.named_modules())
    projections = {path: _shape(m) for path, m in modules.items() if _shape(m) is not None}

    def child(parent: str, names) -> str | None:
        for name in names:
            path = f"{parent}.{name}" if parent else name
            if path in projections:
                return path
        return None

    def out_proj(parent: str) -> str | None:
        # In the attention module, or in a sibling (`attention.self` + `attention.output.dense`).
        grand = parent.rpartition(".")[0]
        for base in (parent, grand):
            path = child(base, ATTENTION_OUT)
            if path is not None and projections[path] == (q_width, hidden):
                return path
        return None

    for parent in modules:
        q, k, v = child(parent, ATTENTION_Q), child(parent, ATTENTION_K), child(parent, ATTENTION_V)
        if q and k and v and projections[q] == (hidden, q_width) and projections[k][1] == projections[v][1]:
            o = out_proj(parent)
            if o is not None:
                projs = (Proj(q, rows=(Q,)), Proj(k, rows=(KV,)), Proj(v, rows=(KV,)), Proj(o, cols=Q))
                return [(parent, projs)]
        fused = child(parent, ATTENTION_FUSED)
        if fused and projections[fused] == (hidden, q_width + 2 * kv_width):
            o = out_proj(parent)
            if o is not None:
                return [
                    (parent, (Proj(fused, rows=(Q, KV, KV), interleaved=interleaved), Proj(o, cols=Q)))
                    for interleaved in ((False, True) if q_width == kv_width else (False,))
                ]
    return []


def _experts(layer: nn.Module, hidden: int) -> list[Sublayer]:
    """Routed experts in fused 3-D parameters, as an MLP sublayer of kind `expert_channel` (the router, and a shared
    expert if there is one, are left as they are)."""
    name, gate_up, down = EXPERTS
    for path, module in layer.named_modules():
        if path.rpartition(".")[2] != name:
            continue
        a, b = getattr(module, gate_up, None), getattr(module, down, None)
        if not (isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter) and a.dim() == b.dim() == 3):
            continue
        experts, width = b.shape[0], b.shape[2]
        if tuple(a.shape) != (experts, 2 * width, hidden) or tuple(b.shape) != (experts, hidden, width):
            continue  # another orientation (GPT-OSS stores (experts, hidden, 2 x width), interleaved)
        parent = path.rpartition(".")[0]
        attributes = tuple(
            (f"{path}.{attr}", "mlp") for attr in EXPERT_WIDTH_ATTRIBUTES if getattr(module, attr, None) == width
        )
        return [
            Sublayer(
                module=parent,
                projections=(Proj(f"{path}.{gate_up}", rows=(MLP, MLP)), Proj(f"{path}.{down}", cols=MLP)),
                attributes=attributes,
                experts=True,
            )
        ]
    return []


def _mlp(layer: nn.Module, hidden: int) -> list[Sublayer]:
    experts = _experts(layer, hidden)
    if experts:
        return experts
    modules = dict(layer.named_modules())
    projections = {path: _shape(m) for path, m in modules.items() if _shape(m) is not None}

    def find(names) -> tuple[str, list[str]] | None:
        for parent in modules:
            paths = [f"{parent}.{n}" if parent else n for n in names]
            if all(p in projections for p in paths):
                return parent, paths
        return None

    for names in MLP_GATED:
        hit = find(names)
        if hit:
            parent, (gate, up, down) = hit
            width = projections[down][0]
            if projections[gate] == projections[up] == (hidden, width) and projections[down] == (width, hidden):
                return [_mlp_sublayer(modules, parent, (Proj(gate, rows=(MLP,)), Proj(up, rows=(MLP,)),
                                                        Proj(down, cols=MLP)))]  # fmt: skip
    for names in MLP_FUSED_GATED:
        hit = find(names)
        if hit:
            parent, (fused, down) = hit
            width = projections[down][0]
            if projections[fused] == (hidden, 2 * width) and projections[down] == (width, hidden):
                return [_mlp_sublayer(modules, parent, (Proj(fused, rows=(MLP, MLP)), Proj(down, cols=MLP)))]
    for names in MLP_PLAIN + MLP_SPLIT:
        hit = find(names)
        if hit:
            parent, (up, down) = hit
            width = projections[down][0]
            if projections[up] == (hidden, width) and projections[down] == (width, hidden) and width != hidden:
                module = parent if names not in MLP_SPLIT else up.rpartition(".")[0]
                return [_mlp_sublayer(modules, module, (Proj(up, rows=(MLP,)), Proj(down, cols=MLP)))]
    return []


def _mlp_sublayer(modules: dict, parent: str, projections: tuple[Proj, ...]) -> Sublayer:
    attributes = tuple(
        (f"{parent}.{name}" if parent else name, quantity)
        for name, quantity in MLP_ATTRIBUTES.items()
        if isinstance(getattr(modules[parent], name, None), int)
    )
    return Sublayer(module=parent, projections=projections, attributes=attributes, width_field=WIDTH_FIELD)


# Config fields that commonly hold the MLP width (the first the config has is used by `to_stock`).
WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "dim_ff")
WIDTH_FIELD = "intermediate_size"


# Config fields that commonly hold the width of every routed expert.
EXPERT_WIDTH_FIELDS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")


def _expert_width_field(config, layers: nn.ModuleList, sub: Sublayer) -> str:
    """The config field equal to the experts' width (`to_stock` sets it)."""
    for layer in layers:
        try:
            width = layer.get_submodule(sub.projections[1].path.rpartition(".")[0]).down_proj.shape[2]
        except AttributeError:
            continue
        return next((f for f in EXPERT_WIDTH_FIELDS if getattr(config, f, None) == width), EXPERT_WIDTH_FIELDS[0])
    return EXPERT_WIDTH_FIELDS[0]


# Projection names of multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): low-rank compressed keys/values.
MLA_NAMES = ("kv_a_proj_with_mqa", "kv_a_proj", "q_a_proj", "kv_b_proj")
# Stand-in for the attention of a layout whose layers have no attention of a known form (the layers' attention, or
# other mixer, is left as it is).
NO_ATTENTION_LAYOUT = Sublayer(module="(no attention)", projections=())


def _attention_reason(layers: nn.ModuleList, hidden: int, q_width: int, kv_width: int) -> str:
    """Why the attention of these layers is not offered for pruning."""
    names = {path.rpartition(".")[2] for layer in layers for path, _ in layer.named_modules()}
    if names & set(MLA_NAMES):
        return (
            "multi-head latent attention (low-rank `kv_a_proj`/`kv_b_proj`, `q_a_proj`) is not pruned: its heads share "
            "one compressed key/value projection; the attention is left as it is"
        )
    return (
        f"no attention of a known form in any layer (separate {ATTENTION_Q[0]}/{ATTENTION_K[0]}/{ATTENTION_V[0]}-like "
        f"projections ({hidden} -> {q_width}, {kv_width}, {kv_width}) or a fused {ATTENTION_FUSED[:3]}-like one "
        f"({hidden} -> {q_width + 2 * kv_width}), with an output projection ({q_width} -> {hidden})); the layers' "
        "attention or other mixers are left as they are"
    )


def infer_layouts(model: nn.Module) -> list[ArchLayout]:
    """Candidate layouts of `model`, most likely first (fused QKV: `[q; k; v]`, then interleaved per head).

    Every layer is looked at: in hybrid models some layers hold attention and others a Mamba, linear-attention or
    other mixer, and some an MLP and others not. The attention found in most layers (same module path and
    projections) is the layout's; a layer without it, or without any of the MLP variants found, has that sublayer
    absent (`hf_hesso.modeling.modeling_hesso.NO_ATTENTION` / `NO_MLP`): it holds no groups and is left as it is.
    When no layer has an attention of a known form (latent attention, say), the layout has the MLPs only and the
    attention kinds are excluded with the reason (`ArchLayout.excluded`).

    Raises:
        `UnrecognisedArchitecture`: neither an attention nor an MLP of a known form in any layer (naming what was
            looked for and how to add a layout).
    """
    config = model.config
    base = getattr(model, "base_model", model)
    try:
        layers_path, count_field = _find_layers(base, config)
        hidden, q_width, kv_width, _ = _config_sizes(config)
    except AttributeError as error:
        raise UnrecognisedArchitecture(
            _unrecognised(
                config,
                f"no attention or MLP sublayer: a recurrent model (state-space or recurrent layers, as in Mamba or "
                f"RWKV, follow no layout hf_hesso knows; the config has no attention sizes: {error})",
            )
        ) from None
    except UnrecognisedArchitecture as error:
        raise UnrecognisedArchitecture(_unrecognised(config, str(error))) from None
    layer_list = base.get_submodule(layers_path)
    # Attention candidates per layer; the one most layers share is the layout's.
    votes: dict[tuple, list] = {}
    for index, each in enumerate(layer_list):
        found_here = _attention(each, hidden, q_width, kv_width)
        if found_here:
            votes.setdefault(tuple(found_here), []).append(index)
    attentions, attention_layer = [], None
    if votes:
        candidates, indices = max(votes.items(), key=lambda item: len(item[1]))
        attentions, attention_layer = list(candidates), layer_list[indices[0]]
    # MLP variants: some families mix dense and mixture-of-experts layers; routed experts are listed first. A layer
    # whose MLP follows no known convention has none (`NO_MLP`).
    found = {}
    for each in layer_list:
        for variant in _mlp(each, hidden):
            found.setdefault((variant.module, variant.projections), variant)
    mlps = sorted(found.values(), key=lambda v: not v.experts)
    if not attentions and not mlps:
        raise UnrecognisedArchitecture(
            _unrecognised(
                config,
                f"attention projections: separate {ATTENTION_Q}/{ATTENTION_K}/{ATTENTION_V} of shapes ({hidden} -> "
                f"{q_width}, {kv_width}, {kv_width}) or a fused {ATTENTION_FUSED} ({hidden} -> "
                f"{q_width + 2 * kv_width}), with an output projection {ATTENTION_OUT} ({q_width} -> {hidden}); MLP "
                f"projections: gated {MLP_GATED}, fused gated {MLP_FUSED_GATED} or plain {MLP_PLAIN + MLP_SPLIT}",
                layer_list[0],
            )
        )
    width_field = next((f for f in WIDTH_FIELDS if getattr(config, f, None)), WIDTH_FIELD)
    mlps = [Sublayer(**{**m.__dict__, "width_field": _expert_width_field(config, layer_list, m) if m.experts
                        else width_field}) for m in mlps]  # fmt: skip
    common = dict(
        name=type(config).__name__.removesuffix("Config"),
        layers=layers_path,
        layer_count_field=count_field,
        # Unknown residual structure: a layer that lost both sublayers is never assumed to be the identity.
        pre_norm=False,
        mlps=tuple(mlps),
        config_class=type(config).__name__,
        model_classes=((type(model).__name__, ""),),
        head_dim_field=_head_dim_field(config),
        kv_heads_field="num_key_value_heads" if getattr(config, "num_key_value_heads", None) else None,
        notes="Inferred from the module tree.",
        inferred=True,
    )
    if not attentions:
        reason = _attention_reason(layer_list, hidden, q_width, kv_width)
        mha = (
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        ) == config.num_attention_heads
        kinds = (HEAD,) if mha else (KV_GROUP, QUERY_SLOT)
        excluded = tuple((kind, reason) for kind in (*kinds, ATTENTION_SUBLAYER))
        return [ArchLayout(attention=NO_ATTENTION_LAYOUT, excluded=excluded, **common)]
    layouts = []
    for module, projections in attentions:
        attention_module = attention_layer.get_submodule(module)
        attributes = tuple(
            (f"{module}.{name}" if module else name, quantity)
            for name, quantity in RUNTIME_ATTRIBUTES.items()
            if isinstance(getattr(attention_module, name, None), int)
        )
        layouts.append(
            ArchLayout(
                # transformers' attention modules return `(output, weights)`, and a removed one must too; for other
                # code a guess (a plain tensor), which the numerical check of `attention_sublayer` confirms or rejects.
                attention=Sublayer(
                    module=module,
                    projections=projections,
                    attributes=attributes,
                    returns_tuple=type(attention_module).__module__.startswith("transformers."),
                ),
                **common,
            )
        )
    return layouts


def _unrecognised(config, what: str, layer: nn.Module | None = None) -> str:
    found = ""
    if layer is not None:
        names = [f"{p} {tuple(_shape(m))}" for p, m in layer.named_modules() if _shape(m) is not None]
        found = f" The layer's projections (in, out): {', '.join(names) or 'none'}."
    return (
        f"hf_hesso cannot infer a layout for `model_type` {config.model_type!r}: not recognised: {what}.{found} "
        "Describe the layer yourself: an `hf_hesso.modeling.architectures.ArchLayout` naming the layer list and, for "
        "each projection, the index spaces of its rows and columns (docs/architectures.md shows the known ones), "
        "registered in your script with `hf_hesso.modeling.modeling_hesso.register_layout(model_type, layout, "
        "[(model_class, auto_class_name)])` before `build_groups`."
    )


# The numerical check of an inferred layout. It slims, so it lives in a higher layer (`hf_hesso.slim.selfcheck`),
# which installs it here when the package is imported; `resolve_layout` calls it for model types outside the table.
_layout_check: Callable[[nn.Module], ArchLayout] | None = None


def set_layout_check(check: Callable[[nn.Module], ArchLayout]) -> None:
    """Install the function that infers and checks the layout of a model outside the table (`hf_hesso.slim.selfcheck`
    does, on import)."""
    global _layout_check
    _layout_check = check


def resolve_layout(model: nn.Module) -> ArchLayout:
    """The layout of `model`: the table's; the one its config records (a slim model of an inferred layout); one
    registered in this process; else one inferred from its module tree and checked numerically (once per model
    class), which is registered.

    Raises:
        `ValueError`: no layout can be inferred, or none of its group kinds passed the check (naming why).
    """
    config = model.config
    model_type = base_model_type(config.model_type)
    if model_type in ARCHITECTURES or getattr(config, LAYOUT_KEY, None):
        return layout_of(config)
    if _layout_check is None:
        raise ValueError(unsupported_message(model_type))
    return _layout_check(unwrap_peft(model))
