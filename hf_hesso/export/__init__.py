"""Writing slim models: `save_slim` (slim copy off the training device, shipped code, model card, atomic write of only
the files it owns, optional push), usable from a hand-written loop as from `HESSOTrainer`; `export_gguf` writes a
llama.cpp / Ollama file (needs the optional `gguf` package, imported inside `try` so that this package imports
without it).

The plumbing stays in its modules: the atomic write in `atomic.py`, the model card in `card.py`, the journal and
`recover` in `hf_hesso.modeling.journal`."""

from .atomic import ConcurrentSaveError
from .gguf import GgufExport, export_gguf
from .save import SavedSlim, save_slim

__all__ = ["ConcurrentSaveError", "GgufExport", "SavedSlim", "export_gguf", "save_slim"]
