"""LoRA (the LoRAShear setting): prune while training peft adapters, export one merged slim model or slim base +
slim adapter."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fixtures import hesso_args, lm_dataset, tiny_batch, tiny_model
from helpers import reload_in_fresh_process

from hf_hesso import HESSO, build_groups
from hf_hesso.optim.frozen import FROZEN_SLICES_NAME
from hf_hesso.slim import merge_and_slim
from hf_hesso.slim.lora import ADAPTER_SUBDIR, merged_groups
from hf_hesso.trainer import HESSOTrainer

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

RELOAD_ADAPTER_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    path, batch_file, out_file = sys.argv[1:4]
    base = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    model = PeftModel.from_pretrained(base, os.path.join(path, "adapter")).eval()
    with torch.no_grad():
        logits = model(**torch.load(batch_file)).logits
    torch.save({"logits": logits, "base_params": base.num_parameters()}, out_file)
    """
)


def lora_config(targets=ALL_PROJECTIONS) -> LoraConfig:
    # Non-zero `lora_B` at init (init_lora_weights=False) so that the adapters matter from the first step.
    return LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0, init_lora_weights=False)


def live_logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def effective_zero_mask(peft_model, groups) -> torch.Tensor:
    """Groups whose *effective* weights `W0 + s * B @ A` are exactly zero (merged on a copy)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return merged_groups(groups, merged).zero_mask()


def test_groups_include_adapter_slices():
    model = get_peft_model(tiny_model("llama"), lora_config())
    groups = build_groups(model)
    plain = build_groups(tiny_model("llama"))
    assert len(groups) == len(plain)
    # Group sizes count the base parameters (what the merged slim model loses), not the adapters.
    assert groups.numel.tolist() == plain.numel.tolist()
    kv = groups.blocks[0]
    assert kv.kind == "kv_group"
    names = {(s.param.rsplit("self_attn.", 1)[1], s.dim) for s in kv.slices}
    assert ("k_proj.base_layer.weight", 0) in names and ("k_proj.lora_B.default.weight", 0) in names
    assert ("o_proj.base_layer.weight", 1) in names and ("o_proj.lora_A.default.weight", 1) in names
    mlp = next(b for b in groups.blocks if b.kind == "mlp_channel")
    assert any(s.param.endswith("down_proj.lora_A.default.weight") and s.dim == 1 for s in mlp.slices)
    assert any(s.param.endswith("up_proj.lora_B.default.weight") and s.dim == 0 for s in mlp.slices)
    # Zeroing a group (base + adapter slices) zeroes the effective weight.
    groups.zero_(model, [0, len(groups) - 1])
    assert effective_zero_mask(model, groups).nonzero().squeeze(1).tolist() == [0, len(groups) - 1]


def test_dora_is_refused():
    model = get_peft_model(
        tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    )
    with pytest.raises(ValueError, match="uses DoRA"):
        build_groups(model)


def test_gradient_direction_is_refused_with_lora():
    model = get_peft_model(tiny_model("llama"), lora_config(["q_proj", "v_proj"]))
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match=r"saliency_direction='gradient'.*LoRA.*Use `saliency_direction='update'`"):
        HESSO(base, build_groups(model), target_group_sparsity=0.3, pruning_steps=4, saliency_direction="gradient")


def test_partial_targets_hesso_loop():
    """Adapters on q/v/up only: the other projections' groups span base slices alone; plain HESSO loop."""
    model = get_peft_model(tiny_model("llama"), lora_config(["q_proj", "v_proj", "up_proj"]))
    groups = build_groups(model)
    mlp = next(b for b in groups.blocks if b.kind == "mlp_channel")
    assert not any("gate_proj.lora" in s.param or "down_proj.lora" in s.param for s in mlp.slices)
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    opt = HESSO(base, groups, target_group_sparsity=0.4, start_pruning_step=1, pruning_periods=2, pruning_steps=6)
    data = lm_dataset(n=8)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    for _ in range(9):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    pruned = opt.pruned_groups.tolist()
    assert pruned
    assert effective_zero_mask(model, groups).nonzero().squeeze(1).tolist() == pruned
    assert groups.zero_mask().nonzero().squeeze(1).tolist() == pruned
    # Frozen weights outside the groups never change; grouped frozen weights changed only by being zeroed.
    for n, p in model.named_parameters():
        if not p.requires_grad:
            changed = p.detach() != frozen_before[n]
            assert bool((p.detach()[changed] == 0).all()), n
    eval_batch = tiny_batch("llama")
    expected = live_logits(model, eval_batch)
    slim, summary = merge_and_slim(model, groups)
    assert summary.params_after < summary.params_before
    torch.testing.assert_close(live_logits(slim, eval_batch), expected, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One LoRA run with pruning through `HESSOTrainer(peft_config=...)`, shared by the export tests."""
    out = tmp_path_factory.mktemp("lora_run")
    torch.manual_seed(0)
    trainer = HESSOTrainer(
        model=tiny_model("llama"), args=hesso_args(str(out)), train_dataset=lm_dataset(), peft_config=lora_config()
    )
    trainer.train()
    return trainer, out


@pytest.mark.slow
def test_trainer_wraps_and_prunes_effective_weights(trained):
    trainer, _ = trained
    assert isinstance(trainer.model, PeftModel)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    hesso = trainer.hesso_optimizer
    pruned = hesso.pruned_groups.tolist()
    assert pruned and hesso.num_steps == 14
    # Exactly zero before export, in the effective weight and in every slice (frozen base included).
    assert effective_zero_mask(trainer.model, trainer.groups).nonzero().squeeze(1).tolist() == pruned
    assert trainer.groups.zero_mask().nonzero().squeeze(1).tolist() == pruned


def test_peft_config_with_peft_model_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), lora_config())
    with pytest.raises(ValueError, match="already a `PeftModel`"):
        HESSOTrainer(model=model, args=hesso_args(str(tmp_path)), peft_config=lora_config())


def test_zero_learning_rate_is_refused_where_lora_scores_on_the_update(tmp_path):
    # 'taylor' reads the raw gradient, so `HESSOConfig` accepts lr=0; with LoRA it falls back to the update direction,
    # which is zero at lr=0: the trainer refuses before the first step instead of selecting on ties.
    args = hesso_args(str(tmp_path), learning_rate=0.0)
    trainer = HESSOTrainer(
        model=tiny_model("llama"), args=args, train_dataset=lm_dataset(8), peft_config=lora_config()
    )
    with pytest.raises(
        ValueError,
        match=r"`saliency='taylor'` with LoRA scores groups with taylor_first_order on the update direction .* "
        r"`learning_rate` is 0.*use a positive `learning_rate`, or `saliency='activation'`",
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def test_merge_adapters_false_without_adapters_is_refused(tmp_path):
    trainer = HESSOTrainer(model=tiny_model("llama"), args=hesso_args(str(tmp_path)), train_dataset=lm_dataset(8))
    with pytest.raises(ValueError, match=r"`merge_adapters=False` keeps LoRA adapters apart.*has no adapters"):
        trainer.save_model(merge_adapters=False)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.slow
def test_merged_slim_export_reloads_in_fresh_process(trained, tmp_path):
    trainer, _ = trained
    batch = tiny_batch("llama")
    expected = live_logits(trainer.model, batch)
    out = tmp_path / "merged"
    trainer.save_model(str(out))
    assert not (out / "adapter_config.json").exists()
    result = reload_in_fresh_process(str(out), "lm", batch, tmp_path)
    assert result["params"] < tiny_model("llama").num_parameters()
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_separate_base_and_adapter_export_reloads(trained, tmp_path):
    trainer, _ = trained
    batch = tiny_batch("llama")
    expected = live_logits(trainer.model, batch)
    out = tmp_path / "separate"
    trainer.save_model(str(out), merge_adapters=False)
    assert (out / ADAPTER_SUBDIR / "adapter_config.json").is_file()
    # In this process first (peft loads the sliced adapter onto the slim base), then in a fresh one.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    here = PeftModel.from_pretrained(base, str(out / ADAPTER_SUBDIR))
    torch.testing.assert_close(live_logits(here, batch), expected, rtol=0, atol=1e-4)
    batch_file, out_file = tmp_path / "batch.pt", tmp_path / "out.pt"
    torch.save(batch, batch_file)
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_ADAPTER_SCRIPT, str(out), str(batch_file), str(out_file)],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out_file)
    assert result["base_params"] < tiny_model("llama").num_parameters()
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-4)
    # The live model is untouched by either export.
    torch.testing.assert_close(live_logits(trainer.model, batch), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_resume_mid_pruning_matches_uninterrupted_run(tmp_path):
    full = HESSOTrainer(
        model=tiny_model("llama"),
        args=hesso_args(str(tmp_path / "full"), save_strategy="steps", save_steps=4),
        train_dataset=lm_dataset(),
        peft_config=lora_config(),
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"  # inside the first period (steps 3..6)
    assert (checkpoint / "adapter_model.safetensors").is_file()
    # peft checkpoints hold only the adapters; the frozen base slices HESSO faded travel beside them (without
    # them the resumed adapters differ by ~6e-4).
    assert (checkpoint / FROZEN_SLICES_NAME).is_file()
    resumed = HESSOTrainer(
        model=tiny_model("llama"),  # the same base weights, as reloaded from the hub; adapters from the checkpoint
        args=hesso_args(str(tmp_path / "resumed")),
        train_dataset=lm_dataset(),
        peft_config=lora_config(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.hesso_optimizer.num_steps == full.hesso_optimizer.num_steps == 14
    assert resumed.hesso_optimizer.pruned_groups.tolist() == full.hesso_optimizer.pruned_groups.tolist()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert any("lora_B" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
