"""Planning at scale: the per-interval solve and the semiseparable Gram product.

The references are the dense formulation of EDM2 Algorithm 3, written out here: the
full Gram matrix of eq. 151 from ``profile_inner_product`` (itself checked against
quadrature in test_profiles.py), solved by an eigendecomposition scaled to unit
diagonal, and the error as the quadratic form ``c^T G c - 2 c^T b + <f, f>``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import posthoc_ema.profiles as profiles
from posthoc_ema.profiles import profile_inner_product, reconstruction_error, sigma_rel_to_gamma, solve_coefficients

TRACKED = [0.03, 0.05, 0.10, 0.20]
TARGETS = [0.02, 0.07, 0.12, 0.27]  # below, between, and above the tracked widths


# -- the dense reference --------------------------------------------------------------


def dense_gram(steps: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    return profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])


def dense_solve(steps, sigma_rels, out_step, targets) -> tuple[np.ndarray, np.ndarray, float]:
    """Coefficients (columns sum to 1), their relative errors, and the condition of the scaled Gram matrix."""
    steps, sigma_rels = (np.ravel(a).astype(np.float64) for a in np.broadcast_arrays(steps, sigma_rels))
    gammas, out_gammas = sigma_rel_to_gamma(sigma_rels), sigma_rel_to_gamma(np.ravel(targets))
    used = steps <= out_step
    gram = dense_gram(steps[used], gammas[used])
    cross = profile_inner_product(steps[used, None], gammas[used, None], float(out_step), out_gammas[None, :])
    d = 1 / np.sqrt(np.diag(gram))
    w, v = np.linalg.eigh(gram * d[:, None] * d[None, :])
    keep = w > w[-1] * 1e-14
    x = d[:, None] * (v[:, keep] @ ((v[:, keep].T @ (cross * d[:, None])) / w[keep, None]))
    x /= x.sum(axis=0)
    coef = np.zeros((steps.size, out_gammas.size))
    coef[used] = x
    condition = w[-1] / w[0] if w[0] > 0 else np.inf
    return coef, dense_error(coef, steps, sigma_rels, out_step, targets), float(condition)


def dense_error(coef, steps, sigma_rels, out_step, targets) -> np.ndarray:
    steps, sigma_rels = (np.ravel(a).astype(np.float64) for a in np.broadcast_arrays(steps, sigma_rels))
    gammas, out_gammas = sigma_rel_to_gamma(sigma_rels), sigma_rel_to_gamma(np.ravel(targets))
    gram = dense_gram(steps, gammas)
    cross = profile_inner_product(steps[:, None], gammas[:, None], float(out_step), out_gammas[None, :])
    norm2 = profile_inner_product(float(out_step), out_gammas, float(out_step), out_gammas)
    sq = np.einsum("io,ij,jo->o", coef, gram, coef) - 2 * np.einsum("io,io->o", coef, cross) + norm2
    return np.sqrt(np.maximum(sq, 0) / norm2)


def regular_grid(grid_steps, sigma_rels, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every sigma_rel at every step, in a shuffled order (the solver must not rely on any)."""
    steps = np.repeat(np.asarray(grid_steps, dtype=np.float64), len(sigma_rels))
    sigmas = np.tile(np.asarray(sigma_rels, dtype=np.float64), len(grid_steps))
    order = np.random.default_rng(seed).permutation(steps.size)
    return steps[order], sigmas[order]


def check_against_dense(steps, sigma_rels, out_step, targets) -> None:
    coef = solve_coefficients(steps, sigma_rels, out_step, targets)
    expected, expected_errors, condition = dense_solve(steps, sigma_rels, out_step, targets)
    errors = reconstruction_error(coef, steps, sigma_rels, out_step, targets)
    if condition < 1e9:
        # Well posed: one solution, to rounding amplified by the condition number.
        np.testing.assert_allclose(coef, expected, rtol=0, atol=1e-11 * condition * np.abs(expected).max())
        np.testing.assert_allclose(errors, expected_errors, rtol=1e-6, atol=1e-7)
    else:
        # Directions below float64 resolution are dropped, by each solver in its own basis:
        # the weights differ, the fit must not be worse.
        assert np.all(errors <= expected_errors * (1 + 1e-6) + 1e-6)
    # The solver's own error, from its per-interval residuals, is the same number.
    used = np.asarray(steps) <= out_step
    target_sq = profile_inner_product(
        float(out_step), sigma_rel_to_gamma(targets), float(out_step), sigma_rel_to_gamma(targets)
    )
    _, own = profiles._solve_targets(
        np.asarray(steps, dtype=np.float64)[used],
        sigma_rel_to_gamma(np.asarray(sigma_rels)[used]),
        target_sq,
        cross=profile_inner_product(
            np.asarray(steps, dtype=np.float64)[used, None],
            sigma_rel_to_gamma(np.asarray(sigma_rels)[used])[:, None],
            float(out_step),
            sigma_rel_to_gamma(targets)[None, :],
        ),
    )
    np.testing.assert_allclose(own, errors, rtol=1e-6, atol=1e-7)


