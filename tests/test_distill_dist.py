"""Distillation on 2 processes (`torchrun`, gloo, CPU): DDP and Accelerate's FSDP2 path give the run of one process
with the same global batch (the teacher is a full frozen replica on every rank; it is not sharded)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dist_distill_worker import run

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_distil_like_one(mode, tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    os.makedirs(tmp_path / "dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(TESTS, "dist_distill_worker.py"), str(tmp_path / "dist"), "4", mode]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / "dist" / f"rank{r}.pt") for r in range(2)]
    assert all(r["sharded"] == (mode == "fsdp2") for r in ranks)
    os.makedirs(tmp_path / "single")
    run(str(tmp_path / "single"), 8, mode)
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert len(single["pruned"]) > 0 and single["pruned"].tolist() == ranks[0]["pruned"].tolist()
    for key, value in single["state"].items():
        # All-reduced sums round differently from one big batch, and Adam amplifies it where gradients are tiny
        # (measured: at most 1.4e-5 after 14 steps, weights of magnitude 0.1; the logged KL agrees to 1e-6).
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=0, atol=5e-5, msg=key)
    # The teacher is untouched everywhere, and the logged KL is the mean over the ranks of the global batch's.
    for r in ranks:
        for key, value in single["teacher"].items():
            assert torch.equal(r["teacher"][key], value), key
    assert ranks[0]["kl"] == ranks[1]["kl"]
    torch.testing.assert_close(torch.tensor(ranks[0]["kl"]), torch.tensor(single["kl"]), rtol=1e-3, atol=1e-6)
