"""`HESSOTrainer` end to end: train with pruning, save the slim model, reload it in a fresh process."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fixtures import cls_dataset, hesso_args, lm_dataset, tiny_batch, tiny_model, tiny_tokenizer
from helpers import card_figures, check_pruned, reference_logits, reload_in_fresh_process

from hf_hesso.trainer import HESSOTrainer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_train_prune_save_reload(name, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_hesso.callbacks")
    is_lm = name == "llama"
    model = tiny_model(name)
    params_full = model.num_parameters()
    extra = {}
    if not is_lm:
        # Evaluation during training, with metrics.
        extra = dict(eval_strategy="steps", eval_steps=7, per_device_eval_batch_size=16)
    args = hesso_args(str(tmp_path / "out"), **extra)

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = HESSOTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset() if is_lm else cls_dataset(),
        eval_dataset=None if is_lm else cls_dataset(32, seed=1),
        compute_metrics=None if is_lm else accuracy,
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    check_pruned(trainer)
    progress = [
        r.getMessage() for r in caplog.records if r.name == "hf_hesso.callbacks" and "HESSO step" in r.getMessage()
    ]
    expected = ["step 3/14: pruning period 1/2 started", "step 7/14: pruning period 2/2 started"]
    expected.append("step 10/14: pruning finished")
    assert len(progress) == 3 and all(e in p for e, p in zip(expected, progress, strict=True)), progress

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == args.max_steps
    assert all(any(k.startswith("hesso/") for k in entry) for entry in logged)
    if not is_lm:
        evals = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
        assert len(evals) == 2 and not any(k.startswith("hesso/") for k in evals[0])

    batch = tiny_batch(name)
    expected = reference_logits(trainer.model, batch)
    trainer.save_model()
    out = tmp_path / "out"

    # The live model is untouched by the slim save.
    assert trainer.model.num_parameters() == params_full
    torch.testing.assert_close(reference_logits(trainer.model, batch), expected, rtol=0, atol=0)

    config = json.loads((out / "config.json").read_text())
    assert "auto_map" in config and config["model_type"].startswith("hesso_")
    assert (out / "tokenizer.json").exists()
    figures = card_figures(out)
    assert figures["params_before"] == params_full
    assert figures["params_after"] < params_full
    card = (out / "README.md").read_text()
    assert "Kept structures per layer" in card and "target_group_sparsity" in card and "Optimizer steps | 14" in card

    reloaded = reload_in_fresh_process(str(out), "lm" if is_lm else "cls", batch, tmp_path)
    assert not reloaded["hf_hesso_imported"]
    assert reloaded["params"] == figures["params_after"]
    torch.testing.assert_close(reloaded["logits"], expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_bf16_mixed_precision(tmp_path):
    # transformers allows `bf16=True` with `use_cpu=True`: autocast runs on the CPU.
    args = hesso_args(str(tmp_path / "out"), bf16=True)
    trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
    trainer.train()
    check_pruned(trainer)
    batch = tiny_batch("llama")
    expected = reference_logits(trainer.model, batch)
    trainer.save_model()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_resume_mid_period_matches_uninterrupted_run(tmp_path):
    # Checkpoints every 4 steps: step 4 lies inside the first period (steps 2..5).
    full = HESSOTrainer(
        model=tiny_model("llama"),
        args=hesso_args(str(tmp_path / "full"), save_strategy="steps", save_steps=4),
        train_dataset=lm_dataset(),
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert checkpoint.is_dir()
    # Checkpoints stay full size so that training can resume from them.
    ckpt_config = json.loads((checkpoint / "config.json").read_text())
    assert ckpt_config["model_type"] == "llama" and ckpt_config["intermediate_size"] == 96

    resumed = HESSOTrainer(
        model=tiny_model("llama", seed=123),  # weights come from the checkpoint
        args=hesso_args(str(tmp_path / "resumed")),
        train_dataset=lm_dataset(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.hesso_optimizer.num_steps == full.hesso_optimizer.num_steps == 14
    assert resumed.hesso_optimizer.pruned_groups.tolist() == full.hesso_optimizer.pruned_groups.tolist()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_gradient_accumulation_invariance(tmp_path):
    runs = []
    for batch, accum in [(8, 1), (4, 2)]:
        args = hesso_args(
            str(tmp_path / f"b{batch}"), per_device_train_batch_size=batch, gradient_accumulation_steps=accum
        )
        trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
        trainer.train()
        assert trainer.hesso_optimizer.num_steps == 14
        runs.append(trainer)
    first, second = (t.hesso_optimizer for t in runs)
    assert first.redundant_groups.tolist() == second.redundant_groups.tolist()
    assert first.pruned_groups.tolist() == second.pruned_groups.tolist()
    a, b = runs[0].model.state_dict(), runs[1].model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4, msg=key)


def test_schedule_checked_against_planned_steps(tmp_path):
    # With epochs instead of max_steps, the schedule is checked once the number of optimizer steps is known:
    # 64 examples / (8 x accumulation 2) = 4 optimizer steps, but pruning ends at step 10.
    args = hesso_args(str(tmp_path), max_steps=-1, num_train_epochs=1, gradient_accumulation_steps=2)
    trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset())
    with pytest.raises(ValueError, match=r"= 10, after the planned number of optimizer steps \(4; optimizer steps"):
        trainer.train()


def test_empty_train_dataset_is_refused_with_its_name_and_the_fix(tmp_path):
    empty = lm_dataset().select([])
    match = r"`train_dataset` \(Dataset\) has no examples.*Check the split and any filtering.*at least"
    with pytest.raises(ValueError, match=match):
        HESSOTrainer(model=tiny_model("llama"), args=hesso_args(str(tmp_path)), train_dataset=empty)
    # Emptied after the trainer was built: `train()` says the same, before torch's sampler does.
    trainer = HESSOTrainer(model=tiny_model("llama"), args=hesso_args(str(tmp_path)), train_dataset=lm_dataset(8))
    trainer.train_dataset = empty
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_args_must_be_hesso_config(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match=r"`args` must be a `HESSOConfig`.*got TrainingArguments"):
        HESSOTrainer(model=tiny_model("llama"), args=TrainingArguments(str(tmp_path), report_to="none"))


def test_user_groups_and_prune_kinds(tmp_path):
    from hf_hesso import build_groups

    model = tiny_model("llama")
    groups = build_groups(model, kinds=["mlp_channel"])
    args = hesso_args(str(tmp_path), max_steps=10, start_pruning_step=0, pruning_steps=4, pruning_periods=1)
    trainer = HESSOTrainer(model=model, args=args, train_dataset=lm_dataset(32), groups=groups)
    trainer.train()
    assert trainer.groups is groups
    assert set(groups.kinds()) == {"mlp_channel"}
    check_pruned(trainer)


def test_prune_kinds_without_groups(tmp_path):
    model = tiny_model("llama")
    args = hesso_args(str(tmp_path), prune_kinds=["head"])  # GQA LLaMA has kv_group/query_slot, not head
    trainer = HESSOTrainer(model=model, args=args, train_dataset=lm_dataset(32))
    with pytest.raises(ValueError, match=r"no prunable groups of kinds \['head'\]"):
        trainer.train()


def test_attention_sublayer_run_saves_a_model_that_generates_with_the_cache(tmp_path):
    """`prune_kinds` with `attention_sublayer`: a run that removes layer 0's attention saves a slim model whose cached
    forward and greedy `generate` equal the trained (masked) model's."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    with torch.no_grad():  # the least salient sublayer by far, so that HESSO removes it
        for p in model.model.layers[0].self_attn.parameters():
            p.mul_(1e-3)
    args = hesso_args(str(tmp_path / "out"), prune_kinds=["attention_sublayer", "mlp_sublayer"])
    trainer = HESSOTrainer(model=model, args=args, train_dataset=lm_dataset(32))
    trainer.train()
    trainer.save_model()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["hesso_layer_shapes"][0]["num_attention_heads"] == 0

    batch = tiny_batch("llama")
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    dense = trainer.model.eval()
    slim = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(slim(**batch, use_cache=True).logits, dense(**batch).logits, rtol=0, atol=1e-5)
        assert torch.equal(slim.generate(**batch, **settings), dense.generate(**batch, **settings))
