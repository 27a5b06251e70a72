"""posthoc_ema.profiles against the paper's equations and independent numerics.

Every reference here is computed without the function under test: gamma from
``numpy.roots`` of EDM2 eq. 126, widths and inner products by ``scipy.integrate.quad``,
least-squares fits and errors on a dense Gauss-Legendre grid over time. Each
check runs exhaustively on a small grid and as a Hypothesis property.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
from helpers import reference_gamma
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import posthoc_ema.profiles as profiles
from posthoc_ema.profiles import (
    MAX_SIGMA_REL,
    canonical_sigma_rel,
    gamma_to_sigma_rel,
    power_beta,
    profile_inner_product,
    reconstruction_error,
    same_sigma_rel,
    sigma_rel_to_gamma,
    solve_coefficients,
)

# -- independent references ------------------------------------------------------


def profile_at(t: float, step: float, gamma: float) -> float:
    """f_T(t) = (gamma + 1) t^gamma / T^(gamma + 1) on (0, T], written to stay finite."""
    return (gamma + 1) / step * (t / step) ** gamma if 0 < t <= step else 0.0


def quad(fn, lo: float, hi: float, *, sharpness: float) -> float:
    """Adaptive quadrature of fn on (lo, hi], helped by breakpoints where a t^sharpness peak lives."""
    points = [hi - (hi - lo) * j / sharpness for j in (1, 4, 16, 64) if j < sharpness] or None
    with warnings.catch_warnings():
        # quad warns when it cannot reach epsrel; the comparison that follows judges the accuracy.
        warnings.simplefilter("ignore", scipy.integrate.IntegrationWarning)
        value, _ = scipy.integrate.quad(fn, lo, hi, points=points, limit=400, epsabs=0.0, epsrel=1e-12)
    return value


def inner_product_by_quad(step_a: float, gamma_a: float, step_b: float, gamma_b: float) -> float:
    end = min(step_a, step_b)
    return quad(
        lambda t: profile_at(t, step_a, gamma_a) * profile_at(t, step_b, gamma_b),
        0.0,
        end,
        sharpness=gamma_a + gamma_b + 1,
    )


def sigma_rel_by_quad(gamma: float) -> float:
    """Standard deviation of the profile read at T = 1 (so relative to T), by quadrature."""
    mean = quad(lambda t: t * profile_at(t, 1.0, gamma), 0.0, 1.0, sharpness=gamma + 1)
    var = quad(lambda t: (t - mean) ** 2 * profile_at(t, 1.0, gamma), 0.0, 1.0, sharpness=gamma + 1)
    return math.sqrt(var)


def time_grid(breaks: np.ndarray, nodes: int, *, sharpness: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on (0, max(breaks)], split at every break.

    Profiles are smooth between snapshot steps and jump to 0 after theirs, so
    splitting there makes the rule accurate. The first interval is refined
    geometrically towards 0, where t^gamma with a small gamma is not smooth, and,
    for a t^sharpness peak, the end of every interval towards its break.
    """
    breaks = np.unique(np.asarray(breaks, dtype=np.float64))
    ends = breaks[:, None] * (1 - 2.0 ** -np.arange(1.0, np.log2(sharpness + 1) + 4))
    breaks = np.unique(np.concatenate([[0.0], breaks[0] * 2.0 ** -np.arange(1.0, 50.0), ends.ravel(), breaks]))
    x, w = np.polynomial.legendre.leggauss(nodes)
    lo, hi = breaks[:-1, None], breaks[1:, None]
    return ((lo + hi) / 2 + (hi - lo) / 2 * x).ravel(), ((hi - lo) / 2 * w).ravel()


