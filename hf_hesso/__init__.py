"""hf_hesso: train and structurally prune Hugging Face transformers in one run (HESSO / CRIC)."""

from .groups import Group, GroupSet, build_groups

__version__ = "0.1.0"

__all__ = ["Group", "GroupSet", "build_groups", "__version__"]
