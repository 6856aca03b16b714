"""Saving is atomic: a failure while saving never leaves a half-written model in place of a good one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from dist_train_worker import hesso_args, lm_dataset, tiny_model, tiny_tokenizer

from hf_hesso.export import atomic_directory
from hf_hesso.trainer import HESSOTrainer


def snapshot(path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def leftovers(parent) -> list[str]:
    return [e for e in os.listdir(parent) if ".tmp-" in e or ".old-" in e]


def test_atomic_directory_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (Path(tmp) / "a.txt").write_text("v1")
    (target / "checkpoint-3").mkdir()
    (target / "checkpoint-3" / "model.safetensors").write_text("ckpt")
    before = snapshot(target)

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as tmp:
            (Path(tmp) / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert snapshot(target) == before and leftovers(tmp_path) == []

    # A successful save replaces the model files and carries the checkpoints over.
    (target / "model-00001-of-00002.safetensors").write_text("stale shard")
    with atomic_directory(target) as tmp:
        (Path(tmp) / "a.txt").write_text("v2")
    assert (target / "a.txt").read_text() == "v2"
    assert (target / "checkpoint-3" / "model.safetensors").read_text() == "ckpt"
    assert not (target / "model-00001-of-00002.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        with atomic_directory(tmp_path / "out"):
            pass
    assert leftovers(tmp_path) == []


def test_failed_save_model_leaves_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = HESSOTrainer(
        model=tiny_model("llama"),
        args=hesso_args(str(out)),
        train_dataset=lm_dataset(),
        processing_class=tiny_tokenizer(),
    )
    trainer.save_model()
    good = snapshot(out)
    assert "model.safetensors" in good and "README.md" in good and "tokenizer.json" in good

    real_save_file = transformers.modeling_utils.safe_save_file

    def failing_save_file(tensors, filename, metadata=None):
        # Write a truncated file first, as a crash midway would.
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_save_file)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight.add_(1.0)  # the new save would differ from the good one
    with pytest.raises(OSError, match="No space left on device"):
        trainer.save_model()
    assert snapshot(out) == good
    assert leftovers(tmp_path) == []

    # Once the disk works again, the save goes through.
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save_file)
    trainer.save_model()
    assert snapshot(out)["model.safetensors"] != good["model.safetensors"]
    assert leftovers(tmp_path) == []
