"""Classic EMA schedules as data: their decays, their exact weights, and their profiles (pure NumPy, no torch).

An EMA is defined by the decay ``beta(t, t_prev)`` it applies at an update at
time ``t`` (the tracker's step) whose previous update was at ``t_prev``,

    ema <- beta * ema + (1 - beta) * weights,

starting from a copy of the weights when it is created, at step 0 (the first
update has ``t_prev = 0``). A decay of 0 makes the EMA a copy of the current
weights; a decay of 1 leaves it unchanged. Everything else follows from this:
the weight each update's weights carry in the EMA read at ``out_step``
(:meth:`Schedule.weights`), and the EMA's profile over training time.

Profiles use the model of EDM2 (Karras et al. 2023): the trajectory is
piecewise constant between updates, the weights ``theta_i`` of update ``i`` held
on ``(t_(i-1), t_i]``, so a weight ``w_i`` is the density ``w_i / (t_i - t_(i-1))``
on that interval. A power-function EMA at any cadence is exactly its profile's
mass over these intervals (EDM2 eq. 121, 127). The initial copy (weights at step
0) has no interval of its own: it is counted on the first interval ``(0, t_1]``,
as if it were the first update's weights. :meth:`Schedule.weights` still reports
it separately, so a caller can see how much of an EMA is its starting point.

Time is the tracker's step (``PostHocEMA.update(step=...)``); by default an
update at every integer step ``1, 2, ..., out_step``. Every class reproduces one
library's update rule exactly, cited in its docstring, with the settings that
reproduce the others.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.optimize

from posthoc_ema import profiles

__all__ = [
    "Constant",
    "ExpWarmup",
    "HalfLife",
    "PowerFunction",
    "Schedule",
    "Threshold",
    "Warmup",
    "as_schedule",
    "equivalent_sigma_rel",
    "from_metadata",
    "initial_weight",
    "parse_schedule",
    "schedule_spec",
    "start_copy",
    "target_products",
    "to_metadata",
]

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]

# Updates are walked backwards in chunks of this many, so a run of 1e7 steps
# never needs more than a few arrays of this length at once.
_CHUNK = 1 << 15
# Cells per [updates, snapshots] block in inner products (8 MB of float64).
_CELLS = 1 << 20
# Once the product of all later decays is below exp(-746), every earlier weight
# (the initial copy's included) is 0 in float64: the walk stops there.
_UNDERFLOW = -746.0
# Profiles stop where the weight left is below exp(-80) ~ 1.8e-35 of the whole.
_NEGLIGIBLE = -80.0


def _check_update_steps(update_steps: ArrayLike) -> FloatArray:
    t = np.asarray(update_steps, dtype=np.float64)
    if t.ndim != 1:
        raise ValueError(f"update_steps must be a 1-d sequence of steps, got an array of shape {t.shape}")
    bad = ~(np.isfinite(t) & (t > 0))
    if np.any(bad):
        raise ValueError(f"update_steps holds {float(t[bad][0])!r}; every update step must be a positive number")
    if t.size > 1 and not np.all(np.diff(t) > 0):
        i = int(np.argmin(np.diff(t) > 0))
        raise ValueError(f"update_steps must increase strictly, but {float(t[i + 1])!r} follows {float(t[i])!r}")
    return t


def _updates(lo: int, hi: int, grid: FloatArray | None) -> tuple[FloatArray, FloatArray]:
    """``(t_prev, t)`` of the updates ``lo .. hi - 1`` (0-based) of ``grid``; every integer step when it is None."""
    if grid is None:
        t = np.arange(lo + 1, hi + 1, dtype=np.float64)
        return t - 1.0, t
    t = grid[lo:hi]
    return np.concatenate([[0.0] if lo == 0 else grid[lo - 1 : lo], t[:-1]]), t


def _check_out_step(out_step: float) -> float:
    value = float(out_step)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"out_step={out_step!r} is not a positive step")
    return value


def _check_pair(step: ArrayLike, prev_step: ArrayLike) -> tuple[FloatArray, FloatArray]:
    t = np.asarray(step, dtype=np.float64)
    t_prev = np.asarray(prev_step, dtype=np.float64)
    t, t_prev = np.broadcast_arrays(t, t_prev)
    bad = ~(np.isfinite(t) & (t > 0) & (t_prev >= 0) & (t_prev < t))  # also catches NaN
    if np.any(bad):
        raise ValueError(
            f"step={float(t[bad].flat[0])!r} with prev_step={float(t_prev[bad].flat[0])!r}: an update needs "
            "0 <= prev_step < step"
        )
    return t, t_prev


def _check_decay(name: str, value: float) -> None:
    if not (0.0 <= value < 1.0):  # also catches NaN
        raise ValueError(f"{name}={value!r} is outside [0, 1); a decay of 1 would never move the EMA")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive number")


def _check_start(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"start={value!r} must be a step >= 0 (0: a copy of the weights when tracking begins)")


class Schedule(abc.ABC):
    """An EMA, defined by the decay it applies at each update (see the module docstring).

    Subclasses define :meth:`beta` (or :meth:`log_beta`); weights, profile inner
    products, norms and widths follow exactly.
    """

    @abc.abstractmethod
    def beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        """Decay applied by an update at ``step`` whose previous update was at ``prev_step``.

        Args:
            step: update step(s), > 0.
            prev_step: the previous update's step(s), in [0, step); broadcast against ``step``.

        Returns:
            A float64 array of decays in [0, 1].

        Raises:
            ValueError: if a pair does not satisfy ``0 <= prev_step < step``.
        """

    def _init_args(self) -> dict[str, float]:
        """The constructor's keyword arguments that rebuild this schedule (the metadata spec's fields)."""
        if not dataclasses.is_dataclass(self):
            raise ValueError(
                f"{self!r} is not a dataclass, so it has no metadata spec; define schedules as frozen dataclasses"
            )
        # ``decay`` is the attribute behind the constructor's ``beta`` (``beta`` is the method).
        return {("beta" if f.name == "decay" else f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def log_beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        """``log(beta(step, prev_step))`` (``-inf`` for a copy); exact where a subclass knows it."""
        with np.errstate(divide="ignore"):
            return np.log(self.beta(step, prev_step))

    def _walk(
        self, update_steps: ArrayLike | None, out_step: float, *, floor: float = _UNDERFLOW
    ) -> Iterator[tuple[FloatArray, FloatArray, FloatArray, float | None]]:
        """Chunks ``(t_prev, t, w, w_initial)`` of the updates at or before ``out_step``, latest first.

        ``w`` are the exact weights of those updates in the EMA read at
        ``out_step``; ``w_initial`` is the initial copy's weight, given with the
        last chunk (None before). Stops early once all earlier weights together
        (exactly ``exp(later)``) are below ``exp(floor)``: by default, once they underflow.
        """
        out = _check_out_step(out_step)
        steps = None if update_steps is None else _check_update_steps(update_steps)
        n = math.floor(out) if steps is None else int(np.searchsorted(steps, out, side="right"))
        later = 0.0  # log of the product of the decays of all updates after this chunk
        hi = n
        while hi > 0:
            lo = max(0, hi - _CHUNK)
            t_prev, t = _updates(lo, hi, steps)
            lb = self.log_beta(t, t_prev)
            # Sum of the log-decays strictly after each update (no -inf - -inf).
            after = np.concatenate([np.cumsum(lb[:0:-1])[::-1], [0.0]]) + later
            with np.errstate(invalid="ignore"):
                w = -np.expm1(lb) * np.exp(after)
            later = later + float(lb.sum())
            stop = lo == 0 or later < floor
            yield t_prev, t, w, (math.exp(later) if lo == 0 else 0.0) if stop else None
            if stop:
                return
            hi = lo
        yield np.zeros(0), np.zeros(0), np.zeros(0), 1.0  # no update yet: the EMA is the initial copy

    def weights(self, update_steps: ArrayLike, out_step: float) -> FloatArray:
        """Exact weight of each update's weights in the EMA read at ``out_step``.

        Args:
            update_steps: the steps of the updates, positive and increasing
                (the initial copy is taken at step 0, before them).
            out_step: when the EMA is read; updates after it get weight 0.

        Returns:
            A float64 array ``[1 + len(update_steps)]``: the initial copy's weight,
            then one per update. It sums to 1.

        Raises:
            ValueError: for steps that are not positive and increasing.

        Example:
            >>> Constant(0.5).weights([1, 2, 3], 3)
            array([0.125, 0.125, 0.25 , 0.5  ])
        """
        steps = _check_update_steps(update_steps)
        out = np.zeros(steps.size + 1)
        end = int(np.searchsorted(steps, _check_out_step(out_step), side="right"))
        for _, t, w, initial in self._walk(steps, out_step):
            out[end - t.size + 1 : end + 1] = w
            end -= t.size
            if initial is not None:
                out[0] = initial
        return out

    def _densities(
        self, update_steps: ArrayLike | None, out_step: float
    ) -> Iterator[tuple[FloatArray, FloatArray, FloatArray]]:
        """Chunks ``(a, b, d)``: density ``d`` on ``(a, b]``, latest first; the initial copy counted on ``(0, t_1]``."""
        for t_prev, t, w, initial in self._walk(update_steps, out_step, floor=_NEGLIGIBLE):
            if t.size == 0:
                raise ValueError(
                    f"no update at or before out_step={float(out_step)!r}: the EMA is still its initial copy, "
                    "which has no profile over training time"
                )
            if initial and t_prev[0] == 0:
                w = w.copy()
                w[0] += initial
            yield t_prev, t, w / (t - t_prev)

    def cross(
        self, out_step: float, in_steps: ArrayLike, in_gammas: ArrayLike, *, update_steps: ArrayLike | None = None
    ) -> FloatArray:
        """Inner products ``<p, f_(T_k, g_k)>`` of this EMA's profile read at ``out_step`` with power-function profiles.

        ``f_(T, g)(t) = (g + 1) t**g / T**(g + 1)`` on ``(0, T]`` (EDM2 eq. 121).
        Under the piecewise-constant model the profile ``p`` is the density
        ``d_i = w_i / (t_i - t_(i-1))`` on each update interval, so the product is
        the exact sum ``sum_i d_i (F(t_i) - F(t_(i-1)))`` with
        ``F(t) = (min(t, T) / T)**(g + 1)``, the mass of ``f`` up to ``t``.

        The update intervals are split at the snapshot steps ``T_j`` before
        ``out_step`` (the density is constant on each piece, so this is exact),
        and each piece's mass is taken relative to the end of its segment
        ``(T_(j-1), T_j]``, as ``(b / T_j)**(g + 1) (1 - (a / b)**(g + 1))`` in
        log space (``log1p``/``expm1``), never as a difference of two nearly equal
        numbers: safe for gamma up to 1e4 and more and for 1e7 steps. The segment
        sums are then carried from one segment end to the next by
        ``(T_(j-1) / T_j)**(g + 1)``, the structure of EDM2's snapshot profiles
        (``profiles._decayed_cumsum``), and a snapshot at or after ``out_step``
        scales the whole by ``(out_step / T)**(g + 1)``. So the cost is
        ``O((updates + snapshot steps) x distinct gammas)``, not updates x
        snapshots. Updates are walked back from ``out_step`` until the weight left
        (exactly the product of the decays so far) is below 1e-35. (An
        exponential profile has no closed form against ``t**g`` that stays finite
        here: it is a Kummer function of ``t / half_life``.)

        Args:
            out_step: when this EMA is read.
            in_steps, in_gammas: the power-function profiles (broadcast, flattened).
            update_steps: this EMA's update steps; default every integer step up to ``out_step``.

        Returns:
            A float64 array ``[n_in]``.

        Raises:
            ValueError: for a non-positive step, a gamma <= -1, or no update at or before ``out_step``.
        """
        steps_k, gammas_k = np.broadcast_arrays(
            profiles._check_step(in_steps, "step"), profiles._check_gamma(in_gammas)
        )
        steps_k, gammas_k = steps_k.reshape(-1), gammas_k.reshape(-1)
        out = _check_out_step(out_step)
        gammas, klass = np.unique(gammas_k, return_inverse=True)
        klass = klass.reshape(-1)
        g1 = gammas + 1.0
        ends = np.unique(np.concatenate([steps_k[steps_k < out], [out]]))  # segment ends, out_step the last
        log_ends = np.log(ends)
        sums = np.zeros((ends.size, gammas.size))  # each segment's mass of f_(T_j, g), T_j its end
        for a_all, b_all, d_all in self._densities(update_steps, out):
            inside = ends[(ends > a_all[0]) & (ends < b_all[-1])]
            if inside.size:  # split the intervals at the segment ends inside them
                b = np.union1d(b_all, inside)
                d = d_all[np.searchsorted(b_all, b, side="left")]
                a = np.concatenate([a_all[:1], b[:-1]])
            else:
                a, b, d = a_all, b_all, d_all
            segment = np.searchsorted(ends, b, side="left")  # the first end at or after each piece
            log_reach = np.log(b) - log_ends[segment]
            with np.errstate(divide="ignore"):
                log_keep = np.log1p(-(b - a) / b)  # log(a / b), -inf for a piece from 0
            for c in range(gammas.size):
                # (b / T_j)**(g + 1) * (1 - (a / b)**(g + 1)): exact for short pieces, no cancellation.
                mass = np.exp(g1[c] * log_reach) * -np.expm1(g1[c] * log_keep)
                sums[:, c] += np.bincount(segment, weights=d * mass, minlength=ends.size)
        log_ratio = np.concatenate([[0.0], -np.diff(log_ends)])  # log(T_(j-1) / T_j) <= 0; row 0 unused
        at_end = profiles._decayed_cumsum(log_ratio[:, None] * g1[None, :], sums)  # <p, f_(T_j, g)>, p on (0, T_j]
        after = steps_k >= out
        row = np.where(after, ends.size - 1, np.searchsorted(ends, steps_k))
        total: FloatArray = at_end[np.minimum(row, ends.size - 1), klass]
        # A snapshot at or after out_step: f_(T, g) = (out / T)**(g + 1) f_(out, g) where p lives.
        total = np.where(after, np.exp(g1[klass] * (math.log(out) - np.log(steps_k))) * total, total)
        return total

    def norm_sq(self, out_step: float, *, update_steps: ArrayLike | None = None) -> float:
        """Squared L2 norm ``<p, p> = sum_i w_i**2 / (t_i - t_(i-1))`` of this EMA's profile read at ``out_step``.

        Args and Raises: as for :meth:`cross`.
        """
        return float(sum(np.sum(d * d * (b - a)) for a, b, d in self._densities(update_steps, out_step)))

    def inner(
        self,
        out_step: float,
        other: Schedule,
        other_out_step: float | None = None,
        *,
        update_steps: ArrayLike | None = None,
        other_update_steps: ArrayLike | None = None,
    ) -> float:
        """Inner product ``<p, q>`` of this EMA's profile read at ``out_step`` with another EMA's, exactly.

        Both are piecewise-constant densities (the module docstring) on their own
        update intervals: the breakpoints of the two are merged, and on each
        piece between merged breakpoints both densities are constant, so
        ``<p, q> = sum over pieces of p q (length)``, with no approximation. The
        two profiles are walked back from their read steps in bounded chunks,
        each stopping where its weight left is below 1e-35, so memory stays
        bounded for runs of 1e7 steps. A power function ``other`` is taken
        piecewise constant too (on its update grid), unlike :meth:`cross`, which
        uses its continuous profile.

        Args:
            out_step: when this EMA is read.
            other: the other EMA's schedule.
            other_out_step: when the other EMA is read; default ``out_step``.
            update_steps: this EMA's update steps; default every integer step up to ``out_step``.
            other_update_steps: the other EMA's update steps; default every integer step.

        Returns:
            The inner product, a float (``norm_sq`` when ``other`` is this schedule on the same grid).

        Raises:
            ValueError: for bad steps, or no update at or before a read step.

        Example:
            >>> Constant(0.5).inner(2, Constant(0.5)) == Constant(0.5).norm_sq(2)
            True
            >>> Constant(0.5).inner(1, Constant(0.0), 2)  # (1 on (0, 1]) x (0 on (0, 1], then 1)
            0.0
        """
        read = out_step if other_out_step is None else other_out_step
        mine = self._densities(update_steps, out_step)
        theirs = other._densities(other_update_steps, read)
        a, b = next(mine, None), next(theirs, None)
        total = 0.0
        while a is not None and b is not None:
            total += _overlap(a, b)
            # The chunk that reaches less far back is used up; the other may meet the next one too.
            if a[0][0] >= b[0][0]:
                a = next(mine, None)
            else:
                b = next(theirs, None)
        return total

    def _log_decays(self, steps: ArrayLike, update_steps: ArrayLike | None) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """``(log of the product of the non-zero decays, number of zero decays)`` of the updates up to each step.

        The product of all decays up to ``s`` is the initial copy's weight at
        ``s``; between two steps ``s < s'`` it carries the EMA read at ``s`` into
        the one read at ``s'`` (0 when an update between them copies).
        """
        query = np.asarray(steps, dtype=np.float64).reshape(-1)
        grid = None if update_steps is None else _check_update_steps(update_steps)
        last = float(query.max()) if query.size else 0.0
        n = math.floor(last) if grid is None else int(np.searchsorted(grid, last, side="right"))
        log_sum, copies = np.zeros(query.size), np.zeros(query.size, dtype=np.int64)
        finite, zeros = 0.0, 0
        for lo in range(0, n, _CHUNK):
            hi = min(n, lo + _CHUNK)
            t_prev, t = _updates(lo, hi, grid)
            lb = self.log_beta(t, t_prev)
            copy = np.isneginf(lb)
            running = finite + np.cumsum(np.where(copy, 0.0, lb))
            counted = zeros + np.cumsum(copy)
            here = query >= t[0]
            at = np.searchsorted(t, query[here], side="right") - 1
            log_sum[here], copies[here] = running[at], counted[at]
            finite, zeros = float(running[-1]), int(counted[-1])
        return log_sum, copies

    def std(self, out_step: float, *, update_steps: ArrayLike | None = None) -> float:
        """Standard deviation, in steps, of this EMA's profile read at ``out_step``.

        Each weight is spread uniformly over its interval (the piecewise-constant
        model), so an interval of length ``d`` adds ``d**2 / 12`` of its own.

        Args and Raises: as for :meth:`cross`.
        """
        # Moments about out_step: every profile ends there, so the shift loses nothing.
        m0 = m1 = m2 = 0.0
        out = float(out_step)
        for a, b, d in self._densities(update_steps, out_step):
            w = d * (b - a)
            mid = 0.5 * (a + b) - out
            m0 += float(w.sum())
            m1 += float(w @ mid)
            m2 += float(w @ (mid * mid + (b - a) ** 2 / 12.0))
        mean = m1 / m0
        return math.sqrt(max(m2 / m0 - mean * mean, 0.0))


_Chunk = tuple[FloatArray, FloatArray, FloatArray]


def _overlap(mine: _Chunk, theirs: _Chunk) -> float:
    """``integral p q`` where two chunks ``(a, b, d)`` of contiguous intervals (density ``d`` on ``(a, b]``) meet."""
    a1, b1, d1 = mine
    a2, b2, d2 = theirs
    lo, hi = max(a1[0], a2[0]), min(b1[-1], b2[-1])
    if not lo < hi:
        return 0.0
    # The merged breakpoints inside (lo, hi), then hi: both densities are constant on each piece.
    ends = np.union1d(b1[(b1 > lo) & (b1 < hi)], b2[(b2 > lo) & (b2 < hi)])
    ends = np.concatenate([ends, [hi]])
    starts = np.concatenate([[lo], ends[:-1]])
    p = d1[np.searchsorted(b1, ends, side="left")]
    q = d2[np.searchsorted(b2, ends, side="left")]
    return float(np.sum(p * q * (ends - starts)))


@dataclass(frozen=True)
class _Segments:
    """Several EMAs on one update grid, cut into segments ``(T_(j-1), T_j]`` at steps ``T_j`` of that grid.

    ``q_(s, j)`` is EMA ``s`` read at ``T_j`` and restricted to segment ``j``. The
    EMA read at ``T_k`` is, on segment ``j <= k``, ``q_(s, j)`` times the product of
    its decays in ``(T_j, T_k]`` (the EMA recursion), so every product of these
    profiles follows from per-segment sums by decayed running sums.
    """

    ends: FloatArray  # [M] the T_j
    gammas: FloatArray  # [K]
    moments: FloatArray  # [S, M, K] <q_(s, j), f_(T_j, g)>
    pairs: FloatArray  # [S, S, M] <q_(s, j), q_(r, j)>
    logs: FloatArray  # [S, M] log of the product of the non-zero decays in (0, T_j]
    copies: npt.NDArray[np.int64]  # [S, M] how many updates in (0, T_j] copy (decay 0)

    def decay(self, s: int, i: ArrayLike, k: int) -> FloatArray:
        """Product of EMA ``s``'s decays in ``(T_i, T_k]`` for each ``i <= k``."""
        i = np.asarray(i)
        return np.where(
            self.copies[s, k] > self.copies[s, i], 0.0, np.exp(np.minimum(self.logs[s, k] - self.logs[s, i], 0.0))
        )

    def _segment_log_decay(self, s: int) -> FloatArray:
        log_decay = np.diff(self.logs[s], prepend=0.0)
        return np.where(np.diff(self.copies[s], prepend=0) > 0, -1000.0, log_decay)  # exp(-1000) is 0

    def cross(self, s: int, k: int, steps: FloatArray, gammas: FloatArray) -> FloatArray:
        """``<p_(s, T_k), f_(T, g)>`` for power-function profiles at steps ``T`` among the ends (or after the last)."""
        if steps.size == 0:
            return np.zeros(0)
        g1 = self.gammas + 1.0
        log_ratio = np.concatenate([[0.0], np.log(self.ends[:-1] / self.ends[1:])])
        step_decay = self._segment_log_decay(s)[:, None] + log_ratio[:, None] * g1[None, :]
        at_end = profiles._decayed_cumsum(step_decay, self.moments[s])  # <p_(s, T_j), f_(T_j, g)>
        klass = np.searchsorted(self.gammas, gammas)
        later = steps >= self.ends[k]
        i = np.where(later, k, np.searchsorted(self.ends, steps))
        # f_(T, g) = (T_k / T)**(g + 1) f_(T_k, g) on (0, T_k] for T >= T_k; p_(s, T_k) = D p_(s, T_i) on (0, T_i].
        scale = np.where(later, np.exp(g1[klass] * (math.log(self.ends[k]) - np.log(steps))), self.decay(s, i, k))
        out: FloatArray = scale * at_end[i, klass]
        return out

    def same_step(self) -> FloatArray:
        """``[S, S, M]`` products ``<p_(s, T_j), p_(r, T_j)>``."""
        out = np.empty_like(self.pairs)
        for s in range(self.pairs.shape[0]):
            for r in range(s, self.pairs.shape[0]):
                both = self._segment_log_decay(s) + self._segment_log_decay(r)
                out[s, r] = out[r, s] = profiles._decayed_cumsum(np.maximum(both, -1000.0), self.pairs[s, r])
        return out


