"""HESSO on FSDP2-sharded parameters (`fully_shard`): a real 2-process CPU run (`torchrun`, gloo) selects the same
groups, ends with the same weights and exports the same slim model as one unsharded process with the same global
batch; layouts that hide the group structure (FSDP1 flat parameters, DeepSpeed ZeRO-3) are refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dist_fsdp_worker import fsdp_config, run_fsdp_worker
from transformers import AutoModelForCausalLM

from hf_hesso import HESSO, build_groups

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@pytest.fixture(scope="module", params=["early", "late", "gradient"])
def runs(request, tmp_path_factory):
    """The sharded 2-process run and the unsharded single-process run, each saved by rank.

    "early": the model is sharded before `HESSO` is built (hand-written loops); "late": after, with the optimizer's
    parameters swapped for the sharded ones, as Accelerate does for the Trainer; "gradient": early, scored with the
    raw gradient (`saliency_direction="gradient"`) and the elementwise Taylor criterion.
    """
    tmp = tmp_path_factory.mktemp(f"fsdp_{request.param}")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    os.makedirs(tmp / "sharded")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [os.path.join(TESTS, "dist_fsdp_worker.py"), str(tmp / "sharded"), request.param]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    os.makedirs(tmp / "single")
    run_fsdp_worker(str(tmp / "single"), gradient=request.param == "gradient")
    sharded = [torch.load(tmp / "sharded" / f"rank{r}.pt") for r in range(2)]
    single = torch.load(tmp / "single" / "rank0.pt")
    return sharded, single


@pytest.mark.slow
@pytest.mark.multiprocess
def test_shard_local_group_operations_match_the_full_tensor(runs):
    sharded, _ = runs
    # Scaling each group by its own factor and zeroing every other group on the local shards gives exactly the rows
    # of the same operation on the full tensor, on both ranks (k_proj heads and q_proj key/value groups straddle).
    assert [r["ops_error"] for r in sharded] == [0.0, 0.0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_run_selects_and_trains_like_one_process(runs):
    sharded, single = runs
    assert sharded[0]["world_size"] == 2 and single["world_size"] == 1
    # Every rank selects the same groups, and the same as the unsharded run.
    assert sharded[0]["redundant"].tolist() == sharded[1]["redundant"].tolist()
    assert sharded[0]["redundant"].tolist() == single["redundant"].tolist()
    assert sharded[0]["pruned"].tolist() == single["pruned"].tolist()
    # The selection includes groups of every kind (key/value groups, query slots, MLP channels).
    groups = build_groups(AutoModelForCausalLM.from_config(fsdp_config()))
    kinds = {groups[i].kind for i in single["pruned"].tolist()}
    assert kinds == {"kv_group", "query_slot", "mlp_channel"}, kinds
    torch.testing.assert_close(sharded[0]["scores"], single["scores"], rtol=0, atol=1e-5)
    for before, after in zip(sharded[0]["metrics"], single["metrics"], strict=True):
        assert before.keys() == after.keys()
        for key in after:
            assert before[key] == pytest.approx(after[key], abs=1e-5), key
    assert sharded[0]["state"].keys() == single["state"].keys()
    for key, value in single["state"].items():
        # Reduce-scatter sums in another order than one big batch: equal up to float rounding.
        torch.testing.assert_close(sharded[0]["state"][key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sharded_export_equals_single_process_export(runs):
    sharded, single = runs
    assert sharded[0]["layers"] == single["layers"]
    assert sharded[0]["params_after"] == single["params_after"]
    assert sharded[0]["export"].keys() == single["export"].keys()
    for key, value in single["export"].items():
        assert sharded[0]["export"][key].shape == value.shape, key
        torch.testing.assert_close(sharded[0]["export"][key], value, rtol=0, atol=1e-5, msg=key)


def _model_and_groups():
    model = AutoModelForCausalLM.from_config(fsdp_config())
    return model, build_groups(model)


def test_deepspeed_zero3_parameters_are_refused():
    model, groups = _model_and_groups()
    model.model.layers[0].mlp.gate_proj.weight.ds_id = 7  # what DeepSpeed ZeRO-3 sets on partitioned parameters
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-3.*Use FSDP2 instead: `torch.distributed.fsdp.fully_shard`"):
        HESSO(torch.optim.AdamW(model.parameters()), groups, target_group_sparsity=0.3, pruning_steps=4)


def test_fsdp1_flat_parameters_are_refused():
    from torch.distributed.fsdp._flat_param import FlatParameter

    model, groups = _model_and_groups()
    flat = FlatParameter(torch.zeros(10), requires_grad=True)
    opt = torch.optim.AdamW([*model.parameters(), flat])
    with pytest.raises(ValueError, match=r"FSDP1 flat parameter.*Use FSDP2 instead.*fsdp_version: 2"):
        HESSO(opt, groups, target_group_sparsity=0.3, pruning_steps=4)


def test_flattened_original_parameters_are_refused():
    model, groups = _model_and_groups()
    # FSDP1 with `use_orig_params=True` leaves 1-D views of the original parameters.
    mlp = model.model.layers[1].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach().flatten())
    with pytest.raises(ValueError, match=r"has shape \(1620,\).*looks flattened.*Use FSDP2 instead"):
        HESSO(torch.optim.AdamW(model.parameters()), groups, target_group_sparsity=0.3, pruning_steps=4)


def _trainer(tmp_path):
    from fixtures import hesso_args, lm_dataset, tiny_model

    from hf_hesso import HESSOTrainer

    return HESSOTrainer(model=tiny_model("llama"), args=hesso_args(str(tmp_path)), train_dataset=lm_dataset(8))


def test_trainer_refuses_deepspeed(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.is_deepspeed_enabled = True  # what `Trainer.__init__` sets when `args.deepspeed` is given
    with pytest.raises(ValueError, match=r"does not support DeepSpeed.*Use FSDP2 instead.*fsdp2\.yaml"):
        trainer.create_optimizer()


def test_trainer_refuses_fsdp1(tmp_path, monkeypatch):
    from types import SimpleNamespace

    trainer = _trainer(tmp_path)
    trainer.is_fsdp_enabled = True
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=1), raising=False)
    with pytest.raises(ValueError, match=r"does not support FSDP version 1.*Use FSDP2 instead: `fsdp_version: 2`"):
        trainer.create_optimizer()
