"""A disk budget for snapshots: keep the ones that reconstruct a sigma_rel range best.

Deleting the oldest or the newest snapshots ruins reconstruction: the last few
snapshots of a long run cover only its end, so a wide EMA can no longer be
built. :func:`plan_retention` instead chooses which snapshot files to keep under
a byte or file budget so that the predicted error (the relative L2 error of
the reconstructed profile, :func:`~posthoc_ema.profiles.reconstruction_error`)
over a range of target sigma_rels at the latest step stays lowest. Narrow
targets keep the recent snapshots dense; the wide end of the range keeps some
old snapshots spread over the run. Nothing is deleted until
:func:`apply_retention` is called with the plan.

The choice is greedy and forward: the snapshots of the latest step are always
kept (they are the exact EMAs at the end of the run), then the file whose
addition lowers the worst (or mean) error over the range most is added, until
the budget is full. Each candidate is scored by orthogonalising its profile
against those already kept, with inner products alone (EDM2 eq. 151, Gram-Schmidt
in the space of profiles), so a choice among hundreds of snapshots takes a
fraction of a second. The errors reported before and after are then computed
exactly, with :func:`~posthoc_ema.profiles.solve_coefficients` as synthesis does.

:func:`estimate` predicts the disk use and the error of a run before it starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from posthoc_ema import profiles
from posthoc_ema.dtypes import parse_dtype
from posthoc_ema.errors import SnapshotError
from posthoc_ema.sharded import parse_size
from posthoc_ema.snapshots import SnapshotInfo

__all__ = [
    "Estimate",
    "RetentionPlan",
    "apply_retention",
    "estimate",
    "plan_retention",
    "predicted_errors",
    "select_snapshots",
    "sigma_rel_grid",
]

FloatArray = npt.NDArray[np.float64]
Objective = Literal["max", "mean"]

#: Points of the sigma_rel grid a range ``(lo, hi)`` is evaluated on.
GRID_POINTS = 25


def sigma_rel_grid(lo: float, hi: float, points: int = GRID_POINTS) -> tuple[float, ...]:
    """``points`` sigma_rels evenly spaced over ``[lo, hi]``, canonical (6 significant digits).

    Raises:
        ValueError: for a range that is empty or outside (0, sqrt(1/12)).

    Example:
        >>> sigma_rel_grid(0.05, 0.25, 5)
        (0.05, 0.1, 0.15, 0.2, 0.25)
    """
    if not 0 < lo <= hi < profiles.MAX_SIGMA_REL:
        raise ValueError(f"the sigma_rel range {lo!r}:{hi!r} must satisfy 0 < lo <= hi < {profiles.MAX_SIGMA_REL:.4f}")
    grid = np.linspace(lo, hi, points if hi > lo else 1)
    return tuple(dict.fromkeys(profiles.canonical_sigma_rel(s) for s in grid))


def predicted_errors(
    steps: npt.ArrayLike, sigma_rels: npt.ArrayLike, out_step: float, targets: npt.ArrayLike
) -> FloatArray:
    """The predicted error of each target at ``out_step`` from the snapshots (steps, sigma_rels), as synthesis has it.

    Example:
        >>> predicted_errors([100, 100], [0.05, 0.10], 100, [0.05]) < 1e-6
        array([ True])
    """
    coef = profiles.solve_coefficients(steps, sigma_rels, out_step, targets)
    return profiles.reconstruction_error(coef, steps, sigma_rels, out_step, targets)


def select_snapshots(
    steps: npt.ArrayLike,
    sigma_rels: npt.ArrayLike,
    targets: Sequence[float],
    *,
    sizes: npt.ArrayLike | None = None,
    max_bytes: int | None = None,
    max_count: int | None = None,
    objective: Objective = "max",
) -> npt.NDArray[np.intp]:
    """Which snapshots to keep under a budget so that the error over ``targets`` at the latest step stays lowest.

    The snapshots of the latest step are always kept; then, greedily, the one whose
    profile lowers the ``objective`` (the max or mean squared relative error over
    ``targets``) most, among those that still fit the budget. If the newest
    snapshots that fit the budget do better (by the exact predicted errors), they
    are returned instead, so the choice is never worse than keeping the newest.

    Args:
        steps: step of each snapshot.
        sigma_rels: sigma_rel of each snapshot.
        targets: the sigma_rels the kept snapshots must reconstruct.
        sizes: bytes of each snapshot; needed with ``max_bytes``.
        max_bytes: most bytes to keep.
        max_count: most snapshots to keep.
        objective: ``"max"`` or ``"mean"`` error over the targets.

    Returns:
        Sorted indices of the snapshots to keep.

    Raises:
        ValueError: when the latest step's snapshots alone exceed the budget, or
            for no budget, a bad objective, or arrays of different lengths.

    Example:
        >>> steps = np.repeat(np.arange(1, 101) * 100, 2)
        >>> keep = select_snapshots(steps, np.tile([0.05, 0.10], 100), [0.05, 0.15], max_count=10)
        >>> len(keep), int(steps[keep].max())
        (10, 10000)
    """
    t = np.asarray(steps, dtype=np.float64).reshape(-1)
    s = np.asarray(sigma_rels, dtype=np.float64).reshape(-1)
    size = np.ones_like(t) if sizes is None else np.asarray(sizes, dtype=np.float64).reshape(-1)
    if not (t.size == s.size == size.size) or t.size == 0:
        raise ValueError(
            f"steps, sigma_rels and sizes have {t.size}, {s.size} and {size.size} entries; give one per snapshot"
        )
    if objective not in ("max", "mean"):
        raise ValueError(f"objective={objective!r} is not 'max' or 'mean'")
    if max_bytes is None and max_count is None:
        raise ValueError("give a budget: max_bytes, max_count or both")
    if max_bytes is not None and sizes is None:
        raise ValueError("max_bytes needs the size of each snapshot (sizes=)")
    byte_room = math.inf if max_bytes is None else float(max_bytes)
    count_room = math.inf if max_count is None else float(max_count)
    last = t == t.max()
    if last.sum() > count_room or size[last].sum() > byte_room:
        raise ValueError(
            f"the {int(last.sum())} snapshot(s) of the latest step ({int(t.max())}) alone take "
            f"{int(size[last].sum())} bytes; a budget of {max_bytes} bytes / {max_count} files cannot keep them"
        )
    gammas = profiles.sigma_rel_to_gamma(s)
    target_sigmas = np.asarray(targets, dtype=np.float64).reshape(-1)
    out_gammas = profiles.sigma_rel_to_gamma(target_sigmas)
    out_t = t.max()
    # Unit-norm profiles keep every inner product O(1) whatever the step (heights go as 1/T).
    gram = profiles.profile_inner_product(t[:, None], gammas[:, None], t[None, :], gammas[None, :])
    norm = np.sqrt(np.diag(gram))
    gram = gram / norm[:, None] / norm[None, :]
    target_norm = np.sqrt(profiles.profile_inner_product(out_t, out_gammas, out_t, out_gammas))
    cross = profiles.profile_inner_product(t[:, None], gammas[:, None], out_t, out_gammas[None, :])
    cross = cross / norm[:, None] / target_norm[None, :]
    # Gram-Schmidt in profile space: basis_dot[i, j] = <q_i, a_j>, basis_target[i, k] = <q_i, f_k>.
    basis_dot = np.zeros((0, t.size))
    basis_target = np.zeros((0, out_gammas.size))
    residual = np.ones(out_gammas.size)  # squared relative errors; the targets have unit norm
    kept = np.zeros(t.size, dtype=bool)

    def add(j: int) -> None:
        nonlocal basis_dot, basis_target, residual
        kept[j] = True
        left = gram[j, j] - basis_dot[:, j] @ basis_dot[:, j]
        if left <= 1e-12:  # already in the span, up to float64 resolution: it adds nothing
            return
        scale = math.sqrt(left)
        row = (gram[j] - basis_dot[:, j] @ basis_dot) / scale
        along = (cross[j] - basis_dot[:, j] @ basis_target) / scale
        basis_dot = np.vstack([basis_dot, row])
        basis_target = np.vstack([basis_target, along])
        residual = np.maximum(residual - along**2, 0.0)

    for j in np.flatnonzero(last):
        add(int(j))
    used_bytes, used_count = size[kept].sum(), int(kept.sum())
    while True:
        fits = ~kept & (size <= byte_room - used_bytes) & (used_count + 1 <= count_room)
        candidates = np.flatnonzero(fits)
        if candidates.size == 0:
            break
        left = gram[candidates, candidates] - np.einsum("ij,ij->j", basis_dot[:, candidates], basis_dot[:, candidates])
        along = cross[candidates] - basis_dot[:, candidates].T @ basis_target
        gain = np.where(left[:, None] > 1e-12, along**2 / np.maximum(left, 1e-300)[:, None], 0.0)
        after = np.maximum(residual[None, :] - gain, 0.0)
        worst, mean = after.max(axis=1), after.mean(axis=1)
        # Ties (a target no candidate improves) are broken by the other statistic, then by the later step.
        primary, secondary = (worst, mean) if objective == "max" else (mean, worst)
        best = candidates[np.lexsort((-t[candidates], secondary, primary))[0]]
        add(int(best))
        used_bytes += size[best]
        used_count += 1
    chosen = np.flatnonzero(kept)
    # The greedy choice is not optimal; make sure it is never worse than the usual
    # alternative, the newest files that fit, judged by the exact predicted errors.
    newest = _newest_that_fit(t, size, byte_room, count_room)
    stat = np.max if objective == "max" else np.mean
    errors = [stat(predicted_errors(t[k], s[k], out_t, target_sigmas)) for k in (chosen, newest)]
    return chosen if errors[0] <= errors[1] else newest


def _newest_that_fit(steps: FloatArray, size: FloatArray, byte_room: float, count_room: float) -> npt.NDArray[np.intp]:
    """Indices of the newest snapshots (latest steps first) that fit in the budget, sorted."""
    order = np.lexsort((-np.arange(steps.size), -steps))  # latest step first; within a step, the last listed
    fits = (np.cumsum(size[order]) <= byte_room) & (np.arange(1, steps.size + 1) <= count_room)
    n = steps.size if fits.all() else int(np.argmin(fits))
    return np.sort(order[:n])


@dataclass(frozen=True)
class RetentionPlan:
    """Which snapshot files to keep and delete, and the predicted error before and after.

    Attributes:
        step: the latest step, at which errors are predicted (its snapshots are kept).
        sigma_rels: the target sigma_rels the errors are predicted for.
        keep: snapshots kept.
        remove: snapshots to delete.
        errors_before: predicted error of each target with every snapshot.
        errors_after: predicted error of each target with the kept snapshots only.
        bytes_before: bytes of every snapshot.
        bytes_after: bytes of the kept ones.
        errors_last: for comparison, the predicted errors had the same number of
            files been kept from the end (the newest ones).
    """

    step: int
    sigma_rels: tuple[float, ...]
    keep: tuple[SnapshotInfo, ...]
    remove: tuple[SnapshotInfo, ...]
    errors_before: FloatArray
    errors_after: FloatArray
    bytes_before: int
    bytes_after: int
    errors_last: FloatArray


def plan_retention(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: Sequence[float],
    *,
    budget: int | str | None = None,
    max_snapshots: int | None = None,
    objective: Objective = "max",
    prefix: str | None = None,
) -> RetentionPlan:
    """Choose which snapshots of a folder to keep under a budget; deletes nothing.

    The snapshots planned over are the ones synthesis uses
    (:func:`~posthoc_ema.synthesis.plan`): those of one tracker prefix and one
    training run. Snapshots of EMAs added on resume (``start_step`` > 0) are left
    out of the plan, so they are neither kept in the budget nor deleted.

    Args:
        snapshot_dir: folder of snapshots.
        sigma_rels: target sigma_rels whose reconstruction at the latest step must
            stay good, e.g. ``sigma_rel_grid(0.03, 0.25)``.
        budget: most bytes to keep: an int or a text such as ``"50GB"`` (see
            :func:`~posthoc_ema.sharded.parse_size`).
        max_snapshots: most snapshot files to keep.
        objective: minimise the ``"max"`` (default) or ``"mean"`` predicted error over ``sigma_rels``.
        prefix: plan over the snapshots of this tracker prefix only; needed when
            several trackers share the folder (a GAN's generator and discriminator).

    Returns:
        A :class:`RetentionPlan`; pass it to :func:`apply_retention` to delete.

    Raises:
        ValueError: for a bad budget or sigma_rel, or a budget the latest step's snapshots alone exceed.
        SnapshotError: for a missing or empty folder, a corrupt snapshot, or snapshots
            of several trackers (without ``prefix``) or of several training runs.

    Example:
        >>> p = plan_retention("ckpts", sigma_rel_grid(0.03, 0.25), budget="50GB")  # doctest: +SKIP
        >>> p.errors_before.max(), p.errors_after.max(), len(p.remove)  # doctest: +SKIP
    """
    targets = tuple(profiles.canonical_sigma_rel(x) for x in sigma_rels)
    if not targets:
        raise ValueError("sigma_rels is empty; give the target sigma_rels to keep good")
    max_bytes = None if budget is None else parse_size(budget)
    if max_snapshots is not None and max_snapshots < 1:
        raise ValueError(f"max_snapshots={max_snapshots} must be at least 1")
    found = list(_planned_snapshots(snapshot_dir, targets[0], prefix))
    steps = np.array([i.step for i in found], dtype=np.float64)
    sigmas = np.array([i.sigma_rel for i in found])
    sizes = np.array([sum(f.path.stat().st_size for f in i.shards or (i,)) for i in found], dtype=np.float64)
    out_step = max(i.step for i in found)
    keep = select_snapshots(
        steps, sigmas, targets, sizes=sizes, max_bytes=max_bytes, max_count=max_snapshots, objective=objective
    )
    kept = np.zeros(len(found), dtype=bool)
    kept[keep] = True
    return RetentionPlan(
        step=out_step,
        sigma_rels=targets,
        keep=tuple(i for i, k in zip(found, kept, strict=True) if k),
        remove=tuple(i for i, k in zip(found, kept, strict=True) if not k),
        errors_before=predicted_errors(steps, sigmas, out_step, targets),
        errors_after=predicted_errors(steps[kept], sigmas[kept], out_step, targets),
        bytes_before=int(sizes.sum()),
        bytes_after=int(sizes[kept].sum()),
        errors_last=predicted_errors(steps[-len(keep) :], sigmas[-len(keep) :], out_step, targets),
    )


def _planned_snapshots(
    snapshot_dir: str | os.PathLike[str], target: float, prefix: str | None
) -> Sequence[SnapshotInfo]:
    """The snapshots synthesis would combine at the latest step: one prefix, one run, no EMA added on resume."""
    from posthoc_ema.errors import PoorReconstructionWarning
    from posthoc_ema.synthesis import plan  # one selection rule, synthesis's

    with warnings.catch_warnings():  # the target is only there to make a plan; its error is not the point
        warnings.simplefilter("ignore", PoorReconstructionWarning)
        # Power-function snapshots only: pruning weighs their profiles; classic ones are left alone.
        return plan(snapshot_dir, target, prefix=prefix, use_classic=False).snapshots


def apply_retention(the_plan: RetentionPlan) -> list[Path]:
    """Delete the snapshot files a :class:`RetentionPlan` removes; returns them.

    The folder lock of the tracker prefix (the one :class:`~posthoc_ema.PostHocEMA`
    holds while it writes snapshots) is held while deleting, so a live tracker
    and a deletion never run at once. Each file is checked to still be the
    snapshot planned (same step and sigma_rel) just before it is deleted.

    Raises:
        SnapshotError: if a tracker is writing snapshots of that prefix in the
            folder, or for a file that changed since the plan was made (nothing
            more is deleted).
    """
    if not the_plan.remove:
        return []
    from posthoc_ema.writer import FolderLock

    with contextlib.ExitStack() as stack:
        # A sharded model's tracker holds a lock per rank (PostHocEMA._start_writing).
        locks = {(i.path.parent, i.prefix, f".{i.prefix}.lock") for i in the_plan.remove}
        locks |= {
            (f.path.parent, f.prefix, f".{f.prefix}-rank{f.shard.rank:05d}.lock")
            for i in the_plan.remove
            for f in i.shards
            if f.shard
        }
        for folder, prefix, name in sorted(locks):
            lock = FolderLock(folder, name)
            try:
                lock.acquire()
            except SnapshotError:
                raise SnapshotError(
                    f"{folder}: a tracker (prefix {prefix!r}) is writing snapshots there; "
                    "prune once it has stopped (nothing was deleted)"
                ) from None
            stack.callback(lock.release)
        return _delete(the_plan)


def _delete(the_plan: RetentionPlan) -> list[Path]:
    from posthoc_ema.snapshots import read_info

    deleted = []
    for planned in the_plan.remove:
        files = planned.shards or (planned,)  # a sharded model's snapshot: every rank's file
        for info in files:
            now = read_info(info.path) if info.path.exists() else None
            if now is None or now.step != info.step or not profiles.same_sigma_rel(now.sigma_rel, info.sigma_rel):
                raise SnapshotError(
                    f"{info.path} is no longer the snapshot of step {info.step} that was planned; plan again"
                )
        for info in files:
            info.path.unlink()
            deleted.append(info.path)
    return deleted


@dataclass(frozen=True)
class Estimate:
    """Predicted disk use and reconstruction error of a run, from its settings alone.

    Attributes:
        snapshot_steps: how many steps get snapshots.
        files: snapshot files (one per step and tracked sigma_rel).
        bytes_per_file: bytes of each file's tensor data (headers add a few kB).
        total_bytes: bytes of all the files.
        sigma_rels: the target sigma_rels predicted.
        errors: predicted error of each target at the last snapshot step, with every snapshot.
        kept_files: files kept under the budget (None without one).
        kept_bytes: their bytes (None without one).
        errors_kept: predicted errors with the files a retention budget keeps (None without one).
        errors_last: predicted errors with the same number of files taken from the end (None without one).
    """

    snapshot_steps: int
    files: int
    bytes_per_file: int
    total_bytes: int
    sigma_rels: tuple[float, ...]
    errors: FloatArray
    kept_files: int | None = None
    kept_bytes: int | None = None
    errors_kept: FloatArray | None = None
    errors_last: FloatArray | None = None


def estimate(
    *,
    params: float,
    steps: float,
    snapshot_every: float,
    sigma_rels: Sequence[float],
    dtype: str = "float32",
    targets: Sequence[float] | None = None,
    budget: int | str | None = None,
    max_snapshots: int | None = None,
) -> Estimate:
    """Predict the disk use and reconstruction error of a run before it starts.

    Snapshots are taken at every multiple of ``snapshot_every`` up to ``steps``,
    one file per tracked sigma_rel; errors are those of synthesis at the last snapshot step.

    Args:
        params: floating values tracked (e.g. ``2.5e9``).
        steps: training steps.
        snapshot_every: steps between snapshots.
        sigma_rels: the tracked sigma_rels.
        dtype: dtype the snapshots are stored in.
        targets: sigma_rels to predict the error of; default the tracked ones' range.
        budget: optionally, a byte budget (``"50GB"``) to predict the error of after pruning.
        max_snapshots: optionally, a file budget.

    Returns:
        An :class:`Estimate`.

    Raises:
        ValueError: for a value that is not positive, a bad dtype or sigma_rel, or fewer steps than one snapshot.

    Example:
        >>> e = estimate(params=2.5e9, steps=1e5, snapshot_every=4096, sigma_rels=[0.05, 0.10])
        >>> e.files, e.total_bytes / 1e9
        (48, 480.0)
    """
    for name, value in (("params", params), ("steps", steps), ("snapshot_every", snapshot_every)):
        if not (value >= 1 and math.isfinite(value)):
            raise ValueError(f"{name}={value!r} must be a finite number >= 1")
    every = int(snapshot_every)
    n_steps = int(steps) // every
    if n_steps < 1:
        raise ValueError(f"steps={steps!r} is fewer than snapshot_every={snapshot_every!r}: no snapshot would be taken")
    tracked = [profiles.canonical_sigma_rel(s) for s in sigma_rels]
    if not tracked:
        raise ValueError("sigma_rels is empty; give the tracked sigma_rels")
    profiles.sigma_rel_to_gamma(tracked)  # checks each is in range, with the usual message
    goal = tuple(targets) if targets is not None else sigma_rel_grid(min(tracked), max(tracked))
    per_file = int(params) * parse_dtype(dtype).itemsize
    snap_steps = np.repeat(np.arange(1, n_steps + 1, dtype=np.float64) * every, len(tracked))
    snap_sigmas = np.tile(np.asarray(tracked, dtype=np.float64), n_steps)
    out_step = n_steps * every
    result = Estimate(
        snapshot_steps=n_steps,
        files=snap_steps.size,
        bytes_per_file=per_file,
        total_bytes=per_file * snap_steps.size,
        sigma_rels=goal,
        errors=predicted_errors(snap_steps, snap_sigmas, out_step, goal),
    )
    if budget is None and max_snapshots is None:
        return result
    sizes = np.full(snap_steps.size, float(per_file))
    max_bytes = None if budget is None else parse_size(budget)
    keep = select_snapshots(snap_steps, snap_sigmas, goal, sizes=sizes, max_bytes=max_bytes, max_count=max_snapshots)
    last = np.arange(snap_steps.size - keep.size, snap_steps.size)
    return replace(
        result,
        kept_files=int(keep.size),
        kept_bytes=int(keep.size * per_file),
        errors_kept=predicted_errors(snap_steps[keep], snap_sigmas[keep], out_step, goal),
        errors_last=predicted_errors(snap_steps[last], snap_sigmas[last], out_step, goal),
    )
