"""`CRIC`: HESSO with the Corrective Redundant Identification Cycle (Chen et al., 2024, Section 3.3).

One-step saliency can misjudge an indispensable structure. Before committing to a redundant set, CRIC probes how
sensitive every block is to partial removal (by the loss), simulates removing candidate sets over several cycles
while training on, collects the scores of every group over all those steps, and only then runs one HESSO period of
progressive projection on the final set.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from ..groups import GroupSet
from .distributed import local
from .hesso import HESSO
from .schedule import DEFAULT_TRIAL_RATIOS, check_cric_settings
from .scoring import score_problem
from .state import restored_int, restored_tensor, state_error

__all__ = ["CRIC", "DEFAULT_TRIAL_RATIOS", "check_cric_settings"]

logger = logging.getLogger(__name__)

_STATE_KEY = "cric"


def _renamed(old: str, old_value: Any, new: str, new_value: Any, default: Any) -> Any:
    """The value of a renamed argument: `new`, or `old` with a `FutureWarning` (one release), never both."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(
            f"Pass `{new}` only: `{old}` is its former name (got {old}={old_value!r}, {new}={new_value!r})."
        )
    warnings.warn(
        f"`CRIC({old}=...)` is renamed `{new}`, as in `HESSO`; `{old}` will be removed in the next release.",
        FutureWarning,
        stacklevel=3,
    )
    return old_value


