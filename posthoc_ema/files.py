"""Safetensors files on disk: reading a header checked against the file, and atomic, deterministic writes.

Writes are atomic: the bytes go to a temporary file beside the target (a name
no other writer uses), are fsynced through the handle that wrote them, and the
file is renamed into place with ``os.replace`` (then the folder
is fsynced), so a crash never leaves a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from posthoc_ema.dtypes import SAFETENSORS_DTYPES
from posthoc_ema.errors import SnapshotError

__all__ = ["TMP_SUFFIX", "atomic_path", "read_header", "temporary_name", "write_atomic", "write_safetensors"]

TMP_SUFFIX = ".tmp"


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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders (Windows does not)
        return
    try:
        os.fsync(fd)
    except OSError:  # nor fsyncs them
        pass
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """A temporary name beside ``path`` that no other writer uses: ``<name>.<pid>-<random>.tmp``.

    Two writers of the same file (two processes, or two threads) never share a
    temporary file, so neither can rename the other's half-written bytes into place.
    """
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` whole, durably.

    The file written to the temporary path (see :func:`temporary_name`) is
    fsynced, renamed over ``path`` with ``os.replace`` and the folder fsynced,
    so ``path`` holds either its old content or the complete new one, even after
    a crash or power loss. On an error the temporary file is removed.

    Args:
        path: the file to replace.
        fsync: fsync the temporary file after the block, through a read-write
            handle (Windows refuses to fsync a read-only one). Pass False when
            the block fsyncs the handle it wrote with, as
            :func:`write_safetensors` does.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "r+b") as f:
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
    floating before others, then name; metadata is sorted. The file is fsynced
    before it is closed. Writes the file in place: use :func:`write_atomic` for
    a file others may read.

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
        # The handle that wrote is the one to fsync: Windows cannot fsync a read-only one.
        f.flush()
        os.fsync(f.fileno())


def write_atomic(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file so that it appears whole under ``path`` or not at all (see :func:`atomic_path`).

    Raises:
        OSError: if writing fails; the temporary file is removed.
        ValueError: for a tensor of a dtype snapshots do not store.
    """
    with atomic_path(path, fsync=False) as tmp:  # write_safetensors fsyncs its own handle
        write_safetensors(tensors, tmp, metadata)
