"""Run GGUF files in llama.cpp (llama-cpp-python) and the same model in transformers, for the round-trip tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_hesso import slim_model
from hf_hesso.groups import build_groups

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (`pip install hf_hesso[llamacpp]`; .ci/run does)"
)
ROOT = Path(__file__).resolve().parents[1]
F32_ATOL = 1e-4
F16_ATOL = 2e-2
Q8_0_ATOL = 0.15  # measured 0.048 (weights in 8-bit blocks, f16 KV cache)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def tiny_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens: 3 specials, printable ASCII, a few merges."""
    table = {}
    # GPT-2's bytes->unicode map: printable latin-1 keep their character, the rest move to 256+.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    shift = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for b in range(32, 127):
        vocab[table[b]] = len(vocab)
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n"), ("Ġt", "he"), ("e", "r"), ("o", "n"), ("Ġ", "s")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(vocab) < vocab_size:
        a, b = "Ġ", letters[i]
        if a + b not in vocab:
            merges.append((a, b))
            vocab[a + b] = len(vocab)
        i += 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    return tok


def gguf_model(name: str, shapes: list[dict] | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny causal LM of family `name` with sharpened weights; with `shapes`, a slim one with those sizes."""
    model = tiny_model(name, "ForCausalLM", seed, eval_mode=True, **overrides)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in pname else 0.3 * torch.randn_like(p))
            else:
                p.mul_(4.0)  # sharper distributions: greedy choices far from ties
    if shapes is not None:
        groups = build_groups(model)
        zero = []
        for block in groups.blocks:
            want = shapes[block.layer]
            keep = {
                "mlp_channel": want["intermediate_size"],
                "kv_group": want["num_key_value_heads"],
                "head": want["num_attention_heads"],
                "query_slot": want["num_attention_heads"] // want["num_key_value_heads"],
            }[block.kind]
            g = torch.Generator().manual_seed(block.layer * 7 + len(block.kind))
            drop = torch.randperm(block.n, generator=g)[: block.n - keep]
            zero += [block.offset + int(i) for i in drop]
        groups.zero_(model, torch.tensor(zero, dtype=torch.long))
        slim_model(model, groups)
    return model.eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding (no logits processors: EOS may be chosen like any token, as llama.cpp's argmax)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def llama_cpp_model(path, n_ctx: int = 64, f32_cache: bool = True):
    from llama_cpp import Llama  # noqa: PLC0415 - optional test dependency, guarded by `needs_llama_cpp`

    kwargs = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32 keys/values: no f16 rounding
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0, **kwargs)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


PROMPTS = [[1, 40, 45, 50, 3, 9, 100, 101], [1, 77, 12, 99, 98, 60], [1, 5]]
UNEVEN = [
    {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 72},
    {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 40},
]


def read(path) -> tuple[dict, dict]:
    import gguf  # optional: only the GGUF tests, which skip without it, call this

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, f in reader.fields.items():
        try:
            fields[key] = f.contents()
        except Exception:  # noqa: BLE001 - a few header fields have no Python value
            continue
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}
    return fields, tensors


# ---------------------------------------------------------------------------------------------------------------
# Plan and file content (no llama.cpp needed)
# ---------------------------------------------------------------------------------------------------------------
