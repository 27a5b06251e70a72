"""EMAs from plain model checkpoints of a finished run, without a tracker.

A run that saved its weights ``theta(t_1), ..., theta(t_n)`` now and then, but
tracked no EMA, still samples its trajectory. The power-function EMA of width
``sigma_rel`` read at ``T`` is the average of the trajectory under the density
of EDM2 eq. 121, ``f_T(t) = (gamma + 1) t**gamma / T**(gamma + 1)`` on (0, T].
Between the samples the trajectory is unknown; :func:`plan_checkpoints` assumes
one of two interpolations and integrates the profile against it exactly:

- ``"piecewise-constant"``: checkpoint ``k`` holds on ``(t_(k-1), t_k]`` (with
  ``t_0 = 0``), the value an EMA updated only at checkpoint steps would see.
  Its weight is the profile's mass on that interval,
  ``(t_k / T)**(gamma+1) - (t_(k-1) / T)**(gamma+1)`` (eq. 127 summed).
- ``"trapezoidal"``: the trajectory is linear between samples and constant
  before the first. The weight of checkpoint ``k`` is the integral of the
  profile against its hat function (1 at ``t_k``, 0 at its neighbours). This
  is exact for a trajectory linear in ``t`` once a checkpoint at step 0 exists,
  and its error falls with the square of the spacing for a smooth one (the
  piecewise-constant error falls linearly).

A target may also be a classic EMA (:mod:`posthoc_ema.schedules`: a constant
decay, a half-life, a warm-up...). Its exact weights on the unit step grid
(:meth:`~posthoc_ema.schedules.Schedule.weights`: the initial copy at step 0,
then one update at every step ``1, ..., T``) are point masses, and the same
interpolation turns each into checkpoint weights: the weight ``w_i`` of step
``t_i`` goes to the checkpoint whose interval ``(t_(k-1), t_k]`` holds it
(piecewise constant), or is split between the two checkpoints around it by
their hat functions (trapezoidal). This is the EMA an every-step update of the
interpolated trajectory would give, so it converges to the EMA of the run as
the checkpoints get denser. (A power function is the same rule applied to its
continuous profile, in closed form; for integer steps the piecewise-constant
weights of both readings agree exactly, since eq. 127 at every step is the
profile's mass per step.)

Each target's weights sum to 1. How well the checkpoints resolve a target is in
the :class:`CheckpointPlan`: the profile mass per checkpoint interval and the
effective number of checkpoints ``1 / sum(w**2)``; a target whose effective
number is below :data:`MIN_EFFECTIVE_CHECKPOINTS` draws a
:class:`~posthoc_ema.errors.UnresolvedProfileWarning`.

:func:`from_checkpoints` then reads one checkpoint at a time and adds it into
every target, so memory is about the outputs plus one checkpoint's tensors
(safetensors files are read one tensor at a time; ``torch.save`` files are
loaded whole, memory-mapped when they are in the zip format, one at a time).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from safetensors import safe_open

from posthoc_ema import profiles, schedules
from posthoc_ema._version import __version__
from posthoc_ema.dtypes import parse_dtype
from posthoc_ema.errors import SnapshotError, UnresolvedProfileWarning
from posthoc_ema.files import read_header, write_atomic
from posthoc_ema.schedules import PowerFunction, Schedule
from posthoc_ema.snapshots import FORMAT as SNAPSHOT_FORMAT
from posthoc_ema.synthesis import ByTarget, StateDict, Target, _as_targets, _schedules_of, _target_key_of, target_label

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "FROM_CHECKPOINTS_FORMAT",
    "MIN_EFFECTIVE_CHECKPOINTS",
    "CheckpointInfo",
    "CheckpointPlan",
    "Interpolation",
    "checkpoint_weights",
    "find_checkpoints",
    "from_checkpoints",
    "plan_checkpoints",
    "run_checkpoints",
    "save",
    "schedule_checkpoint_weights",
]

Interpolation = Literal["piecewise-constant", "trapezoidal"]
_INTERPOLATIONS = ("piecewise-constant", "trapezoidal")

#: File name endings read as checkpoints: safetensors, and ``torch.save`` files.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

#: A target averaged over fewer effective checkpoints than this (``1 / sum(w**2)``)
#: draws :class:`~posthoc_ema.errors.UnresolvedProfileWarning`: a couple of
#: checkpoints carry most of its weight, so the checkpoint spacing near the end
#: of the run is as wide as the profile itself, and the result is close to one
#: checkpoint rather than to the EMA. For evenly spaced checkpoints the effective
#: number is about 0.24 n for sigma_rel=0.10 and 0.11 n for 0.05.
MIN_EFFECTIVE_CHECKPOINTS = 4.0

_STEP_KEYS = ("step", "global_step")


@dataclass(frozen=True)
class CheckpointInfo:
    """One plain checkpoint: its file, its step, and where the step came from.

    Attributes:
        path: the file.
        step: the training step it was saved at.
        step_source: ``"metadata"``, ``"entry"`` (a ``step`` / ``global_step`` entry of
            the saved dict) or ``"file name"`` (the ``step_pattern``).
    """

    path: Path
    step: int
    step_source: str


@dataclass(frozen=True)
class CheckpointPlan:
    """How targets are built from plain checkpoints, and how well they are resolved.

    Attributes:
        step: the step reconstructed (a checkpoint step).
        sigma_rels: the sigma_rel of each target; for a classic schedule, its
            equivalent sigma_rel (:func:`~posthoc_ema.schedules.equivalent_sigma_rel`
            at :attr:`step`), NaN when it is wider than any power function. It is a
            target's identity only for power-function targets (see :attr:`targets`).
        gammas: their exponents (NaN for a classic schedule).
        interpolation: the interpolation the weights integrate.
        checkpoints: the checkpoints used (step <= ``step``), sorted by step.
        weights: ``[n_checkpoints, n_targets]`` float64; columns sum to 1.
        interval_mass: ``[n_checkpoints, n_targets]``: the target's mass on each
            interval ``(t_(k-1), t_k]`` (``t_0 = 0``; a classic target's starting
            copy at step 0 counts in the first); columns sum to 1.
        effective_checkpoints: ``1 / sum(w**2)`` per target: how many checkpoints
            the average effectively rests on.
        targets: each target as a schedule: :class:`~posthoc_ema.schedules.PowerFunction`
            of its canonical sigma_rel for a sigma_rel, else the schedule given.
            Empty only in plans built by hand (then :attr:`sigma_rels` are the targets).
        initial_weights: the weight each target's starting copy still carries at
            :attr:`step` (:func:`~posthoc_ema.schedules.start_copy`); 0 for a power function.
        copy_steps: the step of each target's starting copy (0: the initial copy).
    """

    step: int
    sigma_rels: tuple[float, ...]
    gammas: npt.NDArray[np.float64]
    interpolation: Interpolation
    checkpoints: tuple[CheckpointInfo, ...]
    weights: npt.NDArray[np.float64]
    interval_mass: npt.NDArray[np.float64]
    effective_checkpoints: npt.NDArray[np.float64]
    targets: tuple[Schedule, ...] = ()
    initial_weights: npt.NDArray[np.float64] | None = None
    copy_steps: npt.NDArray[np.float64] | None = None

    def _targets(self) -> tuple[Schedule, ...]:
        return self.targets or tuple(PowerFunction(sigma_rel=s) for s in self.sigma_rels)

    @property
    def labels(self) -> tuple[str, ...]:
        """Each target as text, as :attr:`posthoc_ema.synthesis.Plan.labels`: ``"0.1"``, ``"constant:beta=0.999"``."""
        return tuple(target_label(t) for t in self._targets())

    def is_classic(self, index: int) -> bool:
        """Whether target ``index`` is a classic schedule (not a power function)."""
        return not isinstance(self._targets()[index], PowerFunction)

    def key(self, index: int) -> float | Schedule:
        """Target ``index``'s key in what :func:`run_checkpoints` returns: its canonical sigma_rel, or its schedule."""
        return _target_key_of(self._targets()[index])

    @property
    def unresolved(self) -> npt.NDArray[np.bool_]:
        """Targets with fewer than :data:`MIN_EFFECTIVE_CHECKPOINTS` effective checkpoints."""
        return np.asarray(self.effective_checkpoints < MIN_EFFECTIVE_CHECKPOINTS)

    def _name(self, index: int) -> str:
        return self.labels[index] if self.is_classic(index) else f"sigma_rel {self.sigma_rels[index]:.4g}"

    def _copy_note(self, index: int) -> str:
        """For a classic target whose starting copy still weighs over 1%: where that weight sits."""
        initial = 0.0 if self.initial_weights is None else float(self.initial_weights[index])
        if not self.is_classic(index) or initial <= 0.01:
            return ""
        at = 0.0 if self.copy_steps is None else float(self.copy_steps[index])
        return f"{initial:.1%} of its weight is on its starting copy of the weights at step {at:g}"

    def format_report(self, *, intervals: int = 5) -> str:
        """The resolution report as text: per target, the effective number of
        checkpoints, and the profile mass of the last ``intervals`` intervals."""
        lines = [
            f"{len(self.checkpoints)} checkpoints up to step {self.step}, {self.interpolation} interpolation",
        ]
        last = list(range(max(0, len(self.checkpoints) - intervals), len(self.checkpoints)))
        for j, sigma_rel in enumerate(self.sigma_rels):
            masses = ", ".join(
                f"({self.checkpoints[k - 1].step if k else 0}, {self.checkpoints[k].step}] "
                f"{self.interval_mass[k, j]:.1%}"
                for k in reversed(last)
            )
            flag = "  (unresolved: checkpoints too sparse for this width)" if self.unresolved[j] else ""
            name = self._name(j)
            if self.is_classic(j):
                width = "no power function is as wide" if math.isnan(sigma_rel) else f"~sigma_rel {sigma_rel:.4g}"
                note = self._copy_note(j)
                name += f" ({width}{'; ' + note if note else ''})"
                if note:  # a concentrated start, not a sparse run
                    flag = "  (few: much weight on its starting copy)" if self.unresolved[j] else ""
            lines.append(
                f"{name}: {self.effective_checkpoints[j]:.1f} effective checkpoints{flag}; "
                f"profile mass of the last intervals: {masses}"
            )
        return "\n".join(lines)

    def metadata(self, index: int) -> dict[str, str]:
        """Safetensors metadata describing target ``index`` (what :func:`save` writes).

        ``format`` (:data:`FROM_CHECKPOINTS_FORMAT`), ``sigma_rel``, ``gamma``,
        ``step``, ``interpolation``, ``checkpoints`` (how many were used) and
        ``effective_checkpoints``; a classic target's file also records
        ``schedule`` (its spec, :func:`~posthoc_ema.schedules.schedule_spec`),
        ``schedule_repr``, ``update_every`` (1: the unit step grid), and
        ``initial_weight`` with ``copy_step``, as synthesized files do; its
        ``sigma_rel`` is then the equivalent sigma_rel (``nan`` when none) and its
        ``gamma`` is ``nan``.
        """
        extra: dict[str, str] = {}
        if self.is_classic(index):
            target = self._targets()[index]
            extra = {
                "schedule": schedules.schedule_spec(target),
                "schedule_repr": repr(target),
                "update_every": "1",
                "initial_weight": repr(float(self.initial_weights[index])) if self.initial_weights is not None else "",
                "copy_step": repr(float(self.copy_steps[index])) if self.copy_steps is not None else "",
            }
        return extra | {
            "format": FROM_CHECKPOINTS_FORMAT,
            "format_version": "1",
            "sigma_rel": repr(self.sigma_rels[index]),
            "gamma": repr(float(self.gammas[index])),
            "step": str(self.step),
            "interpolation": self.interpolation,
            "checkpoints": str(len(self.checkpoints)),
            "effective_checkpoints": repr(float(self.effective_checkpoints[index])),
            "library_version": __version__,
        }


