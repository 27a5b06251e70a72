"""The snapshot format: naming, self-describing metadata, listing.

A snapshot is a safetensors file holding one EMA at one step. Everything that
gives it meaning lives in its metadata (see :data:`FORMAT` and
:class:`SnapshotInfo`); file names only keep files apart and sorted. The bytes
are written atomically by :mod:`posthoc_ema.files`; listing skips their
temporary files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The dtype tables, the file writes and the background writer lived here before they got
# modules of their own; they stay importable from here.
from posthoc_ema.dtypes import (  # noqa: F401
    DTYPES,
    FLOATING_DTYPES,
    ITEMSIZE,
    SAFETENSORS_DTYPES,
    dtype_name,
    parse_dtype,
)
from posthoc_ema.errors import SnapshotError, SnapshotWriteError  # noqa: F401
from posthoc_ema.files import TMP_SUFFIX, atomic_path, read_header, write_atomic, write_safetensors  # noqa: F401
from posthoc_ema.profiles import MAX_SIGMA_REL, canonical_sigma_rel
from posthoc_ema.writer import BackgroundWriter  # noqa: F401

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PREFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "SUFFIX",
    "SYNTHESIZED_FORMAT",
    "ShardLayout",
    "SnapshotInfo",
    "TensorPlacement",
    "check_prefix",
    "list_snapshots",
    "mixed_runs",
    "read_info",
    "runs_in",
    "snapshot_name",
]

#: The metadata value ``format`` of a snapshot written by this library.
FORMAT = "posthoc-ema/snapshot"
#: The metadata value ``format`` of a file synthesized from snapshots.
SYNTHESIZED_FORMAT = "posthoc-ema/synthesized"
#: Bumped on any change a reader of an older version could misread. Each file records the
#: lowest version that reads it: power-function snapshots are still version 1, snapshots of a
#: classic schedule (no sigma_rel) version 2, and the shard files of a sharded model (FSDP2,
#: one file per rank and EMA, see :class:`ShardLayout`) version 3, so an older reader asks
#: for an upgrade instead of taking one rank's shard for a whole snapshot.
FORMAT_VERSION = 3
_CLASSIC_VERSION = 2
_SHARD_VERSION = 3
SUFFIX = ".safetensors"
#: The prefix of snapshots written without ``prefix=``, and of files whose metadata has none.
DEFAULT_PREFIX = "phema"
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TensorPlacement:
    """Where the block of a tensor that one shard file holds lies in the whole tensor.

    Attributes:
        placement: ``"Shard(d)"`` (the file holds this rank's block of dimension
            ``d``, as DTensor's :class:`~torch.distributed.tensor.Shard` places it)
            or ``"Replicate()"`` (the file holds the whole tensor, kept alike on
            every rank).
        global_shape: the shape of the whole tensor.
        offsets: where the block starts in the whole tensor, per dimension; its
            extent is the tensor's shape in the file (possibly 0: an empty shard).
    """

    placement: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this placement in a shard file's ``placements`` metadata."""
        return {"placement": self.placement, "global_shape": list(self.global_shape), "offsets": list(self.offsets)}


@dataclass(frozen=True)
class ShardLayout:
    """What a shard file's metadata says about the rank that wrote it.

    Attributes:
        rank: the writer's rank in the (1-D) device mesh the model is sharded over.
        world_size: the mesh's size: how many shard files make the whole snapshot.
        tensors: name -> :class:`TensorPlacement` of every tensor in the file.
    """

    rank: int
    world_size: int
    tensors: Mapping[str, TensorPlacement] = field(default_factory=dict, repr=False)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata entries of the layout."""
        placements = {name: p.to_json() for name, p in self.tensors.items()}
        return {
            "shard_rank": str(self.rank),
            "shard_world_size": str(self.world_size),
            "placements": json.dumps(placements, separators=(",", ":"), sort_keys=True),
        }


_PLACEMENT = re.compile(r"Shard\((\d+)\)|Replicate\(\)")


def _layout_from(path: Path, meta: Mapping[str, str], table: Mapping[str, Mapping[str, Any]]) -> ShardLayout:
    """The :class:`ShardLayout` of a shard file's header, checked against its tensors."""
    rank, world = int(meta["shard_rank"]), int(meta["shard_world_size"])
    if not 0 <= rank < world:
        raise SnapshotError(
            f"{path}: snapshot metadata has shard_rank={rank} and shard_world_size={world}; "
            "the rank must be in [0, world size)"
        )
    try:
        raw = json.loads(meta["placements"])
    except json.JSONDecodeError:
        raw = None
    if not isinstance(raw, dict) or set(raw) != set(table):
        raise SnapshotError(f"{path}: snapshot metadata 'placements' is not a JSON object with an entry per tensor")
    tensors: dict[str, TensorPlacement] = {}
    for name, entry in raw.items():
        shape = tuple(int(n) for n in table[name]["shape"])
        try:
            placement = TensorPlacement(
                str(entry["placement"]),
                tuple(int(n) for n in entry["global_shape"]),
                tuple(int(n) for n in entry["offsets"]),
            )
        except (KeyError, TypeError, ValueError):
            placement = None
        match = None if placement is None else _PLACEMENT.fullmatch(placement.placement)
        fits = (
            placement is not None
            and match is not None
            and len(placement.global_shape) == len(shape) == len(placement.offsets)
            and all(
                o >= 0 and o + n <= g for o, n, g in zip(placement.offsets, shape, placement.global_shape, strict=True)
            )
        )
        if fits and placement is not None and match is not None:
            dim = None if match.group(1) is None else int(match.group(1))
            # Only the sharded dimension may differ from the whole tensor's.
            fits = all(
                (o == 0 and n == g) or d == dim
                for d, (o, n, g) in enumerate(zip(placement.offsets, shape, placement.global_shape, strict=True))
            )
        if not fits or placement is None:
            raise SnapshotError(
                f"{path}: snapshot metadata places {name!r} (shape {list(shape)}) as {entry!r}, which is not a "
                "Shard(d) block or a Replicate() copy of its global_shape"
            )
        tensors[name] = placement
    return ShardLayout(rank, world, tensors)


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot's metadata says about it.

    Attributes:
        path: the file.
        step: the training time at which the EMA was taken.
        sigma_rel: relative width of the EMA's profile; NaN (:data:`math.nan`) for the
            snapshot of a classic schedule, whose profile is no power function.
        gamma: its exponent (EDM2 eq. 126); redundant with sigma_rel, stored to be explicit;
            NaN for a classic schedule.
        dtype: name of the dtype floating tensors were stored in.
        update_every: how many ``update()`` calls there were per EMA update.
        library_version: version of posthoc-ema that wrote the file.
        run_id: identity of the training run that wrote it; None in files written before runs had one.
        prefix: the namespace of the tracker that wrote it, so that several
            trackers (a GAN's generator and discriminator) can share a folder.
        start_step: the step this EMA began at, when it was added on resume (see
            :meth:`PostHocEMA.load_state_dict`); None for an EMA tracked from step 0.
        name: the name of a classic schedule's EMA (``PostHocEMA(schedules={name: ...})``);
            None for a power-function snapshot.
        schedule: that schedule's JSON spec (:func:`posthoc_ema.schedules.to_metadata`);
            None for a power-function snapshot. :func:`list_snapshots` leaves these
            out unless asked; synthesis combines them with the power-function ones.
        tensors: name -> (safetensors dtype, shape) of every tensor, from the header.
        offsets: name -> absolute byte offset of the tensor's data in the file.
        shard: for one rank's shard file of a sharded model's snapshot, what it
            holds of each tensor (:class:`ShardLayout`); None for a whole snapshot.
        shards: for a whole snapshot assembled from shard files
            (:func:`posthoc_ema.distributed.combine_shards`, which :func:`posthoc_ema.plan`
            calls), the shard files by rank; its ``tensors`` then have the whole
            tensors' shapes and its ``path`` is rank 0's file. Empty otherwise.
    """

    path: Path
    step: int
    sigma_rel: float
    gamma: float
    dtype: str
    update_every: int
    library_version: str
    run_id: str | None = None
    prefix: str = DEFAULT_PREFIX
    start_step: int | None = None
    name: str | None = None
    schedule: str | None = None
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict, compare=False, repr=False)
    offsets: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    shard: ShardLayout | None = field(default=None, compare=False)
    shards: tuple[SnapshotInfo, ...] = field(default=(), compare=False, repr=False)

    @property
    def is_classic(self) -> bool:
        """Whether this is the snapshot of a classic schedule (not a power-function EMA)."""
        return self.schedule is not None

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata that describes this snapshot."""
        if self.schedule is not None:
            kind = {
                "format_version": str(_CLASSIC_VERSION),
                "name": str(self.name),
                "schedule": self.schedule,
            }
        else:
            kind = {"format_version": "1", "sigma_rel": repr(self.sigma_rel), "gamma": repr(self.gamma)}
        return (
            {"format": FORMAT}
            | kind
            | {
                "step": str(self.step),
                "dtype": self.dtype,
                "update_every": str(self.update_every),
                "library_version": self.library_version,
                "prefix": self.prefix,
            }
            | ({} if self.run_id is None else {"run_id": self.run_id})
            | ({} if self.start_step is None else {"start_step": str(self.start_step)})
            | ({} if self.shard is None else {"format_version": str(_SHARD_VERSION)} | self.shard.metadata())
        )


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start snapshot file names: a letter or digit, then letters, digits, ``_``, ``.``, ``-``.

    Raises:
        ValueError: for any other prefix.
    """
    if not isinstance(prefix, str) or _PREFIX.fullmatch(prefix) is None:
        raise ValueError(
            f"prefix={prefix!r} is not a valid snapshot prefix: use a letter or digit, "
            "then letters, digits, '_', '.' or '-' (e.g. 'generator')"
        )
    return prefix


def snapshot_name(
    step: int,
    sigma_rel: float | str,
    prefix: str = DEFAULT_PREFIX,
    *,
    shard: tuple[int, int] | None = None,
) -> str:
    """File name of the snapshot of ``sigma_rel`` (or of the classic EMA named so, a str) at ``step``; sorts by step.

    ``shard=(rank, world_size)`` names one rank's shard file of the snapshot of a
    sharded model: the shard files of a snapshot sort together, right after
    each other. The name only keeps files apart: readers take step, sigma_rel,
    prefix and rank from the metadata.

    >>> snapshot_name(1000, 0.05), snapshot_name(1000, "timm")
    ('phema-000000001000-0.05.safetensors', 'phema-000000001000-timm.safetensors')
    >>> snapshot_name(1000, 0.05, shard=(1, 2))
    'phema-000000001000-0.05-rank00001-of-00002.safetensors'
    """
    label = sigma_rel if isinstance(sigma_rel, str) else repr(canonical_sigma_rel(sigma_rel))
    part = "" if shard is None else f"-rank{shard[0]:05d}-of-{shard[1]:05d}"
    return f"{prefix}-{step:012d}-{label}{part}{SUFFIX}"


def _info_from_header(path: Path, meta: Mapping[str, str], table: Mapping[str, Mapping[str, Any]]) -> SnapshotInfo:
    try:
        version = int(meta["format_version"])
        if version > FORMAT_VERSION:
            raise SnapshotError(
                f"{path}: snapshot format version {version} is newer than this posthoc-ema "
                f"reads ({FORMAT_VERSION}); upgrade posthoc-ema"
            )
        classic = "schedule" in meta
        info = SnapshotInfo(
            path=path,
            step=int(meta["step"]),
            sigma_rel=math.nan if classic else canonical_sigma_rel(float(meta["sigma_rel"])),
            gamma=math.nan if classic else float(meta["gamma"]),
            dtype=meta["dtype"],
            update_every=int(meta["update_every"]),
            library_version=meta["library_version"],
            run_id=meta.get("run_id"),
            prefix=meta.get("prefix", DEFAULT_PREFIX),
            start_step=int(meta["start_step"]) if "start_step" in meta else None,
            name=meta["name"] if classic else None,
            schedule=meta["schedule"] if classic else None,
            tensors={name: (str(t["dtype"]), tuple(int(n) for n in t["shape"])) for name, t in table.items()},
            offsets={name: int(t["offset"]) for name, t in table.items()},
            shard=_layout_from(path, meta, table) if "shard_rank" in meta else None,
        )
    except KeyError as err:
        raise SnapshotError(f"{path}: snapshot metadata lacks the key {err.args[0]!r}") from None
    except ValueError as err:
        if isinstance(err, SnapshotError):
            raise
        raise SnapshotError(f"{path}: snapshot metadata has a malformed value ({err})") from None
    if classic:
        if info.step <= 0:
            raise SnapshotError(f"{path}: snapshot metadata has step={info.step!r}; step must be > 0")
        try:
            spec = json.loads(meta["schedule"])
        except json.JSONDecodeError:
            spec = None
        if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
            raise SnapshotError(
                f"{path}: snapshot metadata has schedule={meta['schedule']!r}, which is not a JSON "
                'object with a "class" entry'
            )
        return info
    for name, value, allowed in (
        ("step", info.step, info.step > 0),
        ("sigma_rel", info.sigma_rel, 0 < info.sigma_rel < MAX_SIGMA_REL),
        ("gamma", info.gamma, 0 < info.gamma < math.inf),
    ):
        if not allowed:
            raise SnapshotError(
                f"{path}: snapshot metadata has {name}={value!r}; step must be > 0, "
                f"sigma_rel in (0, {MAX_SIGMA_REL!r}) and gamma in (0, inf)"
            )
    return info


def read_info(path: str | os.PathLike[str]) -> SnapshotInfo | None:
    """The :class:`SnapshotInfo` of a snapshot file, or None for another safetensors file.

    Raises:
        SnapshotError: if the file is truncated or corrupt, or its metadata is malformed.
    """
    meta, table = read_header(path)
    if meta.get("format") != FORMAT:
        return None
    return _info_from_header(Path(path), meta, table)


def _order(info: SnapshotInfo) -> tuple[int, bool, float, str, int]:
    """Sort key: by step, the power-function snapshots first by sigma_rel, then the classic ones by name; then rank."""
    rank = -1 if info.shard is None else info.shard.rank
    return (info.step, info.is_classic, 0.0 if info.is_classic else info.sigma_rel, info.name or "", rank)


def list_snapshots(
    snapshot_dir: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    include_classic: bool = False,
    skip_unreadable: bool = False,
) -> list[SnapshotInfo]:
    """Every power-function snapshot in a folder, sorted by (step, sigma_rel).

    Files other than ``*.safetensors``, temporary files, safetensors files that
    are not snapshots and anything that is not a regular file (a FIFO, a folder)
    are ignored. The shard files of a sharded model's snapshot are listed one by
    one, by rank (see :attr:`SnapshotInfo.shard`;
    :func:`posthoc_ema.distributed.combine_shards` assembles them).

    Args:
        snapshot_dir: the folder.
        prefix: only the snapshots of this prefix (their metadata's, see
            :class:`SnapshotInfo`); default: all.
        include_classic: also list the snapshots of classic schedules
            (``PostHocEMA(schedules=...)``), after the power-function ones of
            their step. They are left out by default (they have no sigma_rel);
            :func:`~posthoc_ema.synthesis.plan` asks for them.
        skip_unreadable: log a warning for a corrupt or truncated file and go on,
            instead of raising (the tracker's own checks of its folder do this: a
            half-downloaded foreign file must not stop training).

    Raises:
        SnapshotError: if the folder does not exist, or a snapshot is corrupt
            (unless ``skip_unreadable``).
    """
    folder = Path(snapshot_dir)
    if not folder.is_dir():
        raise SnapshotError(f"{folder}: no such snapshot folder")
    infos = []
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        if not path.is_file():  # reading a FIFO named *.safetensors would block
            continue
        try:
            info = read_info(path)
        except SnapshotError as err:
            if not path.exists():  # deleted since the listing (another rank's tracker, existing="overwrite")
                continue
            if not skip_unreadable:
                raise
            log.warning("skipping an unreadable file: %s", err)
            continue
        if info is not None and (prefix is None or info.prefix == prefix):
            infos.append(info)
    if not include_classic:
        infos = [info for info in infos if not info.is_classic]
    return sorted(infos, key=_order)


def runs_in(infos: Iterable[SnapshotInfo]) -> dict[tuple[str, str | None], list[SnapshotInfo]]:
    """The snapshots of each training run, by (prefix, run id), in the given order.

    Snapshots written before runs had an id have run id None; they cannot be told
    apart, so they count as one run, and as part of any run of their prefix that has an id
    (a run resumed from them).
    """
    runs: dict[tuple[str, str | None], list[SnapshotInfo]] = {}
    for info in infos:
        runs.setdefault((info.prefix, info.run_id), []).append(info)
    return runs


def mixed_runs(infos: Iterable[SnapshotInfo]) -> str | None:
    """How ``infos`` mix snapshots of different training runs of one prefix, in one line; None if they do not.

    Only run ids tell runs apart: snapshots without one (older versions) never
    count as another run (see :func:`runs_in`).

    >>> mixed_runs([])
    """
    by_prefix: dict[str, list[tuple[str, list[SnapshotInfo]]]] = {}
    for (prefix, run_id), members in runs_in(infos).items():
        if run_id is not None:
            by_prefix.setdefault(prefix, []).append((run_id, members))
    for runs in by_prefix.values():
        if len(runs) > 1:
            a, b = runs[0][1][0], runs[1][1][0]
            counts = ", ".join(f"run {run_id[:8]}: {len(members)}" for run_id, members in runs)
            return (
                f"mixes {len(runs)} training runs, e.g. {a.path.name} and {b.path.name} (snapshots per run: {counts})"
            )
    return None
