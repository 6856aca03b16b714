"""Model types the sweep over transformers (`benchmarks/arch_sweep.py`) found uncovered for a reason in hf_hesso: each
fix on a tiny model built here (issue 21)."""

from __future__ import annotations

import pytest
import torch
import transformers

from hf_hesso import build_groups, slim_model
from hf_hesso.groups import HEAD

pytestmark = pytest.mark.usefixtures("fresh_layout_table")


def _batch():
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def test_head_count_named_n_head_follows_the_removed_heads():
    # OpenAI GPT splits its fused projection into `attn.n_head` heads: a slim layer must count only the kept ones.
    config = transformers.OpenAIGPTConfig(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.OpenAIGPTLMHeadModel(config).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # weights large enough that the attention is far from uniform: a wrong split shows
    groups = build_groups(model, kinds=[HEAD])
    groups.zero_(model, [b.offset + 1 for b in groups.blocks])  # head 1 of every layer
    batch = _batch()
    expected = _logits(model, batch)
    slim_model(model, groups)
    assert [layer.attn.n_head for layer in model.transformer.h] == [3, 3]
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=1e-9)


def _model_type(name: str) -> str:
    """`name`, or a skip where this transformers release does not have the model type yet."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if name not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no model type {name!r} (added in a later release)")
    return name


def test_tiny_config_keeps_a_layer_of_every_section():
    # Dory: input, recurrent and output sections counted by fields of their own, which must add up to the layers.
    from hf_hesso.slim.selfcheck import tiny_config

    small = tiny_config(transformers.AutoConfig.for_model(_model_type("dory")))
    sections = (small.n_input_layers, small.n_recurrent_layers, small.n_output_layers)
    assert sum(sections) == small.num_hidden_layers <= 4 and min(sections) >= 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(small).eval()
    with torch.no_grad():
        assert model(**_batch()).logits.shape == (2, 9, small.vocab_size)


def test_tiny_config_keeps_a_layer_that_reads_another_layers_keys_and_values():
    # Kolibri: `kv_source_layers` names for every layer the layer whose keys/values it reads; `index_layers` and
    # `mlp_only_layers` list layer indices. The tiny instance keeps a reading layer and its source, renumbered.
    from hf_hesso.slim.selfcheck import tiny_config

    small = tiny_config(transformers.AutoConfig.for_model(_model_type("kolibri1_1")))
    assert small.layer_types == ["sliding_attention", "indexed_attention", "indexed_attention"]
    assert (small.kv_source_layers, small.index_layers, small.mlp_only_layers) == ([0, 1, 1], [1], [0])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(small).eval()
    with torch.no_grad():
        assert model(**_batch()).logits.shape == (2, 9, small.vocab_size)


def test_tiny_config_of_a_state_space_model_keeps_heads_times_head_size():
    # Mamba-2: heads x head size must equal expand x hidden (its validator checks it); the tiny config keeps that.
    from hf_hesso.slim.selfcheck import tiny_config

    small = tiny_config(transformers.AutoConfig.for_model("mamba2"))
    assert small.num_heads * small.head_dim == small.expand * small.hidden_size


def test_recurrent_model_is_refused_saying_so():
    model = transformers.MambaForCausalLM(transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64))
    with pytest.raises(ValueError, match=r"no attention or MLP sublayer: a recurrent model"):
        build_groups(model)
