"""Post-hoc synthesis: the EMA of any sigma_rel, or of any classic schedule, from the snapshots in a folder.

:func:`plan` reads only the snapshots' headers and solves for the weights
(:mod:`posthoc_ema.profiles`); :func:`synthesize_many` then streams the tensors
once (:mod:`posthoc_ema.reader`), accumulating every target at the same time,
so memory stays at about the outputs plus a bounded buffer whatever the number
of snapshots.

A target is a sigma_rel (a power-function EMA, solved exactly as always) or any
:class:`~posthoc_ema.schedules.Schedule` (a constant decay, a half-life, a
warm-up...), mixed in one call and one pass. A classic EMA's weights depend on
its update steps: synthesis takes the tracker's, every ``update_every``-th step
``k, 2k, ...`` up to the step read and every snapshot step (every integer step
unless the snapshots' metadata says ``update_every > 1``), and records them in
the output's metadata.

Snapshots of classic EMAs (``PostHocEMA(schedules=...)``) are basis profiles
too: their profiles are known exactly from the schedule in their metadata, so
they join the power-function snapshots in the same least-squares solve
(``use_classic=False`` leaves them out).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors import safe_open

from posthoc_ema import profiles, reader, schedules
from posthoc_ema._version import __version__
from posthoc_ema.distributed import combine_shards, run_shards
from posthoc_ema.dtypes import FLOATING_DTYPES, dtype_name, parse_dtype
from posthoc_ema.errors import PoorReconstructionWarning, RoundingWarning, SnapshotError
from posthoc_ema.files import write_atomic
from posthoc_ema.schedules import PowerFunction, Schedule
from posthoc_ema.snapshots import SYNTHESIZED_FORMAT, SnapshotInfo, list_snapshots, mixed_runs
from posthoc_ema.tracker import as_step

__all__ = [
    "ERROR_WARNING_THRESHOLD",
    "INITIAL_WEIGHT_THRESHOLD",
    "Plan",
    "PoorReconstructionWarning",
    "RoundingWarning",
    "StateDict",
    "format_error",
    "plan",
    "run",
    "save",
    "synthesize",
    "synthesize_many",
]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

#: A predicted relative L2 error of the reconstructed profile above this draws a
#: :class:`PoorReconstructionWarning`: the result averages the run noticeably
#: differently from the requested EMA.
ERROR_WARNING_THRESHOLD = 0.05

#: A classic target whose starting copy (the weights at step 0, or at its
#: ``start``) still carries more than this fraction of its weight at the step
#: read cannot be represented: that copy is one step's weights held as a point
#: mass, which no power-function snapshot reproduces. :func:`plan` names it.
INITIAL_WEIGHT_THRESHOLD = 0.01

#: What a target may be: a sigma_rel, or a schedule (:mod:`posthoc_ema.schedules`).
Target = float | Schedule

#: Unit roundoff ``u`` (half the gap between 1 and the next number) of each
#: floating safetensors dtype: rounding to nearest changes a value by a
#: relative amount of at most ``u``.
UNIT_ROUNDOFF: dict[str, float] = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
# The RMS relative error of rounding to nearest, as a fraction of u, for
# significands spread log-uniformly over [1, 2) (Benford's law, a good model for
# trained weights): the absolute error is uniform over +-ulp/2, so its RMS is
# ulp / sqrt(12) with ulp = 2u * 2**e, and E[(2**e / x)**2] over x in
# [2**e, 2**(e+1)) is 3 / (8 ln 2). Measured on bfloat16-rounded EMAs: 0.37u to 0.53u.
_RMS_ROUNDING = 2 / math.sqrt(12) * math.sqrt(3 / (8 * math.log(2)))


@dataclass(frozen=True)
class Plan:
    """How targets are built from snapshots, known before any tensor is read.

    Attributes:
        step: the step reconstructed.
        sigma_rels: the sigma_rel of each target; for a classic schedule, its
            equivalent sigma_rel (:func:`~posthoc_ema.schedules.equivalent_sigma_rel`
            at :attr:`step`, on :attr:`update_every`'s grid), NaN when it is wider
            than any power function. It orders and plots targets; it is their
            identity only for power-function targets (see :attr:`targets`).
        gammas: their exponents (NaN for a classic schedule).
        snapshots: the snapshots used (step <= ``step``), sorted by step: at each
            step the power-function ones by sigma_rel, then those of classic EMAs
            (:attr:`SnapshotInfo.is_classic`) by name. Classic snapshots are basis
            profiles like the others (their profile is known exactly from the
            schedule in their metadata) unless :func:`plan` was given
            ``use_classic=False``; :attr:`classic_snapshots` lists them.
        coefficients: ``[n_snapshots, n_targets]`` float64 weights, a row per
            snapshot (classic ones included); columns sum to 1.
        errors: predicted relative L2 error of each reconstructed profile.
        coefficient_norms: L2 norm of each column; large norms amplify noise.
        outside: whether each target lies outside the tracked sigma_rel range.
        rounding_errors: predicted relative L2 error of each target from the
            rounding of the stored snapshots, relative to the weights' size
            (see :func:`rounding_errors`); about 0.42 x the unit roundoff of
            the storage dtype x the coefficient norm.
        storage_dtypes: the dtypes the snapshots store floating tensors in
            (``"bfloat16"``...), coarsest first.
        targets: each target as a schedule: :class:`~posthoc_ema.schedules.PowerFunction`
            of its canonical sigma_rel for a sigma_rel, else the schedule given.
            Empty only in plans built by hand before targets existed (then
            :attr:`sigma_rels` are the targets).
        initial_weights: the weight each target's starting copy still carries at
            :attr:`step` (:func:`~posthoc_ema.schedules.start_copy`): the initial
            copy (the weights at step 0), or the copy at its ``start``; about 0
            for a power function. Above :data:`INITIAL_WEIGHT_THRESHOLD` the target
            cannot be represented unless classic snapshots hold the same copy
            (see :attr:`copy_weights`).
        copy_steps: the step of each target's starting copy (0: the initial copy).
        update_every: the classic targets' update grid: an update at every
            ``update_every``-th step up to :attr:`step` (from the snapshots'
            metadata), and at every snapshot step, where the tracker updates too
            (see :meth:`update_steps`).
        copy_weights: the weight the reconstruction gives to each target's starting
            copy: the classic snapshots' own weights on that same copy, combined by
            the coefficients (power-function snapshots give a copy none). 0 without
            classic snapshots; None in plans built by hand before it existed.
    """

    step: int
    sigma_rels: tuple[float, ...]
    gammas: npt.NDArray[np.float64]
    snapshots: tuple[SnapshotInfo, ...]
    coefficients: npt.NDArray[np.float64]
    errors: npt.NDArray[np.float64]
    coefficient_norms: npt.NDArray[np.float64]
    outside: npt.NDArray[np.bool_]
    rounding_errors: npt.NDArray[np.float64]
    storage_dtypes: tuple[str, ...]
    targets: tuple[Schedule, ...] = ()
    initial_weights: npt.NDArray[np.float64] | None = None
    update_every: int = 1
    copy_steps: npt.NDArray[np.float64] | None = None
    copy_weights: npt.NDArray[np.float64] | None = None

    def _targets(self) -> tuple[Schedule, ...]:
        return self.targets or tuple(PowerFunction(sigma_rel=s) for s in self.sigma_rels)

    @property
    def labels(self) -> tuple[str, ...]:
        """Each target as text: its sigma_rel for a power function (``"0.1"``), else its spec
        (:func:`~posthoc_ema.schedules.schedule_spec`, ``"constant:beta=0.999,start=8000"``)."""
        return tuple(target_label(t) for t in self._targets())

    def is_classic(self, index: int) -> bool:
        """Whether target ``index`` is a classic schedule (not a power function)."""
        return not isinstance(self._targets()[index], PowerFunction)

    def key(self, index: int) -> float | Schedule:
        """Target ``index``'s key in the mapping :func:`run` returns: its canonical sigma_rel, or its schedule."""
        return _target_key_of(self._targets()[index])

    def update_steps(self) -> npt.NDArray[np.float64] | None:
        """The classic targets' update steps: None for every integer step, else ``k, 2k, ...`` up to :attr:`step`
        and the steps of the snapshots used (the tracker also updates at every snapshot step)."""
        return _update_grid(self.update_every, self.step, [s.step for s in self.snapshots])

    @property
    def tracked_sigma_rels(self) -> tuple[float, ...]:
        """The sigma_rels of the power-function snapshots used."""
        return tuple(sorted({s.sigma_rel for s in self.snapshots if not s.is_classic}))

    @property
    def classic_snapshots(self) -> tuple[SnapshotInfo, ...]:
        """The snapshots of classic EMAs used as basis profiles (empty with ``use_classic=False``)."""
        return tuple(s for s in self.snapshots if s.is_classic)

    def copy_mismatch(self, index: int) -> float:
        """How much more weight target ``index``'s starting copy has than its reconstruction gives it.

        Above :data:`INITIAL_WEIGHT_THRESHOLD` the target cannot be represented:
        no snapshot holds that copy (one step's weights, a point mass) as it does.
        """
        initial = 0.0 if self.initial_weights is None else float(self.initial_weights[index])
        given = 0.0 if self.copy_weights is None else float(self.copy_weights[index])
        return abs(initial - given)

    def subset(self, index: Sequence[int]) -> Plan:
        """The plan of targets ``index`` only (same snapshots and step)."""
        idx = np.asarray(index, dtype=np.intp)
        return replace(
            self,
            sigma_rels=tuple(self.sigma_rels[i] for i in index),
            targets=tuple(self.targets[i] for i in index) if self.targets else (),
            initial_weights=None if self.initial_weights is None else self.initial_weights[idx],
            copy_steps=None if self.copy_steps is None else self.copy_steps[idx],
            copy_weights=None if self.copy_weights is None else self.copy_weights[idx],
            gammas=self.gammas[idx],
            coefficients=self.coefficients[:, idx],
            errors=self.errors[idx],
            coefficient_norms=self.coefficient_norms[idx],
            outside=self.outside[idx],
            rounding_errors=self.rounding_errors[idx],
        )

    def metadata(self, index: int) -> dict[str, str]:
        """Safetensors metadata describing target ``index``.

        A classic target's file records ``schedule`` (its spec,
        :func:`~posthoc_ema.schedules.schedule_spec`), ``schedule_repr``,
        ``update_every``, and ``initial_weight`` with ``copy_step`` (the weight and
        step of the copy it started from, :attr:`initial_weights`); its ``sigma_rel`` is the
        equivalent sigma_rel (``nan`` when none) and its ``gamma`` is ``nan``.
        ``snapshots`` counts every snapshot combined; when classic snapshots are
        among them, ``classic_snapshots`` counts those.
        """
        extra: dict[str, str] = {}
        if self.classic_snapshots:
            extra["classic_snapshots"] = str(len(self.classic_snapshots))
        if self.is_classic(index):
            target = self._targets()[index]
            extra |= {
                "schedule": schedules.schedule_spec(target),
                "schedule_repr": repr(target),
                "update_every": str(self.update_every),
                "initial_weight": repr(float(self.initial_weights[index])) if self.initial_weights is not None else "",
                "copy_step": repr(float(self.copy_steps[index])) if self.copy_steps is not None else "",
            }
        return extra | {
            "format": SYNTHESIZED_FORMAT,
            "format_version": "1",
            "sigma_rel": repr(self.sigma_rels[index]),
            "gamma": repr(float(self.gammas[index])),
            "step": str(self.step),
            "predicted_error": repr(float(self.errors[index])),
            "snapshots": str(len(self.snapshots)),
            "library_version": __version__,
        }


def format_error(error: float) -> str:
    """A predicted error for people: a percentage, with float64 noise (about 1e-6) shown as ``<0.01%``."""
    return "<0.01%" if error < 5e-5 else f"{error:.2%}"


def target_key(sigma_rel: float) -> str:
    """A target's identity as text: the canonical sigma_rel (:func:`~posthoc_ema.profiles.canonical_sigma_rel`)."""
    return repr(profiles.canonical_sigma_rel(sigma_rel))


def target_label(target: Target) -> str:
    """A target as text: ``repr`` of its canonical sigma_rel for a power function, else its schedule's spec.

    Example:
        >>> target_label(0.1), target_label(schedules.Constant(0.999, start=8000))
        ('0.1', 'constant:beta=0.999,start=8000')
    """
    sched = schedules.as_schedule(target)
    if isinstance(sched, PowerFunction):
        return target_key(float(sched.sigma_rel))  # type: ignore[arg-type]
    return schedules.schedule_spec(sched)


def _target_key_of(target: Target) -> float | Schedule:
    sched = schedules.as_schedule(target)
    if isinstance(sched, PowerFunction):
        return profiles.canonical_sigma_rel(float(sched.sigma_rel))  # type: ignore[arg-type]
    return sched


class ByTarget(dict[Any, "StateDict"]):
    """``{target: state_dict}`` whose lookups use the sigma_rel identity rule.

    Keys are canonical sigma_rels (:func:`~posthoc_ema.profiles.canonical_sigma_rel`)
    for power-function targets, and the schedule objects for classic ones. Any
    number equal to a key under that rule finds it: ``sds[0.07]`` finds the
    target built as ``np.arange(0.05, 0.1, 0.01)[2]``, and ``sds[np.float32(0.05)]``
    finds 0.05; so does a :class:`~posthoc_ema.schedules.PowerFunction`. A
    classic target is found by its schedule (``sds[Constant(0.999)]``, equal
    dataclasses being the same key) or by its label
    (``sds["constant:beta=0.999"]``, see :func:`target_label`).
    """

    @staticmethod
    def _key(key: object) -> object:
        if isinstance(key, str) and ":" in key:
            try:
                key = schedules.parse_schedule(key)
            except ValueError:
                return key
        if isinstance(key, PowerFunction):
            return profiles.canonical_sigma_rel(float(key.sigma_rel))  # type: ignore[arg-type]
        if isinstance(key, (bool, str)) or not isinstance(key, (int, float, np.number, torch.Tensor)):
            return key
        return profiles.canonical_sigma_rel(float(key))

    def __getitem__(self, key: object) -> StateDict:
        return super().__getitem__(self._key(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._key(key))

    def get(self, key: object, default: object = None) -> object:  # type: ignore[override]
        return super().get(self._key(key), default)

    def pop(self, key: object, *default: object) -> object:  # type: ignore[override]
        return super().pop(self._key(key), *default)


def _layout(info: SnapshotInfo) -> dict[str, tuple[bool, tuple[int, ...]]]:
    """Each tensor's name -> (is floating, shape): what snapshots to be combined must share."""
    return {name: (dtype in FLOATING_DTYPES, shape) for name, (dtype, shape) in info.tensors.items()}


def _check_consistent(snapshots: Sequence[SnapshotInfo]) -> None:
    prefixes = sorted({info.prefix for info in snapshots})
    if len(prefixes) > 1:
        raise SnapshotError(
            f"{snapshots[0].path.parent} holds the snapshots of {len(prefixes)} trackers (prefixes "
            f"{', '.join(map(repr, prefixes))}); pass prefix= (--prefix on the command line) to choose one of them"
        )
    if (mixed := mixed_runs(snapshots)) is not None:
        raise SnapshotError(
            f"{snapshots[0].path.parent} {mixed}: synthesis combines one run; move the other run's snapshots "
            "to a folder of their own (list them with `posthoc-ema info`)"
        )
    seen: dict[tuple[int, float | str], SnapshotInfo] = {}
    for info in snapshots:
        twin = seen.setdefault((info.step, str(info.name) if info.is_classic else info.sigma_rel), info)
        if twin is not info:
            what = f"the classic EMA {info.name!r}" if info.is_classic else f"sigma_rel={info.sigma_rel}"
            raise SnapshotError(
                f"{info.path} and {twin.path} are both snapshots of {what} at step {info.step}; "
                "is the folder mixing two runs?"
            )
    first = snapshots[0]
    reference = _layout(first)
    for info in snapshots[1:]:
        other = _layout(info)
        if other == reference:
            continue
        names = sorted(set(reference) ^ set(other))
        if names:
            detail = f"tensor names differ (e.g. {names[0]!r})"
        else:
            name = next(n for n in reference if reference[n] != other[n])
            (floating, shape), (_, ref_shape) = other[name], reference[name]
            if shape != ref_shape:
                detail = f"tensor {name!r} has shape {shape}, not {ref_shape}"
            else:
                detail = f"tensor {name!r} is {'floating' if floating else 'integer'} here, not in the other"
        raise SnapshotError(f"{info.path} does not match {first.path}: {detail}")


def _storage_format(info: SnapshotInfo) -> str | None:
    """The coarsest floating safetensors dtype the snapshot stores (what its bytes hold, not what metadata claims)."""
    floating = {dtype for dtype, _ in info.tensors.values() if dtype in UNIT_ROUNDOFF}
    return max(floating, key=UNIT_ROUNDOFF.__getitem__, default=None)


def rounding_errors(coefficients: npt.ArrayLike, unit_roundoffs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Predicted relative error of synthesized targets from the rounding of the stored snapshots.

    A snapshot value ``x_i`` is stored as ``x_i (1 + d_i)`` with ``|d_i| <= u_i``,
    the unit roundoff of its dtype, so a target ``sum_i c_i x_i`` comes out with
    the error ``sum_i c_i x_i d_i``. Two bounds follow: at worst (every ``d_i``
    at ``u`` with the signs of ``c_i``) ``u ||c||_1 |x|``; with independent
    roundings, an RMS of ``sqrt(sum_i c_i**2 u_i**2) |x|`` at most. This returns
    the expected RMS, ``_RMS_ROUNDING * sqrt(sum_i c_i**2 u_i**2)`` (about
    ``0.42 u ||c||_2`` for one dtype), relative to the size of the weights, taking
    the snapshots to be about as large as the target (true of EMAs of one run).
    The roundings of different snapshots are independent unless the snapshots
    hold the same values; the worst case is far too pessimistic for the
    millions of values of a model (where the rounding dominates, measured
    errors sit within a factor 1.5 of this RMS), so it is the RMS that is predicted.

    Args:
        coefficients: ``[n_snapshots, n_targets]`` weights of a :class:`Plan`.
        unit_roundoffs: ``[n_snapshots]`` unit roundoff of each snapshot's dtype
            (:data:`UNIT_ROUNDOFF`; 0 for snapshots without floating tensors).

    Returns:
        ``[n_targets]`` predicted relative RMS errors.

    Example:
        >>> rounding_errors([[2.0], [-1.0]], [2.0**-8, 2.0**-8]).round(5)
        array([0.00371])
    """
    weighted = np.asarray(coefficients, dtype=np.float64) * np.asarray(unit_roundoffs, dtype=np.float64)[:, None]
    return np.asarray(_RMS_ROUNDING * np.linalg.norm(weighted, axis=0), dtype=np.float64)


def _rounding_matters(rounding: float, unit_roundoff: float) -> bool:
    """Whether a target's rounding error deserves a warning.

    It must show (at least 0.01%, as :func:`format_error` prints it; float32's
    2**-24 would need a coefficient norm in the thousands) and the coefficients
    must amplify the storage rounding to more than twice what storing the EMA
    itself in that dtype costs (``_RMS_ROUNDING * u``): the cost of choosing a
    16-bit dtype is expected, its amplification is the surprise. It is not
    compared with :attr:`Plan.errors`, which measures the profile, not the weights.
    """
    return rounding >= 5e-5 and rounding > 2 * _RMS_ROUNDING * unit_roundoff


def _pick_step(steps: Sequence[int], step: int | None) -> int:
    if step is None:
        return max(steps)
    step = as_step(step)
    grid = sorted(set(steps))
    if step > grid[-1]:
        raise ValueError(f"step={step} is after the last snapshot (step {grid[-1]})")
    if step not in grid:
        nearest = sorted(sorted(grid, key=lambda s: abs(s - step))[:2])
        raise ValueError(
            f"step={step} is not a snapshot step; the nearest are {', '.join(map(str, nearest))} "
            "(a synthesized EMA can only be read where snapshots were taken)"
        )
    return step


def _as_targets(sigma_rels: Target | Iterable[Target]) -> list[Target]:
    """The targets as a flat list: numbers as float64 (as they always were), schedules as given."""
    if isinstance(sigma_rels, Schedule):
        return [sigma_rels]
    if isinstance(sigma_rels, np.ndarray):
        items: list[Any] = list(sigma_rels.reshape(-1))
    elif isinstance(sigma_rels, Iterable):
        items = list(sigma_rels)
    else:
        items = [sigma_rels]
    if not any(isinstance(t, Schedule) for t in items):
        return list(np.asarray(items, dtype=np.float64).reshape(-1))
    return [t if isinstance(t, Schedule) else np.float64(t) for t in items]


def _update_grid(every: int, step: int, snapshot_steps: Iterable[int]) -> npt.NDArray[np.float64] | None:
    """A classic EMA's update steps in a tracker run: None for every integer step, else the multiples of
    ``every`` up to ``step`` and the snapshot steps (:meth:`PostHocEMA.update` also updates when it snapshots)."""
    if every == 1:
        return None
    forced = [float(s) for s in snapshot_steps if s <= step]
    return np.union1d(np.arange(every, step + 1, every, dtype=np.float64), forced)


def _classic_schedule(info: SnapshotInfo) -> Schedule:
    try:
        return schedules.from_metadata(str(info.schedule))
    except ValueError as err:
        raise SnapshotError(
            f"{info.path}: cannot use this classic snapshot as a basis profile ({err}); pass use_classic=False "
            "(--no-classic) to leave the classic snapshots out"
        ) from None


def _same_grid(a: npt.NDArray[np.float64] | None, b: npt.NDArray[np.float64] | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _solve_with_classic(
    power: Sequence[SnapshotInfo],
    classic: Sequence[tuple[Schedule, int]],
    targets: Sequence[Schedule],
    out_step: int,
    *,
    basis_grid: npt.NDArray[np.float64] | None,
    target_grid: npt.NDArray[np.float64] | None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Least-squares weights of power-function and classic snapshots together: ``(coef, errors)``.

    ``coef`` is ``[n_power + n_classic, n_targets]`` (power rows first), each
    column summing to 1 (NaN for a target that overlaps nothing); ``errors`` are
    the relative L2 errors of those weights, from the full Gram matrix.

    The L2 projection onto the span of the power snapshots ``P`` and the classic
    ones ``C`` is found by a Schur complement, so that the structured solver of
    the power-function Gram matrix (EDM2 eq. 151, ``profiles._solve_targets``)
    does the large part: project each classic profile ``c_k`` and each target
    ``h`` onto ``P`` (coefficients ``A`` and ``a``), then solve the small system
    of the residuals ``r_k = c_k - P A_k``,
    ``<r_k, r_l> beta = <r_k, h>`` with ``<r_k, r_l> = <c_k, c_l> - <P^T c_k, A_l>``
    and ``<r_k, h> = <c_k, h> - <P^T h, A_k>``, by the same regularised
    eigen-solve as a dense Gram matrix (unit diagonal, directions below float64
    resolution dropped). The projection is ``P (a - A beta) + C beta``; as for
    power-function snapshots alone, its coefficients are then scaled to sum to 1.

    Products of classic profiles use the EMA recursion: the profile of an EMA read
    at ``s'`` is, before ``s``, its profile read at ``s`` times the product of its
    decays in ``(s, s']`` (``s`` being one of its update steps), so
    ``<c_(A, s), c_(B, s')> = D_B(s, s') <c_(A, s), c_(B, s)>`` needs only products
    of profiles read at the same step. Those, and the products with the
    power-function profiles, come from sums over the segments between snapshot
    steps, in one pass over the updates for all classic EMAs at once
    (``schedules._segments``): the cost grows with the run's length plus the
    number of snapshots, not with their product. A classic target on another
    update grid (``update_every=`` given) is paired with each snapshot by
    :meth:`~posthoc_ema.schedules.Schedule.inner` instead.
    """
    n_p, n_c, n_t = len(power), len(classic), len(targets)
    p_steps = np.array([s.step for s in power], dtype=np.float64)
    p_gammas = np.array([s.gamma for s in power], dtype=np.float64)
    is_power = [isinstance(t, PowerFunction) for t in targets]
    pw = [j for j in range(n_t) if is_power[j]]
    cl = [j for j in range(n_t) if not is_power[j]]
    t_gammas = np.array([float(targets[j].gamma) for j in pw])  # type: ignore[attr-defined]
    out = float(out_step)
    # The classic EMAs on the tracker's grid (the bases, and the classic targets when they share it), cut at
    # every snapshot step: every product of theirs from one pass over the updates (schedules._segments).
    same_grid = _same_grid(basis_grid, target_grid)
    family = list(dict.fromkeys([s for s, _ in classic] + [targets[j] for j in cl if same_grid]))
    index = {sched: i for i, sched in enumerate(family)}
    ends = np.union1d(np.union1d(p_steps, [float(s) for _, s in classic]), [out])
    row = {float(e): i for i, e in enumerate(ends)}
    last = ends.size - 1
    segments = schedules._segments(family, ends, np.union1d(p_gammas, t_gammas), basis_grid)
    same = segments.same_step()
    # Every snapshot and target with every power-function profile (eq. 151, and exact sums for the classic ones).
    b_p = np.zeros((n_p, n_t))  # <f_i, h_j>
    target_sq = np.zeros(n_t)
    if pw:
        target_sq[pw] = profiles.profile_inner_product(out, t_gammas, out, t_gammas)
        if n_p:
            b_p[:, pw] = profiles._power_cross(p_steps, p_gammas, np.asarray(out), t_gammas)
    for j in cl:
        if same_grid:
            target_sq[j] = same[index[targets[j]], index[targets[j]], last]
            b_p[:, j] = segments.cross(index[targets[j]], last, p_steps, p_gammas)
        else:
            target_sq[j] = targets[j].norm_sq(out, update_steps=target_grid)
            if n_p:
                b_p[:, j] = targets[j].cross(out, p_steps, p_gammas, update_steps=target_grid)
    g_pc = np.zeros((n_p, n_c))  # <f_i, c_k>
    b_c = np.zeros((n_c, n_t))  # <c_k, h_j>
    with_steps = np.concatenate([p_steps, np.full(len(pw), out)])
    with_gammas = np.concatenate([p_gammas, t_gammas])
    for k, (sched, step) in enumerate(classic):
        if with_steps.size:
            products = segments.cross(index[sched], row[float(step)], with_steps, with_gammas)
            g_pc[:, k] = products[:n_p]
            b_c[k, pw] = products[n_p:]
    # Classic with classic: <c_(A, s), c_(B, s')> = D_B(s, s') <c_(A, s), c_(B, s)> for s <= s'.
    g_cc = np.zeros((n_c, n_c))
    for k, (a_sched, a_step) in enumerate(classic):
        a, ka = index[a_sched], row[float(a_step)]
        for m in range(k, n_c):
            b_sched, b_step = classic[m]
            b, kb = index[b_sched], row[float(b_step)]
            if ka <= kb:
                value = float(segments.decay(b, ka, kb)) * same[a, b, ka]
            else:
                value = float(segments.decay(a, kb, ka)) * same[a, b, kb]
            g_cc[k, m] = g_cc[m, k] = value
        for j in cl:
            if same_grid:
                t = index[targets[j]]
                b_c[k, j] = float(segments.decay(t, ka, last)) * same[a, t, ka]
            else:  # the target on its own grid, which holds the snapshot steps too: carried the same way
                logs, copies = targets[j]._log_decays(np.array([float(a_step), out]), target_grid)
                if copies[1] == copies[0]:
                    b_c[k, j] = math.exp(min(float(logs[1] - logs[0]), 0.0)) * a_sched.inner(
                        float(a_step), targets[j], update_steps=basis_grid, other_update_steps=target_grid
                    )
    # Project the classic profiles and the targets onto the power-function snapshots.
    if n_p:
        rhs = np.concatenate([g_pc, b_p], axis=1)
        grid = profiles._Grid(p_steps, p_gammas)
        moments = None
        if grid.regular:
            moments = profiles._moments_from_cross(grid, rhs)
            if pw:  # the closed form, as for power-function targets alone
                moments[:, :, n_c + np.array(pw)] = profiles._power_moments(grid, np.asarray(out), t_gammas)
        raw, _ = profiles._solve_targets(
            p_steps, p_gammas, np.zeros(rhs.shape[1]), moments=moments, cross=rhs, normalise=False
        )
        a_c, a_t = raw[:, :n_c], raw[:, n_c:]
    else:
        a_c, a_t = np.zeros((0, n_c)), np.zeros((0, n_t))
    schur = g_cc - g_pc.T @ a_c
    schur = 0.5 * (schur + schur.T)
    residual_rhs = b_c - a_c.T @ b_p
    # A classic profile inside the power functions' span (to float64 resolution) adds nothing.
    keep = np.diag(schur) > 1e-12 * np.diag(g_cc)
    beta = np.zeros((n_c, n_t))
    if np.any(keep):
        beta[keep] = profiles._lstsq(schur[np.ix_(keep, keep)], residual_rhs[keep])
    coef = np.concatenate([a_t - a_c @ beta, beta])
    total = coef.sum(axis=0)
    lost = ~(np.abs(total) > 0)
    coef = np.where(lost, np.nan, coef / np.where(lost, 1.0, total))
    # The error of those weights from the full Gram matrix, [G_pp G_pc; G_pc^T G_cc] (G_pp y without forming it).
    y_p, y_c = np.nan_to_num(coef[:n_p]), np.nan_to_num(coef[n_p:])
    gram_y = profiles._gram_matvec(profiles._Grid(p_steps, p_gammas), y_p) if n_p else np.zeros((0, n_t))
    sq = (
        np.einsum("io,io->o", y_p, gram_y + 2 * g_pc @ y_c)
        + np.einsum("ko,ko->o", y_c, g_cc @ y_c)
        - 2 * np.einsum("io,io->o", y_p, b_p)
        - 2 * np.einsum("ko,ko->o", y_c, b_c)
        + target_sq
    )
    errors = np.where(lost, np.nan, np.sqrt(np.maximum(sq, 0.0) / target_sq))
    return coef, errors


def _schedules_of(given: Sequence[Target], *, name: str) -> tuple[list[Schedule], list[str]]:
    """The targets as schedules (sigma_rels by the identity rule) and their labels; ValueError for a repeat."""
    scheds = [
        PowerFunction(sigma_rel=profiles.canonical_sigma_rel(float(t.sigma_rel)))  # type: ignore[arg-type]
        if isinstance(t, PowerFunction)
        else t
        if isinstance(t, Schedule)
        else PowerFunction(sigma_rel=profiles.canonical_sigma_rel(t))
        for t in given
    ]
    labels = [target_label(t) for t in scheds]
    if len(set(labels)) != len(labels):
        repeated = next(t for t, k in zip(scheds, labels, strict=True) if labels.count(k) > 1)
        what = f"sigma_rel={repeated.sigma_rel!r}" if isinstance(repeated, PowerFunction) else repr(repeated)
        raise ValueError(f"{name} repeats {what}")
    return scheds, labels


def _update_every(used: Sequence[SnapshotInfo], update_every: int | None) -> int:
    if update_every is not None:
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every={update_every!r} is not a positive integer")
        return update_every
    found = sorted({s.update_every for s in used})
    if len(found) > 1:
        raise SnapshotError(
            f"{used[0].path.parent}: the snapshots were tracked with update_every {', '.join(map(str, found))}; "
            "pass update_every= to say which update grid the classic targets follow"
        )
    return found[0]


def plan(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: Target | Iterable[Target],
    *,
    step: int | None = None,
    prefix: str | None = None,
    update_every: int | None = None,
    use_classic: bool = True,
) -> Plan:
    """Solve for the weights of each target without reading any tensor.

    A target is a sigma_rel or any :class:`~posthoc_ema.schedules.Schedule`,
    mixed freely. Without classic snapshots, power-function targets are solved
    exactly as for sigma_rels alone; a classic target's profile is known through
    its exact inner products with the snapshot profiles
    (:func:`~posthoc_ema.schedules.target_products`) and solved by the same least
    squares, with the same predicted error. Snapshots of classic EMAs join the
    basis (see ``use_classic``), for every target, in one solve.
    A classic EMA updates every ``update_every``-th step ``k, 2k, ...`` up to
    the step read and at every snapshot step, as the tracker does (every integer
    step by default), and starts as a copy of the weights at step 0;
    power-function snapshots give that copy no weight, so a target whose
    starting copy (at step 0, or at its ``start``) still weighs
    :data:`INITIAL_WEIGHT_THRESHOLD` more than the reconstruction gives it
    (:meth:`Plan.copy_mismatch`; only classic snapshots can hold a copy)
    is reported as one the snapshots cannot represent.

    Args:
        snapshot_dir: folder of snapshots written by :class:`PostHocEMA`.
        sigma_rels: the target(s): sigma_rels, each in (0, sqrt(1/12)), and schedules.
        step: a snapshot step to reconstruct at; default the latest. Only
            snapshots at or before it are used.
        prefix: use the snapshots of this tracker prefix only (see
            :class:`PostHocEMA`); needed when several trackers share the folder.
        update_every: the classic targets' update period in steps; default the
            snapshots' ``update_every`` (:attr:`SnapshotInfo.update_every`).
        use_classic: combine the snapshots of classic EMAs with the
            power-function ones (the default, whenever the folder has them): each
            is a basis profile known exactly from the schedule in its metadata, on
            the tracker's update grid (every ``update_every``-th step and every
            snapshot step). This changes, for the better, the results from a folder
            that held such snapshots before they were used. False gives the plan of
            the power-function snapshots alone, exactly as without them.

    Returns:
        A :class:`Plan` with coefficients and predicted errors.

    Raises:
        ValueError: for a sigma_rel out of range, a repeated target, a step that is
            not a snapshot step, or a classic target with no overlap with the snapshots.
        SnapshotError: for a missing folder, a folder without snapshots, a corrupt
            snapshot, snapshots that disagree on tensors, a repeated (step, sigma_rel),
            snapshots of several training runs or prefixes, or (with classic
            targets) snapshots of several ``update_every``.

    Warns:
        PoorReconstructionWarning: naming the targets whose predicted error is
            above :data:`ERROR_WARNING_THRESHOLD`, and the classic targets whose
            initial copy weighs more than :data:`INITIAL_WEIGHT_THRESHOLD`.

    Example:
        >>> p = plan("ckpts", [0.05, 0.15, Constant(0.9999), "..."][:3])  # doctest: +SKIP
        >>> p.errors  # doctest: +SKIP
        array([0.0004, 0.0061, 0.0123])
    """
    given = _as_targets(sigma_rels)
    if not given:
        raise ValueError("sigma_rels is empty; give at least one target sigma_rel or schedule")
    scheds, labels = _schedules_of(given, name="sigma_rels")
    power = [j for j, t in enumerate(scheds) if isinstance(t, PowerFunction)]
    classic = [j for j, t in enumerate(scheds) if not isinstance(t, PowerFunction)]
    power_sigmas = tuple(float(scheds[j].sigma_rel) for j in power)  # type: ignore[attr-defined]
    # A sharded model's files (one per rank) are combined into one snapshot each.
    found = combine_shards(list_snapshots(snapshot_dir, prefix=prefix, include_classic=True))
    if not use_classic:
        if found and all(s.is_classic for s in found):
            raise SnapshotError(
                f"{snapshot_dir}: holds only snapshots of classic EMAs, and use_classic=False leaves them out; "
                "synthesize with use_classic=True (without --no-classic)"
            )
        found = [s for s in found if not s.is_classic]
    if not found:
        raise SnapshotError(f"{snapshot_dir}: no snapshots (no .safetensors file with posthoc-ema snapshot metadata)")
    # An EMA added on resume began at start_step from a copy of the weights: its
    # profile is a point mass there plus the power function after it, not the
    # power function from 0 that the solve assumes (EDM2 eq. 121). Leave it out.
    late = [s for s in found if s.start_step]
    if late:
        found = [s for s in found if not s.start_step]
        log.warning(
            "%s: leaving out %d snapshots of EMAs added on resume (sigma_rel %s, from step %d): their profile "
            "is not a power function from step 0",
            snapshot_dir,
            len(late),
            ", ".join(sorted({repr(s.sigma_rel) for s in late})),
            min(s.start_step or 0 for s in late),
        )
        if not found:
            raise SnapshotError(
                f"{snapshot_dir}: every snapshot is of an EMA added on resume (start_step > 0); "
                "synthesis needs EMAs tracked from step 0"
            )
    out_step = _pick_step([s.step for s in found], step)
    used = tuple(s for s in found if s.step <= out_step)
    _check_consistent(used)
    used_power = [s for s in used if not s.is_classic]
    used_classic = [s for s in used if s.is_classic]
    in_steps = [s.step for s in used_power]
    in_sigmas = [s.sigma_rel for s in used_power]
    snapshot_steps = sorted({s.step for s in used})
    n_targets = len(scheds)
    coef = np.zeros((len(used), n_targets))
    errors = np.zeros(n_targets)
    sigma_list = [math.nan] * n_targets
    gammas = np.full(n_targets, math.nan)
    initial = np.zeros(n_targets)
    copy_steps = np.zeros(n_targets)
    copy_weights = np.zeros(n_targets)
    if power:
        gammas[power] = profiles.sigma_rel_to_gamma(power_sigmas)
        for j, sigma in zip(power, power_sigmas, strict=True):
            sigma_list[j] = sigma
    if power and not used_classic:
        coef[:, power] = profiles.solve_coefficients(in_steps, in_sigmas, out_step, power_sigmas)
        errors[power] = profiles.reconstruction_error(coef[:, power], in_steps, in_sigmas, out_step, power_sigmas)
    every = _update_every(used, update_every) if classic else 1
    grid = _update_grid(every, out_step, snapshot_steps)
    for j in classic:
        copy_steps[j], initial[j] = schedules.start_copy(scheds[j], out_step, update_steps=grid)
        with contextlib.suppress(ValueError):  # wider than any power function: NaN
            sigma_list[j] = profiles.canonical_sigma_rel(
                schedules.equivalent_sigma_rel(scheds[j], out_step, update_steps=grid)
            )
    lost = np.zeros(n_targets, dtype=bool)
    if classic and not used_classic:
        steps_f = np.asarray(in_steps, dtype=np.float64)
        gammas_f = profiles.sigma_rel_to_gamma(np.asarray(in_sigmas, dtype=np.float64))
        cross = np.empty((len(used), len(classic)))
        norm_sq = np.empty(len(classic))
        for c, j in enumerate(classic):
            cross[:, c], norm_sq[c] = schedules.target_products(
                scheds[j], out_step, steps_f, gammas_f, update_steps=grid
            )
        classic_coef, classic_errors = profiles._solve_targets(steps_f, gammas_f, norm_sq, cross=cross)
        lost[classic] = np.isnan(classic_errors)
        coef[:, classic] = classic_coef
        errors[classic] = classic_errors
    if used_classic:
        basis_every = sorted({s.update_every for s in used_classic})
        if len(basis_every) > 1:
            raise SnapshotError(
                f"{used[0].path.parent}: the classic snapshots were tracked with update_every "
                f"{', '.join(map(str, basis_every))}, so their update grid is not known; pass use_classic=False "
                "(--no-classic) to leave them out"
            )
        basis_grid = _update_grid(basis_every[0], out_step, snapshot_steps)
        bases = [(_classic_schedule(s), s.step) for s in used_classic]
        both, both_errors = _solve_with_classic(
            used_power, bases, scheds, out_step, basis_grid=basis_grid, target_grid=grid
        )
        rows = np.array(
            [i for i, s in enumerate(used) if not s.is_classic] + [i for i, s in enumerate(used) if s.is_classic]
        )
        coef[rows] = both
        errors[:] = both_errors
        lost = np.isnan(both_errors)
        # What the classic snapshots' own starting copies give each target's copy: the initial copy's weight
        # is the product of all decays (one pass per schedule); a later copy is looked up by a short walk back.
        at_steps = np.array([float(at) for _, at in bases])
        products = {sched: sched._log_decays(at_steps, basis_grid) for sched in dict.fromkeys(s for s, _ in bases)}
        for k, (sched, at) in enumerate(bases):
            logs, copies = products[sched]
            if copies[k] == 0:
                their_step, their_weight = 0.0, math.exp(float(logs[k]))
            else:
                their_step, their_weight = schedules.start_copy(sched, at, update_steps=basis_grid)
            same = copy_steps == their_step
            copy_weights[same] += np.nan_to_num(both[len(used_power) + k, same]) * their_weight
    if np.any(lost):
        raise ValueError(
            f"{labels[int(np.argmax(lost))]} at step {out_step} has no overlap with the snapshots "
            "at or before it; reconstruct at another step or choose a wider target"
        )
    targets = tuple(sigma_list)
    if in_sigmas:
        lo, hi = min(in_sigmas), max(in_sigmas)
        outside = np.array([not (lo <= s <= hi) for s in targets])
    else:  # only classic snapshots: no tracked sigma_rel range to be outside of
        outside = np.zeros(n_targets, dtype=bool)
    formats = [_storage_format(s) for s in used]
    roundoffs = [0.0 if f is None else UNIT_ROUNDOFF[f] for f in formats]
    coarsest = sorted({f for f in formats if f is not None}, key=UNIT_ROUNDOFF.__getitem__, reverse=True)
    result = Plan(
        step=out_step,
        sigma_rels=targets,
        gammas=gammas,
        snapshots=used,
        coefficients=coef,
        errors=errors,
        coefficient_norms=np.linalg.norm(coef, axis=0),
        outside=outside,
        rounding_errors=rounding_errors(coef, roundoffs),
        storage_dtypes=tuple(dtype_name(FLOATING_DTYPES[f]) for f in coarsest),
        targets=tuple(scheds),
        initial_weights=initial,
        update_every=every,
        copy_steps=copy_steps,
        copy_weights=copy_weights,
    )
    names = [
        f"{s:.4g}" if isinstance(t, PowerFunction) else lab for s, t, lab in zip(targets, scheds, labels, strict=True)
    ]
    what = "" if classic else "sigma_rel "
    held = [j for j in classic if result.copy_mismatch(j) > INITIAL_WEIGHT_THRESHOLD]
    if held:
        shown = bool(used_classic) and any(copy_weights[j] for j in held)
        warnings.warn(
            f"{len(held)} of {len(targets)} targets cannot be represented: "
            + "; ".join(
                f"{labels[j]} still keeps {initial[j]:.1%} of its weight at step {out_step} on the copy of the "
                f"weights at step {copy_steps[j]:g} it started from"
                + (f" (the snapshots give that copy {copy_weights[j]:.1%})" if shown else "")
                for j in held
            )
            + "; a copy is one step's weights, which no power-function snapshot reproduces: choose a smaller "
            "decay or an earlier start",
            PoorReconstructionWarning,
            stacklevel=2,
        )
    poor = [(names[j], err) for j, err in enumerate(errors) if err > ERROR_WARNING_THRESHOLD]
    if poor:
        warnings.warn(
            f"{len(poor)} of {len(targets)} targets ({what}{', '.join(s for s, _ in poor)}) "
            f"have a predicted relative error above {ERROR_WARNING_THRESHOLD:.0%} "
            f"({', '.join(format_error(err) for _, err in poor)}): their EMAs average the run differently from "
            "the requested profile; track sigma_rels around them or snapshot more often",
            PoorReconstructionWarning,
            stacklevel=2,
        )
    worst = max(roundoffs)
    rounded = [
        (s, r, n)
        for s, r, n in zip(names, result.rounding_errors, result.coefficient_norms, strict=True)
        if _rounding_matters(float(r), worst)
    ]
    if rounded:
        stored = result.storage_dtypes[0]  # the coarsest, which the rounding comes from
        warnings.warn(
            f"{len(rounded)} of {len(targets)} targets ({what}{', '.join(s for s, _, _ in rounded)}) "
            f"lose about {', '.join(format_error(r) for _, r, _ in rounded)} of the weights' size to the rounding of "
            f"the {stored} snapshots: their coefficients (norm {', '.join(f'{n:.3g}' for _, _, n in rounded)}) "
            f"amplify it to over twice what storing the EMA itself in {stored} costs; track sigma_rels "
            "closer to them or store snapshots in float32",
            RoundingWarning,
            stacklevel=2,
        )
    return result


def synthesize_many(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: Iterable[Target],
    *,
    step: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: Callable[[int, int], None] | None = None,
    prefix: str | None = None,
    update_every: int | None = None,
    use_classic: bool = True,
) -> dict[Any, StateDict]:
    """Synthesize the EMA of several targets (sigma_rels and schedules) in one pass over the snapshots.

    Each snapshot tensor is read once (in bounded row chunks) and multiplied
    into every target at once, in float32 with float64-solved weights.

    Args:
        snapshot_dir: folder of snapshots.
        sigma_rels: target sigma_rels and schedules (:mod:`posthoc_ema.schedules`), mixed.
        step: snapshot step to reconstruct at; default the latest.
        device: where to accumulate (``"cuda"`` for a GPU); default CPU.
        dtype: dtype of floating outputs (float32, float64, bfloat16, float16).
        progress: called with (bytes done, bytes total) as the pass goes on.
        prefix, update_every, use_classic: as for :func:`plan`.

    Returns:
        A :class:`ByTarget` ``{target: state_dict}``, keyed by canonical sigma_rel
        for power functions and by schedule for classic targets (found by label
        too); each loads with ``model.load_state_dict(sd, strict=True)``.
        Non-floating entries are copied from the latest snapshot used.

    Raises:
        ValueError, SnapshotError: as for :func:`plan`, and for a snapshot that
            cannot be read.

    Example:
        >>> sds = synthesize_many("ckpts", [0.05, 0.10, 0.15])  # doctest: +SKIP
        >>> model.load_state_dict(sds[0.15])  # doctest: +SKIP
        >>> sds = synthesize_many("ckpts", [0.10, Constant(0.9999), HalfLife(2000)])  # doctest: +SKIP
        >>> model.load_state_dict(sds["constant:beta=0.9999"])  # doctest: +SKIP
    """
    the_plan = plan(
        snapshot_dir, sigma_rels, step=step, prefix=prefix, update_every=update_every, use_classic=use_classic
    )
    return run(the_plan, device=device, dtype=dtype, progress=progress)


def run(
    the_plan: Plan,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[Any, StateDict]:
    """Carry out a :func:`plan`: the streaming pass of :func:`synthesize_many`.

    The floating tensors of a snapshot are seen as one flat vector (in file
    order) and processed in chunks of elements: a chunk of every snapshot is
    read into a ``[n_snapshots, chunk]`` float32 buffer with plain positioned
    reads (no mmap, so the page cache does not count as our memory), then
    multiplied into the ``[n_targets, chunk]`` columns of the sums by one matrix
    product while the buffer is still in cache: each input byte is read from
    memory once, whatever the number of targets (:mod:`posthoc_ema.reader`). On the CPU, two
    threads (one torch thread each) take whole chunks, read then multiply, so
    the reads and products of both cores overlap, and each output page is
    first touched by the thread that fills it. On a GPU one thread reads into
    pinned buffers while the previous chunk is copied on a stream of its own
    and multiplied. ``progress`` is called with (work done, total work).
    """
    if the_plan.snapshots and the_plan.snapshots[-1].shards:  # snapshots of a sharded model: rank by rank
        return run_shards(the_plan, device=device, dtype=dtype, progress=progress)
    out_dtype = parse_dtype(dtype)
    dev = torch.device(device if device is not None else "cpu")
    snaps = the_plan.snapshots
    latest = snaps[-1]
    keys = sorted((k for k, (dt, _) in latest.tensors.items() if dt in FLOATING_DTYPES), key=latest.offsets.__getitem__)
    starts = list(itertools.accumulate((math.prod(latest.tensors[k][1]) for k in keys), initial=0))
    sums = reader.weighted_sums(snaps, the_plan.coefficients, keys, starts, device=dev, progress=progress)
    with safe_open(str(latest.path), framework="pt", device="cpu") as f:
        copied = {k: f.get_tensor(k) for k in latest.tensors if k not in keys}
    result = ByTarget()
    for j in range(len(the_plan.sigma_rels)):
        sd: StateDict = {
            k: sums[j, a:b].view(latest.tensors[k][1]).to(out_dtype)
            for k, a, b in zip(keys, starts, starts[1:], strict=False)
        }
        sd.update({k: t.to(dev, copy=True) for k, t in copied.items()})
        result[the_plan.key(j)] = sd
    return result


def synthesize(
    snapshot_dir: str | os.PathLike[str],
    sigma_rel: Target,
    *,
    step: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    prefix: str | None = None,
    update_every: int | None = None,
    use_classic: bool = True,
) -> StateDict:
    """Synthesize the EMA of one target (a ``sigma_rel`` or a schedule) from a folder of snapshots.

    Same as ``synthesize_many(snapshot_dir, [sigma_rel], ...)[sigma_rel]``.

    Example:
        >>> sd = synthesize("ckpts", sigma_rel=0.15)  # doctest: +SKIP
        >>> sd = synthesize("ckpts", Constant(0.9999, start=8000))  # doctest: +SKIP
        >>> model.load_state_dict(sd)  # doctest: +SKIP
    """
    sds = synthesize_many(
        snapshot_dir,
        [sigma_rel],
        step=step,
        device=device,
        dtype=dtype,
        prefix=prefix,
        update_every=update_every,
        use_classic=use_classic,
    )
    return sds[sigma_rel]


def save(
    path: str | os.PathLike[str],
    state_dict: StateDict,
    the_plan: Plan,
    index: int,
    *,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> None:
    """Write target ``index`` of a plan atomically as a self-describing safetensors file.

    Args:
        path: the file to write; never in the snapshot folder of ``the_plan``.
        state_dict: the synthesized tensors of that target.
        the_plan: the plan they were synthesized from (its metadata goes into the file).
        index: which target of the plan.
        overwrite: replace an existing file at ``path``; by default an existing
            file is refused.
        max_shard_size: bytes, or a text such as ``"2GB"``: ``path`` is then a
            folder of Hugging Face style shards instead
            (:func:`posthoc_ema.sharded.save_sharded`), and ``overwrite`` applies
            to the model files in it.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is false.
        ValueError: if ``path`` is in the snapshot folder the plan reads.
        OSError: if writing fails.

    Example:
        >>> save("ema-0.15.safetensors", state_dict, the_plan, 0)  # doctest: +SKIP
    """
    path = Path(path)
    folders = {s.path.parent.resolve() for s in the_plan.snapshots}
    if path.parent.resolve() in folders or (max_shard_size is not None and path.resolve() in folders):
        raise ValueError(f"{path} is in the snapshot folder; write synthesized files elsewhere")
    # A folder of shards is "existing" when it already holds a model.
    held = [path / n for n in ("model.safetensors", "model.safetensors.index.json")] if max_shard_size else [path]
    existing = next((p for p in held if p.exists()), None)
    if not overwrite and existing is not None:
        raise FileExistsError(errno.EEXIST, "the file exists; pass overwrite=True to replace it", str(existing))
    if max_shard_size is not None:
        from posthoc_ema.sharded import save_sharded  # it builds on this module

        save_sharded(path, state_dict, the_plan, index, max_shard_size=max_shard_size, overwrite=overwrite)
        return
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state_dict.items()}
    meta = the_plan.metadata(index)
    meta["dtype"] = dtype_name(next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32))
    write_atomic(Path(path), tensors, meta)
