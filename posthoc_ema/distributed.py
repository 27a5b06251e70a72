"""Sharded models (FSDP2, DTensor): each rank's EMAs of its local shards, their shard files, and their assembly.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a
:class:`~torch.distributed.tensor.DTensor` whose local tensor is this rank's
block of dimension 0 (``Shard(0)``; blocks of ``ceil(n / world_size)`` rows,
so the last ranks' may be smaller or empty). The tracker averages those local
tensors, so each rank keeps float32 EMAs of its shards only and an update
needs no communication. Plain tensors (buffers, which FSDP2 leaves whole on
every rank) and ``Replicate()`` DTensors are averaged whole on every rank.

A snapshot is then one file per rank (:func:`~posthoc_ema.snapshots.snapshot_name`
with ``shard=``) whose metadata records each tensor's placement
(:class:`~posthoc_ema.snapshots.ShardLayout`: global shape, this block's offsets,
mesh size and rank). Rank 0's file also holds the whole tensors (its copy of
them); the other ranks' files hold their shards only. Synthesis is linear in
each element, so :func:`run_shards` synthesizes each rank's files as a set of
their own (with :func:`posthoc_ema.synthesis.run`, unchanged) and places the
results at their offsets in the whole outputs.

The vocabulary is DTensor's (placements, local shards, ``full_tensor()``) and
the per-rank files follow ``torch.distributed.checkpoint``'s idea of each rank
saving what it holds, with the layout in the metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from posthoc_ema.dtypes import FLOATING_DTYPES, SAFETENSORS_DTYPES, parse_dtype
from posthoc_ema.errors import SnapshotError
from posthoc_ema.snapshots import SnapshotInfo, TensorPlacement

if TYPE_CHECKING:
    from posthoc_ema.synthesis import Plan, StateDict

__all__ = ["MeshLayout", "combine_shards", "group_shards", "run_shards", "shard_layout"]


def dtensor_type() -> type | None:
    """:class:`~torch.distributed.tensor.DTensor`, or None in a torch built without distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def chunk_block(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """(offset, length) of ``rank``'s block of a dimension of ``size`` split as ``torch.chunk`` splits it.

    This is how DTensor's ``Shard(d)`` (and so FSDP2) places a dimension:
    blocks of ``ceil(size / world_size)``, the last ones smaller or empty.

    >>> [chunk_block(3, 2, r) for r in range(2)], [chunk_block(1, 2, r) for r in range(2)]
    ([(0, 2), (2, 1)], [(0, 1), (1, 0)])
    """
    step = -(-size // world_size) if size else 0
    start = min(rank * step, size)
    return start, max(0, min(size, start + step) - start)


@dataclass(frozen=True)
class MeshLayout:
    """How a model's tracked tensors are placed over a 1-D device mesh.

    Attributes:
        rank: this process's coordinate in the mesh.
        world_size: the mesh's size.
        placements: key -> :class:`~posthoc_ema.snapshots.TensorPlacement` of
            this rank's block of every DTensor entry.
        mesh: the device mesh (for :func:`as_dtensor`).
    """

    rank: int
    world_size: int
    placements: Mapping[str, TensorPlacement]
    mesh: Any


def _unsupported(key: str, why: str) -> ValueError:
    return ValueError(
        f"{key!r} is a DTensor {why}; PostHocEMA tracks DTensors on a 1-D device mesh spanning every rank "
        "with a Shard(d) or Replicate() placement (FSDP2's fully_shard), and plain tensors"
    )


def shard_layout(entries: Mapping[str, torch.Tensor]) -> MeshLayout | None:
    """The :class:`MeshLayout` of the DTensor entries of a model's state dict, or None if it has none.

    Raises:
        ValueError: naming the first entry that is not supported: a DTensor on a
            mesh of more than one dimension (HSDP, 2-D parallelism), on a mesh
            that does not span every rank or that differs from the other
            entries', with a ``Partial`` or strided placement, or a non-floating one.
    """
    dtensor = dtensor_type()
    if dtensor is None:
        return None
    sharded: dict[str, Any] = {k: t for k, t in entries.items() if isinstance(t, dtensor)}
    if not sharded:
        return None
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    mesh: Any = None
    placements: dict[str, TensorPlacement] = {}
    for key, t in sharded.items():
        here: Any = t.device_mesh
        if here.ndim != 1:
            raise _unsupported(key, f"on a {here.ndim}-D device mesh (HSDP or 2-D parallelism)")
        if here.size() != world:
            raise _unsupported(key, f"on a mesh of {here.size()} ranks in a world of {world}")
        if mesh is None:
            mesh = here
        elif here != mesh:
            raise _unsupported(key, "on another device mesh than the model's other DTensors")
        if not t.is_floating_point():
            raise _unsupported(key, f"of {t.dtype}")
        (placement,) = t.placements
        rank = here.get_local_rank()
        local = tuple(t._local_tensor.shape)
        shape = tuple(t.shape)
        if placement.is_replicate():
            offsets = (0,) * len(shape)
            name = "Replicate()"
        elif type(placement).__name__ == "Shard" and placement.is_shard():
            dim = placement.dim % max(len(shape), 1)
            start, length = chunk_block(shape[dim], here.size(), rank)
            offsets = tuple(start if d == dim else 0 for d in range(len(shape)))
            expected = tuple(length if d == dim else n for d, n in enumerate(shape))
            if local != expected:
                raise _unsupported(key, f"whose local shard has shape {local}, not the {expected} of Shard({dim})")
            name = f"Shard({dim})"
        else:
            raise _unsupported(key, f"with the placement {placement}")
        if placement.is_replicate() and local != shape:
            raise _unsupported(key, f"replicated with a local tensor of shape {local}, not {shape}")
        placements[key] = TensorPlacement(name, shape, offsets)
    return MeshLayout(mesh.get_local_rank(), mesh.size(), placements, mesh)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of ``t``: its local shard for a DTensor, ``t`` itself otherwise."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def as_dtensor(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's block) as a DTensor placed as ``like``, of ``like``'s global shape; no communication."""
    dtensor: Any = dtensor_type()
    return dtensor.from_local(  # type: ignore[no-any-return]
        local,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=_contiguous_strides(like.shape),
    )


def reshard(model: torch.nn.Module) -> None:
    """Reshard every FSDP2 module of ``model``, so that its next forward all-gathers the local shards afresh.

    After a forward outside training (or with ``reshard_after_forward=False``)
    FSDP2 keeps the unsharded parameters, and its next forward uses them as
    they are: weights written into the local shards meanwhile would be ignored.
    ``FSDPModule.reshard()`` frees them, with no communication.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose block on this rank is ``local``, placed as ``like`` (a collective on every rank)."""
    whole: Any = as_dtensor(local, like)
    return whole.full_tensor()  # type: ignore[no-any-return]


def agree_run_id(run_id: str, layout: MeshLayout) -> str:
    """Rank 0's ``run_id`` on every rank of the mesh (a collective: every rank calls it)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or layout.world_size == 1:
        return run_id
    box = [run_id]
    dist.broadcast_object_list(box, group_src=0, group=layout.mesh.get_group())
    return str(box[0])


# -- reading --------------------------------------------------------------------


def _snapshot_key(info: SnapshotInfo) -> tuple[str, str | None, int, bool, float, str]:
    return (
        info.prefix,
        info.run_id,
        info.step,
        info.is_classic,
        0.0 if info.is_classic else info.sigma_rel,
        info.name or "",
    )


def _label(info: SnapshotInfo) -> str:
    what = f"EMA {info.name!r}" if info.is_classic else f"sigma_rel={info.sigma_rel!r}"
    return f"the snapshot of {what} at step {info.step} (prefix {info.prefix!r})"


def _combine(members: Sequence[SnapshotInfo]) -> SnapshotInfo | str:
    """The whole snapshot of one snapshot's shard files, or why they do not make one."""
    first = members[0]
    assert first.shard is not None
    world = first.shard.world_size
    by_rank: dict[int, SnapshotInfo] = {}
    for info in members:
        assert info.shard is not None
        if info.shard.world_size != world:
            return f"{_label(first)} has shard files of {world} and of {info.shard.world_size} ranks ({info.path.name})"
        if info.shard.rank in by_rank:
            return f"{_label(first)} has two shard files of rank {info.shard.rank}: {info.path.name}"
        by_rank[info.shard.rank] = info
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        return (
            f"{_label(first)} is incomplete: the shard files of rank {shown} of {world} are missing "
            f"(found {', '.join(i.path.name for i in members[:3])}{', ...' if len(members) > 3 else ''})"
        )
    ranks = [by_rank[r] for r in range(world)]
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    blocks: dict[str, list[tuple[TensorPlacement, tuple[int, ...]]]] = {}
    for info in ranks:
        assert info.shard is not None
        for name, (dtype, shape) in info.tensors.items():
            placement = info.shard.tensors[name]
            seen = tensors.setdefault(name, (dtype, placement.global_shape))
            if seen[1] != placement.global_shape:
                return (
                    f"{_label(first)}: {info.path.name} gives {name!r} the global shape "
                    f"{placement.global_shape}, another rank's file {seen[1]}"
                )
            blocks.setdefault(name, []).append((placement, shape))
    for name, parts in blocks.items():
        shape = tensors[name][1]
        if any(p.placement == "Replicate()" for p, _ in parts):
            continue
        covered = sum(math.prod(local) for _, local in parts)
        if covered != math.prod(shape) or len({p.placement for p, _ in parts}) != 1:
            return f"{_label(first)}: the shard files' blocks of {name!r} do not make up its shape {shape}"
    offsets = dict(ranks[0].offsets)
    end = max(offsets.values(), default=0) + 1
    for name in tensors:
        if name not in offsets:  # a tensor rank 0's file lacks: listed after its own, in a fixed order
            offsets[name], end = end, end + 1
    return replace(ranks[0], tensors=tensors, offsets=offsets, shard=None, shards=tuple(ranks))


def group_shards(infos: Iterable[SnapshotInfo]) -> tuple[list[SnapshotInfo], list[str]]:
    """Whole snapshots, with each snapshot's shard files assembled into one; and a sentence per set that is not.

    Shard files are grouped by prefix, run, step and sigma_rel (or name); a set
    that lacks a rank's file, has one twice, or whose blocks do not make up the
    whole tensors is left out and described instead.
    """
    result: list[SnapshotInfo] = []
    sets: dict[tuple[Any, ...], list[SnapshotInfo]] = {}
    for info in infos:
        if info.shard is None:
            result.append(info)
        else:
            sets.setdefault(_snapshot_key(info), []).append(info)
    problems: list[str] = []
    for members in sets.values():
        whole = _combine(sorted(members, key=lambda i: i.shard.rank if i.shard else 0))
        if isinstance(whole, str):
            problems.append(whole)
        else:
            result.append(whole)
    return result, problems


def combine_shards(infos: Sequence[SnapshotInfo]) -> list[SnapshotInfo]:
    """:func:`group_shards`, raising for the first incomplete set; the order of ``infos`` is kept.

    Raises:
        SnapshotError: naming the snapshot whose shard files are incomplete (a
            rank's file missing), repeated, or inconsistent, and the folder.
    """
    if not any(info.shard is not None for info in infos):
        return list(infos)
    whole, problems = group_shards(infos)
    if problems:
        folder = infos[0].path.parent
        more = f" ({len(problems) - 1} more such)" if len(problems) > 1 else ""
        raise SnapshotError(
            f"{folder}: {problems[0]}{more}; synthesis needs every rank's shard file of each snapshot "
            "(copy the missing files in, or delete that snapshot's files)"
        )
    position = {id(info): n for n, info in enumerate(infos)}
    return sorted(whole, key=lambda i: position[id(i.shards[0] if i.shards else i)])


_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def _restricted(info: SnapshotInfo, names: Iterable[str]) -> SnapshotInfo:
    keep = set(names)
    return replace(
        info,
        tensors={k: v for k, v in info.tensors.items() if k in keep},
        offsets={k: v for k, v in info.offsets.items() if k in keep},
    )


def run_shards(
    the_plan: Plan,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[Any, StateDict]:
    """:func:`posthoc_ema.synthesis.run` for a plan of assembled snapshots (:attr:`SnapshotInfo.shards`).

    Each rank's shard files are synthesized as a set of their own, and each
    result is placed at its offsets in the whole outputs: the same weights apply
    to every element, so this equals synthesizing whole snapshots. Memory is
    the whole outputs plus one rank's.
    """
    from posthoc_ema.synthesis import ByTarget, run

    out_dtype = parse_dtype(dtype)
    dev = torch.device(device if device is not None else "cpu")
    latest = the_plan.snapshots[-1]
    names = list(latest.tensors)
    world = len(latest.shards)
    per_rank = [tuple(_restricted(s.shards[r], names) for s in the_plan.snapshots) for r in range(world)]

    def elements(snaps: Sequence[SnapshotInfo]) -> int:
        last = snaps[-1]
        return len(snaps) * sum(math.prod(shape) for dt, shape in last.tensors.values() if dt in FLOATING_DTYPES)

    totals = [elements(snaps) for snaps in per_rank]
    outputs = ByTarget()
    for j in range(len(the_plan.sigma_rels)):
        outputs[the_plan.key(j)] = {
            name: torch.empty(shape, dtype=out_dtype if st in FLOATING_DTYPES else _TORCH_DTYPES[st], device=dev)
            for name, (st, shape) in latest.tensors.items()
        }
    filled: set[str] = set()
    for rank, snaps in enumerate(per_rank):
        done = sum(totals[:rank])

        def report(work: int, _total: int, done: int = done) -> None:
            if progress is not None:
                progress(done + work, sum(totals))

        part = run(replace(the_plan, snapshots=snaps), device=dev, dtype=out_dtype, progress=report)
        layout = snaps[-1].shard
        assert layout is not None
        for j in range(len(the_plan.sigma_rels)):
            key = the_plan.key(j)
            whole = outputs[key]
            for name, block in part[key].items():
                placement = layout.tensors[name]
                if placement.placement == "Replicate()":
                    if name not in filled:
                        whole[name].copy_(block)
                    continue
                index = tuple(slice(o, o + n) for o, n in zip(placement.offsets, block.shape, strict=True))
                whole[name][index] = block
        filled |= {n for n, p in layout.tensors.items() if p.placement == "Replicate()"}
    return outputs
