"""Global selection of redundant groups under a budget (groups or parameters), never emptying a block.

Everything is vectorised over groups: a Llama-3-8B has ~460k of them, so no Python loop per group.
"""

from __future__ import annotations

import torch

from ..groups import (
    ATTENTION_SUBLAYER,
    EXPERT_CHANNEL,
    HEAD,
    HIDDEN_CHANNEL,
    KV_GROUP,
    MLP_CHANNEL,
    MLP_SUBLAYER,
    QUERY_SLOT,
    SHARED_EXPERT_CHANNEL,
    SUBLAYER_KINDS,
    GroupSet,
)

# The width kinds that lie inside each sublayer kind (a selected sublayer group covers them).
_COVERS = {
    ATTENTION_SUBLAYER: (HEAD, KV_GROUP, QUERY_SLOT),
    MLP_SUBLAYER: (MLP_CHANNEL, EXPERT_CHANNEL, SHARED_EXPERT_CHANNEL),
}


def covering_sublayer(groups: GroupSet) -> torch.Tensor:
    """Per group, the global index of the sublayer group (same layer) that contains it, or -1."""
    cover = torch.full((groups.num_groups,), -1, dtype=torch.long)
    sublayer = {(b.layer, b.kind): b.offset for b in groups.blocks if b.kind in SUBLAYER_KINDS}
    for b in groups.blocks:
        for kind, inner in _COVERS.items():
            if b.kind in inner and (b.layer, kind) in sublayer:
                cover[b.offset : b.offset + b.n] = sublayer[(b.layer, kind)]
    return cover


class ParamCounter:
    """Counts the parameters that a set of groups removes, each element once.

    A key/value group and a query slot of the same layer share the query rows and output columns of one head, so
    removing `a` key/value groups and `b` query slots of a layer removes `a * b` shared head slices less than the
    sum of their sizes. That correction is applied here. A whole-sublayer group (`attention_sublayer`,
    `mlp_sublayer`) contains every width group of its sublayer: when it is in the mask, those count nothing more.

    A `hidden_channel` group cuts the other dimension of nearly every tensor that the other kinds cut (a head's
    `o_proj` columns and a channel's `o_proj` row share one element per head row): with hidden groups, the count is
    taken per tensor instead, exactly, as `numel - prod(kept indices along each cut dimension)` (see
    `_TensorCount`).
    """

    def __init__(self, groups: GroupSet):
        self.tensors = _TensorCount(groups) if any(b.kind == HIDDEN_CHANNEL for b in groups.blocks) else None
        self.numel = groups.numel.double()
        self.cover = covering_sublayer(groups)
        kv = {b.layer: b for b in groups.blocks if b.kind == KV_GROUP}
        attention = {b.layer: b.offset for b in groups.blocks if b.kind == ATTENTION_SUBLAYER}
        # (kv offset, kv n, slot offset, slot n, elements shared by one kv group and one slot, attention group or -1)
        self.pairs = [
            (kv[b.layer].offset, kv[b.layer].n, b.offset, b.n, b.group_numel // kv[b.layer].n,
             attention.get(b.layer, -1))
            for b in groups.blocks
            if b.kind == QUERY_SLOT and b.layer in kv
        ]  # fmt: skip
        self.total = self.count(torch.ones(groups.num_groups, dtype=torch.bool))

    def count(self, mask: torch.Tensor) -> float:
        """Number of distinct parameters held by the groups where `mask` is True."""
        if self.tensors is not None:
            return self.tensors.count(mask)
        covered = (self.cover >= 0) & mask[self.cover.clamp_min(0)]
        total = float((self.numel * (mask & ~covered)).sum())
        for kv_off, kv_n, qs_off, qs_n, shared, attention in self.pairs:
            if attention >= 0 and bool(mask[attention]):
                continue
            a = int(mask[kv_off : kv_off + kv_n].sum())
            b = int(mask[qs_off : qs_off + qs_n].sum())
            total -= a * b * shared
        return total


