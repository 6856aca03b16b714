# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""GGUF export: a slim (or stock) LLaMA-family or Gemma model as one file that llama.cpp, Ollama and LM Studio run.

    hf-hesso-gguf <model_dir> <out.gguf> --dtype f16
    python -m hf_hesso.export.gguf <model_dir> <out.gguf> --dtype f16

What llama.cpp can express (read in its source, `src/llama-model.cpp`, `src/models/{llama,deci,qwen2,qwen3}.cpp`,
`src/models/gemma2*.cpp`, `src/models/gemma3*.cpp`):

- `{arch}.attention.head_count`, `.head_count_kv` and `.feed_forward_length` are read as one number or one number
  per layer; the `llama`, `qwen2` and `qwen3` graphs build every layer from the layer-0 values, so they only run
  models whose layers all have the same shape (and `qwen2` also needs `heads x head_dim == hidden_size`).
- The `deci` graph (Nemotron-NAS) reads head count, key/value head count and MLP width per layer; a head count of
  0 is a layer without attention and a width of 0 a layer without MLP. It is the LLaMA graph otherwise (RMSNorm,
  SwiGLU MLP, "normal" RoPE on consecutive pairs, optional q/k/v/o and MLP biases, optional `rope_freqs`), with no
  q/k norms.
- Layer 0 fixes the head size: `n_embd_head = n_embd / head_count[0]` unless `attention.key_length` is written,
  which this exporter always does. A `deci` model whose layer 0 has no attention reads a head size of 0, and a
  `deci` layer with attention but without MLP drops its attention output (the graph skips the layer's residual
  update); the exporter refuses the first and writes a width-1 all-zero MLP (exactly zero output) for the second.

So the architecture written is:

| model_type | every layer alike | uneven widths / removed sublayers |
|---|---|---|
| llama, mistral | `llama` | `deci` |
| qwen2 | `qwen2` (if heads x head_dim == hidden, else `deci`) | `deci` (q/k/v biases kept) |
| qwen3 | `qwen3` | refused: `deci` has no q/k norm |
| gemma2 | `gemma2` | refused: no per-layer sizes |
| gemma3_text | `gemma3` | refused: no per-layer sizes |

`llama` and `deci` apply RoPE to consecutive pairs of a head's values while transformers rotates the two halves,
so their query and key rows (and biases) are permuted within each head: row `2 i + c` of a head takes row
`c * head_dim / 2 + i`. The `qwen2`, `qwen3`, `gemma2` and `gemma3` graphs rotate halves like transformers and take
the rows as they are.

