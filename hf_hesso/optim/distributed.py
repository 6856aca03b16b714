"""HESSO on parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`).

FSDP2 turns every parameter into a `DTensor` sharded along dimension 0 (`Shard(0)`): each rank holds a contiguous
range of rows (the last ranks may hold fewer, or none). A group's slice along dimension 0 (rows of `q_proj`,
`gate_proj`, ...) is then split across ranks, while a slice along dimension 1 (columns of `o_proj`, `down_proj`)
is cut the same way on every rank, each holding all the columns of its own rows. So:

- per-step operations (zeroing pruned groups, fading redundant ones) act on the local shard only, with no
  communication: a row slice multiplies the local rows by a per-row factor, built once from the global row indices
  of the local shard (`SliceOps`); a column slice uses the ordinary per-group view of the local rows;
- scoring reduces the local shard into per-group partial sums and all-reduces the `(4, num_groups)` partial sums
  once per scoring step (`SaliencyAccumulator.finish`); every rank then ranks the same statistics and selects the
  same groups.

Layouts where the group structure is lost (FSDP1 flat parameters, DeepSpeed ZeRO-3 partitions) are refused with an
error that names FSDP2 as the supported alternative (`check_supported`).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..groups import Slice

try:  # DTensor is public from torch 2.4; keep the single-process path importable without it.
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None

_FSDP1_OR_ZERO3 = (
    "HESSO needs every parameter with its own shape (whole, or row-sharded by FSDP2), because its groups are rows "
    "and columns of the weight matrices. {what} Use FSDP2 instead: `torch.distributed.fsdp.fully_shard`, or with "
    "Accelerate/Trainer `fsdp_version: 2` (see recipes/accelerate_configs/fsdp2.yaml); DDP also works."
)


def check_backend(deepspeed: bool, fsdp_version: int | None) -> None:
    """Refuse the training backends that flatten parameters (the groups are rows and columns of whole weight
    matrices): DeepSpeed, and FSDP other than version 2 (`fsdp_version=None`: no FSDP)."""
    if deepspeed:
        raise ValueError(
            "HESSOTrainer does not support DeepSpeed: its ZeRO optimizers flatten and partition the parameters, "
            "which hides the rows and columns HESSO prunes. Use FSDP2 instead (`--fsdp full_shard` with "
            "`--fsdp_config '{\"version\": 2}'`, or `accelerate launch --config_file "
            "recipes/accelerate_configs/fsdp2.yaml`), or DDP."
        )
    if fsdp_version is not None and fsdp_version != 2:
        raise ValueError(
            f"HESSOTrainer does not support FSDP version {fsdp_version}: FSDP1 flattens the "
            "parameters of each wrapped module into one flat parameter, which hides the rows and columns HESSO "
            "prunes. Use FSDP2 instead: `fsdp_version: 2` in the Accelerate config "
            "(recipes/accelerate_configs/fsdp2.yaml) or `--fsdp_config '{\"version\": 2}'`."
        )


def is_dtensor(t: torch.Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a `DTensor` (shares its storage, so in-place ops act on the parameter), else `t`."""
    return t._local_tensor if is_dtensor(t) else t