def _check_steps(steps: Iterable[int] | npt.ArrayLike, out_step: float, interpolation: str) -> npt.NDArray[np.float64]:
    t = np.asarray(steps, dtype=np.float64).reshape(-1)
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(_INTERPOLATIONS)}")
    if not t.size:
        raise ValueError("no checkpoint steps given")
    if not out_step > 0:
        raise ValueError(f"out_step={out_step!r} is not a positive step")
    if np.any(np.diff(t) <= 0) or t[0] < 0 or t[-1] > out_step:
        raise ValueError(f"steps must increase within [0, out_step={out_step}]; got {t.tolist()[:5]}...")
    return t


def checkpoint_weights(
    steps: Iterable[int] | npt.ArrayLike,
    gammas: npt.ArrayLike,
    out_step: float,
    *,
    interpolation: Interpolation = "piecewise-constant",
) -> npt.NDArray[np.float64]:
    """Weights of trajectory samples at ``steps`` that average it under the profiles of ``gammas``.

    Pure float64 NumPy. ``steps`` must be increasing, non-negative and at most
    ``out_step``; the profile is EDM2 eq. 121 read at ``out_step``.

    Args:
        steps: the sample steps, increasing.
        gammas: target exponent(s).
        out_step: the step the EMA is read at (> 0).
        interpolation: ``"piecewise-constant"`` or ``"trapezoidal"`` (see the module docstring).

    Returns:
        ``[n_steps, n_targets]`` weights; each column sums to 1.

    Raises:
        ValueError: for steps that do not increase, lie outside [0, out_step], or an unknown interpolation.

    Example:
        >>> w = checkpoint_weights([1, 2], 0.0, 2)  # gamma=0: the uniform average
        >>> w[:, 0].tolist()
        [0.5, 0.5]
    """
    t = _check_steps(steps, out_step, interpolation)
    g = np.asarray(gammas, dtype=np.float64).reshape(-1)
    u = t[:, None] / float(out_step)  # times in units of out_step, [n, 1]
    lo = np.concatenate([np.zeros((1, 1)), u[:-1]])  # interval starts, t_0 = 0
    # Profile mass on (lo, u]: the CDF of eq. 121 is u**(gamma+1) (eq. 127 summed).
    mass = u ** (g + 1) - lo ** (g + 1)
    if interpolation == "piecewise-constant":
        return np.asarray(mass)
    # Trapezoidal: on (a, b] the trajectory is theta_a (b - t)/(b - a) + theta_b (t - a)/(b - a).
    # The share of b is int_a^b f(t) (t - a)/(b - a) dt, with int u**(g+1) in closed form.
    a, b = lo[1:], u[1:]  # the n-1 intervals between samples
    width = b - a
    first_moment = (g + 1) / (g + 2) * (b ** (g + 2) - a ** (g + 2))  # int_a^b t f(t) dt
    rising = (first_moment - a * mass[1:]) / width  # weight of the right end b
    falling = mass[1:] - rising  # weight of the left end a
    weights = np.zeros((t.size, g.size))
    weights[0] = mass[0]  # constant before the first sample
    weights[1:] += rising
    weights[:-1] += falling
    return weights


