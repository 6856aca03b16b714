"""Helpers shared by the test modules (test modules never import each other)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from huggingface_hub import ModelCard

RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    path, kind, batch_file, out_file = sys.argv[1:5]
    cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path, trust_remote_code=True).eval()
    batch = torch.load(batch_file)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"logits": logits, "params": model.num_parameters(), "cls": type(model).__name__,
                "hf_hesso_imported": "hf_hesso" in sys.modules}, out_file)
    """
)


def reference_logits(model, batch) -> torch.Tensor:
    """Logits of the live model in fp32: `type(model).forward` bypasses the autocast wrapper Accelerate installs."""
    model.eval()
    with torch.no_grad():
        return type(model).forward(model, **batch).logits


def reload_in_fresh_process(path: str, kind: str, batch: dict, tmp_path, env: dict | None = None) -> dict:
    """Load `path` with `trust_remote_code=True` in a new interpreter (no hf_hesso import) and run `batch`."""
    batch_file, out_file = tmp_path / "batch.pt", tmp_path / "reloaded.pt"
    torch.save(batch, batch_file)
    # Run from tmp_path so that the repository's `hf_hesso` is not importable by accident.
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(path), kind, str(batch_file), str(out_file)],
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out_file)


def card_figures(path) -> dict:
    return ModelCard.load(os.path.join(path, "README.md")).data.to_dict()["hesso"]


def check_pruned(trainer):
    """The selected groups are exactly zero, and they are the only all-zero groups."""
    hesso = trainer.hesso_optimizer
    assert len(hesso.pruned_groups) > 0
    zero = trainer.groups.zero_mask()
    assert sorted(zero.nonzero().squeeze(1).tolist()) == sorted(hesso.pruned_groups.tolist())
