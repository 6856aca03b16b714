# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Every use of transformers internals in hf_hesso, in one place.

transformers' top-level API (`transformers.AutoModel`, `transformers.Trainer`, `transformers.Cache`, the stock model
and config classes, ...) is used directly everywhere. Anything else, that is, names imported from a
`transformers.*` submodule, private methods a class of hf_hesso overrides, private attributes it reads, and the
conventions of the model code it relies on (how a decoder layer hands the key/value cache to its attention), goes
through this module only. `tests/test_compat.py` has one test per touchpoint below, so that a transformers release
that changes one of them fails that named test (see docs/compatibility.md for the supported versions).

This file travels with every saved slim model (`modeling_hesso.py` imports it relatively), so it must only import
`torch`, `transformers` and the standard library.

Touchpoints:

- `Conv1D`: GPT-2's transposed linear (`transformers.pytorch_utils`), sliced like `nn.Linear` with the dimensions
  swapped.
- The key/value cache seen by a removed attention (`find_cache`, `record_tokens`): the argument that carries the cache
  into a decoder layer and its attention (`cache=` since 5.25, `past_key_values=` before, positional in some
  families), `Cache.update(keys, values, layer_idx, cache_kwargs)`, and `Cache.get_seq_length(layer_idx)`.
- `PreTrainedModel._adjust_missing_and_unexpected_keys` (`LOADING_CHECK_HOOK`): called by `from_pretrained` with the
  load report, before transformers reports mismatched shapes itself (`loading_report`).
- `PreTrainedModel._weight_conversions` (`WEIGHT_CONVERSIONS`): the checkpoint renamings transformers applies on save
  and load (fused experts <-> per-expert tensors), which a slim class switches off.
- `PretrainedConfig.__post_init__`: transformers' configs are dataclasses, and subclasses validate there.
- `_BaseAutoModelClass._model_mapping` (`auto_mapping`): the config class -> model class table of an Auto factory.
- `transformers.models.auto.modeling_auto.MODEL_*_MAPPING_NAMES` (`auto_model_names`): the model type -> class name
  tables of the Auto factories, read without importing any family.
- `PreTrainedModel._auto_class` (`auto_class_of`): the Auto class name `register_for_auto_class` recorded.
- Trainer internals used by `HESSOTrainer`: the checkpoint file names (`transformers.trainer`), the console
  callbacks (`transformers.trainer_callback`), `get_last_checkpoint` (`transformers.trainer_utils`), the private
  methods it overrides (`TRAINER_HOOKS`) and the attributes it reads (`TRAINER_ATTRIBUTES`).
