from .group import HEAD, KINDS, KV_GROUP, MLP_CHANNEL, QUERY_SLOT, Block, Group, GroupSet, Slice
from .rules import build_groups

__all__ = [
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