class _TensorCount:
    """Exact count of the distinct elements that a set of groups covers, tensor by tensor.

    An element of a tensor is removed when any of its indices is cut by a selected group, so a tensor keeps
    `prod over its cut dimensions of (indices no selected group covers)` times the size of the dimensions no group
    cuts. One pass over the indices of every cut dimension per count (not over the elements). LoRA tensors are not
    counted (group sizes count base parameters only).
    """

    def __init__(self, groups: GroupSet):
        # (param, dim) -> [(block offset, slice)]
        self.cuts: dict[str, dict[int, list]] = {}
        for b in groups.blocks:
            for s in b.slices:
                if ".lora_" in s.param:
                    continue
                self.cuts.setdefault(s.param, {}).setdefault(s.dim, []).append((b.offset, s))
        self.shapes = {name: groups.param_shapes[name] for name in self.cuts}

    def count(self, mask: torch.Tensor) -> float:
        total = 0
        for name, dims in self.cuts.items():
            shape = self.shapes[name]
            numel = 1
            for size in shape:
                numel *= size
            kept = numel
            for dim, entries in dims.items():
                gone = torch.zeros(shape[dim], dtype=torch.bool)
                for offset, s in entries:
                    part = mask[offset : offset + s.n]
                    if bool(part.any()):
                        gone |= part.view(1, -1, 1).expand(s.outer, s.n, s.inner).reshape(-1)
                kept = kept // shape[dim] * (shape[dim] - int(gone.sum()))
            total += numel - kept
        return float(total)


