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

__all__ = [
    "TMP_SUFFIX",
    "atomic_path",
    "named_as",
    "read_header",
    "temporary_name",
    "write_atomic",
    "write_safetensors",
]

TMP_SUFFIX = ".tmp"


#: Bits per element of every dtype the safetensors format defines (``Dtype::bitsize`` in
#: safetensors/src/tensor.rs of huggingface/safetensors; F4 and F6 pack below a byte), so that the
#: byte span of any tensor can be checked, even in a file that is not a snapshot.
_SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}  # fmt: skip
# The largest header read, as safetensors refuses bigger ones (MAX_HEADER_SIZE in safetensors/src/tensor.rs).
_MAX_HEADER_BYTES = 100_000_000


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_metadata(meta: object) -> str | None:
    """What is wrong with a ``__metadata__`` entry, or None: it must map strings to strings."""
    if not isinstance(meta, dict):
        return f"__metadata__ is a {type(meta).__name__}, not an object of strings"
    for key, value in meta.items():
        if not isinstance(value, str):
            return f"__metadata__[{key!r}] is {value!r}, not a string"
    return None


def _check_entry(name: str, entry: object) -> str | None:
    """What is wrong with one tensor's entry on its own, or None."""
    if not isinstance(entry, dict):
        return f"tensor {name!r} is {entry!r}, not an object with dtype, shape and data_offsets"
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        return f"tensor {name!r} lacks {missing[0]!r}"
    dtype, shape, span = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_BITS:
        return f"tensor {name!r} has dtype {dtype!r}, not one of {', '.join(_SAFETENSORS_BITS)}"
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        return f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers"
    if not isinstance(span, list) or len(span) != 2 or not all(_is_count(n) for n in span) or span[0] > span[1]:
        return f"tensor {name!r} has data_offsets {span!r}, not [start, end] with 0 <= start <= end"
    count = 1
    for n in shape:
        count *= n
    bits = count * _SAFETENSORS_BITS[dtype]
    if bits % 8 or span[1] - span[0] != bits // 8:
        return (
            f"tensor {name!r} has data_offsets {span!r} ({span[1] - span[0]} bytes), but {count} elements "
            f"of {dtype} (shape {shape}) take {bits / 8:g}"
        )
    return None


def _check_spans(table: Mapping[str, Mapping[str, Any]]) -> str | None:
    """What is wrong with the tensors' byte spans together, or None: in order of offset, each starts where
    the previous one ends, from 0, so that they tile the data section without gap or overlap (as
    ``Metadata::validate`` in safetensors/src/tensor.rs requires)."""
    end, previous = 0, None
    for name, entry in sorted(table.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        start, stop = entry["data_offsets"]
        if start != end:
            relation = "overlaps" if start < end else "leaves a gap after"
            where = f"tensor {previous!r} (which ends at {end})" if previous is not None else "the data start (0)"
            return f"tensor {name!r} starts at byte {start}: it {relation} {where}"
        end, previous = stop, name
    return None


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Metadata and tensor table (dtype, shape, offsets) of a safetensors file, checked as safetensors checks it.

    Each table entry gains ``"offset"``, the absolute position of its data in the file.

    Reads only the header, and validates it the way the safetensors library
    does (``Metadata::validate`` in safetensors/src/tensor.rs of huggingface/safetensors):
    the header is a JSON object; ``__metadata__``, when present, maps strings to
    strings; every other entry is an object with a known ``dtype``, a ``shape``
    of non-negative integers and ``data_offsets`` ``[start, end]`` spanning
    exactly ``itemsize * prod(shape)`` bytes; in order of offset the spans tile
    the data section from its start without gap or overlap, and end where the file ends.

    Raises:
        SnapshotError: naming the file and the faulty field, when the header is
            malformed, or the file is shorter or longer than the header says (a truncated write).
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
            if header_len > _MAX_HEADER_BYTES:
                raise SnapshotError(
                    f"{path}: not a safetensors file (a header of {header_len} bytes; at most {_MAX_HEADER_BYTES})"
                )
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SnapshotError(f"{path}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        problem: str | None = f"the header is a JSON {type(header).__name__}, not an object"
    else:
        # A null __metadata__ is no metadata, as in safetensors (an optional field).
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        problem = _check_metadata(meta)
        problem = problem or next(filter(None, (_check_entry(name, t) for name, t in header.items())), None)
        problem = problem or _check_spans(header)
    if problem is not None:
        raise SnapshotError(f"{path}: malformed safetensors header: {problem}")
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + end != size:
        raise SnapshotError(
            f"{path}: truncated or corrupt: the header describes {8 + header_len + end} bytes, the file has {size}"
        )
    for t in header.values():
        t["offset"] = 8 + header_len + t["data_offsets"][0]
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
def named_as(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block under ``path``: the file asked for, not its temporary name."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None


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
