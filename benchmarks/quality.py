# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Quality at equal training budget: dense fine-tuning, one-shot magnitude / Taylor pruning + fine-tuning, HESSO and
HESSO-CRIC, on held-out BBC news.

Every method trains the same model from the same pretrained weights with the same `transformers.Trainer` loop: same
optimizer (AdamW), steps, batch size, data order (same seed), learning-rate schedule; only the pruning differs.

- dense: no pruning (the reference).
- magnitude: before training, every group (from `build_groups`) is scored by its L2 norm; the groups are selected
  under the parameter budget exactly as HESSO selects them for `target_param_sparsity` (`HESSO.select`: the
  kind-relative per-parameter ranking, `select_redundant`, `ParamCounter`; see `benchmarks/common.py`), zeroed
  (`GroupSet.zero_`), and re-zeroed after every optimizer step while fine-tuning.
- taylor: the same, scored by first-order Taylor saliency, `sum over calibration batches of |w * grad|` summed over
  the group's elements (LLM-Pruner style), on `--calib_batches` training batches.
- hesso: `HESSOTrainer` with the same arguments plus the pruning schedule (SmolLM2 default: 3 warm-up steps, then 4
  periods of 4 steps, 21 steps of recovery; each selection averages the scores of 4 steps, `saliency_steps=4`, so
  that from step 1 to 16 every step's batch is scored once), scoring with the paper's criteria (0.2 each of the
  five, update direction).
- hesso-grad: the same, scoring with the elementwise Taylor criterion on the raw gradient
  (`importance_taylor_elementwise=1`, the others 0, `saliency_direction="gradient"`).
- hesso-cric: hesso-grad with `cric=True`: warm-up, CRIC's probes and cycles as extra steps on top of the common
  budget (reported with the CPU memory of its parameter cache), one projection period as long as HESSO's pruning
  phase, the same recovery; `saliency_steps=1` (CRIC accumulates its own scores over its cycles).

The column "when pruning completes" scores the model the moment its last groups are zero: before any fine-tuning
for the one-shot methods, at HESSO's (CRIC's) last pruning step for the others.

SmolLM2-135M on BBC news: perplexity on `--eval_blocks` blocks of the test split, at 20% and 50% of the prunable
parameters (the dense reference is trained once). all-MiniLM-L6-v2 on BBC topics: accuracy on the test split, at 50%.
The defaults fit a 2-core CPU (about 25 min for SmolLM2, a few minutes for MiniLM); scale up with the flags:

    python benchmarks/quality.py
    python benchmarks/quality.py --only llama20 bert
    python benchmarks/quality.py --max_steps 200 --start_pruning_step 40 --pruning_steps 120 --eval_blocks 64
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# The demo data loaders (SmolLM2, BBC news, perplexity) live beside the recipes, outside the library.
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "recipes"))

import argparse
import math
import sys
import tempfile
import time

