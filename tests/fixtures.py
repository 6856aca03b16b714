"""The tests' tiny configs, models, tokenizer and datasets, defined once (built in code: no downloads).

- `TINY_CONFIGS` / `tiny_config(name)`: one tiny config per family variant the core tests cover (`DECODERS`,
  `ENCODERS`); `DECODER` is the decoder config dict that other families' tiny configs start from
  (`tests/arch_families.py`).
- `tiny_model(name, head)`: the one tiny-model factory (seeded, any head, optional random biases and norm weights).
- `tiny_batch(name)`: a padded batch; `tiny_tokenizer()`: a word-level tokenizer over the tiny vocabulary;
  `lm_dataset()` / `cls_dataset()`: random datasets a tiny model can train on; `hesso_args(dir)`: a short
  `HESSOConfig` run (2 warm-up steps, 2 periods of 4 steps, 4 steps after pruning).
"""

from __future__ import annotations

import torch
import transformers
from datasets import Dataset
from transformers import BertConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, RobertaConfig

VOCAB = 128

DECODER = dict(
    vocab_size=VOCAB,
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
ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
)

# name -> config factory. One entry per family variant the tests cover.
TINY_CONFIGS = {
    "bert": lambda: BertConfig(**ENCODER),
    "llama": lambda: LlamaConfig(**DECODER, tie_word_embeddings=True),
    "llama_mha": lambda: LlamaConfig(**{**DECODER, "num_key_value_heads": 4}),
    "mistral": lambda: MistralConfig(**DECODER, sliding_window=16),
    "qwen2": lambda: Qwen2Config(**DECODER),
    "qwen3": lambda: Qwen3Config(**DECODER, head_dim=16),
    "roberta": lambda: RobertaConfig(**{**ENCODER, "pad_token_id": 1}),
}
DECODERS = ["llama", "llama_mha", "mistral", "qwen2", "qwen3"]
ENCODERS = ["bert", "roberta"]
# Class-name prefix of every family in TINY_CONFIGS (`"Llama" + "ForCausalLM"`).
PREFIX = {
    "bert": "Bert",
    "roberta": "Roberta",
    "llama": "Llama",
    "llama_mha": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}


def tiny_config(name: str, **overrides):
    config = TINY_CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(
    name: str = "llama",
    head: str | None = None,
    seed: int = 0,
    *,
    config=None,
    perturb: float = 0.0,
    eval_mode: bool = False,
    **overrides,
):
    """A tiny random model, seeded with `seed`.

    Args:
        name (`str`): a key of `TINY_CONFIGS` (its config, with `overrides` set on it), or any name when `config`
            is given.
        head (`str`, *optional*): a transformers class name (`"LlamaForCausalLM"`, `"AutoModelForMaskedLM"`) or,
            starting with `"For"` or equal to `"Model"`, the head of the family's class (`PREFIX[name] + head`).
            Default: `AutoModelForCausalLM` for decoders, `AutoModelForSequenceClassification` with 2 labels for
            encoders.
        config (`PretrainedConfig`, *optional*): the config to build instead of `tiny_config(name)`.
        perturb (`float`, *optional*): adds `perturb * randn` to every bias and norm weight, so that a wrongly kept or
            dropped row shows in the outputs.
        eval_mode (`bool`, *optional*): return the model in eval mode (else as built: training mode).
    """
    torch.manual_seed(seed)
    if config is None:
        config = tiny_config(name, **overrides)
    if head is None:
        if name in ENCODERS:
            config.num_labels = 2
            head = "AutoModelForSequenceClassification"
        else:
            head = "AutoModelForCausalLM"
    elif head == "Model" or head.startswith("For"):
        head = PREFIX[name] + head
    cls = getattr(transformers, head)
    model = cls.from_config(config) if head.startswith("Auto") else cls(config)
    if perturb:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname:
                    p.add_(torch.randn_like(p) * perturb)
    return model.eval() if eval_mode else model


def tiny_batch(name: str, batch: int = 3, seq: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch with a padded row (left padding for decoders, right padding for encoders)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if name in ENCODERS:
        mask[-1, seq - 4 :] = 0
    else:
        mask[-1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_tokenizer():
    """A word-level tokenizer over `t3 ... t127` built in code (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>")


def lm_dataset(n: int = 64, seq: int = 12, seed: int = 0) -> Dataset:
    """Random token ids, no padding (every micro-batch then holds the same number of label tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": ids.tolist()})


def cls_dataset(n: int = 64, seq: int = 12, seed: int = 0) -> Dataset:
    """Two classes that a tiny model can learn: label 1 iff token 5 occurs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (n, seq), generator=g)
    labels = torch.arange(n) % 2
    ids[labels == 1, 3] = 5
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels.tolist()})


def hesso_args(output_dir: str, **overrides):
    """A short run: 2 warm-up steps, 2 periods of 4 steps, 4 steps after pruning."""
    from hf_hesso.config import HESSOConfig

    kwargs = dict(
        output_dir=output_dir,
        max_steps=14,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        target_group_sparsity=0.4,
        start_pruning_step=2,
        pruning_periods=2,
        pruning_steps=8,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return HESSOConfig(**kwargs)
