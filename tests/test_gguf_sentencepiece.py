"""GGUF export of SentencePiece-style vocabularies (BPE with byte fallback: Llama 2, Mistral v0.1, TinyLlama, Gemma).

They are written as llama.cpp's `llama` tokenizer: tokens with scores (minus the rank of the first merge that makes
each token), token types (byte tokens `<0xNN>`, unknown, control, user-defined), `add_space_prefix`, BOS/EOS. The
tokenizers are built in code as transformers converts SentencePiece models (`spm_tokenizer`), and llama.cpp (the
`xllamacpp` wheel) must give transformers' token ids for texts with non-ASCII characters, byte fallback, repeated
spaces and newlines, and run a slim model with transformers' log-probabilities and greedy tokens.
"""

from __future__ import annotations

import json

import pytest
from gguf_helpers import (
    F32_ATOL,
    PROMPTS,
    SPM_VOCAB,
    UNEVEN,
    byte_tokens,
    gguf_model,
    hf_greedy,
    hf_logprobs,
    llama_cpp_model,
    max_diff,
    read,
    spm_tokenizer,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_hesso import export_gguf

gguf = pytest.importorskip("gguf", reason="GGUF export needs `pip install hf_hesso[gguf]`")

TEXTS = [
    "the café über",
    "naïve ñandú 中文 🙂",  # ï, ñ, ú, 中, 文 and the emoji are not in the vocabulary: UTF-8 byte tokens
    "double  spaces\nand a newline",
    "Hé—THS is the sun, and ßen!",
]


def test_sentencepiece_vocabulary_is_written_as_llama_cpp_reads_it(tmp_path):
    tok = spm_tokenizer()
    result = export_gguf(gguf_model("llama", vocab_size=SPM_VOCAB), tmp_path / "m.gguf", "f32", tokenizer=tok)
    fields, _ = read(result.path)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.ggml.pre" not in fields
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == SPM_VOCAB
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[258] == "<0xFF>"
    t = gguf.TokenType
    assert types[:3] == [t.UNKNOWN, t.CONTROL, t.CONTROL]
    assert set(types[3:259]) == {t.BYTE} and set(types[259:]) == {t.NORMAL}
    # Scores: minus the rank of the first merge that makes the token; single characters 0.
    vocab = tok.get_vocab()
    assert scores[vocab["▁t"]] == 0.0  # the first merge
    assert scores[vocab["he"]] < 0.0 and scores[vocab["▁the"]] < scores[vocab["he"]]
    assert scores[vocab["a"]] == 0.0
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    # transformers' LlamaTokenizer prepends "▁" unless the text begins with a space; llama.cpp always: a note.
    assert any("begins with a space" in note for note in result.notes)


@pytest.mark.parametrize("kind, legacy", [("llama", True), ("llama", False), ("gemma", False)])
def test_llama_cpp_tokenizes_sentencepiece_like_transformers(tmp_path, kind, legacy):
    tok = spm_tokenizer(kind, legacy=legacy)
    result = export_gguf(gguf_model("llama", vocab_size=SPM_VOCAB), tmp_path / "m.gguf", "f32", tokenizer=tok)
    assert read(result.path)[0]["tokenizer.ggml.add_space_prefix"] is (kind == "llama")
    llm = llama_cpp_model(result.path)
    # Llama 2's own form (normalizer Prepend + Replace) and Gemma's also agree on a leading space.
    texts = TEXTS + (["  two leading spaces"] if legacy or kind == "gemma" else [])
    for text in texts:
        assert llm.tokenize(text, special=False) == tok(text, add_special_tokens=False)["input_ids"], text
    bos, eos = tok.bos_token, tok.eos_token
    props = llm.props()
    assert (props["bos_token"], props["eos_token"]) == (bos, eos)
    ours = llm.tokenize(f"{bos}the{eos}", special=True)
    theirs = tok(f"{bos}the{eos}", add_special_tokens=False)["input_ids"]
    if kind == "llama" and not legacy:
        # The documented difference (a note of the export): Metaspace "first" adds no "▁" after a special token.
        vocab = tok.get_vocab()
        assert ours == [tok.bos_token_id, vocab["▁the"], tok.eos_token_id]
        assert theirs == [tok.bos_token_id, vocab["t"], vocab["he"], tok.eos_token_id]
    else:
        assert ours == theirs
    assert props["chat_template"] == tok.chat_template


def test_llama_cpp_runs_a_slim_llama_with_a_sentencepiece_vocabulary(tmp_path):
    model = gguf_model("llama", UNEVEN, vocab_size=SPM_VOCAB)
    tok = spm_tokenizer(legacy=True)
    result = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tok)
    assert result.architecture == "deci"
    llm = llama_cpp_model(result.path, hold_back=byte_tokens(tok))
    for ids in PROMPTS:
        diff = max_diff(llm.logprobs(ids, SPM_VOCAB), hf_logprobs(model, ids))
        assert diff < F32_ATOL, f"prompt {ids}: max |log-probability diff| {diff:.2e}"
    prompt = tok("the café über naïve")["input_ids"]
    assert llm.greedy(prompt, 8) == hf_greedy(model, prompt, 8)


def _byte_fallback(vocab, merges, normalizer=None, pre=None) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizer
    tk.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_what_llama_cpp_would_tokenize_differently_is_refused(tmp_path):
    model = gguf_model("llama", vocab_size=SPM_VOCAB)
    base = spm_tokenizer()
    vocab = base.get_vocab()
    merges = [tuple(m) for m in json.loads(base.backend_tokenizer.to_str())["model"]["merges"]]
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    # A merge missing: llama.cpp would still join "▁c" and "a" into the token "▁ca", transformers would not.
    lacking = [m for m in merges if m != ("▁c", "a")]
    with pytest.raises(ValueError, match=r"lacks 1 merges .*\('▁c', 'a'\)"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=_byte_fallback(vocab, lacking, pre=meta))
    # Byte tokens missing: llama.cpp cannot write unknown characters.
    few = {t: i for t, i in vocab.items() if t != "<0x41>"}
    few["<0x41>x"] = vocab["<0x41>"]
    with pytest.raises(ValueError, match="has 255 of the 256 byte tokens"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=_byte_fallback(few, merges, pre=meta))
    # Unicode normalization is not applied by llama.cpp's SentencePiece tokenizer.
    nfkc = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    with pytest.raises(ValueError, match="not one llama.cpp reproduces"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=_byte_fallback(vocab, merges, normalizer=nfkc))
    # A Metaspace that splits at every "▁", with tokens holding a "▁" inside ("▁▁").
    split = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    with pytest.raises(ValueError, match=r"hold a '▁' inside .*'▁▁'"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=_byte_fallback(vocab, merges, pre=split))
    # A Unigram vocabulary.
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0, byte_fallback=True))
    with pytest.raises(ValueError, match="Unigram and WordPiece vocabularies are not written"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=PreTrainedTokenizerFast(tokenizer_object=unigram))
    assert not list(tmp_path.iterdir())  # nothing half-written