def profiles_on(t: np.ndarray, steps: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """[len(t), len(steps)] matrix of the profiles f_(steps[i], gammas[i]) sampled at t."""
    t = t[:, None]
    inside = t <= steps[None, :]
    ratio = np.where(inside, t / steps[None, :], 0.0)
    return np.where(inside, (gammas[None, :] + 1) / steps[None, :] * ratio ** gammas[None, :], 0.0)


class DenseProblem:
    """The least-squares problem of post-hoc reconstruction, discretised on a dense time grid."""

    def __init__(self, in_steps, in_sigma_rels, out_step, out_sigma_rels, *, nodes: int = 16, refine: bool = True):
        self.steps, sigmas = (np.ravel(a).astype(np.float64) for a in np.broadcast_arrays(in_steps, in_sigma_rels))
        self.out_step = float(out_step)
        gammas = np.array([reference_gamma(s) for s in sigmas])
        out_gammas = np.array([reference_gamma(s) for s in np.ravel(out_sigma_rels)])
        sharpness = 2 * max(gammas.max(), out_gammas.max()) if refine else 0.0
        self.t, self.w = time_grid(np.concatenate([self.steps, [self.out_step]]), nodes, sharpness=sharpness)
        self.a = profiles_on(self.t, self.steps, gammas)
        self.b = profiles_on(self.t, np.full(out_gammas.shape, self.out_step), out_gammas)
        self.used = self.steps <= self.out_step

    def error(self, coef: np.ndarray) -> np.ndarray:
        """Relative L2 error ||A c - b|| / ||b|| of each column, by quadrature."""
        residual = self.a @ coef - self.b
        return np.sqrt((self.w[:, None] * residual**2).sum(0) / (self.w[:, None] * self.b**2).sum(0))

    def optimum(self) -> np.ndarray:
        """Unconstrained least-squares coefficients over the snapshots at or before out_step."""
        sw = np.sqrt(self.w)[:, None]
        # cond: treat relative singular values below 1e-12 as 0 (repeated snapshots are exactly dependent).
        coef_used, *_ = scipy.linalg.lstsq(self.a[:, self.used] * sw, self.b * sw, cond=1e-12, lapack_driver="gelsy")
        coef = np.zeros((self.steps.size, self.b.shape[1]))
        coef[self.used] = coef_used
        return coef


# -- strategies --------------------------------------------------------------------

# Widths that cover the practical range; gamma from ~0.3 to ~200.
practical_sigma_rels = st.floats(min_value=0.005, max_value=0.25)
# The whole domain whose gamma is a finite float64 (sigma_rel down to 1e-300).
all_sigma_rels = st.floats(min_value=1e-300, max_value=MAX_SIGMA_REL, exclude_max=True)
steps_st = st.floats(min_value=1e-3, max_value=1e7)
# Exponents whose profiles are square-integrable (gamma > -1/2) and quad can resolve.
l2_gammas = st.floats(min_value=-0.45, max_value=1e4)

SMALL_SIGMA_RELS = [1e-300, 1e-200, 1e-154, 1e-100, 1e-12, 1e-6, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.28, 0.2886]
SMALL_STEPS = [1.0, 3.0, 10.0, 1000.0, 1e6]
SMALL_GAMMAS = [-0.45, -0.2, 0.0, 0.5, 3.0, 6.94, 16.97, 100.0, 1000.0, 1e4]


def snapshot_sets():
    """Small snapshot layouts: (in_steps, in_sigma_rels, out_step, out_sigma_rels)."""
    out = [0.02, 0.05, 0.08, 0.15, 0.25]
    return [
        ([100, 100], [0.05, 0.10], 100, out),
        ([100, 100, 200, 200], [0.05, 0.10, 0.05, 0.10], 200, out),
        ([100, 100, 200, 200], [0.05, 0.10, 0.05, 0.10], 150, out),  # two snapshots after out_step
        ([10, 20, 30, 40, 50, 60], 0.1, 60, out),
        ([10, 20, 30, 40, 50, 60], 0.1, 45, out),
        ([7, 13, 13, 50, 50, 51], [0.2, 0.01, 0.12, 0.03, 0.25, 0.07], 51, out),
        (np.repeat(np.arange(1, 17) * 1000, 2), np.tile([0.05, 0.10], 16), 16000, out),
        (np.repeat(np.arange(1, 17) * 1000, 2), np.tile([0.05, 0.10], 16), 9500, out),
    ]


@st.composite
def snapshot_problems(draw, max_snapshots: int = 10):
    n = draw(st.integers(1, max_snapshots))
    steps = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n))
    sigmas = draw(st.lists(practical_sigma_rels, min_size=n, max_size=n))
    out_step = draw(st.integers(min(steps), 2 * max(steps)))
    out_sigmas = draw(st.lists(practical_sigma_rels, min_size=1, max_size=3))
    # Each target must put some mass (here > 1e-100) where the snapshots are; with
    # none at all in float64 there is nothing to fit (a ValueError, see BAD_ARGUMENTS).
    latest = max(s for s in steps if s <= out_step)
    assume(all((reference_gamma(s) + 1) * math.log(out_step / latest) < 230 for s in out_sigmas))
    return steps, sigmas, out_step, out_sigmas


