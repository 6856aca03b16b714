import pytest
import torch
from fixtures import DECODERS, ENCODERS, TINY_CONFIGS, tiny_config
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    MambaConfig,
    Olmo2Config,
)

from hf_hesso import build_groups
from hf_hesso.groups import HEAD, KV_GROUP, MLP_CHANNEL, QUERY_SLOT

HEADS = {
    "decoder": [AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification],
    "encoder": [AutoModel, AutoModelForSequenceClassification, AutoModelForMaskedLM],
}


def _heads(name):
    return HEADS["encoder" if name in ENCODERS else "decoder"]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_kinds_and_counts(name):
    config = tiny_config(name)
    for auto in _heads(name):
        groups = build_groups(auto.from_config(config))
        counts = {}
        for b in groups.blocks:
            counts[b.kind] = counts.get(b.kind, 0) + b.n
        gqa = config.num_key_value_heads < config.num_attention_heads if name in DECODERS else False
        expected = {MLP_CHANNEL: 2 * 96}
        if gqa:
            expected |= {KV_GROUP: 2 * 2, QUERY_SLOT: 2 * 2}
        else:
            expected |= {HEAD: 2 * 4}
        assert counts == expected, auto
        assert len(groups) == sum(expected.values())
        assert [b.offset for b in groups.blocks] == [
            sum(b.n for b in groups.blocks[:i]) for i in range(len(groups.blocks))
        ]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_group_numel_matches_hand_count(name):
    config = tiny_config(name)
    model = AutoModel.from_config(config)
    groups = build_groups(model)
    hidden, hd = (
        config.hidden_size,
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    )
    has_bias = name in ENCODERS or name == "qwen2"
    for b in groups.blocks:
        if b.kind == MLP_CHANNEL:
            n_in = 1 if name in ENCODERS else 2
            expected = n_in * hidden + hidden + (n_in if name in ENCODERS else 0)
        elif b.kind == HEAD:
            expected = 4 * hd * hidden + (3 * hd if has_bias else 0)
        elif b.kind == KV_GROUP:
            rep = config.num_attention_heads // config.num_key_value_heads
            # k, v rows + rep q rows + rep o columns
            expected = (2 + 2 * rep) * hd * hidden + ((2 + rep) * hd if has_bias else 0)
        else:
            kv = config.num_key_value_heads
            expected = 2 * kv * hd * hidden + (kv * hd if has_bias else 0)
        assert b.group_numel == expected, (b.kind, b.group_numel, expected)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_embeddings_lm_head_and_norms_never_grouped(name):
    config = tiny_config(name)
    auto = AutoModelForMaskedLM if name in ENCODERS else AutoModelForCausalLM
    groups = build_groups(auto.from_config(config))
    for param in groups.param_names:
        assert "embed" not in param and "lm_head" not in param and "norm" not in param, param
        assert param.endswith((".weight", ".bias"))


def test_biases_belong_to_their_groups():
    groups = build_groups(AutoModel.from_config(tiny_config("qwen2")))
    names = groups.param_names
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"layers.0.self_attn.{proj}.bias" in names
    # o_proj has no bias in qwen2; the MLP has none either.
    assert not any(n.endswith("o_proj.bias") or "mlp" in n and n.endswith("bias") for n in names)
    bert = build_groups(AutoModel.from_config(tiny_config("bert")))
    assert "encoder.layer.1.intermediate.dense.bias" in bert.param_names
    # The output projection's bias is shared by all channels: never part of a group.
    assert "encoder.layer.1.output.dense.bias" not in bert.param_names