def _segments(scheds: list[Schedule], ends: ArrayLike, gammas: ArrayLike, update_steps: ArrayLike | None) -> _Segments:
    """The per-segment sums of :class:`_Segments`, in two passes over the updates (bounded chunks).

    Every end must be an update step (the tracker updates at every snapshot step).
    """
    t_end = np.asarray(ends, dtype=np.float64)
    g = np.unique(np.asarray(gammas, dtype=np.float64))  # sorted: cross looks gammas up by bisection
    g1 = g + 1.0
    grid = None if update_steps is None else _check_update_steps(update_steps)
    last = float(t_end[-1])
    n = math.floor(last) if grid is None else int(np.searchsorted(grid, last, side="right"))
    on_grid = np.isin(t_end, grid) if grid is not None else t_end == np.floor(t_end)
    if not np.all(on_grid):
        raise ValueError(f"step {float(t_end[~on_grid][0])!r} is not an update step of the grid")
    n_s, n_m = len(scheds), t_end.size
    # Pass 1: the decays up to each end (log of the non-zero ones, and how many copy).
    at_ends = [sched._log_decays(t_end, grid) for sched in scheds]
    moments = np.zeros((n_s, n_m, g.size))
    pairs = np.zeros((n_s, n_s, n_m))
    log_end = np.log(t_end)
    finite, zeros = np.zeros(n_s), np.zeros(n_s, dtype=np.int64)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        t_prev, t = _updates(lo, hi, grid)
        seg = np.searchsorted(t_end, t, side="left")
        width = t - t_prev
        log_reach = np.log(t) - log_end[seg]
        with np.errstate(divide="ignore"):
            log_keep = np.log1p(-width / t)
        mass = [np.exp(g1[c] * log_reach) * -np.expm1(g1[c] * log_keep) for c in range(g.size)]
        density = []
        for s, sched in enumerate(scheds):
            lb = sched.log_beta(t, t_prev)
            copy = np.isneginf(lb)
            running = finite[s] + np.cumsum(np.where(copy, 0.0, lb))
            counted = zeros[s] + np.cumsum(copy)
            logs, copies = at_ends[s]
            # The weight of each update in the EMA read at the end of its segment: (1 - beta) x later decays.
            with np.errstate(over="ignore"):
                w = np.where(copies[seg] > counted, 0.0, -np.expm1(lb) * np.exp(np.minimum(logs[seg] - running, 0.0)))
            if lo == 0 and copies[0] == 0:
                w[0] += math.exp(float(logs[0]))  # the initial copy, counted on the first interval
            finite[s], zeros[s] = float(running[-1]), int(counted[-1])
            d = w / width
            density.append(d)
            for c in range(g.size):
                moments[s, :, c] += np.bincount(seg, weights=d * mass[c], minlength=n_m)
        for s in range(n_s):
            for r in range(s, n_s):
                pairs[s, r] += np.bincount(seg, weights=density[s] * density[r] * width, minlength=n_m)
                pairs[r, s] = pairs[s, r]
    return _Segments(
        ends=t_end,
        gammas=g,
        moments=moments,
        pairs=pairs,
        logs=np.array([logs for logs, _ in at_ends]).reshape(n_s, n_m),
        copies=np.array([copies for _, copies in at_ends]).reshape(n_s, n_m),
    )