# -- sigma_rel <-> gamma (EDM2 eqs. 123 and 126) --------------------------------------


def check_gamma(sigma_rel: float) -> None:
    gamma = float(sigma_rel_to_gamma(sigma_rel))
    if sigma_rel >= 1e-150:  # s^-2 is finite, numpy.roots can take the cubic as written
        expected = reference_gamma(sigma_rel)
        assert gamma == pytest.approx(expected, rel=1e-13, abs=1e-13)
    else:  # gamma = 1/s - 3 + O(s) for small widths (eq. 123 expanded in 1/gamma)
        assert gamma == pytest.approx(1 / sigma_rel - 3, rel=1e-15)
    assert gamma > 0
    assert float(gamma_to_sigma_rel(gamma)) == pytest.approx(sigma_rel, rel=1e-14)


@pytest.mark.parametrize("sigma_rel", SMALL_SIGMA_RELS + list(np.linspace(0.001, 0.288, 50)))
def test_sigma_rel_to_gamma_matches_roots_of_eq126(sigma_rel):
    check_gamma(sigma_rel)


@given(all_sigma_rels)
@settings(max_examples=300, deadline=None)
def test_sigma_rel_to_gamma_matches_roots_of_eq126_property(sigma_rel):
    check_gamma(sigma_rel)


def test_sigma_rel_to_gamma_near_the_uniform_average():
    # gamma -> 0 as sigma_rel -> sqrt(1/12): absolute accuracy is what is left.
    for sigma_rel in [np.nextafter(MAX_SIGMA_REL, 0), MAX_SIGMA_REL * (1 - 1e-12), MAX_SIGMA_REL * (1 - 1e-6)]:
        gamma = float(sigma_rel_to_gamma(sigma_rel))
        assert 0 <= gamma < 1e-4
        assert gamma == pytest.approx(reference_gamma(sigma_rel), abs=1e-14)


def test_paper_values():
    # EDM2 Sec. 3: sigma_rel = 0.05 and 0.10 are gamma = 16.97 and 6.94.
    np.testing.assert_allclose(sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=5e-3)


def test_sigma_rel_to_gamma_vectorised_and_decreasing():
    sigma_rels = np.linspace(0.001, 0.288, 1000).reshape(10, 100)
    gammas = sigma_rel_to_gamma(sigma_rels)
    assert gammas.shape == (10, 100) and gammas.dtype == np.float64
    np.testing.assert_allclose(gammas.ravel(), [sigma_rel_to_gamma(s) for s in sigma_rels.ravel()], rtol=1e-15)
    assert np.all(np.diff(gammas.ravel()) < 0)


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.5, 1.0, 3.0, 6.94, 16.97, 100.0, 1000.0])
def test_gamma_to_sigma_rel_is_the_profile_width(gamma):
    # EDM2 eq. 123 against the standard deviation of f_1 by quadrature.
    assert float(gamma_to_sigma_rel(gamma)) == pytest.approx(sigma_rel_by_quad(gamma), rel=1e-10)


