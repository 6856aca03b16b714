# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""How well each saliency setting of HESSO ranks the groups of a real LLM: one-shot perplexity right after pruning.

SmolLM2-135M is trained for `--warmup` AdamW steps on BBC news (4 x 128 tokens, lr 1e-4), then one more step is
taken the way HESSO takes its scoring step: the gradient `g` of that batch and the optimizer's update direction
`u = (p_before - p_after) / lr` are both recorded (the weights are put back). Each saliency setting scores every
group from `g` or `u` with HESSO's own code (`SaliencyAccumulator`, `saliency_scores`), the parameter budget is
selected with HESSO's own selection (`HESSO.select`), the selected groups are zeroed in a copy of the model and the
held-out perplexity is measured, with no fine-tuning. The activation criterion (Minitron: the magnitude of each
group's output, forward-only) is recorded by HESSO's own hooks (`ActivationRecorder`) on the forward pass of the
same scoring batch; it has no direction. The baseline, measured in the same process: the dense model's
perplexity after the same warm-up. Lower is better; it isolates the ranking from the training that HESSO does while
groups fade.

    python benchmarks/saliency_ranking.py [--sparsities 0.2 0.5] [--warmup 8] [--eval_blocks 16]
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# The demo data loaders (SmolLM2, BBC news, perplexity) live beside the recipes, outside the library.
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "recipes"))

import argparse
import copy
import dataclasses
import time

import torch
from common import machine, select_budget
from resources import lm_blocks, load_bbc_news, load_smollm2, perplexity
from transformers import default_data_collator

from hf_hesso import build_groups
from hf_hesso.groups import KINDS
from hf_hesso.optim.activation import ActivationRecorder
from hf_hesso.optim.saliency import PAPER_CRITERIA, SaliencyAccumulator, saliency_scores

SETTINGS = {
    "paper mix (0.2 x 5)": dict.fromkeys(PAPER_CRITERIA, 0.2),
    "taylor_first_order": {"taylor_first_order": 1.0},
    "taylor_elementwise": {"taylor_elementwise": 1.0},
    "activation": {"activation": 1.0},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--warmup", type=int, default=8, help="AdamW steps before scoring")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--eval_blocks", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    opts = parser.parse_args(argv)

    start = time.perf_counter()
    print(f"Machine: {machine()}")
    torch.manual_seed(0)
    bbc = load_bbc_news(seed=0)
    model, tokenizer = load_smollm2()
    train = lm_blocks(bbc["train"], tokenizer, opts.seq_len)
    test = lm_blocks(bbc["test"], tokenizer, opts.seq_len, max_blocks=opts.eval_blocks)
    size = opts.batch_size

    def batch(i: int) -> dict:
        return default_data_collator([train[j] for j in range(size * i, size * (i + 1))])

    opt = torch.optim.AdamW(model.parameters(), lr=opts.learning_rate)
    model.train()
    for i in range(opts.warmup):
        model(**batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
    groups = build_groups(model)
    params = groups.parameters()
    recorder = ActivationRecorder(groups)  # records the forward pass of the scoring batch only
    model(**batch(opts.warmup)).loss.backward()
    activations = recorder.pop()
    recorder.remove()
    gradient = {n: p.grad.detach().clone() for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.step()
    update = {n: (before[n] - p.detach()) / opts.learning_rate for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(before[n])
    opt.zero_grad()
    model.eval()
    dense = perplexity(model, test, 8)
    # The kind of every group, as HESSO ranks a parameter budget (scores normalised within each kind).
    kinds = torch.tensor([KINDS.index(k) for k in groups.kinds()], dtype=torch.long)

    print(f"\nSmolLM2-135M after {opts.warmup} AdamW steps: dense held-out perplexity {dense:.2f} (the baseline)")
    print("\n| criteria | direction | " + " | ".join(f"{s:.0%} removed" for s in opts.sparsities) + " |")
    print("|---|---|" + "---|" * len(opts.sparsities))
    for name, weights in ((n, SETTINGS[n]) for n in opts.settings):
        directions = (
            (("update", update), ("gradient", gradient)) if name != "activation" else (("(forward)", gradient),)
        )
        for direction, d in directions:
            acc = SaliencyAccumulator(groups)
            for n, p in params.items():
                acc.add(n, p.detach(), d[n])
            stats = dataclasses.replace(acc.finish(), act=activations)
            scores = saliency_scores(stats, weights, kinds=kinds)
            cells = []
            for sparsity in opts.sparsities:
                pruned = copy.deepcopy(model)
                build_groups(pruned).zero_(pruned, select_budget(groups, scores, sparsity))
                ppl = perplexity(pruned, test, 8)
                cells.append(f"{ppl:,.1f} ({ppl / dense:,.1f}x)")
                del pruned
            print(f"| {name} | {direction} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nRun time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