The Gemma graphs fix what the llama ones read from the file: GELU (tanh approximation), a tied output, the sliding
window on every layer but each 2nd (gemma2) or 6th (gemma3), soft-capping of attention scores and logits (gemma2
always, gemma3 never), the embedding scale sqrt(n_embd) and the query scale 1 / sqrt(head_dim) (1 / sqrt(n_embd /
heads) at the 27B models' layer counts). Gemma's RMSNorm multiplies by `1 + weight`, so norms are written plus one;
a model whose `query_pre_attn_scalar` is not the head size gets the ratio of the query scales folded into its query
weights (gemma2) or query norm (gemma3), and one with pruned hidden channels (whose embedding scale stays sqrt of
the original width) gets the ratio folded into `token_embd` and its inverse into `output_norm` (the tied output
reads both). What differs otherwise is refused, naming it (`_gemma_settings`).

Tokenizers (`tokenizers`' tokenizer.json):

- byte-level BPE (SmolLM2, Llama 3, Qwen2/3, GPT-2 style): `tokenizer.ggml.model = "gpt2"` with tokens, token
  types, merges and the pre-tokenizer type;
- BPE with byte fallback, SentencePiece style (Llama 2, Mistral v0.1, TinyLlama, Gemma): `tokenizer.ggml.model =
  "llama"` with tokens, scores (minus the rank of the first merge that makes each token: llama.cpp joins the pair
  whose result scores highest), token types (the 256 byte tokens `<0xNN>`, unknown, control, user-defined) and
  `add_space_prefix`. Refused when llama.cpp would tokenize otherwise: a missing byte token, a pair of pieces whose
  concatenation is a token but not a merge, a normalizer other than the "▁" replacement and prefix.

Both carry the special tokens, whether BOS/EOS are added, and the chat template.

The `gguf` package is an optional dependency (`pip install hf_hesso[gguf]`): it is imported at module level inside
`try`, so `import hf_hesso` works without it, and `export_gguf` raises an `ImportError` naming the extra.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..modeling import register_auto_classes
from ..modeling.architectures import base_model_type, get_layout, get_submodule, normalize_config
from ..modeling.modeling_hesso import layer_modules

try:  # optional dependency: `pip install hf_hesso[gguf]`
    import gguf
except ImportError:  # pragma: no cover - exercised only without the extra
    gguf = None

__all__ = ["DTYPES", "GGUF_MODEL_TYPES", "GgufExport", "GgufLayer", "export_gguf", "gguf_plan", "main"]

# The transformers model types (stock or `hesso_*`) that `export_gguf` writes.
GGUF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
# transformers model type -> llama.cpp architecture of the Gemma family (uniform layers only).
_GEMMA_ARCHS = {"gemma2": "gemma2", "gemma3_text": "gemma3"}
# llama.cpp's sliding-window period: layer i attends through the window unless (i + 1) % period == 0.
_GEMMA_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
# The layer counts for which llama.cpp scales queries by 1 / sqrt(n_embd / heads) (its 27B types).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# GELU with the tanh approximation, which llama.cpp's Gemma graphs use.
_GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")

# dtype name -> (GGML type of the 2-D weights, llama.cpp file type).
DTYPES = ("f32", "f16", "bf16", "q8_0")
# Q8_0 packs 32 values of a row into one block; rows of other lengths fall back to F16 (as llama.cpp's converter).
Q8_0_BLOCK = 32

# llama.cpp's pre-tokenizer names (`src/llama-vocab.cpp`) for the byte-level BPE pre-tokenizers of tokenizer.json.
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE_TOKENIZERS = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
# The metadata key that marks a GGUF file written by `export_gguf`: only such a file may be replaced by a new export.
WRITER_KEY = "hf_hesso.writer"
WRITER_VALUE = "hf_hesso export_gguf"

# The rope types whose frequencies llama.cpp's `llama`/`deci` graphs reproduce exactly (as per-frequency divisors).
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class GgufLayer:
    """One layer as llama.cpp sees it: query heads, key/value heads and MLP width (0 = sublayer removed)."""

    heads: int
    kv_heads: int
    ffn: int


@dataclass
class GgufExport:
    """What `export_gguf` wrote.

    Attributes:
        path (`str`): the GGUF file.
        architecture (`str`): the llama.cpp architecture (`llama`, `deci`, `qwen2`, `qwen3`, `gemma2`, `gemma3`).
        dtype (`str`): the requested weight type.
        layers (`list[GgufLayer]`): per-layer sizes as written (an MLP of width 1 stands for a removed MLP in `deci`).
        tensor_types (`dict[str, int]`): GGML type name -> number of tensors of that type.
        notes (`list[str]`): what the export had to adapt (fallbacks, warnings).
    """

    path: str
    architecture: str
    dtype: str
    layers: list[GgufLayer]
    tensor_types: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _require_gguf() -> None:
    if gguf is None:
        raise ImportError(
            "GGUF export needs the `gguf` package, which is not installed. Install the extra with "
            "`pip install hf_hesso[gguf]` (or `pip install gguf`)."
        )


# ---------------------------------------------------------------------------------------------------------------
# Shapes and architecture
# ---------------------------------------------------------------------------------------------------------------


def _optional_submodule(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        module = get_submodule(layer, path)
    except AttributeError:
        return None
    return module


def read_layers(model: nn.Module) -> list[GgufLayer]:
    """Per-layer head counts and MLP widths read from the tensors (a missing projection counts as 0)."""
    layout = get_layout(model.config.model_type)
    head_dim = normalize_config(model.config).head_dim
    out = []
    for layer in layer_modules(model):
        q = _optional_submodule(layer, layout.q)
        k = _optional_submodule(layer, layout.k)
        up = _optional_submodule(layer, layout.mlp_in[0])
        heads = q.out_features // head_dim if q is not None else 0
        kv_heads = k.out_features // head_dim if k is not None else 0
        out.append(GgufLayer(heads, kv_heads, up.out_features if up is not None else 0))
    return out


def gguf_plan(model_type: str, layers: list[GgufLayer], hidden_size: int, head_dim: int) -> str:
    """The llama.cpp architecture that runs these layer shapes exactly, or a `ValueError` naming why none does.

    Args:
        model_type (`str`): the transformers model type (`llama`, `hesso_llama`, `mistral`, `qwen2`, `qwen3`,
            `gemma2`, `gemma3_text`, ...).
        layers (`list[GgufLayer]`): per-layer sizes (0 heads = no attention, 0 width = no MLP).
        hidden_size (`int`): the model width.
        head_dim (`int`): the size of one head.
    """
    family = base_model_type(model_type)
    supported = GGUF_MODEL_TYPES
    if family not in supported:
        raise ValueError(
            f"GGUF export supports the model types {', '.join(supported)} (and their slim `hesso_*` forms); got "
            f"{model_type!r}. Other families need their llama.cpp architecture added to `hf_hesso/export/gguf.py`."
        )
    for i, layer in enumerate(layers):
        if layer.heads and (not layer.kv_heads or layer.heads % layer.kv_heads):
            raise ValueError(
                f"Layer {i} has {layer.heads} query heads and {layer.kv_heads} key/value heads; llama.cpp needs the "
                "query heads to be a positive multiple of the key/value heads."
            )
    uniform = len(set(layers)) == 1 and layers[0].heads > 0 and layers[0].ffn > 0
    if family in _GEMMA_ARCHS:
        arch = _GEMMA_ARCHS[family]
        if not uniform:
            shapes = sorted({(s.heads, s.kv_heads, s.ffn) for s in layers})
            raise ValueError(
                f"This {family} model has layers of different shapes ({len(shapes)} distinct (heads, kv_heads, mlp) "
                f"shapes, e.g. {shapes[:3]}): llama.cpp's `{arch}` graph builds every layer from layer 0's sizes (it "
                "reads no per-layer head counts or MLP widths for this architecture) and has no layer without "
                "attention or MLP. Prune every layer alike (uniform shapes) to export it, or run the slim model with "
                "transformers."
            )
        return arch
    if uniform and family in ("llama", "mistral", "qwen3"):
        return "qwen3" if family == "qwen3" else "llama"
    if uniform and family == "qwen2" and layers[0].heads * head_dim == hidden_size:
        return "qwen2"
    if family == "qwen3":
        shapes = sorted({(s.heads, s.kv_heads, s.ffn) for s in layers})
        raise ValueError(
            f"This qwen3 model has layers of different shapes ({len(shapes)} distinct (heads, kv_heads, mlp) shapes, "
            f"e.g. {shapes[:3]}): llama.cpp's `qwen3` graph builds every layer from layer 0's sizes, and its `deci` "
            "graph, the one that reads sizes per layer, has no query/key norm (qwen3's `q_norm`/`k_norm`). Prune "
            "every layer alike (uniform shapes) to export it, or run the slim model with transformers."
        )
    if layers[0].heads == 0:
        raise ValueError(
            "Layer 0 has no attention: llama.cpp derives the head size of every layer from layer 0's head count "
            "(a `deci` model whose layer 0 has 0 heads gets a head size of 0). Keep at least one head in layer 0."
        )
    return "deci"


def _permute_rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder rows within each head from transformers' halves layout to llama.cpp's consecutive pairs.

    transformers rotates the pair (i, i + head_dim / 2) of each head; llama.cpp's `llama`/`deci` graphs rotate
    (2 i, 2 i + 1). New row 2 i + c of a head is old row c * head_dim / 2 + i. Works for weights and biases.
    """
    rows = weight.shape[0]
    heads = rows // head_dim
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _rope_freq_factors(model: nn.Module, head_dim: int) -> tuple[float, torch.Tensor | None]:
    """`(rope theta, per-frequency divisors or None)`, checked against the model's own rotary embedding."""
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"RoPE type {rope_type!r} is not exported: llama.cpp reproduces {', '.join(_ROPE_TYPES)} exactly with the "
            "`llama`/`deci` graphs; other scalings (yarn, dynamic, longrope) change attention scale or depend on the "
            "sequence length. Remove `rope_parameters` scaling or run the model with transformers."
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("`partial_rotary_factor` != 1 is not exported: llama.cpp's llama graph rotates whole heads.")
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        if rope_type != "default":
            raise ValueError(
                f"Cannot read the rotary frequencies of a {type(model).__name__} with RoPE {rope_type!r}."
            )
        return theta, None
    if abs(float(getattr(rotary, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        raise ValueError("The RoPE scaling changes the attention scale, which llama.cpp's llama graph does not.")
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv = rotary.inv_freq.detach().float().cpu()
    if inv.shape != base.shape:
        raise ValueError(
            f"The rotary embedding has {inv.numel()} frequencies; expected head_dim / 2 = {base.numel()}."
        )
    factors = base / inv
    if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0):
        return theta, None
    return theta, factors


@dataclass(frozen=True)
class _GemmaSettings:
    """What a Gemma-2/3 file holds beyond the llama keys, and the scales folded into its weights."""

    window: int
    attn_softcap: float | None
    final_softcap: float | None
    theta: float
    theta_swa: float
    linear_factor: float | None
    embed_fold: float  # token_embd is multiplied by it, output_norm divided (tied output)
    query_fold: float  # gemma2: q_proj rows, gemma3: the q_norm weight, multiplied by it


def _gemma_settings(model: nn.Module, arch: str, layers: list[GgufLayer], hidden: int) -> _GemmaSettings:
    """Check what llama.cpp's `gemma2`/`gemma3` graph (src/models/gemma2*.cpp, gemma3*.cpp) computes; refuse the rest.

    Fixed in llama.cpp: GELU (tanh approximation), no biases, tied output, the sliding window in every layer but
    each 2nd (gemma2) or 6th (gemma3), the soft-capping (gemma2 always caps attention scores and logits, gemma3
    never), the embedding scale sqrt(n_embd) and the query scale 1 / sqrt(head_dim) (1 / sqrt(n_embd / heads) for
    the layer counts of the 27B models). The last two are matched by scaling weights: the embedding (and the final
    norm, which the tied output multiplies) when hidden channels were pruned, and the queries when
    `query_pre_attn_scalar` is not the head size.
    """
    config = model.config
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in _GEMMA_ACTIVATIONS:
        raise ValueError(
            f"The MLP activation is {act!r}; llama.cpp's `{arch}` graph uses GELU with the tanh approximation "
            f"({' / '.join(_GEMMA_ACTIVATIONS)})."
        )
    biased = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if biased:
        raise ValueError(f"{biased[0]} has a bias; llama.cpp's `{arch}` graph reads no projection biases.")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("`use_bidirectional_attention` is set; llama.cpp's Gemma decoder graphs are causal.")
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != embed.data_ptr():
        raise ValueError(
            f"The LM head is not tied to the embedding; llama.cpp's `{arch}` graph always uses `token_embd` as the "
            "output (Gemma ties them). Keep `tie_word_embeddings=True`."
        )
    period = _GEMMA_SWA_PERIOD[arch]
    expected = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(len(layers))]
    layer_types = list(getattr(config, "layer_types", None) or expected)
    if layer_types != expected:
        raise ValueError(
            f"`layer_types` is {layer_types}; llama.cpp's `{arch}` graph fixes them to {expected} (sliding windows "
            f"with full attention in each last layer of {period}). A model with another pattern cannot be written for it."
        )
    window = getattr(config, "sliding_window", None)
    if not window:
        raise ValueError(f"`sliding_window` is {window!r}; llama.cpp's `{arch}` graph needs the window size.")
    attn_cap = getattr(config, "attn_logit_softcapping", None)
    final_cap = getattr(config, "final_logit_softcapping", None)
    if arch == "gemma2" and (attn_cap is None or final_cap is None):
        raise ValueError(
            f"`attn_logit_softcapping` is {attn_cap} and `final_logit_softcapping` {final_cap}; llama.cpp's gemma2 "
            "graph always soft-caps both (at 50 and 30 when the file does not say), so both must be set."
        )
    if arch == "gemma3" and (attn_cap is not None or final_cap is not None):
        raise ValueError(
            f"`attn_logit_softcapping` is {attn_cap} and `final_logit_softcapping` {final_cap}; llama.cpp's gemma3 "
            "graph soft-caps neither (Gemma 3 has none), so both must be None."
        )

    params = dict(getattr(config, "rope_parameters", None) or {})
    full = dict(params.get("full_attention", params))
    swa = dict(params.get("sliding_attention", params))
    for name, p in (("sliding", swa), ("full", full)):
        kind = p.get("rope_type", p.get("type", "default"))
        allowed = ("default", "linear") if name == "full" and arch == "gemma3" else ("default",)
        if kind not in allowed:
            raise ValueError(
                f"The {name}-attention RoPE type is {kind!r}; llama.cpp's `{arch}` graph reproduces "
                f"{', '.join(allowed)} there. Run the model with transformers."
            )
        if float(p.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(
                "`partial_rotary_factor` != 1 is not exported: llama.cpp's Gemma graphs rotate whole heads."
            )
    theta = float(full.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    theta_swa = float(swa.get("rope_theta", theta))
    if arch == "gemma2" and theta_swa != theta:
        raise ValueError(f"Sliding and full attention use RoPE bases {theta_swa} and {theta}; gemma2 has one.")
    linear = float(full["factor"]) if full.get("rope_type") == "linear" else None

    # The scales llama.cpp applies (in float32), against the model's own.
    n_layer, heads, head_dim = len(layers), layers[0].heads, normalize_config(config).head_dim
    big = n_layer == _GEMMA_27B_LAYERS[arch]
    ours = np.float32(1.0) / np.sqrt(np.float32(hidden // heads if big else head_dim))
    attention = get_submodule(layer_modules(model)[0], get_layout(config.model_type).attention.module)
    theirs = float(getattr(attention, "scaling", float(config.query_pre_attn_scalar) ** -0.5))
    query_fold = 1.0 if np.float32(theirs) == ours else theirs / float(ours)
    embed_scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    theirs = float(embed_scale) if embed_scale is not None else float(config.hidden_size) ** 0.5
    ours = np.sqrt(np.float32(hidden))
    embed_fold = 1.0 if np.float32(theirs) == ours else theirs / float(ours)
    return _GemmaSettings(window, attn_cap, final_cap, theta, theta_swa, linear, embed_fold, query_fold)


def _arch_check(model: nn.Module, arch: str, notes: list[str]) -> None:
    config = model.config
    family = base_model_type(config.model_type)
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"`hidden_act` is {act!r}; llama.cpp's {arch} graph uses SiLU (SwiGLU MLP).")
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (family == "mistral" or getattr(config, "use_sliding_window", False))
    if uses_window and window < config.max_position_embeddings:
        message = (
            f"transformers limits attention to a sliding window of {window} tokens, llama.cpp's `{arch}` graph "
            f"attends to the whole context: outputs agree on sequences up to {window} tokens."
        )
        warnings.warn(message, stacklevel=3)
        notes.append(message)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json `pre_tokenizer`, or None if unknown."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return _SPLIT_PRE_TOKENIZERS.get(regex)
    return None


_SPM_SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _steps(node: dict | None, key: str) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer (`Sequence` unrolled; none -> [])."""
    if node is None:
        return []
    return list(node[key]) if node.get("type") == "Sequence" else [node]


def _sentencepiece_prefix(spec: dict, tokens: list[str]) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends "▁" to the text (llama.cpp's `add_space_prefix`).

    llama.cpp's SentencePiece tokenizer replaces every space by "▁" and, with `add_space_prefix`, puts one "▁"
    before the text (and after every special token). The tokenizer.json forms that do exactly this are accepted:
    Llama 2's normalizer `Prepend("▁")` + `Replace(" ", "▁")`, a `Metaspace` pre-tokenizer (transformers'
    `LlamaTokenizer`), and Gemma's `Replace(" ", "▁")` without a prefix (its pre-tokenizer `Split(" ")` then finds no
    space left). Anything else (Unicode normalization, lower-casing, other splits) is refused: llama.cpp would not
    apply it.
    """
    normalizers = _steps(spec.get("normalizer"), "normalizers")
    pres = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": _SPM_SPACE}
    prepend = {"type": "Prepend", "prepend": _SPM_SPACE}
    found = f"normalizer {json.dumps(spec.get('normalizer'))}, pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))}"
    why = (
        f"The SentencePiece-style tokenizer's text processing ({found[:400]}) is not one llama.cpp reproduces: its "
        "SentencePiece tokenizer only replaces spaces by '▁' and optionally prepends one '▁' (Llama 2's "
        "`Prepend('▁')` + `Replace(' ', '▁')`, a `Metaspace` pre-tokenizer, or Gemma's `Replace(' ', '▁')`). "
        "Export a tokenizer of one of these forms."
    )
    if normalizers and all(step in (replace, prepend) for step in normalizers) and replace in normalizers:
        if len(normalizers) != len({json.dumps(s, sort_keys=True) for s in normalizers}):
            raise ValueError(why)
        # After the Replace there is no space left: a Split on " " is a no-op (Gemma's tokenizer.json).
        no_op_split = [{"type": "Split", "pattern": {"String": " "}}]
        if pres and [{k: s.get(k) for k in ("type", "pattern")} for s in pres] != no_op_split:
            raise ValueError(why)
        return prepend in normalizers
    if not normalizers and len(pres) == 1 and pres[0].get("type") == "Metaspace":
        meta = pres[0]
        if meta.get("replacement", _SPM_SPACE) != _SPM_SPACE:
            raise ValueError(why)
        scheme = meta.get("prepend_scheme") or ("always" if meta.get("add_prefix_space", True) else "never")
        if meta.get("split", True):
            # Splitting at every "▁" only matters for tokens that hold a "▁" after their first character.
            inner = [t for t in tokens if _SPM_SPACE in t[1:]]
            if inner:
                raise ValueError(
                    f"The tokenizer's Metaspace pre-tokenizer splits the text at every '▁', but {len(inner)} tokens "
                    f"hold a '▁' inside (e.g. {inner[:3]}): llama.cpp's SentencePiece tokenizer does not split, so "
                    "it would form these tokens where transformers cannot. Set `split` to false in tokenizer.json "
                    "(as transformers' LlamaTokenizer does) if that is what the model was trained with."
                )
        return scheme in ("always", "first")
    raise ValueError(why)


def _metaspace_note(spec: dict) -> list[str]:
    """What llama.cpp tokenizes differently from a `Metaspace` pre-tokenizer that prepends "▁" (notes)."""
    pres = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    if not pres or pres[0].get("type") != "Metaspace":
        return []
    meta = pres[0]
    scheme = meta.get("prepend_scheme") or ("always" if meta.get("add_prefix_space", True) else "never")
    if scheme == "never":
        return []
    after = " or follows a special token" if scheme == "first" else ""
    return [
        f"tokenizer: transformers' Metaspace (prepend_scheme {scheme!r}) adds no '▁' to a text that begins with a "
        f"space{after}, llama.cpp's SentencePiece tokenizer does: such texts start with one more '▁' in llama.cpp"
    ]


def _sentencepiece_scores(tokens: list[str], merges: list[tuple[str, str]], whole: set[int]) -> list[float]:
    """Token scores under which llama.cpp's SentencePiece merging reproduces the BPE merges of tokenizer.json.

    llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm` in src/llama-vocab.cpp) starts from single characters
    and repeatedly joins the adjacent pair whose concatenation is the vocabulary token of highest score (leftmost
    on ties); transformers joins the adjacent pair of lowest merge rank. A token's score is minus the rank of the
    first merge that makes it, which orders the joins alike, provided every way to write a token as two pieces
    that llama.cpp could join is a merge, as in tokenizers converted from SentencePiece (Llama 2, Mistral, Gemma).
    A vocabulary where that does not hold is refused: llama.cpp would form tokens that transformers does not.
    `whole` holds the ids matched as whole strings before merging (added tokens), which are not checked.
    """
    pairs = set(merges)
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    known = set(tokens)
    missing = []
    for i, text in enumerate(tokens):
        if i in whole:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if (
                (left in known or len(left) == 1)
                and (right in known or len(right) == 1)
                and (left, right) not in pairs
            ):
                missing.append((left, right))
    if missing:
        raise ValueError(
            f"The byte-fallback BPE tokenizer lacks {len(missing)} merges that llama.cpp's SentencePiece tokenizer "
            f"would apply (e.g. {missing[:3]}): llama.cpp joins any two adjacent pieces whose concatenation is a "
            "token, so its tokens would differ from transformers'. Tokenizers converted from SentencePiece list "
            "every such pair; this one was trained otherwise and cannot be written as a llama.cpp vocabulary."
        )
    return [-float(first_rank[text]) if text in first_rank else 0.0 for text in tokens]


def _tokenizer_fields(tokenizer, config, pre_tokenizer: str | None) -> dict:
    """Everything `tokenizer.ggml.*` holds, read from the `tokenizers` tokenizer (tokenizer.json).

    Byte-level BPE is written as llama.cpp's `gpt2` tokenizer (tokens, merges, pre-tokenizer name); BPE with byte
    fallback (SentencePiece style) as its `llama` tokenizer (tokens, scores, byte tokens, `add_space_prefix`).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"The tokenizer is a {type(tokenizer).__name__} without a `tokenizers` backend; GGUF export reads "
            "tokenizer.json. Load it with `AutoTokenizer.from_pretrained(dir)` (a fast tokenizer)."
        )
    spec = json.loads(backend.to_str())
    bpe = spec.get("model") or {}
    sentencepiece = bpe.get("type") == "BPE" and bool(bpe.get("byte_fallback", False))
    # Byte-level BPE: GPT-2's byte -> unicode alphabet, shown by a ByteLevel pre-tokenizer or decoder.
    byte_level = not sentencepiece and "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if bpe.get("type") != "BPE" or not (byte_level or sentencepiece):
        raise ValueError(
            f"The tokenizer is a {bpe.get('type')} model; this exporter writes BPE vocabularies, byte-level (llama.cpp's "
            "`gpt2` tokenizer: SmolLM2, Llama 3, Qwen2/3) or with byte fallback (its SentencePiece-style `llama` "
            "tokenizer: Llama 2, Mistral v0.1, TinyLlama, Gemma). Unigram and WordPiece vocabularies are not written."
        )
    if sentencepiece:
        odd = {k: bpe.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix") if bpe.get(k)}
        if odd:
            raise ValueError(
                f"The byte-fallback BPE model sets {odd}, which llama.cpp's SentencePiece tokenizer lacks."
            )
        pre = None
    else:
        pre = pre_tokenizer or _pre_tokenizer_name(spec.get("pre_tokenizer"))
        if pre is None:
            raise ValueError(
                "The tokenizer's pre-tokenizer "
                f"{json.dumps(spec.get('pre_tokenizer'))[:300]} has no known llama.cpp name. Pass the name llama.cpp "
                "uses for it (see `tokenizer_pre` in llama.cpp's src/llama-vocab.cpp), e.g. "
                "`export_gguf(..., pre_tokenizer='llama-bpe')` or `--pre-tokenizer llama-bpe`."
            )

    vocab: dict[str, int] = dict(bpe["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max([config.vocab_size, *(i + 1 for i in vocab.values()), *(i + 1 for i in added)])
    tokens: list[str | None] = [None] * size
    types = [int(gguf.TokenType.NORMAL)] * size
    for text, i in vocab.items():
        tokens[i] = text
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe.get("merges", [])]

    def special(name: str) -> int | None:
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is None:
            value = getattr(config, f"{name}_token_id", None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        return None if value is None else int(value)

    ids = {name: special(name) for name in ("bos", "eos", "unk", "pad")}
    fields = {"model": "gpt2", "pre": pre, "merges": [" ".join(m) for m in merges], "scores": None}
    if sentencepiece:
        # llama.cpp writes an unknown character as its UTF-8 bytes, the tokens "<0x00>" .. "<0xFF>" (all needed).
        byte_ids = [i for i, text in enumerate(tokens) if _BYTE_TOKEN.fullmatch(text) and i not in added]
        if len(byte_ids) != 256:
            raise ValueError(
                f"The byte-fallback tokenizer has {len(byte_ids)} of the 256 byte tokens <0x00>..<0xFF>; llama.cpp's "
                "SentencePiece tokenizer needs all of them to write characters outside the vocabulary."
            )
        for i in byte_ids:
            types[i] = int(gguf.TokenType.BYTE)
        unk = ids["unk"] if ids["unk"] is not None else vocab.get(bpe.get("unk_token") or "")
        if unk is not None:
            ids["unk"] = unk
            types[unk] = int(gguf.TokenType.UNKNOWN)
        fields = {
            "model": "llama",
            "pre": None,
            "merges": None,
            "scores": _sentencepiece_scores(tokens, merges, set(added)),
            "add_space_prefix": _sentencepiece_prefix(spec, tokens),
            "notes": _metaspace_note(spec),
        }
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = len(with_special) > len(without) and with_special[0] == ids["bos"] and ids["bos"] is not None
    add_eos = len(with_special) > len(without) and with_special[-1] == ids["eos"] and ids["eos"] is not None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return {
        **fields,
        "tokens": tokens,
        "types": types,
        "ids": ids,
        "add_bos": add_bos,
        "add_eos": add_eos,
        "chat_template": template,
    }


# ---------------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------------


def _mlp_tensors(p: str, layer: nn.Module, layout, width: int, ffn_multiple: int, t):
    """`ffn_gate`/`ffn_up`/`ffn_down` (and biases) of one layer, padded with all-zero channels to `ffn_multiple`."""
    gate, up = (get_submodule(layer, path) for path in layout.mlp_in)
    down = get_submodule(layer, layout.mlp_out)
    pad = -width % ffn_multiple
    for name, lin in (("ffn_gate", gate), ("ffn_up", up), ("ffn_down", down)):
        w = t(lin.weight)
        b = t(lin.bias) if lin.bias is not None else None
        if pad and name == "ffn_down":
            w = torch.cat([w, w.new_zeros(w.shape[0], pad)], dim=1)
        elif pad:
            w = torch.cat([w, w.new_zeros(pad, w.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(pad)]) if b is not None else None
        yield p + name + ".weight", w
        if b is not None:
            yield p + name + ".bias", b


def _gemma_tensors(model: nn.Module, arch: str, layers: list[GgufLayer], settings: _GemmaSettings, ffn_multiple: int):
    """Yield `(gguf name, float32 tensor)` of a Gemma-2/3 model in llama.cpp's layout.

    Gemma's RMSNorm multiplies by `1 + weight`; llama.cpp's by the weight, so every norm is written plus one (as
    llama.cpp's converter does). RoPE rotates halves in both (no permutation). Scales folded: see `_GemmaSettings`.
    """
    layout = get_layout(model.config.model_type)
    base = model.base_model

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device="cpu", dtype=torch.float32)

    def norm(module: nn.Module, factor: float = 1.0) -> torch.Tensor:
        weight = t(module.weight) + 1.0
        return weight * factor if factor != 1.0 else weight

    embed = t(model.get_input_embeddings().weight)
    yield "token_embd.weight", embed * settings.embed_fold if settings.embed_fold != 1.0 else embed
    for i, (layer, shape) in enumerate(zip(layer_modules(model), layers, strict=True)):
        p = f"blk.{i}."
        attention = get_submodule(layer, layout.attention.module)
        yield p + "attn_norm.weight", norm(layer.input_layernorm)
        for key, path in (("q", layout.q), ("k", layout.k), ("v", layout.v)):
            w = t(get_submodule(layer, path).weight)
            if key == "q" and arch == "gemma2" and settings.query_fold != 1.0:
                w = w * settings.query_fold
            yield p + f"attn_{key}.weight", w
        yield p + "attn_output.weight", t(get_submodule(layer, layout.o).weight)
        if arch == "gemma3":
            yield p + "attn_q_norm.weight", norm(attention.q_norm, settings.query_fold)
            yield p + "attn_k_norm.weight", norm(attention.k_norm)
        yield p + "post_attention_norm.weight", norm(layer.post_attention_layernorm)
        yield p + "ffn_norm.weight", norm(layer.pre_feedforward_layernorm)
        yield from _mlp_tensors(p, layer, layout, shape.ffn, ffn_multiple, t)
        yield p + "post_ffw_norm.weight", norm(layer.post_feedforward_layernorm)
    yield "output_norm.weight", norm(base.norm, 1.0 / settings.embed_fold)


def _tensor_names(model: nn.Module, arch: str, layers: list[GgufLayer], head_dim: int, ffn_multiple: int = 1):
    """Yield `(gguf name, float32 tensor)` in llama.cpp's layout (weights as (out, in), as PyTorch stores them).

    `ffn_multiple` > 1 pads every MLP with all-zero channels up to a multiple of it (zero gate and up rows, zero
    down columns: silu(0) * 0 = 0, so the output is exactly unchanged), which lets Q8_0 quantize `ffn_down`, whose
    rows hold the MLP width.
    """
    config = model.config
    layout = get_layout(config.model_type)
    base = model.base_model
    permute = arch in ("llama", "deci")
    hidden = normalize_config(config).hidden_size  # the slim width where hidden channels were pruned

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device="cpu", dtype=torch.float32)

    embed = base.embed_tokens.weight
    yield "token_embd.weight", t(embed)
    for i, (layer, shape) in enumerate(zip(layer_modules(model), layers, strict=True)):
        p = f"blk.{i}."
        if shape.heads:
            yield p + "attn_norm.weight", t(layer.input_layernorm.weight)
            for key, path in (("q", layout.q), ("k", layout.k), ("v", layout.v)):
                lin = get_submodule(layer, path)
                w, b = t(lin.weight), (t(lin.bias) if lin.bias is not None else None)
                if permute and key in ("q", "k"):
                    w = _permute_rope_rows(w, head_dim)
                    b = _permute_rope_rows(b, head_dim) if b is not None else None
                yield p + f"attn_{key}.weight", w
                if b is not None:
                    yield p + f"attn_{key}.bias", b
            o = get_submodule(layer, layout.o)
            yield p + "attn_output.weight", t(o.weight)
            if o.bias is not None:
                yield p + "attn_output.bias", t(o.bias)
            attention = get_submodule(layer, layout.attention.module)
            for key in ("q", "k"):
                norm = getattr(attention, f"{key}_norm", None)
                if norm is not None and getattr(norm, "weight", None) is not None:
                    yield p + f"attn_{key}_norm.weight", t(norm.weight)
        if shape.ffn:
            yield p + "ffn_norm.weight", t(layer.post_attention_layernorm.weight)
            yield from _mlp_tensors(p, layer, layout, shape.ffn, ffn_multiple, t)
        elif arch == "deci" and shape.heads:
            # deci skips the residual update of a layer without MLP, dropping its attention output: an MLP of width
            # 1 whose weights are all zero adds exactly nothing and keeps the attention.
            yield p + "ffn_norm.weight", torch.ones(hidden)
            yield p + "ffn_gate.weight", torch.zeros(1, hidden)
            yield p + "ffn_up.weight", torch.zeros(1, hidden)
            yield p + "ffn_down.weight", torch.zeros(hidden, 1)
    yield "output_norm.weight", t(base.norm.weight)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"A {type(model).__name__} has no LM head; export a *ForCausalLM model.")
    tied = head.weight is embed or head.weight.data_ptr() == embed.data_ptr()
    if not tied:
        # Absent `output.weight` makes llama.cpp reuse `token_embd.weight` (tied embeddings, as SmolLM2).
        yield "output.weight", t(head.weight)
    if getattr(head, "bias", None) is not None:
        raise ValueError("The LM head has a bias, which llama.cpp's llama-family graphs do not read.")


def _encode(name: str, tensor: torch.Tensor, dtype: str, notes: list[str]):
    """`(array, raw_dtype)` for `GGUFWriter.add_tensor`: 1-D tensors stay F32 (norms, biases, rope factors)."""
    array = tensor.numpy()
    qtype = gguf.GGMLQuantizationType
    if tensor.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), qtype.F32
    if dtype == "f16":
        return array.astype(np.float16), qtype.F16
    if dtype == "bf16":
        return gguf.quants.quantize(array, qtype.BF16), qtype.BF16
    if array.shape[-1] % Q8_0_BLOCK:
        notes.append(f"{name}: rows of {array.shape[-1]} values are not a multiple of {Q8_0_BLOCK}; written as F16")
        return array.astype(np.float16), qtype.F16
    return gguf.quants.quantize(array, qtype.Q8_0), qtype.Q8_0


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def _written_by_us(path: str) -> bool:
    """Whether `path` is a GGUF file that `export_gguf` wrote (it carries `WRITER_KEY`)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        field = gguf.GGUFReader(path).fields.get(WRITER_KEY)
        return field is not None and field.contents() == WRITER_VALUE
    except Exception:  # unreadable or not a valid GGUF: not ours
        return False


def _output_target(model_or_dir, path: str | os.PathLike) -> Path:
    """The file the export writes (`path`, symlinks followed); refuses a path it must not write.

    Refused: the input checkpoint folder itself, a file inside it that is not a `.gguf` (transformers may read it:
    weights, config, tokenizer, code), and any existing file that `export_gguf` did not write.
    """
    given = os.fspath(path)
    target = Path(os.path.realpath(given))
    resolved = f" (which resolves to {str(target)!r})" if os.path.abspath(given) != str(target) else ""
    if not isinstance(model_or_dir, nn.Module) and os.path.isdir(os.fspath(model_or_dir)):
        source = os.path.realpath(os.fspath(model_or_dir))
        if str(target) == source:
            raise ValueError(
                f"The GGUF output {given!r}{resolved} is the checkpoint folder the export reads. Pass a file path, e.g. "
                f"{os.path.join(os.fspath(model_or_dir), 'model.gguf')!r} or a path outside the folder."
            )
        try:
            inside = os.path.commonpath([source, str(target)]) == source
        except ValueError:  # another drive (Windows)
            inside = False
        if inside and target.suffix != ".gguf":
            raise ValueError(
                f"The GGUF output {given!r}{resolved} is inside the checkpoint folder the export reads "
                f"({os.fspath(model_or_dir)!r}), under a name that is not `.gguf` (a file transformers may read: "
                "weights, config, tokenizer, code). Nothing was written. Write the GGUF to a path ending in `.gguf`, "
                "or outside the folder."
            )
    if target.is_dir():
        raise ValueError(f"The GGUF output {given!r}{resolved} is a directory. Pass a file path, e.g. 'model.gguf'.")
    if target.exists() and not _written_by_us(str(target)):
        raise FileExistsError(
            f"The GGUF output {given!r}{resolved} already exists and was not written by `export_gguf`: it is kept, and nothing was written. Choose another path, "
            "or move or delete that file yourself."
        )
    return target


def _load(model_or_dir, tokenizer):
    if isinstance(model_or_dir, nn.Module):
        if tokenizer is None:
            raise ValueError(
                "GGUF files carry the tokenizer: pass `tokenizer=` (e.g. `AutoTokenizer.from_pretrained(dir)`) with a "
                "model object, or pass the saved model's directory instead."
            )
        return model_or_dir, tokenizer
    directory = os.fspath(model_or_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory; pass a saved model's folder or a model object.")
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def export_gguf(
    model_or_dir,
    path: str | os.PathLike,
    dtype: str = "f16",
    *,
    tokenizer=None,
    pre_tokenizer: str | None = None,
    name: str | None = None,
) -> GgufExport:
    """Write a LLaMA-family or Gemma causal LM (stock, or slim) as a GGUF file that llama.cpp runs.

    Every layer alike: the model's own llama.cpp architecture (`llama` for llama/mistral, `qwen2`, `qwen3`, `gemma2`,
    `gemma3` for gemma3_text); layers of different widths (llama, mistral, qwen2): `deci`, whose graph reads the
    head counts and MLP widths per layer (see the module docstring for what is refused and why). Tokenizer
    (byte-level BPE, or SentencePiece-style BPE with byte fallback), chat template, RoPE settings, RMSNorm epsilon
    and special tokens are carried over; tied embeddings are written once (llama.cpp reuses `token_embd` as the
    output). What had to be adapted (scales folded into weights, MLP padding, tokenizer differences) is listed in
    the result's `notes`.

    Args:
        model_or_dir (`nn.Module` or path): a `*ForCausalLM` model, or the folder it was saved to
            (`save_pretrained` / `save_slim`); the folder's tokenizer is used.
        path (`str` or `os.PathLike`): the GGUF file to write (written under a temporary name, then renamed; a
            symlink is followed). It may replace only a GGUF file that `export_gguf` wrote (marked with the
            `hf_hesso.writer` metadata key); any other existing file is kept and the export refused. It may not be
            the input folder, nor a file inside it that is not a `.gguf`.
        dtype (`str`, *optional*, defaults to `"f16"`): `"f32"`, `"f16"`, `"bf16"` or `"q8_0"` for the 2-D weights;
            norms and biases stay float32. With `"q8_0"`, MLP widths are padded with all-zero channels to a
            multiple of 32 (the outputs stay exactly the same), and any other weight whose rows are not a multiple of
            32 values is written as F16 (both reported in `notes`).
        tokenizer (*optional*): the tokenizer; required with a model object.
        pre_tokenizer (`str`, *optional*): llama.cpp's pre-tokenizer name, when it cannot be recognised from
            tokenizer.json (recognised: `gpt-2`, `smollm`, `llama-bpe`, `qwen2`); byte-level BPE only (a
            SentencePiece-style vocabulary has no pre-tokenizer in llama.cpp).
        name (`str`, *optional*): `general.name`; defaults to the model's `_name_or_path`.

    Returns:
        `GgufExport`: the path, the architecture, the per-layer sizes and the tensor types written.

    Raises:
        `ImportError`: the `gguf` package is missing (`pip install hf_hesso[gguf]`).
        `ValueError`: the model or tokenizer cannot be expressed in llama.cpp, or `path` is the input folder or a
            file inside it that transformers may read; the message names why.
        `FileExistsError`: `path` exists and was not written by `export_gguf`.
    """
    _require_gguf()
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` is {dtype!r}; choose one of {', '.join(DTYPES)}.")
    target = _output_target(model_or_dir, path)
    model, tokenizer = _load(model_or_dir, tokenizer)
    config = model.config
    get_layout(config.model_type)  # an unsupported family raises the library's usual message
    norm = normalize_config(config)
    layers = read_layers(model)
    arch = gguf_plan(config.model_type, layers, norm.hidden_size, norm.head_dim)
    notes: list[str] = []
    gemma = _gemma_settings(model, arch, layers, norm.hidden_size) if arch in _GEMMA_ARCHS.values() else None
    if gemma is None:
        _arch_check(model, arch, notes)
        theta, rope_factors = _rope_freq_factors(model, norm.head_dim)
        if rope_factors is not None and arch not in ("llama", "deci"):
            raise ValueError(f"RoPE scaling is only exported for the llama/deci graphs, not {arch!r}.")
    else:
        theta, rope_factors = gemma.theta, None
        if gemma.query_fold != 1.0:
            notes.append(
                f"query scale: llama.cpp's {arch} graph scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) at "
                f"its 27B layer count), the model by query_pre_attn_scalar^-0.5; the ratio {gemma.query_fold:.6g} is "
                "folded into the "
                f"{'query weights' if arch == 'gemma2' else 'query norm'}"
            )
        if gemma.embed_fold != 1.0:
            notes.append(
                f"embedding scale: llama.cpp multiplies by sqrt of the slim width, the model by sqrt of the original; "
                f"the ratio {gemma.embed_fold:.6g} is folded into token_embd (and its inverse into output_norm)"
            )
    vocab = _tokenizer_fields(tokenizer, config, pre_tokenizer)
    notes += vocab.get("notes", [])
    if len(vocab["tokens"]) != model.get_input_embeddings().weight.shape[0]:
        raise ValueError(
            f"The tokenizer has {len(vocab['tokens'])} tokens but the embedding has "
            f"{model.get_input_embeddings().weight.shape[0]} rows; llama.cpp needs one token per row."
        )

    # Q8_0 quantizes rows in blocks of 32 values: MLP widths are padded with exactly-zero channels to a multiple.
    ffn_multiple = Q8_0_BLOCK if dtype == "q8_0" else 1
    written = [
        GgufLayer(
            s.heads,
            s.kv_heads,
            1 if arch == "deci" and s.heads and not s.ffn else s.ffn + (-s.ffn % ffn_multiple),
        )
        for s in layers
    ]
    if any(not s.ffn and w.ffn for s, w in zip(layers, written, strict=True)):
        notes.append("layers without MLP but with attention are written with a width-1 all-zero MLP (deci)")
    padded = sum(w.ffn - s.ffn for s, w in zip(layers, written, strict=True) if s.ffn)
    if padded:
        notes.append(f"MLP widths padded with {padded} all-zero channels in all to multiples of {ffn_multiple} (Q8_0)")

    path = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tensor_types: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or path.stem))
        file_type = {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string(WRITER_KEY, WRITER_VALUE)
        writer.add_block_count(len(layers))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(norm.hidden_size)
        per_layer = arch == "deci"
        writer.add_feed_forward_length([w.ffn for w in written] if per_layer else written[0].ffn)
        writer.add_head_count([w.heads for w in written] if per_layer else written[0].heads)
        writer.add_head_count_kv([w.kv_heads for w in written] if per_layer else written[0].kv_heads)
        # Always written: llama.cpp otherwise derives the head size as hidden_size / head_count[0].
        writer.add_key_length(norm.head_dim)
        writer.add_value_length(norm.head_dim)
        writer.add_rope_dimension_count(norm.head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        if gemma is not None:
            writer.add_sliding_window(int(gemma.window))
            if gemma.attn_softcap is not None:
                writer.add_attn_logit_softcapping(float(gemma.attn_softcap))
            if gemma.final_softcap is not None:
                writer.add_final_logit_softcapping(float(gemma.final_softcap))
            if arch == "gemma3":
                writer.add_rope_freq_base_swa(gemma.theta_swa)
            if gemma.linear_factor is not None:
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(gemma.linear_factor)
        writer.add_vocab_size(len(vocab["tokens"]))

        writer.add_tokenizer_model(vocab["model"])
        if vocab["pre"] is not None:
            writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        if vocab["scores"] is not None:
            writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["types"])
        if vocab["merges"] is not None:
            writer.add_token_merges(vocab["merges"])
        if "add_space_prefix" in vocab:
            writer.add_add_space_prefix(vocab["add_space_prefix"])
        ids = vocab["ids"]
        for key, add in (
            ("bos", writer.add_bos_token_id),
            ("eos", writer.add_eos_token_id),
            ("unk", writer.add_unk_token_id),
            ("pad", writer.add_pad_token_id),
        ):
            if ids[key] is not None:
                add(ids[key])
        writer.add_add_bos_token(vocab["add_bos"])
        writer.add_add_eos_token(vocab["add_eos"])
        if vocab["chat_template"]:
            writer.add_chat_template(vocab["chat_template"])

        def add(tensor_name: str, tensor: torch.Tensor) -> None:
            array, raw = _encode(tensor_name, tensor, dtype, notes)
            writer.add_tensor(tensor_name, array, raw_dtype=raw)
            tensor_types[raw.name] = tensor_types.get(raw.name, 0) + 1

        if rope_factors is not None:
            add("rope_freqs.weight", rope_factors)
        with torch.no_grad():
            if gemma is not None:
                tensors = _gemma_tensors(model, arch, layers, gemma, ffn_multiple)
            else:
                tensors = _tensor_names(model, arch, layers, norm.head_dim, ffn_multiple)
            for tensor_name, tensor in tensors:
                add(tensor_name, tensor)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        # Checked again just before: a file that appeared meanwhile is not replaced.
        if target.exists() and not _written_by_us(str(target)):
            raise FileExistsError(f"{str(target)!r} appeared during the export and was not written by it: it is kept.")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return GgufExport(str(path), arch, dtype, written, tensor_types, notes)


def main(argv: list[str] | None = None) -> None:
    """Command line: `hf-hesso-gguf <model_dir> <out.gguf> --dtype f16` (or `python -m hf_hesso.export.gguf`)."""
    parser = argparse.ArgumentParser(
        prog="hf-hesso-gguf",
        description="Write a saved (slim or stock) LLaMA-family or Gemma model as a GGUF file for llama.cpp / Ollama.",
    )
    parser.add_argument("model_dir", help="folder written by save_pretrained / save_slim / HESSOTrainer.save_model")
    parser.add_argument("output", help="the .gguf file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f16", help="weight type of the 2-D tensors")
    parser.add_argument("--pre-tokenizer", default=None, help="llama.cpp pre-tokenizer name, if not recognised")
    parser.add_argument("--name", default=None, help="general.name written in the file")
    args = parser.parse_args(argv)
    result = export_gguf(args.model_dir, args.output, args.dtype, pre_tokenizer=args.pre_tokenizer, name=args.name)
    size = os.path.getsize(result.path)
    uneven = len(set(result.layers)) > 1
    print(
        f"wrote {result.path} ({size / 2**20:.1f} MiB): architecture {result.architecture}"
        f"{' (per-layer sizes)' if uneven else ''}, {len(result.layers)} layers, dtype {result.dtype}, tensors "
        + ", ".join(f"{n} x {k}" for k, n in sorted(result.tensor_types.items()))
    )
    for note in result.notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