# -- the per-interval solve equals the dense solve ---------------------------------------

GRIDS = [[100], [100, 200], [10, 20, 30, 40, 50, 60], [7, 13, 50, 51, 400], [1000, 1001, 1002, 5000]]
CLASSES = [[0.05], [0.05, 0.10], [0.03, 0.05, 0.10], TRACKED]


@pytest.mark.parametrize("sigma_rels", CLASSES, ids=lambda s: f"{len(s)}-classes")
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{len(g)}-steps")
def test_per_interval_solve_matches_dense(grid, sigma_rels):
    steps, sigmas = regular_grid(grid, sigma_rels)
    assert profiles._Grid(steps, sigma_rel_to_gamma(sigmas)).regular  # the fast path is taken
    # At the last snapshot, between two of them (later snapshots unused), and after the last.
    out_steps = sorted({grid[-1], (grid[0] + grid[-1]) / 2 if len(grid) > 1 else grid[0], grid[-1] * 1.2})
    for out_step in out_steps:
        check_against_dense(steps, sigmas, out_step, TARGETS)


@st.composite
def regular_problems(draw):
    grid = sorted(draw(st.sets(st.integers(1, 10_000), min_size=1, max_size=8)))
    sigma_rels = sorted(
        draw(st.sets(st.sampled_from([0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25]), min_size=1, max_size=4))
    )
    out_step = draw(st.integers(grid[0], 2 * grid[-1]))
    targets = draw(st.lists(st.floats(0.01, 0.28), min_size=1, max_size=3))
    latest = max(s for s in grid if s <= out_step)
    # The target must overlap the snapshots in float64 (see test_profiles.BAD_ARGUMENTS).
    assume(all((float(sigma_rel_to_gamma(s)) + 1) * np.log(out_step / latest) < 230 for s in targets))
    return grid, sigma_rels, out_step, targets, draw(st.integers(0, 100))


@given(regular_problems())
@settings(max_examples=50, deadline=None)
def test_per_interval_solve_matches_dense_property(problem):
    grid, sigma_rels, out_step, targets, seed = problem
    steps, sigmas = regular_grid(grid, sigma_rels, seed)
    check_against_dense(steps, sigmas, out_step, targets)


def test_repeated_snapshots_share_their_weight():
    # A (step, sigma_rel) written twice: the dense minimum-norm solution splits it evenly.
    steps, sigmas = regular_grid([100, 200, 300], [0.05, 0.1])
    steps, sigmas = np.append(steps, [200, 300, 300]), np.append(sigmas, [0.1, 0.05, 0.05])
    assert profiles._Grid(steps, sigma_rel_to_gamma(sigmas)).regular
    check_against_dense(steps, sigmas, 300, TARGETS)
    coef = solve_coefficients(steps, sigmas, 300, TARGETS)
    same = (steps == 300) & (sigmas == 0.05)
    np.testing.assert_allclose(coef[same], np.broadcast_to(coef[same][0], coef[same].shape), rtol=1e-12)


IRREGULAR = [
    ([100, 100, 200], [0.05, 0.1, 0.05]),  # a missing snapshot
    ([100, 300, 150, 250, 350], [0.05, 0.05, 0.1, 0.1, 0.1]),  # classes on different grids
    ([10, 20, 20, 40, 70], 0.1),  # one class, uneven spacing is still regular; see below
]