class CRIC(HESSO):
    r"""
    HESSO with the Corrective Redundant Identification Cycle (CRIC): the redundant set is identified by probing and
    corrective cycles before it is projected to zero, so that a structure whose one-step saliency is low but whose
    removal destroys the loss is kept.

    Schedule, in optimizer steps `n = 1, 2, ...` (S = `start_pruning_step`, B = number of blocks, R = number of trial
    ratios, m = `sampling_steps`):

    1. `n <= S`: plain base-optimizer steps (warm-up).
    2. `n = S + 1`: the loss of this step is the reference loss; base step, score every group, cache the prunable
       parameters (on the CPU), then apply probe 1: zero the lowest-scoring `ratio` of one block's groups.
    3. `n = S + 2 ... S + 1 + B * R` (probing): the loss of step `n` is the loss of the model with probe `n - S - 1`
       applied (the probe was applied at the end of step `n - 1`). Its ratio to the reference loss is recorded, the
       block is restored from the cache, and the next probe is applied. No base step is taken on these steps (their
       gradients are those of a probed model), so the probes leave the weights and the optimizer state untouched.
    4. Cycles of `m` steps each, at most `max_cycles`. At a cycle's first step the candidate set `C` is the global
       bottom-K by the current estimate (mean score over the collected steps plus the probing penalty). Over the
       cycle `C` fades linearly to exactly zero while training goes on; at every step the groups are scored again,
       and a group outside `C` whose live score ranks it in the step's bottom-K (the groups of `C` ranked by their
       score at the cycle's start, as their live values are being faded) is *violating*: it looks redundant only
       once others are removed. Scores of groups outside `C` are added to their mean. At the cycle's end the
       violating groups join the history, the prunable parameters are restored from the cache, and the search stops
       when the cycle found at most `tolerance` groups not already in the history, or after `max_cycles` cycles.
       As every cycle but the last adds at least `tolerance + 1` groups to the history, which is bounded by the
       number of groups `N`, at most `min(max_cycles, N // (tolerance + 1) + 1)` cycles run (Theorem 3.3).
    5. Final score per group: its mean score plus `loss_weight * max(0, mean probe loss ratio of its block - 1) *
       mean |score|`. The global bottom-K of the final scores is projected to zero by one HESSO period of
       `pruning_steps` steps, starting right after the last cycle; training then continues with those groups held
       at exactly zero.

    `pruning_end_step` is the worst-case end (all `max_cycles` cycles) until the cycles have finished, then the
    actual end. Steps on which the loss is needed (`needs_loss`): `S + 1 ... S + 1 + B * R`.

    Loss contract: the optimizer reads the loss of each step. [`HESSOTrainer`] hands it over on its own (summed over
    gradient accumulation micro-batches, averaged across processes); with distillation it hands over the task loss
    alone, so the probes measure the same quantity with and without a teacher. In a hand-written loop call
    `opt.observe_loss(loss)` before `opt.step()` (with gradient accumulation, once per micro-batch with the loss as
    scaled for `backward`: the values are summed). A closure passed to `step` that returns the loss works too.

    Memory: besides HESSO's O(number of groups) state, CRIC keeps, from step `S + 1` until the cycles end, one CPU
    copy of every parameter that a group slices (for LLaMA models: the attention and MLP projections, about 95% of
    the parameters; the embeddings and norms are not copied), in the parameters' dtype, and nothing extra on the
    accelerator. That copy is part of `state_dict()` while the search runs, so a checkpoint taken then holds it too.

    Implementation: CRIC uses only HESSO's documented interface (`docs/optimizer.md`): it overrides the hooks
    `pruning_step(n)` (probing and cycles until the search ends) and `selection_scores(period, n)` (its final
    scores), ranks candidates with `budget_mask`, probes and fades with `zero_groups` / `fade`, scores with
    `score_step()`, and starts HESSO's one period with `begin_projection(step)`. A batch whose scores are NaN,
    infinite or all zero is left out of the means with a warning.

    Args:
        optimizer (`torch.optim.Optimizer`): the base optimizer, as for [`HESSO`].
        groups ([`GroupSet`]): the prunable groups, from `build_groups(model)`.
        target_group_sparsity (`float`, *optional*): fraction of the groups to remove, in `(0, 1)`.
        target_param_sparsity (`float`, *optional*): fraction of the group parameters to remove, in `(0, 1)`.
            Set exactly one of the two targets.
        start_pruning_step (`int`, *optional*, defaults to `0`): warm-up optimizer steps before CRIC starts (the
            name `HESSO` uses; `start_step`, its former name here, is still accepted with a `FutureWarning` and will
            be removed in the next release).
        pruning_steps (`int`, *optional*, defaults to `10`): length of the one projection period, at least 2.
        sampling_steps (`int`, *optional*, defaults to `10`): optimizer steps per cycle, at least 2.
        max_cycles (`int`, *optional*, defaults to `5`): most cycles, at least 1.
        tolerance (`int`, *optional*, defaults to `0`): a cycle that finds at most this many new violating groups
            ends the search.
        trial_ratios (`Sequence[float]`, *optional*, defaults to `(0.25, 0.5, 0.75)`): fractions of every block
            zeroed by the probes, each in `(0, 1)`.
        loss_weight (`float`, *optional*, defaults to `1.0`): weight of the block-sensitivity penalty, `>= 0`.
        importance_criteria, group_divisible, hold_zeros, saliency_direction: as for [`HESSO`].

    Example:

    ```python
    opt = CRIC(torch.optim.AdamW(model.parameters(), lr=1e-4), build_groups(model), target_group_sparsity=0.3,
               start_pruning_step=100, pruning_steps=50)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        opt.observe_loss(loss)  # CRIC reads the loss of each step
        opt.step()
        opt.zero_grad()
    ```
    """

    def __init__(
        self,
        optimizer: Optimizer,
        groups: GroupSet,
        *,
        target_group_sparsity: float | None = None,
        target_param_sparsity: float | None = None,
        start_pruning_step: int | None = None,
        pruning_steps: int = 10,
        sampling_steps: int = 10,
        max_cycles: int = 5,
        tolerance: int = 0,
        trial_ratios: Sequence[float] = DEFAULT_TRIAL_RATIOS,
        loss_weight: float = 1.0,
        importance_criteria: dict[str, float] | None = None,
        group_divisible: int = 1,
        hold_zeros: str = "auto",
        saliency_direction: str | None = None,
        saliency: str | None = None,
        start_step: int | None = None,
    ):
        start_pruning_step = _renamed("start_step", start_step, "start_pruning_step", start_pruning_step, default=0)
        ratios = check_cric_settings(
            start_pruning_step, sampling_steps, max_cycles, tolerance, trial_ratios, loss_weight
        )
        num_blocks = len(groups.blocks) if isinstance(groups, GroupSet) else 0
        probe_end = start_pruning_step + 1 + num_blocks * len(ratios)
        worst_start = probe_end + max_cycles * sampling_steps
        super().__init__(
            optimizer,
            groups,
            target_group_sparsity=target_group_sparsity,
            target_param_sparsity=target_param_sparsity,
            start_pruning_step=worst_start,
            pruning_periods=1,
            pruning_steps=pruning_steps,
            importance_criteria=importance_criteria,
            group_divisible=group_divisible,
            hold_zeros=hold_zeros,
            saliency_direction=saliency_direction,
            saliency_steps=1,
            saliency=saliency,
        )
        self.cric_start_step = start_pruning_step
        self.sampling_steps = sampling_steps
        self.max_cycles = max_cycles
        self.tolerance = tolerance
        self.trial_ratios = ratios
        self.loss_weight = float(loss_weight)
        self._probe_end = probe_end
        self._worst_start = worst_start
        num = len(groups)
        # Persistent CRIC state (all in `state_dict`).
        self._done = False
        self._ref_loss: float | None = None
        self._probe_losses = torch.full((num_blocks, len(ratios)), math.nan, dtype=torch.float64)
        self._score_sum = torch.zeros(num, dtype=torch.float64)
        self._score_count = torch.zeros(num, dtype=torch.float64)
        self._history = torch.zeros(num, dtype=torch.bool)
        self._candidates = torch.zeros(num, dtype=torch.bool)
        self._candidate_scores = torch.zeros(num, dtype=torch.float64)
        self._violating = torch.zeros(num, dtype=torch.bool)
        self._cycles = 0
        self._cycle_log: list[list[int]] = []  # per finished cycle: [violating, new violating, history size]
        self._final_scores: torch.Tensor | None = None
        self._cache: dict[str, torch.Tensor] | None = None
        # Loss observed since the last step (not persistent: it belongs to the step about to be taken).
        self._observed: float | None = None

    # ---- Loss ----

    @property
    def needs_loss(self) -> bool:
        """Whether the next `step()` reads the loss (`observe_loss` must be called before it)."""
        n = self.num_steps + 1
        return not self._done and self.cric_start_step < n <= self._probe_end

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Hand the loss of the current step to the optimizer; call it before `step()`.

        Under gradient accumulation call it once per micro-batch with the loss as scaled for `backward`
        (`loss / accumulation_steps`): the values observed between two steps are summed. In distributed training
        pass the same value on every rank (e.g. averaged across ranks), so that every rank decides the same.
        """
        value = float(loss.detach().float().sum()) if isinstance(loss, torch.Tensor) else float(loss)
        self._observed = value if self._observed is None else self._observed + value

    def _take_loss(self, n: int, required: bool) -> float | None:
        value, self._observed = self._observed, None
        if value is None and required:
            raise RuntimeError(
                f"CRIC needs the loss of optimizer step {n} (block probing reads it), but none was observed. Call "
                "`opt.observe_loss(loss)` before `opt.step()` (`HESSOTrainer` does it for you), or pass a closure "
                "that returns the loss to `step`."
            )
        return value

    # ---- Schedule ----

    @property
    def phase(self) -> str:
        """`"warmup"`, `"probing"`, `"cycles"` or `"done"` (the cycles have finished; HESSO's projection follows)."""
        n = self.num_steps
        if self._done:
            return "done"
        if n <= self.cric_start_step:
            return "warmup"
        return "probing" if n < self._probe_end else "cycles"

    @property
    def num_cycles(self) -> int:
        """Cycles finished so far."""
        return self._cycles

    @property
    def history(self) -> torch.Tensor:
        """Global indices of the violating groups found so far, ascending."""
        return self._history.nonzero().squeeze(1)

    @property
    def cycle_log(self) -> list[dict[str, int]]:
        """Per finished cycle: violating groups, new violating groups (not in the history before), history size."""
        return [dict(zip(("violating", "new", "history"), entry, strict=True)) for entry in self._cycle_log]

    @property
    def probe_loss_ratios(self) -> torch.Tensor:
        """`(num_blocks, len(trial_ratios))` loss / reference loss of every probe (NaN where not run yet)."""
        if self._ref_loss is None:
            return self._probe_losses.clone()
        return self._probe_losses / max(self._ref_loss, torch.finfo(torch.float64).tiny)

    @property
    def max_cycles_bound(self) -> int:
        """Theorem 3.3 / Corollary 3.4: the most cycles the search can take."""
        return min(self.max_cycles, len(self.groups) // (self.tolerance + 1) + 1)

    # ---- Step ----

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step of the schedule described in the class docstring; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if self._observed is None and loss is not None:
                self.observe_loss(loss)
        super().step()
        return loss

    def pruning_step(self, n: int) -> None:
        """Step `n`: warm-up, probing or a cycle step of CRIC, then HESSO's projection period once CRIC is done."""
        if self._done or n <= self.cric_start_step:
            self._observed = None
            super().pruning_step(n)
            return
        observed = self._take_loss(n, required=n <= self._probe_end)
        if n == self.cric_start_step + 1:
            self._start(observed)
        elif n <= self._probe_end:
            self._probe_read(n - self.cric_start_step - 2, observed)
        else:
            self._cycle_step(n)

    def _accumulate(self, scores: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> bool:
        """Add a step's scores to every group's mean (only where `mask`); a batch whose scores are NaN, infinite
        or all zero is left out with a warning (returns False)."""
        scores = scores.detach().cpu().double()
        problem = score_problem(scores)
        if problem is not None:
            warnings.warn(
                f"CRIC: the saliency scores of optimizer step {n} are {problem}; that batch is left out of the "
                "groups' mean scores. Check the loss and the gradients (NaN or infinite loss, fp16 overflow, a "
                "learning rate so high that the weights diverged).",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        if mask is None:
            self._score_sum += scores
            self._score_count += 1
        else:
            self._score_sum += torch.where(mask, scores, 0.0)
            self._score_count += mask.double()
        return True

    def _start(self, ref_loss: float) -> None:
        """Step S + 1: reference loss, base step and scores, cache, first probe."""
        if not math.isfinite(ref_loss) or ref_loss <= 0:
            raise RuntimeError(
                f"CRIC's reference loss (step {self.cric_start_step + 1}) is {ref_loss}; the loss ratios of the probes "
                "need a finite positive loss. Start CRIC later (`start_pruning_step`) or check the training loss."
            )
        self._ref_loss = float(ref_loss)
        self._accumulate(self.score_step(), self.cric_start_step + 1)
        # The cache holds the local shards, on the CPU: nothing extra stays on the accelerator.
        self._cache = {name: local(p.detach()).to("cpu", copy=True) for name, p in self.grouped_parameters.items()}
        self._apply_probe(0)

    def _num_probes(self) -> int:
        return len(self.groups.blocks) * len(self.trial_ratios)

    def _apply_probe(self, k: int) -> None:
        """Zero the lowest-scoring `trial_ratios[r]` of block `b`'s groups (probe `k = b * R + r`)."""
        if k >= self._num_probes():
            return
        b, r = divmod(k, len(self.trial_ratios))
        block = self.groups.blocks[b]
        scores = (self._score_sum / self._score_count.clamp_min(1))[block.offset : block.offset + block.n]
        count = min(max(1, int(self.trial_ratios[r] * block.n)), block.n - max(1, self.group_divisible))
        if count <= 0:
            return  # a block that may never lose a group: probing it would say nothing useful
        idx = torch.sort(scores, stable=True).indices[:count]
        mask = torch.zeros(len(self.groups), dtype=torch.bool)
        mask[block.offset + idx] = True
        self.zero_groups(mask)

    def _restore(self, names: Sequence[str] | None = None) -> None:
        params = self.grouped_parameters
        for name in names if names is not None else params:
            local(params[name].data).copy_(self._cache[name])

    def _probe_read(self, k: int, loss: float) -> None:
        """Probe `k` was applied at the end of the last step: record its loss, restore, apply the next probe."""
        b, r = divmod(k, len(self.trial_ratios))
        self._probe_losses[b, r] = loss
        self._restore(self.groups.blocks[b].params)
        self._apply_probe(k + 1)
        if k + 1 == self._num_probes():
            ratios = self.probe_loss_ratios
            worst = int(torch.nan_to_num(ratios.mean(1), nan=-1.0).argmax())
            block = self.groups.blocks[worst]
            self._info(
                f"CRIC probing done ({self._num_probes()} probes): loss ratio max {float(ratios.max()):.4g}, mean "
                f"{float(ratios.mean()):.4g}; most sensitive block: layer {block.layer} {block.kind} "
                f"({[round(float(v), 4) for v in ratios[worst]]} at ratios {list(self.trial_ratios)})."
            )

    def _bottom(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool per group: the global bottom-K of `scores` under the target (every block keeps its minimum)."""
        return self.budget_mask(scores)

    def estimate(self) -> torch.Tensor:
        """Current score estimate per group: mean over the collected steps plus the block-sensitivity penalty."""
        mean = self._score_sum / self._score_count.clamp_min(1)
        if self.loss_weight == 0 or self._ref_loss is None:
            return mean
        ratios = torch.nan_to_num(self.probe_loss_ratios, nan=1.0, posinf=math.inf)
        sensitivity = (ratios.mean(1) - 1).clamp_min(0)
        scale = float(mean.abs().mean()) or 1.0
        per_block = torch.where(sensitivity > 0, self.loss_weight * scale * sensitivity, 0.0)
        return mean + per_block[self.groups.block_ids]

    def _cycle_step(self, n: int) -> None:
        i = n - self._probe_end - 1
        t = i % self.sampling_steps
        m = self.sampling_steps
        if t == 0:
            self._candidates = self._bottom(self.estimate())
            scores = self.score_step()
            usable = self._accumulate(scores, n)
            # Unusable scores (a bad batch): the candidates keep their current estimate as their reference.
            self._candidate_scores = scores if usable else self.estimate()
            self._violating = torch.zeros_like(self._history)
        else:
            scores = self.score_step()
            outside = ~self._candidates
            if self._accumulate(scores, n, outside):
                ranked = torch.where(self._candidates, self._candidate_scores, scores)
                self._violating |= self._bottom(ranked) & outside
            self.fade(self._candidates, (m - t - 1) / (m - t))
        if t == m - 1:
            self._end_cycle(n)

    def _end_cycle(self, n: int) -> None:
        new = self._violating & ~self._history
        self._history |= self._violating
        self._restore()
        self._cycles += 1
        entry = [int(self._violating.sum()), int(new.sum()), int(self._history.sum())]
        self._cycle_log.append(entry)
        stop = entry[1] <= self.tolerance or self._cycles >= self.max_cycles
        why = "no new violating group beyond the tolerance" if entry[1] <= self.tolerance else "max cycles reached"
        self._info(
            f"CRIC cycle {self._cycles}/{self.max_cycles} (step {n}): {entry[0]} violating groups, {entry[1]} new, "
            f"history {entry[2]}" + (f"; search ends ({why})." if stop else "; next cycle.")
        )
        if stop:
            self._finish(n)

    def _finish(self, n: int) -> None:
        self._final_scores = self.estimate()
        self._done = True
        self._cache = None
        self._candidates = torch.zeros_like(self._history)
        # HESSO's single period starts at the next step.
        self.begin_projection(n)

    def settings(self) -> dict[str, Any]:
        """HESSO's settings with CRIC's own, as the model card records them: `start_pruning_step` is the step CRIC
        starts at (this constructor's argument), and `cric=True` with the `cric_*` settings, named as in
        `HESSOConfig`."""
        return {
            **super().settings(),
            "start_pruning_step": self.cric_start_step,
            "cric": True,
            "cric_sampling_steps": self.sampling_steps,
            "cric_max_cycles": self.max_cycles,
            "cric_tolerance": self.tolerance,
            "cric_trial_ratios": list(self.trial_ratios),
            "cric_loss_weight": self.loss_weight,
        }

    def selection_scores(self, period: int, n: int) -> torch.Tensor:
        """The projection period's first step: base step, then CRIC's final scores (HESSO selects their bottom-K)."""
        self.base_step()
        return self._final_scores.clone()

    def _info(self, message: str) -> None:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            logger.info(message)
        elif torch.distributed.get_rank() == 0:
            logger.info(message)

    # ---- Checkpointing ----

    def state_dict(self) -> dict[str, Any]:
        """HESSO's state dict plus a `"cric"` entry (tensors and plain values only: loadable with `weights_only`)."""
        out = super().state_dict()
        out[_STATE_KEY] = {
            "done": self._done,
            "start_pruning_step": self.start_pruning_step,
            "settings": [self.cric_start_step, self.sampling_steps, self.max_cycles, self.tolerance],
            "trial_ratios": list(self.trial_ratios),
            "ref_loss": self._ref_loss,
            "probe_losses": self._probe_losses.clone(),
            "score_sum": self._score_sum.clone(),
            "score_count": self._score_count.clone(),
            "history": self._history.clone(),
            "candidates": self._candidates.clone(),
            "candidate_scores": self._candidate_scores.clone(),
            "violating": self._violating.clone(),
            "cycles": self._cycles,
            "cycle_log": [list(e) for e in self._cycle_log],
            "final_scores": None if self._final_scores is None else self._final_scores.clone(),
            "cache": None if self._cache is None else dict(self._cache),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _STATE_KEY not in state_dict:
            raise ValueError(
                "`state_dict` has no 'cric' entry: it was saved from `HESSO`, not `CRIC`. Resume with the optimizer "
                "the run was saved with (`cric=False` in `HESSOConfig`)."
            )
        state_dict = dict(state_dict)
        ours = state_dict.pop(_STATE_KEY)
        settings = [self.cric_start_step, self.sampling_steps, self.max_cycles, self.tolerance]
        if [int(v) for v in ours["settings"]] != settings or [float(r) for r in ours["trial_ratios"]] != list(
            self.trial_ratios
        ):
            raise ValueError(
                "`state_dict` was saved with CRIC settings (start_pruning_step, sampling_steps, max_cycles, "
                f"tolerance) = {list(ours['settings'])} and trial_ratios {list(ours['trial_ratios'])}, but this optimizer has "
                f"{settings} and {list(self.trial_ratios)}. Rebuild it with the settings of the run you resume."
            )
        # Every field is checked (shape, type, range) before anything is changed.
        num = len(self.groups)
        probes = (len(self.groups.blocks), len(self.trial_ratios))

        def vector(field: str, dtype: torch.dtype, shape: tuple[int, ...] = (num,)) -> torch.Tensor:
            return restored_tensor(ours, field, shape, dtype, entry="CRIC")

        probe_losses = vector("probe_losses", torch.float64, probes)
        score_sum, score_count = vector("score_sum", torch.float64), vector("score_count", torch.float64)
        history, candidates = vector("history", torch.bool), vector("candidates", torch.bool)
        candidate_scores, violating = vector("candidate_scores", torch.float64), vector("violating", torch.bool)
        cycles = restored_int(ours, "cycles", entry="CRIC")
        if not 0 <= cycles <= self.max_cycles:
            raise state_error("cycles", f"is {cycles}, outside 0 ... `max_cycles`={self.max_cycles}", "CRIC")
        final = None if ours.get("final_scores") is None else vector("final_scores", torch.float64)
        done = bool(ours["done"])
        if done and final is None:
            raise state_error("final_scores", "is missing although the search is done", "CRIC")
        start = restored_int(ours, "start_pruning_step", entry="CRIC")
        if start < self._probe_end or start > self._worst_start:
            raise state_error(
                "start_pruning_step",
                f"is {start}, but the projection starts between the end of probing ({self._probe_end}) and the "
                f"worst case ({self._worst_start})",
                "CRIC",
            )
        cache = ours.get("cache")
        params = self.grouped_parameters
        if cache is not None:
            for name, p in params.items():
                if name not in cache or tuple(torch.as_tensor(cache[name]).shape) != tuple(local(p).shape):
                    raise state_error("cache", f"has no tensor shaped like {name!r} {tuple(local(p).shape)}", "CRIC")

        # The projection period's start is only known once the cycles end: restore it before HESSO checks it.
        self.begin_projection(start)
        super().load_state_dict(state_dict)
        self._done = done
        self._ref_loss = None if ours["ref_loss"] is None else float(ours["ref_loss"])
        self._probe_losses, self._score_sum, self._score_count = probe_losses, score_sum, score_count
        self._history, self._candidates, self._violating = history, candidates, violating
        self._candidate_scores = candidate_scores
        self._cycles = cycles
        self._cycle_log = [[int(v) for v in e] for e in ours["cycle_log"]]
        self._final_scores = final
        if cache is None:
            self._cache = None
        else:
            # Same dtype and shape as the live (local) parameter; stays on the CPU.
            self._cache = {
                name: torch.as_tensor(cache[name]).detach().to("cpu", local(p).dtype).clone()
                for name, p in params.items()
            }
        self._observed = None

    # ---- Metrics ----

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """HESSO's `hesso/*` metrics plus `cric/*`: phase, cycles, violating groups, probe loss ratios."""
        out = super().metrics()
        phases = ("warmup", "probing", "cycles", "done")
        out["cric/phase"] = float(phases.index(self.phase))
        out["cric/cycles"] = float(self._cycles)
        out["cric/history_groups"] = float(self._history.sum())
        if self._cycle_log:
            violating, new, _ = self._cycle_log[-1]
            out["cric/violating_groups"] = float(violating)
            out["cric/new_violating_groups"] = float(new)
        ratios = self.probe_loss_ratios
        if self._ref_loss is not None and bool((~ratios.isnan()).any()):
            seen = ratios[~ratios.isnan()]
            out["cric/probe_loss_ratio_max"] = float(seen.max())
            out["cric/probe_loss_ratio_mean"] = float(seen.mean())
            for block, row in zip(self.groups.blocks, ratios, strict=True):
                if not bool(row.isnan().all()):
                    out[f"cric/probe_loss_ratio/layer_{block.layer}/{block.kind}"] = float(row.nanmean())
        return out

    def __repr__(self) -> str:
        return super().__repr__().replace("HESSO(", "CRIC(", 1)[:-1] + (
            f", start_step={self.cric_start_step}, sampling_steps={self.sampling_steps}, "
            f"max_cycles={self.max_cycles}, tolerance={self.tolerance}, phase={self.phase!r})"
        )
