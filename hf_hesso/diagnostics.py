"""Per-selection diagnostics: what every pruning period selected, and the training loss just before and after.

For each selection the callback reports the kinds and layers of the newly selected groups, the loss of the selection
step (its forward pass ran before anything faded: the loss before the removal) and the loss of the first step after
the period's end (its forward pass is the first with those groups exactly zero: the loss after the removal), as one
log line and as `hesso/selection/p<period>/*` metrics merged into the next training log. A bad selection shows as a
jump between the two (the loss after also carries the period's training, so compare it with the other periods').

The losses are the training losses of single optimizer steps on this process (one batch each, summed over the
gradient-accumulation micro-batches): noisy, but free.
"""

from __future__ import annotations

from collections import Counter

import torch
from accelerate.logging import get_logger
from transformers import TrainerCallback

from .optim import HESSO

logger = get_logger(__name__)


def _hesso_of(optimizer):
    while optimizer is not None and not isinstance(optimizer, HESSO):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class SelectionDiagnostics(TrainerCallback):
    """Reports every selection of HESSO (or CRIC) with the loss before and after (see the module docstring).

    The trainer hands it the loss of every micro-batch (`observe_loss`) and merges `pop_metrics()` into its logs.
    """

    def __init__(self):
        self._step_loss: torch.Tensor | float = 0.0
        self._selected: torch.Tensor | None = None
        self._open: list[dict] = []  # selections whose groups have not yet been a whole step at zero
        self._metrics: dict[str, float] = {}
        self.records: list[dict] = []  # every finished selection, in order

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss (as scaled for gradient accumulation) to the current step's."""
        self._step_loss = self._step_loss + loss.detach()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        hesso = _hesso_of(optimizer)
        loss, self._step_loss = self._step_loss, 0.0
        if hesso is None:
            return
        step = hesso.num_steps
        pruned = hesso.pruned_groups
        for record in list(self._open):
            if record["zero_at"] is not None and record["zero_at"] < step:
                record["loss_after"] = float(loss)
                self._finish(record)
            elif record["zero_at"] is None and bool(torch.isin(record["groups"], pruned).all()):
                record["zero_at"] = step
        selected = hesso.selected_mask
        if self._selected is None:
            self._selected = torch.zeros_like(selected)
        new = selected & ~self._selected
        self._selected = selected.clone()
        if not bool(new.any()):
            return
        groups = hesso.groups
        index = new.nonzero().squeeze(1)
        kinds = groups.kinds()
        layers = groups.layers()
        record = {
            "period": len(self.records) + len(self._open),
            "step": step,
            "groups": index,
            "kinds": dict(sorted(Counter(kinds[i] for i in index.tolist()).items())),
            "layers": dict(sorted(Counter(int(layers[i]) for i in index.tolist()).items())),
            "loss_before": float(loss),
            "loss_after": None,
            "zero_at": step if bool(torch.isin(index, pruned).all()) else None,
        }
        self._open.append(record)

    def on_train_end(self, args, state, control, **kwargs):
        for record in list(self._open):
            self._finish(record)

    def _finish(self, record: dict) -> None:
        self._open.remove(record)
        self.records.append(record)
        p = record["period"]
        before, after = record["loss_before"], record["loss_after"]
        kinds = ", ".join(f"{k} {v}" for k, v in record["kinds"].items())
        layers = ", ".join(f"{k}:{v}" for k, v in record["layers"].items())
        if after is None:
            change = "no step after their removal"
        else:
            rel = f" ({(after - before) / abs(before):+.1%})" if before else ""
            change = f"loss {before:.4g} at selection, {after:.4g} after removal{rel}"
        logger.info(
            f"HESSO selection {p + 1} (step {record['step']}): {len(record['groups'])} groups ({kinds}; per layer "
            f"{layers}); {change}.",
            main_process_only=True,
        )
        prefix = f"hesso/selection/p{p + 1}"
        self._metrics[f"{prefix}/step"] = float(record["step"])
        self._metrics[f"{prefix}/loss_before"] = before
        if after is not None:
            self._metrics[f"{prefix}/loss_after"] = after
        for kind, count in record["kinds"].items():
            self._metrics[f"{prefix}/groups/{kind}"] = float(count)
        for layer, count in record["layers"].items():
            self._metrics[f"{prefix}/groups/layer_{layer}"] = float(count)

    def pop_metrics(self) -> dict[str, float]:
        """The metrics of the selections finished since the last call."""
        out, self._metrics = self._metrics, {}
        return out
