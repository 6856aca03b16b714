"""GGUF export: llama.cpp runs the exported file with the log-probabilities and greedy tokens of transformers.

Fast tests on tiny random models (uneven -> `deci`, uniform -> the family's own architecture) run in seconds; the
llama.cpp round trips need the prebuilt `xllamacpp` wheel (`pip install -e ".[llamacpp-test]"`, which the README's
test command installs) and fail without it, naming the extra (`HF_HESSO_SKIP_LLAMA_CPP=1` skips them instead). The real
SmolLM2 round trips are in `test_gguf_smollm2.py`.

Tolerances (max |log-probability difference| over the whole vocabulary at all positions of three prompts; the tiny
models' logits are of size ~2): f32 export with a float32 KV cache 1e-4 (measured 0.5-1.9e-6 for every family:
llama.cpp sums in another order); f16 export with llama.cpp's default f16 KV cache 2e-2 (measured 1.6-2.1e-3:
weights rounded to half precision).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from fixtures import tiny_config
from gguf_helpers import (
    F16_ATOL,
    F32_ATOL,
    PROMPTS,
    Q8_0_ATOL,
    ROOT,
    SKIP_LLAMA_CPP_ENV,
    UNEVEN,
    gguf_model,
    hf_greedy,
    hf_logprobs,
    llama_cpp_model,
    max_diff,
    read,
    require_llama_cpp,
    tiny_tokenizer,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_hesso import export_gguf
from hf_hesso.export.card import PruningReport, render_model_card
from hf_hesso.export.gguf import GgufLayer, _permute_rope_rows, gguf_plan
from hf_hesso.modeling.architectures import LayerShape

gguf = pytest.importorskip("gguf", reason="GGUF export needs `pip install hf_hesso[gguf]`")
VOCAB = 128  # tiny_tokenizer()'s


def test_plan_picks_the_architecture_llama_cpp_runs():
    same = [GgufLayer(4, 2, 96)] * 3
    uneven = [GgufLayer(4, 2, 96), GgufLayer(2, 1, 40), GgufLayer(4, 2, 8)]
    assert gguf_plan("llama", same, 64, 16) == "llama"
    assert gguf_plan("hesso_mistral", same, 64, 16) == "llama"
    assert gguf_plan("hesso_llama", uneven, 64, 16) == "deci"
    assert gguf_plan("qwen2", same, 64, 16) == "qwen2"
    # qwen2's graph needs heads x head_dim == hidden size: fewer heads go through deci.
    assert gguf_plan("hesso_qwen2", [GgufLayer(2, 1, 96)] * 3, 64, 16) == "deci"
    assert gguf_plan("hesso_qwen3", same, 64, 16) == "qwen3"
    # Removed sublayers (0) are per-layer shapes too.
    assert gguf_plan("hesso_llama", [GgufLayer(4, 2, 96), GgufLayer(0, 0, 96), GgufLayer(4, 2, 0)], 64, 16) == "deci"


@pytest.mark.parametrize(
    "model_type, layers, match",
    [
        ("hesso_qwen3", [GgufLayer(4, 2, 96), GgufLayer(2, 1, 96)], "q_norm"),
        ("hesso_llama", [GgufLayer(0, 0, 96), GgufLayer(2, 1, 96)], "Layer 0 has no attention"),
        ("bert", [GgufLayer(4, 4, 96)], "supports the model types"),
        ("hesso_llama", [GgufLayer(3, 2, 96)], "multiple of the key/value heads"),
    ],
)
def test_plan_refuses_with_the_reason(model_type, layers, match):
    with pytest.raises(ValueError, match=match):
        gguf_plan(model_type, layers, 64, 16)


def test_permutation_turns_half_rotation_into_pair_rotation():
    """RoPE on halves (transformers) of x equals RoPE on consecutive pairs (llama.cpp) of the permuted x."""
    head_dim, heads = 8, 3
    x = torch.randn(heads * head_dim, 5)
    angle = torch.rand(head_dim // 2) * 3
    cos, sin = angle.cos(), angle.sin()

    def halves(v):  # per head: (a, b) = (v[:d/2], v[d/2:]) rotated pairwise (a_i, b_i)
        v = v.reshape(heads, 2, head_dim // 2, -1)
        a, b = v[:, 0], v[:, 1]
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.stack([a * c - b * s, a * s + b * c], 1).reshape(heads * head_dim, -1)

    def pairs(v):  # per head: (v[2i], v[2i+1]) rotated
        v = v.reshape(heads, head_dim // 2, 2, -1)
        a, b = v[:, :, 0], v[:, :, 1]
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.stack([a * c - b * s, a * s + b * c], 2).reshape(heads * head_dim, -1)

    torch.testing.assert_close(_permute_rope_rows(halves(x), head_dim), pairs(_permute_rope_rows(x, head_dim)))
    bias = torch.randn(heads * head_dim)
    assert torch.equal(_permute_rope_rows(bias, head_dim), _permute_rope_rows(bias[:, None], head_dim)[:, 0])


def test_uneven_file_records_per_layer_sizes_and_tokenizer(tmp_path):
    model = gguf_model("llama", UNEVEN)
    tok = tiny_tokenizer()
    result = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tok)
    assert result.architecture == "deci"
    assert result.layers == [GgufLayer(4, 2, 72), GgufLayer(2, 1, 40)]
    fields, tensors = read(result.path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [4, 2]
    assert fields["deci.attention.head_count_kv"] == [2, 1]
    assert fields["deci.feed_forward_length"] == [72, 40]
    assert fields["deci.attention.key_length"] == 16 and fields["deci.rope.dimension_count"] == 16
    assert fields["deci.rope.freq_base"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert fields["deci.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    # Tied embeddings: no output.weight, llama.cpp reuses token_embd.
    assert "output.weight" not in tensors
    # GGUF lists dims innermost first: (in, out).
    assert tensors["blk.1.attn_q.weight"] == ((64, 32), "F32")
    assert tensors["blk.1.attn_k.weight"] == ((64, 16), "F32")
    assert tensors["blk.1.ffn_down.weight"] == ((40, 64), "F32")
    assert tensors["token_embd.weight"] == ((64, 128), "F32")
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 128
    assert fields["tokenizer.ggml.tokens"][:3] == ["<pad>", "<s>", "</s>"]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert fields["tokenizer.ggml.merges"][0] == "Ġ t"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.padding_token_id"] == 0
    assert fields["tokenizer.chat_template"] == tok.chat_template


def test_uniform_untied_mistral_writes_the_llama_architecture(tmp_path):
    model = gguf_model("mistral", [UNEVEN[1], UNEVEN[1]])
    with pytest.warns(UserWarning, match="sliding window of 16"):
        result = export_gguf(model, tmp_path / "m.gguf", "f16", tokenizer=tiny_tokenizer())
    assert result.architecture == "llama"
    fields, tensors = read(result.path)
    assert fields["llama.attention.head_count"] == 2 and fields["llama.feed_forward_length"] == 40
    assert tensors["output.weight"] == ((64, 128), "F16")
    assert tensors["blk.0.attn_norm.weight"][1] == "F32"


def test_q8_0_pads_mlp_widths_with_zero_channels(tmp_path):
    model = gguf_model("llama", UNEVEN)
    result = export_gguf(model, tmp_path / "m.gguf", "q8_0", tokenizer=tiny_tokenizer())
    fields, tensors = read(result.path)
    # 72 and 40 channels become 96 and 64: ffn_down's rows (the MLP width) are whole Q8_0 blocks of 32.
    assert fields["deci.feed_forward_length"] == [96, 64]
    assert tensors["blk.0.ffn_down.weight"] == ((96, 64), "Q8_0")
    assert tensors["blk.1.ffn_gate.weight"] == ((64, 64), "Q8_0")
    assert tensors["blk.0.attn_q.weight"][1] == "Q8_0"
    assert any("padded with 48 all-zero channels" in note for note in result.notes)


def test_llama_cpp_q8_0_with_padded_mlp_matches_transformers(tmp_path):
    model = gguf_model("llama", UNEVEN)
    result = export_gguf(model, tmp_path / "m.gguf", "q8_0", tokenizer=tiny_tokenizer())
    llm = llama_cpp_model(result.path, f32_cache=False)
    for ids in PROMPTS:
        diff = max_diff(llm.logprobs(ids, VOCAB), hf_logprobs(model, ids))
        assert diff < Q8_0_ATOL, f"prompt {ids}: max |log-probability diff| {diff:.2e}"


def test_bf16(tmp_path):
    result = export_gguf(gguf_model("llama"), tmp_path / "m.gguf", "bf16", tokenizer=tiny_tokenizer())
    _, tensors = read(result.path)
    assert tensors["blk.0.attn_q.weight"][1] == "BF16"
    assert result.architecture == "llama"


def test_refusals_name_the_reason(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        export_gguf(gguf_model("llama"), tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="choose one of f32, f16, bf16, q8_0"):
        export_gguf(gguf_model("llama"), tmp_path / "a.gguf", "q4_0", tokenizer=tok)
    uneven_qwen3 = gguf_model("qwen3", UNEVEN)
    with pytest.raises(ValueError, match="no query/key norm"):
        export_gguf(uneven_qwen3, tmp_path / "a.gguf", tokenizer=tok)
    bert = transformers.BertForMaskedLM(tiny_config("bert"))
    with pytest.raises(ValueError, match="supports the model types"):
        export_gguf(bert, tmp_path / "a.gguf", tokenizer=tok)
    # A byte-fallback (SentencePiece-style) vocabulary without the 256 byte tokens llama.cpp needs.
    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], byte_fallback=True, unk_token="<unk>"))
    with pytest.raises(ValueError, match="has 0 of the 256 byte tokens"):
        export_gguf(gguf_model("llama"), tmp_path / "a.gguf", tokenizer=PreTrainedTokenizerFast(tokenizer_object=spm))
    with pytest.raises(ValueError, match="no known llama.cpp name"):
        odd = tiny_tokenizer()
        odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        export_gguf(gguf_model("llama"), tmp_path / "a.gguf", tokenizer=odd)
    assert not list(tmp_path.iterdir())  # nothing half-written


def _tree(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_output_path_never_overwrites_a_file_it_did_not_write(tmp_path):
    ckpt = tmp_path / "slim"
    gguf_model("llama", UNEVEN).save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    checkpoint = _tree(ckpt)
    (tmp_path / "link.gguf").symlink_to(ckpt / "model.safetensors")
    (tmp_path / "user.gguf").write_bytes(b"GGUF from another tool")
    # What the export reads: refused before anything is loaded or written.
    for out in (ckpt / "model.safetensors", str(ckpt) + "/model.safetensors", ckpt / "config.json"):
        with pytest.raises(ValueError, match=r"is inside the checkpoint folder the export reads .*not `\.gguf`"):
            export_gguf(ckpt, out, "f32")
    with pytest.raises(ValueError, match=r"link\.gguf' \(which resolves to .*model\.safetensors'\) is inside the"):
        export_gguf(ckpt, tmp_path / "link.gguf", "f32")
    with pytest.raises(ValueError, match=r"is the checkpoint folder the export reads\. Pass a file path"):
        export_gguf(ckpt, ckpt, "f32")
    # Any file the export did not write, whatever its name, and from a model object too.
    for source, kwargs in ((ckpt, {}), (gguf_model("llama", UNEVEN), {"tokenizer": tiny_tokenizer()})):
        with pytest.raises(FileExistsError, match=r"user\.gguf' already exists and was not written by `export_gguf`"):
            export_gguf(source, tmp_path / "user.gguf", "f32", **kwargs)
    assert _tree(ckpt) == checkpoint and (tmp_path / "user.gguf").read_bytes() == b"GGUF from another tool"
    assert (tmp_path / "link.gguf").is_symlink()
    # A GGUF of its own is replaced (a new export of the same model), beside the checkpoint or inside it.
    first = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert read(first.path)[0]["hf_hesso.writer"] == "hf_hesso export_gguf"
    second = export_gguf(ckpt, tmp_path / "m.gguf", "f16")
    assert read(second.path)[1]["blk.0.attn_q.weight"][1] == "F16"
    export_gguf(ckpt, ckpt / "model.gguf", "f32")
    assert {k: v for k, v in _tree(ckpt).items() if k != "model.gguf"} == checkpoint


@pytest.mark.slow
def test_imports_without_gguf_and_names_the_extra():
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "import hf_hesso\n"
        "try:\n    hf_hesso.export_gguf(None, 'x.gguf')\n"
        "except ImportError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install hf_hesso[gguf]" in out.stdout


@pytest.mark.slow
def test_command_line_exports_a_saved_slim_folder(tmp_path):
    model = gguf_model("llama", UNEVEN)
    model.save_pretrained(tmp_path / "slim")
    tiny_tokenizer().save_pretrained(tmp_path / "slim")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_hesso.export.gguf",
            str(tmp_path / "slim"),
            str(tmp_path / "o.gguf"),
            "--dtype",
            "f32",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "architecture deci (per-layer sizes), 2 layers, dtype f32" in out.stdout
    fields, _ = read(tmp_path / "o.gguf")
    assert fields["deci.feed_forward_length"] == [72, 40]


# ---------------------------------------------------------------------------------------------------------------
# Round trips through llama.cpp
# ---------------------------------------------------------------------------------------------------------------


def test_missing_llama_cpp_fails_unless_skipping_is_asked_for(monkeypatch):
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # `import xllamacpp` raises ImportError
    monkeypatch.delenv(SKIP_LLAMA_CPP_ENV, raising=False)
    with pytest.raises(
        pytest.fail.Exception, match=r'pip install -e "\.\[llamacpp-test\]".*HF_HESSO_SKIP_LLAMA_CPP=1'
    ):
        require_llama_cpp()
    with pytest.raises(pytest.fail.Exception):
        llama_cpp_model(ROOT / "no.gguf")
    monkeypatch.setenv(SKIP_LLAMA_CPP_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match="xllamacpp is not installed"):
        require_llama_cpp()


def test_the_test_command_installs_the_pinned_llama_cpp_wheel():
    """The README's test command (and so CI) installs the extra whose absence fails the round trips above."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.endswith("python -m pytest -q"))
    assert "llamacpp-test" in re.search(r'-e "\.\[([^\]]*)\]"', command).group(1).split(",")
    assert command in (ROOT / ".ci" / "run").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^llamacpp-test = \["xllamacpp==[0-9.]+"\]$', pyproject, flags=re.M), "pin one xllamacpp wheel"