def _deposit(
    into: npt.NDArray[np.float64],
    steps: npt.NDArray[np.float64],
    at: npt.NDArray[np.float64],
    mass: npt.NDArray[np.float64],
    interpolation: Interpolation,
) -> None:
    """Add point masses ``mass`` at times ``at`` to the checkpoints by the interpolation's basis functions.

    A time in ``(t_(k-1), t_k]`` goes to checkpoint ``k`` (its box), or is split
    between ``k - 1`` and ``k`` by their hats; times up to the first checkpoint
    go to it (constant before it), times after the last to the last.
    """
    n = steps.size
    k = np.minimum(np.searchsorted(steps, at, side="left"), n - 1)
    if interpolation == "piecewise-constant" or n == 1:
        into += np.bincount(k, weights=mass, minlength=n)
        return
    between = (at > steps[0]) & (at <= steps[-1])
    share = np.ones_like(at)  # the right end's share of each mass
    kb = k[between]
    share[between] = (at[between] - steps[kb - 1]) / (steps[kb] - steps[kb - 1])
    into += np.bincount(k, weights=mass * share, minlength=n)
    into += np.bincount(kb - 1, weights=mass[between] * (1.0 - share[between]), minlength=n)


def schedule_checkpoint_weights(
    schedule: Schedule | float,
    steps: Iterable[int] | npt.ArrayLike,
    out_step: float,
    *,
    interpolation: Interpolation = "piecewise-constant",
) -> npt.NDArray[np.float64]:
    """Weights of trajectory samples at ``steps`` that give the EMA ``schedule`` read at ``out_step``.

    Pure float64 NumPy. A classic schedule's exact weights on the unit step grid
    (:meth:`~posthoc_ema.schedules.Schedule.weights`, the initial copy at step 0
    and an update at every step up to ``out_step``) are point masses, each given
    to the samples by the interpolation's basis functions (box or hat, see
    :mod:`posthoc_ema.checkpoints`): the EMA the interpolated trajectory would
    have. The grid is walked back from ``out_step`` in chunks and stops once the
    earlier weights underflow, so memory stays small for any run length. A
    power function (or a sigma_rel) is :func:`checkpoint_weights` of its gamma.

    Args:
        schedule: a :class:`~posthoc_ema.schedules.Schedule`, or a sigma_rel.
        steps: the sample steps, increasing, in [0, out_step].
        out_step: the step the EMA is read at (> 0).
        interpolation: ``"piecewise-constant"`` or ``"trapezoidal"``.

    Returns:
        ``[n_steps]`` weights summing to 1.

    Raises:
        ValueError: as for :func:`checkpoint_weights`.

    Example:
        >>> from posthoc_ema.schedules import Constant
        >>> # the EMA is 0.25 theta(0) + 0.25 theta(1) + 0.5 theta(2); theta(1) is held from step 2, or halfway
        >>> schedule_checkpoint_weights(Constant(0.5), [0, 2], 2).tolist()
        [0.25, 0.75]
        >>> schedule_checkpoint_weights(Constant(0.5), [0, 2], 2, interpolation="trapezoidal").tolist()
        [0.375, 0.625]
    """
    sched = schedules.as_schedule(schedule)
    if isinstance(sched, PowerFunction):
        return checkpoint_weights(steps, float(sched.gamma), out_step, interpolation=interpolation)[:, 0]  # type: ignore[arg-type]
    t = _check_steps(steps, out_step, interpolation)
    out = np.zeros(t.size)
    for _, at, mass, initial in sched._walk(None, out_step):
        _deposit(out, t, at, mass, interpolation)
        if initial:  # the initial copy: the weights at step 0
            _deposit(out, t, np.zeros(1), np.array([initial]), interpolation)
    return out


