"""The callbacks `HESSOTrainer` adds, and the console line they print.

- `PruningProgressCallback`: one log line whenever the pruning schedule enters a new period;
- `SelectionDiagnostics`: every selection of HESSO (or CRIC), with the training loss just before and after it;
- `HESSOProgressCallback` / `HESSOPrinterCallback`: the Trainer's console callbacks, printing one short HESSO
  summary (`console_summary`) instead of every `hesso/*` and `cric/*` metric. The reporters (TensorBoard, W&B, ...)
  are other callbacks and still receive every metric.

**Selection diagnostics.** For each selection the callback reports the kinds and layers of the newly selected
groups, the loss of the selection step (its forward pass ran before anything faded: the loss before the removal)
and the loss of the first step after the period's end (its forward pass is the first with those groups exactly
zero: the loss after the removal), as one log line and as `hesso/selection/p<period>/*` metrics merged into the
next training log. A bad selection shows as a jump between the two (the loss after also carries the period's
training, so compare it with the other periods'). The losses are the training losses of single optimizer steps on
this process (one batch each, summed over the gradient-accumulation micro-batches): noisy, but free.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from accelerate.logging import get_logger
from transformers import TrainerCallback

from .groups import KINDS
from .modeling.compat import PrinterCallback, ProgressCallback
from .optim import HESSO

logger = get_logger(__name__)

__all__ = [
    "CONSOLE_MAX_LEN",
    "HESSOPrinterCallback",
    "HESSOProgressCallback",
    "PruningProgressCallback",
    "SelectionDiagnostics",
    "console_logs",
    "console_summary",
    "find_hesso",
    "quiet_console",
]


def find_hesso(optimizer: Any) -> HESSO | None:
    """The `HESSO` (or `CRIC`) instance inside the optimizer the Trainer holds (Accelerate wraps it), or `None`."""
    while optimizer is not None and not isinstance(optimizer, HESSO):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class PruningProgressCallback(TrainerCallback):
    """Logs one line whenever the pruning schedule enters a new period (main process only)."""

    def __init__(self):
        self.period: int | None = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        hesso = find_hesso(optimizer)
        if hesso is None:
            return
        period = int(hesso.current_period)
        if period == self.period:
            return
        previous, self.period = self.period, period
        # Resuming inside warm-up is not news; every other change is.
        if previous is None and period < 0:
            return
        periods = args.pruning_periods
        if period >= periods:
            what = "pruning finished"
        else:
            what = f"pruning period {period + 1}/{periods} started"
        logger.info(
            f"HESSO step {state.global_step}/{state.max_steps}: {what}, {len(hesso.redundant_groups)} groups selected, "
            f"{len(hesso.pruned_groups)} at zero.",
            main_process_only=True,
        )


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
        hesso = find_hesso(optimizer)
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


# ---- Console ----

# Metrics that reach the reporters (TensorBoard, W&B, ...) but not the console, where one summary stands for them.
_CONSOLE_HIDDEN = ("hesso/", "cric/")

# The longest string transformers' progress callback prints (`ProgressCallback(max_str_len=100)`); a longer one is
# replaced by "[String too long to display, ...]".
CONSOLE_MAX_LEN = 100


def _chunks(items: list[str], max_len: int) -> list[str]:
    """`items` joined with ", " into as few strings as fit `max_len` characters each (an item longer is cut)."""
    out: list[str] = []
    for item in items:
        item = item[:max_len]
        if out and len(out[-1]) + 2 + len(item) <= max_len:
            out[-1] += ", " + item
        else:
            out.append(item)
    return out


def console_summary(logs: dict[str, Any], pruning_periods: int, max_len: int = CONSOLE_MAX_LEN) -> dict[str, str]:
    """HESSO's progress from the `hesso/*` (and `cric/*`) metrics of a log, as a few short console entries.

    Each value fits `max_len` characters, so that transformers' progress callback prints it whole:

    - `hesso`: the phase and the sparsity, e.g. `period 2/4, 25.0% of groups, 11.3% of params pruned`;
    - `hesso_pruned`: the pruned groups per kind, e.g. `mlp_channel 40, kv_group 2` (continued in `hesso_pruned_2`,
      ... when the kinds do not fit one entry);
    - `cric`: CRIC's phase and cycles, e.g. `probing, 0 cycles`.

    Empty when the log has no HESSO metrics.
    """
    if "hesso/period" not in logs:
        return {}
    period = int(logs["hesso/period"])
    if period < 0:
        phase = "warm-up"
    elif period >= pruning_periods:
        phase = "pruning done"
    else:
        phase = f"period {period + 1}/{pruning_periods}"
    out = {
        "hesso": f"{phase}, {logs.get('hesso/group_sparsity', 0.0):.1%} of groups, "
        f"{logs.get('hesso/param_sparsity', 0.0):.1%} of params pruned"[:max_len]
    }
    kinds = [
        f"{kind} {int(logs[f'hesso/pruned_groups/{kind}'])}" for kind in KINDS if f"hesso/pruned_groups/{kind}" in logs
    ]
    for i, chunk in enumerate(_chunks(kinds, max_len)):
        out["hesso_pruned" if i == 0 else f"hesso_pruned_{i + 1}"] = chunk
    if "cric/phase" in logs:
        phases = ("warmup", "probing", "cycles", "done")
        out["cric"] = f"{phases[int(logs['cric/phase'])]}, {int(logs.get('cric/cycles', 0))} cycles"
    return out


def console_logs(logs: dict[str, Any], pruning_periods: int, max_len: int = CONSOLE_MAX_LEN) -> dict[str, Any]:
    """The logs as the console shows them: without the `hesso/*` and `cric/*` keys, with the `console_summary`."""
    out = {k: v for k, v in logs.items() if not k.startswith(_CONSOLE_HIDDEN)}
    out.update(console_summary(logs, pruning_periods, max_len))
    return out


class HESSOProgressCallback(ProgressCallback):
    """The progress bar's log lines, with a short HESSO summary instead of the per-kind and per-layer metrics."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = console_logs(logs or {}, getattr(args, "pruning_periods", 1), self.max_str_len)
        return super().on_log(args, state, control, logs=logs, **kwargs)


class HESSOPrinterCallback(PrinterCallback):
    """`PrinterCallback` (`disable_tqdm=True`) with a short HESSO summary instead of the per-layer metrics."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = console_logs(logs or {}, getattr(args, "pruning_periods", 1))
        return super().on_log(args, state, control, logs=logs, **kwargs)


def quiet_console(callbacks: list[TrainerCallback]) -> None:
    """Replace, in place, the Trainer's `ProgressCallback` / `PrinterCallback` in `callbacks` (a Trainer's
    `callback_handler.callbacks`) by the HESSO ones, which print one summary per log instead of every `hesso/*` key.
    """
    for i, cb in enumerate(callbacks):
        if type(cb) is ProgressCallback:
            callbacks[i] = HESSOProgressCallback(max_str_len=getattr(cb, "max_str_len", CONSOLE_MAX_LEN))
        elif type(cb) is PrinterCallback:
            callbacks[i] = HESSOPrinterCallback()
