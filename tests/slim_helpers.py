"""The heads every tiny family is tested with, random zeroed groups and the shapes slimming must give (shared by the
slim, save/load, architecture and depth tests). The models come from `fixtures.tiny_model`."""

from __future__ import annotations

import random

import torch
from fixtures import DECODERS, ENCODERS, TINY_CONFIGS

from hf_hesso.groups import (
    EXPERT_CHANNEL,
    HEAD,
    KINDS,
    KV_GROUP,
    MLP_CHANNEL,
    QUERY_SLOT,
    SHARED_EXPERT_CHANNEL,
)
from hf_hesso.modeling.architectures import LayerShape, get_layout, normalize_config
from hf_hesso.modeling.modeling_hesso import layer_modules, layer_sublayers, projection_tensors

DECODER_HEADS = ("ForCausalLM", "ForSequenceClassification", "Model")
ENCODER_HEADS = ("Model", "ForSequenceClassification", "ForMaskedLM")
CASES = [
    (name, head) for name in sorted(TINY_CONFIGS) for head in (ENCODER_HEADS if name in ENCODERS else DECODER_HEADS)
]
assert set(DECODERS) | set(ENCODERS) == set(TINY_CONFIGS)


def zero_random_groups(model, groups, seed: int = 0, full_layer: int = 0) -> list[int]:
    """Zero a random subset of groups of every kind, uneven across layers, never a whole block.

    In layer `full_layer` at least one group of every block is zeroed (so a GQA layer gets kv_group *and*
    query_slot groups zeroed at once); other layers get a random number (possibly none).
    """
    rng = random.Random(seed)
    chosen = []
    for block in groups.blocks:
        low = 1 if block.layer == full_layer else 0
        count = rng.randint(low, block.n - 1)
        chosen += [block.offset + i for i in rng.sample(range(block.n), count)]
    groups.zero_(model, chosen)
    return chosen


def expected_shapes(groups, chosen: list[int], before: list[LayerShape]) -> list[LayerShape]:
    """The kept structure, computed from the chosen groups alone: (kept kv heads) x (kept slots), channels."""
    selected = set(chosen)
    out = []
    for layer, shape in enumerate(before):
        removed = {kind: 0 for kind in KINDS}
        blocks = {b.kind: b for b in groups.blocks if b.layer == layer}
        for b in blocks.values():
            removed[b.kind] = sum(1 for i in range(b.n) if b.offset + i in selected)
        rep = shape.num_attention_heads // shape.num_key_value_heads
        if HEAD in blocks:
            kv = heads = shape.num_attention_heads - removed[HEAD]
        else:
            kv = shape.num_key_value_heads - removed[KV_GROUP]
            heads = kv * (rep - removed[QUERY_SLOT])
        width = shape.intermediate_size - removed[MLP_CHANNEL]
        if EXPERT_CHANNEL in blocks:  # a group is several channels of every expert
            width -= removed[EXPERT_CHANNEL] * (shape.intermediate_size // blocks[EXPERT_CHANNEL].n)
        shared = shape.shared_intermediate_size
        if shared is not None:
            shared -= removed[SHARED_EXPERT_CHANNEL]
        out.append(LayerShape(heads, kv, width, shared))
    return out


def expected_param_count(model, before: list[LayerShape], after: list[LayerShape], params_before: int) -> int:
    """Parameters after slimming, from the kept structure and the projection shapes in the layout (biases included)."""
    layout = get_layout(model.config.model_type)
    hd = normalize_config(model.config).head_dim
    removed = 0
    for layer, a, b in zip(layer_modules(model), before, after, strict=True):
        gone = {k: v - b.space_sizes(hd)[k] for k, v in a.space_sizes(hd).items()}
        for sub in layer_sublayers(layer, layout):
            for proj in sub.projections:
                t = projection_tensors(layer, proj)
                if t is None:
                    continue
                shape = t.weight.shape
                per_row = shape.numel() // shape[t.out_dim] + int(t.has_bias)
                per_col = shape.numel() // shape[t.in_dim]
                removed += sum(gone[space] for space in proj.rows) * per_row
                if proj.cols is not None:
                    removed += gone[proj.cols] * per_col
    return params_before - removed


def check_runtime_attributes(model, shapes: list[LayerShape]) -> None:
    """Every run-time attribute the layout names follows the new sizes."""
    layout = get_layout(model.config.model_type)
    hd = normalize_config(model.config).head_dim
    for layer, shape in zip(layer_modules(model), shapes, strict=True):
        values = {"heads": shape.num_attention_heads, "kv_heads": shape.num_key_value_heads,
                  "groups": shape.num_attention_heads // shape.num_key_value_heads,
                  "q_width": shape.num_attention_heads * hd, "mlp": shape.intermediate_size,
                  "shared": shape.shared_intermediate_size}  # fmt: skip
        for sub in layer_sublayers(layer, layout):
            for path, quantity in sub.attributes:
                parent, _, name = path.rpartition(".")
                assert getattr(layer.get_submodule(parent), name) == values[quantity], (path, quantity)


def outputs(model, batch):
    with torch.no_grad():
        return model(**batch)[0]