@dataclass(frozen=True)
class PowerFunction(Schedule):
    """The EDM2 power-function EMA (what the tracker keeps): ``beta = (t_prev / t)**(gamma + 1)``.

    EDM2 eq. 127 at any cadence; the first update (``t_prev = 0``) has decay 0,
    so the initial copy never counts. Give exactly one of ``sigma_rel`` (EDM2
    eq. 123) and ``gamma``; the other is filled in. Its profile is the
    continuous ``f_(T, gamma)`` of eq. 121, whose inner products have the closed
    form of eq. 151: :meth:`cross` and :meth:`norm_sq` use it whatever the
    cadence (the piecewise-constant profile of a coarse grid differs from it by
    terms of order ``(t_i - t_(i-1)) / T``). Source: NVlabs/edm2
    ``training/phema.py`` (``power_function_beta``) and ``reconstruct_phema.py``.

    Args:
        sigma_rel: relative width, in (0, sqrt(1/12)).
        gamma: exponent, > -1.

    Raises:
        ValueError: if neither or both are given, or one is out of range.

    Example:
        >>> round(PowerFunction(sigma_rel=0.10).gamma, 6)
        6.937204
        >>> float(PowerFunction(gamma=0.0).beta(4, 3))
        0.75
    """

    sigma_rel: float | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        if (self.sigma_rel is None) == (self.gamma is None):
            raise ValueError(
                f"PowerFunction needs exactly one of sigma_rel and gamma, got sigma_rel={self.sigma_rel!r} "
                f"and gamma={self.gamma!r}"
            )
        if self.gamma is None:
            object.__setattr__(self, "gamma", float(profiles.sigma_rel_to_gamma(float(self.sigma_rel))))  # type: ignore[arg-type]
            object.__setattr__(self, "sigma_rel", float(self.sigma_rel))  # type: ignore[arg-type]
        else:
            object.__setattr__(self, "sigma_rel", float(profiles.gamma_to_sigma_rel(float(self.gamma))))
            object.__setattr__(self, "gamma", float(self.gamma))

    @property
    def _g(self) -> float:
        return float(self.gamma)  # type: ignore[arg-type]

    def _init_args(self) -> dict[str, float]:
        return {"sigma_rel": float(self.sigma_rel)}  # type: ignore[arg-type]

    def beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        t, t_prev = _check_pair(step, prev_step)
        return profiles.power_beta(self._g, t, t_prev)

    def log_beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        t, t_prev = _check_pair(step, prev_step)
        with np.errstate(divide="ignore"):
            return (self._g + 1.0) * np.log1p(-(t - t_prev) / t)

    def cross(
        self, out_step: float, in_steps: ArrayLike, in_gammas: ArrayLike, *, update_steps: ArrayLike | None = None
    ) -> FloatArray:
        out = _check_out_step(out_step)
        return np.reshape(profiles.profile_inner_product(in_steps, in_gammas, out, self._g), -1)

    def norm_sq(self, out_step: float, *, update_steps: ArrayLike | None = None) -> float:
        out = _check_out_step(out_step)
        return float(profiles.profile_inner_product(out, self._g, out, self._g))

    def std(self, out_step: float, *, update_steps: ArrayLike | None = None) -> float:
        return float(self.sigma_rel) * _check_out_step(out_step)  # type: ignore[arg-type]


