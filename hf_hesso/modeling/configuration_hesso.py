# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Configs of slim models whose layers may differ in size.

This file travels with every saved slim model, so it must only import `torch`, `transformers` and its sibling
files (relative imports), never `hf_hesso`.

Each config subclasses the stock config of its family and adds the fields: `hesso_layer_shapes`, a list with one
dict per layer (`num_attention_heads`, `num_key_value_heads`, `intermediate_size`, and `shared_intermediate_size` where
there is a shared expert); `hesso_hidden_size`, the width of the residual stream where hidden channels were pruned
(None otherwise); and, for a model type outside the layout table, `hesso_layout`: the layout that was inferred and
checked (`architectures.layout_to_dict`), from which `modeling_hesso.py` builds the model. The stock fields keep the
sizes of the model *before* pruning, so the stock validation (e.g. `hidden_size % num_attention_heads == 0`) and every
derived quantity (head size, rotary size, Gemma's embedding scale `sqrt(hidden_size)`) stay exactly as they were; the
model classes in `modeling_hesso.py` read the per-layer sizes and the hidden size from the new fields.
"""

from __future__ import annotations

import transformers

from .architectures import ARCHITECTURES, HESSO_PREFIX, HIDDEN_SIZE_KEY, LAYER_SHAPES_KEY, LAYOUT_KEY
from .journal import recover_for_loading


class _HessoConfigMixin:
    """Validation shared by every slim config, and crash recovery of the directory it is loaded from."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # A save interrupted after its commit point is finished before config.json is read (see journal.py).
        recover_for_loading(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_hesso_layer_shapes()

    def validate_hesso_layer_shapes(self) -> None:
        hidden = getattr(self, HIDDEN_SIZE_KEY, None)
        if hidden is not None and (not isinstance(hidden, int) or not 0 < hidden <= self.hidden_size):
            raise ValueError(
                f"`{HIDDEN_SIZE_KEY}` is {hidden!r}; it must be an integer between 1 and `hidden_size` "
                f"({self.hidden_size}), the width before pruning."
            )
        shapes = getattr(self, LAYER_SHAPES_KEY, None)
        if shapes is None:
            return
        # The field that counts the layer list (an inferred layout may name another: LongCat-Flash's `num_layers`).
        count_field = (getattr(self, LAYOUT_KEY, None) or {}).get("layer_count_field", "num_hidden_layers")
        layers = getattr(self, count_field)
        if len(shapes) != layers:
            raise ValueError(
                f"`{LAYER_SHAPES_KEY}` has {len(shapes)} entries but `{count_field}` is {layers}: give one shape per "
                "layer."
            )
        for i, shape in enumerate(shapes):
            for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "shared_intermediate_size"):
                value = shape.get(key)
                if key == "shared_intermediate_size" and value is None:
                    continue
                if not isinstance(value, int) or value < 0:
                    raise ValueError(
                        f"`{LAYER_SHAPES_KEY}[{i}][{key!r}]` is {value!r}; every layer needs a non-negative integer "
                        f"`{key}` (0 means the sublayer is removed)."
                    )
            if (shape["num_attention_heads"] == 0) != (shape["num_key_value_heads"] == 0):
                raise ValueError(
                    f"`{LAYER_SHAPES_KEY}[{i}]` has {shape['num_attention_heads']} query heads and "
                    f"{shape['num_key_value_heads']} key/value heads; a removed attention has 0 of both."
                )
            if shape["num_attention_heads"] and shape["num_attention_heads"] % shape["num_key_value_heads"]:
                raise ValueError(
                    f"`{LAYER_SHAPES_KEY}[{i}]` has {shape['num_attention_heads']} query heads and "
                    f"{shape['num_key_value_heads']} key/value heads; query heads must be a multiple of key/value heads."
                )


def make_config_class(model_type: str, stock: type) -> type:
    """The slim config class of `model_type`: `stock` plus the per-layer sizes."""
    stock_name = stock.__name__
    name = "Hesso" + stock_name
    return type(
        name,
        (_HessoConfigMixin, stock),
        {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"`{stock_name}` with per-layer sizes in `{LAYER_SHAPES_KEY}`.",
            "__annotations__": {LAYER_SHAPES_KEY: list | None, HIDDEN_SIZE_KEY: int | None},
            LAYER_SHAPES_KEY: None,
            HIDDEN_SIZE_KEY: None,
            "model_type": HESSO_PREFIX + model_type,
        },
    )


# stock model_type -> slim config class.
HESSO_CONFIGS: dict[str, type] = {}


def hesso_config_class(model_type: str, stock: type) -> type:
    """The slim config class of `model_type`, made once and kept as a module attribute (so that `auto_map` in a
    saved config resolves it by name) and registered for `AutoConfig` (`save_pretrained` writes `auto_map`)."""
    cls = HESSO_CONFIGS.get(model_type)
    if cls is None or stock not in cls.__mro__:
        cls = make_config_class(model_type, stock)
        cls.register_for_auto_class("AutoConfig")
        globals()[cls.__name__] = cls
        HESSO_CONFIGS[model_type] = cls
    return cls


def __getattr__(name: str) -> type:
    # The slim config of a model type outside the layout table (`HessoPhi3Config`), named by `auto_map` in the
    # config of a slim model that records its layout: made from the stock transformers config on first use.
    stock = getattr(transformers, name.removeprefix("Hesso"), None) if name.startswith("Hesso") else None
    model_type = getattr(stock, "model_type", None)
    if not (isinstance(stock, type) and issubclass(stock, transformers.PretrainedConfig) and model_type):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return hesso_config_class(model_type, stock)


for _model_type, _layout in ARCHITECTURES.items():
    # Shipped beside every slim model: skip a family the installed transformers version does not have.
    _stock = getattr(transformers, _layout.config_class, None)
    if _stock is None:
        continue
    _cls = make_config_class(_model_type, _stock)
    # A real module attribute, so `auto_map` ("configuration_hesso.HessoLlamaConfig") resolves by name.
    globals()[_cls.__name__] = _cls
    HESSO_CONFIGS[_model_type] = _cls
    _cls.register_for_auto_class("AutoConfig")
