"""`save_slim`: THE route that writes a slim model to disk, from a hand-written loop or from `HESSOTrainer`.

`HESSOTrainer.save_model()` and `push_to_hub()` call it with the Trainer's settings. It passes once through each
layer below it: the slim copy (`hf_hesso.slim`), then one `atomic_save` (`export/atomic.py`), which recovers an
interrupted earlier save and reads the previous manifest once, and commits through `hf_hesso.modeling.journal`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi
from torch import nn

from ..groups import GroupSet, build_groups
from ..groups.peft import is_peft_model
from ..modeling.architectures import ARCHITECTURES, base_model_type
from ..modeling.journal import MANIFEST_NAME
from ..optim import HESSO
from ..slim import SlimSummary, merge_and_slim, slim_copy, slim_with_adapters, to_stock
from ..slim.core import check_materialized
from ..slim.lora import ADAPTER_SUBDIR
from .atomic import atomic_save, owned_files
from .card import MODEL_CARD_NAME, PruningReport, check_evaluation, write_model_card

logger = logging.getLogger(__name__)


@dataclass
class SavedSlim:
    """What `save_slim` wrote.

    Attributes:
        directory (`str`): the output directory.
        summary (`SlimSummary`): parameters before/after and the kept sizes of every layer.
        report (`PruningReport`): what the model card records.
        url (`str | None`): the commit URL when the model was pushed to the Hub.
        files (`list[str]`): the files this save wrote and owns (relative to `directory`), as its manifest lists them.
        card_written (`bool`): whether the model card was written to `README.md` (`False` when a `README.md` that
            hf_hesso did not write was already there: it is kept).
    """

    directory: str
    summary: SlimSummary
    report: PruningReport
    url: str | None = None
    files: list[str] = field(default_factory=list)
    card_written: bool = True


def build_report(
    model: nn.Module,
    summary: SlimSummary,
    *,
    settings: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    model_name: str = "",
    metadata: dict[str, Any] | None = None,
    evaluation: list[dict[str, Any]] | None = None,
) -> PruningReport:
    """The model card's content for a slim copy of `model` described by `summary`."""
    config = getattr(model, "config", None)
    if config is None and is_peft_model(model):
        config = model.get_base_model().config
    layout = ARCHITECTURES.get(base_model_type(getattr(config, "model_type", "") or ""))
    inferred = None
    if layout is not None and layout.inferred:
        inferred = {"kinds": list(layout.exact), "excluded": dict(layout.excluded)}
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
        model_type=getattr(config, "model_type", "") or "",
        evaluation=check_evaluation(evaluation),
        inferred_layout=inferred,
        hidden_size=None if summary.hidden_size is None else (summary.hidden_size_before, summary.hidden_size),
    )