def test_query_slot_owns_jth_head_of_every_kv_group():
    config = tiny_config("llama", num_attention_heads=6, num_key_value_heads=2)  # 3 query heads per kv head
    model = AutoModel.from_config(config)
    groups = build_groups(model)
    hd = config.head_dim  # stays 16: head_dim is set explicitly, q_proj is 6 x 16 wide
    slot = next(g for g in groups if g.kind == QUERY_SLOT and g.layer == 1 and g.index == 2)
    q_dim, q_rows = slot.indices()["layers.1.self_attn.q_proj.weight"]
    assert q_dim == 0
    expected_heads = [2, 5]  # head h = kv * 3 + slot
    assert q_rows.tolist() == [h * hd + j for h in expected_heads for j in range(hd)]
    o_dim, o_cols = slot.indices()["layers.1.self_attn.o_proj.weight"]
    assert o_dim == 1 and o_cols.tolist() == q_rows.tolist()
    kv = next(g for g in groups if g.kind == KV_GROUP and g.layer == 0 and g.index == 1)
    idx = kv.indices()
    assert idx["layers.0.self_attn.k_proj.weight"][1].tolist() == list(range(hd, 2 * hd))
    assert idx["layers.0.self_attn.q_proj.weight"][1].tolist() == list(range(3 * hd, 6 * hd))


def test_zero_and_zero_mask_round_trip():
    model = AutoModel.from_config(tiny_config("llama"))
    groups = build_groups(model)
    assert not groups.zero_mask().any()
    chosen = [0, 5, len(groups) - 1]
    groups.zero_(model, chosen)
    mask = groups.zero_mask()
    assert mask.nonzero().squeeze(1).tolist() == chosen
    for index in chosen:
        params = dict(model.named_parameters())
        for name, (dim, rows) in groups[index].indices().items():
            assert params[name].index_select(dim, rows).abs().max().item() == 0.0


def test_meta_device_and_filters():
    config = tiny_config("llama")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups = build_groups(model, kinds=[MLP_CHANNEL], layers=[1])
    assert [(b.layer, b.kind) for b in groups.blocks] == [(1, MLP_CHANNEL)]
    assert groups.param_names[0] == "model.layers.1.mlp.gate_proj.weight"


def test_bad_inputs():
    olmo2 = Olmo2Config(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32, vocab_size=64
    )
    # Outside the table: the layout is inferred and checked; OLMo-2's q/k norms span all heads, so only MLP channels.
    assert {b.kind for b in build_groups(AutoModel.from_config(olmo2)).blocks} == {MLP_CHANNEL}
    mamba = MambaConfig(num_hidden_layers=1, hidden_size=32, vocab_size=64)
    with pytest.raises(
        ValueError,
        match=r"hf_hesso cannot prune `model_type` 'mamba' \(MambaModel\): hf_hesso cannot infer a layout .*not "
        r"recognised: no attention or MLP sublayer: a recurrent model .*'num_attention_heads'",
    ):
        build_groups(AutoModel.from_config(mamba))
    model = AutoModel.from_config(tiny_config("bert"))
    with pytest.raises(ValueError, match=r"`kinds` contains unknown kinds \['heads'\]"):
        build_groups(model, kinds=["heads"])
    with pytest.raises(ValueError, match=r"`layers` contains 7, but the model has 2 layers"):
        build_groups(model, layers=[7])
    groups = build_groups(model)
    other = AutoModel.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match="name parameters that `model` does not have"):
        groups.parameters(other)


def test_a_model_without_a_transformers_config_is_refused_with_the_fix():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8)

    for model, has in ((Tiny(), "no `config`"), (torch.nn.Linear(3, 3), "no `config`")):
        with pytest.raises(
            TypeError, match=rf"{type(model).__name__} has {has}\. Pass a transformers `PreTrainedModel`"
        ):
            build_groups(model)
    model = Tiny()
    model.config = {"hidden_size": 8}  # a dict, not a transformers config
    with pytest.raises(TypeError, match=r"Tiny has a `config` without `model_type`.*`PreTrainedModel`"):
        build_groups(model)


def test_empty_group_set():
    groups = build_groups(AutoModel.from_config(tiny_config("llama")), kinds=[HEAD])
    assert len(groups) == 0 and groups.numel.numel() == 0 and groups.layers().numel() == 0
    assert groups.zero_mask().numel() == 0
