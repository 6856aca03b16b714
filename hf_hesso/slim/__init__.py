"""Physical slicing of zeroed groups: `slim_model`, `to_stock`, the LoRA exports and the FSDP2 gather."""

from .core import (
    SlimSummary,
    check_materialized,
    current_layer_shapes,
    keep_plan,
    slim_copy,
    slim_model,
    to_stock,
    uniform_stock_problem,
)
from .gather import gather_full_model
from .lora import ADAPTER_SUBDIR, SlimAdapters, merge_and_slim, merged_groups, slim_with_adapters

__all__ = [
    "ADAPTER_SUBDIR",
    "SlimAdapters",
    "SlimSummary",
    "check_materialized",
    "current_layer_shapes",
    "gather_full_model",
    "keep_plan",
    "merge_and_slim",
    "merged_groups",
    "slim_copy",
    "slim_model",
    "slim_with_adapters",
    "to_stock",
    "uniform_stock_problem",
]
