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


def _squared_error(
    coef: FloatArray, in_steps: FloatArray, in_gammas: FloatArray, out_step: FloatArray, out_gammas: FloatArray
) -> FloatArray:
    gram = _gram(in_steps, in_gammas)
    cross = profile_inner_product(in_steps[:, None], in_gammas[:, None], out_step, out_gammas[None, :])
    target = profile_inner_product(out_step, out_gammas, out_step, out_gammas)
    # ||sum_i c_i f_i - f||^2 expanded through inner products alone.
    sq: FloatArray = np.einsum("io,ij,jo->o", coef, gram, coef) - 2 * np.einsum("io,io->o", coef, cross) + target
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
    gram = _gram(steps[used], gammas[used])
    cross = profile_inner_product(steps[used, None], gammas[used, None], out_t, out_gammas[None, :])
    coef = _lstsq(gram, cross)
    total = coef.sum(axis=0, keepdims=True)
    # A narrow target far after the last snapshot overlaps none of them in float64:
    # every product underflows to 0 and there is nothing to normalise.
    lost = ~(np.abs(total[0]) > 0)
    if np.any(lost):
        sigma_rel = float(np.reshape(np.asarray(out_sigma_rels, dtype=np.float64), -1)[np.argmax(lost)])
        raise ValueError(
            f"sigma_rel={sigma_rel!r} at out_step={float(out_t)!r} has no overlap with the snapshots at or "
            f"before it (the latest is at {float(steps[used].max())!r}); reconstruct at an earlier step "
            "or a wider sigma_rel"
        )
    coef = coef / total
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
