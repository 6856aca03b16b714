"""Tiny models of every supported family, built from configs in code (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

_DECODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_ENCODER = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
)

# name -> config factory. One entry per family variant the tests cover.
TINY_CONFIGS = {
    "bert": lambda: BertConfig(**_ENCODER),
    "llama": lambda: LlamaConfig(**_DECODER, tie_word_embeddings=True),
    "llama_mha": lambda: LlamaConfig(**{**_DECODER, "num_key_value_heads": 4}),
    "mistral": lambda: MistralConfig(**_DECODER, sliding_window=16),
    "qwen2": lambda: Qwen2Config(**_DECODER),
    "qwen3": lambda: Qwen3Config(**_DECODER, head_dim=16),
    "roberta": lambda: RobertaConfig(**{**_ENCODER, "pad_token_id": 1}),
}
DECODERS = ["llama", "llama_mha", "mistral", "qwen2", "qwen3"]
ENCODERS = ["bert", "roberta"]


def tiny_config(name: str, **overrides):
    config = TINY_CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_batch(name: str, batch: int = 3, seq: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch with a padded row (left padding for decoders, right padding for encoders)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if name in ENCODERS:
        mask[-1, seq - 4 :] = 0
    else:
        mask[-1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