def _step_from(value: object) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:  # weights_only=True refuses the pickle: retrying would not help
        raise SnapshotError(
            f"{path}: weights_only=True refused to load this torch.save file, since it pickles more than tensors "
            f"and plain containers ({str(err).splitlines()[0] if str(err) else type(err).__name__}); save the "
            "state dict alone, or convert the checkpoint to safetensors"
        ) from None
    except RuntimeError:
        pass  # not the zip format (mmap needs it), or not a torch file: retry without mmap for the message
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SnapshotError(
            f"{path}: cannot load as a torch.save file with weights_only=True ({str(err).splitlines()[0]})"
        ) from None


def _select(obj: Any, key: str | None, path: Path) -> Mapping[str, torch.Tensor]:
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                found = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
                raise SnapshotError(f"{path}: no entry {key!r} (top-level entries: {found})")
            obj = obj[part]
    if not isinstance(obj, Mapping):
        raise SnapshotError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        entries = sorted(map(str, obj))[:8]
        raise SnapshotError(
            f"{path}: no tensors at the {'top level' if key is None else repr(key)} (entries: {entries}); "
            "choose the nested state dict with key=, e.g. key='state_dict' or key='model'"
        )
    if len(tensors) != len(obj) and key is None and any(isinstance(v, Mapping) for v in obj.values()):
        nested = sorted(str(k) for k, v in obj.items() if isinstance(v, Mapping))
        raise SnapshotError(
            f"{path}: mixes tensors with nested dicts {nested[:4]}; choose the state dict with key=, "
            f"e.g. key={nested[0]!r}"
        )
    return tensors


