# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""The time and memory cost of distillation's teacher: `HESSOTrainer` steps with and without `distill=True`.

Each configuration runs in its own process (so that the peak resident memory, `ru_maxrss`, is its own), on a small
random LLaMA built from a config (no download), full fine-tuning with AdamW and the same pruning schedule. Reported:
the median time of an optimizer step (after the first two), the peak resident memory of the process, and the
parameter bytes of the student and the teacher (the teacher is a frozen fp32 copy: no gradient, no optimizer state).

    python benchmarks/distill_cost.py [--steps 12] [--hidden 512] [--layers 8] [--vocab 16384] [--seq_len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import machine


def worker(opts, distill: str) -> dict:
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from hf_hesso import HESSOConfig, HESSOTrainer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=opts.vocab,
        hidden_size=opts.hidden,
        intermediate_size=opts.hidden * 3,
        num_hidden_layers=opts.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=opts.seq_len,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    n = opts.steps * opts.batch_size
    ids = torch.randint(3, opts.vocab, (n, opts.seq_len), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    clock = Clock()
    extra = {}
    if distill != "none":
        extra = dict(distill=True, distill_top_k=None if distill == "full" else int(distill))
    with tempfile.TemporaryDirectory() as out:
        args = HESSOConfig(
            output_dir=out,
            max_steps=opts.steps,
            per_device_train_batch_size=opts.batch_size,
            learning_rate=1e-4,
            target_param_sparsity=0.2,
            start_pruning_step=2,
            pruning_periods=2,
            pruning_steps=opts.steps - 4,
            report_to="none",
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            use_cpu=True,
            **extra,
        )
        trainer = HESSOTrainer(model=model, args=args, train_dataset=data, callbacks=[clock])
        trainer.train()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "distill": distill,
        "step_s": statistics.median(clock.times[2:]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "student_mib": params / 2**20,
        "teacher_mib": params / 2**20 if distill != "none" else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--configs", nargs="+", default=["none", "full", "64"], help="none, full or a top-k")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker is not None:
        print(json.dumps(worker(opts, opts.worker)))
        return
    start = time.perf_counter()
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/distill_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    rows = []
    for name in opts.configs:
        argv_worker = [a for a in (sys.argv[1:] if argv is None else argv)] + ["--worker", name]
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv_worker], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]
    print(
        f"\nLLaMA {opts.layers} layers x hidden {opts.hidden}, vocab {opts.vocab}, batch {opts.batch_size} x "
        f"{opts.seq_len} tokens, fp32, CPU:"
    )
    print("\n| teacher | step time (s) | / no teacher | peak RSS (MiB) | + vs no teacher | teacher weights (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = {"none": "none", "full": "full KL"}.get(r["distill"], f"top-{r['distill']} KL")
        print(
            f"| {label} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f}x | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] - base['peak_rss_mib']:+.0f} | {r['teacher_mib']:.0f} |"
        )
    print(f"\nRun time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
