# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Per-architecture layout knowledge, as plain data.

This file travels with every saved slim model (it is imported by ``modeling_hesso.py`` through a relative
import), so it must only import ``torch`` and ``transformers``, never ``hf_hesso``.

Adding an architecture of a known family is one line in ``ARCHITECTURES``: name the model type, the family
layout (``LLAMA_LAYOUT`` for decoder models with ``q/k/v/o_proj`` and a gated MLP, ``BERT_LAYOUT`` for BERT-style
encoders) and, if needed, the layout variant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchLayout:
    """Where the prunable linears of one transformer layer live, relative to the layer module.

    Attributes:
        layers (`str`): dotted path of the `nn.ModuleList` of layers, relative to `model.base_model`.
        attention (`str`): the attention module whose run-time attributes follow the head count.
        q, k, v (`str`): projections whose output rows are grouped by head.
        o (`str`): projection whose input columns are grouped by head.
        mlp_in (`tuple[str, ...]`): projections whose output rows are MLP channels.
        mlp_out (`str`): projection whose input columns are MLP channels.
        mlp (`str`): the MLP module (its `intermediate_size` attribute, when present, follows the width).
        attention_style (`str`): `"llama"` (`num_key_value_groups`, `head_dim` attributes) or `"bert"`
            (`num_attention_heads`, `all_head_size`, `attention_head_size` attributes).
        bias_in_groups (`tuple[str, ...]`): config flags naming which biases exist, informational.
    """

    layers: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    mlp: str
    attention_style: str


LLAMA_LAYOUT = ArchLayout(
    layers="layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    mlp="mlp",
    attention_style="llama",
)

BERT_LAYOUT = ArchLayout(
    layers="encoder.layer",
    attention="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    mlp_in=("intermediate.dense",),
    mlp_out="output.dense",
    mlp="intermediate",
    attention_style="bert",
)

# model_type -> layout. One entry per line, sorted.
ARCHITECTURES: dict[str, ArchLayout] = {
    "bert": BERT_LAYOUT,
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "qwen3": LLAMA_LAYOUT,
    "roberta": BERT_LAYOUT,
}

# The config key under which a slim model records its per-layer sizes.
LAYER_SHAPES_KEY = "hesso_layer_shapes"
# Prefix of the model_type of a slim model whose layers differ (`hesso_llama`, `hesso_bert`, ...).
HESSO_PREFIX = "hesso_"


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one layer that pruning can change."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        return {
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
        }


@dataclass(frozen=True)
class NormalizedConfig:
    """The config fields pruning needs, read the same way for every supported family."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int


def base_model_type(model_type: str) -> str:
    """`hesso_llama` -> `llama`; stock types are returned unchanged."""
    return model_type[len(HESSO_PREFIX) :] if model_type.startswith(HESSO_PREFIX) else model_type


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def unsupported_message(model_type: str) -> str:
    return (
        f"`model_type` {model_type!r} is not supported by hf_hesso. Supported model types: "
        f"{', '.join(supported_model_types())}. To add an architecture of a known family, add one line "
        f"`'{model_type}': LLAMA_LAYOUT` (decoder with q/k/v/o_proj and gate/up/down_proj) or "
        f"`'{model_type}': BERT_LAYOUT` (BERT-style encoder) to `ARCHITECTURES` in "
        "`hf_hesso/modeling/architectures.py`, plus a tiny config in `tests/conftest.py`."
    )


def get_layout(model_type: str) -> ArchLayout:
    try:
        return ARCHITECTURES[base_model_type(model_type)]
    except KeyError:
        raise ValueError(unsupported_message(model_type)) from None


def normalize_config(config) -> NormalizedConfig:
    """Read heads, key/value heads, head size and MLP width of any supported config."""
    model_type = base_model_type(config.model_type)
    layout = get_layout(model_type)
    heads = config.num_attention_heads
    if layout.attention_style == "bert":
        kv_heads = heads
        head_dim = config.hidden_size // heads
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return NormalizedConfig(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
    )


def layer_shapes_from_config(config) -> list[LayerShape]:
    """Per-layer sizes: the recorded ones of a slim config, else the uniform sizes of a stock config."""
    recorded = getattr(config, LAYER_SHAPES_KEY, None)
    if recorded:
        return [LayerShape(**{k: int(v) for k, v in shape.items()}) for shape in recorded]
    norm = normalize_config(config)
    uniform = LayerShape(norm.num_attention_heads, norm.num_key_value_heads, norm.intermediate_size)
    return [uniform] * norm.num_layers


def get_submodule(root, path: str):
    return root.get_submodule(path) if path else root
