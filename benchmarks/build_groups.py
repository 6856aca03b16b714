"""Time `build_groups` on Llama-3-8B- and Mixtral-8x7B-shaped models built on the meta device (no weights, no memory).

Shapes: Llama-3-8B: 32 layers, hidden 4096, 32 query heads, 8 key/value heads, MLP 14336, vocab 128256.
Mixtral-8x7B: the same attention, 8 experts of width 14336 per layer (top-2), vocab 32000. Prints the median of
several runs and the group counts, as a ratio against the 1 s goal and against the 77 s that HESSO.md quotes for
the reference implementation's graph tracing of 32 layers (quoted, not measured here: the reference tracer is not
installed).

    python benchmarks/build_groups.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from hf_hesso.groups import build_groups

GOAL_S = 1.0
REFERENCE_TRACER_S = 77.0  # quoted in HESSO.md, not measured


def llama3_8b_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )


def mixtral_8x7b_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    measure("Llama-3-8B", LlamaForCausalLM, llama3_8b_config(), args.runs)
    measure("Mixtral-8x7B", MixtralForCausalLM, mixtral_8x7b_config(), args.runs)


def measure(name: str, cls, config, runs: int) -> None:
    start = time.perf_counter()
    with torch.device("meta"):
        model = cls(config)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())

    times = []
    groups = None
    for _ in range(runs):
        start = time.perf_counter()
        groups = build_groups(model)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)

    counts: dict[str, int] = {}
    for block in groups.blocks:
        counts[block.kind] = counts.get(block.kind, 0) + block.n
    print(f"model: {name} shape on meta, {params / 1e9:.2f} B parameters (built in {build_s:.2f} s)")
    print(
        f"groups: {len(groups):,} in {len(groups.blocks)} blocks; "
        + ", ".join(f"{k}={v:,}" for k, v in counts.items())
    )
    print(f"build_groups: median {median * 1000:.1f} ms over {runs} runs (min {min(times) * 1000:.1f} ms)")
    print(f"vs goal {GOAL_S:.0f} s: {median / GOAL_S:.4f}x ({'met' if median < GOAL_S else 'NOT met'})")
    print(
        f"vs reference tracer {REFERENCE_TRACER_S:.0f} s (quoted in HESSO.md, not measured): "
        f"{REFERENCE_TRACER_S / median:,.0f}x faster"
    )


if __name__ == "__main__":
    main()
