"""GGUF export of the Gemma family (gemma2, gemma3_text): llama.cpp's `gemma2` and `gemma3` graphs.

What the export has to match (llama.cpp's src/models/gemma2*.cpp, gemma3*.cpp and its converter): norms written as
`1 + weight` (Gemma's RMSNorm), the embedding scaled by sqrt(n_embd) inside llama.cpp (a hidden-pruned model is
corrected by scaling `token_embd` and, for the tied output, `output_norm`), the query scale 1 / sqrt(head_dim)
(`query_pre_attn_scalar` folded into the query weights or the gemma3 query norm), attention and final soft-capping
(gemma2), the sliding window on all layers but each 2nd (gemma2) or 6th (gemma3), the sliding layers' own RoPE base
and linear RoPE scaling of the full layers (gemma3), a SentencePiece-style vocabulary.

Tolerance: llama.cpp's CPU GELU reads a float16 table (`GGML_GELU_FP16`), so an f32 export differs from transformers
by more than the llama-family 1e-4: measured 6.6e-4 to 1.1e-2 in log-probability (f16 export with an f16 KV cache:
5.7e-3 to 3.1e-2); an export that gets a scale, a window or a RoPE base wrong differs by 0.3 or more (a window of 5
instead of 4: 3.0 and 5.8; the sliding layers' RoPE base 10000 instead of 500: 2.2; the query or embedding scale not
folded: 0.33 to 0.98). Greedy tokens must be equal.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from fixtures import DECODER
from gguf_helpers import (
    PROMPTS,
    SPM_VOCAB,
    byte_tokens,
    gguf_model,
    hf_greedy,
    hf_logprobs,
    llama_cpp_model,
    max_diff,
    read,
    spm_tokenizer,
)

from hf_hesso import export_gguf, slim_model
from hf_hesso.groups import HIDDEN_CHANNEL, build_groups

gguf = pytest.importorskip("gguf", reason="GGUF export needs `pip install hf_hesso[gguf]`")

GEMMA_F32_ATOL = 3e-2  # measured 6.6e-4 - 1.1e-2 (llama.cpp's float16 GELU table)
GEMMA_F16_ATOL = 0.1  # f16 weights and KV cache: measured 5.7e-3 - 3.1e-2
BASE = {**DECODER, "vocab_size": SPM_VOCAB, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
SLIM = {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 40}
TEXT = "the café über naïve ñandú"


def gemma2_config(**overrides):
    # query_pre_attn_scalar 24 != head_dim 32: the query scale is folded into the weights.
    kwargs = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=4)
    kwargs.update(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    # Eager attention: before transformers 5.25 Gemma-2 defaulted to SDPA, which skips the attention soft-capping
    # (measured: 0.53 in log-probability on this model with 5.19), so the reference would not be Gemma-2's.
    kwargs.update(attn_implementation="eager")
    return transformers.Gemma2Config(**{**BASE, **kwargs, **overrides})


def gemma3_config(**overrides):
    # 6 layers: 5 sliding, 1 full. Sliding RoPE base 500 (not llama.cpp's default 10000); full layers scaled x8.
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
    }
    kwargs = dict(num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=24, sliding_window=4, rope_parameters=rope)
    return transformers.Gemma3TextConfig(**{**BASE, **kwargs, **overrides})


CONFIGS = {"gemma2": gemma2_config, "gemma3_text": gemma3_config}


def gemma_model(family: str, slim: bool = True, **overrides):
    config = CONFIGS[family](**overrides)
    return gguf_model(family, [SLIM] * config.num_hidden_layers if slim else None, config=config)


def assert_llama_cpp_matches(model, path, tok, atol: float = GEMMA_F32_ATOL):
    f32 = atol == GEMMA_F32_ATOL
    llm = llama_cpp_model(path, f32_cache=f32, hold_back=byte_tokens(tok))
    prompt = tok(TEXT)["input_ids"]
    assert llm.tokenize(TEXT, special=False) == tok(TEXT, add_special_tokens=False)["input_ids"]
    for ids in [[tok.bos_token_id, *p[1:]] for p in PROMPTS] + [prompt]:
        diff = max_diff(llm.logprobs(ids, SPM_VOCAB), hf_logprobs(model, ids))
        assert diff < atol, f"prompt {ids}: max |log-probability diff| {diff:.2e}"
    # 12 prompt + 8 new tokens: well past the sliding window of 4.
    assert llm.greedy(prompt, 8) == hf_greedy(model, prompt, 8)


@pytest.mark.parametrize(
    "family, arch, dtype",
    [("gemma2", "gemma2", "f32"), ("gemma3_text", "gemma3", "f32"), ("gemma3_text", "gemma3", "f16")],
)
def test_llama_cpp_runs_a_slim_gemma_like_transformers(tmp_path, family, arch, dtype):
    model = gemma_model(family)
    tok = spm_tokenizer("gemma")
    result = export_gguf(model, tmp_path / "m.gguf", dtype, tokenizer=tok)
    assert result.architecture == arch
    assert any("folded into the query" in note for note in result.notes)
    # f16 weights and llama.cpp's default f16 KV cache: measured 1.2e-2 - 3.1e-2.
    assert_llama_cpp_matches(model, result.path, tok, GEMMA_F32_ATOL if dtype == "f32" else GEMMA_F16_ATOL)


def test_llama_cpp_runs_a_gemma_with_pruned_hidden_channels(tmp_path):
    """llama.cpp scales the embedding by sqrt(slim width); transformers by sqrt(original): folded into the weights."""
    model = gemma_model("gemma2", slim=False)
    groups = build_groups(model, kinds=[HIDDEN_CHANNEL])
    groups.zero_(model, torch.arange(groups.blocks[0].offset, groups.blocks[0].offset + 64, 4))
    slim_model(model, groups)
    assert model.get_input_embeddings().weight.shape[1] == 48
    tok = spm_tokenizer("gemma")
    result = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tok)
    assert any("embedding scale" in note for note in result.notes)
    assert_llama_cpp_matches(model, result.path, tok)


@pytest.mark.slow
def test_llama_cpp_runs_a_gemma2_with_the_27b_layer_count(tmp_path):
    """At 46 layers llama.cpp scales gemma2 queries by 1 / sqrt(hidden / heads) = 1/4, not 1 / sqrt(head_dim)."""
    model = gemma_model("gemma2", slim=False, num_hidden_layers=46)
    tok = spm_tokenizer("gemma")
    result = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tok)
    assert any("ratio 0.816497 is folded into the query weights" in note for note in result.notes)  # sqrt(16 / 24)
    assert_llama_cpp_matches(model, result.path, tok)


def test_exports_a_saved_slim_gemma_folder(tmp_path):
    """From the folder: the model reloaded by transformers and its SentencePiece-style tokenizer from tokenizer.json."""
    model = gemma_model("gemma2")
    tok = spm_tokenizer("gemma")
    model.save_pretrained(tmp_path / "slim")
    tok.save_pretrained(tmp_path / "slim")
    result = export_gguf(tmp_path / "slim", tmp_path / "m.gguf", "f32")
    assert result.architecture == "gemma2"
    fields, _ = read(result.path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is False
    assert_llama_cpp_matches(model, result.path, tok)


def test_gemma_file_holds_what_llama_cpp_reads(tmp_path):
    model = gemma_model("gemma3_text")
    result = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=spm_tokenizer("gemma"))
    fields, tensors = read(result.path)
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window"] == 4
    assert fields["gemma3.rope.freq_base"] == pytest.approx(1e6)
    assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(500.0)
    assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 8.0
    assert (fields["gemma3.attention.head_count"], fields["gemma3.attention.head_count_kv"]) == (2, 1)
    assert fields["gemma3.attention.key_length"] == 32 and fields["gemma3.feed_forward_length"] == 40
    assert "gemma3.attn_logit_softcapping" not in fields
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd
    assert tensors["blk.0.post_ffw_norm.weight"] == ((64,), "F32")
    assert tensors["blk.5.attn_q_norm.weight"] == ((32,), "F32")
    reader = gguf.GGUFReader(result.path)
    data = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    layer = model.model.layers[1]
    # Gemma's RMSNorm multiplies by 1 + weight: written plus one.
    assert torch.equal(data["blk.1.ffn_norm.weight"], layer.pre_feedforward_layernorm.weight.detach() + 1)
    assert torch.equal(data["blk.1.attn_k_norm.weight"], layer.self_attn.k_norm.weight.detach() + 1)
    # The query scale (24^-0.5 in the model, 32^-0.5 in llama.cpp) is folded into the query norm.
    fold = (32 / 24) ** 0.5
    torch.testing.assert_close(data["blk.1.attn_q_norm.weight"], (layer.self_attn.q_norm.weight.detach() + 1) * fold)

    gemma2 = export_gguf(gemma_model("gemma2"), tmp_path / "g2.gguf", "f32", tokenizer=spm_tokenizer("gemma"))
    fields, _ = read(gemma2.path)
    assert fields["gemma2.attn_logit_softcapping"] == 5.0 and fields["gemma2.final_logit_softcapping"] == 3.0
    assert fields["gemma2.attention.sliding_window"] == 4


def test_what_llama_cpp_gemma_graphs_cannot_run_is_refused(tmp_path):
    tok = spm_tokenizer("gemma")
    uneven = gguf_model("gemma2", [SLIM, {**SLIM, "intermediate_size": 24}], config=gemma2_config())
    cases = [
        (uneven, r"layers of different shapes .*builds every layer from layer 0's sizes"),
        (gemma_model("gemma2", attn_logit_softcapping=None), "gemma2 graph always soft-caps both"),
        (gemma_model("gemma3_text", final_logit_softcapping=20.0), "gemma3 graph soft-caps neither"),
        (gemma_model("gemma2", hidden_activation="gelu"), "GELU with the tanh approximation"),
        (
            gemma_model("gemma2", layer_types=["full_attention", "sliding_attention"]),
            r"graph fixes them to \['sliding_attention', 'full_attention'\]",
        ),
        (
            gemma_model(
                "gemma3_text",
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                    "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0},
                },
            ),
            "full-attention RoPE type is 'yarn'",
        ),
    ]
    untied = gemma_model("gemma2")
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    cases.append((untied, "not tied to the embedding"))
    for model, match in cases:
        with pytest.raises(ValueError, match=match):
            export_gguf(model, tmp_path / "a.gguf", "f32", tokenizer=tok)
    assert not list(tmp_path.iterdir())  # nothing half-written