@given(st.floats(min_value=-0.99, max_value=1e3))
@settings(max_examples=60, deadline=None)
def test_gamma_to_sigma_rel_is_the_profile_width_property(gamma):
    assert float(gamma_to_sigma_rel(gamma)) == pytest.approx(sigma_rel_by_quad(gamma), rel=1e-8)


@pytest.mark.parametrize("gamma", [1e-6, 1e-3, 0.1, 1.0, 6.94, 1e3, 1e9, 1e100, 1e300])
def test_round_trip_from_gamma(gamma):
    back = float(sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)))
    assert back == pytest.approx(gamma, rel=1e-12, abs=1e-13)


@given(st.floats(min_value=1e-6, max_value=1e300))
@settings(max_examples=200, deadline=None)
def test_round_trip_from_gamma_property(gamma):
    back = float(sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)))
    assert back == pytest.approx(gamma, rel=1e-12, abs=1e-13)


# -- power_beta (EDM2 eq. 127) ------------------------------------------------------


def check_beta_schedule(gamma: float, schedule: list[float]) -> None:
    """An EMA run with power_beta weights the value at t_i by the profile mass on (t_(i-1), t_i]."""
    end = schedule[-1]
    weights = np.zeros(len(schedule))
    prev = 0.0
    for i, t in enumerate(schedule):
        beta = float(power_beta(gamma, t, prev))
        weights[:i] *= beta
        weights[i] = 1 - beta
        prev = t
    edges = [0.0, *schedule]
    mass = [
        quad(lambda t: profile_at(t, end, gamma), lo, hi, sharpness=gamma + 1) for lo, hi in itertools.pairwise(edges)
    ]
    np.testing.assert_allclose(weights, mass, rtol=1e-9, atol=1e-13)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 6.94, 16.97])
@pytest.mark.parametrize("schedule", [[1.0], [1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 100.0], [0.5, 7.0, 7.5, 1e3, 1e4]])
def test_power_beta_realises_the_profile(gamma, schedule):
    check_beta_schedule(gamma, schedule)


@given(
    st.floats(min_value=0.0, max_value=100.0),
    st.lists(st.floats(min_value=1e-3, max_value=1e6), min_size=1, max_size=12, unique=True),
)
@settings(max_examples=60, deadline=None)
def test_power_beta_realises_the_profile_property(gamma, schedule):
    check_beta_schedule(gamma, sorted(schedule))


def test_power_beta_first_update_copies():
    np.testing.assert_array_equal(power_beta([0.0, 6.94, 100.0], 5, 0), 0.0)


# -- profile_inner_product (EDM2 eq. 151) -------------------------------------------


def check_inner_product(step_a: float, gamma_a: float, step_b: float, gamma_b: float) -> None:
    value = float(profile_inner_product(step_a, gamma_a, step_b, gamma_b))
    assert value == pytest.approx(inner_product_by_quad(step_a, gamma_a, step_b, gamma_b), rel=1e-9, abs=1e-300)
    assert float(profile_inner_product(step_b, gamma_b, step_a, gamma_a)) == pytest.approx(value, rel=1e-14)


def test_inner_product_matches_quadrature():
    for step_a, step_b, gamma_a, gamma_b in itertools.product(SMALL_STEPS, SMALL_STEPS, SMALL_GAMMAS, SMALL_GAMMAS):
        check_inner_product(step_a, gamma_a, step_b, gamma_b)


@given(steps_st, l2_gammas, steps_st, l2_gammas)
@settings(max_examples=200, deadline=None)
def test_inner_product_matches_quadrature_property(step_a, gamma_a, step_b, gamma_b):
    # Keep the integrand out of the subnormal range, where no quadrature is accurate.
    ratio, gamma_long = (step_a / step_b, gamma_b) if step_a <= step_b else (step_b / step_a, gamma_a)
    assume(gamma_long * -math.log(ratio) < 500)
    check_inner_product(step_a, gamma_a, step_b, gamma_b)


