"""The model card (README.md) of a slim model: what was pruned, from what, and how it was trained."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..modeling.architectures import LayerShape, base_model_type
from .atomic import AtomicSave
from .gguf import GGUF_MODEL_TYPES

# The file name of the model card beside a saved model (what the Hub shows).
MODEL_CARD_NAME = "README.md"


@dataclass
class PruningReport:
    """Everything the card records.

    Attributes:
        base_model (`str`): the model the run started from (`config._name_or_path`), or `""` when unknown.
        model_name (`str`): the name of the saved model (the repo name).
        params_before (`int`): parameters of the model before slimming.
        params_after (`int`): parameters of the slim model.
        layers_before (`Sequence[LayerShape]`): per-layer sizes before pruning.
        layers_after (`Sequence[LayerShape]`): per-layer sizes of the slim model.
        settings (`dict[str, Any]`): the HESSO settings (targets, schedule, criteria weights, kinds).
        training (`dict[str, Any]`): the training data and steps.
        metadata (`dict[str, Any]`): extra card metadata (language, license, tags, datasets, ...).
        model_type (`str`): the saved model's `config.model_type`; when set to a family llama.cpp cannot run, the
            card leaves out the GGUF export line.
        evaluation (`list[dict]`): scores before and after pruning, one entry per evaluation text (see
            `check_evaluation`): the card shows each with its ratio to the unpruned model.
        hidden_size (`tuple[int, int]`, *optional*): the residual-stream width before and after, where
            `hidden_channel` groups were removed.
        inferred_layout (`dict`, *optional*): for a model type outside hf_hesso's layout table, the layout's checked
            group kinds: `{"kinds": [...offered], "excluded": {kind: reason}}`; the card then says the layout was
            inferred and checked.
    """

    base_model: str
    model_name: str
    params_before: int
    params_after: int
    layers_before: Sequence[LayerShape]
    layers_after: Sequence[LayerShape]
    settings: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    model_type: str = ""
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    hidden_size: tuple[int, int] | None = None
    inferred_layout: dict[str, Any] | None = None


EVALUATION_KEYS = ("text", "metric", "tokens", "before", "after")


def check_evaluation(evaluation: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Validates the scores a card records: each entry names the `text`, the `metric` (e.g. `"perplexity"`), the
    number of `tokens` scored, and the score `before` pruning (the unpruned model) and `after` (the slim model)."""
    out = []
    for i, entry in enumerate(evaluation or []):
        if not isinstance(entry, dict) or set(entry) - set(EVALUATION_KEYS) or set(EVALUATION_KEYS) - set(entry):
            raise ValueError(
                f"`evaluation[{i}]` must be a dict with exactly the keys {list(EVALUATION_KEYS)}, got {entry!r}; e.g. "
                "`{'text': 'BBC news test split', 'metric': 'perplexity', 'tokens': 16384, 'before': 29.8, "
                "'after': 33.1}`."
            )
        for key in ("before", "after"):
            if not isinstance(entry[key], (int, float)) or entry[key] != entry[key] or entry[key] <= 0:
                raise ValueError(f"`evaluation[{i}][{key!r}]` must be a positive number, got {entry[key]!r}.")
        out.append({**entry, "before": float(entry["before"]), "after": float(entry["after"])})
    return out


