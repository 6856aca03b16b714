"""Physical slicing of zeroed groups: `slim_model`, `slim_copy`, `to_stock`, the LoRA exports and the FSDP2 gather.

The plumbing stays in its modules (`core.keep_plan`, `core.check_materialized`, `core.uniform_stock_problem`,
`lora.merged_groups`, `lora.ADAPTER_SUBDIR`)."""

from .core import SlimSummary, current_layer_shapes, slim_copy, slim_model, to_stock
from .gather import gather_full_model
from .lora import SlimAdapters, merge_and_slim, slim_with_adapters

__all__ = [
    "SlimAdapters",
    "SlimSummary",
    "current_layer_shapes",
    "gather_full_model",
    "merge_and_slim",
    "slim_copy",
    "slim_model",
    "slim_with_adapters",
    "to_stock",
]