@pytest.mark.parametrize("case", IRREGULAR, ids=["missing", "two-grids", "one-class"])
def test_irregular_folders_match_dense(case):
    steps, sigmas = (np.ravel(a) for a in np.broadcast_arrays(*case))
    for out_step in [steps.max(), np.median(steps)]:
        check_against_dense(steps, sigmas, out_step, TARGETS)


SPARSE_CASES = [
    *IRREGULAR[:2],
    ([*range(100, 2100, 100), *range(300, 2100, 300)], [0.05] * 20 + [0.1] * 6),  # two cadences
    ([*range(100, 2100, 100), *range(100, 2100, 100), 1500, 2000], [0.05] * 20 + [0.1] * 20 + [0.2] * 2),  # added late
    ([*range(100, 1100, 100), *range(100, 1000, 100), 500], [0.05] * 10 + [0.1] * 9 + [0.1]),  # a repeat
]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=["missing", "two-grids", "cadences", "added-late", "repeat"])
def test_sparse_cell_solve_matches_dense(case, monkeypatch):
    # Large irregular folders solve sparse normal equations over each class's cells;
    # force that path on small ones, where the dense solve is the reference.
    monkeypatch.setattr(profiles, "_DENSE_MAX", 0)
    steps, sigmas = (np.ravel(a).astype(np.float64) for a in np.broadcast_arrays(*case))
    assert not profiles._Grid(steps, sigma_rel_to_gamma(sigmas)).regular
    for out_step in [steps.max(), np.median(steps)]:
        check_against_dense(steps, sigmas, out_step, TARGETS)


@given(regular_problems(), st.data())
@settings(max_examples=50, deadline=None)
def test_sparse_cell_solve_matches_dense_property(problem, data):
    grid, sigma_rels, out_step, targets, seed = problem
    steps, sigmas = regular_grid(grid, sigma_rels, seed)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=steps.size, max_size=steps.size)))
    assume(np.any(keep & (steps <= out_step)))
    latest = steps[keep & (steps <= out_step)].max()
    assume(all((float(sigma_rel_to_gamma(s)) + 1) * np.log(out_step / latest) < 230 for s in targets))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(profiles, "_DENSE_MAX", 0)
        check_against_dense(steps[keep], sigmas[keep], out_step, targets)


def test_large_irregular_folder():
    # 20,000 snapshots with one missing: no better than the full grid, no worse than the
    # full grid without that step (a subset of what it has). Both references are regular.
    grid = np.arange(1, 10_001) * 100.0
    steps, sigmas = regular_grid(grid, [0.05, 0.10])
    missing = (steps == grid[4999]) & (sigmas == 0.10)
    assert not profiles._Grid(steps[~missing], sigma_rel_to_gamma(sigmas[~missing])).regular
    coef = solve_coefficients(steps[~missing], sigmas[~missing], grid[-1], TARGETS)
    np.testing.assert_allclose(coef.sum(axis=0), 1.0, rtol=1e-12)
    errors = reconstruction_error(coef, steps[~missing], sigmas[~missing], grid[-1], TARGETS)
    full = reconstruction_error(solve_coefficients(steps, sigmas, grid[-1], TARGETS), steps, sigmas, grid[-1], TARGETS)
    without = steps != grid[4999]
    fewer = solve_coefficients(steps[without], sigmas[without], grid[-1], TARGETS)
    fewer_errors = reconstruction_error(fewer, steps[without], sigmas[without], grid[-1], TARGETS)
    assert np.all(errors >= full - 1e-7) and np.all(errors <= fewer_errors + 1e-7)