@dataclass(frozen=True, repr=False)
class Constant(Schedule):
    """A constant decay ``beta`` at every update after ``start``; a copy of the weights up to ``start``.

    ``start`` is the step at which the EMA begins as a copy of the weights (the
    "EMA start epoch" people sweep): updates at steps ``<= start`` copy, later
    ones decay by ``beta``. With ``start=0`` the EMA starts as the copy made when
    tracking begins, and that copy keeps the weight ``beta**n`` after ``n``
    updates. The decay is per update, whatever the steps between updates.

    Reproduces timm's ``ModelEmaV2(model, decay=beta)`` (``timm/utils/model_ema.py``
    in huggingface/pytorch-image-models: a deep copy at construction, then
    ``decay * ema + (1 - decay) * model`` at every ``update``), which is
    ``Constant(beta)``, and likewise SuperGradients' ``decay_type="constant"``
    and ModelEmaV3 without warm-up and without ``step``. Other settings:

    - ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(beta))``
      (PyTorch ``torch/optim/swa_utils.py``) copies the weights at its first
      ``update_parameters`` (``n_averaged == 0``) and averages from the second
      on: ``Constant(beta, start=1)``. It averages parameters only unless
      ``use_buffers=True``.
    - timm ``ModelEmaV3(model, decay=beta, update_after_step=k)`` without warm-up,
      given ``step`` (``timm/utils/model_ema.py``, ``get_decay`` returns 0 while
      ``step - k - 1 <= 0``, then ``decay``): ``Constant(beta, start=k + 1)``.
    - diffusers' ``EMAModel(decay=beta, update_after_step=k)`` without warm-up is
      *not* a constant decay: its ``get_decay`` (``src/diffusers/training_utils.py``
      in huggingface/diffusers) copies while ``e = optimization_step - k - 1 <= 0``
      and then ramps the decay as ``(1 + e) / (10 + e)``, clamped to
      ``[min_decay, decay]``. No class here reproduces it exactly;
      :class:`Threshold` ``(beta)`` is the same ramp counted from step 0
      (``(1 + step) / (10 + step)``) without the copies, the nearest (see
      ``docs/migration.md``). With ``use_ema_warmup=True`` it is :class:`Warmup`.

    Args:
        beta: the decay, in [0, 1) (kept as the attribute ``decay``: ``beta`` is the method).
        start: the step at which the EMA is (re)started as a copy, >= 0.

    Raises:
        ValueError: for a decay outside [0, 1) or a negative start.

    Example:
        >>> Constant(0.9, start=2).beta([1, 2, 3], [0, 1, 2])
        array([0. , 0. , 0.9])
    """

    decay: float
    start: float = 0

    def __init__(self, beta: float, start: float = 0) -> None:
        object.__setattr__(self, "decay", float(beta))
        object.__setattr__(self, "start", float(start))
        _check_decay("beta", self.decay)
        _check_start(self.start)

    def __repr__(self) -> str:
        return f"Constant(beta={self.decay!r}, start={self.start:g})"

    def beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        t, _ = _check_pair(step, prev_step)
        return np.where(t <= self.start, 0.0, self.decay)

    @classmethod
    def from_sigma_rel(cls, sigma_rel: float, step: float, *, start: float = 0) -> Constant:
        """The constant decay whose profile at ``step`` has relative width ``sigma_rel``.

        Inverts :func:`equivalent_sigma_rel` for an update at every step from 1
        to ``step``. The width first grows with the decay, then shrinks again as
        the initial copy takes over the average; the decay returned is the one
        on the growing side.

        Args:
            sigma_rel: the relative width, > 0.
            step: the step at which the EMA is read.
            start: as for :class:`Constant`.

        Returns:
            The :class:`Constant` schedule.

        Raises:
            ValueError: if no constant decay is that wide at ``step``.

        Example:
            >>> round(Constant.from_sigma_rel(0.05, 10_000).decay, 5)
            0.998
        """
        tau = _solve_time_constant(lambda tau: cls(math.exp(-1.0 / tau), start=start), sigma_rel, step, "Constant")
        return cls(math.exp(-1.0 / tau), start=start)