ROUND_TRIPS = [
    ("llama", UNEVEN, "deci"),
    ("llama", None, "llama"),
    ("llama_mha", [{"num_attention_heads": 3, "num_key_value_heads": 3, "intermediate_size": 50}] * 2, "llama"),
    ("qwen2", UNEVEN, "deci"),
    ("qwen2", None, "qwen2"),
    ("qwen3", [UNEVEN[1], UNEVEN[1]], "qwen3"),
    ("mistral", UNEVEN, "deci"),
]


@pytest.mark.filterwarnings("ignore:transformers limits attention to a sliding window")  # asserted in its own test
@pytest.mark.parametrize(
    "name, shapes, arch", ROUND_TRIPS, ids=[f"{n}-{a}-{'slim' if s else 'stock'}" for n, s, a in ROUND_TRIPS]
)
def test_llama_cpp_matches_transformers_f32(tmp_path, name, shapes, arch):
    model = gguf_model(name, shapes)
    result = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tiny_tokenizer())
    assert result.architecture == arch
    llm = llama_cpp_model(result.path)
    for ids in PROMPTS:
        diff = max_diff(llm.logprobs(ids, VOCAB), hf_logprobs(model, ids))
        assert diff < F32_ATOL, f"prompt {ids}: max |log-probability diff| {diff:.2e}"
    # 8 prompt + 8 new tokens: within the tiny Mistral sliding window of 16 positions.
    assert llm.greedy(PROMPTS[0], 8) == hf_greedy(model, PROMPTS[0], 8)


