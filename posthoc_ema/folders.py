"""Diagnosis of a snapshot folder: what it holds, and anything odd about it.

:func:`describe` reads only the headers of the files and returns a
JSON-ready summary, which ``posthoc-ema info`` prints: steps, sigma_rels,
sizes, dtypes, a row per snapshot file, and the oddities that make a
synthesis from the folder doubtful (corrupt or leftover files, mixed runs or
settings, irregular spacing, missing sigma_rels).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from posthoc_ema import schedules
from posthoc_ema.distributed import group_shards
from posthoc_ema.dtypes import FLOATING_DTYPES
from posthoc_ema.errors import SnapshotError
from posthoc_ema.files import TMP_SUFFIX
from posthoc_ema.snapshots import DEFAULT_PREFIX, SUFFIX, SnapshotInfo, read_info

__all__ = ["describe"]


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _spec(info: SnapshotInfo) -> str:
    """A classic snapshot's schedule as a one-line spec, or its metadata JSON when this version cannot read it."""
    try:
        return schedules.schedule_spec(schedules.from_metadata(str(info.schedule)))
    except (TypeError, ValueError):
        return str(info.schedule)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def describe(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a snapshot folder, oddities included.

    Only regular ``*.safetensors`` files are read (a FIFO or a folder of that
    name is skipped), and of them only the headers.

    Args:
        folder: a folder written by :class:`~posthoc_ema.PostHocEMA`.

    Returns:
        A dict with ``folder``, ``snapshots`` (count), ``size_bytes``, ``steps``
        (``first``, ``last``, ``count``, ``spacing``; None without readable
        snapshots), ``sigma_rels``, ``dtypes``, ``update_every``,
        ``library_versions`` and ``runs`` (each value: how many snapshots have
        it), ``tensors`` and ``parameters`` of the latest snapshot, ``layout``
        (``{"sharded": False}``, or for the shard files of a sharded model
        ``{"sharded": True, "world_size": [sizes], "complete": n, "incomplete": m}``,
        where a snapshot counts once however many rank files it has), ``classic``
        (only when the folder holds snapshots of classic EMAs,
        ``PostHocEMA(schedules=...)``, which synthesis combines with the
        power-function ones and nothing else here counts:
        ``{snapshots, size_bytes, names: {name: count}, schedules: {name: spec},
        files: [{file, step, name, schedule, dtype, size, run}]}``, the spec
        being :func:`~posthoc_ema.schedules.schedule_spec`'s), ``files``
        (one ``{file, step, sigma_rel, dtype, size, run}`` per snapshot, sorted
        by step then sigma_rel), ``other_files``, ``tmp_files``,
        ``corrupt_files`` and ``oddities`` (one sentence each).

    Raises:
        SnapshotError: if the folder does not exist or holds no snapshot at all.

    Example:
        >>> describe("ckpts")["oddities"]  # doctest: +SKIP
        ['mixes 2 runs: 1f0c... (20), 9a2b... (10)']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SnapshotError(f"{folder}: no such snapshot folder")
    snapshots: list[SnapshotInfo] = []
    corrupt: list[dict[str, str]] = []
    others: list[str] = []
    classic: list[SnapshotInfo] = []  # of classic schedules: counted apart (their own names, no sigma_rel)
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        if not path.is_file():  # a FIFO would block the read, a folder cannot be read
            continue
        try:
            info = read_info(path)
        except SnapshotError as err:
            corrupt.append({"file": path.name, "error": _one_line(err)})
            continue
        if info is None:
            others.append(path.name)
        elif info.is_classic:
            classic.append(info)
        else:
            snapshots.append(info)
    if not snapshots and not classic and not corrupt:
        raise SnapshotError(f"{folder}: no snapshots (no .safetensors file with posthoc-ema snapshot metadata)")
    # A sharded model's snapshot is a set of rank files: counted once, its sizes summed.
    worlds = sorted({i.shard.world_size for i in snapshots if i.shard is not None})
    snapshots, incomplete = group_shards(snapshots)
    classic, incomplete_classic = group_shards(classic)
    sharding: dict[str, Any] = {"sharded": False}
    if worlds:
        sharding = {
            "sharded": True,
            "world_size": worlds,
            "complete": sum(1 for i in snapshots if i.shards),
            "incomplete": len(incomplete),
        }
    snapshots.sort(key=lambda i: (i.step, i.sigma_rel))
    tmp_files = sorted(p.name for p in folder.glob(f"*{TMP_SUFFIX}"))
    oddities = [c["error"] for c in corrupt] + incomplete + incomplete_classic
    if tmp_files:
        oddities.append(
            f"{len(tmp_files)} leftover temporary file(s) from interrupted writes (safe to delete): "
            + ", ".join(tmp_files[:5])
            + (", ..." if len(tmp_files) > 5 else "")
        )
    sizes = {i.path: sum(s.path.stat().st_size for s in i.shards or (i,)) for i in snapshots}
    summary: dict[str, Any] = {
        "folder": str(folder),
        "snapshots": len(snapshots),
        "size_bytes": sum(sizes.values()),
        "steps": None,
        "sigma_rels": {},
        "dtypes": {},
        "update_every": {},
        "library_versions": {},
        "runs": {},
        "tensors": 0,
        "parameters": 0,
        "layout": sharding,
        "files": [
            {
                "file": i.path.name,
                "step": i.step,
                "sigma_rel": i.sigma_rel,
                "dtype": i.dtype,
                "size": sizes[i.path],
                "run": i.run_id,
            }
            for i in snapshots
        ],
        "other_files": others,
        "tmp_files": tmp_files,
        "corrupt_files": corrupt,
        "oddities": oddities,
    }
    if classic:
        classic.sort(key=lambda i: (i.step, str(i.name)))
        classic_sizes = {i.path: sum(s.path.stat().st_size for s in i.shards or (i,)) for i in classic}
        summary["classic"] = {
            "snapshots": len(classic),
            "size_bytes": sum(classic_sizes.values()),
            "names": dict(sorted(Counter(str(i.name) for i in classic).items())),
            "schedules": {str(i.name): _spec(i) for i in sorted(classic, key=lambda i: str(i.name))},
            "files": [
                {
                    "file": i.path.name,
                    "step": i.step,
                    "name": i.name,
                    "schedule": _spec(i),
                    "dtype": i.dtype,
                    "size": classic_sizes[i.path],
                    "run": i.run_id,
                }
                for i in classic
            ],
        }
    if not snapshots:
        return summary
    runs = Counter(i.run_id for i in snapshots if i.run_id is not None)
    summary["runs"] = dict(sorted(runs.items()))
    # Runs are told apart within a prefix: trackers of different prefixes (a GAN's
    # generator and discriminator) share a folder by design.
    for prefix in sorted({i.prefix for i in snapshots}):
        of_prefix = Counter(i.run_id for i in snapshots if i.prefix == prefix and i.run_id is not None)
        if len(of_prefix) > 1:
            listed = ", ".join(f"{run} ({n})" for run, n in sorted(of_prefix.items()))
            where = "" if prefix == DEFAULT_PREFIX else f" of prefix {prefix!r}"
            oddities.append(f"mixes {len(of_prefix)} runs{where}: {listed}")
    steps = sorted({i.step for i in snapshots})
    gaps = Counter(b - a for a, b in itertools.pairwise(steps))
    spacing = gaps.most_common(1)[0][0] if gaps else None
    summary["steps"] = {"first": steps[0], "last": steps[-1], "count": len(steps), "spacing": spacing}
    by_sigma = Counter(i.sigma_rel for i in snapshots)
    summary["sigma_rels"] = {repr(s): n for s, n in sorted(by_sigma.items())}
    attributes = (("dtypes", "dtype"), ("update_every", "update_every"), ("library_versions", "library_version"))
    for key, attribute in attributes:
        counts = Counter(str(getattr(i, attribute)) for i in snapshots)
        summary[key] = dict(sorted(counts.items()))
        if len(counts) > 1:
            listed = ", ".join(f"{value} ({n})" for value, n in sorted(counts.items()))
            oddities.append(f"mixed {attribute.replace('_', ' ')}: {listed}")
    latest = snapshots[-1]
    summary["tensors"] = len(latest.tensors)
    summary["parameters"] = sum(math.prod(shape) for dt, shape in latest.tensors.values() if dt in FLOATING_DTYPES)
    odd_gaps = [(a, b) for a, b in itertools.pairwise(steps) if b - a != spacing]
    if odd_gaps:
        shown = ", ".join(f"{a}->{b}" for a, b in odd_gaps[:3]) + (", ..." if len(odd_gaps) > 3 else "")
        oddities.append(f"irregular spacing: {len(odd_gaps)} of {len(steps) - 1} gaps differ from {spacing} ({shown})")
    at_step: dict[int, list[SnapshotInfo]] = {}
    for info in snapshots:
        at_step.setdefault(info.step, []).append(info)
    missing = [(s, sorted(set(by_sigma) - {i.sigma_rel for i in infos})) for s, infos in at_step.items()]
    missing = [(s, m) for s, m in missing if m]
    for s, lacking in missing[:5]:
        oddities.append(f"step {s} lacks sigma_rel {', '.join(map(_fmt, lacking))}")
    if len(missing) > 5:
        oddities.append(f"... {len(missing) - 5} more steps lack a sigma_rel")
    for (s, sigma), n in sorted(Counter((i.step, i.sigma_rel) for i in snapshots).items()):
        if n > 1:
            oddities.append(f"step {s}, sigma_rel {_fmt(sigma)} has {n} snapshots: is the folder mixing two runs?")
    layout = {k: shape for k, (_, shape) in latest.tensors.items()}
    differ = [i.path.name for i in snapshots if {k: shape for k, (_, shape) in i.tensors.items()} != layout]
    if differ:
        oddities.append(
            f"{len(differ)} snapshot(s) hold other tensor names or shapes than the latest, e.g. {differ[0]}"
        )
    return summary