@dataclass(frozen=True)
class HalfLife(Schedule):
    """An EMA whose weights halve every ``half_life`` steps: Composer's EMA, at any cadence.

    Composer (mosaicml/composer ``composer/algorithms/ema/ema.py``) updates at
    every multiple of ``update_interval`` with smoothing
    ``2 ** (-update_interval / half_life)``, the EMA made a copy of the model at
    the first update event at or after ``ema_start``. Here an update at ``t``
    after one at ``t_prev`` decays by ``2 ** (-n * update_interval / half_life)``,
    ``n`` the number of multiples of ``update_interval`` in ``(t_prev, t]``: the
    Composer updates it stands for. With ``update_interval=1`` (integer steps)
    that is ``2 ** (-(t - t_prev) / half_life)``, exact for sparse or irregular
    updates; with the tracker updating every step and ``update_interval=k`` the
    decay is 1 between multiples of ``k``, exactly Composer's cadence. Updates at
    steps ``<= start`` copy the weights.

    ``EMA(half_life=f"{h}ba", update_interval=f"{k}ba", ema_start=f"{s}ba")`` is
    ``HalfLife(h, update_interval=k, start=max(s, 1))``: Composer's copy happens
    at the first batch end, whose batch count is already 1. ``start=0`` keeps
    the copy made when tracking begins instead.

    Args:
        half_life: in steps, > 0.
        update_interval: Composer's update period, in steps, > 0.
        start: the step at which the EMA is (re)started as a copy, >= 0.

    Raises:
        ValueError: for a non-positive half-life or interval or a negative start.

    Example:
        >>> HalfLife(2.0).beta([1, 3], [0, 1])
        array([0.70710678, 0.5       ])
    """

    half_life: float
    update_interval: float = 1
    start: float = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "half_life", float(self.half_life))
        object.__setattr__(self, "update_interval", float(self.update_interval))
        object.__setattr__(self, "start", float(self.start))
        _check_positive("half_life", self.half_life)
        _check_positive("update_interval", self.update_interval)
        _check_start(self.start)

    @property
    def smoothing(self) -> float:
        """Composer's per-update decay, ``2 ** (-update_interval / half_life)``."""
        return float(2.0 ** (-self.update_interval / self.half_life))

    def log_beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        t, t_prev = _check_pair(step, prev_step)
        k = self.update_interval
        crossed = np.floor(t / k) - np.floor(t_prev / k)
        return np.where(t <= self.start, -np.inf, -crossed * k / self.half_life * math.log(2.0))

    def beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        return np.exp(self.log_beta(step, prev_step))

    @classmethod
    def from_sigma_rel(cls, sigma_rel: float, step: float, *, update_interval: float = 1, start: float = 0) -> HalfLife:
        """The half-life whose profile at ``step`` has relative width ``sigma_rel``.

        As :meth:`Constant.from_sigma_rel`, for an update at every step
        (``HalfLife(h)`` is then ``Constant(2 ** (-1 / h))``).

        Example:
            >>> round(HalfLife.from_sigma_rel(0.05, 10_000).half_life)
            347
        """
        tau = _solve_time_constant(
            lambda tau: cls(tau * math.log(2.0), update_interval=update_interval, start=start),
            sigma_rel,
            step,
            "HalfLife",
        )
        return cls(tau * math.log(2.0), update_interval=update_interval, start=start)


