"""The snapshot format: naming, self-describing metadata, listing.

A snapshot is a safetensors file holding one EMA at one step. Everything that
gives it meaning lives in its metadata (see :data:`FORMAT` and
:class:`SnapshotInfo`); file names only keep files apart and sorted. The bytes
are written atomically by :mod:`posthoc_ema.files`; listing skips their
temporary files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
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

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUFFIX",
    "SYNTHESIZED_FORMAT",
    "SnapshotInfo",
    "list_snapshots",
    "read_info",
    "snapshot_name",
]

#: The metadata value ``format`` of a snapshot written by this library.
FORMAT = "posthoc-ema/snapshot"
#: The metadata value ``format`` of a file synthesized from snapshots.
SYNTHESIZED_FORMAT = "posthoc-ema/synthesized"
#: Bumped on any change a reader of an older version could misread.
FORMAT_VERSION = 1
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot's metadata says about it.

    Attributes:
        path: the file.
        step: the training time at which the EMA was taken.
        sigma_rel: relative width of the EMA's profile.
        gamma: its exponent (EDM2 eq. 126); redundant with sigma_rel, stored to be explicit.
        dtype: name of the dtype floating tensors were stored in.
        update_every: how many ``update()`` calls there were per EMA update.
        library_version: version of posthoc-ema that wrote the file.
        run_id: identity of the training run that wrote it; None in files written before runs had one.
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
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict, compare=False, repr=False)
    offsets: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata that describes this snapshot."""
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "step": str(self.step),
            "sigma_rel": repr(self.sigma_rel),
            "gamma": repr(self.gamma),
            "dtype": self.dtype,
            "update_every": str(self.update_every),
            "library_version": self.library_version,
        } | ({} if self.run_id is None else {"run_id": self.run_id})


def snapshot_name(step: int, sigma_rel: float) -> str:
    """File name of the snapshot of ``sigma_rel`` at ``step``; sorts by step.

    The name only keeps files apart: readers take step and sigma_rel from the metadata.
    """
    return f"phema-{step:012d}-{canonical_sigma_rel(sigma_rel)!r}{SUFFIX}"


def _info_from_header(path: Path, meta: Mapping[str, str], table: Mapping[str, Mapping[str, Any]]) -> SnapshotInfo:
    try:
        version = int(meta["format_version"])
        if version > FORMAT_VERSION:
            raise SnapshotError(
                f"{path}: snapshot format version {version} is newer than this posthoc-ema "
                f"reads ({FORMAT_VERSION}); upgrade posthoc-ema"
            )
        info = SnapshotInfo(
            path=path,
            step=int(meta["step"]),
            sigma_rel=float(meta["sigma_rel"]),
            gamma=float(meta["gamma"]),
            dtype=meta["dtype"],
            update_every=int(meta["update_every"]),
            library_version=meta["library_version"],
            run_id=meta.get("run_id"),
            tensors={name: (str(t["dtype"]), tuple(int(n) for n in t["shape"])) for name, t in table.items()},
            offsets={name: int(t["offset"]) for name, t in table.items()},
        )
    except KeyError as err:
        raise SnapshotError(f"{path}: snapshot metadata lacks the key {err.args[0]!r}") from None
    except ValueError as err:
        if isinstance(err, SnapshotError):
            raise
        raise SnapshotError(f"{path}: snapshot metadata has a malformed value ({err})") from None
    for name, value, allowed in (
        ("step", info.step, info.step > 0),
        ("sigma_rel", info.sigma_rel, 0 < info.sigma_rel < MAX_SIGMA_REL),
        ("gamma", info.gamma, 0 < info.gamma < math.inf),
    ):
        if not allowed:
            raise SnapshotError(
                f"{path}: snapshot metadata has {name}={value!r}; step must be > 0, "
                f"sigma_rel in (0, {MAX_SIGMA_REL:.4f}) and gamma in (0, inf)"
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


def list_snapshots(snapshot_dir: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Every snapshot in a folder, sorted by (step, sigma_rel).

    Files other than ``*.safetensors``, temporary files, safetensors files that
    are not snapshots and anything that is not a regular file (a FIFO, a folder)
    are ignored.

    Raises:
        SnapshotError: if the folder does not exist, or a snapshot is corrupt.
    """
    folder = Path(snapshot_dir)
    if not folder.is_dir():
        raise SnapshotError(f"{folder}: no such snapshot folder")
    # Only regular files: reading a FIFO named *.safetensors would block.
    infos = [info for p in sorted(folder.glob(f"*{SUFFIX}")) if p.is_file() and (info := read_info(p)) is not None]
    return sorted(infos, key=lambda i: (i.step, i.sigma_rel))
