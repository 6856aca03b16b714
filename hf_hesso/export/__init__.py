"""Writing slim models: `save_slim` (slim copy off the training device, shipped code, model card, atomic write,
optional push), usable from a hand-written loop as from `HESSOTrainer`."""

from .atomic import atomic_directory
from .card import MODEL_CARD_NAME, PruningReport, render_model_card
from .save import SavedSlim, save_slim

__all__ = ["MODEL_CARD_NAME", "PruningReport", "SavedSlim", "atomic_directory", "render_model_card", "save_slim"]