def test_targets_by_moments_or_by_cross_products_agree():
    # The entry point for other targets: moments per interval, or cross products per snapshot.
    steps, sigmas = regular_grid([100, 150, 400, 1000], [0.05, 0.1, 0.2])
    gammas, out_gammas = sigma_rel_to_gamma(sigmas), sigma_rel_to_gamma(TARGETS)
    grid = profiles._Grid(steps, gammas)
    target_sq = profile_inner_product(1000.0, out_gammas, 1000.0, out_gammas)
    cross = profile_inner_product(steps[:, None], gammas[:, None], 1000.0, out_gammas[None, :])
    moments = profiles._power_moments(grid, np.float64(1000.0), out_gammas)
    np.testing.assert_allclose(profiles._cross_from_moments(grid, moments), cross, rtol=1e-13)
    np.testing.assert_allclose(profiles._moments_from_cross(grid, cross), moments, rtol=1e-9, atol=1e-15)
    by_moments = profiles._solve_targets(steps, gammas, target_sq, moments=moments)
    by_cross = profiles._solve_targets(steps, gammas, target_sq, cross=cross)
    expected, expected_errors, _ = dense_solve(steps, sigmas, 1000, TARGETS)
    for coef, errors in [by_moments, by_cross]:
        np.testing.assert_allclose(coef, expected, rtol=0, atol=1e-9)
        np.testing.assert_allclose(errors, expected_errors, rtol=1e-6, atol=1e-7)
    # An irregular set takes the dense path from either input.
    keep = ~((steps == 150) & (sigmas == 0.1))
    sub = profiles._Grid(steps[keep], gammas[keep])
    assert not sub.regular
    moments = profiles._power_moments(sub, np.float64(1000.0), out_gammas)
    coef, errors = profiles._solve_targets(steps[keep], gammas[keep], target_sq, moments=moments)
    expected, expected_errors, _ = dense_solve(steps[keep], sigmas[keep], 1000, TARGETS)
    np.testing.assert_allclose(coef, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(errors, expected_errors, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match=r"give moments or cross \(or both\)"):
        profiles._solve_targets(steps, gammas, target_sq)


def test_a_target_with_no_overlap_is_nan():
    steps, sigmas = regular_grid([1, 2], [0.05, 0.1])
    gammas, out_gammas = sigma_rel_to_gamma(sigmas), sigma_rel_to_gamma([0.1, 0.001])
    grid = profiles._Grid(steps, gammas)
    target_sq = profile_inner_product(1e6, out_gammas, 1e6, out_gammas)
    coef, errors = profiles._solve_targets(
        steps, gammas, target_sq, moments=profiles._power_moments(grid, np.float64(1e6), out_gammas)
    )
    assert np.all(np.isfinite(coef[:, 0])) and np.all(np.isnan(coef[:, 1]))
    assert np.isfinite(errors[0]) and np.isnan(errors[1])


# -- the semiseparable Gram product -------------------------------------------------------


def decayed_cumsum_by_loop(log_decay: np.ndarray, values: np.ndarray) -> np.ndarray:
    log_decay = np.broadcast_to(log_decay, values.shape)
    out = np.empty_like(values)
    out[0] = values[0]
    for m in range(1, values.shape[0]):
        out[m] = np.exp(log_decay[m]) * out[m - 1] + values[m]
    return out


@pytest.mark.parametrize("rate", [0.0, 1e-3, 0.5, 30.0, 400.0, 1e5])
def test_decayed_cumsum_matches_the_recurrence(rate):
    # Rates of 30 and more per row cross the 500 bound of a block within a few rows.
    rng = np.random.default_rng(0)
    values = rng.normal(size=(200, 3, 2))
    log_decay = -rate * rng.random(size=(200, 3, 1)) * np.array([1.0, 0.01, 0.0])[None, :, None]
    np.testing.assert_allclose(
        profiles._decayed_cumsum(log_decay, values), decayed_cumsum_by_loop(log_decay, values), rtol=1e-12, atol=1e-12
    )


def check_matvec(steps, gammas, x) -> None:
    steps, gammas = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    gram = dense_gram(steps, gammas)
    got = profiles._gram_matvec(profiles._Grid(steps, gammas), x)
    # Rounding is relative to the terms summed, |G| |x|, not to a possibly cancelled result; below
    # 1e-300 (subnormal x, which Hypothesis draws) the spacing of floats is absolute.
    np.testing.assert_allclose(got, gram @ x, rtol=0, atol=1e-13 * (np.abs(gram) @ np.abs(x)).max() + 1e-300)
    np.testing.assert_array_less(np.abs(got - gram @ x), 1e-12 * (np.abs(gram) @ np.abs(x)) + 1e-300)


MATVEC_SETS = [
    ([5.0], [3.0]),
    ([1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]),
    ([100, 100, 200, 200], [16.97, 6.94, 16.97, 6.94]),
    ([7, 13, 13, 50, 50, 51, 51, 51], [0.3, 80.0, 2.0, 16.97, 0.3, 6.94, 6.94, 2.0]),  # repeats and gaps
    (np.arange(1, 301) * 10.0, np.tile([1000.0, 6.94, 200.0], 100)),  # decays far beyond one block
]


@pytest.mark.parametrize("case", MATVEC_SETS, ids=lambda c: f"{len(c[0])}-snapshots")
def test_gram_matvec_matches_the_dense_product(case):
    steps, gammas = case
    rng = np.random.default_rng(len(steps))
    for x in [rng.normal(size=len(steps)), rng.normal(size=(len(steps), 3)), np.ones((len(steps), 1))]:
        check_matvec(steps, gammas, x)


@given(
    st.lists(
        st.tuples(st.integers(1, 10**6), st.sampled_from([0.0, 0.3, 2.0, 6.94, 16.97, 200.0])), min_size=1, max_size=40
    ),
    st.data(),
)
@settings(max_examples=80, deadline=None)
def test_gram_matvec_matches_the_dense_product_property(snapshots, data):
    steps, gammas = (np.array(v, dtype=np.float64) for v in zip(*snapshots, strict=True))
    x = np.array(data.draw(st.lists(st.floats(-10, 10), min_size=len(steps), max_size=len(steps))))
    check_matvec(steps, gammas, x[:, None])


@pytest.mark.parametrize("layout", ["regular", "irregular"])
def test_reconstruction_error_at_scale_matches_dense(layout):
    # 600 snapshots: large enough for rounding to show, small enough for the dense reference.
    steps, sigmas = regular_grid(np.arange(1, 201) * 500.0, [0.03, 0.1, 0.2])
    if layout == "irregular":
        keep = np.random.default_rng(1).random(steps.size) > 0.2
        steps, sigmas = steps[keep], sigmas[keep]
    out_step = 75_000.0
    coef = solve_coefficients(steps, sigmas, out_step, TARGETS)
    rng = np.random.default_rng(2)
    gammas, out_gammas = sigma_rel_to_gamma(sigmas), sigma_rel_to_gamma(TARGETS)
    gram = dense_gram(steps, gammas)
    norm2 = profile_inner_product(out_step, out_gammas, out_step, out_gammas)
    rng = np.random.default_rng(2)
    for weights in [coef, coef + 1e-3 * rng.normal(size=coef.shape), rng.normal(size=coef.shape)]:
        # Compare squared errors: both sides round at eps times the size of the terms of the quadratic form.
        size = np.einsum("io,ij,jo->o", np.abs(weights), gram, np.abs(weights)) / norm2 + 1
        got = reconstruction_error(weights, steps, sigmas, out_step, TARGETS)
        expected = dense_error(weights, steps, sigmas, out_step, TARGETS)
        np.testing.assert_array_less(np.abs(got**2 - expected**2), 1e-6 * expected**2 + 1e-13 * size)


# -- 20,000 snapshots ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_steps", "sigma_rels"), [(10_000, [0.05, 0.10]), (5_000, TRACKED)], ids=["10000x2", "5000x4"]
)
def test_twenty_thousand_snapshots(n_steps, sigma_rels):
    grid = np.arange(1, n_steps + 1) * 100.0
    steps, sigmas = regular_grid(grid, sigma_rels)
    coef = solve_coefficients(steps, sigmas, grid[-1], TARGETS)
    assert coef.shape == (20_000, len(TARGETS)) and np.all(np.isfinite(coef))
    np.testing.assert_allclose(coef.sum(axis=0), 1.0, rtol=1e-12)
    errors = reconstruction_error(coef, steps, sigmas, grid[-1], TARGETS)
    # More snapshots can only fit better: compare with the dense optimum over every 50th step.
    sub = np.isin(steps, grid[49::50])
    _, sub_errors, _ = dense_solve(steps[sub], sigmas[sub], grid[-1], TARGETS)
    assert np.all(errors <= sub_errors + 1e-7)
    assert np.all(errors[:3] < 1e-5)


def test_every_small_regular_grid():
    # Exhaustively: every subset of four steps with every subset of three classes.
    for n_steps, n_classes in itertools.product(range(1, 5), range(1, 4)):
        for grid in itertools.combinations([10, 30, 31, 100], n_steps):
            for sigma_rels in itertools.combinations([0.03, 0.1, 0.2], n_classes):
                steps, sigmas = regular_grid(list(grid), list(sigma_rels))
                check_against_dense(steps, sigmas, grid[-1], TARGETS)