"""

from __future__ import annotations

import importlib
import inspect

import torch
import transformers
from transformers.pytorch_utils import Conv1D

# (The Trainer names of `_TRAINER_NAMES` are attributes too, resolved on first use.)
__all__ = [
    "Conv1D",
    "LOADING_CHECK_HOOK",
    "TRAINER_ATTRIBUTES",
    "TRAINER_HOOKS",
    "WEIGHT_CONVERSIONS",
    "auto_class_of",
    "auto_mapping",
    "find_cache",
    "loading_report",
    "record_tokens",
]

# ---------------------------------------------------------------------------------------------------- the cache


def find_cache(args: tuple, kwargs: dict) -> transformers.Cache | None:
    """The key/value cache among the arguments of a decoder layer or attention call, or None (no cache in use).

    Found by type rather than by name: the keyword is `cache` from transformers 5.25 on and `past_key_values` before,
    and some families (GPT-2 before 5.25) pass it positionally. An encoder-decoder cache gives its self-attention part.
    """
    for value in (*kwargs.values(), *args):
        if isinstance(value, transformers.Cache):
            return getattr(value, "self_attention_cache", value)
    return None


def record_tokens(cache: transformers.Cache, layer_idx: int, hidden_states: torch.Tensor) -> None:
    """Advance cache slot `layer_idx` by the tokens of `hidden_states` (`(batch, tokens, hidden)`), storing one number
    per token.

    A removed attention computes nothing, but its slot in the cache must still count the tokens seen: transformers
    reads the length of the cache from layer 0 (`Cache.get_seq_length()` for the positions of new tokens, in the
    model's forward and in `generate`) and the mask sizes from the first layer of each attention type. A slot that
    never grows would say 0 there; a slot that stores nothing (transformers' `DummyLayer`, for layers without
    attention) has no length at all from transformers 5.25 on. So the slot holds keys and values of shape
    `(batch, 1, tokens, 1)`: for every cache class (dynamic, sliding-window, static) it then reports exactly the
    length and mask sizes a real attention layer of the same type would, at two numbers per token.
    """
    batch, tokens = hidden_states.shape[:2]
    placeholder = hidden_states.new_zeros(batch, 1, tokens, 1)
    cache.update(placeholder, placeholder, layer_idx)


# ---------------------------------------------------------------------------------------------- model loading

# Called by `from_pretrained` after the weights are loaded, with the load report (`missing_keys`, `mismatched_keys`
# as `(key, checkpoint shape, model shape)`), before transformers raises or warns about them.
LOADING_CHECK_HOOK = "_adjust_missing_and_unexpected_keys"

# The checkpoint renamings of a model class (a property; transformers reads and sets it while loading).
WEIGHT_CONVERSIONS = "_weight_conversions"


def loading_report(*args, **kwargs):
    """The load report passed to `LOADING_CHECK_HOOK`: an object with `missing_keys` (a set of names) and
    `mismatched_keys` (a set of `(name, checkpoint shape, model shape)`)."""
    (report,) = (*args, *kwargs.values())
    return report


# ---------------------------------------------------------------------------------------------- Auto factories


def auto_mapping(auto: str):
    """The config class -> model class table of the Auto factory named `auto` (`"AutoModelForCausalLM"`), read by
    key (`config_class in mapping`, `mapping[config_class]`) without importing every family."""
    return getattr(transformers, auto)._model_mapping


# The Auto classes whose name tables `auto_model_names` reads, with the table's name in
# `transformers.models.auto.modeling_auto`.
AUTO_MAPPING_NAMES = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}


def auto_model_names(auto: str, model_type: str | None) -> list[str]:
    """The class names the Auto factory `auto` (a key of `AUTO_MAPPING_NAMES`) maps `model_type` to."""
    from transformers.models.auto import modeling_auto

    value = getattr(modeling_auto, AUTO_MAPPING_NAMES[auto], {}).get(model_type)
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def auto_class_of(model_class: type) -> str | None:
    """The Auto class name (`"AutoModelForCausalLM"`) that `model_class.register_for_auto_class` recorded."""
    return model_class._auto_class


# ------------------------------------------------------------------------------------------------------ Trainer

# Names from transformers' Trainer modules, imported on first use (module `__getattr__` below): this file ships beside
# every slim model, and loading one must not import the Trainer stack (accelerate, datasets: seconds).
_TRAINER_NAMES = {
    "OPTIMIZER_NAME": "transformers.trainer",
    "OPTIMIZER_NAME_BIN": "transformers.trainer",
    "SCHEDULER_NAME": "transformers.trainer",
    "TRAINING_ARGS_NAME": "transformers.trainer",
    "PrinterCallback": "transformers.trainer_callback",
    "ProgressCallback": "transformers.trainer_callback",
    "get_last_checkpoint": "transformers.trainer_utils",
}


def __getattr__(name: str):
    module = _TRAINER_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


# Private methods of `transformers.Trainer` that `HESSOTrainer` overrides, with the parameters it calls them with.
# A release that renames one would silently skip the override: `tests/test_compat.py` checks each.
TRAINER_HOOKS = {
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "save_model": ("output_dir", "_internal_call"),
}
# Attributes of `transformers.Trainer` that `DistillationMixin.compute_loss` reads to scale its loss terms like the
# task loss (`loss_is_scaled_for_ga`: transformers 5.19 and later).
TRAINER_ATTRIBUTES = ("loss_is_scaled_for_ga",)


def trainer_hook_problems() -> list[str]:
    """What of `TRAINER_HOOKS` the installed `transformers.Trainer` lacks (empty when everything is there)."""
    problems = []
    for name, params in TRAINER_HOOKS.items():
        method = getattr(transformers.Trainer, name, None)
        if method is None:
            problems.append(f"`Trainer.{name}` does not exist")
            continue
        have = inspect.signature(method).parameters
        problems += [f"`Trainer.{name}` has no parameter `{p}`" for p in params if p not in have]
    problems += [
        f"`Trainer.{name}` does not exist" for name in TRAINER_ATTRIBUTES if not hasattr(transformers.Trainer, name)
    ]
    return problems
