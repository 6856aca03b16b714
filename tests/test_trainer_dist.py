"""Real 2-process runs (`torchrun`, gloo, CPU) of `HESSOTrainer`, under DDP and under Accelerate's FSDP2 path: every
rank makes the same pruning decision, and the result (and, under FSDP2, the slim export) equals a single-process run
with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dist_train_worker import run_dist_worker

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def torchrun_worker(out_dir, mode: str) -> list[dict]:
    """Run `dist_train_worker.py` on 2 processes (batch 4 each) in `mode`; returns what each rank saved."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    # `--standalone` rendezvous on a free local port, so parallel test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(TESTS, "dist_train_worker.py"), str(out_dir), "4", mode]
    os.makedirs(out_dir)
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_agree_with_each_other_and_with_one(tmp_path):
    ranks = torchrun_worker(tmp_path / "dist", "ddp")
    assert all(r["world_size"] == 2 for r in ranks)
    assert len(ranks[0]["pruned"]) > 0
    assert ranks[0]["redundant"].tolist() == ranks[1]["redundant"].tolist()
    assert ranks[0]["pruned"].tolist() == ranks[1]["pruned"].tolist()
    for key, value in ranks[0]["state"].items():
        # DDP broadcasts the same all-reduced gradients: the ranks hold bitwise equal weights.
        assert torch.equal(value, ranks[1]["state"][key]), key

    # One process, same global batch (2 x 4 = 8).
    os.makedirs(tmp_path / "single")
    run_dist_worker(str(tmp_path / "single"), 8)
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert single["world_size"] == 1
    assert single["redundant"].tolist() == ranks[0]["redundant"].tolist()
    assert single["pruned"].tolist() == ranks[0]["pruned"].tolist()
    for key, value in single["state"].items():
        # The all-reduce sums in another order than one big batch: equal up to float rounding.
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_trainer_under_fsdp2_matches_one_process_and_exports_the_same_model(tmp_path):
    from transformers import AutoModelForCausalLM

    ranks = torchrun_worker(tmp_path / "fsdp", "fsdp2")
    # The Trainer really ran sharded: Accelerate's FSDP2 path, `DTensor` parameters in the model and the optimizer.
    assert all(r["sharded"] and r["param_types"] == ["DTensor"] and r["world_size"] == 2 for r in ranks)
    assert ranks[0]["redundant"].tolist() == ranks[1]["redundant"].tolist()
    assert ranks[0]["pruned"].tolist() == ranks[1]["pruned"].tolist()
    assert ranks[1]["state"] is None  # the full weights are gathered to rank 0 only

    os.makedirs(tmp_path / "single")
    run_dist_worker(str(tmp_path / "single"), 8, "fsdp2")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert not single["sharded"] and single["param_types"] == ["Parameter"]
    assert len(single["pruned"]) > 0
    assert single["pruned"].tolist() == ranks[0]["pruned"].tolist()
    assert single["redundant"].tolist() == ranks[0]["redundant"].tolist()
    assert single["state"].keys() == ranks[0]["state"].keys()
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=0, atol=1e-5, msg=key)

    # The slim export of the sharded run is the single-process export: same files, shapes, weights and logits.
    sharded_dir, single_dir = tmp_path / "fsdp" / "slim", tmp_path / "single" / "slim"
    assert sorted(os.listdir(sharded_dir)) == sorted(os.listdir(single_dir))
    a = AutoModelForCausalLM.from_pretrained(sharded_dir, trust_remote_code=True)
    b = AutoModelForCausalLM.from_pretrained(single_dir, trust_remote_code=True)
    assert a.config.hesso_layer_shapes == b.config.hesso_layer_shapes
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    assert sum(p.numel() for p in a.parameters()) < sum(
        v.numel() for k, v in single["state"].items() if "rotary" not in k
    )
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert x.shape == y.shape, name
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=name)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=1e-4)
