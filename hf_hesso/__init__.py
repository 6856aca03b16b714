"""hf_hesso: train and structurally prune Hugging Face transformers in one run (HESSO / CRIC)."""

from .config import HESSOConfig
from .groups import Group, GroupSet, build_groups
from .modeling import register_auto_classes
from .optim import CRIC, HESSO
from .slim import SlimSummary, slim_model, to_stock
from .trainer import HESSOTrainer

# Lets plain `AutoModel*.from_pretrained(dir)` load slim checkpoints (no `trust_remote_code` needed).
register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "CRIC",
    "HESSO",
    "Group",
    "GroupSet",
    "HESSOConfig",
    "HESSOTrainer",
    "SlimSummary",
    "__version__",
    "build_groups",
    "slim_model",
    "to_stock",
]
