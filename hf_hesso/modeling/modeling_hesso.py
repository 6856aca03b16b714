# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Model classes of slim models whose layers may differ in size.

This file travels with every saved slim model (`save_pretrained` copies it, with `configuration_hesso.py` and
`architectures.py`, next to the weights), so `AutoModel*.from_pretrained(dir, trust_remote_code=True)` works in a
Python that has never heard of `hf_hesso`. It must only import `torch`, `transformers` and its sibling files.

Every class subclasses a stock class (`HessoLlamaForCausalLM(LlamaForCausalLM)`): `__init__` builds the stock model
with the uniform sizes of the config, then cuts each layer's linears down to the sizes recorded in
`config.hesso_layer_shapes` and updates the attributes the attention code reads at run time. Inside
`from_pretrained` the model is built on the meta device, so the temporary full-size layers cost no memory. The
same function, `apply_layer_shape`, is used by `hf_hesso.slim_model` to slice a trained model.
"""

from __future__ import annotations

import re

import torch
import transformers
from torch import nn

from .architectures import (
    LAYER_SHAPES_KEY,
    ArchLayout,
    LayerShape,
    get_layout,
    get_submodule,
    layer_shapes_from_config,
    normalize_config,
)
from .configuration_hesso import HESSO_CONFIGS
from .journal import recover_for_loading


def _select_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only the output features `rows` and input features `cols` of `linear`, in place (None keeps all)."""
    with torch.no_grad():
        weight = linear.weight
        new_weight = weight
        if rows is not None:
            new_weight = new_weight.index_select(0, rows.to(weight.device))
        if cols is not None:
            new_weight = new_weight.index_select(1, cols.to(weight.device))
        linear.weight = nn.Parameter(new_weight.contiguous(), requires_grad=weight.requires_grad)
        if linear.bias is not None and rows is not None:
            bias = linear.bias
            linear.bias = nn.Parameter(bias.index_select(0, rows.to(bias.device)), requires_grad=bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _indices(size: int, kept: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Indices to keep along one dimension of current size `size`; None when nothing changes."""
    if kept is None:
        return None
    if kept.numel() == size and bool((kept.cpu() == torch.arange(size, device="cpu")).all()):
        return None
    return kept.to(device=device, dtype=torch.long)


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
        shape (`LayerShape`): the target query heads, key/value heads and MLP width.
        head_dim (`int`): the size of one head (unchanged by pruning).
        kept (`dict[str, torch.Tensor]`, *optional*): the indices to keep, as `{"q": query rows, "kv": key/value
            rows, "mlp": MLP channels}` (sorted, in rows of the current tensors). A missing entry keeps the first
            rows, which is what a freshly built model needs (its weights are loaded afterwards).
    """
    kept = kept or {}
    q, k, v, o = (get_submodule(layer, p) for p in (layout.q, layout.k, layout.v, layout.o))
    mlp_in = [get_submodule(layer, p) for p in layout.mlp_in]
    mlp_out = get_submodule(layer, layout.mlp_out)
    targets = {
        "q": (q.out_features, shape.num_attention_heads * head_dim),
        "kv": (k.out_features, shape.num_key_value_heads * head_dim),
        "mlp": (mlp_in[0].out_features, shape.intermediate_size),
    }
    select = {}
    for key, (current, target) in targets.items():
        idx = kept.get(key)
        if idx is None:
            if target > current:
                raise ValueError(
                    f"Cannot grow `{key}` from {current} to {target} rows: a slim layer can only shrink. The config "
                    f"`{LAYER_SHAPES_KEY}` asks for more than the stock sizes."
                )
            idx = torch.arange(target, device="cpu")
        elif idx.numel() != target:
            raise ValueError(f"`kept[{key!r}]` has {idx.numel()} indices but the shape asks for {target} rows.")
        select[key] = _indices(current, idx, q.weight.device)

    if select["q"] is not None:
        _select_linear(q, rows=select["q"])
        _select_linear(o, cols=select["q"])
    if select["kv"] is not None:
        _select_linear(k, rows=select["kv"])
        _select_linear(v, rows=select["kv"])
    if select["mlp"] is not None:
        for m in mlp_in:
            _select_linear(m, rows=select["mlp"])
        _select_linear(mlp_out, cols=select["mlp"])

    attention = get_submodule(layer, layout.attention)
    heads, kv_heads = shape.num_attention_heads, shape.num_key_value_heads
    if layout.attention_style == "llama":
        # eager and sdpa attention repeat the key/value heads `num_key_value_groups` times.
        attention.num_key_value_groups = heads // kv_heads
        attention.head_dim = head_dim
    else:
        # BERT reshapes with `attention_head_size` and reads `all_head_size`; keep the head size, change the count.
        attention.num_attention_heads = heads
        attention.attention_head_size = head_dim
        attention.all_head_size = heads * head_dim
    for name, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(attention, name):
            setattr(attention, name, value)
    mlp = get_submodule(layer, layout.mlp)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = shape.intermediate_size


def layer_modules(model: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` of transformer layers of a supported model (bare or with a head)."""
    layout = get_layout(model.config.model_type)
    return get_submodule(model.base_model, layout.layers)


def apply_layer_shapes(model: nn.Module, shapes: list[LayerShape]) -> None:
    """Give every layer of `model` the sizes `shapes[i]` (keeping the first rows), in place."""
    layout = get_layout(model.config.model_type)
    layers = layer_modules(model)
    if len(shapes) != len(layers):
        raise ValueError(
            f"`{LAYER_SHAPES_KEY}` has {len(shapes)} entries but the model has {len(layers)} layers; give one shape "
            "per layer."
        )
    head_dim = normalize_config(model.config).head_dim
    for layer, shape in zip(layers, shapes, strict=True):
        apply_layer_shape(layer, layout, shape, head_dim)


_LAYER_INDEX = re.compile(r"\.(?:layers|layer)\.(\d+)\.")


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        # `AutoModel*.from_pretrained` read config.json before this class was known. When the last save of the
        # directory was interrupted after its commit point, finish it (journal.py) and read the config again, so
        # that the config and the weights both come from the new save.
        if recover_for_loading(pretrained_model_name_or_path) and config is not None and not isinstance(config, str):
            config = None
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # transformers re-initialises a weight whose checkpoint shape differs from the model (and only then raises,
        # without naming the tensor, unless `ignore_mismatched_sizes=True`, where it stays silent). A slim model
        # must never be silently re-initialised: name the layer and the tensor and stop.
        super()._adjust_missing_and_unexpected_keys(loading_info)
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
        prunable = ("_proj.", "query.", "key.", "value.", "dense.")
        for key in sorted(loading_info.missing_keys):
            match = _LAYER_INDEX.search("." + key)
            if match and any(p in key for p in prunable):
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


# stock model_type -> (class name prefix, heads). Each pair gives a module-level class `Hesso<Prefix><Head>`.
_FAMILIES = {
    "bert": ("Bert", ("Model", "ForSequenceClassification", "ForMaskedLM")),
    "llama": ("Llama", ("Model", "ForCausalLM", "ForSequenceClassification")),
    "mistral": ("Mistral", ("Model", "ForCausalLM", "ForSequenceClassification")),
    "qwen2": ("Qwen2", ("Model", "ForCausalLM", "ForSequenceClassification")),
    "qwen3": ("Qwen3", ("Model", "ForCausalLM", "ForSequenceClassification")),
    "roberta": ("Roberta", ("Model", "ForSequenceClassification", "ForMaskedLM")),
}
AUTO_CLASS_OF_HEAD = {
    "Model": "AutoModel",
    "ForCausalLM": "AutoModelForCausalLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForMaskedLM": "AutoModelForMaskedLM",
}

# stock class name (`LlamaForCausalLM`) -> slim class (`HessoLlamaForCausalLM`).
HESSO_MODELS: dict[str, type] = {}


def _make_class(model_type: str, prefix: str, head: str) -> type:
    stock = getattr(transformers, prefix + head)
    name = f"Hesso{prefix}{head}"
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
    cls.register_for_auto_class(AUTO_CLASS_OF_HEAD[head])
    return cls


for _model_type, (_prefix, _heads) in _FAMILIES.items():
    for _head in _heads:
        _cls = _make_class(_model_type, _prefix, _head)
        # A real module attribute, so `auto_map` ("modeling_hesso.HessoLlamaForCausalLM") resolves by name.
        globals()[_cls.__name__] = _cls
        HESSO_MODELS[_prefix + _head] = _cls
    for _head in _heads:
        HESSO_MODELS[_prefix + _head]._hesso_bare_class = HESSO_MODELS[_prefix + "Model"]
