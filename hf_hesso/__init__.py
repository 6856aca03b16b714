"""hf_hesso: train and structurally prune Hugging Face transformers in one run (HESSO / CRIC).

Layers, each importing only those below it: `modeling` <- `groups` <- `optim`, `slim` <- `export`, `distill`,
`callbacks`, `resume` <- `config` <- `trainer`.

One route per task: `HESSOTrainer.save_model()` / `save_slim` write a slim model, `slim_model` slims one in memory,
`to_stock` turns it into the stock class (`docs/saving.md`).
"""

from .config import HESSOConfig
from .export import GgufExport, SavedSlim, export_gguf, save_slim
from .groups import Group, GroupSet, build_groups
from .modeling import register_auto_classes
from .optim import CRIC, HESSO
from .slim import SlimSummary, slim_copy, slim_model, to_stock
from .slim.selfcheck import ArchitectureReport, check_architecture
from .trainer import HESSOTrainer

# Lets plain `AutoModel*.from_pretrained(dir)` load slim checkpoints (no `trust_remote_code` needed).
register_auto_classes()

__version__ = "0.2.0"

__all__ = [
    "ArchitectureReport",
    "CRIC",
    "HESSO",
    "GgufExport",
    "Group",
    "GroupSet",
    "HESSOConfig",
    "HESSOTrainer",
    "SavedSlim",
    "SlimSummary",
    "__version__",
    "build_groups",
    "check_architecture",
    "export_gguf",
    "save_slim",
    "slim_copy",
    "slim_model",
    "to_stock",
]
