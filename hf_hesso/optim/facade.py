"""`WrappedOptimizer`: a `torch.optim.Optimizer` that delegates its parameters and state to a base optimizer.

HESSO must be an `Optimizer` (LR schedulers, Accelerate and the Trainer check `isinstance`), but its parameter
groups and state belong to the base optimizer it wraps: Accelerate and LR schedulers edit `param_groups` in place
and replace them on `load_state_dict`, so nothing may be cached.

Torch's `Optimizer.__init__` sets up the hook dictionaries, the profiling wrapper of `step` and whatever else a
torch release adds, then fills `state`, `param_groups` and `defaults`. Rather than copying that private setup
(attribute names that change between releases), `WrappedOptimizer.__init__` runs torch's own constructor on a
one-element placeholder parameter *before* the base optimizer is attached: until then the delegating properties
store what the constructor writes on the instance, and those placeholders are dropped as soon as the base
optimizer is attached. From then on `param_groups`, `state`, `defaults`, `add_param_group` and `zero_grad` are the
base optimizer's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

_PLACEHOLDERS = ("_placeholder_param_groups", "_placeholder_state", "_placeholder_defaults")


def check_base_optimizer(optimizer) -> Optimizer:
    """`optimizer` if it is a `torch.optim.Optimizer` instance, else `TypeError`."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"`optimizer` must be a `torch.optim.Optimizer` instance, got {type(optimizer).__name__}. Build the "
            "base optimizer first, e.g. `HESSO(torch.optim.AdamW(model.parameters(), lr=1e-4), groups, ...)`."
        )
    return optimizer


class WrappedOptimizer(Optimizer):
    """An `Optimizer` whose `param_groups`, `state` and `defaults` are those of `optimizer`.

    Args:
        optimizer (`torch.optim.Optimizer`): the base optimizer; `TypeError` for anything else.
    """

    def __init__(self, optimizer: Optimizer):
        check_base_optimizer(optimizer)
        # Torch's own setup (hooks, profiling), writing its parameter bookkeeping into the placeholders.
        Optimizer.__init__(self, [torch.empty(1, requires_grad=True)], {})
        for name in _PLACEHOLDERS:
            self.__dict__.pop(name, None)
        self.optimizer = optimizer

    def _base(self) -> Optimizer | None:
        return self.__dict__.get("optimizer")

    # ---- Delegation (never cache the base's param_groups: Accelerate and schedulers edit them) ----

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        base = self._base()
        return base.param_groups if base is not None else self.__dict__["_placeholder_param_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        base = self._base()
        if base is None:
            self.__dict__["_placeholder_param_groups"] = value
        else:
            base.param_groups = value

    @property
    def state(self):
        base = self._base()
        return base.state if base is not None else self.__dict__["_placeholder_state"]

    @state.setter
    def state(self, value) -> None:
        base = self._base()
        if base is None:
            self.__dict__["_placeholder_state"] = value
        else:
            base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        base = self._base()
        return base.defaults if base is not None else self.__dict__["_placeholder_defaults"]

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        base = self._base()
        if base is None:
            self.__dict__["_placeholder_defaults"] = value
        else:
            base.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = self._base()
        if base is None:
            Optimizer.add_param_group(self, param_group)
        else:
            base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def has_gradients(self) -> bool:
        """Whether any parameter of the base optimizer has a gradient (a step without one is not counted)."""
        return any(p.grad is not None for group in self.optimizer.param_groups for p in group["params"])
