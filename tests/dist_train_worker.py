"""Tiny HESSO training runs shared by the trainer tests, and the worker that `torchrun` launches.

As a worker (`python -m torch.distributed.run --nproc_per_node 2 tests/dist_train_worker.py OUT [PER_DEVICE]`),
every rank trains the same tiny LLaMA with `HESSOTrainer` (CPU, gloo) and writes its selected groups and final
weights to `OUT/rank{RANK}.pt`, so the test can compare ranks with each other and with a single-process run.

With a third argument `fsdp2`, the Trainer runs under Accelerate's FSDP2 path (`fully_shard`, `DTensor` parameters,
full-state-dict gathering for the save) and also saves the slim model to `OUT/slim`.
"""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import ENCODERS, tiny_config  # noqa: E402

VOCAB = 128


def tiny_tokenizer():
    """A word-level tokenizer over `t3 ... t127` built in code (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>")


def lm_dataset(n: int = 64, seq: int = 12, seed: int = 0) -> Dataset:
    """Random token ids, no padding (every micro-batch then holds the same number of label tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": ids.tolist()})


def cls_dataset(n: int = 64, seq: int = 12, seed: int = 0) -> Dataset:
    """Two classes that a tiny model can learn: label 1 iff token 5 occurs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (n, seq), generator=g)
    labels = torch.arange(n) % 2
    ids[labels == 1, 3] = 5
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels.tolist()})


def tiny_model(name: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(name)
    if name in ENCODERS:
        config.num_labels = 2
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def hesso_args(output_dir: str, **overrides):
    """A short run: 2 warm-up steps, 2 periods of 4 steps, 4 steps after pruning."""
    from hf_hesso.config import HESSOConfig

    kwargs = dict(
        output_dir=output_dir,
        max_steps=14,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        target_group_sparsity=0.4,
        start_pruning_step=2,
        pruning_periods=2,
        pruning_steps=8,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return HESSOConfig(**kwargs)


# The FSDP2 settings of `recipes/accelerate_configs/fsdp2.yaml`, as `HESSOConfig(fsdp=..., fsdp_config=...)`.
FSDP2_ARGS = dict(
    fsdp=True,
    fsdp_config={
        "fsdp_version": 2,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
    },
)


def enable_fsdp_on_cpu() -> None:
    """Let Accelerate run its FSDP path on CPU processes (gloo), as it does on GPUs.

    `AcceleratorState` only switches to `DistributedType.FSDP` for accelerator back-ends and otherwise falls back to
    DDP without a word (accelerate/state.py). This restores the FSDP type when an FSDP plugin was passed, so that
    everything after it is Accelerate's and the Trainer's own code: `fsdp2_prepare_model` (`fully_shard` on a CPU
    mesh), the optimizer over `DTensor` shards, the full-state-dict gather of the save.
    """
    import accelerate
    from accelerate.utils import DistributedType

    original = accelerate.Accelerator.__init__
    if getattr(original, "_hesso_cpu_fsdp", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.state.distributed_type == DistributedType.MULTI_CPU:
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = fsdp_plugin

    init._hesso_cpu_fsdp = True
    accelerate.Accelerator.__init__ = init


def run_dist_worker(out_dir: str, per_device: int, mode: str = "ddp") -> None:
    from hf_hesso.slim import gather_full_model
    from hf_hesso.trainer import HESSOTrainer

    if mode not in ("ddp", "fsdp2"):
        raise ValueError(f"mode must be 'ddp' or 'fsdp2', got {mode!r}")
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    extra = {}
    if mode == "fsdp2" and distributed:
        enable_fsdp_on_cpu()
        extra = FSDP2_ARGS
    args = hesso_args(
        os.path.join(out_dir, "run"),
        per_device_train_batch_size=per_device,
        ddp_backend="gloo" if distributed else None,
        **extra,
    )
    trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
    trainer.train()
    hesso = trainer.hesso_optimizer
    rank = int(os.environ.get("RANK", 0))
    sharded = trainer.is_fsdp_enabled
    # Under FSDP2 every rank holds shards: gather the full weights (a collective) and record them on rank 0.
    model = gather_full_model(trainer.model) if sharded else trainer.model
    if mode == "fsdp2":
        trainer.save_model(os.path.join(out_dir, "slim"))
    if model is None:
        state = None
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "redundant": hesso.redundant_groups.cpu(),
            "pruned": hesso.pruned_groups.cpu(),
            "state": state,
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
            "sharded": sharded,
            "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    run_dist_worker(
        sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4, sys.argv[3] if len(sys.argv) > 3 else "ddp"
    )
