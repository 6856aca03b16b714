"""slim_model: removes exactly the all-zero groups, keeps the function, counts parameters exactly."""

from __future__ import annotations

import pytest
import torch
import transformers
from fixtures import PREFIX, tiny_batch, tiny_config, tiny_model
from slim_helpers import (
    CASES,
    check_runtime_attributes,
    expected_param_count,
    expected_shapes,
    outputs,
    zero_random_groups,
)

from hf_hesso.groups import (
    KV_GROUP,
    MLP_CHANNEL,
    QUERY_SLOT,
    build_groups,
)
from hf_hesso.modeling.architectures import LayerShape, normalize_config
from hf_hesso.slim import current_layer_shapes, slim_model


@pytest.mark.parametrize("name,head", CASES)
def test_slim_matches_masked_dense(name, head):
    model = tiny_model(name, head, perturb=0.1, eval_mode=True)
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
    model = tiny_model("llama", "ForCausalLM", perturb=0.1, eval_mode=True)
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
    model = tiny_model("llama", "ForCausalLM", perturb=0.1, eval_mode=True)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[3] = 0  # channel 3: gate row only, up row and down column stay
        model.model.layers[1].self_attn.k_proj.weight[:16] = 0  # kv head 0: k rows only
    summary = slim_model(model)
    assert summary.removed_groups == 0
    assert summary.params_after == summary.params_before
    assert summary.layers == summary.layers_before


def test_stale_groups_are_refused():
    model = tiny_model("qwen2", "ForCausalLM", perturb=0.1, eval_mode=True)
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
    model = tiny_model(name, head, perturb=0.1, eval_mode=True)
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
