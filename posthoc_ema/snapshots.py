"""Snapshot files: naming, self-describing metadata, atomic writes, listing.

A snapshot is a safetensors file holding one EMA at one step. Everything that
gives it meaning lives in its metadata (see :data:`FORMAT` and
:class:`SnapshotInfo`); file names only keep files apart and sorted.

Writes are atomic: the bytes go to ``<name>.tmp``, are fsynced, and the file is
renamed into place with ``os.replace`` (then the folder is fsynced), so a crash
never leaves a partial file under a final name. Listing skips ``*.tmp``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posthoc_ema.profiles import MAX_SIGMA_REL

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SYNTHESIZED_FORMAT",
    "BackgroundWriter",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotWriteError",
    "atomic_path",
    "list_snapshots",
    "read_info",
    "snapshot_name",
    "write_atomic",
    "write_safetensors",
]

log = logging.getLogger(__name__)

#: The metadata value ``format`` of a snapshot written by this library.
FORMAT = "posthoc-ema/snapshot"
#: The metadata value ``format`` of a file synthesized from snapshots.
SYNTHESIZED_FORMAT = "posthoc-ema/synthesized"
#: Bumped on any change a reader of an older version could misread.
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"

#: The safetensors name of each torch dtype a snapshot may hold.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
#: Safetensors names of floating dtypes (the tensors that are averaged) and their torch dtypes.
FLOATING_DTYPES: dict[str, torch.dtype] = {n: t for t, n in SAFETENSORS_DTYPES.items() if t.is_floating_point}
#: Bytes per element of each safetensors dtype.
ITEMSIZE: dict[str, int] = {n: t.itemsize for t, n in SAFETENSORS_DTYPES.items()}

#: Floating dtypes by the names the API and CLI accept.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class SnapshotError(ValueError):
    """A snapshot folder or file that cannot be used, with the file and the reason."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A floating dtype from its name (``"bfloat16"``) or itself."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")


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
        }


def snapshot_name(step: int, sigma_rel: float) -> str:
    """File name of the snapshot of ``sigma_rel`` at ``step``; sorts by step.

    The name only keeps files apart: readers take step and sigma_rel from the metadata.
    """
    return f"phema-{step:012d}-{sigma_rel:.6g}{SUFFIX}"


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


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Metadata and tensor table (dtype, shape, offsets) of a safetensors file, checked against its size.

    Each table entry gains ``"offset"``, the absolute position of its data in the file.

    Reads only the header. Raises :class:`SnapshotError` naming the file when the
    header is malformed or the file is shorter than the header says (a truncated write).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise SnapshotError(f"{path}: not a safetensors file (only {size} bytes)")
            header_len = int.from_bytes(raw, "little")
            if header_len > size - 8:
                raise SnapshotError(
                    f"{path}: truncated or not a safetensors file (header of {header_len} bytes in a file of {size})"
                )
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SnapshotError(f"{path}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"{path}: malformed safetensors header")
    meta = header.pop("__metadata__", None) or {}
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise SnapshotError(f"{path}: malformed safetensors header") from None
    for t in header.values():
        t["offset"] = 8 + header_len + int(t["data_offsets"][0])
    if 8 + header_len + end != size:
        raise SnapshotError(
            f"{path}: truncated or corrupt: the header describes {8 + header_len + end} bytes, the file has {size}"
        )
    return meta, header


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

    Files other than ``*.safetensors``, temporary files and safetensors files that
    are not snapshots are ignored.

    Raises:
        SnapshotError: if the folder does not exist, or a snapshot is corrupt.
    """
    folder = Path(snapshot_dir)
    if not folder.is_dir():
        raise SnapshotError(f"{folder}: no such snapshot folder")
    infos = [info for p in sorted(folder.glob(f"*{SUFFIX}")) if (info := read_info(p)) is not None]
    return sorted(infos, key=lambda i: (i.step, i.sigma_rel))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` whole, durably.

    The file written to ``path + ".tmp"`` is fsynced, renamed over ``path`` with
    ``os.replace`` and the folder fsynced, so ``path`` holds either its old
    content or the complete new one, even after a crash or power loss. On an
    error the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format, the same bytes for the same input.

    Tensors are ordered by element size (widest first, so each is aligned), then
    floating before others, then name; metadata is sorted.
    Writes the file in place: use :func:`write_atomic` for a file others may read.

    Raises:
        ValueError: for a tensor of a dtype snapshots do not store.
    """
    # Widest elements first keeps every tensor aligned; within a width, floating
    # tensors first, so a snapshot's averaged tensors form one run of bytes.
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), not tensors[n].is_floating_point(), n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which snapshots do not store")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def write_atomic(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file so that it appears whole under ``path`` or not at all (see :func:`atomic_path`).

    Raises:
        OSError: if writing fails; the temporary file is removed.
        ValueError: for a tensor of a dtype snapshots do not store.
    """
    with atomic_path(path) as tmp:
        write_safetensors(tensors, tmp, metadata)


class SnapshotWriteError(OSError):
    """A snapshot that could not be written in the background, raised at the next call."""


class BackgroundWriter:
    """Runs write jobs one at a time on a daemon thread.

    ``submit`` blocks when ``max_pending`` jobs wait, so a slow disk slows training
    down instead of filling memory. A failed job does not stop the later ones;
    failures are raised, naming the files and the first cause, by the next
    ``submit``/``check``/``flush``. Pending writes are finished at interpreter exit.
    """

    def __init__(self, max_pending: int = 2) -> None:
        self._jobs: queue.Queue[tuple[Path, Callable[[], None]] | None] = queue.Queue(max_pending)
        self._failed: list[tuple[Path, Exception]] = []
        self._thread = threading.Thread(target=self._run, name="posthoc-ema-writer", daemon=True)
        self._thread.start()
        _writers.add(self)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            path, write = job
            try:
                write()
            except Exception as err:  # kept and raised on the training thread
                self._failed.append((path, err))
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def check(self) -> None:
        """Raise the failures so far, once."""
        if self._failed:
            failed, self._failed = self._failed, []
            (path, cause), more = failed[0], len(failed) - 1
            also = f" (and {more} more: {', '.join(str(p) for p, _ in failed[1:4])}{'...' if more > 3 else ''})"
            raise SnapshotWriteError(f"could not write snapshot {path}: {cause}{also if more else ''}") from cause

    def submit(self, path: Path, write: Callable[[], None]) -> None:
        self.check()
        self._jobs.put((path, write))

    def flush(self) -> None:
        """Wait until every submitted write is on disk; raise if one failed."""
        self._jobs.join()
        self.check()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


@atexit.register
def _finish_pending_writes() -> None:
    for writer in list(_writers):
        try:
            writer.flush()
        except SnapshotWriteError as err:
            log.error("%s", err)
