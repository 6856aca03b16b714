"""The worker of `test_distill_dist.py`: a tiny LLaMA trained with `HESSOTrainer(distill=True)` on 1 or 2 processes.

`python -m torch.distributed.run --nproc_per_node 2 tests/dist_distill_worker.py OUT PER_DEVICE MODE` (MODE `ddp` or
`fsdp2`) writes every rank's pruned groups, final (gathered) weights, teacher weights and logged KL to
`OUT/rank{RANK}.pt`.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_train_worker import FSDP2_ARGS, enable_fsdp_on_cpu  # noqa: E402
from fixtures import hesso_args, lm_dataset, tiny_model  # noqa: E402


def run(out_dir: str, per_device: int, mode: str) -> None:
    from hf_hesso.slim import gather_full_model
    from hf_hesso.trainer import HESSOTrainer

    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    extra = {}
    if mode == "fsdp2" and distributed:
        enable_fsdp_on_cpu()
        extra = FSDP2_ARGS
    args = hesso_args(
        os.path.join(out_dir, "run"),
        per_device_train_batch_size=per_device,
        ddp_backend="gloo" if distributed else None,
        distill=True,
        distill_alpha=0.5,
        distill_temperature=2.0,
        **extra,
    )
    trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
    trainer.train()
    model = gather_full_model(trainer.model) if trainer.is_fsdp_enabled else trainer.model
    rank = int(os.environ.get("RANK", 0))
    torch.save(
        {
            "pruned": trainer.hesso_optimizer.pruned_groups.cpu(),
            "state": None if model is None else {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "teacher": {k: v.detach().cpu().clone() for k, v in trainer.distiller.teacher.state_dict().items()},
            "kl": [e["distill/kl"] for e in trainer.state.log_history if "distill/kl" in e],
            "sharded": trainer.is_fsdp_enabled,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3])
