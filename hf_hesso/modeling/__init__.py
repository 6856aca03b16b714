"""Layout table and the self-contained slim model classes that travel with saved models.

Public: `register_auto_classes`; the rest is read from its module (`architectures`, `configuration_hesso`,
`modeling_hesso`, `journal`)."""

from __future__ import annotations

import transformers

from .compat import auto_class_of as _auto_class_of
from .configuration_hesso import HESSO_CONFIGS
from .modeling_hesso import HESSO_MODELS

_registered = False


def register_auto_classes() -> None:
    """Register every slim config and model class with the `transformers` Auto* factories (idempotent).

    After this, `AutoConfig`/`AutoModel*.from_pretrained(dir)` load a slim checkpoint without
    `trust_remote_code=True`, using the classes of this installed package.
    """
    global _registered
    if _registered:
        return
    for config_class in HESSO_CONFIGS.values():
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for cls in HESSO_MODELS.values():
        # `register_for_auto_class` stored the Auto* class name each slim class belongs to.
        getattr(transformers, _auto_class_of(cls)).register(cls.config_class, cls, exist_ok=True)
    _registered = True


__all__ = ["register_auto_classes"]
