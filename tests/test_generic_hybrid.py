"""The generic path on hybrid and latent-attention model types (issue 21): layouts are inferred per layer, so a model
whose layers mix attention with Mamba mixers (Jamba) has its attention pruned where it exists and every other layer
left as it is; a model with multi-head latent attention (DeepSeek-V3) has its MLP and experts pruned and its attention
excluded with the reason. Slim models are exact and load in a fresh process (logits and cached generation)."""

from __future__ import annotations

import pytest
import torch
import transformers
from fixtures import DECODER, tiny_batch
from fresh_process import run_fresh

from hf_hesso import build_groups, check_architecture, save_slim, slim_model
from hf_hesso.groups import ATTENTION_SUBLAYER, EXPERT_CHANNEL, HEAD, KV_GROUP, MLP_CHANNEL, MLP_SUBLAYER, QUERY_SLOT
from hf_hesso.modeling.architectures import LAYOUT_KEY

# The tiny decoder's sizes; each config below sets its own key/value heads.
_SIZES = {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}
CONFIGS = {
    # Layer 0: Mamba mixer and a dense MLP; layer 1: attention (grouped-query) and routed experts.
    "jamba": lambda: transformers.JambaConfig(
        **_SIZES,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=8,
        use_mamba_kernels=False,
    ),  # fmt: skip
    # Multi-head latent attention in both layers; layer 0 a dense MLP, layer 1 routed experts (and a shared one).
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_SIZES,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        head_dim=8,
        v_head_dim=16,
    ),  # fmt: skip
}


def make(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()


pytestmark = pytest.mark.usefixtures("fresh_layout_table")


def _prune_and_ship(model, tmp_path, kinds):
    """Zero some groups of every block, slim, and check the slim model against the masked dense one, here and in a
    fresh process (logits and cached greedy generation)."""
    groups = build_groups(model, kinds=kinds)
    groups.zero_(model, [b.offset + (i % b.n) for i, b in enumerate(groups.blocks) if b.n > 1])
    batch = tiny_batch("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    slim_model(model, groups)
    with torch.no_grad():
        got = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=True)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-5)
    save_slim(model, tmp_path / "slim")
    torch.save(batch, tmp_path / "batch.pt")
    job = {"dir": str(tmp_path / "slim"), "auto": "AutoModelForCausalLM", "remote": True,
           "batch": str(tmp_path / "batch.pt"), "impls": ["eager"], "generate": 4}  # fmt: skip
    fresh = run_fresh([job], tmp_path)[job["dir"]]
    torch.testing.assert_close(fresh["logits_eager"][keep], got[keep], rtol=0, atol=1e-5)
    assert torch.equal(fresh["generate_eager"], generated)
    return groups


@pytest.mark.slow
def test_hybrid_layers_are_inferred_per_layer(tmp_path):
    model = make("jamba")
    layers = model.model.layers
    assert not hasattr(layers[0], "self_attn") and hasattr(layers[1], "self_attn")  # attention in layer 1 only
    report = check_architecture(model)
    assert report.error is None and not report.in_table
    assert report.exact_kinds == [MLP_CHANNEL, KV_GROUP, QUERY_SLOT, EXPERT_CHANNEL, ATTENTION_SUBLAYER, MLP_SUBLAYER]
    assert report.absent == ["the attention of layers 0 of 2 (not of the layout's form)"]
    assert report.layout.attention.module == "self_attn"
    groups = build_groups(model)
    by_layer = {(b.layer, b.kind) for b in groups.blocks}
    assert by_layer == {(0, MLP_CHANNEL), (1, KV_GROUP), (1, QUERY_SLOT), (1, EXPERT_CHANNEL)}
    mamba = {k: v.clone() for k, v in layers[0].mamba.state_dict().items()}

    _prune_and_ship(model, tmp_path, None)
    after = model.model.layers[0].mamba.state_dict()
    assert all(torch.equal(after[k], v) for k, v in mamba.items())  # the Mamba mixer is left exactly as it was
    assert model.model.layers[1].self_attn.k_proj.out_features < 2 * 16
    config = model.config.to_dict()
    assert config[LAYOUT_KEY]["attention"]["module"] == "self_attn"  # the inferred layout ships with the checkpoint


