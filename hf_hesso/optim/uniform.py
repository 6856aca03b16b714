"""Selection with every layer kept the same shape (`layer_shapes="uniform"`), so that a stock config can hold it.

The unit of selection is tied across layers:
- for a width kind (heads, key/value groups, query slots, MLP / expert channels), unit `j` is the `j`-th least
  salient remaining group of that kind in *every* layer: taking it removes one group of the kind from each layer, so
  the counts stay equal while each layer still drops its own least salient groups;
- whole layers: the `attention_sublayer` and `mlp_sublayer` groups of one layer together (a stock config can drop a
  layer, not half of one), never every layer;
- `hidden_channel`: its one model-wide block is uniform by nature, so unit `j` is its `j`-th least salient group.
Units are ranked globally by score / cost (cost = the units' summed group costs) and taken while they fit the
budget, as `select_redundant` does with single groups. `group_divisible` chunks the units of a kind alike.
"""

from __future__ import annotations

import torch

from ..groups import ATTENTION_SUBLAYER, HIDDEN_LAYER, MLP_SUBLAYER, SUBLAYER_KINDS, GroupSet

__all__ = ["LAYER_SHAPES", "check_uniform_groups", "select_uniform"]

LAYER_SHAPES = ("free", "uniform")


def check_uniform_groups(groups: GroupSet) -> None:
    """Raise a ValueError when `groups` cannot give a uniform result (blocks of a kind differ across layers, or only
    one of the two sublayer kinds is offered)."""
    sizes: dict[str, dict[int, int]] = {}
    for b in groups.blocks:
        if b.layer != HIDDEN_LAYER:  # model-wide blocks (hidden channels) are the same for every layer
            sizes.setdefault(b.kind, {})[b.layer] = b.n
    layers = {b.layer for b in groups.blocks if b.layer != HIDDEN_LAYER}
    for kind, per_layer in sizes.items():
        if kind in SUBLAYER_KINDS:
            continue
        if len(set(per_layer.values())) != 1 or set(per_layer) != layers:
            raise ValueError(
                f"`layer_shapes='uniform'` needs every layer to start with the same number of `{kind}` groups, but "
                f"the layers have {dict(sorted(per_layer.items()))}. Start from a model whose layers are uniform (a "
                "stock checkpoint), or use `layer_shapes='free'`."
            )
    present = [k for k in SUBLAYER_KINDS if k in sizes]
    if len(present) == 1:
        raise ValueError(
            f"`layer_shapes='uniform'` removes whole layers only (a stock config cannot drop the attention or the MLP "
            f"of one layer), so it needs both `{ATTENTION_SUBLAYER}` and `{MLP_SUBLAYER}` groups, or neither; the "
            f"groups have only `{present[0]}`. Add the other kind to `prune_kinds` or remove this one."
        )
    if present and set(sizes[ATTENTION_SUBLAYER]) != set(sizes[MLP_SUBLAYER]):
        raise ValueError(
            "`layer_shapes='uniform'` removes whole layers, so every layer needs both an attention and an MLP "
            "sublayer group; build the groups for all layers."
        )


def select_uniform(
    scores: torch.Tensor,
    selected: torch.Tensor,
    groups: GroupSet,
    cost: torch.Tensor,
    budget: float,
    removed,
    group_divisible: int = 1,
    max_rounds: int = 64,
) -> torch.Tensor:
    """Like `select_redundant`, with units tied across layers (see the module docstring).

    Returns:
        `torch.Tensor`: bool per group, the newly selected groups.
    """
    key_of = scores.double() / cost.double()
    units: list[torch.Tensor] = []  # member indices of each unit
    unit_chunk: list[tuple[str, int]] = []  # (kind, chunk number): units of one chunk go together
    by_kind: dict[str, list] = {}
    for b in groups.blocks:
        by_kind.setdefault(b.kind, []).append(b)

    for kind, blocks in by_kind.items():
        if kind in SUBLAYER_KINDS:
            continue
        remaining = [b.offset + (~selected[b.offset : b.offset + b.n]).nonzero().squeeze(1) for b in blocks]
        left = {r.numel() for r in remaining}
        if len(left) != 1:
            raise ValueError(
                f"The selected `{kind}` groups differ in number across layers ({sorted(left)} remain): the selection "
                "was not made with `layer_shapes='uniform'`. Resume with the setting the run started with."
            )
        n_left = left.pop()
        # Each layer's remaining groups, least salient first; unit j = column j.
        ordered = torch.stack([r[torch.sort(key_of[r], stable=True).indices] for r in remaining])
        first = n_left % group_divisible
        for j in range(max(n_left - group_divisible, 0)):
            units.append(ordered[:, j])
            chunk = 0 if (first and j < first) else (j - first) // group_divisible + (1 if first else 0)
            unit_chunk.append((kind, chunk))

    if ATTENTION_SUBLAYER in by_kind:
        per_layer: dict[int, list[int]] = {}
        for kind in SUBLAYER_KINDS:
            for b in by_kind.get(kind, []):
                per_layer.setdefault(b.layer, []).append(b.offset)
        open_layers = [torch.tensor(m) for m in per_layer.values() if not bool(selected[torch.tensor(m)].any())]
        # Never every layer: the most salient layer left always stays.
        open_layers.sort(key=lambda m: float(scores[m].double().sum() / cost[m].double().sum()))
        for i, members in enumerate(open_layers[:-1]):
            units.append(members)
            unit_chunk.append((f"layer{i}", 0))

    new = torch.zeros_like(selected)
    if not units:
        return new
    # Chunks: the units of one (kind, chunk) go together; a chunk's key is its largest unit key.
    chunk_ids = {c: i for i, c in enumerate(dict.fromkeys(unit_chunk))}
    members: list[list[torch.Tensor]] = [[] for _ in chunk_ids]
    for unit, c in zip(units, unit_chunk, strict=True):
        members[chunk_ids[c]].append(unit)
    chunk_members = [torch.cat(m) for m in members]
    chunk_key = torch.tensor(
        [max(float(scores[u].double().sum() / cost[u].double().sum()) for u in m) for m in members],
        dtype=torch.float64,
    )
    chunk_cost = torch.tensor([float(cost[m].double().sum()) for m in chunk_members], dtype=torch.float64)
    ranking = torch.sort(chunk_key, stable=True).indices.tolist()
    names = list(chunk_ids)  # chunk index -> (kind, number)
    next_number: dict[str, int] = {}  # per kind, the chunk that may go next (front to back)
    taken = [False] * len(chunk_members)
    for _ in range(max_rounds):
        room = budget - removed(selected | new)
        progress = False
        spent = 0.0
        for c in ranking:
            kind, number = names[c]
            if taken[c] or number != next_number.get(kind, 0) or chunk_cost[c] > room - spent + 1e-9:
                continue
            taken[c] = True
            next_number[kind] = number + 1
            new[chunk_members[c]] = True
            spent += float(chunk_cost[c])
            progress = True
        if not progress:
            break
    return new