def test_llama_cpp_matches_transformers_f16(tmp_path):
    model = gguf_model("llama", UNEVEN)
    result = export_gguf(model, tmp_path / "m.gguf", "f16", tokenizer=tiny_tokenizer())
    llm = llama_cpp_model(result.path, f32_cache=False)
    for ids in PROMPTS:
        diff = max_diff(llm.logprobs(ids, VOCAB), hf_logprobs(model, ids))
        assert diff < F16_ATOL, f"prompt {ids}: max |log-probability diff| {diff:.2e}"
    assert llm.greedy(PROMPTS[0], 8) == hf_greedy(model, PROMPTS[0], 8)


def test_llama_cpp_tokenizes_like_transformers(tmp_path):
    tok = tiny_tokenizer()
    result = export_gguf(gguf_model("llama"), tmp_path / "m.gguf", "f32", tokenizer=tok)
    llm = llama_cpp_model(result.path)
    for text in ["the cat sat", "Hello there, in the sun!", "a  b"]:
        assert llm.tokenize(text, special=False) == tok(text, add_special_tokens=False)["input_ids"]
    props = llm.props()
    assert (props["bos_token"], props["eos_token"]) == ("<s>", "</s>")
    assert llm.tokenize("<s></s>", special=True) == [1, 2]
    assert props["chat_template"] == tok.chat_template


def test_json_of_result_is_plain(tmp_path):
    result = export_gguf(gguf_model("llama"), tmp_path / "m.gguf", "f16", tokenizer=tiny_tokenizer())
    assert json.loads(json.dumps(result.tensor_types)) == result.tensor_types
    assert result.tensor_types["F16"] == 2 * 7 + 1  # 7 projections per layer + token_embd (tied: no output)


def test_model_card_shows_the_export_command_for_the_families_it_writes():
    report = PruningReport("base", "m", 10, 8, [LayerShape(4, 2, 8)], [LayerShape(2, 1, 8)], model_type="hesso_llama")
    card = render_model_card(report)
    assert "hf-hesso-gguf <this folder> model.gguf --dtype f16" in card and "llama.cpp" in card
    assert "to_stock" in card
    assert "`deci`" in card
    report.model_type = "hesso_gemma2"
    card = render_model_card(report)
    assert "hf-hesso-gguf" in card and "every layer must keep the same shape" in card and "`deci`" not in card
    report.model_type = "hesso_bert"
    assert "hf-hesso-gguf" not in render_model_card(report)
