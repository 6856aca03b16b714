# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Prune SmolLM2-135M-Instruct (LLaMA family) to a parameter budget while training it on BBC news text.

The default run finishes in a few minutes on a 2-core CPU: 40 optimizer steps of 4 x 128 tokens, removing 20% of
the prunable parameters (attention heads, key/value groups, query slots, MLP channels). It prints the held-out
perplexity before and after and the model size, and writes the slim model to `--output_dir`:

    python recipes/llama_prune.py
    python recipes/llama_prune.py --max_steps 400 --pruning_steps 300 --start_pruning_step 50 \\
        --pruning_periods 6 --target_param_sparsity 0.4 --seq_len 512 --eval_blocks 64
    python recipes/llama_prune.py --lora_r 16 --learning_rate 1e-3        # LoRA adapters, one merged slim model
    python recipes/llama_prune.py --cric true --pruning_periods 1 --cric_trial_ratios 0.5 --cric_max_cycles 2 \\
        --cric_sampling_steps 4 --max_steps 140                          # CRIC: probes 90 blocks first
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/llama_prune.py

Every `HESSOConfig` / `TrainingArguments` flag applies (`--help` lists them with this recipe's defaults). Groups are
scored with HESSO's default saliency, the elementwise Taylor criterion on the raw gradient (`--saliency taylor`),
which ranks LLM groups far better than the paper's mix (README, *Quality*; `docs/saliency.md`), and every selection
averages the scores of up to 4 steps (`--saliency_steps`; fewer when the warm-up or a period is shorter). With
`--lora_r` the preset falls back to `taylor_first_order` on the update direction; `--saliency paper` scores with the
paper's mix, `--distill true` distils from the unpruned model (`docs/distillation.md`). The model and data come from
the offline packages of `requirements-data.txt`; `--tiny` swaps in a tiny random LLaMA with the real tokenizer for
smoke tests. `--model_name_or_path` takes any supported causal LM instead of SmolLM2.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from resources import (
    lm_blocks,
    load_bbc_news,
    load_smollm2,
    load_smollm2_tokenizer,
    perplexity,
    tiny_llama,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed

from hf_hesso import HESSOConfig, HESSOTrainer
from hf_hesso.config import parse_script_args
from hf_hesso.optim.presets import DEFAULT_SALIENCY_STEPS
from hf_hesso.slim.selfcheck import require_prunable

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ScriptArguments:
    """Arguments of this recipe; the training and pruning arguments are those of `HESSOConfig`."""

    seq_len: int = field(default=128, metadata={"help": "Tokens per training and evaluation block."})
    train_blocks: int | None = field(
        default=None, metadata={"help": "Keep only this many training blocks (default: the whole train split)."}
    )
    eval_blocks: int = field(
        default=16, metadata={"help": "Held-out blocks (from the test split) scored for perplexity."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass when scoring perplexity."})
    data_seed_split: int = field(default=0, metadata={"help": "Seed of the BBC train/validation/test split."})
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of the converted SmolLM2 (default: $HF_HESSO_CACHE or ~/.cache/hf_hesso/smollm2-135m)."
        },
    )
    tiny: bool = field(
        default=False, metadata={"help": "Use a tiny random LLaMA (real tokenizer) instead of SmolLM2: smoke tests."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A directory or Hub id of any supported causal LM (Llama, Mistral, Qwen2/3, Gemma-2/3, SmolLM3, Phi, "
            "GPT-2, GPT-NeoX, Starcoder2, Mixtral, Qwen-MoE; see docs/architectures.md). With LoRA, set "
            "`--lora_target_modules` to its projection names. Default: the offline SmolLM2-135M-Instruct."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={"help": "Train LoRA adapters of this rank instead of all weights (0: full fine-tuning)."},
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "Projections that get LoRA adapters."}
    )


# This recipe's defaults for HESSOConfig; any flag on the command line overrides them.
DEFAULTS = dict(
    output_dir="outputs/smollm2-135m-hesso",
    target_param_sparsity=0.2,
    max_steps=40,
    start_pruning_step=3,
    pruning_periods=4,
    pruning_steps=16,
    per_device_train_batch_size=4,
    learning_rate=1e-4,
    lr_scheduler_type="constant_with_warmup",
    warmup_steps=4,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    seed=0,
)


# Every selection averages the scores of up to this many steps (batches): HESSOConfig's default `saliency_steps`,
# capped by the warm-up and the period length of the schedule actually asked for. Not with CRIC.
SALIENCY_STEPS = DEFAULT_SALIENCY_STEPS


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, HESSOConfig]:
    argv = sys.argv[1:] if argv is None else argv
    return parse_script_args(ScriptArguments, dict(DEFAULTS), argv)


def load_model(script: ScriptArguments):
    """The causal LM and its tokenizer."""
    if script.model_name_or_path:
        # Fail before loading any weights when hf_hesso cannot prune the architecture.
        require_prunable(AutoConfig.from_pretrained(script.model_name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(script.model_name_or_path), tokenizer
    if script.tiny:
        tokenizer = load_smollm2_tokenizer(script.cache_dir)
        return tiny_llama(vocab_size=len(tokenizer)), tokenizer
    return load_smollm2(script.cache_dir)


def main(argv: list[str] | None = None) -> dict[str, float]:
    script, args = parse_args(argv)
    set_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(script)
    bbc = load_bbc_news(seed=script.data_seed_split)
    train = lm_blocks(bbc["train"], tokenizer, script.seq_len, max_blocks=script.train_blocks)
    held_out = lm_blocks(bbc["test"], tokenizer, script.seq_len, max_blocks=script.eval_blocks)
    ppl_before = perplexity(model, held_out, script.eval_batch_size)
    params_before = sum(p.numel() for p in model.parameters())
    layers_before = model.config.num_hidden_layers

    peft_config = None
    if script.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=script.lora_r, lora_alpha=script.lora_alpha, target_modules=list(script.lora_target_modules)
        )
    trainer = HESSOTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model()  # the slim model, with tokenizer and model card
    if not trainer.is_world_process_zero():
        return {}

    # Score what was written, as anyone would load it.
    slim = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=True)
    ppl_after = perplexity(slim, held_out, script.eval_batch_size)
    params_after = sum(p.numel() for p in slim.parameters())
    results = {
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "params_before": params_before,
        "params_after": params_after,
        "seconds": time.perf_counter() - start,
    }
    tokens = len(held_out) * script.seq_len
    print(f"\nHeld-out perplexity ({tokens} BBC test tokens): {ppl_before:.2f} before, {ppl_after:.2f} after pruning")
    target = (
        f"{args.target_param_sparsity:.0%} of the prunable parameters"
        if args.target_param_sparsity is not None
        else f"{args.target_group_sparsity:.0%} of the prunable groups"
    )
    print(
        f"Parameters: {params_before:,} -> {params_after:,} "
        f"({1 - params_after / params_before:.1%} fewer; target: remove {target})"
    )
    # Which sublayers went: recorded per layer in a slim config; a stock export (`--layer_shapes uniform`) has
    # fewer layers instead.
    shapes = getattr(slim.config, "hesso_layer_shapes", None) or []
    removed = {
        "attention": [i for i, s in enumerate(shapes) if not s["num_attention_heads"]],
        "mlp": [i for i, s in enumerate(shapes) if not (s["intermediate_size"] or s.get("shared_intermediate_size"))],
        "layers_before": layers_before,
        "layers_after": slim.config.num_hidden_layers - len([i for i, s in enumerate(shapes) if not (
            s["num_attention_heads"] or s["intermediate_size"] or s.get("shared_intermediate_size"))]),
    }  # fmt: skip
    results["removed_sublayers"] = removed
    print(
        f"Removed sublayers: attention in layers {removed['attention'] or 'none'}, MLP in layers "
        f"{removed['mlp'] or 'none'}; {removed['layers_after']} of {layers_before} layers kept"
        + (" (stock export)" if not shapes and slim.config.model_type == model.config.model_type else "")
    )
    print(f"Slim model written to {args.output_dir} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
