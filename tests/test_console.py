"""The console of a HESSOTrainer run: one HESSO summary per log line, every metric still reaching the reporters,
and no `pin_memory` warning on a CPU-only machine."""

from __future__ import annotations

import warnings

import pytest
import torch
from fixtures import hesso_args, lm_dataset, tiny_model
from transformers import TrainerCallback

from hf_hesso.callbacks import CONSOLE_MAX_LEN, console_summary
from hf_hesso.config import HESSOConfig
from hf_hesso.groups import KINDS
from hf_hesso.trainer import HESSOTrainer


class Recorder(TrainerCallback):
    """Stands for a reporter (TensorBoard, W&B): records every log dict it receives."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("disable_tqdm", [True, False])
@pytest.mark.slow
def test_console_prints_one_summary_and_reporters_get_every_metric(tmp_path, capsys, disable_tqdm):
    recorder = Recorder()
    args = hesso_args(str(tmp_path), disable_tqdm=disable_tqdm, max_steps=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset(), callbacks=[recorder])
        trainer.train()
    out = capsys.readouterr()
    console = out.out + out.err
    # Reporters: the full dict, per layer and per kind.
    last = [log for log in recorder.logs if "hesso/period" in log][-1]
    assert "hesso/pruned_groups/layer_0" in last and "hesso/pruned_groups/mlp_channel" in last
    # Console: none of the `hesso/*` keys, one summary per training log.
    assert "hesso/" not in console
    summaries = [line for line in console.splitlines() if "'hesso': " in line]
    # 12 step logs and the end-of-training summary.
    assert len(summaries) == sum("hesso/period" in log for log in recorder.logs) == 13
    assert "'hesso': 'pruning done, 40.0% of groups, " in summaries[-1]
    assert "'hesso_pruned': 'mlp_channel " in summaries[-1]
    assert "period 1/2" in summaries[2] and "warm-up" in summaries[0]
    # A CPU-only run does not pin memory, so the DataLoader does not warn.
    assert args.dataloader_pin_memory is False
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_pin_memory_default_follows_the_machine(tmp_path):
    common = dict(output_dir=str(tmp_path), target_group_sparsity=0.3, pruning_steps=4, report_to="none")
    assert HESSOConfig(**common, use_cpu=True).dataloader_pin_memory is False
    expected = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    assert HESSOConfig(**common).dataloader_pin_memory is expected
    assert HESSOConfig(**common, dataloader_pin_memory=True).dataloader_pin_memory is True  # the user set it


def test_console_summary_of_cric_and_warmup():
    logs = {
        "hesso/period": -1.0,
        "hesso/group_sparsity": 0.0,
        "hesso/param_sparsity": 0.0,
        "hesso/pruned_groups/kv_group": 0.0,
        "cric/phase": 1.0,
        "cric/cycles": 0.0,
    }
    assert console_summary(logs, 1) == {
        "hesso": "warm-up, 0.0% of groups, 0.0% of params pruned",
        "hesso_pruned": "kv_group 0",
        "cric": "probing, 0 cycles",
    }
    assert console_summary({"loss": 1.0}, 1) == {}


@pytest.mark.parametrize("max_len", [CONSOLE_MAX_LEN, 40])
def test_console_entries_fit_the_progress_callback_with_every_kind(max_len):
    # Every kind with a large count, CRIC, a long schedule: far more than one entry of 100 characters holds.
    logs = {"hesso/period": 98.0, "hesso/group_sparsity": 0.123, "hesso/param_sparsity": 0.456}
    logs |= {f"hesso/pruned_groups/{kind}": 123456.0 for kind in KINDS}
    logs |= {"cric/phase": 2.0, "cric/cycles": 12.0}
    out = console_summary(logs, 100, max_len)
    assert all(isinstance(v, str) and len(v) <= max_len for v in out.values()), out
    assert out["hesso"] == "period 99/100, 12.3% of groups, 45.6% of params pruned"[:max_len]
    pruned = [out[k] for k in out if k.startswith("hesso_pruned")]
    assert len(pruned) >= 2 and list(out).index("hesso_pruned") == 1
    assert ", ".join(pruned) == ", ".join(f"{kind} 123456" for kind in KINDS)  # nothing lost, in order
    assert out["cric"] == "cycles, 12 cycles"


def test_console_with_distillation_and_many_kinds_is_never_cut(tmp_path, capsys):
    # The progress bar (tqdm on) replaces a string over `max_str_len` (100) by "[String too long to display ...]".
    kinds = ["mlp_channel", "kv_group", "query_slot", "attention_sublayer", "mlp_sublayer"]
    args = hesso_args(str(tmp_path), disable_tqdm=False, max_steps=12, distill=True, prune_kinds=kinds)
    recorder = Recorder()
    trainer = HESSOTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset(), callbacks=[recorder])
    trainer.train()
    out = capsys.readouterr()
    console = out.out + out.err
    assert "String too long" not in console
    lines = [line for line in console.splitlines() if "'hesso': " in line]
    assert len(lines) == 13 and all("'distill/kl'" in line for line in lines[:-1])
    for kind in kinds:
        assert f"{kind} " in lines[-1]
    # The reporters still get every metric.
    assert all(f"hesso/pruned_groups/{kind}" in recorder.logs[-1] for kind in kinds)
