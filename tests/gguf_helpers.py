"""Run GGUF files in llama.cpp (the `xllamacpp` wheel) and the same model in transformers, for the round-trip tests.

llama.cpp comes from the prebuilt `xllamacpp` wheel of the `llamacpp-test` extra, which the README's test command
installs. A test that needs it fails when it is missing, naming the extra; `HF_HESSO_SKIP_LLAMA_CPP=1` turns that
failure into a skip, for an environment that leaves the extra out on purpose.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_hesso import slim_model
from hf_hesso.groups import build_groups

SKIP_LLAMA_CPP_ENV = "HF_HESSO_SKIP_LLAMA_CPP"
ROOT = Path(__file__).resolve().parents[1]
F32_ATOL = 1e-4
F16_ATOL = 2e-2
Q8_0_ATOL = 0.15  # measured 0.044-0.046 (weights in 8-bit blocks, f16 KV cache)


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


SPM_VOCAB = 384  # spm_tokenizer()'s
SPM_SPACE = "\u2581"  # "▁"
# SentencePiece-style pieces, each the join of two earlier ones, in priority order (the first joins first).
SPM_JOINS = [
    ("▁", "t"),
    ("h", "e"),
    ("▁t", "he"),
    ("i", "n"),
    ("▁", "a"),
    ("e", "r"),
    ("o", "n"),
    ("▁", "s"),
    ("a", "t"),
    ("e", "n"),
    ("a", "n"),
    ("▁", "c"),
    ("▁c", "a"),
    ("f", "é"),
    ("▁ca", "fé"),
    ("▁", "ü"),
    ("b", "e"),
    ("be", "r"),
    ("▁ü", "ber"),
    ("▁", "▁"),
    ("▁▁", "▁▁"),
    ("i", "s"),
    ("▁", "is"),
    ("▁t", "h"),
    ("u", "n"),
    ("▁s", "un"),
    ("▁s", "u"),
    ("▁a", "n"),
    ("▁an", "d"),
    ("ß", "e"),
    ("▁", "—"),
    ("T", "H"),
    ("▁", "TH"),
]


def spm_tokenizer(kind: str = "llama", vocab_size: int = SPM_VOCAB, legacy: bool = False):
    """A SentencePiece-style tokenizer (BPE with byte fallback) built as transformers converts Llama 2's and Gemma's.

    Specials first (Llama: `<unk> <s> </s>`; Gemma: `<pad> <eos> <bos> <unk> <mask>` and two chat markers), the 256 byte
    tokens `<0x00>`..`<0xFF>`, single characters (a few non-ASCII ones; others such as "ñ", "中" or emoji fall back
    to bytes), then pieces joined from two earlier ones, filled up to `vocab_size`. The merges are every split of a
    piece into two vocabulary pieces, ordered by the piece (what transformers' SentencePiece converter writes).

    `kind="llama"`: transformers' `LlamaTokenizer` (a `Metaspace` pre-tokenizer that prepends "▁"), or with
    `legacy=True` Llama 2's original tokenizer.json form (normalizer `Prepend("▁")` + `Replace(" ", "▁")`) wrapped in
    a `PreTrainedTokenizerFast`. `kind="gemma"`: transformers' `GemmaTokenizer` (`Replace(" ", "▁")`, no prefix).
    Both add BOS.
    """
    from tokenizers import normalizers  # noqa: PLC0415 - only these tests build SentencePiece-style tokenizers
    from transformers import GemmaTokenizer, LlamaTokenizer  # noqa: PLC0415

    if kind == "gemma":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    else:
        specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in ["▁", *"abcdefghijklmnopqrstuvwxyz", *"THS,.!?'", "é", "ü", "ß", "—"]:
        vocab.setdefault(c, len(vocab))
    for left, right in SPM_JOINS:
        assert left in vocab and right in vocab, (left, right)
        vocab.setdefault(left + right, len(vocab))
    letters = "etaoinsrhdlcu"
    for a in ["▁", *letters]:
        for b in letters:
            if len(vocab) < vocab_size:
                vocab.setdefault(a + b, len(vocab))
    assert len(vocab) == vocab_size, len(vocab)
    merges = []
    for piece in sorted(vocab, key=vocab.get):
        if piece in specials or piece.startswith("<0x"):
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        merges += sorted(
            ((a, b) for a, b in splits if a in vocab and b in vocab), key=lambda m: (vocab[m[0]], vocab[m[1]])
        )
    if kind == "gemma":
        tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template = (
            "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        )
        return tok
    if not legacy:
        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    else:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
        )
    tok.chat_template = "{% for m in messages %}<s>[INST] {{ m['content'] }} [/INST]{% endfor %}"
    return tok


def byte_tokens(tok) -> list[int]:
    """The ids of a SentencePiece-style tokenizer's byte tokens `<0x00>`..`<0xFF>`."""
    return sorted(i for t, i in tok.get_vocab().items() if t.startswith("<0x") and len(t) == 6)


def gguf_model(
    name: str, shapes: list[dict] | None = None, seed: int = 0, config=None, **overrides
) -> torch.nn.Module:
    """The tiny causal LM of family `name` (or of `config`) with sharpened weights; with `shapes`, a slim one."""
    if config is not None:
        model = tiny_model(name, "AutoModelForCausalLM", seed, config=config, eval_mode=True)
    else:
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


def require_llama_cpp() -> None:
    """Fail (or, with `HF_HESSO_SKIP_LLAMA_CPP=1`, skip) the calling test when llama.cpp (`xllamacpp`) is missing."""
    try:
        import xllamacpp  # noqa: F401, PLC0415 - optional test dependency
    except ImportError as err:
        if os.environ.get(SKIP_LLAMA_CPP_ENV) == "1":
            pytest.skip(f"xllamacpp is not installed and {SKIP_LLAMA_CPP_ENV}=1")
        pytest.fail(
            f"llama.cpp for the GGUF round trips is missing ({err}): install it with "
            f'`pip install -e ".[llamacpp-test]"` (the README\'s test command does), or set {SKIP_LLAMA_CPP_ENV}=1 '
            "to skip these tests",
            pytrace=False,
        )


class LlamaCpp:
    """A GGUF file loaded by llama.cpp: its own server code (`xllamacpp.Server`), called in this process.

    `xllamacpp` exposes llama.cpp's server API, not its C API: what comes back for a position is the log-softmax of
    llama.cpp's raw logits (the server's `n_probs`, before any sampler) for its `top` most likely tokens, and greedy
    tokens come from the server's greedy sampler (temperature 0: the argmax of the raw logits).

    Args:
        path: The GGUF file.
        n_ctx: Context size (capped by llama.cpp at the model's trained context).
        f32_cache: Keep keys and values in float32 (no f16 rounding); `False` keeps llama.cpp's default f16 cache.
        threads: CPU threads for prompt and decode. One: llama.cpp's threads wait for each other at every op, so on
            a busy machine two threads were up to 10x slower than one (SmolLM2, a 19-token prompt: 65 s against 6.6 s).
        hold_back: Tokens never to sample (the byte tokens of a SentencePiece-style vocabulary): the server reports
            no log-probabilities for a sampled token that ends inside a UTF-8 character. They are still reported
            and compared (`n_probs` is computed before the samplers), and `greedy` takes the reported argmax.
    """

    def __init__(
        self, path, n_ctx: int = 64, f32_cache: bool = True, threads: int = 1, hold_back: list[int] | None = None
    ):
        self.hold_back = list(hold_back or [])
        require_llama_cpp()
        import xllamacpp as xlc  # noqa: PLC0415 - optional test dependency, checked above

        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.n_threads_http = 1
        # Off, as in llama-cpp-python: llama.cpp's CPU flash attention rounds the queries to f16 (tiny f32 models:
        # 9.5e-4 instead of 1.4e-6 from transformers).
        params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if f32_cache:
            params.cache_type_k = xlc.ggml_type.GGML_TYPE_F32
            params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
        params.cache_ram_mib = 0  # no host-memory prompt cache: every request starts from its own prompt
        params.warmup = False
        params.verbosity = 1  # errors only
        try:
            self.server = xlc.Server(params)
        except RuntimeError as err:  # the reason is in llama.cpp's log (stderr) above
            raise RuntimeError(f"llama.cpp could not load {path}: {err}") from err
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy

    def complete(self, body: dict) -> dict:
        """One `/completion` request, in process; llama.cpp's error is raised, naming the request."""
        out = self.server.handle_completions(body)
        if "error" in out or "choices" not in out:
            raise RuntimeError(f"llama.cpp refused {body}: {out}")
        return out

    def _post(self, route: str, body: dict) -> dict:
        """A request to one of the server's HTTP routes (on 127.0.0.1) that have no in-process entry point."""
        req = urllib.request.Request(
            self.server.listening_address + route,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with self._http.open(req, timeout=60) as resp:
            return json.loads(resp.read())

    def props(self) -> dict:
        """The server's `/props`: chat template, BOS/EOS token text, default generation settings."""
        with self._http.open(self.server.listening_address + "/props", timeout=60) as resp:
            return json.loads(resp.read())

    def tokenize(self, text: str, special: bool) -> list[int]:
        """llama.cpp's tokens for `text`, without BOS/EOS; `special`: parse special-token text (chat markup)."""
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": special})["tokens"]

    def logprobs(self, ids: list[int], n_vocab: int, top: int | None = None) -> np.ndarray:
        """Per position of `ids`: log-probabilities of the next token, shape (len(ids), n_vocab).

        Each row comes from its own prompt `ids[: i + 1]`, evaluated as one batch (no cached prefix). Only the
        `top` most likely tokens of each row are filled (all of them by default), the others are NaN.
        """
        out = np.full((len(ids), n_vocab), np.nan)
        for i in range(len(ids)):
            body = {"prompt": ids[: i + 1], "n_predict": 1, "temperature": 0, "n_probs": top or n_vocab}
            if self.hold_back:  # never sampled, still reported: n_probs reads the logits before the samplers
                body["logit_bias"] = [[t, False] for t in self.hold_back]
            step = self.complete({**body, "cache_prompt": False})["choices"][0]["logprobs"]["content"][0]
            for entry in step["top_logprobs"]:
                out[i, entry["id"]] = entry["logprob"]
        if top is None and np.isnan(out).any():
            raise RuntimeError(
                f"llama.cpp returned {np.isfinite(out).sum(-1).tolist()} of {n_vocab} log-probabilities"
            )
        return out

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """`n` tokens of llama.cpp's greedy decoding after `ids` (EOS is a token like any other, as in `hf_greedy`).

        With `hold_back` tokens, each token is the most likely one that llama.cpp reports for the sequence so far
        (the argmax of its logits, as the greedy sampler takes), one request per token.
        """
        out: list[int] = []
        if self.hold_back:
            while len(out) < n:
                body = {"prompt": ids + out, "n_predict": 1, "temperature": 0, "n_probs": 1, "cache_prompt": False}
                body["logit_bias"] = [[t, False] for t in self.hold_back]
                step = self.complete(body)["choices"][0]["logprobs"]["content"][0]
                out.append(step["top_logprobs"][0]["id"])
            return out
        while len(out) < n:  # the server stops at an end-of-generation token: go on after it
            choice = self.complete({"prompt": ids + out, "n_predict": n - len(out), "temperature": 0, "n_probs": 1})[
                "choices"
            ][0]
            new = [step["id"] for step in choice["logprobs"]["content"]]
            if not new:
                raise RuntimeError(f"llama.cpp generated nothing after {ids + out}: {choice}")
            out += new
        return out


def llama_cpp_model(path, n_ctx: int = 64, f32_cache: bool = True, hold_back: list[int] | None = None) -> LlamaCpp:
    return LlamaCpp(path, n_ctx=n_ctx, f32_cache=f32_cache, hold_back=hold_back)


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    """transformers' log-probabilities of the next token at every position of `ids` (float64)."""
    return torch.log_softmax(torch.from_numpy(hf_logits(model, ids)).double(), -1).numpy()


def max_diff(cpp: np.ndarray, ref: np.ndarray) -> float:
    """Max |difference| over the entries llama.cpp returned (the NaN ones are not); every row must have some."""
    assert np.isfinite(cpp).any(axis=-1).all(), "llama.cpp returned no log-probabilities for a position"
    return float(np.nanmax(np.abs(cpp - ref)))


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
