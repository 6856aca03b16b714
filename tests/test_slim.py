"""slim_model: removes exactly the all-zero groups, keeps the function, counts parameters exactly."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from conftest import DECODERS, ENCODERS, TINY_CONFIGS, tiny_batch, tiny_config

from hf_hesso.groups import (
    EXPERT_CHANNEL,
    HEAD,
    KINDS,
    KV_GROUP,
    MLP_CHANNEL,
    QUERY_SLOT,
    SHARED_EXPERT_CHANNEL,
    build_groups,
)
from hf_hesso.modeling.architectures import LayerShape, get_layout, normalize_config
from hf_hesso.modeling.modeling_hesso import layer_modules, layer_sublayers, projection_tensors
from hf_hesso.slim import current_layer_shapes, slim_model

PREFIX = {
    "bert": "Bert",
    "roberta": "Roberta",
    "llama": "Llama",
    "llama_mha": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}
DECODER_HEADS = ("ForCausalLM", "ForSequenceClassification", "Model")
ENCODER_HEADS = ("Model", "ForSequenceClassification", "ForMaskedLM")
CASES = [
    (name, head) for name in sorted(TINY_CONFIGS) for head in (ENCODER_HEADS if name in ENCODERS else DECODER_HEADS)
]
assert set(DECODERS) | set(ENCODERS) == set(TINY_CONFIGS)


def make_model(name: str, head: str, seed: int = 0, **overrides):
    """A fresh tiny model of family `name` with head `head`, with non-trivial biases and norms."""
    torch.manual_seed(seed)
    model = getattr(transformers, PREFIX[name] + head)(tiny_config(name, **overrides)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                # Random biases/norm weights, so that a wrongly kept or dropped row shows in the outputs.
                p.add_(torch.randn_like(p) * 0.1)
    return model


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


@pytest.mark.parametrize("name,head", CASES)
def test_slim_matches_masked_dense(name, head):
    model = make_model(name, head)
    groups = build_groups(model)
    chosen = zero_random_groups(model, groups, seed=len(name) + len(head))
    batch = tiny_batch(name)
    dense = outputs(model, batch)
    before = current_layer_shapes(model)
    params_before = sum(p.numel() for p in model.parameters())

    summary = slim_model(model, groups)

    assert type(model).__name__ == "Hesso" + PREFIX[name] + head
    assert isinstance(model, getattr(transformers, PREFIX[name] + head))
    assert model.config.model_type == "hesso_" + normalize_config(model.config).model_type
    want = expected_shapes(groups, chosen, before)
    assert summary.layers == want == current_layer_shapes(model)
    assert [LayerShape(**d) for d in model.config.hesso_layer_shapes] == want
    assert want[0] != before[0] and want != before
    assert summary.params_before == params_before
    assert summary.params_after == sum(p.numel() for p in model.parameters())
    assert summary.params_after == expected_param_count(model, before, want, params_before)
    assert summary.params_after < params_before
    assert summary.removed_groups == len(chosen)
    assert (outputs(model, batch) - dense).abs().max().item() <= 1e-5
    check_runtime_attributes(model, want)
    assert summary.to_dict()["layers"] == [s.to_dict() for s in want]
    assert "parameters:" in str(summary)


def test_gqa_overlap_keeps_kv_times_slots():
    # Layer 0 of the GQA llama: 2 kv heads x 2 slots. Remove kv head 1 and slot 0: only query head 0*2+1 stays.
    model = make_model("llama", "ForCausalLM")
    groups = build_groups(model)
    kv = next(b for b in groups.blocks if b.layer == 0 and b.kind == KV_GROUP)
    slot = next(b for b in groups.blocks if b.layer == 0 and b.kind == QUERY_SLOT)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    k = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    groups.zero_(model, [kv.offset + 1, slot.offset + 0])
    batch = tiny_batch("llama")
    dense = outputs(model, batch)
    summary = slim_model(model, groups)
    assert summary.layers[0] == LayerShape(1, 1, 96)
    attn = model.model.layers[0].self_attn
    torch.testing.assert_close(attn.q_proj.weight, q[16:32], rtol=0, atol=0)
    torch.testing.assert_close(attn.k_proj.weight, k[:16], rtol=0, atol=0)
    assert attn.num_key_value_groups == 1
    assert (outputs(model, batch) - dense).abs().max().item() <= 1e-5


def test_partly_zero_groups_are_kept():
    model = make_model("llama", "ForCausalLM")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[3] = 0  # channel 3: gate row only, up row and down column stay
        model.model.layers[1].self_attn.k_proj.weight[:16] = 0  # kv head 0: k rows only
    summary = slim_model(model)
    assert summary.removed_groups == 0
    assert summary.params_after == summary.params_before
    assert summary.layers == summary.layers_before


def test_stale_groups_are_refused():
    model = make_model("qwen2", "ForCausalLM")
    groups = build_groups(model)
    mlp = [b for b in groups.blocks if b.kind == MLP_CHANNEL]
    groups.zero_(model, [b.offset for b in mlp])
    slim_model(model, groups)
    with pytest.raises(ValueError, match="build_groups"):
        slim_model(model, groups)


def test_unsupported_class_is_refused():
    class MyLlama(transformers.LlamaForCausalLM):
        pass

    model = MyLlama(tiny_config("llama"))
    with pytest.raises(ValueError, match=r"`model` is a MyLlama, which `slim_model` cannot convert"):
        slim_model(model)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_reslim_slim_model(name):
    head = "ForCausalLM" if name == "llama" else "ForMaskedLM"
    model = make_model(name, head)
    groups = build_groups(model)
    zero_random_groups(model, groups, seed=1)
    slim_model(model, groups)
    cls = type(model)
    groups2 = build_groups(model)
    assert len(groups2) < len(groups)
    chosen = zero_random_groups(model, groups2, seed=2, full_layer=1)
    batch = tiny_batch(name)
    dense = outputs(model, batch)
    before = current_layer_shapes(model)
    summary = slim_model(model, groups2)
    assert type(model) is cls
    assert summary.layers == expected_shapes(groups2, chosen, before)
    assert (outputs(model, batch) - dense).abs().max().item() <= 1e-5
