"""Resuming never silently restarts the pruning schedule: a checkpoint without HESSO's state is refused, unless
`restart_pruning_schedule=True` asks for exactly that."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from fixtures import hesso_args, lm_dataset, tiny_model
from peft import LoraConfig
from transformers import TrainerCallback

from hf_hesso.optim.frozen import FROZEN_SLICES_NAME
from hf_hesso.trainer import HESSOTrainer


class StopAt(TrainerCallback):
    """End the run after `step` optimizer steps (the schedule is still planned for `max_steps`)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def run(output_dir, stop_at: int | None = None, peft_config=None, resume=None, **overrides) -> HESSOTrainer:
    args = hesso_args(str(output_dir), save_strategy="steps", save_steps=4, **overrides)
    trainer = HESSOTrainer(
        model=tiny_model("llama", seed=123 if resume else 0),  # resumed weights come from the checkpoint
        args=args,
        train_dataset=lm_dataset(),
        callbacks=[StopAt(stop_at)] if stop_at else None,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoint-4 (inside the first pruning period, groups selected) and checkpoint-8 of a plain HESSO run."""
    out = tmp_path_factory.mktemp("run")
    run(out, stop_at=8)
    return out


def copy_checkpoint(checkpoints, tmp_path, step: int = 4):
    target = tmp_path / f"checkpoint-{step}"
    shutil.copytree(checkpoints / f"checkpoint-{step}", target)
    return target


def drop_entry(checkpoint, key: str) -> None:
    path = checkpoint / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    del state[key]
    torch.save(state, path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("optimizer.pt", r"`optimizer.pt` is missing.*save_only_model=True"),
        ("scheduler.pt", r"`scheduler.pt` is missing"),
        ("hesso", r"`optimizer.pt` has no 'hesso' entry: it was saved by a plain \(not HESSO\) optimizer"),
    ],
)
def test_checkpoint_without_hesso_state_is_refused(checkpoints, tmp_path, damage, message):
    checkpoint = copy_checkpoint(checkpoints, tmp_path)
    if damage.endswith(".pt"):
        (checkpoint / damage).unlink()
    else:
        drop_entry(checkpoint, damage)
    with pytest.raises(ValueError, match=message) as info:
        run(tmp_path / "resumed", resume=checkpoint)
    text = str(info.value)
    assert "save_only_model=False" in text and "restart_pruning_schedule=True" in text and str(checkpoint) in text


def test_save_only_model_checkpoint_is_refused(tmp_path):
    run(tmp_path / "run", stop_at=4, save_only_model=True)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert checkpoint.is_dir() and not (checkpoint / "optimizer.pt").exists()
    with pytest.raises(ValueError, match=r"Cannot resume .* `optimizer.pt` is missing.*save_only_model=False"):
        run(tmp_path / "resumed", resume=checkpoint)


def test_hesso_checkpoint_resumed_with_cric_is_refused(checkpoints, tmp_path):
    checkpoint = copy_checkpoint(checkpoints, tmp_path)
    with pytest.raises(ValueError, match=r"no 'cric' entry: it was saved by a HESSO \(not CRIC\) optimizer"):
        run(
            tmp_path / "resumed",
            resume=checkpoint,
            cric=True,
            pruning_periods=1,
            pruning_steps=2,
            cric_sampling_steps=2,
            cric_max_cycles=1,
            cric_trial_ratios=[0.5],
        )


def test_restart_pruning_schedule_resumes_and_reaches_the_target(checkpoints, tmp_path, caplog):
    checkpoint = copy_checkpoint(checkpoints, tmp_path)
    (checkpoint / "optimizer.pt").unlink()
    caplog.set_level(logging.WARNING, logger="hf_hesso.resume")
    trainer = run(tmp_path / "resumed", resume=checkpoint, restart_pruning_schedule=True)
    hesso = trainer.hesso_optimizer
    assert trainer.state.global_step == 14
    # The schedule started over at step 4: 10 HESSO steps, exactly its start_pruning_step + pruning_steps.
    assert hesso.num_steps == 10
    assert abs(hesso.metrics()["hesso/group_sparsity"] - 0.4) < 0.05
    assert any("schedule starts over at step 4" in r.getMessage() for r in caplog.records)


def test_restart_that_cannot_finish_in_time_is_refused(checkpoints, tmp_path):
    checkpoint = copy_checkpoint(checkpoints, tmp_path, step=8)
    (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"pruning would end at step 18, after the 14 planned.*max_steps >= 18"):
        run(tmp_path / "resumed", resume=checkpoint, restart_pruning_schedule=True)


@pytest.mark.slow
def test_lora_checkpoint_without_frozen_slices_is_refused_once_groups_were_selected(tmp_path):
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
    )
    run(tmp_path / "run", stop_at=8, peft_config=lora)
    checkpoint = tmp_path / "run" / "checkpoint-8"
    (checkpoint / FROZEN_SLICES_NAME).unlink()
    with pytest.raises(ValueError, match=rf"`{FROZEN_SLICES_NAME}` is missing, but HESSO had already selected \d+ "):
        run(tmp_path / "resumed", peft_config=lora, resume=checkpoint)