def hesso_of(optimizer: Any) -> HESSO:
    """The `HESSO` (or `CRIC`) inside `optimizer`: itself, or the optimizer that a wrapper holds as `.optimizer`
    (accelerate's `AcceleratedOptimizer`, which `HESSOTrainer.optimizer` is, and any wrapper alike)."""
    inner, seen = optimizer, []
    while inner is not None and not isinstance(inner, HESSO) and len(seen) < 16:
        seen.append(type(inner).__name__)
        inner = getattr(inner, "optimizer", None)
    if isinstance(inner, HESSO):
        return inner
    chain = " -> ".join(seen) or "None"
    raise TypeError(
        f"`optimizer` must be the `HESSO` (or `CRIC`) optimizer that pruned the model, or a wrapper around it such as "
        f"`trainer.optimizer`; got {type(optimizer).__name__} ({chain}), which holds none. Pass the HESSO instance "
        "(with `HESSOTrainer`: `trainer.hesso_optimizer`), or pass `groups=` instead."
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
    evaluation: list[dict[str, Any]] | None = None,
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

    The route to a slim model on disk from a hand-written loop (with `HESSOTrainer`, `trainer.save_model()` calls it;
    see `docs/saving.md`, *One route per task*). The slim model is a copy built in CPU memory layer by layer (its
    lower level, `hf_hesso.slim.slim_copy`): the live `model` keeps training unchanged, and the training device holds
    nothing extra.

    The save writes only the files it owns and never touches anything else in `output_dir` (your scripts, data,
    `checkpoint-*` folders): the weights (sharded or not, with their index), `config.json`, `generation_config.json`,
    the shipped code (`*.py` beside the weights), the tokenizer files, the model card `README.md`, what
    `write_extra` adds, and `adapter/` with `merge_adapters=False`. They are written into a staging folder inside
    `output_dir`, flushed, then each replaces its destination atomically; files of the previous hf_hesso save
    there that this one does not write (listed in `.hf_hesso_manifest.json`) are removed. A crash at any point
    leaves the previous or the new model: the next save, or `from_pretrained` of the directory, finishes a save
    that passed its commit point. `output_dir` may be the working directory, a mount point or a symlink (followed).
    See `docs/saving.md`.

    A `README.md` that hf_hesso did not write (or that was edited since) is kept: the card is then not written
    and a warning says so (`SavedSlim.card_written` is `False`); delete or rename that README to get the card.

    Any other file the save would write that is already in `output_dir` and was not written by an earlier hf_hesso
    save there (or was changed since), e.g. your own `model.safetensors`, is never replaced: the save raises before
    anything moves, naming it (a file with exactly the bytes the save writes is the exception). Two saves into one
    `output_dir` at the same time are refused (`ConcurrentSaveError`): each save holds the lock file
    `output_dir/.hf_hesso-save.lock` while it runs.

    Args:
        model (`nn.Module`): the trained transformers model (or LoRA `PeftModel`), its pruned groups at zero.
            Its weights must be real tensors (not on the meta device).
        output_dir (`str` or `os.PathLike`): where to write; created if needed.
        groups (`GroupSet`, *optional*): the groups HESSO pruned. Default: `optimizer.groups`, else
            `build_groups(model)` (every group whose slices are all zero is removed either way).
        tokenizer (*optional*): a tokenizer or processor to save beside the model.
        optimizer (`HESSO`, *optional*): the optimizer that pruned `model`; its settings go into the model card. A
            wrapper around it is accepted (`trainer.optimizer`, accelerate's `AcceleratedOptimizer`).
        settings (`dict`, *optional*): settings for the card (override those read from `optimizer`).
        training (`dict`, *optional*): training facts for the card (data, steps, batch size...).
        evaluation (`list[dict]`, *optional*): scores for the card's *Evaluation* section, one dict per text with
            the keys `text`, `metric`, `tokens`, `before` (unpruned) and `after` (this model); checked before anything
            is written.
        stock (`bool`, *optional*, defaults to `False`): save as the stock class and config (`to_stock`), loadable
            with nothing imported and no remote code; every kept layer must have one shape the stock config can
            express (what `layer_shapes="uniform"` gives). Raises otherwise. The lower level of a
            `layer_shapes="uniform"` run, whose `HESSOTrainer.save_model()` sets it.
        merge_adapters (`bool`, *optional*, defaults to `True`): LoRA models only. `True`: one merged slim model;
            `False`: the slim base model plus the adapters sliced alike in `output_dir/adapter` (load with
            `PeftModel.from_pretrained(base, output_dir + "/adapter")`).
        write_extra (`Callable[[str], None]`, *optional*): called with the staging folder to add more files; they
            are owned by the save like the others.
        push_to_hub (`bool`, *optional*, defaults to `False`): upload the files of this save to `hub_model_id`
            (only those: other files in `output_dir` stay local).
        hub_model_id, hub_token, private, commit_message: where and how to push.

    Returns:
        `SavedSlim`: the directory, the `SlimSummary`, the card's `PruningReport`, the files written and the commit
        URL if pushed.

    Raises:
        `ValueError`: `model` has weights on the meta device; `output_dir` is a file; a file the save would write is
            already in `output_dir` and was not written by an earlier hf_hesso save there (or changed since); a
            `model.safetensors` that hf_hesso did not write would shadow new sharded weights; or the manifest names
            a file outside `output_dir`. Nothing is written then.
        `ConcurrentSaveError`: another save into `output_dir` is running (two at once are not supported).
        `TypeError`: `optimizer` is not a `HESSO` nor a wrapper around one.

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
    check_materialized(model, "save_slim")
    evaluation = check_evaluation(evaluation)
    if optimizer is not None:
        optimizer = hesso_of(optimizer)
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
    report = build_report(
        model, summary, settings=card_settings, training=training, model_name=name, evaluation=evaluation
    )

    # One save into `output_dir` at a time (`ConcurrentSaveError` otherwise). Opening it finishes or cleans up an
    # interrupted earlier save, so that the ownership of README.md is decided on the directory as its last save left it.
    with atomic_save(output_dir) as save:
        slim.save_pretrained(save.staging)
        if adapters is not None:
            adapters.save_pretrained(os.path.join(save.staging, ADAPTER_SUBDIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(save.staging)
        if write_extra is not None:
            write_extra(save.staging)
        card_written = write_model_card(save, report)
    logger.info(
        f"Saved the slim model ({summary.params_after:,} of {summary.params_before:,} parameters) to {output_dir}"
    )
    saved = SavedSlim(os.fspath(output_dir), summary, report, files=save.files, card_written=card_written)
    if push_to_hub:
        commit = upload_folder(
            output_dir, hub_model_id, token=hub_token, private=private, message=commit_message, files=save.files
        )
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
    files: list[str] | None = None,
) -> CommitInfo:
    """Create `repo_id` if needed and upload the files of the last hf_hesso save in `folder`; returns the commit.

    Only the files the save owns and `README.md` go up: the user's other files in `folder` (scripts, data,
    `checkpoint-*` folders) stay local. `files` are those of the save just made (`SavedSlim.files`); by default they
    are read from the manifest of `folder`.
    """
    files = list(owned_files(folder) if files is None else files)
    if not files:
        raise ValueError(
            f"{os.fspath(folder)!r} holds no model saved by hf_hesso (no {MANIFEST_NAME}): save it first with "
            "`save_slim` or `trainer.save_model()`."
        )
    if os.path.isfile(os.path.join(folder, MODEL_CARD_NAME)) and MODEL_CARD_NAME not in files:
        files.append(MODEL_CARD_NAME)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=message,
        revision=revision,
        allow_patterns=files,
    )
    # `CommitInfo` is a `str` (the commit URL) that also carries `.oid`, as `Trainer.push_to_hub` returns it.
    return info
