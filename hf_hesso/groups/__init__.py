from ..modeling.architectures import (
    ATTENTION_SUBLAYER,
    EXPERT_CHANNEL,
    HEAD,
    HIDDEN_CHANNEL,
    HIDDEN_LAYER,
    KINDS,
    KV_GROUP,
    MLP_CHANNEL,
    MLP_SUBLAYER,
    QUERY_SLOT,
    SHARED_EXPERT_CHANNEL,
    SUBLAYER_KINDS,
)
from .group import (
    Block,
    Group,
    GroupSet,
    Slice,
)
from .rules import build_groups

__all__ = [
    "ATTENTION_SUBLAYER",
    "MLP_SUBLAYER",
    "SUBLAYER_KINDS",
    "EXPERT_CHANNEL",
    "SHARED_EXPERT_CHANNEL",
    "HEAD",
    "HIDDEN_CHANNEL",
    "HIDDEN_LAYER",
    "KINDS",
    "KV_GROUP",
    "MLP_CHANNEL",
    "QUERY_SLOT",
    "Block",
    "Group",
    "GroupSet",
    "Slice",
    "build_groups",
]
