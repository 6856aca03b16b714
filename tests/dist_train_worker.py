"""The worker that `torchrun` launches for the distributed Trainer tests (the tiny runs come from `fixtures.py`).

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fixtures import hesso_args, lm_dataset, tiny_model  # noqa: E402

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