def _read_step(path: Path, step_pattern: re.Pattern[str] | None, root: Path) -> CheckpointInfo:
    if path.suffix == ".safetensors":
        meta, _ = read_header(path)
        if meta.get("format") == SNAPSHOT_FORMAT:
            raise SnapshotError(
                f"{path} is a posthoc-ema snapshot, not a plain checkpoint; synthesize from snapshot folders "
                "with posthoc_ema.synthesize"
            )
        for name in _STEP_KEYS:
            step = _step_from(meta.get(name))
            if step is not None:
                return CheckpointInfo(path, step, "metadata")
    else:
        obj = _load_torch(path)
        if isinstance(obj, Mapping):
            for name in _STEP_KEYS:
                step = _step_from(obj.get(name))
                if step is not None:
                    return CheckpointInfo(path, step, "entry")
    if step_pattern is not None:
        match = step_pattern.search(path.relative_to(root).as_posix())
        if match is not None:
            step = _step_from(match.group(1))
            if step is not None:
                return CheckpointInfo(path, step, "file name")
    where = "metadata" if path.suffix == ".safetensors" else "entry"
    raise SnapshotError(
        f"{path}: no step: no 'step' or 'global_step' {where}"
        + (
            f", and step_pattern={step_pattern.pattern!r} does not match its name"
            if step_pattern is not None
            else "; give step_pattern=, a regex with one group of digits, e.g. r'step=(\\d+)'"
        )
    )


def _is_synthesized(path: Path) -> bool:
    """An EMA this library wrote (``format`` ``posthoc-ema/...`` other than a snapshot): not a checkpoint."""
    if path.suffix != ".safetensors":
        return False
    meta, _ = read_header(path)
    written_by_us = str(meta.get("format", "")).startswith("posthoc-ema/")
    return written_by_us and meta.get("format") != SNAPSHOT_FORMAT  # a snapshot is refused by _read_step