@dataclass(frozen=True)
class Warmup(Schedule):
    """The warm-up decay ``1 - (1 + e / inv_gamma) ** -power``, clamped to ``[min_beta, max_beta]``.

    ``e = step - update_after_step - 1``; while ``e <= 0`` the decay is 0 (the
    EMA copies the weights, the clamp does not apply). This is ema-pytorch's
    ``EMA(beta=max_beta, min_value=min_beta, inv_gamma=..., power=...,
    update_after_step=..., update_every=1)`` (lucidrains/ema-pytorch
    ``ema_pytorch/ema_pytorch.py``, ``get_current_decay`` and ``update``): its
    k-th ``update()`` call copies while ``k <= update_after_step + 1`` and
    otherwise decays with ``e = k - update_after_step - 1``, so ``step`` is the
    tracker's step when ``update()`` follows every optimizer step.
    ema-pytorch computes the decay in float32; this is float64.

    The same rule, with the same step: diffusers' ``EMAModel(decay=max_beta,
    min_decay=min_beta, update_after_step=..., use_ema_warmup=True, inv_gamma=...,
    power=...)`` (``src/diffusers/training_utils.py``, ``get_decay`` of the
    incremented ``optimization_step``), and timm's ``ModelEmaV3(decay=max_beta,
    min_decay=min_beta, update_after_step=..., use_warmup=True, warmup_gamma=inv_gamma,
    warmup_power=power)`` with ``update(model, step=num_updates)`` as timm's
    ``train.py`` calls it (``timm/utils/model_ema.py``, ``get_decay``).

    Args:
        inv_gamma: > 0.
        power: > 0.
        min_beta, max_beta: the clamp, ``0 <= min_beta <= max_beta < 1``.
        update_after_step: updates at steps ``<= update_after_step + 1`` copy, >= 0.

    Raises:
        ValueError: for values out of range.

    Example:
        >>> Warmup(power=1.0, max_beta=0.999).beta([1, 2, 3], [0, 1, 2]).round(4)
        array([0.    , 0.5   , 0.6667])
    """

    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_beta: float = 0.0
    max_beta: float = 0.9999
    update_after_step: float = 0

    def __post_init__(self) -> None:
        _check_positive("inv_gamma", self.inv_gamma)
        _check_positive("power", self.power)
        _check_decay("max_beta", self.max_beta)
        if not (0.0 <= self.min_beta <= self.max_beta):
            raise ValueError(f"min_beta={self.min_beta!r} is outside [0, max_beta={self.max_beta!r}]")
        if not (math.isfinite(self.update_after_step) and self.update_after_step >= 0):
            raise ValueError(f"update_after_step={self.update_after_step!r} must be a step >= 0")

    def beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        t, _ = _check_pair(step, prev_step)
        e = t - self.update_after_step - 1.0
        value = np.clip(1.0 - (1.0 + np.maximum(e, 0.0) / self.inv_gamma) ** -self.power, self.min_beta, self.max_beta)
        return np.where(e <= 0, 0.0, value)


@dataclass(frozen=True, repr=False)
class Threshold(Schedule):
    """SuperGradients' ``threshold`` decay, ``min(beta, (1 + step) / (10 + step))``.

    Deci-AI/super-gradients ``src/super_gradients/training/utils/ema_decay_schedules.py``
    (``ThresholdDecay``), with the ``step`` its trainer passes to
    ``ModelEMA.update``: ``global_step = batch_idx + 1 + len(loader) * epoch``
    (``sg_trainer.py``), 1 at the first update, the tracker's step. The EMA is a
    deep copy made at construction, so the first decay is 2/11 and the initial
    copy keeps a (rapidly vanishing) weight. TensorFlow's
    ``ExponentialMovingAverage(decay, num_updates=n)`` is the same rule with
    ``step = n``; pass ``num_updates`` counted as this step is.

    Args:
        beta: the largest decay, in [0, 1) (the attribute ``decay``).

    Raises:
        ValueError: for a decay outside [0, 1).

    Example:
        >>> Threshold(0.5).beta([1, 8], [0, 1])
        array([0.18181818, 0.5       ])
    """

    decay: float

    def __init__(self, beta: float) -> None:
        object.__setattr__(self, "decay", float(beta))
        _check_decay("beta", self.decay)

    def __repr__(self) -> str:
        return f"Threshold(beta={self.decay!r})"

    def beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        t, _ = _check_pair(step, prev_step)
        return np.minimum(self.decay, (1.0 + t) / (10.0 + t))


