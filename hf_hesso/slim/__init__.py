"""Physical slicing of zeroed groups: `slim_model`, `slim_copy`, `to_stock`, the LoRA exports and the FSDP2 gather.

The routes: `slim_model` (a slim model in memory, in place) and `to_stock` (then the stock class and config);
`slim_copy` is the lower level that `hf_hesso.save_slim` writes from.

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
