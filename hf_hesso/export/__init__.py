"""Writing slim models: `save_slim` (slim copy off the training device, shipped code, model card, atomic write of only
the files it owns, optional push), usable from a hand-written loop as from `HESSOTrainer`; `export_gguf` writes a
llama.cpp / Ollama file (needs the optional `gguf` package, imported inside `try` so that this package imports
without it)."""

from ..modeling.journal import MANIFEST_NAME, recover
from .atomic import ConcurrentSaveError, atomic_save, owned_by_last_save, owned_files
from .card import MODEL_CARD_NAME, PruningReport, render_model_card
from .gguf import GgufExport, export_gguf
from .save import SavedSlim, save_slim

__all__ = [
    "ConcurrentSaveError",
    "MANIFEST_NAME",
    "MODEL_CARD_NAME",
    "GgufExport",
    "PruningReport",
    "SavedSlim",
    "atomic_save",
    "export_gguf",
    "owned_by_last_save",
    "owned_files",
    "recover",
    "render_model_card",
    "save_slim",
]