@dataclass(frozen=True, repr=False)
class ExpWarmup(Schedule):
    """SuperGradients' ``exp`` decay, ``beta * (1 - exp(-rate * step / total_steps))``.

    Deci-AI/super-gradients ``src/super_gradients/training/utils/ema_decay_schedules.py``
    (``ExpDecay``, whose ``beta`` is ``rate`` here, 15 by default in SuperGradients),
    with the trainer's 1-based ``global_step`` as the step (see :class:`Threshold`)
    and ``total_steps = len(loader) * max_epochs``. The EMA is a deep copy made
    at construction.

    Args:
        beta: the largest decay, in [0, 1) (the attribute ``decay``).
        rate: how fast the decay approaches ``beta``, > 0.
        total_steps: the run's length in steps, > 0.

    Raises:
        ValueError: for values out of range.

    Example:
        >>> round(float(ExpWarmup(0.9, rate=1.0, total_steps=1).beta(1, 0)), 6)
        0.568909
    """

    decay: float
    rate: float
    total_steps: float

    def __init__(self, beta: float, rate: float, total_steps: float) -> None:
        object.__setattr__(self, "decay", float(beta))
        object.__setattr__(self, "rate", float(rate))
        object.__setattr__(self, "total_steps", float(total_steps))
        _check_decay("beta", self.decay)
        _check_positive("rate", self.rate)
        _check_positive("total_steps", self.total_steps)

    def __repr__(self) -> str:
        return f"ExpWarmup(beta={self.decay!r}, rate={self.rate!r}, total_steps={self.total_steps:g})"

    def beta(self, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
        t, _ = _check_pair(step, prev_step)
        return self.decay * -np.expm1(-self.rate * t / self.total_steps)


def as_schedule(value: Schedule | float) -> Schedule:
    """A schedule as given, or the power-function EMA of a sigma_rel given as a number.

    Args:
        value: a :class:`Schedule`, or a sigma_rel in (0, sqrt(1/12)).

    Returns:
        The schedule.

    Raises:
        TypeError: for anything else.
        ValueError: for a sigma_rel out of range.

    Example:
        >>> as_schedule(0.1) == PowerFunction(sigma_rel=0.1)
        True
    """
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return PowerFunction(sigma_rel=float(value))
    raise TypeError(
        f"{value!r} is neither a sigma_rel nor a schedule; give a number or a posthoc_ema.schedules class instance"
    )


def _registry() -> dict[str, type[Schedule]]:
    return {cls.__name__: cls for cls in (PowerFunction, Constant, HalfLife, Warmup, Threshold, ExpWarmup)}


def to_metadata(schedule: Schedule) -> str:
    """The JSON spec of ``schedule`` that snapshot metadata records: its class name and constructor arguments.

    Floats are written with ``repr`` precision, so :func:`from_metadata` rebuilds
    an equal schedule. (This is the file format; the CLI's short
    ``warmup:power=0.75`` spelling is another thing.)

    Args:
        schedule: a schedule defined as a dataclass (every class of this module is).

    Returns:
        A one-line JSON object, keys sorted: ``{"beta": ..., "class": "Constant", "start": ...}``.

    Raises:
        ValueError: for a schedule that is not a dataclass.

    Example:
        >>> to_metadata(Constant(0.999))
        '{"beta": 0.999, "class": "Constant", "start": 0.0}'
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"{schedule!r} is not a posthoc_ema.schedules.Schedule")
    args = schedule._init_args()
    return json.dumps({"class": type(schedule).__name__, **args}, sort_keys=True, allow_nan=False)


def from_metadata(spec: str) -> Schedule:
    """The schedule a :func:`to_metadata` spec describes.

    Args:
        spec: a JSON object with ``class`` (a class of this module) and its constructor arguments.

    Returns:
        The schedule, equal to the one the spec was made from.

    Raises:
        ValueError: for malformed JSON, an unknown class, or arguments the class refuses.

    Example:
        >>> from_metadata('{"class": "Constant", "beta": 0.999}')
        Constant(beta=0.999, start=0)
    """
    try:
        fields = json.loads(spec)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"schedule spec {spec!r} is not JSON ({err})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("class"), str):
        raise ValueError(f'schedule spec {spec!r} is not a JSON object with a "class" entry')
    known = _registry()
    name = fields.pop("class")
    if name not in known:
        raise ValueError(f"schedule spec {spec!r} names the class {name!r}; known: {', '.join(sorted(known))}")
    try:
        return known[name](**fields)
    except TypeError as err:
        raise ValueError(f"schedule spec {spec!r} has arguments {name} does not take ({err})") from None


def equivalent_sigma_rel(schedule: Schedule | float, step: float, *, update_steps: ArrayLike | None = None) -> float:
    """The sigma_rel of the power-function EMA as wide as ``schedule`` read at ``step``.

    Width is EDM2's (eq. 123): the standard deviation of the EMA's profile over
    training time, divided by the time it is read at; for a power function it
    is its ``sigma_rel``. The profile is the piecewise-constant one of the
    module docstring (updates at every step by default), so the answer depends
    on the run's length: a decay of 0.9999 is much narrower at 10M steps than at
    100k. It says how wide an average the schedule is, not that the two
    profiles have the same shape.

    Args:
        schedule: a schedule (or a sigma_rel).
        step: when the EMA is read.
        update_steps: the schedule's update steps; default every integer step up to ``step``.

    Returns:
        The sigma_rel, in (0, sqrt(1/12)).

    Raises:
        ValueError: when the profile is wider than any power function (a
            constant decay whose initial copy still dominates), or for bad steps.

    Example:
        >>> round(equivalent_sigma_rel(Constant(0.9998), 100_000), 4)
        0.05
    """
    sched = as_schedule(schedule)
    out = _check_out_step(step)
    sigma_rel = sched.std(out, update_steps=update_steps) / out
    if not sigma_rel < profiles.MAX_SIGMA_REL:
        raise ValueError(
            f"{sched!r} read at step={out!r} is wider (std/step={sigma_rel:.4f}) than any power-function EMA "
            f"(at most sqrt(1/12)={profiles.MAX_SIGMA_REL:.4f}): most of its weight is still on its start"
        )
    return sigma_rel


def _solve_time_constant(make: Callable[[float], Schedule], sigma_rel: float, step: float, name: str) -> float:
    """The time constant ``tau`` (steps) at which ``make(tau)`` has relative width ``sigma_rel`` at ``step``."""
    out = _check_out_step(step)
    profiles._check_sigma_rel(sigma_rel)

    def width(log_tau: float) -> float:
        return make(math.exp(log_tau)).std(out) / out

    lo, hi = math.log(1e-3), math.log(100.0 * out)
    # The width rises with tau, peaks, then falls as the initial copy takes over.
    peak = scipy.optimize.minimize_scalar(
        lambda x: -width(x), bounds=(lo, hi), method="bounded", options={"xatol": 1e-4}
    )
    widest = width(float(peak.x))
    if not (width(lo) < sigma_rel < widest):
        raise ValueError(
            f"no {name} schedule has sigma_rel={sigma_rel!r} at step={out!r}: the reachable widths are "
            f"({width(lo):.3g}, {widest:.4f})"
        )
    root = scipy.optimize.brentq(lambda x: width(x) - sigma_rel, lo, float(peak.x), xtol=1e-13, rtol=1e-14)
    return math.exp(float(root))


def target_products(
    schedule: Schedule | float,
    out_step: float,
    in_steps: ArrayLike,
    in_gammas: ArrayLike,
    *,
    update_steps: ArrayLike | None = None,
) -> tuple[FloatArray, float]:
    """What a least-squares reconstruction of ``schedule`` read at ``out_step`` needs from it.

    Reconstructing a target profile ``p`` from snapshot profiles ``f_k`` (EDM2
    Sec. 3.3, Algorithm 3) solves ``G c = b`` with the Gram matrix
    ``G_kl = <f_k, f_l>`` (``profiles.profile_inner_product``, eq. 151) and
    ``b_k = <f_k, p>``; its predicted relative error is
    ``sqrt(c.G.c - 2 c.b + <p, p>) / sqrt(<p, p>)``. This gives ``b`` and
    ``<p, p>`` for any schedule: eq. 151 for a power function, and for the
    classic EMAs the exact sums of :meth:`Schedule.cross` and
    :meth:`Schedule.norm_sq` over their updates (every integer step up to
    ``out_step`` unless ``update_steps`` says otherwise).

    Args:
        schedule: the target (a sigma_rel means its power-function EMA).
        out_step: when the target EMA is read.
        in_steps, in_gammas: the snapshots' steps and exponents (broadcast, flattened).
        update_steps: the target's update steps; default every integer step up to ``out_step``.

    Returns:
        ``(cross, norm_sq)``: a float64 array ``[n_in]`` and a float.

    Raises:
        ValueError: for bad steps or gammas, or a target with no update by ``out_step``.

    Example:
        >>> cross, norm_sq = target_products(0.1, 1000, [1000], [6.937203937601806])
        >>> bool(np.isclose(cross[0], norm_sq))  # the snapshot is the target itself
        True
    """
    target = as_schedule(schedule)
    return (
        target.cross(out_step, in_steps, in_gammas, update_steps=update_steps),
        target.norm_sq(out_step, update_steps=update_steps),
    )


# -- specs: a schedule as one line of text (the CLI's --schedule) -----------------------------------------------

# kind -> (class, {spec field: (attribute, default or None when required)}), fields in constructor order.
_SPECS: dict[str, tuple[type[Schedule], dict[str, tuple[str, float | None]]]] = {
    "constant": (Constant, {"beta": ("decay", None), "start": ("start", 0.0)}),
    "half-life": (
        HalfLife,
        {"half_life": ("half_life", None), "update_interval": ("update_interval", 1.0), "start": ("start", 0.0)},
    ),
    "warmup": (
        Warmup,
        {
            "inv_gamma": ("inv_gamma", 1.0),
            "power": ("power", 2 / 3),
            "min_beta": ("min_beta", 0.0),
            "max_beta": ("max_beta", 0.9999),
            "update_after_step": ("update_after_step", 0.0),
        },
    ),
    "threshold": (Threshold, {"beta": ("decay", None)}),
    "exp-warmup": (ExpWarmup, {"beta": ("decay", None), "rate": ("rate", None), "total_steps": ("total_steps", None)}),
    "power": (PowerFunction, {"sigma_rel": ("sigma_rel", None), "gamma": ("gamma", None)}),
}


def parse_schedule(spec: str) -> Schedule:
    """A schedule from a one-line spec ``KIND:FIELD=VALUE,...`` (the CLI's ``--schedule``).

    Kinds and fields (defaults as in the classes): ``constant:beta,start``,
    ``half-life:half_life,update_interval,start``,
    ``warmup:inv_gamma,power,min_beta,max_beta,update_after_step``,
    ``threshold:beta``, ``exp-warmup:beta,rate,total_steps`` and
    ``power:sigma_rel`` (or ``gamma``). :func:`schedule_spec` is the way back.

    Args:
        spec: e.g. ``"constant:beta=0.999,start=8000"``.

    Returns:
        The schedule.

    Raises:
        ValueError: in one line, for an unknown kind, an unknown, repeated or
            missing field, a value that is not a number, or a value out of range.

    Example:
        >>> parse_schedule("constant:beta=0.999,start=8000")
        Constant(beta=0.999, start=8000)
        >>> parse_schedule("warmup:power=0.75").power
        0.75
    """
    text = spec.strip()
    kind, _, body = text.partition(":")
    kind = kind.strip().lower()
    if kind not in _SPECS:
        raise ValueError(f"schedule {spec!r}: unknown kind {kind!r}; use one of {', '.join(_SPECS)}")
    cls, fields = _SPECS[kind]
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        name, eq, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"schedule {spec!r}: {item!r} is not FIELD=VALUE")
        if name not in fields:
            raise ValueError(f"schedule {spec!r}: {kind} has no field {name!r}; its fields are {', '.join(fields)}")
        if name in values:
            raise ValueError(f"schedule {spec!r}: field {name!r} is given twice")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"schedule {spec!r}: {name}={raw.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"schedule {spec!r}: {name}={raw.strip()!r} is not a finite number")
        values[name] = value
    required = [n for n, (_, default) in fields.items() if default is None]
    if cls is PowerFunction:
        required = [] if values else ["sigma_rel"]
    missing = [n for n in required if n not in values]
    if missing:
        raise ValueError(f"schedule {spec!r}: {kind} needs {', '.join(f'{n}=...' for n in missing)}")
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"schedule {spec!r}: {err}") from None


def _spec_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def schedule_spec(schedule: Schedule | float) -> str:
    """The one-line spec of a schedule, which :func:`parse_schedule` reads back; fields at their defaults left out.

    A power function is written by its canonical sigma_rel
    (:func:`~posthoc_ema.profiles.canonical_sigma_rel`). This is the label
    synthesized files and sweep tables give a target.

    Raises:
        TypeError: for a schedule class this module does not define.

    Example:
        >>> schedule_spec(Constant(0.999, start=8000))
        'constant:beta=0.999,start=8000'
        >>> schedule_spec(0.1)
        'power:sigma_rel=0.1'
    """
    sched = as_schedule(schedule)
    if isinstance(sched, PowerFunction):
        return f"power:sigma_rel={profiles.canonical_sigma_rel(float(sched.sigma_rel))!r}"  # type: ignore[arg-type]
    for kind, (cls, fields) in _SPECS.items():
        if type(sched) is cls:
            parts = []
            for name, (attribute, default) in fields.items():
                value = float(getattr(sched, attribute))
                if default is None or value != default:
                    parts.append(f"{name}={_spec_value(value)}")
            return f"{kind}:{','.join(parts)}"
    raise TypeError(f"{sched!r} has no spec: only the schedules of posthoc_ema.schedules do")


def initial_weight(schedule: Schedule | float, out_step: float, *, update_steps: ArrayLike | None = None) -> float:
    """The weight the initial copy (the weights at step 0) still carries in the EMA read at ``out_step``.

    ``weights(update_steps, out_step)[0]``, without building the whole weight
    vector (updates at every integer step by default). Power-function
    snapshots give no weight to step 0, so a target that keeps much of it
    cannot be reconstructed from them.

    Example:
        >>> round(initial_weight(Constant(0.999), 2000), 4)
        0.1352
    """
    sched = as_schedule(schedule)
    initial = 0.0
    for _, _, _, last in sched._walk(update_steps, out_step):
        if last is not None:
            initial = last
    return float(initial)


def start_copy(
    schedule: Schedule | float, out_step: float, *, update_steps: ArrayLike | None = None
) -> tuple[float, float]:
    """``(step, weight)`` of the copy of the weights an EMA read at ``out_step`` started from.

    The latest update whose decay is 0 (``Constant(beta, start=s)`` copies at
    every update up to ``s``), or the initial copy at step 0 when no update
    copies; ``weight`` is what that copy still carries at ``out_step``. A copy is
    one step's weights held as a point mass, which no power-function snapshot
    profile reproduces: above 1% or so it dominates the reconstruction error.

    Example:
        >>> step, weight = start_copy(Constant(0.999, start=1000), 2000)
        >>> step, round(weight, 4)
        (1000.0, 0.3677)
    """
    sched = as_schedule(schedule)
    for t_prev, t, w, last in sched._walk(update_steps, out_step):
        copies = np.flatnonzero(np.isneginf(sched.log_beta(t, t_prev))) if t.size else np.zeros(0, dtype=np.intp)
        if copies.size:
            return float(t[copies[-1]]), float(w[copies[-1]])
        if last is not None:
            return 0.0, float(last)
    return 0.0, 0.0  # pragma: no cover - the walk always ends with its initial copy
