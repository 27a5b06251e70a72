"""The math of power-function EMA profiles (pure NumPy/SciPy, float64, no torch).

A power-function EMA of exponent ``gamma`` read at time ``T`` averages the
training trajectory with the density (EDM2, Karras et al. 2023, eq. 121)

    f_T(t) = (gamma + 1) * t**gamma / T**(gamma + 1),    0 < t <= T,

whose relative width is ``sigma_rel`` (eq. 123). Snapshots of a few such EMAs
are combined after training by least squares over these profiles (Sec. 3.3 and
Appendix C.2, Algorithm 3) to reconstruct the EMA of any other ``sigma_rel``.

Every function takes broadcastable arrays and returns float64 arrays.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg

__all__ = [
    "MAX_SIGMA_REL",
    "SIGMA_REL_DIGITS",
    "canonical_sigma_rel",
    "gamma_to_sigma_rel",
    "power_beta",
    "power_profile",
    "profile_inner_product",
    "reconstruction_error",
    "same_sigma_rel",
    "sigma_rel_to_gamma",
    "solve_coefficients",
]

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

#: Width of the uniform average over the whole run (gamma = 0). Every narrower
#: width has exactly one profile with gamma > 0, the root EDM2 eq. 126 picks.
MAX_SIGMA_REL = float(np.sqrt(1.0 / 12.0))


#: Significant digits that identify a sigma_rel (see :func:`canonical_sigma_rel`).
SIGMA_REL_DIGITS = 6


def canonical_sigma_rel(sigma_rel: float) -> float:
    """The value that stands for ``sigma_rel`` wherever sigma_rels are compared, stored or shown.

    Two sigma_rels are the same when they agree to :data:`SIGMA_REL_DIGITS` (6)
    significant digits. That is far coarser than float noise (``0.07`` against
    ``np.arange``'s ``0.07000000000000001``) and than float32 rounding
    (``np.float32(0.05)`` is ``0.05000000074505806``), and far finer than any
    difference between two EMAs worth telling apart (a relative 1e-6 in sigma_rel).
    The canonical value is the float of that 6-digit decimal. This is the one
    rule: the tracker, snapshot metadata, synthesis results and sweeps all use it.

    Args:
        sigma_rel: a number (Python, NumPy or a 0-d tensor).

    Returns:
        The canonical float.

    Example:
        >>> canonical_sigma_rel(0.07000000000000001), canonical_sigma_rel(np.float32(0.05))
        (0.07, 0.05)
    """
    return float(f"{float(sigma_rel):.{SIGMA_REL_DIGITS}g}")


def same_sigma_rel(a: float, b: float) -> bool:
    """Whether two sigma_rels are the same EMA width (see :func:`canonical_sigma_rel`).

    Example:
        >>> same_sigma_rel(0.05, np.float32(0.05)), same_sigma_rel(0.05, 0.051)
        (True, False)
    """
    return canonical_sigma_rel(a) == canonical_sigma_rel(b)


def _check_sigma_rel(sigma_rel: ArrayLike) -> FloatArray:
    s = np.asarray(sigma_rel, dtype=np.float64)
    bad = ~((s > 0) & (s < MAX_SIGMA_REL))
    if np.any(bad):
        value = float(s[bad].flat[0])
        raise ValueError(
            f"sigma_rel={value!r} is outside (0, {MAX_SIGMA_REL!r}); "
            "sigma_rel must be > 0 and below sqrt(1/12), the width of a uniform average"
        )
    return s


def _check_gamma(gamma: ArrayLike) -> FloatArray:
    g = np.asarray(gamma, dtype=np.float64)
    bad = ~(g > -1)  # also catches NaN
    if np.any(bad):
        raise ValueError(f"gamma={float(g[bad].flat[0])!r} is outside (-1, inf); the profile must be integrable")
    return g


def _check_step(step: ArrayLike, name: str) -> FloatArray:
    t = np.asarray(step, dtype=np.float64)
    bad = ~(t > 0) | ~np.isfinite(t)
    if np.any(bad):
        raise ValueError(f"{name}={float(t[bad].flat[0])!r} is not a positive step")
    return t


def gamma_to_sigma_rel(gamma: ArrayLike) -> FloatArray:
    """Relative standard deviation of a power-function profile of exponent ``gamma``.

    EDM2 eq. 123: ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``.

    Args:
        gamma: exponent(s), each > -1.

    Returns:
        sigma_rel, a float64 array of the same shape.

    Raises:
        ValueError: if a gamma is not > -1.

    Example:
        >>> round(float(gamma_to_sigma_rel(6.937203937601806)), 12)
        0.1
    """
    g = _check_gamma(gamma)
    return np.sqrt((g + 1) / (g + 3)) / (g + 2)  # (g + 2)**2 would overflow for gamma > 1e154


def sigma_rel_to_gamma(sigma_rel: ArrayLike) -> FloatArray:
    """Exponent ``gamma`` of the power-function profile of width ``sigma_rel``.

    EDM2 eq. 126: gamma is the largest real root of
    ``g**3 + 7 g**2 + (16 - s**-2) g + (12 - s**-2)``. On (0, sqrt(1/12)) the
    relation of eq. 123 is strictly decreasing, so the root is unique in (-1, inf);
    it is found in closed form by the cubic's trigonometric solution and polished
    with a Newton step.

    Args:
        sigma_rel: width(s), each in (0, sqrt(1/12)).

    Returns:
        gamma, a float64 array of the same shape.

    Raises:
        ValueError: if a sigma_rel is outside (0, sqrt(1/12)).

    Example:
        >>> round(float(sigma_rel_to_gamma(0.10)), 6)
        6.937204
    """
    s = _check_sigma_rel(sigma_rel)
    # Solve for u = gamma * sigma_rel, the cubic times s**3: its coefficients stay
    # bounded (s**-2 overflows for sigma_rel < 1e-154), and gamma = u / s.
    a2, a1, a0 = 7.0 * s, 16.0 * s**2 - 1.0, (12.0 * s**2 - 1.0) * s
    # Substitute u = x - a2/3 to get the depressed cubic x**3 + p x + q.
    p = a1 - a2**2 / 3
    q = 2 * a2**3 / 27 - a2 * a1 / 3 + a0
    # p < 0 on our domain, so the largest real root is given by the cosine formula.
    r = np.sqrt(-p / 3)
    arg = np.clip(3 * q / (2 * p * r), -1.0, 1.0)
    u = 2 * r * np.cos(np.arccos(arg) / 3) - a2 / 3
    for _ in range(2):  # Newton polish; the root is simple.
        f = ((u + a2) * u + a1) * u + a0
        df = (3 * u + 2 * a2) * u + a1
        u = u - f / df
    return u / s


def power_beta(gamma: ArrayLike, step: ArrayLike, prev_step: ArrayLike) -> FloatArray:
    """Decay that takes a power-function EMA from ``prev_step`` to ``step``.

    EDM2 eq. 127 with a step of ``step - prev_step``:
    ``beta = (1 - (step - prev_step) / step)**(gamma + 1) = (prev_step / step)**(gamma + 1)``.
    Applied at any cadence, the EMA at ``T`` then weights the value taken at
    ``t_i`` by ``(t_i**(gamma+1) - t_(i-1)**(gamma+1)) / T**(gamma+1)``: exactly the
    mass of the profile ``f_T`` over ``(t_(i-1), t_i]``. ``prev_step = 0`` gives 0,
    the first update copies.

    Example:
        >>> float(power_beta(0.0, 4, 3))
        0.75
    """
    g = _check_gamma(gamma)
    t = _check_step(step, "step")
    t_prev = np.asarray(prev_step, dtype=np.float64)
    bad = ~((t_prev >= 0) & (t_prev <= t))  # also catches NaN
    if np.any(bad):
        t_prev, t = np.broadcast_arrays(t_prev, t)
        raise ValueError(f"prev_step={float(t_prev[bad].flat[0])!r} is outside [0, step={float(t[bad].flat[0])!r}]")
    return (t_prev / t) ** (g + 1)


def power_profile(t: ArrayLike, step: ArrayLike, gamma: ArrayLike) -> FloatArray:
    """Density of the power-function profile read at ``step``, at times ``t`` (EDM2 eq. 121).

    ``f(t) = (gamma + 1) * t**gamma / step**(gamma + 1)`` for ``0 < t <= step``,
    and 0 elsewhere; it integrates to 1 over ``(0, step]``.

    Raises:
        ValueError: for a non-positive ``step`` or ``gamma <= -1``.

    Example:
        >>> power_profile([0.5, 1.0, 2.0], 1.0, 1.0).tolist()
        [1.0, 2.0, 0.0]
    """
    g = _check_gamma(gamma)
    end = _check_step(step, "step")
    at = np.asarray(t, dtype=np.float64)
    inside = (at > 0) & (at <= end)
    rel = np.where(inside, at / end, 1.0)  # 1.0 keeps rel**gamma finite where the profile is 0
    return np.where(inside, (g + 1) * rel**g / end, 0.0)


def profile_inner_product(step_a: ArrayLike, gamma_a: ArrayLike, step_b: ArrayLike, gamma_b: ArrayLike) -> FloatArray:
    """L2 inner product of two power-function profiles ``<f_a, f_b>``.

    EDM2 eq. 151 (Algorithm 3, ``p_dot_p``): for ``T_a <= T_b``,
    ``(g_a + 1)(g_b + 1) / ((g_a + g_b + 1) T_b) * (T_a / T_b)**g_b``, symmetric
    in the two profiles.

    Example:
        >>> float(profile_inner_product(1.0, 0.0, 1.0, 0.0))  # the uniform profile on (0, 1]
        1.0
    """
    ta = _check_step(step_a, "step")
    tb = _check_step(step_b, "step")
    ga = _check_gamma(gamma_a)
    gb = _check_gamma(gamma_b)
    bad = ~(ga + gb > -1)  # t**(g_a + g_b) is not integrable at 0 otherwise
    if np.any(bad):
        raise ValueError(
            f"gamma_a + gamma_b={float((ga + gb)[bad].flat[0])!r} is outside (-1, inf); "
            "the product of the profiles is not integrable"
        )
    # Order each pair so the shorter profile comes first.
    a_first = ta <= tb
    t_lo = np.where(a_first, ta, tb)
    t_hi = np.where(a_first, tb, ta)
    g_hi = np.where(a_first, gb, ga)
    return (ga + 1) * (gb + 1) / ((ga + gb + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def _gram(in_steps: FloatArray, in_gammas: FloatArray) -> FloatArray:
    return profile_inner_product(in_steps[:, None], in_gammas[:, None], in_steps[None, :], in_gammas[None, :])


def _lstsq(gram: FloatArray, rhs: FloatArray) -> FloatArray:
    # The Gram matrix of hundreds of snapshots reaches condition numbers of 1e10
    # and more. Rescaling to unit diagonal removes the part that comes from
    # profiles of different heights (~1/T); an eigendecomposition then solves in
    # the least-squares sense, dropping directions below float64 resolution
    # instead of amplifying their noise (as a plain inverse or Cholesky would).
    d = 1.0 / np.sqrt(np.diag(gram))
    scaled = gram * d[:, None] * d[None, :]
    w, v = scipy.linalg.eigh(scaled)
    keep = w > w[-1] * 1e-14
    coef: FloatArray = v[:, keep] @ ((v[:, keep].T @ (rhs * d[:, None])) / w[keep, None])
    return coef * d[:, None]


# -- solving at scale ------------------------------------------------------------------
#
# Snapshots come in classes (one per gamma) and, from the tracker, every class has a
# snapshot at every step of one grid T_1 < ... < T_M. Then (EDM2 eq. 121)
#
#     f_(T_k, g) = (g + 1) / T_k**(g + 1) * sum_(j <= k) t**g 1[T_(j-1) < t <= T_j]    (T_0 = 0),
#
# so the snapshot profiles span exactly the functions that are, on each interval
# (T_(j-1), T_j], a combination of t**g_a over the classes a. Functions on disjoint
# intervals are orthogonal, so the L2 projection of a target decouples into one K x K
# least-squares problem per interval (K classes): O(M K**3) instead of the O((M K)**3)
# of the dense Gram matrix, and each small problem is far better conditioned. On
# interval j we use the basis e_(j,a) = f_(T_j, g_a) restricted to the interval, whose
# Gram entries and target moments are finite for any step (no T**g appears):
#
#     <e_(j,a), e_(j,b)> = (g_a+1)(g_b+1) / ((g_a+g_b+1) T_j) * (1 - (T_(j-1)/T_j)**(g_a+g_b+1)).
#
# A combination sum_(j,a) v_(j,a) e_(j,a) equals sum_(k,a) c_(k,a) f_(T_k, g_a) with the
# telescoped weights c_(k,a) = v_(k,a) - (T_k/T_(k+1))**(g_a+1) v_(k+1,a) (v_(M+1) = 0).

_DENSE_MAX = 500  # irregular sets up to this many distinct snapshots take the dense solve
_CUTOFF = 1e-14  # eigenvalues below this fraction of the largest are float64 noise
_MAX_LOG_SPAN = 500.0  # exp(+-500) is far from overflow and from subnormals


class _Grid:
    """Snapshots grouped by step (sorted union grid) and by class (sorted unique gamma)."""

    steps: FloatArray  # [M] the sorted distinct steps T_1 < ... < T_M
    gammas: FloatArray  # [K] the sorted distinct exponents
    step_index: IntArray  # [n] position of each snapshot's step in ``steps``
    class_index: IntArray  # [n] position of each snapshot's gamma in ``gammas``
    cell_index: IntArray  # [n] position of each snapshot's (step, gamma) among the occupied cells
    multiplicity: IntArray  # [n_cells] snapshots in each occupied cell
    regular: bool  # every class has a snapshot at every step
    occupied: npt.NDArray[np.bool_]  # [M, K] whether class a has a snapshot at step j
    log_ratio: FloatArray  # [M] log(T_(j-1) / T_j), with T_0 = 0

    def __init__(self, steps: FloatArray, gammas: FloatArray) -> None:
        self.steps, step_index = np.unique(steps, return_inverse=True)
        self.gammas, class_index = np.unique(gammas, return_inverse=True)
        self.step_index, self.class_index = step_index.reshape(-1), class_index.reshape(-1)
        cell = self.step_index * self.gammas.size + self.class_index
        cells, cell_index, self.multiplicity = np.unique(cell, return_inverse=True, return_counts=True)
        self.cell_index = cell_index.reshape(-1)
        self.regular = cells.size == self.steps.size * self.gammas.size
        self.occupied = np.zeros((self.steps.size, self.gammas.size), dtype=bool)
        self.occupied.reshape(-1)[cells] = True
        self.log_ratio = np.concatenate([[-np.inf], np.log(self.steps[:-1] / self.steps[1:])])


def _decayed_cumsum(log_decay: FloatArray, values: FloatArray) -> FloatArray:
    """``s[0] = values[0]``, ``s[m] = exp(log_decay[m]) s[m-1] + values[m]`` along axis 0.

    ``log_decay`` (<= 0, broadcastable to ``values``; its row 0 is ignored) gives the
    decay from one row to the next. Vectorised by blocks in which the total decay stays
    below exp(-500), so that the closed form ``exp(L_m) * cumsum(values * exp(-L))`` with
    ``L = cumsum(log_decay)`` neither overflows nor loses the small terms; the same
    rounding bound as the plain recurrence.
    """
    rows = values.shape[0]
    decay = np.broadcast_to(np.maximum(log_decay, -1000.0), values.shape).copy()  # exp(-1000) is already 0
    decay[0] = 0.0
    out = np.empty_like(values)
    # The block boundaries follow the fastest-decaying column.
    envelope = np.cumsum(-decay.reshape(rows, -1).min(axis=1))
    start = 0
    while start < rows:
        stop = int(np.searchsorted(envelope, envelope[start] + _MAX_LOG_SPAN, side="right"))
        stop = max(stop, start + 1)
        depth = np.cumsum(decay[start:stop], axis=0)
        depth -= depth[0]  # <= 0 and >= -_MAX_LOG_SPAN
        carry = 0.0 if start == 0 else np.exp(decay[start]) * out[start - 1]
        out[start:stop] = np.exp(depth) * (np.cumsum(values[start:stop] * np.exp(-depth), axis=0) + carry)
        start = stop
    return out


def _by_cell(grid: _Grid, x: FloatArray) -> FloatArray:
    """Sum the rows of ``x`` [n, ...] into ``[n_steps, n_classes, ...]`` by (step, class)."""
    out = np.zeros((grid.steps.size, grid.gammas.size, *x.shape[1:]))
    np.add.at(out, (grid.step_index, grid.class_index), x)
    return out


def _gram_matvec(grid: _Grid, x: FloatArray) -> FloatArray:
    """``G @ x`` for the Gram matrix of the snapshot profiles (EDM2 eq. 151), without forming ``G``.

    The Gram matrix is semiseparable: for ``T_i <= T_j``,
    ``G_ij = c(g_i, g_j) / T_j * (T_i / T_j)**g_j`` with ``c(a, b) = (a+1)(b+1)/(a+b+1)``.
    So ``(G x)_j = sum_a c(g_a, g_j) / T_j * (L_(a, g_j)(T_j) + U_a(T_j))``, where
    ``L_(a, g)(T) = sum_(i in a, T_i <= T) x_i (T_i/T)**g`` and
    ``U_a(T) = sum_(i in a, T_i > T) x_i (T/T_i)**(g_a+1)`` are decayed running sums
    over the sorted steps, in ``O(n_steps K**2)`` for ``K`` classes. Works for any set
    of snapshots (repeated, missing, or on different grids).
    """
    g = grid.gammas
    per_cell = _by_cell(grid, x)  # [M, K_a, n_out]
    extra = (1,) * (x.ndim - 1)
    log_ratio = np.concatenate([[0.0], grid.log_ratio[1:]])  # row 0 has no predecessor (and gamma may be 0)
    # Sums over earlier-or-equal steps, decayed by the exponent of the output class b: [M, K_b, K_a, ...].
    log_lower = log_ratio.reshape(-1, 1, 1, *extra) * g.reshape(1, -1, 1, *extra)
    lower = _decayed_cumsum(
        log_lower, np.broadcast_to(per_cell[:, None], (per_cell.shape[0], g.size, *per_cell.shape[1:]))
    )
    # Sums over strictly later steps, decayed by the exponent + 1 of their own class a.
    log_upper = log_ratio.reshape(-1, 1, *extra) * (g.reshape(1, -1, *extra) + 1)
    # Run backwards: inclusive[m] = per_cell[m] + (T_m/T_(m+1))**(g_a+1) inclusive[m+1].
    backwards = np.concatenate([log_upper[:1], log_upper[1:][::-1]])
    inclusive = _decayed_cumsum(backwards, per_cell[::-1])[::-1]
    upper = np.zeros_like(per_cell)
    upper[:-1] = np.exp(log_upper[1:]) * inclusive[1:]
    c = (g[:, None] + 1) * (g[None, :] + 1) / (g[:, None] + g[None, :] + 1)  # [K_b, K_a]
    c = c.reshape(*c.shape, *extra)
    total = (c[None] * (lower + upper[:, None])).sum(axis=2)  # [M, K_b, ...]
    total /= grid.steps.reshape(-1, 1, *extra)
    product: FloatArray = total[grid.step_index, grid.class_index]
    return product


def _interval_gram(grid: _Grid) -> FloatArray:
    """``[M, K, K]`` Gram matrices of the interval bases ``e_(j,a)`` (see the section comment)."""
    g = grid.gammas
    p1 = g[:, None] + g[None, :] + 1
    mass = -np.expm1(p1[None] * grid.log_ratio[:, None, None])  # 1 - (T_(j-1)/T_j)**(p+1), stable for short intervals
    return ((g[:, None] + 1) * (g[None, :] + 1) / p1)[None] * mass / grid.steps[:, None, None]


def _power_moments(grid: _Grid, out_step: FloatArray, out_gammas: FloatArray) -> FloatArray:
    """``[M, K, n_out]`` moments ``<e_(j,a), f_(out_step, g_o)>`` of power-function targets (steps <= out_step)."""
    g = grid.gammas[None, :, None]
    go = out_gammas[None, None, :]
    q1 = g + go + 1
    mass = -np.expm1(q1 * grid.log_ratio[:, None, None])
    reach = np.exp(go * np.log(grid.steps / out_step)[:, None, None])  # (T_j / out_step)**g_o <= 1
    moments: FloatArray = (g + 1) * (go + 1) / (q1 * out_step) * reach * mass
    return moments


def _cross_from_moments(grid: _Grid, moments: FloatArray) -> FloatArray:
    """``<f_i, h>`` for every snapshot: ``sum_(j <= k) (T_j/T_k)**(g_a+1) <e_(j,a), h>``."""
    log_decay = grid.log_ratio[:, None, None] * (grid.gammas[None, :, None] + 1)
    cross: FloatArray = _decayed_cumsum(log_decay, moments)[grid.step_index, grid.class_index]
    return cross


def _moments_from_cross(grid: _Grid, cross: FloatArray) -> FloatArray:
    """The inverse of :func:`_cross_from_moments` on a regular grid (first of any repeated snapshots)."""
    per_cell = np.zeros((grid.steps.size, grid.gammas.size, cross.shape[1]))
    per_cell[grid.step_index[::-1], grid.class_index[::-1]] = cross[::-1]
    decay = np.exp(grid.log_ratio[1:, None, None] * (grid.gammas[None, :, None] + 1))
    moments: FloatArray = per_cell.copy()
    moments[1:] -= decay * per_cell[:-1]
    return moments


def _power_cross(steps: FloatArray, gammas: FloatArray, out_step: FloatArray, out_gammas: FloatArray) -> FloatArray:
    """``[n, n_out]`` inner products of the snapshot profiles with power-function targets."""
    return profile_inner_product(steps[:, None], gammas[:, None], out_step, out_gammas[None, :])


def _solve_intervals(grid: _Grid, moments: FloatArray, target_sq: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Weights per (step, class) ``[M, K, n_out]``, unnormalised, and ``||projection||**2`` per target."""
    gram = _interval_gram(grid)
    d = 1.0 / np.sqrt(np.einsum("jaa->ja", gram))
    scaled = gram * d[:, :, None] * d[:, None, :]
    w, v = np.linalg.eigh(scaled)
    # Same rule as _lstsq: drop directions below float64 resolution of each interval's matrix.
    inv_w = np.where(w > w[:, -1:] * _CUTOFF, 1.0 / np.where(w > 0, w, 1.0), 0.0)
    local = d[:, :, None] * (v @ (inv_w[:, :, None] * (v.transpose(0, 2, 1) @ (moments * d[:, :, None]))))
    projected_sq = np.einsum("jao,jao->o", local, moments)
    # Telescope back to snapshot weights: c_(k,a) = v_(k,a) - (T_k/T_(k+1))**(g_a+1) v_(k+1,a).
    coef = local.copy()
    coef[:-1] -= np.exp(grid.log_ratio[1:, None, None] * (grid.gammas[None, :, None] + 1)) * local[1:]
    return coef, projected_sq


def _solve_cells(
    grid: _Grid, target_sq: FloatArray, *, moments: FloatArray | None, cross: FloatArray | None
) -> tuple[FloatArray, FloatArray]:
    """Weights per occupied (step, class) cell ``[n_cells, n_out]``, unnormalised, and their squared errors.

    For snapshots on any set of steps: class ``a`` with snapshots at ``s_1 < ... < s_n``
    spans the functions ``t**g_a`` times a constant on each of its own cells
    ``(s_(i-1), s_i]``. Cells of one class are disjoint, cells of two classes overlap on
    a run of union intervals, so the normal equations in the cell basis (each cell's
    function is ``f_(s_i, g_a)`` restricted to the cell) are sparse, ``O(M K**2)``
    entries. They are scaled to unit diagonal and solved by sparse LU with a ridge of
    ``1e-13``, which, like the eigenvalue cutoff of the dense solve, keeps directions
    below float64 resolution from amplifying noise.
    """
    n_steps, n_classes = grid.occupied.shape
    log_t = np.log(grid.steps)
    cell_number = np.full((n_steps, n_classes), -1)
    cell_number[grid.occupied] = np.arange(int(grid.occupied.sum()))
    # The cell that covers interval j for class a: its next snapshot at or after T_j.
    rows = np.arange(n_steps)[:, None]
    owner = np.minimum.accumulate(np.where(grid.occupied, rows, n_steps)[::-1], axis=0)[::-1]  # [M, K]
    covered = owner < n_steps
    owner_safe = np.where(covered, owner, 0)
    # e_cell restricted to interval j is (T_j / s)**(g_a + 1) times the interval basis e_(j,a).
    # (Uncovered entries get exp(-inf) = 0: exp of their meaningless exponent could overflow.)
    exponent = (grid.gammas[None, :] + 1) * (log_t[:, None] - log_t[owner_safe])
    factor = np.exp(np.where(covered, exponent, -np.inf))
    cell_of = np.where(covered, cell_number[owner_safe, np.arange(n_classes)[None, :]], 0)
    n_cells = int(grid.occupied.sum())
    interval_gram = _interval_gram(grid)
    j, a, b = np.nonzero(covered[:, :, None] & covered[:, None, :])
    values = factor[j, a] * factor[j, b] * interval_gram[j, a, b]
    normal = scipy.sparse.csr_matrix((values, (cell_of[j, a], cell_of[j, b])), shape=(n_cells, n_cells))
    if moments is not None:
        rhs = np.zeros((n_cells, moments.shape[2]))
        jj, aa = np.nonzero(covered)
        np.add.at(rhs, cell_of[jj, aa], factor[jj, aa, None] * moments[jj, aa])
    else:
        assert cross is not None
        # <e_cell, h> = <f_(s_i), h> - (s_(i-1)/s_i)**(g+1) <f_(s_(i-1)), h> within each class.
        per_cell = np.zeros((n_cells, cross.shape[1]))
        per_cell[cell_number[grid.step_index[::-1], grid.class_index[::-1]]] = cross[::-1]
        rhs = per_cell.copy()
        steps_of, classes_of = np.nonzero(grid.occupied)  # in cell order, class-major within a step
        for klass in range(n_classes):
            mine = np.flatnonzero(classes_of == klass)
            ratio = (grid.gammas[klass] + 1) * (log_t[steps_of[mine[:-1]]] - log_t[steps_of[mine[1:]]])
            rhs[mine[1:]] -= np.exp(ratio)[:, None] * per_cell[mine[:-1]]
    d = 1.0 / np.sqrt(normal.diagonal())
    scaled = scipy.sparse.diags(d) @ normal @ scipy.sparse.diags(d) + 1e-13 * scipy.sparse.identity(n_cells)
    local = d[:, None] * scipy.sparse.linalg.splu(scaled.tocsc()).solve(d[:, None] * rhs)
    # Telescope within each class to snapshot weights: c_i = v_i - (s_i/s_(i+1))**(g+1) v_(i+1).
    coef = local.copy()
    steps_of, classes_of = np.nonzero(grid.occupied)
    for klass in range(n_classes):
        mine = np.flatnonzero(classes_of == klass)
        ratio = (grid.gammas[klass] + 1) * (log_t[steps_of[mine[:-1]]] - log_t[steps_of[mine[1:]]])
        coef[mine[:-1]] -= np.exp(ratio)[:, None] * local[mine[1:]]
    total = coef.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = local / total
        sq = np.einsum("co,co->o", v, normal @ v) - 2 * np.einsum("co,co->o", v, rhs) + target_sq
    return coef, sq


def _solve_targets(
    steps: FloatArray,
    gammas: FloatArray,
    target_sq: FloatArray,
    *,
    moments: FloatArray | None = None,
    cross: FloatArray | None = None,
    normalise: bool = True,
) -> tuple[FloatArray, FloatArray]:
    """Least-squares weights of the snapshots for targets given by their inner products.

    The solver behind :func:`solve_coefficients`, for any target ``h`` in L2 (a
    power-function profile, or the profile of another EMA schedule), known only through
    its inner products with the snapshot profiles.

    Args:
        steps: ``[n]`` step of each snapshot to use (all at or before the target's step).
        gammas: ``[n]`` exponent of each snapshot (each > -1/2).
        target_sq: ``[n_out]`` squared norms ``||h||**2``.
        moments: ``[M, K, n_out]`` per-interval moments, the fast input. With ``T_1 < ...
            < T_M = np.unique(steps)``, ``T_0 = 0`` and ``g_1 < ... < g_K = np.unique(gammas)``,
            ``moments[j, a] = integral over (T_(j-1), T_j] of f_(T_j, g_a)(t) h(t) dt``,
            that is ``(g_a + 1) / T_j * integral (t/T_j)**g_a h(t) dt`` (the snapshot profile
            restricted to its last interval).
        cross: ``[n, n_out]`` inner products ``<f_(steps[i], gammas[i]), h>`` (EDM2's
            ``p_dot_p`` of a snapshot with the target). Give this or ``moments``, or both
            (each path uses the one it needs without conversion).
        normalise: scale each column to sum to 1 (the default). With False the
            coefficients are those of the L2 projection of each target onto the
            snapshots' span, unscaled, and the errors are NaN (what a further
            solve, such as ``synthesis``'s with classic snapshots, builds on).

    Returns:
        ``(coef, errors)``: ``[n, n_out]`` weights normalised so each column sums to 1,
        and ``[n_out]`` relative errors ``||sum_i coef_i f_i - h|| / ||h||`` of those
        weights. A column whose weights sum to 0 (a target that does not overlap the
        snapshots in float64) is NaN, with a NaN error.

    When every class has a snapshot at every step (the tracker's layout; repeated
    snapshots are allowed), the problem splits into one ``K x K`` problem per interval:
    ``O(M K**3)`` time and ``O(M K**2)`` memory. Otherwise it falls back to the dense
    Gram matrix (``O(n**3)``, as EDM2's Algorithm 3) up to 500 distinct snapshots, and
    beyond that to sparse normal equations over each class's own cells (see
    :func:`_solve_cells`), whose size grows linearly. Repeated (step, gamma) snapshots
    share their weight equally, the minimum-norm solution the dense solve also finds.
    ``moments`` and ``cross`` are converted into each other as needed (``cross`` from
    ``moments`` by a stable decayed running sum; ``moments`` from ``cross`` by differences,
    which loses the accuracy of a moment much smaller than its snapshot's cross product).
    """
    if moments is None and cross is None:
        raise TypeError("give moments or cross (or both)")
    grid = _Grid(steps, gammas)
    if grid.regular:
        if moments is None:
            assert cross is not None  # for mypy: checked above
            moments = _moments_from_cross(grid, cross)
        per_cell, projected_sq = _solve_intervals(grid, moments, target_sq)
        total = per_cell.sum(axis=(0, 1))
        # Each repeated snapshot takes an equal share of its cell's weight.
        coef = per_cell[grid.step_index, grid.class_index] / grid.multiplicity[grid.cell_index, None]
        # ||v / s - h||**2 with <v, h> = ||v||**2 = projected_sq for the projection v.
        with np.errstate(divide="ignore", invalid="ignore"):
            sq = target_sq - (2.0 / total - 1.0 / total**2) * projected_sq
    elif grid.multiplicity.size > _DENSE_MAX:
        per_cell, sq = _solve_cells(grid, target_sq, moments=moments, cross=cross)
        total = per_cell.sum(axis=0)
        coef = per_cell[grid.cell_index] / grid.multiplicity[grid.cell_index, None]
    else:
        if cross is None:
            assert moments is not None
            cross = _cross_from_moments(grid, moments)
        gram = _gram(steps, gammas)
        coef = _lstsq(gram, cross)
        total = coef.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            normalised = coef / total
            sq = (
                np.einsum("io,ij,jo->o", normalised, gram, normalised)
                - 2 * np.einsum("io,io->o", normalised, cross)
                + target_sq
            )
    if not normalise:
        return coef, np.full(coef.shape[1], np.nan)
    lost = ~(np.abs(total) > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(lost, np.nan, coef / np.where(lost, 1.0, total))
        errors = np.where(lost, np.nan, np.sqrt(np.maximum(sq, 0.0) / target_sq))
    return coef, errors


def _squared_error(
    coef: FloatArray, in_steps: FloatArray, in_gammas: FloatArray, out_step: FloatArray, out_gammas: FloatArray
) -> FloatArray:
    grid = _Grid(in_steps, in_gammas)
    cross = profile_inner_product(in_steps[:, None], in_gammas[:, None], out_step, out_gammas[None, :])
    target = profile_inner_product(out_step, out_gammas, out_step, out_gammas)
    # ||sum_i c_i f_i - f||^2 expanded through inner products alone, G c without forming G.
    gram_coef = _gram_matvec(grid, coef)
    sq: FloatArray = np.einsum("io,io->o", coef, gram_coef) - 2 * np.einsum("io,io->o", coef, cross) + target
    return np.maximum(sq, 0.0) / target


def _prepare(
    in_steps: ArrayLike, in_sigma_rels: ArrayLike, out_step: ArrayLike, out_sigma_rels: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    steps, sigmas = np.broadcast_arrays(_check_step(in_steps, "step"), _check_sigma_rel(in_sigma_rels))
    steps, sigmas = steps.reshape(-1), sigmas.reshape(-1)
    out_t = _check_step(out_step, "out_step")
    if out_t.ndim != 0:
        raise ValueError(f"out_step must be a single step, got an array of shape {out_t.shape}")
    out_gammas = sigma_rel_to_gamma(np.reshape(out_sigma_rels, -1))
    return steps, sigma_rel_to_gamma(sigmas), out_t, out_gammas


def solve_coefficients(
    in_steps: ArrayLike, in_sigma_rels: ArrayLike, out_step: ArrayLike, out_sigma_rels: ArrayLike
) -> FloatArray:
    """Least-squares weights that turn snapshots into the EMA of other sigma_rels.

    Finds, for each target, the combination of the snapshot profiles
    ``f_(T_i, gamma_i)`` closest in L2 to the target profile ``f_(out_step, gamma)``
    (EDM2 Sec. 3.3 and Algorithm 3), using only snapshots with step <= ``out_step``
    (a later snapshot averages weights from after the requested time), and
    normalises each column to sum to 1 so a constant trajectory is reproduced
    exactly.

    When every sigma_rel has a snapshot at every snapshot step (the tracker's
    layout), the problem splits into one small least-squares problem per interval
    between consecutive steps, in time linear in the number of snapshots; other
    sets use the dense Gram matrix up to 500 snapshots and sparse normal
    equations beyond (see ``_solve_targets``).

    Args:
        in_steps: step of each snapshot; broadcast against ``in_sigma_rels``.
        in_sigma_rels: sigma_rel of each snapshot.
        out_step: the single step at which to reconstruct.
        out_sigma_rels: target sigma_rel(s).

    Returns:
        A float64 array ``[n_in, n_out]``; rows of snapshots after ``out_step`` are 0.

    Raises:
        ValueError: for a sigma_rel outside (0, sqrt(1/12)), a non-positive step,
            when no snapshot lies at or before ``out_step``, or when a target's
            profile does not overlap theirs at all (in float64).

    Example:
        >>> c = solve_coefficients([100, 100, 200, 200], [0.05, 0.1, 0.05, 0.1], 200, 0.15)
        >>> c.shape, round(float(c.sum()), 12)
        ((4, 1), 1.0)
    """
    steps, gammas, out_t, out_gammas = _prepare(in_steps, in_sigma_rels, out_step, out_sigma_rels)
    used = steps <= out_t
    if not np.any(used):
        raise ValueError(
            f"no snapshot at or before out_step={float(out_t)!r}; the earliest is at {float(steps.min())!r}"
        )
    target_sq = profile_inner_product(out_t, out_gammas, out_t, out_gammas)
    grid = _Grid(steps[used], gammas[used])
    moments = _power_moments(grid, out_t, out_gammas)
    cross = None if grid.regular else _power_cross(steps[used], gammas[used], out_t, out_gammas)
    coef, _ = _solve_targets(steps[used], gammas[used], target_sq, moments=moments, cross=cross)
    # A narrow target far after the last snapshot overlaps none of them in float64:
    # every product underflows to 0 and there is nothing to normalise.
    lost = np.isnan(coef[0])
    if np.any(lost):
        sigma_rel = float(np.reshape(np.asarray(out_sigma_rels, dtype=np.float64), -1)[np.argmax(lost)])
        raise ValueError(
            f"sigma_rel={sigma_rel!r} at out_step={float(out_t)!r} has no overlap with the snapshots at or "
            f"before it (the latest is at {float(steps[used].max())!r}); reconstruct at an earlier step "
            "or a wider sigma_rel"
        )
    full = np.zeros((steps.size, out_gammas.size))
    full[used] = coef
    return full


def reconstruction_error(
    coefficients: ArrayLike,
    in_steps: ArrayLike,
    in_sigma_rels: ArrayLike,
    out_step: ArrayLike,
    out_sigma_rels: ArrayLike,
) -> FloatArray:
    """Relative L2 error ``||sum_i c_i f_i - f|| / ||f||`` of reconstructed profiles.

    Computed from inner products alone (the Gram matrix, the snapshot-target
    products and ``<f, f>``), so it needs no tensors: it says how far the weights
    of a synthesized EMA are from the requested profile, before anything is read.
    The Gram matrix is never formed: its product with the weights comes from
    running sums over the sorted steps, in time and memory linear in the number
    of snapshots, for any weights and any set of snapshots.

    Args:
        coefficients: ``[n_in, n_out]`` weights, as from :func:`solve_coefficients`.
        in_steps, in_sigma_rels, out_step, out_sigma_rels: as for :func:`solve_coefficients`.

    Returns:
        A float64 array ``[n_out]`` of relative errors.

    Example:
        >>> c = solve_coefficients([100, 100], [0.05, 0.1], 100, 0.1)
        >>> reconstruction_error(c, [100, 100], [0.05, 0.1], 100, 0.1) < 1e-6
        array([ True])
    """
    steps, gammas, out_t, out_gammas = _prepare(in_steps, in_sigma_rels, out_step, out_sigma_rels)
    coef = np.asarray(coefficients, dtype=np.float64)
    if coef.size != steps.size * out_gammas.size:
        raise ValueError(
            f"coefficients have shape {coef.shape}, expected ({steps.size}, {out_gammas.size}) "
            "(one row per snapshot, one column per target sigma_rel)"
        )
    coef = coef.reshape(steps.size, out_gammas.size)
    return np.sqrt(_squared_error(coef, steps, gammas, out_t, out_gammas))