def find_checkpoints(
    run_dir: str | os.PathLike[str],
    *,
    step_pattern: str | None = None,
    glob: str = "*",
) -> list[CheckpointInfo]:
    """The checkpoints in ``run_dir`` with their steps, sorted by step.

    A file is a checkpoint when its name ends in one of :data:`CHECKPOINT_SUFFIXES`;
    EMAs this library wrote (safetensors ``format`` metadata starting with
    ``posthoc-ema/``, snapshots apart, which are refused) are skipped.
    Its step comes from, in order: safetensors metadata ``step`` / ``global_step``;
    a ``step`` / ``global_step`` entry of a ``torch.save`` dict; the first group of
    ``step_pattern`` searched in its path relative to ``run_dir``.

    Args:
        run_dir: the folder.
        step_pattern: a regular expression with one group matching the step, e.g.
            ``r"step=(\\d+)"`` or ``r"checkpoint-(\\d+)"``.
        glob: which paths under ``run_dir`` to consider (e.g. ``"checkpoint-*/model.safetensors"``
            for a Hugging Face Trainer run).

    Raises:
        SnapshotError: for a missing folder, no checkpoints, a file without a step, or two
            checkpoints of the same step.
        ValueError: for a ``step_pattern`` that is not a regex with exactly one group.

    Example:
        >>> find_checkpoints("run", step_pattern=r"step=(\\d+)")  # doctest: +SKIP
    """
    root = Path(run_dir)
    pattern = None
    if step_pattern is not None:
        try:
            pattern = re.compile(step_pattern)
        except re.error as err:
            raise ValueError(f"step_pattern={step_pattern!r} is not a regular expression ({err})") from None
        if pattern.groups != 1:
            raise ValueError(f"step_pattern={step_pattern!r} has {pattern.groups} groups; it needs exactly one")
    if not root.is_dir():
        raise SnapshotError(f"{root}: not a folder")
    paths = sorted(p for p in root.glob(glob) if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
    if not paths:
        raise SnapshotError(
            f"{root}: no checkpoints (no file matching {glob!r} ending in {', '.join(CHECKPOINT_SUFFIXES)})"
        )
    paths = [p for p in paths if not _is_synthesized(p)]
    if not paths:
        raise SnapshotError(f"{root}: no checkpoints (the files matching {glob!r} are all EMAs written by posthoc-ema)")
    found: dict[int, CheckpointInfo] = {}
    for path in paths:
        info = _read_step(path, pattern, root)
        twin = found.setdefault(info.step, info)
        if twin is not info:
            raise SnapshotError(f"{path} and {twin.path} are both checkpoints of step {info.step}")
    return [found[s] for s in sorted(found)]


def plan_checkpoints(
    run_dir: str | os.PathLike[str],
    targets: Target | Iterable[Target],
    *,
    step_pattern: str | None = None,
    glob: str = "*",
    interpolation: Interpolation = "piecewise-constant",
    step: int | None = None,
) -> CheckpointPlan:
    """The weights of each checkpoint for each target, and how well they resolve it.

    Reads only the steps (safetensors headers; ``torch.save`` files are loaded
    to find their step entry). A target is a sigma_rel (the power-function EMA)
    or a classic :class:`~posthoc_ema.schedules.Schedule` updated at every step
    from a copy of the weights at step 0, mixed freely
    (:func:`schedule_checkpoint_weights`).

    Args:
        run_dir: folder of plain checkpoints (see :func:`find_checkpoints`).
        targets: target sigma_rel(s), each in (0, sqrt(1/12)), and schedules.
        step_pattern, glob: as for :func:`find_checkpoints`.
        interpolation: ``"piecewise-constant"`` or ``"trapezoidal"``.
        step: a checkpoint step to read the EMA at; default the last. Only
            checkpoints at or before it are used.

    Returns:
        A :class:`CheckpointPlan`.

    Raises:
        ValueError: for a sigma_rel out of range, a repeated target, an unknown interpolation,
            or a step that is not a checkpoint step or is 0.
        SnapshotError: as for :func:`find_checkpoints`.

    Warns:
        UnresolvedProfileWarning: for targets with fewer than :data:`MIN_EFFECTIVE_CHECKPOINTS`
            effective checkpoints.

    Example:
        >>> p = plan_checkpoints("run", [0.05, 0.10, Constant(0.999)], step_pattern=r"step=(\\d+)")  # doctest: +SKIP
        >>> print(p.format_report())  # doctest: +SKIP
    """
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(_INTERPOLATIONS)}")
    given = _as_targets(targets)
    if not given:
        raise ValueError("targets is empty; give at least one target sigma_rel or schedule")
    scheds, labels = _schedules_of(given, name="targets")
    found = find_checkpoints(run_dir, step_pattern=step_pattern, glob=glob)
    steps = [c.step for c in found]
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"step={step} is not a checkpoint step; the steps are {steps[:3]}...{steps[-3:]}")
    if step <= 0:
        raise ValueError(f"step={step}: the EMA can only be read after step 0")
    used = tuple(c for c in found if c.step <= step)
    used_steps = [c.step for c in used]
    n = len(scheds)
    sigmas = [math.nan] * n
    gammas = np.full(n, math.nan)
    initial = np.zeros(n)
    copy_steps = np.zeros(n)
    weights = np.zeros((len(used), n))
    mass = np.zeros((len(used), n))
    power = [j for j, t in enumerate(scheds) if isinstance(t, PowerFunction)]
    if power:
        sigmas_p = [float(scheds[j].sigma_rel) for j in power]  # type: ignore[attr-defined]
        gammas[power] = profiles.sigma_rel_to_gamma(sigmas_p)
        weights[:, power] = checkpoint_weights(used_steps, gammas[power], step, interpolation=interpolation)
        mass[:, power] = checkpoint_weights(used_steps, gammas[power], step, interpolation="piecewise-constant")
        for j, sigma in zip(power, sigmas_p, strict=True):
            sigmas[j] = sigma
    for j, sched in enumerate(scheds):
        if j in power:
            continue
        weights[:, j] = schedule_checkpoint_weights(sched, used_steps, step, interpolation=interpolation)
        mass[:, j] = schedule_checkpoint_weights(sched, used_steps, step, interpolation="piecewise-constant")
        copy_steps[j], initial[j] = schedules.start_copy(sched, step)
        with contextlib.suppress(ValueError):  # wider than any power function: NaN
            sigmas[j] = profiles.canonical_sigma_rel(schedules.equivalent_sigma_rel(sched, step))
    result = CheckpointPlan(
        step=step,
        sigma_rels=tuple(sigmas),
        gammas=gammas,
        interpolation=interpolation,
        checkpoints=used,
        weights=weights,
        interval_mass=mass,
        effective_checkpoints=1.0 / np.sum(weights**2, axis=0),
        targets=tuple(scheds),
        initial_weights=initial,
        copy_steps=copy_steps,
    )
    poor = [j for j in range(n) if result.unresolved[j]]
    if poor:
        power_names = [f"{sigmas[j]:.4g}" for j in poor if j in power]
        names = [f"sigma_rel {', '.join(power_names)}"] if power_names else []
        names += [labels[j] for j in poor if j not in power]
        notes = [f"{labels[j]}: {result._copy_note(j)}" for j in poor if result._copy_note(j)]
        warnings.warn(
            f"{len(poor)} of {n} targets ({'; '.join(names)}) rest on "
            f"fewer than {MIN_EFFECTIVE_CHECKPOINTS:g} effective checkpoints "
            f"({', '.join(f'{result.effective_checkpoints[j]:.1f}' for j in poor)}): the checkpoints are too sparse "
            f"near step {step} for these widths, and the result is close to the last checkpoints rather than to "
            "the EMA" + (f" (or, {'; '.join(notes)})" if notes else ""),
            UnresolvedProfileWarning,
            stacklevel=2,
        )
    return result


