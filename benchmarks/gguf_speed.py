# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""llama.cpp decode speed of slim SmolLM2-135M GGUF files against the dense GGUF, with the ideal speed-up.

The dense model and slim copies (lowest-magnitude groups removed under HESSO's budget rule, as in
`benchmarks/slim_speed.py`) are exported with `hf_hesso.export_gguf` at the same `--dtype` (uneven slim models as
llama.cpp's `deci` architecture, the dense one as `llama`), loaded by llama.cpp (the prebuilt `xllamacpp` wheel,
`pip install -e .[gguf,llamacpp-test]`: llama.cpp's own server code, called in this process) with the same
`--threads`, and timed in this one process, repetitions interleaved (median of `--reps` after a warm-up): a
`--decode_prompt` token prompt is evaluated (not timed), then `--decode_tokens` greedy tokens are generated one at a
time; the time per token is llama.cpp's own measurement of that generation phase (`timings.predicted_per_token_ms`).

The ideal speed-up is dense FLOPs / slim FLOPs of the same decode (`slim_speed.decode_flops`: every linear layer
including the LM head, plus attention over the cache); realised = measured speed-up / ideal.

    python benchmarks/gguf_speed.py
    python benchmarks/gguf_speed.py --sparsities 0.2 0.5 --dtype q8_0 --threads 2 --reps 5

`python benchmarks/slim_speed.py --llama_cpp` prints the same columns beside the PyTorch ones.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "recipes"))
_sys.path.insert(0, str(_Path(__file__).resolve().parent))

import argparse
import os
import statistics
import tempfile
import time

import slim_speed
import torch
import xllamacpp
from common import machine
from resources import load_smollm2

from hf_hesso import export_gguf


def load(path: str, *, threads: int, n_ctx: int) -> xllamacpp.Server:
    """llama.cpp's server for the GGUF file `path` (one slot, no HTTP use, errors-only log), in this process."""
    params = xllamacpp.CommonParams()
    params.model.path = path
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.n_batch = 512
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_threads_http = 1
    params.cache_ram_mib = 0
    params.verbosity = 1
    try:
        return xllamacpp.Server(params)
    except RuntimeError as err:  # llama.cpp printed the reason above
        raise RuntimeError(f"llama.cpp could not load {path}: {err}") from err


def time_decode(server: xllamacpp.Server, prompt: list[int], steps: int) -> float:
    """Seconds per generated token (batch 1, KV cache, greedy), as llama.cpp times it; the prompt is not timed."""
    body = {"prompt": prompt, "n_predict": steps, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    out = server.handle_completions(body)
    timings = out.get("timings", {})
    if timings.get("predicted_n") != steps:
        raise RuntimeError(f"llama.cpp generated {timings.get('predicted_n')} tokens, not {steps}: {out}")
    return timings["predicted_per_token_ms"] / 1e3


def measure(
    models: dict, tokenizer, *, dtype: str, threads: int, prompt: list[int], steps: int, reps: int, workdir: str
) -> tuple[dict[str, list[float]], dict[str, tuple[str, float]]]:
    """Export every model of `models` (name -> nn.Module), load it in llama.cpp, time decoding.

    Returns:
        `(timings, files)`: name -> seconds per token of every repetition; name -> (architecture, file MiB).
    """
    servers, files = {}, {}
    for name, model in models.items():
        path = os.path.join(workdir, name.replace(" ", "_").replace("%", "") + f".{dtype}.gguf")
        result = export_gguf(model, path, dtype, tokenizer=tokenizer)
        files[name] = (result.architecture, os.path.getsize(path) / 2**20)
        servers[name] = load(path, threads=threads, n_ctx=len(prompt) + steps + 8)
    timings: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(reps + 1):  # the first round is a warm-up and is discarded
        for name, server in servers.items():
            t = time_decode(server, prompt, steps)
            if rep > 0:
                timings[name].append(t)
    servers.clear()  # each server stops and frees its model when dropped
    return timings, files


def print_table(models: dict, timings, files, ideal: dict[str, float], *, dtype: str, threads: int) -> None:
    print(f"\nllama.cpp (xllamacpp {xllamacpp.__version__}), {dtype} GGUF, {threads} threads, decode at batch 1:\n")
    print("| model | llama.cpp arch | file (MiB) | decode (ms/token) | tokens/s | speed-up | ideal | realised |")
    print("|---|---|---|---|---|---|---|---|")
    d0 = statistics.median(timings["dense"])
    for name in models:
        d = statistics.median(timings[name])
        arch, mib = files[name]
        print(
            f"| {name} | {arch} | {mib:.0f} | {d * 1e3:.2f} | {1 / d:.0f} | {d0 / d:.2f}x | {ideal[name]:.2f}x | "
            f"{d0 / d / ideal[name]:.2f} |"
        )
    print(
        "All llama.cpp decode timings (ms/token): "
        + "; ".join(f"{n}: {', '.join(f'{t * 1e3:.2f}' for t in v)}" for n, v in timings.items())
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--decode_prompt", type=int, default=128)
    parser.add_argument("--decode_tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dense, tokenizer = load_smollm2()
    models = {"dense": dense}
    for s in args.sparsities:
        models[f"slim {s:.0%}"] = slim_speed.build_slim(dense, s)[0]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, dense.config.vocab_size, (args.decode_prompt,), generator=gen).tolist()
    f0 = slim_speed.decode_flops(dense, args.decode_prompt, args.decode_tokens)
    ideal = {n: f0 / slim_speed.decode_flops(m, args.decode_prompt, args.decode_tokens) for n, m in models.items()}
    with tempfile.TemporaryDirectory() as workdir:
        timings, files = measure(
            models,
            tokenizer,
            dtype=args.dtype,
            threads=args.threads,
            prompt=prompt,
            steps=args.decode_tokens,
            reps=args.reps,
            workdir=workdir,
        )
    print(f"\nMachine: {machine()}")
    print(
        f"Decode: {args.decode_prompt}-token prompt, {args.decode_tokens} steps; median of {args.reps} interleaved reps."
    )
    print_table(models, timings, files, ideal, dtype=args.dtype, threads=args.threads)
    print(f"Run time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