def training_facts(args, state, train_dataset=None) -> dict[str, Any]:
    """The card's *Training* table of a `transformers.Trainer` run: its dataset, steps, batch size and optimizer,
    from its `TrainingArguments` (`args`), its `TrainerState` (`state`) and its `train_dataset`."""
    training: dict[str, Any] = {}
    info = getattr(train_dataset, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    if name:
        training["Dataset"] = name
    if train_dataset is not None and hasattr(train_dataset, "__len__"):
        training["Training examples"] = len(train_dataset)
    training["Optimizer steps"] = state.global_step
    if state.epoch is not None:
        training["Epochs"] = round(float(state.epoch), 4)
    training["Total batch size"] = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    training["Learning rate"] = args.learning_rate
    training["Optimizer"] = str(getattr(args.optim, "value", args.optim))
    training["Mixed precision"] = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    return training


def card_metadata(language=None, license=None, tags=None, tasks=None, dataset_tags=None, dataset=None) -> dict:
    """The card's metadata from the arguments of `transformers.Trainer.create_model_card` (each a string or a list
    of strings; `tasks` becomes the `pipeline_tag` when it is one string)."""
    datasets = [d for d in (dataset, dataset_tags) if d is not None]
    return {
        "language": language,
        "license": license,
        "tags": tags,
        "pipeline_tag": tasks if isinstance(tasks, str) else None,
        "datasets": [x for d in datasets for x in ([d] if isinstance(d, str) else d)] or None,
    }


def _is_hub_id(name: str) -> bool:
    # The Hub validates `base_model` against existing repos: a local path must not go there.
    return bool(name) and not os.path.isabs(name) and not os.path.exists(name) and name.count("/") <= 1


def _runtimes(model_type: str, inferred: bool = False) -> list[str]:
    """Card lines: which runtime loads the model, and the commands (GGUF only for the families it writes)."""
    remote = "`trust_remote_code=True` (the model code ships with the weights)"
    lines = [
        "| Runtime | How |",
        "|---|---|",
        f"| transformers | {remote}{'' if inferred else ', or `import hf_hesso` first'} |",
        "| transformers, stock classes | when every layer kept the same shape: `hf_hesso.to_stock(model)` then "
        "`save_pretrained` |",
    ]
    family = base_model_type(model_type) if model_type else None
    if family is None or family in GGUF_MODEL_TYPES:
        shapes = (
            "every layer must keep the same shape: llama.cpp's Gemma graphs have no per-layer sizes"
            if family in ("gemma2", "gemma3_text")
            else "uneven layers run as llama.cpp's `deci` architecture"
        )
        lines += [
            f"| llama.cpp, Ollama, LM Studio | GGUF: `hf-hesso-gguf <this folder> model.gguf --dtype f16` ({shapes}) |",
            "",
            "```bash",
            "hf-hesso-gguf <this folder> model.gguf --dtype f16   # or: python -m hf_hesso.export.gguf ...",
            "llama-cli -m model.gguf -cnv                          # chat, with the model's chat template",
            "```",
        ]
    return [*lines, ""]


def _inferred_layout(report: PruningReport) -> list[str]:
    """Card lines for a model type outside hf_hesso's layout table: how its layout was found and checked."""
    if report.inferred_layout is None:
        return []
    kinds = ", ".join(f"`{k}`" for k in report.inferred_layout.get("kinds", [])) or "none"
    excluded = report.inferred_layout.get("excluded", {})
    lines = [
        "## Architecture",
        "",
        f"`{base_model_type(report.model_type)}` is not in hf_hesso's layout table: the layout of its layers (which "
        "projections hold which heads and channels) was inferred from the module tree and checked numerically: on a "
        "tiny random instance of the same class, removing groups of each kind gave the same outputs as zeroing "
        "them, before and after a save and reload. The layout is recorded in `config.json` (`hesso_layout`), from "
        "which the shipped code builds this model.",
        "",
        f"Group kinds offered: {kinds}.",
    ]
    if excluded:
        lines += ["", "| Excluded kind | Reason |", "|---|---|"]
        lines += [f"| `{k}` | {reason.replace('|', '/')} |" for k, reason in excluded.items()]
    return [*lines, ""]


def render_model_card(report: PruningReport) -> str:
    """The card as Markdown with YAML metadata; `hesso` in the metadata holds the figures in machine form."""
    meta: dict[str, Any] = {"library_name": "transformers"}
    tags = ["hesso", "pruning", "structured-pruning", "hf_hesso"]
    for key, value in report.metadata.items():
        if value is None:
            continue
        if key == "tags":
            value = [value] if isinstance(value, str) else list(value)
            tags += [t for t in value if t not in tags]
        else:
            meta[key] = value
    meta["tags"] = tags
    if _is_hub_id(report.base_model):
        meta["base_model"] = report.base_model
    meta["hesso"] = {
        "params_before": int(report.params_before),
        "params_after": int(report.params_after),
        "layers": [shape.to_dict() for shape in report.layers_after],
        "settings": report.settings,
    }
    if report.evaluation:
        meta["hesso"]["evaluation"] = report.evaluation
    if report.hidden_size is not None:
        meta["hesso"]["hidden_size"] = int(report.hidden_size[1])
    if report.inferred_layout is not None:
        meta["hesso"]["layout"] = {"source": "inferred and checked", **report.inferred_layout}

    before, after = report.params_before, report.params_after
    kept = after / before if before else 1.0
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {report.model_name}",
        "",
        f"This model was trained and structurally pruned in one run with HESSO (hf_hesso), starting from "
        f"`{report.base_model or 'an unnamed model'}`. Pruned attention heads, key/value groups and MLP channels "
        "were physically removed, so the model is smaller and faster, not just sparse.",
        "",
        "Load it (and its tokenizer) with `trust_remote_code=True` (layers may differ in size)"
        + (":" if report.inferred_layout else ", or `import hf_hesso` first:"),
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        'model = AutoModel.from_pretrained("<this repo>", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("<this repo>", trust_remote_code=True)',
        "```",
        "",
        *_runtimes(report.model_type, inferred=report.inferred_layout is not None),
        *_inferred_layout(report),
        "## Size",
        "",
        "| | Parameters |",
        "|---|---:|",
        f"| Before pruning | {before:,} |",
        f"| After pruning | {after:,} |",
        f"| Kept | {100 * kept:.1f}% |",
        *([f"| Hidden size | {report.hidden_size[0]} -> {report.hidden_size[1]} |"] if report.hidden_size else []),
        "",
        "## Kept structures per layer",
        "",
        "| Layer | Attention heads | Key/value groups | MLP channels | Removed |",
        "|---:|---:|---:|---:|---|",
    ]
    for i, (b, a) in enumerate(zip(report.layers_before, report.layers_after, strict=True)):
        gone = [name for name, has in (("attention", a.has_attention), ("MLP", a.has_mlp)) if not has]
        removed = "whole layer" if a.empty else " and ".join(gone) + ("" if not gone else
                  " (output bias kept)" if a.attention_bias or a.mlp_bias else "")  # fmt: skip
        lines.append(
            f"| {i} | {a.num_attention_heads} / {b.num_attention_heads} | "
            f"{a.num_key_value_heads} / {b.num_key_value_heads} | {a.intermediate_size} / {b.intermediate_size} | "
            f"{removed} |"
        )
    if report.evaluation:
        lines += [
            "",
            "## Evaluation",
            "",
            "Scored before pruning (the unpruned model) and after (this model), on the same tokens:",
            "",
            "| Text | Metric | Tokens | Unpruned | Pruned | Ratio |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {e['text']} | {e['metric']} | {e['tokens']:,} | {e['before']:.2f} | {e['after']:.2f} | "
            f"{e['after'] / e['before']:.2f}x |"
            for e in report.evaluation
        ]
    lines += ["", "## HESSO settings", "", "| Setting | Value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in report.settings.items()]
    lines += ["", "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.training.items()]
    lines.append("")
    return "\n".join(lines)


def write_model_card(save: AtomicSave, report: PruningReport) -> bool:
    """Stage the card of `report` as `README.md` into `save` (an open `atomic_save`); returns whether it did.

    The one card writer of `save_slim` and `HESSOTrainer.create_model_card`. A `README.md` that hf_hesso did not
    write (or that was edited since) is the user's: it is kept, the card is not written, and a `UserWarning` says
    so.
    """
    if not save.owns(MODEL_CARD_NAME):
        warnings.warn(
            f"{os.path.join(save.directory, MODEL_CARD_NAME)!r} was not written by hf_hesso (or was edited since): it "
            "is kept, and the pruning model card is not written. Delete or rename that file and save again to get "
            "the card (the same figures are in `SavedSlim.report`).",
            UserWarning,
            stacklevel=3,
        )
        return False
    with open(os.path.join(save.staging, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
        f.write(render_model_card(report))
    return True