def test_inner_product_broadcasts():
    steps = np.array([1.0, 10.0, 100.0])
    gammas = np.array([0.5, 6.94])
    grid = profile_inner_product(steps[:, None, None], gammas[None, :, None], 50.0, gammas[None, None, :])
    assert grid.shape == (3, 2, 2) and grid.dtype == np.float64
    for i, j, k in itertools.product(range(3), range(2), range(2)):
        assert grid[i, j, k] == pytest.approx(
            float(profile_inner_product(steps[i], gammas[j], 50.0, gammas[k])), rel=1e-15
        )


def gram_of(steps: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    return profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])


@given(st.lists(st.tuples(st.integers(1, 10**6), practical_sigma_rels), min_size=1, max_size=30))
@settings(max_examples=60, deadline=None)
def test_gram_matrix_is_positive_semidefinite(snapshots):
    # Inner products of functions: any Gram matrix is symmetric PSD.
    steps = np.array([s for s, _ in snapshots], dtype=np.float64)
    gammas = np.array([reference_gamma(s) for _, s in snapshots])
    gram = gram_of(steps, gammas)
    np.testing.assert_allclose(gram, gram.T, rtol=1e-14)
    d = 1 / np.sqrt(np.diag(gram))
    assert np.linalg.eigvalsh(gram * d[:, None] * d[None, :]).min() > -1e-10


# -- solve_coefficients and reconstruction_error ------------------------------------------


def check_solution(in_steps, in_sigma_rels, out_step, out_sigma_rels, *, nodes: int = 16) -> None:
    coef = solve_coefficients(in_steps, in_sigma_rels, out_step, out_sigma_rels)
    dense = DenseProblem(in_steps, in_sigma_rels, out_step, out_sigma_rels, nodes=nodes)
    assert coef.shape == (dense.steps.size, len(np.ravel(out_sigma_rels)))
    assert np.all(np.isfinite(coef))
    # Each column sums to 1 so a constant trajectory is reproduced exactly.
    np.testing.assert_allclose(coef.sum(axis=0), 1.0, rtol=1e-12)
    # Snapshots after out_step average weights from after the requested time.
    np.testing.assert_array_equal(coef[~dense.used], 0.0)
    # The fit: as good as the dense least-squares optimum scaled to sum to 1 (the same
    # normalisation), measured on the grid, independently of reconstruction_error.
    optimum = dense.optimum()
    normalised = optimum / optimum.sum(axis=0, keepdims=True)
    achieved, reference = dense.error(coef), dense.error(normalised)
    np.testing.assert_allclose(achieved, reference, rtol=1e-4, atol=1e-7)
    # reconstruction_error agrees with the grid's measure of the same coefficients.
    predicted = reconstruction_error(coef, in_steps, in_sigma_rels, out_step, out_sigma_rels)
    np.testing.assert_allclose(predicted, achieved, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", snapshot_sets(), ids=lambda case: f"{len(np.ravel(case[0]))}-snapshots")
def test_solve_coefficients_matches_dense_least_squares(case):
    check_solution(*case)


@given(snapshot_problems())
@settings(max_examples=40, deadline=None)
def test_solve_coefficients_matches_dense_least_squares_property(problem):
    check_solution(*problem)


def test_solve_coefficients_reaches_the_optimum_when_well_posed():
    # With a dense set of snapshots, the sum-to-1 scaling barely moves the optimum.
    steps, sigmas = np.repeat(np.arange(1, 33) * 500, 2), np.tile([0.05, 0.10], 32)
    targets = [0.03, 0.07, 0.15]
    coef = solve_coefficients(steps, sigmas, 16000, targets)
    dense = DenseProblem(steps, sigmas, 16000, targets)
    assert np.all(dense.error(coef) <= dense.error(dense.optimum()) * 1.01 + 1e-7)
    assert np.all(dense.error(coef) < 0.02)


def check_error(coef, in_steps, in_sigma_rels, out_step, out_sigma_rels) -> None:
    dense = DenseProblem(in_steps, in_sigma_rels, out_step, out_sigma_rels)
    expected = dense.error(np.reshape(coef, (dense.steps.size, -1)))
    got = reconstruction_error(coef, in_steps, in_sigma_rels, out_step, out_sigma_rels)
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("case", snapshot_sets(), ids=lambda case: f"{len(np.ravel(case[0]))}-snapshots")
def test_reconstruction_error_of_arbitrary_weights_matches_quadrature(case):
    # Also weights on snapshots after out_step: their mass after out_step is error.
    in_steps, in_sigma_rels, _, out_sigma_rels = case
    n_in = np.broadcast(np.asarray(in_steps), np.asarray(in_sigma_rels)).size
    rng = np.random.default_rng(n_in)
    for coef in [np.zeros((n_in, len(out_sigma_rels))), rng.normal(size=(n_in, len(out_sigma_rels)))]:
        check_error(coef, *case)


@given(snapshot_problems(), st.data())
@settings(max_examples=40, deadline=None)
def test_reconstruction_error_of_arbitrary_weights_matches_quadrature_property(problem, data):
    in_steps, _, _, out_sigma_rels = problem
    shape = (len(in_steps), len(out_sigma_rels))
    flat = data.draw(st.lists(st.floats(-3, 3), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    check_error(np.reshape(flat, shape), *problem)


def test_zero_weights_are_a_total_error():
    assert reconstruction_error([[0.0], [0.0]], [10, 20], 0.1, 20, 0.05) == pytest.approx([1.0], rel=1e-14)


def check_target_is_a_snapshot(in_steps, in_sigma_rels, index) -> None:
    steps, sigmas = (np.ravel(a) for a in np.broadcast_arrays(in_steps, in_sigma_rels))
    coef = solve_coefficients(steps, sigmas, steps[index], sigmas[index])
    error = reconstruction_error(coef, steps, sigmas, steps[index], sigmas[index])
    assert error[0] < 1e-6
    # The profiles are linearly independent, so the best fit is the snapshot itself.
    same = (steps == steps[index]) & (sigmas == sigmas[index])
    assert coef[same, 0].sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(coef[~same, 0], 0.0, atol=1e-6)


def test_target_equal_to_a_snapshot_has_no_error():
    steps, sigmas = np.repeat([100, 200, 300, 1000], 3), np.tile([0.03, 0.1, 0.2], 4)
    for index in range(steps.size):
        check_target_is_a_snapshot(steps, sigmas, index)


@given(
    st.lists(st.tuples(st.integers(1, 10**5), st.sampled_from([0.02, 0.05, 0.1, 0.2])), min_size=1, max_size=8),
    st.data(),
)
@settings(max_examples=60, deadline=None)
def test_target_equal_to_a_snapshot_has_no_error_property(snapshots, data):
    snapshots = sorted(set(snapshots))
    index = data.draw(st.integers(0, len(snapshots) - 1))
    check_target_is_a_snapshot([s for s, _ in snapshots], [s for _, s in snapshots], index)


@given(snapshot_problems(max_snapshots=6), st.floats(min_value=1e-3, max_value=1e3))
@settings(max_examples=40, deadline=None)
def test_solution_does_not_depend_on_the_unit_of_time(problem, scale):
    # The profiles are functions of t/T: rescaling every step changes nothing.
    in_steps, in_sigma_rels, out_step, out_sigma_rels = problem
    coef = solve_coefficients(in_steps, in_sigma_rels, out_step, out_sigma_rels)
    scaled = solve_coefficients(np.multiply(in_steps, scale), in_sigma_rels, out_step * scale, out_sigma_rels)
    errors = reconstruction_error(coef, in_steps, in_sigma_rels, out_step, out_sigma_rels)
    scaled_errors = reconstruction_error(
        scaled, np.multiply(in_steps, scale), in_sigma_rels, out_step * scale, out_sigma_rels
    )
    np.testing.assert_allclose(scaled_errors, errors, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("n_steps", "condition"), [(256, 5e8), pytest.param(512, 5e9, marks=pytest.mark.slow)], ids=["256x2", "512x2"]
)
def test_hundreds_of_snapshots(n_steps, condition):
    # Hundreds of snapshots: the Gram matrix is nearly singular (condition 1e9 to
    # 1e10); the weights must stay finite and reach the dense-grid optimum.
    steps = np.repeat(np.round(np.linspace(1000, 512_000, n_steps)), 2)
    sigmas = np.tile([0.05, 0.10], n_steps)
    targets = [0.03, 0.07, 0.15, 0.25]
    gammas = np.array([reference_gamma(0.05), reference_gamma(0.10)] * n_steps)
    corners = [0, 1, -2, -1]
    by_quad = [[inner_product_by_quad(steps[i], gammas[i], steps[j], gammas[j]) for j in corners] for i in corners]
    np.testing.assert_allclose(gram_of(steps[corners], gammas[corners]), by_quad, rtol=1e-9)
    assert np.linalg.cond(gram_of(steps, gammas)) > condition

    coef = solve_coefficients(steps, sigmas, steps[-1], targets)
    assert np.all(np.isfinite(coef))
    np.testing.assert_allclose(coef.sum(axis=0), 1.0, rtol=1e-12)
    predicted = reconstruction_error(coef, steps, sigmas, steps[-1], targets)
    assert np.all(np.isfinite(predicted)) and np.all(predicted < 5e-3)

    dense = DenseProblem(steps, sigmas, steps[-1], targets, nodes=8, refine=False)
    achieved, optimum = dense.error(coef), dense.error(dense.optimum())
    np.testing.assert_allclose(predicted, achieved, rtol=1e-3)
    assert np.all(achieved <= optimum * 1.01 + 1e-8)


def test_broadcasting_of_snapshot_arguments():
    # One sigma_rel for every snapshot, a scalar target.
    coef = solve_coefficients([10, 20, 30], 0.1, 30, 0.07)
    np.testing.assert_array_equal(coef, solve_coefficients([10, 20, 30], [0.1, 0.1, 0.1], 30, [0.07]))
    assert coef.shape == (3, 1)


# -- bad arguments -------------------------------------------------------------------

BAD_ARGUMENTS = [
    (lambda: sigma_rel_to_gamma(0.0), r"sigma_rel=0\.0 is outside \(0, 0\.2886751\d+\)"),
    (lambda: sigma_rel_to_gamma(-0.1), r"sigma_rel=-0\.1 is outside \(0, 0\.2886751\d+\)"),
    (lambda: sigma_rel_to_gamma(0.3), r"sigma_rel=0\.3 is outside \(0, 0\.2886751\d+\)"),
    (lambda: sigma_rel_to_gamma(MAX_SIGMA_REL), r"sigma_rel=0\.2886\d* is outside \(0, 0\.2886751\d+\)"),
    (lambda: sigma_rel_to_gamma(math.nan), r"sigma_rel=nan is outside \(0, 0\.2886751\d+\)"),
    (lambda: sigma_rel_to_gamma(math.inf), r"sigma_rel=inf is outside \(0, 0\.2886751\d+\)"),
    (lambda: sigma_rel_to_gamma([0.05, 0.5, 0.1]), r"sigma_rel=0\.5 is outside \(0, 0\.2886751\d+\)"),
    (lambda: gamma_to_sigma_rel(-1.0), r"gamma=-1\.0 is outside \(-1, inf\)"),
    (lambda: gamma_to_sigma_rel([1.0, -2.5]), r"gamma=-2\.5 is outside \(-1, inf\)"),
    (lambda: gamma_to_sigma_rel(math.nan), r"gamma=nan is outside \(-1, inf\)"),
    (lambda: power_beta(1.0, 0, 0), r"step=0\.0 is not a positive step"),
    (lambda: power_beta(1.0, 3, 4), r"prev_step=4\.0 is outside \[0, step=3\.0\]"),
    (lambda: power_beta(1.0, [3, 5], [1, -1]), r"prev_step=-1\.0 is outside \[0, step=5\.0\]"),
    (lambda: profile_inner_product(-1.0, 1.0, 1.0, 1.0), r"step=-1\.0 is not a positive step"),
    (lambda: profile_inner_product(1.0, 1.0, math.inf, 1.0), r"step=inf is not a positive step"),
    (lambda: profile_inner_product(1.0, -1.5, 1.0, 1.0), r"gamma=-1\.5 is outside \(-1, inf\)"),
    (lambda: profile_inner_product(1.0, -0.6, 1.0, -0.5), r"gamma_a \+ gamma_b=-1\.1 is outside \(-1, inf\)"),
    (
        lambda: solve_coefficients([10, 20], 0.1, 5, 0.1),
        r"no snapshot at or before out_step=5\.0; the earliest is at 10\.0",
    ),
    (lambda: solve_coefficients([10, 20], 0.1, [20, 30], 0.1), r"out_step must be a single step.*shape \(2,\)"),
    (lambda: solve_coefficients([10, 0], 0.1, 20, 0.1), r"step=0\.0 is not a positive step"),
    (lambda: solve_coefficients([10, 20], 0.1, 0, 0.1), r"out_step=0\.0 is not a positive step"),
    (
        lambda: solve_coefficients([10, 20], [0.1, 0.4], 20, 0.1),
        r"sigma_rel=0\.4 is outside \(0, 0\.2886751\d+\)",
    ),
    (
        lambda: solve_coefficients([10, 20], 0.1, 20, [0.1, 0.0]),
        r"sigma_rel=0\.0 is outside \(0, 0\.2886751\d+\)",
    ),
    (
        lambda: solve_coefficients([1, 372], [0.0078125, 0.25], 371, [0.2, 0.0078125]),
        r"sigma_rel=0\.0078125 at out_step=371\.0 has no overlap with the snapshots at or before it "
        r"\(the latest is at 1\.0\)",
    ),
    (
        lambda: reconstruction_error([1.0, 0.0, 0.0], [10, 20], 0.1, 20, 0.1),
        r"coefficients have shape \(3,\), expected \(2, 1\)",
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_arguments_name_the_value_and_the_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- layering --------------------------------------------------------------------------


def test_profiles_does_not_import_torch():
    # posthoc_ema/__init__ imports torch, so load the module file on its own.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('isolated_profiles', {str(Path(profiles.__file__))!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert abs(module.sigma_rel_to_gamma(0.1) - 6.9372) < 1e-3\n"
        "assert 'torch' not in sys.modules, 'posthoc_ema.profiles imported torch'\n"
        "assert 'posthoc_ema' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- the sigma_rel identity rule --------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (0.05, np.float32(0.05), True),
        (0.07, np.arange(0.05, 0.1, 0.01)[2], True),
        (0.1, 0.1000001, True),
        (0.1, 0.100001, False),
        (0.05, 0.051, False),
        (1e-300, 1.0000001e-300, True),
    ],
)
def test_same_sigma_rel(a: float, b: float, same: bool) -> None:
    assert same_sigma_rel(a, b) is same
    assert same_sigma_rel(b, a) is same
    assert (canonical_sigma_rel(a) == canonical_sigma_rel(b)) is same


@given(st.floats(1e-300, 0.2886))
def test_canonical_sigma_rel_is_idempotent_and_close(sigma_rel: float) -> None:
    c = canonical_sigma_rel(sigma_rel)
    assert canonical_sigma_rel(c) == c
    assert abs(c - sigma_rel) <= 5e-6 * sigma_rel