def _tensors(info: CheckpointInfo, key: str | None) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Each tensor's name and a function that reads it: one at a time for safetensors."""
    if info.path.suffix == ".safetensors":
        if key is not None:
            raise ValueError(f"key={key!r} applies to torch.save files; {info.path} is a flat safetensors file")
        with safe_open(str(info.path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield name, functools.partial(f.get_tensor, name)
        return
    tensors = _select(_load_torch(info.path), key, info.path)
    for name, t in tensors.items():
        yield name, functools.partial(_identity, t)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def run_checkpoints(
    the_plan: CheckpointPlan,
    *,
    key: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> dict[Any, StateDict]:
    """Carry out a :func:`plan_checkpoints`: one pass over the checkpoints, one at a time.

    Floating tensors are accumulated in float32 (float64 for float64 outputs);
    other tensors are copied from the last checkpoint used. Checkpoints whose
    weight is 0 for every target are not read.

    Returns:
        A :class:`~posthoc_ema.synthesis.ByTarget` ``{target: state_dict}``, keyed
        as :func:`~posthoc_ema.synthesize_many` keys its result (:meth:`CheckpointPlan.key`).
    """
    out_dtype = parse_dtype(dtype)
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    dev = torch.device(device if device is not None else "cpu")
    n_targets = len(the_plan.sigma_rels)
    sums: dict[str, torch.Tensor] = {}
    layout: dict[str, tuple[bool, tuple[int, ...]]] = {}
    copied: dict[str, torch.Tensor] = {}
    first: CheckpointInfo | None = None
    last = len(the_plan.checkpoints) - 1
    for k, info in enumerate(the_plan.checkpoints):
        w = the_plan.weights[k]
        if k != last and not np.any(w):
            continue
        weights = torch.tensor(w, dtype=acc_dtype, device=dev).view(n_targets, 1)
        seen = set()
        for name, read in _tensors(info, key):
            t = read()
            shape = (t.is_floating_point(), tuple(t.shape))
            if first is None:
                layout[name] = shape
            elif layout.get(name) != shape:
                detail = "is not in" if name not in layout else f"has shape {tuple(t.shape)} here, not as in"
                raise SnapshotError(f"{info.path}: tensor {name!r} {detail} {first.path}")
            seen.add(name)
            if t.is_floating_point():
                flat = t.reshape(1, -1).to(device=dev, dtype=acc_dtype)
                if name in sums:
                    sums[name].add_(weights * flat)
                else:
                    sums[name] = weights * flat
            elif k == last:
                copied[name] = t.to(dev, copy=True)
        if first is not None and seen != set(layout):
            missing = sorted(set(layout) - seen)
            raise SnapshotError(f"{info.path}: lacks tensor {missing[0]!r} of {first.path}")
        first = first or info
    result = ByTarget()
    for j in range(n_targets):
        sd: StateDict = {name: s[j].view(layout[name][1]).to(out_dtype) for name, s in sums.items()}
        sd.update({name: t.clone() for name, t in copied.items()})
        result[the_plan.key(j)] = {name: sd[name] for name in layout}  # the checkpoints' key order
    return result


def from_checkpoints(
    run_dir: str | os.PathLike[str],
    targets: Target | Iterable[Target],
    *,
    key: str | None = None,
    step_pattern: str | None = None,
    glob: str = "*",
    interpolation: Interpolation = "piecewise-constant",
    step: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> dict[Any, StateDict]:
    """The EMA of each target (a sigma_rel, or a classic schedule) from plain checkpoints of a run.

    No tracker needed: each checkpoint is a sample of the training trajectory,
    weighted by the target profile integrated against the ``interpolation``
    between samples (see :mod:`posthoc_ema.checkpoints` and
    :func:`plan_checkpoints`, which also reports how well the samples resolve
    each target).

    Args:
        run_dir: folder of plain model checkpoints (safetensors files, or
            ``torch.save`` dicts loaded with ``weights_only=True``).
        targets: target sigma_rel(s) and classic schedules (:mod:`posthoc_ema.schedules`), mixed.
        key: the entry holding the state dict in ``torch.save`` files, e.g.
            ``"state_dict"`` (Lightning) or ``"model"``; dots reach deeper (``"ema.model"``).
        step_pattern: regex with one group for the step, searched in each file's
            path relative to ``run_dir``, for files without step metadata or entry.
        glob: which paths under ``run_dir`` are checkpoints (default: its files).
        interpolation: ``"piecewise-constant"`` (default) or ``"trapezoidal"``.
        step: the checkpoint step to read the EMA at; default the last.
        device: where to accumulate; default CPU.
        dtype: dtype of the floating outputs.

    Returns:
        A :class:`~posthoc_ema.synthesis.ByTarget` ``{target: state_dict}``, as
        :func:`~posthoc_ema.synthesize_many` returns: keyed by canonical sigma_rel
        for power functions and by schedule (or its label) for classic targets.

    Raises:
        ValueError, SnapshotError: as for :func:`plan_checkpoints`, and for checkpoints
            whose tensors differ in names or shapes.

    Warns:
        UnresolvedProfileWarning: as for :func:`plan_checkpoints`.

    Example:
        >>> sds = from_checkpoints("run", [0.10], key="state_dict", step_pattern=r"step=(\\d+)")  # doctest: +SKIP
        >>> model.load_state_dict(sds[0.10])  # doctest: +SKIP
        >>> sds = from_checkpoints("run", [0.10, Constant(0.9999), HalfLife(2000)])  # doctest: +SKIP
        >>> model.load_state_dict(sds["constant:beta=0.9999"])  # doctest: +SKIP
    """
    the_plan = plan_checkpoints(
        run_dir, targets, step_pattern=step_pattern, glob=glob, interpolation=interpolation, step=step
    )
    return run_checkpoints(the_plan, key=key, device=device, dtype=dtype)


#: The ``format`` metadata of an EMA written by :func:`save`.
FROM_CHECKPOINTS_FORMAT = "posthoc-ema/from-checkpoints"


def save(
    path: str | os.PathLike[str],
    state_dict: StateDict,
    the_plan: CheckpointPlan,
    index: int,
    *,
    overwrite: bool = False,
) -> None:
    """Write target ``index`` of a plan atomically as a self-describing safetensors file.

    The metadata says what it is (:meth:`CheckpointPlan.metadata`): ``format``
    (:data:`FROM_CHECKPOINTS_FORMAT`), ``sigma_rel``, ``gamma``, ``step``,
    ``interpolation``, ``checkpoints`` (how many were used) and
    ``effective_checkpoints``, and a classic target's ``schedule``.

    Args:
        path: the file to write; never in a folder holding the plan's checkpoints.
        state_dict: the EMA of that target.
        the_plan: the plan it was built from.
        index: which target of the plan.
        overwrite: replace an existing file at ``path``; by default it is refused.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is false.
        ValueError: if ``path`` is in a folder of the plan's checkpoints.
        OSError: if writing fails.

    Example:
        >>> save("ema-0.1.safetensors", sds[0.1], the_plan, 0)  # doctest: +SKIP
    """
    path = Path(path)
    if path.parent.resolve() in {c.path.parent.resolve() for c in the_plan.checkpoints}:
        raise ValueError(f"{path} is in the checkpoint folder; write synthesized files elsewhere")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(errno.EEXIST, "the file exists; pass overwrite=True to replace it", str(path))
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state_dict.items()}
    write_atomic(Path(path), tensors, the_plan.metadata(index))