def check_supported(params: dict[str, torch.Tensor], expected_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise a `ValueError` for parameters whose layout hides the group structure.

    Args:
        params (`dict[str, torch.Tensor]`): name -> parameter (the optimizer's and the groups' parameters).
        expected_shapes (`dict[str, tuple[int, ...]]`): name -> shape recorded when the groups were built.
    """
    for name, p in params.items():
        if hasattr(p, "ds_id") or hasattr(p, "ds_shape"):
            raise ValueError(
                _FSDP1_OR_ZERO3.format(
                    what=f"Parameter {name!r} is partitioned by DeepSpeed ZeRO-3 (it has `ds_id`), which flattens and "
                    "splits parameters across ranks."
                )
            )
        if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
            raise ValueError(
                _FSDP1_OR_ZERO3.format(
                    what=f"Parameter {name!r} is an FSDP1 flat parameter (`FullyShardedDataParallel`), which "
                    "concatenates and flattens the parameters of a module."
                )
            )
        if is_dtensor(p):
            placement_error(name, p)
        expected = expected_shapes.get(name)
        if expected is not None and tuple(p.shape) != tuple(expected):
            flattened = p.dim() == 1 and len(expected) > 1
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(p.shape)}, but the groups were built for {tuple(expected)}. "
                + (
                    _FSDP1_OR_ZERO3.format(what="It looks flattened, as FSDP1 (`use_orig_params=True`) leaves it.")
                    if flattened
                    else "Build the groups from the model you train: `groups = build_groups(model)`."
                )
            )


def placement_error(name: str, p: torch.Tensor) -> None:
    """Refuse `DTensor` layouts other than `Shard(0)` / `Replicate` (e.g. tensor parallel, `_StridedShard`)."""
    for placement in p.placements:
        if type(placement) is Shard and placement.dim == 0:
            continue
        if isinstance(placement, Replicate):
            continue
        raise ValueError(
            f"Parameter {name!r} is a DTensor with placements {tuple(p.placements)}; HESSO supports FSDP2 row "
            "sharding (`Shard(0)`, optionally with `Replicate()` for HSDP) only. Shard the model with "
            "`fully_shard` alone (no tensor parallelism)."
        )


def local_row_range(p: torch.Tensor) -> tuple[int, int] | None:
    """Global rows `[start, stop)` of the local shard of a row-sharded `DTensor`; `None` for a whole tensor."""
    if not is_dtensor(p):
        return None
    placement_error("<param>", p)
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if not shape:  # 0-d tensor
        return None
    return int(offset[0]), int(offset[0]) + int(shape[0])


@functools.lru_cache(maxsize=4096)
def _row_groups(s: Slice, start: int, stop: int, device: str) -> torch.Tensor:
    """Group index (within the block) of every global row in `[start, stop)` of a slice along dimension 0."""
    rows = torch.arange(start, stop)
    return ((rows // s.inner) % s.n).to(device)


def statistic_sums(x: torch.Tensor, d: torch.Tensor, axis: int) -> torch.Tensor:
    """`(4, x.shape[axis])` sums of `x*x`, `d*d`, `x*d` and `|x*d|` over every dimension of `x` and `d` but `axis`."""
    # einsum contracts without materialising the elementwise products (about 2x faster than mul + sum).
    letters = "abcdefghij"[: x.dim()]
    eq = f"{letters},{letters}->{letters[axis]}"
    return torch.stack(
        [torch.einsum(eq, x, x), torch.einsum(eq, d, d), torch.einsum(eq, x, d), torch.einsum(eq, x.abs(), d.abs())]
    )


class SliceOps:
    """The per-group operations of one `Slice` on one parameter, on its local shard where it is a `DTensor`.

    For a whole tensor, and for a slice along a dimension other than 0 (every rank holds all of it), these are the
    `Slice.view` operations on the local tensor. For a slice along dimension 0 of a row-sharded parameter, group
    vectors are expanded to the local rows with a per-row group index computed once here.

    Args:
        s (`Slice`): the slice.
        p (`torch.Tensor`): the parameter (a `DTensor` under FSDP2).
    """

    def __init__(self, s: Slice, p: torch.Tensor):
        self.slice = s
        self.ndim = p.dim()
        self.sharded = is_dtensor(p)
        rows = local_row_range(p) if s.dim == 0 else None
        self.rows: torch.Tensor | None = None
        if rows is not None:
            if p.shape[0] != s.outer * s.n * s.inner:
                s.view(p)  # raises the shape error
            self.rows = _row_groups(s, rows[0], rows[1], str(local(p).device))

    def target(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor (a view of the local shard of `t`) that `factor(...)` broadcasts against."""
        t = local(t)
        return t if self.rows is not None else self.slice.view(t)

    def factor(self, vec: torch.Tensor) -> torch.Tensor:
        """A per-group vector `(n,)` shaped to broadcast over `target(t)`."""
        if self.rows is not None:
            return vec[self.rows].view(-1, *([1] * (self.ndim - 1)))
        shape = [1] * (self.ndim + 2)
        shape[self.slice.dim + 1] = self.slice.n
        return vec.view(shape)

    def expand(self, vec: torch.Tensor, unit: int = 1) -> torch.Tensor:
        """A per-group vector `(n,)` as one value per `unit` consecutive (local) indices along the slice's dimension.

        `unit` must divide `slice.inner` (it is 1 for a row-sharded parameter, whose local rows are listed one by one).
        """
        if self.rows is not None:
            if unit != 1:
                raise ValueError(f"A row-sharded slice expands per row (unit 1), got unit={unit}.")
            return vec[self.rows]
        s = self.slice
        if s.inner % unit:
            raise ValueError(f"`unit`={unit} does not divide the {s.inner} indices per group of {s.param!r}.")
        return vec.view(1, s.n, 1).expand(s.outer, s.n, s.inner // unit).reshape(-1)

    def fill_(self, t: torch.Tensor, idx: torch.Tensor) -> None:
        """Set the groups `idx` (indices within the block) of `t` to zero, in place."""
        if self.rows is not None:
            hit = torch.isin(self.rows, idx.to(self.rows.device)).nonzero().squeeze(1)
            local(t).index_fill_(0, hit, 0)
        else:
            self.slice.view(local(t)).index_fill_(self.slice.dim + 1, idx, 0)

    def partial_sums(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(4, k)` sums of `x*x`, `d*d`, `x*d`, `|x*d|` over the local shard, and where they go.

        Returns the sums and `None` (k = n, one column per group) or a `(k,)` group index per column (k = local
        rows) to be added with `index_add_`.
        """
        x, d = local(x).float(), local(d).float()
        if self.rows is not None:
            return statistic_sums(x, d, 0), self.rows
        return statistic_sums(self.slice.view(x), self.slice.view(d), self.slice.dim + 1), None


class ShardReduction:
    """Where and whether the partial sums of sharded parameters are all-reduced.

    On an HSDP mesh (`Replicate`, `Shard(0)`) only the ranks of the first replica contribute, so that one
    all-reduce over every rank of the mesh adds each shard exactly once.
    """

    def __init__(self):
        self.mesh = None

    def contributes(self, p: torch.Tensor) -> bool:
        """Record `p`'s mesh; False where this rank's copy of `p` is a replica that another rank already counts."""
        mesh = p.device_mesh
        if self.mesh is None:
            self.mesh = mesh
        elif mesh != self.mesh:
            raise ValueError(
                "The sharded parameters HESSO prunes live on different device meshes; shard the whole model with "
                "`fully_shard(..., mesh=mesh)` on one mesh."
            )
        coords = mesh.get_coordinate() or []
        return all(c == 0 for c, pl in zip(coords, p.placements, strict=False) if isinstance(pl, Replicate))

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.mesh is None:
            return
        if self.mesh.ndim == 1:
            group = self.mesh.get_group()
        else:
            if self.mesh.size() != dist.get_world_size():
                raise ValueError(
                    f"HESSO reduces group statistics over the whole mesh ({self.mesh.size()} ranks), which must span "
                    f"all {dist.get_world_size()} ranks of the default process group."
                )
            group = None
        dist.all_reduce(t, group=group)


def group_squared_norms(groups, params: dict[str, torch.Tensor], ops: dict[Slice, SliceOps]) -> torch.Tensor:
    """`||x_g||^2` per group (float64, CPU), from local shards plus one all-reduce if any parameter is sharded.

    Under FSDP2 this is a collective: call it on every rank (the Trainer logs on every rank).
    """
    total = torch.zeros(groups.num_groups, dtype=torch.float64)
    shard: torch.Tensor | None = None
    reduction = ShardReduction()
    for block in groups.blocks:
        for s in block.slices:
            p = params[s.param]
            if not is_dtensor(p):
                total[block.offset : block.offset + block.n] += s.sum_per_group(p.float().square()).double().cpu()
                continue
            x = local(p)
            if shard is None:
                shard = torch.zeros(groups.num_groups, dtype=torch.float32, device=x.device)
            if not reduction.contributes(p):
                continue
            sq = x.float().square()
            rows = ops[s].rows
            if rows is None:
                shard[block.offset : block.offset + block.n] += s.sum_per_group(sq)
            else:
                per_row = sq.sum(dim=tuple(range(1, sq.dim()))) if sq.dim() > 1 else sq
                shard.index_add_(0, rows + block.offset, per_row)
    if shard is not None:
        reduction.all_reduce(shard)
        total += shard.double().cpu()
    return total
