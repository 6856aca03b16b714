# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Fine-tune all-MiniLM-L6-v2 (BERT family) on BBC news topics, then prune it with HESSO while it keeps training.

Two phases with the same data and batch size: a dense fine-tuning (`--dense_steps`, plain `Trainer`) gives the
baseline, then `HESSOTrainer` removes `--target_param_sparsity` of the prunable parameters (attention heads and
MLP channels) while training on. It prints the test accuracy of the fine-tuned and of the pruned model and the
size, and writes the slim model to `--output_dir`. The default run takes a few minutes on a 2-core CPU:

    python recipes/bert_prune.py
    python recipes/bert_prune.py --target_param_sparsity 0.5 --max_steps 300 --pruning_steps 200 --max_length 256

Every `HESSOConfig` / `TrainingArguments` flag applies to the pruning phase (`--help` lists them with this
recipe's defaults). `--model_name_or_path` takes any supported encoder instead of MiniLM; `--tiny` swaps in a tiny
random BERT with the real tokenizer for smoke tests.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

from resources import accuracy, classification_features, load_bbc_news, load_minilm, minilm_dir, tiny_bert
from script_args import parse_script_args
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_hesso import HESSOConfig, HESSOTrainer
from hf_hesso.slim.selfcheck import require_prunable


@dataclass
class ScriptArguments:
    """Arguments of this recipe; the pruning-phase arguments are those of `HESSOConfig`."""

    dense_steps: int = field(
        default=60, metadata={"help": "Optimizer steps of dense fine-tuning before pruning (0: prune at once)."}
    )
    dense_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the dense phase."})
    max_length: int = field(default=96, metadata={"help": "Tokens kept from the start of every article."})
    eval_batch_size: int = field(default=64, metadata={"help": "Examples per forward pass when scoring accuracy."})
    data_seed_split: int = field(default=0, metadata={"help": "Seed of the BBC train/validation/test split."})
    tiny: bool = field(
        default=False, metadata={"help": "Use a tiny random BERT (real tokenizer) instead of MiniLM: smoke tests."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A directory or Hub id of any supported encoder (BERT, RoBERTa, DeBERTa-v2, ModernBERT; see "
            "docs/architectures.md), loaded with a new classification head. Default: the offline all-MiniLM-L6-v2."
        },
    )


# This recipe's defaults for HESSOConfig (the pruning phase); any flag on the command line overrides them.
DEFAULTS = dict(
    output_dir="outputs/minilm-bbc-hesso",
    target_param_sparsity=0.3,
    max_steps=60,
    start_pruning_step=0,
    pruning_periods=4,
    pruning_steps=40,
    per_device_train_batch_size=16,
    learning_rate=1e-4,
    lr_scheduler_type="constant",
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    seed=0,
)


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, HESSOConfig]:
    return parse_script_args(ScriptArguments, DEFAULTS, argv)


def load_model(script: ScriptArguments, num_labels: int, **labels):
    """The encoder (with a new classification head of `num_labels`) and its tokenizer."""
    if script.model_name_or_path:
        # Fail before loading any weights when hf_hesso cannot prune the architecture.
        require_prunable(AutoConfig.from_pretrained(script.model_name_or_path))
        model = AutoModelForSequenceClassification.from_pretrained(
            script.model_name_or_path, num_labels=num_labels, **labels
        )
        return model, AutoTokenizer.from_pretrained(script.model_name_or_path)
    if script.tiny:
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        return tiny_bert(vocab_size=len(tokenizer), num_labels=num_labels, **labels), tokenizer
    return load_minilm(num_labels=num_labels, **labels)


def main(argv: list[str] | None = None) -> dict[str, float]:
    script, args = parse_args(argv)
    set_seed(args.seed)
    start = time.perf_counter()
    bbc = load_bbc_news(seed=script.data_seed_split)
    topics = bbc["train"].features["label"].names
    labels = {"id2label": dict(enumerate(topics)), "label2id": {t: i for i, t in enumerate(topics)}}
    model, tokenizer = load_model(script, num_labels=len(topics), **labels)
    data = classification_features(bbc, tokenizer, script.max_length)
    collator = DataCollatorWithPadding(tokenizer)

    if script.dense_steps > 0:
        # The dense phase saves nothing; its Trainer still wants an output folder.
        dense_dir = tempfile.TemporaryDirectory()
        dense_args = TrainingArguments(
            output_dir=dense_dir.name,
            max_steps=script.dense_steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            learning_rate=script.dense_learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=max(1, script.dense_steps // 10),
            logging_steps=args.logging_steps,
            save_strategy="no",
            report_to=args.report_to,
            seed=args.seed,
            disable_tqdm=args.disable_tqdm,
            use_cpu=args.use_cpu,
            ddp_backend=args.ddp_backend,
        )
        Trainer(model=model, args=dense_args, train_dataset=data["train"], data_collator=collator).train()
        dense_dir.cleanup()
    acc_before = accuracy(model, data["test"], tokenizer, script.eval_batch_size)
    params_before = sum(p.numel() for p in model.parameters())

    trainer = HESSOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=collator,
    )
    trainer.train()
    trainer.save_model()  # the slim model, with tokenizer and model card
    if not trainer.is_world_process_zero():
        return {}

    # Score what was written, as anyone would load it.
    slim = AutoModelForSequenceClassification.from_pretrained(args.output_dir, trust_remote_code=True)
    acc_after = accuracy(slim, data["test"], tokenizer, script.eval_batch_size)
    params_after = sum(p.numel() for p in slim.parameters())
    results = {
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "params_before": params_before,
        "params_after": params_after,
        "seconds": time.perf_counter() - start,
    }
    stage = f"after {script.dense_steps} dense steps" if script.dense_steps > 0 else "before training"
    print(
        f"\nTest accuracy ({len(data['test'])} BBC articles): {acc_before:.1%} {stage}, {acc_after:.1%} after pruning"
    )
    target = (
        f"{args.target_param_sparsity:.0%} of the prunable parameters"
        if args.target_param_sparsity is not None
        else f"{args.target_group_sparsity:.0%} of the prunable groups"
    )
    print(
        f"Parameters: {params_before:,} -> {params_after:,} "
        f"({1 - params_after / params_before:.1%} fewer; target: remove {target})"
    )
    print(f"Slim model written to {args.output_dir} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
