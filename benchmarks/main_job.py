# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""The README's main job under other settings: which defaults keep general text best at the main job's budget.

Each run trains exactly as `recipes/llama_prune.py` does with the recipe's defaults plus the flags of one variant
(same data, seed, evaluation windows), scores the trained model (its pruned groups are exact zeros, so it computes
what the slim model computes) on the recipe's 32 windows of 512 tokens of BBC news test text and of Shakespeare's
comedies, counts the parameters of its slim copy, and appends one JSON line to `benchmarks/results/main_job.jsonl`
(the quality campaign's ledger functions: a run is recorded whole or not at all; a variant the ledger holds is
skipped). The unpruned model's figures are the recipe's 'before' figures, computed once per ledger.

    python benchmarks/main_job.py                       # every variant the ledger does not hold yet
    python benchmarks/main_job.py --variants default    # only these
    python benchmarks/main_job.py --table               # write the table into benchmarks/README.md

Each row records the run's effective settings (the recipe's defaults with the variant's flags applied); a run is the
same run when those settings are, so a row is re-run only where a default it relied on moves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama_prune as recipe  # noqa: E402
from quality import append_row, git_commit, read_ledger, run_key, write_between  # noqa: E402

LEDGER = ROOT / "benchmarks" / "results" / "main_job.jsonl"
README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- main-job-table:begin -->", "<!-- main-job-table:end -->"

# name -> the recipe's command-line flags. Every variant that settles the same budget removes the same parameters
# (21.2M of 134.5M): 20% of the attention + MLP parameters = 21.3% of query slots + MLP = 26.7% of the MLP = 15.8% of
# MLP + hidden channels (a hidden channel reaches every tensor on the residual stream, embeddings included).
ALL_KINDS = ["--prune_kinds", "kv_group", "query_slot", "mlp_channel"]
VARIANTS: dict[str, list[str]] = {
    "kv groups + query slots + MLP, lr 1e-4": [
        *ALL_KINDS,
        "--target_param_sparsity",
        "0.2",
        "--learning_rate",
        "1e-4",
    ],
    "kv groups + query slots + MLP, lr 1e-4, no distillation": [
        *ALL_KINDS,
        *["--target_param_sparsity", "0.2", "--learning_rate", "1e-4", "--distill", "false"],
    ],
    "kv groups + query slots + MLP, lr 1e-4, fading over steps 3-35": [
        *ALL_KINDS,
        *["--target_param_sparsity", "0.2", "--learning_rate", "1e-4", "--pruning_steps", "32"],
    ],
    "kv groups + query slots + MLP, lr 3e-4": [
        *ALL_KINDS,
        "--target_param_sparsity",
        "0.2",
        "--learning_rate",
        "3e-4",
    ],
    "query slots + MLP at 20% (fewer parameters removed), lr 1e-4": [
        *["--prune_kinds", "query_slot", "mlp_channel"],
        *["--target_param_sparsity", "0.2", "--learning_rate", "1e-4"],
    ],
    "query slots + MLP, lr 3e-4": [
        *["--prune_kinds", "query_slot", "mlp_channel"],
        *["--target_param_sparsity", "0.213", "--learning_rate", "3e-4"],
    ],
    "MLP + hidden channels, lr 3e-4": [
        *["--prune_kinds", "mlp_channel", "hidden_channel"],
        *["--target_param_sparsity", "0.158", "--learning_rate", "3e-4"],
    ],
    "MLP only, lr 3e-4": [
        *["--prune_kinds", "mlp_channel", "--target_param_sparsity", "0.267", "--learning_rate", "3e-4"]
    ],
}


def _settings(flags: list[str], seed: int) -> tuple:
    script, args = recipe.parse_args([*flags, "--seed", str(seed), "--output_dir", "unused", "--report_to", "none"])
    return script, args


def evaluate(model, texts: dict, batch_size: int) -> dict[str, float]:
    return {name: recipe.perplexity(model, blocks, batch_size) for name, blocks in texts.items()}


def load_texts(script, tokenizer, bbc=None) -> dict:
    """The recipe's evaluation windows per text (`bbc`: the loaded BBC splits, when the caller has them)."""
    bbc = bbc or recipe.load_bbc_news(seed=script.data_seed_split)
    return {
        "bbc": recipe.spread_blocks(bbc["test"], tokenizer, script.eval_len, script.eval_blocks),
        "general": recipe.spread_blocks(recipe.load_shakespeare(), tokenizer, script.eval_len, script.eval_blocks),
    }


