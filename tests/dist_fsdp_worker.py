"""A hand-written HESSO + AdamW loop on a tiny LLaMA, sharded with FSDP2 (`fully_shard`) when run under `torchrun`.

As a worker (`python -m torch.distributed.run --nproc_per_node 2 tests/dist_fsdp_worker.py OUT`), every rank shards
the model on a CPU device mesh (gloo), trains on its half of each global batch, and rank 0 writes the selected
groups, the metrics, the full final weights and the slim export to `OUT/rank{RANK}.pt`. Called in-process
(`run_fsdp_worker(out)` with no `WORLD_SIZE`), the same loop runs unsharded on the whole batch: the test compares
the two.

The sizes make group rows straddle the shard boundary: `k_proj` has 3 key/value heads x 6 rows = 18 rows (9 per
rank, so head 1's rows 6..11 are split 3 + 3), `q_proj` has 36 rows (the rows 12..23 of key/value group 1 are split
at row 18), and the 45 MLP channels split 23 + 22 (uneven shards).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fixtures import tiny_config  # noqa: E402

GLOBAL_BATCH = 8
SEQ = 12
STEPS = 14


def fsdp_config():
    return tiny_config(
        "llama", hidden_size=36, num_attention_heads=6, num_key_value_heads=3, head_dim=6, intermediate_size=45
    )


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps)]


def slice_ops_error(model, groups) -> float:
    """Largest difference between the shard-local per-group operations and the same ones on the full tensor.

    Every group of every slice gets its own factor, and every other group is zeroed: a row mapped to the wrong group
    (off by the shard offset, or wrapped at the block's period) shows up as a non-zero difference.
    """
    from hf_hesso.optim.distributed import SliceOps, local, local_row_range

    worst = 0.0
    for block in groups.blocks:
        for s in block.slices:
            p = groups.parameters(model)[s.param].detach()
            full = p.full_tensor()  # a collective; every rank walks the slices in the same order
            start, stop = local_row_range(p)
            ops = SliceOps(s, p)
            vec = torch.arange(1, s.n + 1, dtype=full.dtype)
            shape = [1] * (full.dim() + 2)
            shape[s.dim + 1] = s.n
            expect = (s.view(full) * vec.view(shape)).reshape(full.shape)[start:stop]
            got = local(p).clone()
            ops.target(got).mul_(ops.factor(vec))
            worst = max(worst, float((got - expect).abs().max()) if got.numel() else 0.0)
            idx = torch.arange(0, s.n, 2)
            expect = full.clone()
            s.view(expect).index_fill_(s.dim + 1, idx, 0)
            got = local(p).clone()
            ops.fill_(got, idx)
            worst = max(worst, float((got - expect[start:stop]).abs().max()) if got.numel() else 0.0)
    return worst


def run_fsdp_worker(out_dir: str, late: bool = False, gradient: bool = False) -> None:
    """Train, prune and export; with `late`, shard only after `HESSO` is built and then swap the optimizer's
    parameters for the sharded ones, as Accelerate does when the Trainer prepares an FSDP2 model. With `gradient`,
    score with the raw (sharded) gradient and the elementwise Taylor criterion."""
    from transformers import AutoModelForCausalLM

    from hf_hesso import HESSO, build_groups
    from hf_hesso.groups import GroupSet
    from hf_hesso.slim import gather_full_model, slim_model

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(fsdp_config(), attn_implementation="eager")

    def shard():
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    if world > 1 and not late:
        shard()
    # Built after sharding, as the Trainer does: names are unchanged, shapes are the global ones.
    groups = build_groups(model)
    opt = HESSO(
        torch.optim.AdamW(model.parameters(), lr=2e-3, eps=1e-6),
        groups,
        target_group_sparsity=0.4,
        # Ranks the larger key/value groups and query slots among the MLP channels, so all kinds get pruned; a group
        # count (not a parameter budget) keeps the selection a plain ranking, robust to float rounding.
        importance_criteria={"avg_magnitude": 1.0, ("taylor_elementwise" if gradient else "taylor_first_order"): 0.2},
        saliency_direction="gradient" if gradient else "update",
        start_pruning_step=2,
        pruning_periods=2,
        pruning_steps=8,
    )
    if world > 1 and late:
        names = {id(p): name for name, p in model.named_parameters()}
        shard()
        sharded = dict(model.named_parameters())
        for group in opt.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    per_rank = GLOBAL_BATCH // world
    metrics = []
    for ids in batches():
        ids = ids[rank * per_rank : (rank + 1) * per_rank]
        # Same number of label tokens on every rank: FSDP2's gradient average equals the global batch's mean loss.
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        metrics.append(opt.metrics())  # a collective under FSDP2: every rank calls it

    ops_error = slice_ops_error(model, groups) if world > 1 else 0.0
    full = gather_full_model(model) if world > 1 else model
    if rank == 0:
        state = {k: v.detach().clone() for k, v in full.state_dict().items()}
        slim_groups = GroupSet(list(groups.blocks), groups.model_type, groups.param_shapes, model=full)
        summary = slim_model(full, slim_groups)
        export = {k: v.detach().clone() for k, v in full.state_dict().items()}
        torch.save(
            {
                "world_size": world,
                "redundant": opt.redundant_groups.cpu(),
                "pruned": opt.pruned_groups.cpu(),
                "ops_error": ops_error,
                "scores": opt.last_scores.cpu(),
                "metrics": metrics,
                "state": state,
                "export": export,
                "layers": [vars(s) if hasattr(s, "__dict__") else s for s in summary.layers],
                "params_after": summary.params_after,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    else:
        torch.save(
            {
                "world_size": world,
                "redundant": opt.redundant_groups.cpu(),
                "pruned": opt.pruned_groups.cpu(),
                "ops_error": ops_error,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[2] if len(sys.argv) > 2 else "early"
    run_fsdp_worker(sys.argv[1], late=mode == "late", gradient=mode == "gradient")
