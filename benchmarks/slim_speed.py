# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Speed of slim SmolLM2-135M against the dense model, and against the ideal speed-up from the FLOP count.

For every sparsity (fraction of the prunable parameters) the lowest-magnitude groups are zeroed under the parameter
budget rule of HESSO (`benchmarks/common.select_budget`: kind-relative per-parameter ranking, `select_redundant`,
`ParamCounter`), then `slim_model` removes them. Which groups go does not matter for speed, only how many of each
kind. Measured, dense vs slim, in one process with the repetitions interleaved so that all models see the same
machine load (median of `--reps`), under `torch.inference_mode` with the same thread count:

- forward latency of a batch of `--batch` x `--seq` tokens;
- per-token decode latency at batch 1 with a KV cache (`--decode_prompt` prompt tokens, then `--decode_tokens`
  greedy steps, one token each; the prompt pass is not timed).

Four shapes per sparsity (`--shapes`): `free` (width kinds, every layer its own widths, the default HESSO run),
`uniform` (width kinds with `layer_shapes="uniform"`: every layer the same widths, loadable as the stock class),
`sublayers` (only the `attention_sublayer` / `mlp_sublayer` kinds: depth pruning), `all` (width and sublayer kinds
ranked together: what HESSO chooses).

The ideal speed-up is dense FLOPs / slim FLOPs for the same input, counted from the shapes: 2 x in x out per token
for every `nn.Linear` of the model (the projections of every layer and the LM head, which is not pruned), plus
2 x 2 x heads x head_dim per key attended to (Q K^T and A V, causal: position t attends to t keys; while decoding,
to the whole cache). Norms, activations, RoPE and softmax are left out (elementwise, under 2% of the FLOPs here).
The realised fraction is measured speed-up / ideal speed-up.

    python benchmarks/slim_speed.py
    python benchmarks/slim_speed.py --sparsities 0.2 0.5 --reps 5 --threads 2
    python benchmarks/slim_speed.py --shapes free uniform sublayers all
    python benchmarks/slim_speed.py --llama_cpp --gguf_dtype f16   # adds the llama.cpp decode column

With `--llama_cpp` the same dense and slim models are also exported to GGUF and decoded by llama.cpp
(`benchmarks/gguf_speed.py`, needs `pip install -e .[gguf,llamacpp-test]`), same threads, in this process.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# The demo data loaders (SmolLM2, BBC news, perplexity) live beside the recipes, outside the library.
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "recipes"))

import argparse
import copy
import statistics
import tempfile
import time

import torch
from common import machine, magnitude_scores, removed_fraction, select_budget
from resources import load_smollm2
from torch import nn

from hf_hesso import build_groups, slim_model
from hf_hesso.groups import KINDS, SUBLAYER_KINDS
from hf_hesso.modeling.architectures import normalize_config
from hf_hesso.slim import current_layer_shapes


def flops(model: nn.Module, tokens: int, keys_attended: float) -> float:
    """FLOPs of `tokens` tokens that attend to `keys_attended` keys in all (summed over the tokens)."""
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    head_dim = normalize_config(model.config).head_dim
    heads = sum(s.num_attention_heads for s in current_layer_shapes(model))
    return 2.0 * linear * tokens + 4.0 * heads * head_dim * keys_attended


def forward_flops(model: nn.Module, batch: int, seq: int) -> float:
    return flops(model, batch * seq, batch * seq * (seq + 1) / 2)


def decode_flops(model: nn.Module, prompt: int, steps: int) -> float:
    # Step i (0-based) feeds one token at position prompt + i: it attends to prompt + i + 1 keys.
    return flops(model, steps, sum(prompt + i + 1 for i in range(steps)))


