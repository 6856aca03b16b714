"""`save_slim`: one entry point that writes a slim model, from a hand-written loop or from `HESSOTrainer`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi
from torch import nn

from ..groups import GroupSet, build_groups
from ..groups.peft import is_peft_model
from ..optim import HESSO
from ..slim import ADAPTER_SUBDIR, SlimSummary, merge_and_slim, slim_copy, slim_with_adapters, to_stock
from .atomic import atomic_directory
from .card import MODEL_CARD_NAME, PruningReport, render_model_card

logger = logging.getLogger(__name__)


@dataclass
class SavedSlim:
    """What `save_slim` wrote.

    Attributes:
        directory (`str`): the output directory.
        summary (`SlimSummary`): parameters before/after and the kept sizes of every layer.
        report (`PruningReport`): what the model card records.
        url (`str | None`): the commit URL when the model was pushed to the Hub.
    """

    directory: str
    summary: SlimSummary
    report: PruningReport
    url: str | None = None


def build_report(
    model: nn.Module,
    summary: SlimSummary,
    *,
    settings: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    model_name: str = "",
    metadata: dict[str, Any] | None = None,
) -> PruningReport:
    """The model card's content for a slim copy of `model` described by `summary`."""
    config = getattr(model, "config", None)
    if config is None and is_peft_model(model):
        config = model.get_base_model().config
    return PruningReport(
        base_model=getattr(config, "_name_or_path", "") or "",
        model_name=model_name,
        params_before=int(summary.params_before),
        params_after=int(summary.params_after),
        layers_before=list(summary.layers_before),
        layers_after=list(summary.layers),
        settings={k: v for k, v in (settings or {}).items() if v is not None},
        training=dict(training or {}),
        metadata=dict(metadata or {}),
    )


def save_slim(
    model: nn.Module,
    output_dir: str | os.PathLike,
    groups: GroupSet | None = None,
    *,
    tokenizer=None,
    optimizer: HESSO | None = None,
    settings: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    merge_adapters: bool = True,
    write_extra: Callable[[str], None] | None = None,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload slim model (hf_hesso)",
    stock: bool = False,
) -> SavedSlim:
    """Write the slim version of `model` to `output_dir`: weights, config, shipped code, tokenizer, model card.

    The slim model is a copy built in CPU memory layer by layer (`hf_hesso.slim.slim_copy`): the live `model`
    keeps training unchanged, and the training device holds nothing extra. The files are written into a temporary
    folder beside `output_dir` and only then take the place of the previous output, so an error (or a crash) while
    writing leaves the previous model in place.

    Args:
        model (`nn.Module`): the trained transformers model (or LoRA `PeftModel`), its pruned groups at zero.
        output_dir (`str` or `os.PathLike`): where to write.
        groups (`GroupSet`, *optional*): the groups HESSO pruned. Default: `optimizer.groups`, else
            `build_groups(model)` (every group whose slices are all zero is removed either way).
        tokenizer (*optional*): a tokenizer or processor to save beside the model.
        optimizer (`HESSO`, *optional*): the optimizer that pruned `model`; its settings go into the model card.
        settings (`dict`, *optional*): settings for the card (override those read from `optimizer`).
        training (`dict`, *optional*): training facts for the card (data, steps, batch size...).
        stock (`bool`, *optional*, defaults to `False`): save as the stock class and config (`to_stock`), loadable
            with nothing imported and no remote code; every kept layer must have one shape the stock config can
            express (what `layer_shapes="uniform"` gives). Raises otherwise.
        merge_adapters (`bool`, *optional*, defaults to `True`): LoRA models only. `True`: one merged slim model;
            `False`: the slim base model plus the adapters sliced alike in `output_dir/adapter` (load with
            `PeftModel.from_pretrained(base, output_dir + "/adapter")`).
        write_extra (`Callable[[str], None]`, *optional*): called with the temporary folder to add more files.
        push_to_hub (`bool`, *optional*, defaults to `False`): upload the written files to `hub_model_id`.
        hub_model_id, hub_token, private, commit_message: where and how to push.

    Returns:
        `SavedSlim`: the directory, the `SlimSummary`, the card's `PruningReport` and the commit URL if pushed.

    Example:

    ```python
    opt = HESSO(torch.optim.AdamW(model.parameters(), lr=1e-4), groups, target_group_sparsity=0.3, ...)
    ...  # train
    save_slim(model, "out", optimizer=opt, tokenizer=tok)
    model = AutoModelForCausalLM.from_pretrained("out", trust_remote_code=True)
    ```
    """
    if push_to_hub and not hub_model_id:
        raise ValueError("`push_to_hub=True` needs `hub_model_id` (e.g. 'your-name/model-slim').")
    if groups is None and optimizer is not None:
        groups = optimizer.groups
    if groups is None:
        groups = build_groups(model)
    card_settings = dict(optimizer.settings()) if optimizer is not None else {}
    card_settings.update(settings or {})
    card_settings.setdefault("prunable_groups", len(groups))

    adapters = None
    if is_peft_model(model):
        if merge_adapters:
            slim, summary = merge_and_slim(model, groups)
        else:
            slim, adapters, summary = slim_with_adapters(model, groups)
    else:
        if not merge_adapters:
            raise ValueError(
                "`merge_adapters=False` keeps LoRA adapters apart from the slim base, but this model has no "
                "adapters. Leave `merge_adapters` at its default."
            )
        slim, summary = slim_copy(model, groups)
    if stock:
        if adapters is not None:
            raise ValueError("`stock=True` writes one merged stock model; it cannot keep LoRA adapters apart.")
        to_stock(slim)
    card_settings["removed_groups"] = summary.removed_groups
    name = Path(hub_model_id or os.fspath(output_dir)).name
    report = build_report(model, summary, settings=card_settings, training=training, model_name=name)

    with atomic_directory(output_dir) as tmp:
        slim.save_pretrained(tmp)
        if adapters is not None:
            adapters.save_pretrained(os.path.join(tmp, ADAPTER_SUBDIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if write_extra is not None:
            write_extra(tmp)
        with open(os.path.join(tmp, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
            f.write(render_model_card(report))
    logger.info(
        f"Saved the slim model ({summary.params_after:,} of {summary.params_before:,} parameters) to {output_dir}"
    )
    saved = SavedSlim(os.fspath(output_dir), summary, report)
    if push_to_hub:
        commit = upload_folder(output_dir, hub_model_id, token=hub_token, private=private, message=commit_message)
        saved.url = commit.commit_url
    return saved


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    message: str = "Upload slim model (hf_hesso)",
    revision: str | None = None,
    ignore_patterns: list[str] | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed and upload `folder` to it; returns the commit (`.oid`, `.commit_url`)."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=message,
        revision=revision,
        ignore_patterns=ignore_patterns or ["_*", "checkpoint-*"],
    )
    return info