import torch
from common import machine, magnitude_scores, removed_fraction, select_budget
from resources import (
    accuracy,
    classification_features,
    lm_blocks,
    load_bbc_news,
    load_minilm,
    load_smollm2,
    perplexity,
)
from transformers import (
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_hesso import HESSOConfig, HESSOTrainer, build_groups
from hf_hesso.config import GRADIENT_SALIENCY
from hf_hesso.groups import GroupSet

METHODS = ("dense", "magnitude", "taylor", "hesso", "hesso-grad", "hesso-cric")
PARTS = ("llama20", "llama50", "bert")


class HoldZeros(TrainerCallback):
    """Re-zeroes the one-shot-pruned groups after every optimizer step (AdamW's moments would revive them)."""

    def __init__(self, groups: GroupSet, selected: torch.Tensor):
        self.groups = groups
        self.selected = selected

    def on_step_end(self, args, state, control, **kwargs):
        self.groups.zero_(None, self.selected)


class AtPruningEnd(TrainerCallback):
    """Scores the model once, at the optimizer step where HESSO's (or CRIC's) last groups reach exactly zero."""

    def __init__(self, evaluate):
        self.evaluate = evaluate
        self.trainer = None
        self.value = None

    def on_step_end(self, args, state, control, **kwargs):
        opt = self.trainer.hesso_optimizer
        if self.value is None and opt.num_steps >= opt.pruning_end_step:
            self.value = self.evaluate()


def taylor_scores(model, groups: GroupSet, batches: list[dict]) -> torch.Tensor:
    """Per group: sum over `batches` of |w * dL/dw| over the group's elements (first-order Taylor, per batch)."""
    params = groups.parameters()
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the scores should not depend on the dropout draw
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            with torch.no_grad():
                for name, p in params.items():
                    acc[name].add_((p.detach() * p.grad).abs().float())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return torch.cat([b.sum_per_group(acc) for b in groups.blocks]).double()


def base_args(opts, out_dir: str, task: str) -> dict:
    if task == "llama":
        steps, batch, lr = opts.max_steps, opts.batch_size, opts.learning_rate
    else:
        steps, batch, lr = opts.bert_steps, opts.bert_batch_size, opts.bert_learning_rate
    return dict(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, steps // 10),
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        seed=opts.seed,
        disable_tqdm=True,
        use_cpu=True,
    )


def hesso_args(opts, task: str, sparsity: float) -> dict:
    if task == "llama":
        start, steps = opts.start_pruning_step, opts.pruning_steps
    else:
        start, steps = opts.bert_start_pruning_step, opts.bert_pruning_steps
    return dict(
        target_param_sparsity=sparsity,
        start_pruning_step=start,
        pruning_periods=opts.pruning_periods,
        pruning_steps=steps,
        saliency_steps=opts.saliency_steps if task == "llama" else opts.bert_saliency_steps,
    )


def run_method(opts, task: str, method: str, sparsity: float, data: dict) -> dict:
    """Train one model with one method; returns its scores."""
    start = time.perf_counter()
    set_seed(opts.seed)
    if task == "llama":
        model, tokenizer = load_smollm2()
        collator = default_data_collator
    else:
        model, tokenizer = load_minilm(num_labels=data["num_labels"])
        collator = DataCollatorWithPadding(tokenizer)
    model.train()

    def evaluate() -> float:
        if task == "llama":
            return perplexity(model, data["test"], opts.eval_batch_size)
        return accuracy(model, data["test"], tokenizer, opts.eval_batch_size)

    row: dict = {"method": method, "sparsity": sparsity if method != "dense" else 0.0}
    callbacks = []
    at_end = None  # HESSO methods: scores the model when its last groups reach zero
    with tempfile.TemporaryDirectory() as out_dir:
        common_args = base_args(opts, out_dir, task)
        if method in ("dense", "magnitude", "taylor"):
            if method != "dense":
                groups = build_groups(model)
                if method == "magnitude":
                    scores = magnitude_scores(groups)
                else:
                    rows = [
                        data["train"][i]
                        for i in range(opts.calib_batches * common_args["per_device_train_batch_size"])
                    ]
                    size = common_args["per_device_train_batch_size"]
                    batches = [collator(rows[i : i + size]) for i in range(0, len(rows), size)]
                    scores = taylor_scores(model, groups, batches)
                selected = select_budget(groups, scores, sparsity)
                groups.zero_(model, selected)
                row["when_pruned"] = evaluate()
                callbacks.append(HoldZeros(groups, selected))
            trainer = Trainer(
                model=model,
                args=TrainingArguments(**common_args),
                train_dataset=data["train"],
                data_collator=collator,
                callbacks=callbacks,
            )
        else:
            extra = GRADIENT_SALIENCY if method in ("hesso-grad", "hesso-cric") else {}
            if method == "hesso-cric":
                # CRIC runs HESSO's warm-up, then its probes and cycles, which are extra steps on top of the common
                # budget (probe steps take no base step), then one projection period as long as HESSO's whole
                # pruning phase, then the same recovery. Planned for the worst case (all cycles), as the Trainer
                # checks; the learning-rate warm-up stays that of the common budget.
                hesso = hesso_args(opts, task, sparsity)
                groups = build_groups(model)
                blocks = len(groups.blocks)
                ratios = opts.cric_trial_ratios
                row["extra_steps_planned"] = 1 + blocks * len(ratios) + opts.cric_max_cycles * opts.cric_sampling_steps
                common_args["max_steps"] += row["extra_steps_planned"]
                extra = dict(
                    **GRADIENT_SALIENCY,
                    cric=True,
                    saliency_steps=1,
                    pruning_periods=1,
                    pruning_steps=hesso["pruning_steps"],
                    cric_trial_ratios=ratios,
                    cric_max_cycles=opts.cric_max_cycles,
                    cric_sampling_steps=opts.cric_sampling_steps,
                )
                row["cric_cache_mib"] = sum(p.numel() * p.element_size() for p in groups.parameters().values()) / 2**20
            at_end = AtPruningEnd(evaluate)
            trainer = HESSOTrainer(
                model=model,
                args=HESSOConfig(**common_args, **{**hesso_args(opts, task, sparsity), **extra}),
                train_dataset=data["train"],
                data_collator=collator,
                callbacks=[at_end],
            )
            at_end.trainer = trainer
        trainer.train()
        if at_end is not None:
            row["when_pruned"] = at_end.value
        if method == "hesso-cric":
            opt = trainer.hesso_optimizer
            row["cycles"] = opt.num_cycles
            row["probes"] = opt.probe_loss_ratios.numel()
            row["cric_steps"] = 1 + row["probes"] + opt.num_cycles * opt.sampling_steps
    model = trainer.model
    row["score"] = evaluate()
    row["removed"] = removed_fraction(build_groups(model), model) if method != "dense" else 0.0
    row["seconds"] = time.perf_counter() - start
    return row


def fmt_score(task: str, value: float | None) -> str:
    if value is None:
        return ""
    if task == "llama":
        return f"{value:.2f}" if math.isfinite(value) and value < 1e6 else f"{value:.3g}"
    return f"{value:.1%}"


def print_table(task: str, rows: list[dict], reference: float | None) -> None:
    metric = "test perplexity (lower is better)" if task == "llama" else "test accuracy"
    ratio = "/ dense" if task == "llama" else "- dense"
    print(
        f"\n| sparsity | method | {metric} | {ratio} | when pruning completes | prunable params removed | time (s) "
        "| extra cost |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = ""
        if reference is not None:
            rel = f"{r['score'] / reference:.3f}x" if task == "llama" else f"{(r['score'] - reference) * 100:+.1f} pt"
        cost = ""
        if "cric_steps" in r:
            cost = (
                f"+{r['cric_steps']} steps ({r['probes']} probes, "
                f"{r['cycles']} cycles; planned {r['extra_steps_planned']}), CPU cache {r['cric_cache_mib']:.0f} MiB"
            )
        print(
            f"| {r['sparsity']:.0%} | {r['method']} | {fmt_score(task, r['score'])} | {rel} | "
            f"{fmt_score(task, r.get('when_pruned'))} | {r['removed']:.1%} | {r['seconds']:.0f} | {cost} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="Parts to run, in order.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib_batches", type=int, default=4, help="Training batches scored for Taylor.")
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--pruning_periods", type=int, default=4)
    parser.add_argument("--cric_trial_ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--cric_max_cycles", type=int, default=2)
    parser.add_argument("--cric_sampling_steps", type=int, default=4)
    # SmolLM2
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--eval_blocks", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--start_pruning_step", type=int, default=3)
    parser.add_argument("--pruning_steps", type=int, default=16)
    parser.add_argument("--saliency_steps", type=int, default=4, help="Batches each HESSO selection averages.")
    # MiniLM
    parser.add_argument("--bert_steps", type=int, default=60)
    parser.add_argument("--bert_batch_size", type=int, default=16)
    parser.add_argument("--bert_max_length", type=int, default=96)
    parser.add_argument("--bert_learning_rate", type=float, default=1e-4)
    parser.add_argument("--bert_start_pruning_step", type=int, default=10)
    parser.add_argument("--bert_pruning_steps", type=int, default=40)
    parser.add_argument("--bert_saliency_steps", type=int, default=4)
    opts = parser.parse_args(argv)

    start = time.perf_counter()
    print(f"Machine: {machine()}")
    shown = sys.argv[1:] if argv is None else argv
    print(f"Command: python benchmarks/quality.py {' '.join(shown)}".rstrip())
    bbc = load_bbc_news(seed=0)
    llama_rows: list[dict] = []
    dense_ppl: float | None = None
    bert_rows: list[dict] = []
    for part in opts.only:
        task = "bert" if part == "bert" else "llama"
        sparsity = {"llama20": 0.2, "llama50": 0.5, "bert": 0.5}[part]
        if task == "llama":
            _, tokenizer = load_smollm2()
            data = {
                "train": lm_blocks(bbc["train"], tokenizer, opts.seq_len),
                "test": lm_blocks(bbc["test"], tokenizer, opts.seq_len, max_blocks=opts.eval_blocks),
            }
        else:
            _, tokenizer = load_minilm()
            features = classification_features(bbc, tokenizer, opts.bert_max_length)
            data = {
                "train": features["train"],
                "test": features["test"],
                "num_labels": len(bbc["train"].features["label"].names),
            }
        rows = llama_rows if task == "llama" else bert_rows
        for method in opts.methods:
            if method == "dense" and task == "llama" and dense_ppl is not None:
                continue  # one dense reference serves both sparsities
            row = run_method(opts, task, method, sparsity, data)
            rows.append(row)
            if method == "dense" and task == "llama":
                dense_ppl = row["score"]
            print(f"[{part}] {row}", flush=True)
        reference = dense_ppl if task == "llama" else next((r["score"] for r in rows if r["method"] == "dense"), None)
        print(f"\n## after {part} ({time.perf_counter() - start:.0f} s so far)")
        print_table(task, rows, reference)

    print(f"\n# Results ({machine()})")
    if llama_rows:
        print(
            f"\nSmolLM2-135M, BBC news, {opts.max_steps} steps x {opts.batch_size} x {opts.seq_len} tokens, "
            f"perplexity on {opts.eval_blocks} x {opts.seq_len} test tokens:"
        )
        print_table("llama", llama_rows, dense_ppl)
    if bert_rows:
        reference = next((r["score"] for r in bert_rows if r["method"] == "dense"), None)
        print(
            f"\nall-MiniLM-L6-v2, BBC topics, {opts.bert_steps} steps x {opts.bert_batch_size} articles "
            f"(first {opts.bert_max_length} tokens), accuracy on the test split:"
        )
        print_table("bert", bert_rows, reference)
    print(f"\nRun time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