@pytest.mark.slow
def test_hybrid_attention_sublayer_removed_where_it_exists(tmp_path):
    model = make("jamba")
    groups = _prune_and_ship(model, tmp_path, [ATTENTION_SUBLAYER, MLP_SUBLAYER])
    assert {(b.layer, b.kind) for b in groups.blocks} == {
        (0, MLP_SUBLAYER),
        (1, ATTENTION_SUBLAYER),
        (1, MLP_SUBLAYER),
    }


@pytest.mark.slow
def test_latent_attention_model_has_its_mlp_and_experts_pruned(tmp_path):
    model = make("deepseek_v3")
    report = check_architecture(model)
    assert report.error is None
    kinds = {k.kind: k for k in report.kinds}
    assert report.exact_kinds == [MLP_CHANNEL, EXPERT_CHANNEL, MLP_SUBLAYER]
    for kind in (HEAD, ATTENTION_SUBLAYER):
        assert not kinds[kind].exact and "multi-head latent attention" in kinds[kind].reason
    assert report.absent == []  # no layer lacks an MLP; the attention's exclusion is said by the kinds
    attention = {k: v.clone() for k, v in model.model.layers[0].self_attn.state_dict().items()}

    groups = _prune_and_ship(model, tmp_path, None)
    assert {b.kind for b in groups.blocks} == {MLP_CHANNEL, EXPERT_CHANNEL}
    after = model.model.layers[0].self_attn.state_dict()
    assert all(torch.equal(after[k], v) for k, v in attention.items())
    assert model.model.layers[0].mlp.down_proj.in_features < 96


def test_tiny_config_keeps_one_layer_of_every_kind():
    from hf_hesso.slim.selfcheck import tiny_config

    # Qwen3-Next: three linear-attention layers, then full attention; the tiny instance keeps one of each.
    small = tiny_config(transformers.AutoConfig.for_model("qwen3_next"))
    assert small.num_hidden_layers == 2 and small.layer_types == ["linear_attention", "full_attention"]
    # Jamba: attention every 8 layers from layer 4 in the default; the tiny instance has it in layer 1.
    small = tiny_config(transformers.AutoConfig.for_model("jamba"))
    assert small.layers_block_type == ["mamba", "attention"]
    # Every kind once, in order; at most 4 layers.
    full, sliding, conv = "full_attention", "sliding_attention", "conv"
    config = transformers.LlamaConfig(num_hidden_layers=6)
    config.layer_types = [full, full, sliding, full, conv, full]
    small = tiny_config(config)
    assert small.num_hidden_layers == 3 and small.layer_types == [full, sliding, conv]


def test_tiny_config_of_default_configs_that_leave_sizes_unset():
    from hf_hesso.slim.selfcheck import tiny_config

    small = tiny_config(transformers.AutoConfig.for_model("ministral"))  # `head_dim` None in the default
    assert small.head_dim == 16
    small = tiny_config(transformers.AutoConfig.for_model("deepseek_v3"))  # latent attention: tiny ranks
    assert (small.kv_lora_rank, small.qk_rope_head_dim, small.head_dim, small.n_group) == (32, 8, 8, 1)
    # Gemma-4: per-layer overrides (`per_layer_config`) of the head size give way to the tiny sizes.
    small = tiny_config(transformers.AutoConfig.for_model("gemma4_text"))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(small)
    assert {layer.self_attn.q_proj.out_features for layer in model.model.layers} == {64}


@pytest.mark.slow
def test_hybrid_whose_model_fills_its_mixers_buffers_reloads_exactly(tmp_path):
    # Falcon-H1: `FalconH1Model._init_weights` fills every Mamba mixer's non-persistent `mup_vector` (the model itself
    # holds no tensors); the slim class must run it on load, or the mixers compute with uninitialised memory.
    from hf_hesso.slim.selfcheck import tiny_config

    config = tiny_config(transformers.AutoConfig.for_model("falcon_h1"))
    config.ssm_multipliers = [0.5, 2.0, 1.5, 0.75, 1.25]  # the mixers' input multipliers: `mup_vector` holds them
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert set(model.model.layers[0].mamba.mup_vector.unique().tolist()) == {0.5, 2.0, 1.5, 0.75, 1.25}
    _prune_and_ship(model, tmp_path, [KV_GROUP, MLP_CHANNEL])
