"""Tiny random configs of every family of the layout table (shared by the architecture and depth tests)."""

from __future__ import annotations

import torch
import transformers
from fixtures import DECODER, tiny_batch, tiny_model

from hf_hesso.groups import (
    EXPERT_CHANNEL,
    HEAD,
    KV_GROUP,
    MLP_CHANNEL,
    QUERY_SLOT,
    SHARED_EXPERT_CHANNEL,
)

_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)

# model_type -> (config factory, Auto class of the tested head, kinds expected in every layer).
GQA = {KV_GROUP, QUERY_SLOT}
FAMILIES = {
    "smollm3": (lambda: transformers.SmolLM3Config(**DECODER), "AutoModelForCausalLM", GQA | {MLP_CHANNEL}),
    # head_dim 32 with hidden 64 and 4 heads: the head size is independent of hidden / heads.
    "gemma2": (
        lambda: transformers.Gemma2Config(
            **DECODER,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
        "AutoModelForCausalLM",
        GQA | {MLP_CHANNEL},
    ),
    "gemma3_text": (
        lambda: transformers.Gemma3TextConfig(**DECODER, head_dim=32, query_pre_attn_scalar=32, sliding_window=4),
        "AutoModelForCausalLM",
        GQA | {MLP_CHANNEL},
    ),
    "starcoder2": (
        lambda: transformers.Starcoder2Config(**DECODER, use_bias=True, sliding_window=8),
        "AutoModelForCausalLM",
        GQA | {MLP_CHANNEL},
    ),
    "phi": (
        lambda: transformers.PhiConfig(**DECODER, qk_layernorm=True, partial_rotary_factor=0.5),
        "AutoModelForCausalLM",
        GQA | {MLP_CHANNEL},
    ),
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(
            **{k: v for k, v in DECODER.items() if k != "num_key_value_heads"},
            rotary_pct=0.5,
            use_parallel_residual=True,
            attention_bias=True,
        ),
        "AutoModelForCausalLM",
        {HEAD, MLP_CHANNEL},
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=128,
            n_embd=64,
            n_head=4,
            n_layer=2,
            n_inner=96,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "AutoModelForCausalLM",
        {HEAD, MLP_CHANNEL},
    ),
    "mixtral": (
        lambda: transformers.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2),
        "AutoModelForCausalLM",
        GQA | {EXPERT_CHANNEL},
    ),
    "qwen2_moe": (
        lambda: transformers.Qwen2MoeConfig(**DECODER, **_MOE, shared_expert_intermediate_size=80),
        "AutoModelForCausalLM",
        GQA | {EXPERT_CHANNEL, SHARED_EXPERT_CHANNEL},
    ),
    "qwen3_moe": (
        lambda: transformers.Qwen3MoeConfig(**DECODER, **_MOE, head_dim=16, norm_topk_prob=True),
        "AutoModelForCausalLM",
        GQA | {EXPERT_CHANNEL},
    ),
    "deberta-v2": (
        lambda: transformers.DebertaV2Config(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
            relative_attention=True,
            pos_att_type=["c2p", "p2c"],
            share_att_key=False,
            position_buckets=8,
        ),
        "AutoModelForMaskedLM",
        {HEAD, MLP_CHANNEL},
    ),
    "modernbert": (
        lambda: transformers.ModernBertConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
            local_attention=8,
            attention_bias=True,
            mlp_bias=True,
        ),
        "AutoModelForMaskedLM",
        {HEAD, MLP_CHANNEL},
    ),
}
ENCODERS = {"deberta-v2", "modernbert"}
# Families whose stock config stores the head size (to_stock can express removed heads); not Phi with
# `qk_layernorm=True`, whose LayerNorm size is `hidden_size // num_attention_heads`.
STOCK_HEADS = {"smollm3", "gemma2", "gemma3_text", "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe"}


def make(name: str, seed: int = 0):
    """The tiny model of family `name` with the tested head, random biases and norm weights, in eval mode."""
    factory, auto, _ = FAMILIES[name]
    return tiny_model(name, auto, seed, config=factory(), perturb=0.1, eval_mode=True)


def batch_for(name: str):
    return tiny_batch("bert" if name in ENCODERS else "llama")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits
