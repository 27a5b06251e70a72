"""Sharded outputs in the Hugging Face layout, and synthesis one shard at a time.

A synthesized EMA can be written as a folder of ``model-00001-of-0000N.safetensors``
files plus ``model.safetensors.index.json``, the layout of huggingface_hub's
``save_torch_state_dict`` (huggingface/huggingface_hub,
``src/huggingface_hub/serialization/_torch.py``), which ``transformers``'
``load_sharded_checkpoint`` and ``accelerate`` read:

- tensors are assigned to shards in order, a new shard starting when the next
  tensor would take the current one past ``max_shard_size``; a tensor larger
  than ``max_shard_size`` gets a shard of its own (the rule of
  ``split_state_dict_into_shards_factory`` in ``serialization/_base.py``);
- each shard's safetensors metadata has ``format = "pt"`` (transformers refuses
  other values), plus this library's description of the EMA;
- the index holds ``metadata.total_size`` (bytes of tensor data) and a
  ``weight_map`` from each tensor name to its file; with a single shard the
  output is one ``model.safetensors`` and no index, as huggingface_hub does.

:func:`synthesize_sharded` builds the outputs one shard at a time: each shard's
tensors are synthesized by :func:`posthoc_ema.synthesis.run` restricted to them,
written, and freed before the next, so peak memory is about
``n_targets x max_shard_size`` (in float32) however large the model.

Every file is written atomically; an existing index is removed first and the new
one written last, so a folder with an index is complete. To load the shards of a
plain model (three lines)::

    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    model.load_state_dict({k: v for f in files for k, v in load_file(Path(folder, f)).items()}, strict=True)
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from posthoc_ema.dtypes import FLOATING_DTYPES, ITEMSIZE, dtype_name, parse_dtype
from posthoc_ema.errors import SnapshotError
from posthoc_ema.files import atomic_path, write_atomic
from posthoc_ema.snapshots import SYNTHESIZED_FORMAT
from posthoc_ema.synthesis import Plan, StateDict, run

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "existing_model_file",
    "load_sharded",
    "parse_size",
    "save_sharded",
    "shard_names",
    "split_into_shards",
    "synthesize_sharded",
]

#: The index file of a sharded output.
INDEX_NAME = "model.safetensors.index.json"
#: The one file of an output that fits in a single shard.
SINGLE_NAME = "model.safetensors"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# huggingface_hub's units: powers of 1000 (KB, MB, GB, TB) and of 1024 (KiB, ...).
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str) -> int:
    """A size in bytes from an int or a text such as ``"2GB"`` (10**9 bytes) or ``"512MiB"``.

    Units are those of huggingface_hub: B, KB, MB, GB, TB (powers of 1000) and
    KiB, MiB, GiB, TiB (powers of 1024), in any case; a bare number is bytes.

    Raises:
        ValueError: for a malformed size or one that is not positive.

    Example:
        >>> parse_size("2GB"), parse_size("1.5KiB"), parse_size(100)
        (2000000000, 1536, 100)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"size={size!r} is not a number of bytes or a text such as '2GB'")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.fullmatch(size)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in {*_UNITS, ""}:
            raise ValueError(
                f"size={size!r} is not a size such as '2GB', '500MB' or '1GiB' "
                "(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        value = math.floor(float(match.group(1)) * _UNITS.get(unit, 1))
    if value <= 0:
        raise ValueError(f"size={size!r} must be positive")
    return value


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards: ``["model.safetensors"]`` for one, else ``model-0000k-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def split_into_shards(sizes: Mapping[str, int], max_shard_size: int | str) -> list[list[str]]:
    """Group tensor names into shards, in order, as huggingface_hub's ``split_torch_state_dict_into_shards`` does.

    Args:
        sizes: bytes of each tensor, in the order they are to be stored.
        max_shard_size: most bytes per shard (see :func:`parse_size`); a larger
            tensor gets a shard of its own.

    Returns:
        The names in each shard; the shards in file order.

    Example:
        >>> split_into_shards({"a": 6, "b": 6, "c": 2, "d": 20, "e": 2}, 10)
        [['a'], ['d'], ['b', 'c', 'e']]
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes.items():
        if size > limit:
            shards.append([name])
            continue
        if current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards or [[]]


def _metadata(the_plan: Plan, index: int, dtype: torch.dtype) -> dict[str, str]:
    """The plan's description of target ``index`` (its ``format`` is ``posthoc-ema/synthesized``)."""
    return the_plan.metadata(index) | {"dtype": dtype_name(dtype)}


def _shard_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    """A shard's metadata: ``format`` is ``"pt"``, which transformers requires; ours moves to ``posthoc_ema_format``."""
    return {**meta, "format": "pt", "posthoc_ema_format": SYNTHESIZED_FORMAT}


def existing_model_file(folder: str | os.PathLike[str]) -> Path | None:
    """A file of ``folder`` that a sharded output would replace (index, single file or a shard); None if none.

    Example:
        >>> existing_model_file("ema-0.1")  # doctest: +SKIP
        PosixPath('ema-0.1/model-00001-of-00003.safetensors')
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name in (INDEX_NAME, SINGLE_NAME):
        if (folder / name).exists():
            return folder / name
    return next((p for p in sorted(folder.iterdir()) if _SHARD_NAME.fullmatch(p.name)), None)


def _check_folder(folder: Path, the_plan: Plan, *, overwrite: bool) -> None:
    """Refuse a file, the snapshot folder or a folder in it, and (unless ``overwrite``) a folder holding a model."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; a sharded output is a folder")
    snapshot_folders = {s.path.parent.resolve() for s in the_plan.snapshots}
    if folder.resolve() in snapshot_folders or folder.resolve().parent in snapshot_folders:
        raise ValueError(f"{folder} is the snapshot folder or in it; write shards elsewhere")
    existing = existing_model_file(folder)
    if existing is not None and not overwrite:
        raise FileExistsError(errno.EEXIST, "the file exists; pass overwrite=True to replace it", str(existing))


def _prepare(folder: Path) -> None:
    """Make ``folder`` and remove its index and single file, so no loader sees a half-written output."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; a sharded output is a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (INDEX_NAME, SINGLE_NAME):
        (folder / name).unlink(missing_ok=True)


def _finish(
    folder: Path, names: Sequence[str], weight_map: Mapping[str, str], meta: Mapping[str, str], total: int
) -> Path:
    """Write the index last (when there are several shards) and remove shards of an earlier, different split."""
    for path in folder.iterdir():
        if _SHARD_NAME.fullmatch(path.name) and path.name not in names:
            path.unlink()
    if len(names) == 1:
        return folder / names[0]
    index = {"metadata": {"total_size": total, **meta}, "weight_map": dict(sorted(weight_map.items()))}
    with atomic_path(folder / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return folder / INDEX_NAME


def save_sharded(
    folder: str | os.PathLike[str],
    state_dict: StateDict,
    the_plan: Plan,
    index: int,
    *,
    max_shard_size: int | str,
    overwrite: bool = False,
) -> Path:
    """Write target ``index`` of a plan as a sharded folder in the Hugging Face layout.

    Tensors go to shards in the order of ``state_dict``.

    Args:
        folder: the output folder (created if missing).
        state_dict: the synthesized tensors, as from :func:`~posthoc_ema.synthesis.run`.
        the_plan: the plan they come from.
        index: which of its targets they are.
        max_shard_size: most bytes per shard, e.g. ``"2GB"`` (see :func:`parse_size`).
        overwrite: replace a model already in ``folder`` (its index, ``model.safetensors``
            or ``model-XXXXX-of-XXXXX.safetensors`` shards); by default it is refused.

    Returns:
        The index file, or ``model.safetensors`` when everything fits in one shard.

    Raises:
        ValueError: for a bad ``max_shard_size``, a ``folder`` that is a file, or the
            snapshot folder (or a folder in it).
        FileExistsError: if ``folder`` holds a model and ``overwrite`` is false.

    Example:
        >>> save_sharded("ema-0.1", sds[0.1], the_plan, 0, max_shard_size="2GB")  # doctest: +SKIP
        PosixPath('ema-0.1/model.safetensors.index.json')
    """
    out = Path(folder)
    _check_folder(out, the_plan, overwrite=overwrite)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state_dict.items()}
    groups = split_into_shards({k: t.numel() * t.element_size() for k, t in tensors.items()}, max_shard_size)
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    meta = _metadata(the_plan, index, dtype)
    _prepare(out)
    names = shard_names(len(groups))
    for name, group in zip(names, groups, strict=True):
        write_atomic(out / name, {k: tensors[k] for k in group}, _shard_metadata(meta))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return _finish(out, names, {k: n for n, g in zip(names, groups, strict=True) for k in g}, meta, total)


def _restricted(the_plan: Plan, names: Sequence[str]) -> Plan:
    """The plan with every snapshot seen as holding only the tensors ``names``: run() then builds just those."""
    keep = set(names)
    snapshots = tuple(
        replace(
            info,
            tensors={k: v for k, v in info.tensors.items() if k in keep},
            offsets={k: v for k, v in info.offsets.items() if k in keep},
        )
        for info in the_plan.snapshots
    )
    return replace(the_plan, snapshots=snapshots)


def synthesize_sharded(
    the_plan: Plan,
    folders: Sequence[str | os.PathLike[str]],
    *,
    max_shard_size: int | str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Synthesize every target of a plan into its own sharded folder, one shard at a time.

    Tensors are taken in the order they lie in the latest snapshot and split as
    :func:`split_into_shards` does, by their size in the output ``dtype``. For
    each shard, its tensors are synthesized for all targets in one streaming
    pass over the snapshots (:func:`~posthoc_ema.synthesis.run`), written, and
    freed; the indexes are written last. Peak memory is about ``n_targets x
    max(max_shard_size, largest tensor)`` in float32, plus the reader's buffers.

    Args:
        the_plan: a plan from :func:`~posthoc_ema.synthesis.plan`.
        folders: one output folder per target, in the plan's order.
        max_shard_size: most bytes per shard, e.g. ``"2GB"`` (see :func:`parse_size`).
        device: where to accumulate; default CPU.
        dtype: dtype of the floating tensors written.
        progress: called with (work done, total work) as the passes go on.
        overwrite: replace models already in the folders (see :func:`save_sharded`);
            by default a folder holding one is refused before any work.

    Returns:
        Each target's index file (or ``model.safetensors`` if one shard holds it all).

    Raises:
        ValueError: for a bad ``max_shard_size`` or ``dtype``, a number of folders
            other than the number of targets, a folder that is a file, or the
            snapshot folder (or a folder in it).
        FileExistsError: if a folder holds a model and ``overwrite`` is false.
        SnapshotError: for a snapshot that cannot be read.

    Example:
        >>> p = plan("ckpts", [0.05, 0.15])  # doctest: +SKIP
        >>> synthesize_sharded(p, ["ema-0.05", "ema-0.15"], max_shard_size="2GB")  # doctest: +SKIP
    """
    out_dtype = parse_dtype(dtype)
    outs = [Path(f) for f in folders]
    if len(outs) != len(the_plan.sigma_rels):
        raise ValueError(f"{len(outs)} output folders for {len(the_plan.sigma_rels)} targets; give one per target")
    for folder in outs:
        _check_folder(folder, the_plan, overwrite=overwrite)
    latest = the_plan.snapshots[-1]
    order = sorted(latest.tensors, key=latest.offsets.__getitem__)

    def size(name: str) -> int:
        st_dtype, shape = latest.tensors[name]
        width = out_dtype.itemsize if st_dtype in FLOATING_DTYPES else ITEMSIZE[st_dtype]
        return math.prod(shape) * width

    groups = split_into_shards({k: size(k) for k in order}, max_shard_size)
    names = shard_names(len(groups))
    metas = [_metadata(the_plan, j, out_dtype) for j in range(len(outs))]
    for folder in outs:
        _prepare(folder)

    def elements(group: Sequence[str]) -> int:
        return sum(math.prod(latest.tensors[k][1]) for k in group if latest.tensors[k][0] in FLOATING_DTYPES)

    work, base = sum(map(elements, groups)) * len(the_plan.snapshots), 0
    for name, group in zip(names, groups, strict=True):
        report = None if progress is None else (lambda done, _total, base=base: progress(base + done, work))
        built = run(_restricted(the_plan, group), device=device, dtype=out_dtype, progress=report)
        for j, target in enumerate(the_plan.sigma_rels):
            write_atomic(outs[j] / name, built[target], _shard_metadata(metas[j]))
        del built  # free this shard's outputs before the next shard is built
        base += elements(group) * len(the_plan.snapshots)
    weight_map = {k: n for n, g in zip(names, groups, strict=True) for k in g}
    total = sum(size(k) for k in order)
    return [_finish(folder, names, weight_map, meta, total) for folder, meta in zip(outs, metas, strict=True)]


def load_sharded(path: str | os.PathLike[str], *, device: str = "cpu") -> StateDict:
    """Every tensor of an output: one safetensors file, or a folder with an index or a ``model.safetensors``.

    Raises:
        SnapshotError: for a folder with neither an index nor ``model.safetensors``,
            or an index that names a missing file.

    Example:
        >>> model.load_state_dict(load_sharded("ema-0.1"), strict=True)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_dir():
        return load_file(path, device=device)
    index_path = path / INDEX_NAME
    if not index_path.exists():
        if (path / SINGLE_NAME).exists():
            return load_file(path / SINGLE_NAME, device=device)
        raise SnapshotError(f"{path}: neither {INDEX_NAME} nor {SINGLE_NAME}; is this a sharded output?")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"{index_path}: unreadable index ({err})") from None
    result: StateDict = {}
    for name in sorted(set(weight_map.values())):
        if not (path / name).exists():
            raise SnapshotError(f"{index_path} names {name}, which is missing from {path}")
        result.update(load_file(path / name, device=device))
    return result