def _block_rules(groups: GroupSet, group_divisible: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, `(chunk size, groups it always keeps)`: `group_divisible` for width kinds; a whole-sublayer block
    (one group) may go whole, in chunks of one."""
    sub = torch.tensor([b.kind in SUBLAYER_KINDS for b in groups.blocks], dtype=torch.bool)
    div = torch.where(sub, 1, group_divisible).to(torch.long)
    keep = torch.where(sub, 0, group_divisible).to(torch.long)
    return div, keep


def block_capacity(groups: GroupSet, group_divisible: int) -> torch.Tensor:
    """Per block, the most groups that may ever be removed: every width block keeps `group_divisible` (at least
    one); of the one-group blocks of a whole-sublayer kind, all but one may go (a model always keeps at least one
    attention and one MLP)."""
    sizes = torch.tensor([b.n for b in groups.blocks], dtype=torch.long)
    div, keep = _block_rules(groups, group_divisible)
    capacity = (sizes - keep).clamp_min(0)
    for kind in SUBLAYER_KINDS:
        first = next((i for i, b in enumerate(groups.blocks) if b.kind == kind), None)
        if first is not None:
            capacity[first] = 0
    return capacity


def select_redundant(
    scores: torch.Tensor,
    selected: torch.Tensor,
    groups: GroupSet,
    cost: torch.Tensor,
    budget: float,
    removed,
    group_divisible: int = 1,
    max_rounds: int = 64,
) -> torch.Tensor:
    """Pick the globally least salient groups not yet selected until `removed(selection)` reaches `budget`.

    Groups are ranked by `score / cost` (cost 1 for a group count, the group's size for a parameter budget). Within
    a block the groups go in chunks, so that the number kept stays a multiple of `group_divisible`: first
    `kept % group_divisible` groups, then `group_divisible` at a time, and every block keeps at least
    `group_divisible` groups (at least one). A chunk's key is its largest per-cost score, which keeps the chunks of a
    block in order in the global ranking. The ranked chunks are taken while they fit the budget; rounds repeat over
    the chunks that still fit, so the result lands within one chunk of `budget` (exact for a group count with
    `group_divisible=1`), and never above it.

    Args:
        scores (`torch.Tensor`): saliency per group, high = important.
        selected (`torch.Tensor`): bool per group, already selected (excluded, and counted in the budget).
        groups (`GroupSet`): the groups (block ids and sizes).
        cost (`torch.Tensor`): per-group cost in the budget's unit (float).
        budget (`float`): the value `removed(selected | new)` must reach, at most.
        removed (`Callable[[torch.Tensor], float]`): the budget measure of a selection mask (may be sub-additive, as
            the parameter count of overlapping key/value groups and query slots is).
        group_divisible (`int`): chunk size.
        max_rounds (`int`): bound on the fill-in rounds.

    Returns:
        `torch.Tensor`: bool per group, the newly selected groups.
    """
    num_blocks = len(groups.blocks)
    div_b, keep_b = _block_rules(groups, group_divisible)
    new = torch.zeros_like(selected)
    # A width group inside an already selected sublayer goes with it: not a candidate.
    cover = covering_sublayer(groups)
    inside = (cover >= 0) & selected[cover.clamp_min(0)]
    candidates = (~selected & ~inside).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return new
    block = groups.block_ids[candidates]
    key = scores[candidates].double() / cost[candidates].double()
    # Order candidates by (block, key): stable sort on key, then stable sort on block.
    order = torch.sort(key, stable=True).indices
    order = order[torch.sort(block[order], stable=True).indices]
    candidates, block, key = candidates[order], block[order], key[order]
    left = torch.bincount(block, minlength=num_blocks)
    start = torch.cumsum(left, 0) - left
    rank = torch.arange(len(candidates)) - start[block]
    div = div_b[block]
    first = left[block] % div
    chunk = torch.where(
        first > 0,
        torch.where(rank < first, 0, 1 + (rank - first).div(div, rounding_mode="floor")),
        rank.div(div, rounding_mode="floor"),
    )
    allowed = rank < (left[block] - keep_b[block])
    # Whole sublayers: never every one of a kind (the most salient one left always stays).
    for kind in SUBLAYER_KINDS:
        of_kind = torch.tensor([b.kind == kind for b in groups.blocks] + [False], dtype=torch.bool)[groups.block_ids]
        if not bool(of_kind.any()):
            continue
        room = int(of_kind.sum()) - 1 - int((selected & of_kind).sum())
        mine = (of_kind[candidates] & allowed).nonzero().squeeze(1)
        if mine.numel() > max(room, 0):
            by_key = mine[torch.sort(key[mine], stable=True).indices]
            allowed[by_key[max(room, 0) :]] = False
    candidates, block, key, chunk = candidates[allowed], block[allowed], key[allowed], chunk[allowed]
    if candidates.numel() == 0:
        return new
    max_chunks = int(chunk.max()) + 1
    ids, inverse = torch.unique(block * max_chunks + chunk, sorted=True, return_inverse=True)
    chunk_key = torch.full((len(ids),), -torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, key, reduce="amax")
    chunk_cost = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, cost[candidates].double())
    # Stable: equal keys keep the (block, chunk) order, so a block's chunks are always taken front to back.
    ranking = torch.sort(chunk_key, stable=True).indices
    taken = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(max_rounds):
        room = budget - removed(selected | new)
        fits = ~taken[ranking] & (chunk_cost[ranking] <= room + 1e-9)
        if not bool(fits.any()):
            break
        # Prefix of the fitting chunks, in ranking order, whose nominal costs sum to at most `room`; nominal costs
        # bound the true (sub-additive) ones, so this never overshoots.
        fit_idx = ranking[fits]
        take = torch.cumsum(chunk_cost[fit_idx], 0) <= room + 1e-9
        if not bool(take.any()):
            break
        taken[fit_idx[take]] = True
        new[candidates[taken[inverse]]] = True
    return new


def reachable_groups(groups: GroupSet, group_divisible: int, target: int) -> int:
    """The largest number of groups, at most `target`, that can be removed when every block keeps a multiple of
    `group_divisible` groups (at least `group_divisible`).

    A subset sum over the blocks, on the bits of one integer (bit `r` set: `r` groups can go): a block of `n` groups
    can lose `n % div + j * div` groups for `j < n // div`, an arithmetic progression OR-ed in by doubling, so a
    block costs O(log(n / div)) shifts.
    """
    div = group_divisible
    limit = (1 << (target + 1)) - 1
    reachable = 1
    for block in groups.blocks:
        count = block.n // div  # the removable counts n % div + j * div, j < count (kept >= div)
        union, acc, cover, offset = 0, (reachable << (block.n % div)) & limit, 1, 0
        while count:
            if count & 1:
                union |= acc << (offset * div)
                offset += cover
            acc = (acc | (acc << (cover * div))) & limit
            cover *= 2
            count >>= 1
        reachable = (reachable | union) & limit
    return reachable.bit_length() - 1
