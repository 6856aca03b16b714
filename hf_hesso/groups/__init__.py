from .group import (
    EXPERT_CHANNEL,
    HEAD,
    KINDS,
    KV_GROUP,
    MLP_CHANNEL,
    QUERY_SLOT,
    SHARED_EXPERT_CHANNEL,
    Block,
    Group,
    GroupSet,
    Slice,
)
from .rules import build_groups

__all__ = [
    "EXPERT_CHANNEL",
    "SHARED_EXPERT_CHANNEL",
    "HEAD",
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