@torch.inference_mode()
def time_forward(model: nn.Module, input_ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Mean seconds per decoded token (batch 1, KV cache); the prompt pass is not timed."""
    out = model(input_ids=prompt, use_cache=True)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


# shape name -> (group kinds, layer_shapes)
SHAPES = {
    "free": (None, "free"),
    "uniform": (None, "uniform"),
    "sublayers": (list(SUBLAYER_KINDS), "free"),
    "all": (list(KINDS), "free"),
}


def build_slim(dense: nn.Module, sparsity: float, shape: str = "free") -> tuple[nn.Module, float, float]:
    """A slim copy with the lowest-magnitude groups removed; returns it, the removed fraction and a logit check."""
    model = copy.deepcopy(dense)
    kinds, layer_shapes = SHAPES[shape]
    groups = build_groups(model, kinds=kinds)
    groups.zero_(model, select_budget(groups, magnitude_scores(groups), sparsity, layer_shapes))
    fraction = removed_fraction(groups, model)
    probe = torch.arange(100, 132).unsqueeze(0)
    with torch.inference_mode():
        zeroed = model(input_ids=probe).logits
    slim_model(model, groups)
    with torch.inference_mode():
        diff = float((model(input_ids=probe).logits - zeroed).abs().max())
    model.eval()
    return model, fraction, diff


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--decode_prompt", type=int, default=128)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3, help="Timed repetitions per model (median), after a warm-up.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--llama_cpp", action="store_true", help="Add the llama.cpp decode column (GGUF export).")
    parser.add_argument("--gguf_dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--shapes", nargs="+", default=["free"], choices=list(SHAPES))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dense, tokenizer = load_smollm2()
    models = {"dense": (dense, 0.0, 0.0)}
    for s in args.sparsities:
        for shape in args.shapes:
            models[f"{shape} {s:.0%}"] = build_slim(dense, s, shape)

    gen = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    batch_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    prompt = torch.randint(0, vocab, (1, args.decode_prompt), generator=gen)
    fwd = {name: [] for name in models}
    dec = {name: [] for name in models}
    for rep in range(args.reps + 1):  # the first round is a warm-up and is discarded
        for name, (model, _, _) in models.items():
            f = time_forward(model, batch_ids)
            d = time_decode(model, prompt, args.decode_tokens)
            if rep > 0:
                fwd[name].append(f)
                dec[name].append(d)

    print(f"\nMachine: {machine()}")
    print(
        f"Forward: batch {args.batch} x {args.seq} tokens; decode: batch 1, {args.decode_prompt}-token prompt, "
        f"{args.decode_tokens} cached steps; median of {args.reps} interleaved repetitions after one warm-up.\n"
    )
    print(
        "| model | params | prunable removed | forward (s) | speed-up | ideal | realised | decode (ms/token) | "
        "speed-up | ideal | realised |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f0 = statistics.median(fwd["dense"])
    d0 = statistics.median(dec["dense"])
    ff0 = forward_flops(dense, args.batch, args.seq)
    df0 = decode_flops(dense, args.decode_prompt, args.decode_tokens)
    for name, (model, fraction, diff) in models.items():
        f = statistics.median(fwd[name])
        d = statistics.median(dec[name])
        ideal_f = ff0 / forward_flops(model, args.batch, args.seq)
        ideal_d = df0 / decode_flops(model, args.decode_prompt, args.decode_tokens)
        params = sum(p.numel() for p in model.parameters())
        if name != "dense":
            shapes = current_layer_shapes(model)
            name += (
                f" ({sum(not x.has_attention for x in shapes)} attn / {sum(not x.has_mlp for x in shapes)} mlp "
                f"removed, {sum(x.empty for x in shapes)} layers)"
            )
        print(
            f"| {name} | {params / 1e6:.1f}M | {fraction:.1%} | {f:.2f} | {f0 / f:.2f}x | {ideal_f:.2f}x | "
            f"{f0 / f / ideal_f:.2f} | {d * 1e3:.1f} | {d0 / d:.2f}x | {ideal_d:.2f}x | {d0 / d / ideal_d:.2f} |"
        )
        if name != "dense" and diff > 1e-3:
            print(f"  warning: slim logits differ from the zeroed model's by {diff:.2e}")
    print(
        "\nAll forward timings (s): " + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in v)}" for n, v in fwd.items())
    )
    print(
        "All decode timings (ms/token): "
        + "; ".join(f"{n}: {', '.join(f'{t * 1e3:.1f}' for t in v)}" for n, v in dec.items())
    )
    if args.llama_cpp:
        # llama.cpp (xllamacpp) is optional: imported only when its column is asked for.
        import gguf_speed  # noqa: PLC0415

        slim = {name: model for name, (model, _, _) in models.items()}
        threads = args.threads or torch.get_num_threads()
        prompt_ids = prompt[0].tolist()
        ideal = {n: df0 / decode_flops(m, args.decode_prompt, args.decode_tokens) for n, m in slim.items()}
        with tempfile.TemporaryDirectory() as workdir:
            timings, files = gguf_speed.measure(
                slim,
                tokenizer,
                dtype=args.gguf_dtype,
                threads=threads,
                prompt=prompt_ids,
                steps=args.decode_tokens,
                reps=args.reps,
                workdir=workdir,
            )
        gguf_speed.print_table(slim, timings, files, ideal, dtype=args.gguf_dtype, threads=threads)
    print(f"Run time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
