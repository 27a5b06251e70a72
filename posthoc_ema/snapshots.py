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
    "SnapshotInfo",
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
#: classic schedule (no sigma_rel) version 2, so an older reader asks for an upgrade.
FORMAT_VERSION = 2
_CLASSIC_VERSION = 2
SUFFIX = ".safetensors"
#: The prefix of snapshots written without ``prefix=``, and of files whose metadata has none.
DEFAULT_PREFIX = "phema"
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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


def snapshot_name(step: int, sigma_rel: float | str, prefix: str = DEFAULT_PREFIX) -> str:
    """File name of the snapshot of ``sigma_rel`` (or of the classic EMA named so, a str) at ``step``; sorts by step.

    The name only keeps files apart: readers take step, sigma_rel and prefix from the metadata.

    >>> snapshot_name(1000, 0.05), snapshot_name(1000, "timm")
    ('phema-000000001000-0.05.safetensors', 'phema-000000001000-timm.safetensors')
    """
    label = sigma_rel if isinstance(sigma_rel, str) else repr(canonical_sigma_rel(sigma_rel))
    return f"{prefix}-{step:012d}-{label}{SUFFIX}"


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


def _order(info: SnapshotInfo) -> tuple[int, bool, float, str]:
    """Sort key: by step, the power-function snapshots first by sigma_rel, then the classic ones by name."""
    return (info.step, info.is_classic, 0.0 if info.is_classic else info.sigma_rel, info.name or "")


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
    are ignored.

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