def run_variant(name: str, flags: list[str], seed: int) -> dict:
    from transformers import default_data_collator, set_seed

    from hf_hesso import HESSOTrainer, build_groups, slim_copy

    script, args = _settings(flags, seed)
    args.output_dir = str(ROOT / "outputs" / "main_job_variant")
    set_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = recipe.load_model(script)
    bbc = recipe.load_bbc_news(seed=script.data_seed_split)
    train = recipe.lm_blocks(bbc["train"], tokenizer, script.seq_len, max_blocks=script.train_blocks)
    texts = load_texts(script, tokenizer, bbc)
    params_before = sum(p.numel() for p in model.parameters())
    trainer = HESSOTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, data_collator=default_data_collator
    )
    trainer.train()
    after = evaluate(trainer.model, texts, script.eval_batch_size)
    groups = build_groups(trainer.model, kinds=args.prune_kinds, hidden_unit=args.hidden_channel_unit)
    slim, _ = slim_copy(trainer.model, groups)
    params_after = sum(p.numel() for p in slim.parameters())
    return {
        "variant": name,
        "flags": flags,
        "seed": seed,
        "ppl_bbc": after["bbc"],
        "ppl_general": after["general"],
        "params_before": params_before,
        "params_after": params_after,
        "removed_of_model": 1 - params_after / params_before,
        "settings": settings_of(flags, seed),
        "wall_s": time.perf_counter() - start,
    }


def settings_of(flags: list[str], seed: int) -> dict:
    """The run's effective settings: the recipe's defaults with `flags` applied (what makes two runs the same run)."""
    script, args = _settings(flags, seed)
    names = {k for k in recipe.DEFAULTS if k != "output_dir"} | {f[2:] for f in flags if f.startswith("--")}
    values = {k: getattr(args, k, getattr(script, k, None)) for k in sorted(names)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def key_of(flags: list[str], seed: int) -> str:
    return run_key(settings_of(flags, seed))


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r.get("variant") == "unpruned"), None)
    lines = []
    if base:
        lines.append(
            f"Unpruned SmolLM2-135M: BBC {base['ppl_bbc']:.2f}, general text {base['ppl_general']:.2f} "
            "(32 windows of 512 tokens each)."
        )
        lines.append("")
    lines += [
        "| variant | seed | removed (of the model) | BBC ppl | general ppl | general / unpruned |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r.get("variant") != "unpruned"), key=lambda r: (r["seed"], -r["ppl_general"])):
        ratio = f"{r['ppl_general'] / base['ppl_general']:.2f}x" if base else "-"
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['removed_of_model']:.1%} | {r['ppl_bbc']:.2f} | "
            f"{r['ppl_general']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def write_table(rows: list[dict], readme: Path = README) -> None:
    write_between(readme, BEGIN, END, "python benchmarks/main_job.py --table", LEDGER, table(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="Run only these (default: all).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ledger", type=Path, default=LEDGER)
    parser.add_argument("--table", action="store_true", help="Write the table into benchmarks/README.md and stop.")
    opts = parser.parse_args(argv)
    rows = read_ledger(opts.ledger)
    if opts.table:
        write_table(rows)
        print(table(rows))
        return
    if not any(r.get("variant") == "unpruned" for r in rows):
        script, _ = _settings([], 0)
        model, tokenizer = recipe.load_model(script)
        before = evaluate(model, load_texts(script, tokenizer), script.eval_batch_size)
        row = {"variant": "unpruned", "ppl_bbc": before["bbc"], "ppl_general": before["general"]}
        append_row(opts.ledger, {**row, "commit": git_commit(), "run_key": "unpruned"})
    done = {r.get("run_key") for r in read_ledger(opts.ledger)}
    for seed in opts.seeds:
        for name in opts.variants or list(VARIANTS):
            key = key_of(VARIANTS[name], seed)
            if key in done:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] start {name!r} seed {seed}", flush=True)
            row = run_variant(name, VARIANTS[name], seed)
            append_row(opts.ledger, {**row, "commit": git_commit(), "run_key": key})
            print(f"  general {row['ppl_general']:.2f}, BBC {row['ppl_bbc']:.2f}", flush=True)


if __name__ == "__main__":
    main()
