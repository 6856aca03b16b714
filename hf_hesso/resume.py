"""Resuming a `HESSOTrainer` run: what a checkpoint must hold, and the frozen LoRA slices beside it.

Without HESSO's state a resumed run would silently start the pruning schedule again from step 0 and end below its
target, so `HESSOTrainer` checks a checkpoint before loading it (`check_checkpoint`): `optimizer.pt` with the
`"hesso"` (and, with CRIC, `"cric"`) entry, `scheduler.pt`, and with LoRA the frozen base slices HESSO faded or
zeroed (`hesso_frozen_slices.pt`; peft checkpoints hold only the adapters). A missing piece raises a `ValueError`
that names it, unless `restart_pruning_schedule=True` asks to load what exists (`load_available_state`). See
`docs/saving.md`, *Resuming*.
"""

from __future__ import annotations

import os

import torch
from accelerate.logging import get_logger
from torch import nn

from .groups import GroupSet
from .modeling.compat import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME
from .optim import HESSO
from .optim.frozen import FROZEN_SLICES_NAME, frozen_slices_state, load_frozen_slices

logger = get_logger(__name__)

__all__ = [
    "check_checkpoint",
    "has_frozen_slices",
    "load_available_state",
    "restore_frozen_slices",
    "save_frozen_slices",
]


def _has_optimizer_state(checkpoint: str, fsdp: bool) -> bool:
    if os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME)):
        return True
    if os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME_BIN)):
        return True
    # FSDP writes the optimizer state into a folder (`optimizer_0`).
    return fsdp and any(
        e.startswith("optimizer") and os.path.isdir(os.path.join(checkpoint, e)) for e in os.listdir(checkpoint)
    )


def check_checkpoint(checkpoint: str, *, cric: bool, lora: bool, fsdp: bool) -> tuple[list[str], bool]:
    """What of HESSO's state `checkpoint` lacks, and whether its optimizer state still holds HESSO's entries.

    Returns `(problems, hesso_state_ok)`: one sentence per missing piece; `hesso_state_ok` is `True` when
    `optimizer.pt` holds the full state of this optimizer (base + 'hesso' + 'cric' with `cric`) and, with `lora`,
    the frozen slices are there whenever groups were selected.
    """
    problems: list[str] = []
    hesso_state_ok = True
    path = os.path.join(checkpoint, OPTIMIZER_NAME)
    if not _has_optimizer_state(checkpoint, fsdp):
        problems.append(
            f"`{OPTIMIZER_NAME}` is missing: it holds the base optimizer's state and HESSO's pruning schedule "
            "(a checkpoint saved with `save_only_model=True` has none)"
        )
        hesso_state_ok = False
    elif os.path.isfile(path):
        try:  # memory-mapped: reading the keys does not load the moments into memory
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        needed = ["hesso"] + (["cric"] if cric else [])
        absent = [key for key in needed if key not in state]
        if absent:
            hesso_state_ok = False
            problems.append(
                f"`{OPTIMIZER_NAME}` has no {' or '.join(repr(k) for k in absent)} entry: it was saved by a "
                f"{'HESSO (not CRIC) ' if absent == ['cric'] else 'plain (not HESSO) '}optimizer"
            )
        elif lora and not os.path.isfile(os.path.join(checkpoint, FROZEN_SLICES_NAME)):
            selection = state["hesso"].get("selection_period")
            if selection is not None and bool((torch.as_tensor(selection) >= 0).any()):
                hesso_state_ok = False
                problems.append(
                    f"`{FROZEN_SLICES_NAME}` is missing, but HESSO had already selected "
                    f"{int((torch.as_tensor(selection) >= 0).sum())} groups: the frozen base weights it faded or "
                    "zeroed (peft checkpoints hold only the adapters) cannot be restored"
                )
    if not os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME)):
        problems.append(
            f"`{SCHEDULER_NAME}` is missing: transformers then loads neither the learning-rate schedule nor the "
            "optimizer state"
        )
    return problems, hesso_state_ok


def load_available_state(
    checkpoint: str,
    problems: list[str],
    hesso_state_ok: bool,
    *,
    optimizer: torch.optim.Optimizer,
    hesso: HESSO,
    lr_scheduler,
    restart_pruning_schedule: bool,
    step: int,
    max_steps: int,
    fsdp: bool,
) -> None:
    """Resume from a checkpoint that `check_checkpoint` found `problems` in.

    Without `restart_pruning_schedule`, raise a `ValueError` naming them. With it, load the optimizer and scheduler
    states that exist (HESSO's entries only when complete: `hesso_state_ok`); when HESSO's state is missing or
    incomplete its schedule starts over at the resumed `step`, which must still end by `max_steps`.
    """
    listed = "; ".join(problems)
    if not restart_pruning_schedule:
        raise ValueError(
            f"Cannot resume from {checkpoint!r} without HESSO's state: {listed}. Resuming would restart the "
            "pruning schedule from step 0 (or lose the pruned LoRA base weights) and end below the target "
            "sparsity without a word. Resume from a checkpoint written with `save_only_model=False` (the "
            "default), or set `restart_pruning_schedule=True` in HESSOConfig to resume the weights and start "
            "the pruning schedule over from the resumed step."
        )
    path = os.path.join(checkpoint, OPTIMIZER_NAME)
    if os.path.isfile(path) and not fsdp:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if hesso_state_ok:
            optimizer.load_state_dict(state)
        else:
            hesso.optimizer.load_state_dict({k: v for k, v in state.items() if k not in ("hesso", "cric")})
    scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
    if os.path.isfile(scheduler):
        lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
    if not hesso_state_ok:
        end = step + int(hesso.pruning_end_step)
        if max_steps > 0 and end > max_steps:
            raise ValueError(
                f"`restart_pruning_schedule=True` starts the pruning schedule over at the resumed step {step}, so "
                f"pruning would end at step {end}, after the {max_steps} planned optimizer steps. "
                f"Train longer (max_steps >= {end}) or lower `start_pruning_step` / `pruning_steps`."
            )
    logger.warning(
        f"Resuming from {checkpoint} with `restart_pruning_schedule=True` although {listed}. "
        + (
            f"HESSO's pruning schedule starts over at step {step}."
            if not hesso_state_ok
            else "HESSO's state is restored; the missing pieces start fresh."
        ),
        main_process_only=True,
    )


def save_frozen_slices(hesso: HESSO, output_dir: str) -> None:
    """peft checkpoints hold the adapters only: also store the frozen base slices HESSO has faded or zeroed."""
    state = frozen_slices_state(hesso)
    if state:
        torch.save(state, os.path.join(output_dir, FROZEN_SLICES_NAME))


def restore_frozen_slices(checkpoint: str, groups: GroupSet, model: nn.Module) -> None:
    """Write the frozen base slices stored beside `checkpoint` (`save_frozen_slices`) back into `model`."""
    path = os.path.join(checkpoint, FROZEN_SLICES_NAME)
    load_frozen_slices(groups, torch.load(path, weights_only=True), groups.parameters(model))


def has_frozen_slices(checkpoint: str) -> bool:
    """Whether `checkpoint` holds the frozen base slices of a LoRA run (`save_frozen_slices`)."""
    return os.path.isfile(os.path.join(checkpoint, FROZEN_SLICES_NAME))
