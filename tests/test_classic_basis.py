"""Snapshots of classic EMAs as basis profiles of synthesis (posthoc_ema.synthesis.plan with classic snapshots).

Every expectation is computed here independently, in float64: the EMAs by their
recursion on a known trajectory, the profiles' inner products by sums over unit
steps of the exact per-update weights (``brute_weights``) and EDM2 eq. 151.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from posthoc_ema import PostHocEMA, cli, profiles, schedules
from posthoc_ema.commands import command_sweep
from posthoc_ema.errors import PoorReconstructionWarning, SnapshotError
from posthoc_ema.files import write_atomic
from posthoc_ema.folders import describe
from posthoc_ema.schedules import Constant, HalfLife, Schedule, Threshold, Warmup
from posthoc_ema.synthesis import _RMS_ROUNDING, UNIT_ROUNDOFF, plan, save, synthesize, synthesize_many

STEPS, EVERY, DIMS, WALK = 2000, 100, 1000, 0.05
SIGMA_RELS = (0.05, 0.10)
NAMED = {"fast": Constant(0.99), "slow": Constant(0.9995)}
ONLY_CLASSIC = {"fast": Constant(0.99), "slow": Constant(0.9999)}
TARGETS: list[float | Schedule] = [Constant(0.999), Constant(0.998), HalfLife(300.0), 0.08]


# -- references -------------------------------------------------------------------------------


def brute_weights(schedule: Schedule, grid: np.ndarray, out_step: float) -> np.ndarray:
    """``[1 + len(grid)]`` weights of the initial copy and of each update in the EMA read at ``out_step``:
    the EMA of one-hot trajectories, update by update."""
    ema = np.zeros(grid.size + 1)
    ema[0] = 1.0
    prev = 0.0
    for i, t in enumerate(grid):
        if t > out_step:
            break
        beta = float(schedule.beta(t, prev))
        ema *= beta
        ema[i + 1] += 1.0 - beta
        prev = t
    return ema


def unit_profile(schedule: Schedule, grid: np.ndarray, out_step: int, length: int | None = None) -> np.ndarray:
    """The profile's density on each unit step ``(u - 1, u]``, u = 1..length (default ``out_step``; 0 after
    ``out_step``), the initial copy counted on the first update."""
    w = brute_weights(schedule, grid, out_step)
    w[1] += w[0]
    density = np.zeros(length or out_step)
    prev = 0
    for i, t in enumerate(grid[grid <= out_step].astype(int)):
        density[prev:t] = w[i + 1] / (t - prev)
        prev = t
    return density


def unit_masses(steps: np.ndarray, gammas: np.ndarray, out_step: int) -> np.ndarray:
    """``[n, out_step]`` mass of each power-function profile (EDM2 eq. 121) on each unit step."""
    u = np.arange(1.0, out_step + 1)
    s, g1 = steps[:, None], gammas[:, None] + 1
    return (np.minimum(u, s) / s) ** g1 - (np.minimum(u - 1, s) / s) ** g1


def power_ema(theta: np.ndarray, sigma_rel: float, out_step: int) -> np.ndarray:
    gamma = float(profiles.sigma_rel_to_gamma(sigma_rel))
    ema = theta[0].copy()
    for t in range(1, out_step + 1):
        beta = (1 - 1 / t) ** (gamma + 1)  # EDM2 eq. 127
        ema = beta * ema + (1 - beta) * theta[t]
    return ema


def classic_ema(theta: np.ndarray, schedule: Schedule, grid: np.ndarray, out_step: int) -> np.ndarray:
    ema, prev = theta[0].copy(), 0.0
    for t in grid[grid <= out_step]:
        beta = float(schedule.beta(t, prev))
        ema = beta * ema + (1 - beta) * theta[int(t)]
        prev = t
    return ema


def track(folder: Path, theta: np.ndarray, sigma_rels: tuple[float, ...], named: dict[str, Schedule], **kw) -> Path:  # type: ignore[no-untyped-def]
    """The real tracker on the trajectory ``theta`` (one float64 parameter vector), float64 snapshots."""
    model = torch.nn.Linear(theta.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[0])[None])
    emas = PostHocEMA(model, sigma_rels, schedules=named, snapshot_dir=folder, snapshot_dtype=torch.float64, **kw)
    with emas, torch.no_grad():
        for t in range(1, theta.shape[0]):
            model.weight.copy_(torch.from_numpy(theta[t])[None])
            emas.update()
    return folder


def walk(steps: int, dims: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    theta = np.ones((steps + 1, dims))
    theta[1:] += np.cumsum(rng.standard_normal((steps, dims)) * WALK, axis=0)
    return theta


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    theta = walk(STEPS, DIMS)
    both = track(tmp_path_factory.mktemp("both"), theta, SIGMA_RELS, NAMED, snapshot_every=EVERY)
    only = track(tmp_path_factory.mktemp("only"), theta, (), ONLY_CLASSIC, snapshot_every=EVERY)
    return {"both": (both, theta), "only": (only, theta)}


def independent_products(the_plan, target, named, grid=None, target_grid=None):  # type: ignore[no-untyped-def]
    """Gram matrix, target products and norm of the plan's snapshots and ``target``, from unit-step sums and eq. 151.

    Every update grid here is of integer steps (every step by default), so every classic profile is
    constant on unit steps."""
    out = the_plan.step
    grid = np.arange(1.0, out + 1) if grid is None else grid
    target_grid = grid if target_grid is None else target_grid
    power = [i for i, s in enumerate(the_plan.snapshots) if not s.is_classic]
    classic = [i for i, s in enumerate(the_plan.snapshots) if s.is_classic]
    steps = np.array([the_plan.snapshots[i].step for i in power], dtype=np.float64)
    gammas = np.array([the_plan.snapshots[i].gamma for i in power])
    masses = unit_masses(steps, gammas, out)  # = <f_i, 1 on unit step u>
    densities = np.array(
        [unit_profile(named[str(the_plan.snapshots[i].name)], grid, the_plan.snapshots[i].step, out) for i in classic]
    ).reshape(len(classic), out)
    n = len(the_plan.snapshots)
    gram = np.zeros((n, n))
    gram[np.ix_(power, power)] = profiles._gram(steps, gammas)  # eq. 151, the continuous profiles
    gram[np.ix_(power, classic)] = masses @ densities.T
    gram[np.ix_(classic, power)] = densities @ masses.T
    gram[np.ix_(classic, classic)] = densities @ densities.T
    cross = np.zeros(n)
    if isinstance(target, Schedule):
        h = unit_profile(target, target_grid, out)
        cross[power] = masses @ h
        cross[classic] = densities @ h
        norm_sq = float(h @ h)
    else:
        g = float(profiles.sigma_rel_to_gamma(target))
        cross[power] = profiles.profile_inner_product(steps, gammas, float(out), g)
        cross[classic] = densities @ unit_masses(np.array([float(out)]), np.array([g]), out)[0]
        norm_sq = float(profiles.profile_inner_product(out, g, out, g))
    return gram, cross, norm_sq, masses, densities, power, classic


# -- the inner product of two classic profiles ---------------------------------------------------------

PAIRS = [
    (Constant(0.9), Constant(0.8, start=7)),
    (HalfLife(3.0), Warmup(inv_gamma=2.0, power=0.75, min_beta=0.3, max_beta=0.95, update_after_step=5)),
    (Threshold(0.95), Constant(0.5)),
    (Constant(0.7), Constant(0.7)),
]
GRIDS = {
    "every step": np.arange(1.0, 41.0),
    "every 4": np.arange(4.0, 41.0, 4.0),
    "irregular": np.array([1.0, 2.0, 5.0, 6.0, 7.0, 13.0, 20.0, 21.0, 30.0, 38.0, 40.0]),
}


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=repr)
@pytest.mark.parametrize("grid_a", list(GRIDS))
@pytest.mark.parametrize("grid_b", list(GRIDS))
@pytest.mark.parametrize(("out_a", "out_b"), [(40, 40), (21, 38), (38, 21)])
def test_inner_is_the_sum_over_unit_steps(first, second, grid_a, grid_b, out_a, out_b) -> None:  # type: ignore[no-untyped-def]
    a, b = GRIDS[grid_a], GRIDS[grid_b]
    p = unit_profile(first, a, out_a)
    q = unit_profile(second, b, out_b)
    n = min(p.size, q.size)
    expected = float(p[:n] @ q[:n])
    got = first.inner(out_a, second, out_b, update_steps=None if grid_a == "every step" else a,
                      other_update_steps=None if grid_b == "every step" else b)  # fmt: skip
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert got == pytest.approx(
        second.inner(out_b, first, out_a, update_steps=b, other_update_steps=a), rel=1e-12, abs=1e-300
    )
    if (first, grid_a, out_a) == (second, grid_b, out_b):
        assert got == pytest.approx(first.norm_sq(out_a, update_steps=a), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    decays=st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.99)),
    starts=st.tuples(st.integers(0, 30), st.integers(0, 30)),
    out=st.tuples(st.integers(1, 60), st.integers(1, 60)),
    steps=st.lists(st.integers(1, 60), min_size=1, max_size=40, unique=True),
)
def test_inner_property_against_a_fine_grid(decays, starts, out, steps) -> None:  # type: ignore[no-untyped-def]
    """Random decays, starts, read steps and one irregular grid against a midpoint sum on a grid 4x finer."""
    first, second = Constant(decays[0], start=starts[0]), Constant(decays[1], start=starts[1])
    grid = np.array(sorted(steps), dtype=np.float64)
    if grid[0] > min(out):
        return  # no update before one of the read steps: covered by the error test
    fine = (np.arange(4 * 60) + 0.5) / 4
    p = unit_profile(first, np.arange(1.0, 61.0), out[0])
    q_units = unit_profile(second, grid, out[1])
    p_fine = np.where(fine <= out[0], p[np.minimum(fine.astype(int), p.size - 1)], 0.0)
    q_fine = np.where(fine <= out[1], q_units[np.minimum(fine.astype(int), q_units.size - 1)], 0.0)
    expected = float(np.sum(p_fine * q_fine) / 4)
    got = first.inner(out[0], second, out[1], other_update_steps=grid)
    assert got == pytest.approx(expected, rel=1e-11, abs=1e-15)


def test_inner_over_long_runs_walks_in_chunks_and_stays_exact() -> None:
    # 1e5 updates: several chunks of each walk, read at different steps.
    n_a, n_b = 100_000, 93_017
    a, b = 0.99999, 0.99997  # slow enough that every chunk of both walks counts
    i = np.arange(1, n_a + 1)
    wa = (1 - a) * a ** (n_a - i)
    wa[0] += a**n_a
    j = np.arange(1, n_b + 1)
    wb = (1 - b) * b ** (n_b - j)
    wb[0] += b**n_b
    expected = float(wa[:n_b] @ wb)
    assert Constant(a).inner(n_a, Constant(b), n_b) == pytest.approx(expected, rel=1e-11)


def test_inner_refuses_a_read_before_any_update() -> None:
    with pytest.raises(ValueError, match=r"no update at or before out_step=4\.0"):
        Constant(0.9).inner(10.0, Constant(0.5), 4.0, other_update_steps=[5.0, 6.0])


def test_log_decays_are_the_products_of_the_decays() -> None:
    grid = np.array([1.0, 2.0, 5.0, 6.0, 7.0, 13.0, 20.0])
    sched = Constant(0.8, start=5)
    logs, copies = sched._log_decays([0.5, 5.0, 6.0, 13.0, 19.0, 20.0], grid)
    np.testing.assert_allclose(logs, [0, 0, math.log(0.8), 3 * math.log(0.8), 3 * math.log(0.8), 4 * math.log(0.8)])
    np.testing.assert_array_equal(copies, [0, 3, 3, 3, 3, 3])


# -- synthesis with classic snapshots ------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=repr)
def test_classic_snapshots_make_the_reconstruction_better_and_errors_honest(runs, target) -> None:  # type: ignore[no-untyped-def]
    folder, theta = runs["both"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)
        without = plan(folder, target, use_classic=False)
    the_plan = plan(folder, target)
    assert len(the_plan.snapshots) == 2 * len(without.snapshots) == 80
    assert [s.name for s in the_plan.classic_snapshots] == ["fast", "slow"] * 20
    assert the_plan.tracked_sigma_rels == SIGMA_RELS
    gram, cross, norm_sq, masses, densities, power, classic = independent_products(the_plan, target, NAMED)
    coef = the_plan.coefficients[:, 0]
    assert float(coef.sum()) == pytest.approx(1.0, abs=1e-12)
    predicted = math.sqrt(max(coef @ gram @ coef - 2 * coef @ cross + norm_sq, 0.0) / norm_sq)
    # Equal to float64 resolution: a relative error of 1e-5 is a residual of 1e-10 of the target's norm squared.
    assert float(the_plan.errors[0]) == pytest.approx(predicted, rel=1e-4, abs=2e-6)
    # The best combination of these profiles, solved densely here: the plan's is as good.
    scale = 1 / np.sqrt(np.diag(gram))
    best = np.linalg.lstsq(gram * scale[:, None] * scale, cross * scale, rcond=1e-13)[0] * scale
    best /= best.sum()
    best_error = math.sqrt(max(best @ gram @ best - 2 * best @ cross + norm_sq, 0.0) / norm_sq)
    assert predicted <= best_error * 1.01 + 1e-9
    assert predicted < 0.5 * float(without.errors[0])
    # Realized: the weights on unit steps, against the target's (the relation of tests/test_schedule_synthesis.py).
    weights = coef[power] @ masses + coef[classic] @ densities
    grid = np.arange(1.0, STEPS + 1)
    if isinstance(target, Schedule):
        exact = brute_weights(target, grid, STEPS)
        direct = classic_ema(theta, target, grid, STEPS)
    else:
        g = float(profiles.sigma_rel_to_gamma(target))
        exact = np.concatenate([[0.0], unit_masses(np.array([float(STEPS)]), np.array([g]), STEPS)[0]])
        direct = power_ema(theta, target, STEPS)
    folded = exact[1:].copy()
    folded[0] += exact[0]
    realized = math.sqrt(np.sum((weights - folded) ** 2) / norm_sq)
    # predicted**2 = realized**2 + the variation of the power profiles within unit steps (orthogonal to
    # anything constant on them, as the classic profiles are): the power-function target's counts with weight -1.
    z = coef[power]
    steps = np.array([the_plan.snapshots[i].step for i in power], dtype=np.float64)
    gammas = np.array([the_plan.snapshots[i].gamma for i in power])
    if not isinstance(target, Schedule):
        z = np.append(z, -1.0)
        steps, gammas = np.append(steps, float(STEPS)), np.append(gammas, profiles.sigma_rel_to_gamma(target))
    within_sq = z @ profiles._gram(steps, gammas) @ z - np.sum((z @ unit_masses(steps, gammas, STEPS)) ** 2)
    assert predicted**2 == pytest.approx(realized**2 + within_sq / norm_sq, rel=1e-6, abs=1e-12)
    # The synthesized tensor against the EMA tracked directly: under a random walk of step WALK,
    # E|synthesized - direct|**2 = dims WALK**2 sum_j (sum_{u >= j} error_u)**2, u over updates 1..STEPS,
    # the initial copy's weight error being carried by the classic snapshots' own copies.
    initial = sum(coef[i] * brute_weights(NAMED[str(the_plan.snapshots[i].name)], grid, the_plan.snapshots[i].step)[0]
                  for i in classic)  # fmt: skip
    per_update = weights.copy()
    per_update[0] -= initial
    error = per_update - exact[1:]
    tails = np.cumsum(error[::-1])[::-1]
    expected = math.sqrt(DIMS * WALK**2 * np.sum(tails**2))
    synthesized = synthesize(folder, target, dtype=torch.float64)["weight"].numpy().ravel()
    distance = float(np.linalg.norm(synthesized - direct))
    assert distance == pytest.approx(expected, rel=0.2, abs=1e-6 * np.linalg.norm(direct))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)
        old = synthesize(folder, target, dtype=torch.float64, use_classic=False)["weight"].numpy().ravel()
    assert distance < float(np.linalg.norm(old - direct))


@pytest.mark.parametrize("target", TARGETS, ids=repr)
def test_a_folder_of_classic_snapshots_only_synthesizes_with_an_honest_error(runs, target) -> None:  # type: ignore[no-untyped-def]
    folder, theta = runs["only"]
    the_plan = plan(folder, target)
    assert the_plan.tracked_sigma_rels == () and len(the_plan.classic_snapshots) == 40
    assert not the_plan.outside[0]
    gram, cross, norm_sq, *_ = independent_products(the_plan, target, ONLY_CLASSIC)
    coef = the_plan.coefficients[:, 0]
    predicted = math.sqrt(max(coef @ gram @ coef - 2 * coef @ cross + norm_sq, 0.0) / norm_sq)
    # Equal to float64 resolution: a relative error of 1e-5 is a residual of 1e-10 of the target's norm squared.
    assert float(the_plan.errors[0]) == pytest.approx(predicted, rel=1e-4, abs=2e-6)
    assert predicted < 0.05
    grid = np.arange(1.0, STEPS + 1)
    direct = (
        classic_ema(theta, target, grid, STEPS) if isinstance(target, Schedule) else power_ema(theta, target, STEPS)
    )
    got = synthesize(folder, target, dtype=torch.float64)["weight"].numpy().ravel()
    moved = float(np.linalg.norm(direct - theta[0]))
    assert float(np.linalg.norm(got - direct)) < 3 * predicted * moved + 1e-9


@pytest.mark.parametrize(("name", "step"), [("slow", STEPS), ("fast", STEPS), ("slow", 1000), ("fast", 300)])
def test_a_classic_snapshot_reproduced_as_a_target_takes_it_alone(runs, name: str, step: int) -> None:  # type: ignore[no-untyped-def]
    folder, _ = runs["both"]
    the_plan = plan(folder, NAMED[name], step=step)
    row = next(i for i, s in enumerate(the_plan.snapshots) if s.name == name and s.step == step)
    coef = the_plan.coefficients[:, 0]
    assert coef[row] == pytest.approx(1.0, abs=1e-6)
    assert np.max(np.abs(np.delete(coef, row))) < 1e-6
    assert float(the_plan.errors[0]) < 1e-6
    with safe_open(str(the_plan.snapshots[row].path), framework="pt") as f:
        stored = f.get_tensor("weight")
    got = synthesize(folder, NAMED[name], step=step, dtype=torch.float64)["weight"]
    torch.testing.assert_close(got, stored, rtol=0, atol=1e-6)


def test_forced_updates_at_snapshot_steps_are_on_the_update_grid(tmp_path: Path) -> None:
    # update_every=4 with snapshots every 50 steps: the tracker also updates at 50, 150, ... (not multiples of 4).
    theta = walk(600, 8, seed=1)
    folder = track(tmp_path, theta, (0.05, 0.10), {"fast": Constant(0.98)}, snapshot_every=50, update_every=4)
    the_plan = plan(folder, Constant(0.98))
    grid = np.union1d(np.arange(4.0, 601.0, 4.0), np.arange(50.0, 601.0, 50.0))
    np.testing.assert_array_equal(the_plan.update_steps(), grid)
    row = next(i for i, s in enumerate(the_plan.snapshots) if s.name == "fast" and s.step == 600)
    assert the_plan.coefficients[row, 0] == pytest.approx(1.0, abs=1e-6)
    assert float(the_plan.errors[0]) < 1e-6
    # The snapshot is the recursion on that grid, and so is the synthesized EMA (accumulated in float32).
    direct = classic_ema(theta, Constant(0.98), grid, 600)
    got = synthesize(folder, Constant(0.98), dtype=torch.float64)["weight"].numpy().ravel()
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-6)
    on_multiples_only = classic_ema(theta, Constant(0.98), np.arange(4.0, 601.0, 4.0), 600)
    assert np.max(np.abs(on_multiples_only - direct)) > 1e-4  # the forced updates matter


@pytest.mark.parametrize("update_every", [4, 2, 1])
def test_a_classic_target_on_the_snapshots_grid_or_another(tmp_path: Path, update_every: int) -> None:
    theta = walk(600, 8, seed=2)
    named = {"fast": Constant(0.98), "slow": HalfLife(120.0)}
    folder = track(tmp_path, theta, (0.05, 0.10), named, snapshot_every=50, update_every=4)
    target = Constant(0.985)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)  # every 2 steps, 0.985 is wide for these
        the_plan = plan(folder, [target, 0.1], update_every=update_every)
        got = synthesize(folder, target, update_every=update_every, dtype=torch.float64)["weight"].numpy().ravel()
    basis = np.union1d(np.arange(4.0, 601.0, 4.0), np.arange(50.0, 601.0, 50.0))
    grid = np.union1d(np.arange(update_every, 601.0, update_every), np.arange(50.0, 601.0, 50.0))
    gram, cross, norm_sq, *_ = independent_products(the_plan, target, named, basis, grid)
    coef = the_plan.coefficients[:, 0]
    predicted = math.sqrt(max(coef @ gram @ coef - 2 * coef @ cross + norm_sq, 0.0) / norm_sq)
    assert float(the_plan.errors[0]) == pytest.approx(predicted, rel=1e-4, abs=2e-6)
    gram, cross, norm_sq, *_ = independent_products(the_plan, 0.1, named, basis)
    coef = the_plan.coefficients[:, 1]
    predicted = math.sqrt(max(coef @ gram @ coef - 2 * coef @ cross + norm_sq, 0.0) / norm_sq)
    assert float(the_plan.errors[1]) == pytest.approx(predicted, rel=1e-4, abs=2e-6)
    direct = classic_ema(theta, target, grid, 600)
    assert float(np.linalg.norm(got - direct)) < 3 * float(the_plan.errors[0]) * float(
        np.linalg.norm(direct - theta[0])
    )


def test_segment_sums_give_the_products_of_the_profiles() -> None:
    grid = np.union1d(np.arange(4.0, 401.0, 4.0), [50.0, 150.0, 250.0, 350.0])
    ends = np.arange(50.0, 401.0, 50.0)
    named = [Constant(0.98), HalfLife(30.0, start=120), Warmup(power=0.75, max_beta=0.99), Constant(0.9, start=1)]
    gammas = profiles.sigma_rel_to_gamma(np.array([0.05, 0.1, 0.2]))
    segments = schedules._segments(named, ends, gammas, grid)
    steps, in_gammas = np.repeat(ends, 3), np.tile(gammas, ends.size)
    same = segments.same_step()
    for s, first in enumerate(named):
        for k, step in enumerate(ends):
            expected = first.cross(step, steps, in_gammas, update_steps=grid)
            np.testing.assert_allclose(segments.cross(s, k, steps, in_gammas), expected, rtol=1e-12, atol=1e-18)
            for r, second in enumerate(named):
                for m in range(k, ends.size):
                    got = float(segments.decay(r, k, m)) * same[s, r, k]
                    p = unit_profile(first, grid, int(step), 400)
                    q = unit_profile(second, grid, int(ends[m]), 400)
                    assert got == pytest.approx(float(p @ q), rel=1e-11, abs=1e-18)
    with pytest.raises(ValueError, match=r"step 7\.0 is not an update step of the grid"):
        schedules._segments(named, [7.0, 400.0], gammas, grid)


def test_without_classic_snapshots_the_plan_is_the_power_function_one(runs, tmp_path: Path) -> None:
    folder, _ = runs["both"]
    for path in folder.glob("*.safetensors"):
        if "-fast" not in path.name and "-slow" not in path.name:
            shutil.copy(path, tmp_path / path.name)
    targets = [0.07, Constant(0.99, start=1000), 0.12]
    kept = plan(folder, targets, use_classic=False)
    alone = plan(tmp_path, targets)
    np.testing.assert_array_equal(kept.coefficients, alone.coefficients)
    np.testing.assert_array_equal(kept.errors, alone.errors)
    assert kept.classic_snapshots == () and "classic_snapshots" not in kept.metadata(0)
    with pytest.raises(SnapshotError, match=r"holds only snapshots of classic EMAs, and use_classic=False"):
        plan(runs["only"][0], 0.1, use_classic=False)


def test_a_classic_snapshot_of_an_unknown_schedule_is_named(tmp_path: Path) -> None:
    theta = walk(100, 4, seed=3)
    folder = track(tmp_path, theta, (0.1,), {"c": Constant(0.9)}, snapshot_every=50)
    path = folder / "phema-000000000100-c.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["schedule"] = '{"class": "Cosine", "beta": 0.9}'
    path.unlink()
    write_atomic(path, tensors, meta)
    with pytest.raises(SnapshotError, match=r"-c\.safetensors: cannot use this classic snapshot as a basis profile "
                       r"\(schedule spec .* names the class 'Cosine'.*\); pass use_classic=False"):  # fmt: skip
        plan(folder, 0.1)
    assert plan(folder, 0.1, use_classic=False).classic_snapshots == ()


def test_metadata_and_rounding_count_the_classic_snapshots(runs, tmp_path: Path) -> None:
    folder, _ = runs["both"]
    targets = [0.08, Constant(0.999)]
    the_plan = plan(folder, targets)
    classic_rows = [i for i, s in enumerate(the_plan.snapshots) if s.is_classic]
    assert np.abs(the_plan.coefficients[classic_rows]).sum() > 0.5
    expected = _RMS_ROUNDING * UNIT_ROUNDOFF["F64"] * np.linalg.norm(the_plan.coefficients, axis=0)
    np.testing.assert_allclose(the_plan.rounding_errors, expected, rtol=1e-12)
    np.testing.assert_allclose(the_plan.coefficient_norms, np.linalg.norm(the_plan.coefficients, axis=0))
    sds = synthesize_many(folder, targets)
    save(tmp_path / "c.safetensors", sds[Constant(0.999)], the_plan, 1)
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["snapshots"] == "80" and meta["classic_snapshots"] == "40"
    assert meta["schedule"] == "constant:beta=0.999"
    assert float(meta["predicted_error"]) == float(the_plan.errors[1])
    assert the_plan.subset([1]).copy_weights[0] == the_plan.copy_weights[1]
    # The initial copy (13.5% of Constant(0.999) at step 2000) is carried by the slow snapshots' own copies.
    assert the_plan.initial_weights[1] == pytest.approx(0.999**STEPS, rel=1e-9)
    assert the_plan.copy_mismatch(1) < 1e-3


def test_a_copy_no_snapshot_holds_is_still_named(runs) -> None:  # type: ignore[no-untyped-def]
    folder, _ = runs["both"]
    with pytest.warns(PoorReconstructionWarning) as caught:
        the_plan = plan(folder, Constant(0.99, start=1900))
    messages = [str(w.message) for w in caught]
    assert any("constant:beta=0.99,start=1900 still keeps 36.6% of its weight" in m for m in messages), messages
    assert the_plan.copy_weights[0] == 0.0 and the_plan.copy_mismatch(0) == pytest.approx(0.99**100, rel=1e-9)


# -- the command line ---------------------------------------------------------------------------------


def test_the_cli_lists_and_can_leave_out_the_classic_snapshots(runs) -> None:  # type: ignore[no-untyped-def]
    folder, _ = runs["both"]
    out, _ = invoke("synthesize", folder, "--beta", "0.999", "--dry-run")
    assert "from 80 snapshots (steps 100..2000, sigma_rels 0.05, 0.1, classic EMAs fast (20), slow (20))" in out
    assert any(line.split()[:2] == ["2000", "slow"] for line in out.splitlines())
    assert "CANNOT BE REPRESENTED" not in out
    out, _ = invoke("synthesize", folder, "--beta", "0.999", "--dry-run", "--no-classic")
    assert "from 40 snapshots (steps 100..2000, sigma_rels 0.05, 0.1)" in out
    assert "CANNOT BE REPRESENTED" in out


def test_plot_can_leave_out_the_classic_snapshots(runs, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder, _ = runs["both"]
    drawn = []
    monkeypatch.setattr(cli, "plot_profile", lambda the_plan, index, path: drawn.append(the_plan))
    monkeypatch.setattr(cli, "plot_error_curve", lambda the_plan, ax, path: drawn.append(the_plan))
    for flags in ([], ["--no-classic"]):
        invoke("plot", folder, "--sigma-rel", "0.08", "-o", tmp_path / "profile.png", *flags)
        invoke("plot", folder, "--error-curve", "0.04:0.2:0.04", "-o", tmp_path / "curve.png", *flags)
    assert [len(p.classic_snapshots) for p in drawn] == [40, 40, 0, 0]
    assert drawn[2].errors[0] > drawn[0].errors[0]  # the classic profiles help


def test_info_counts_the_classic_snapshots_by_name_and_schedule(runs) -> None:  # type: ignore[no-untyped-def]
    folder, _ = runs["both"]
    summary = describe(folder)
    assert summary["snapshots"] == 40
    assert summary["classic"]["snapshots"] == 40
    assert summary["classic"]["names"] == {"fast": 20, "slow": 20}
    assert summary["classic"]["schedules"] == {"fast": "constant:beta=0.99", "slow": "constant:beta=0.9995"}
    out, _ = invoke("info", folder)
    line = next(line for line in out.splitlines() if line.startswith("classic EMAs"))
    assert line.split(None, 2)[2] == "40 files: fast (constant:beta=0.99) x20, slow (constant:beta=0.9995) x20"
    data = json.loads(invoke("info", folder, "--json")[0])
    assert data["classic"]["names"] == {"fast": 20, "slow": 20}
    listing, _ = invoke("info", folder, "--files")
    assert "phema-000000002000-slow.safetensors" in listing


def test_a_command_sweep_resumes_only_with_the_same_basis(runs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder, _ = runs["both"]
    evaluate = tmp_path / "evaluate.py"
    evaluate.write_text("print('{\"loss\": 1.0}')\n")
    command = f"{sys.executable} {evaluate} {{weights}}"
    command_sweep(folder, [0.07], command, tmp_path / "sweep", keep_weights=False)
    with pytest.raises(ValueError, match=r"holds results synthesized with the classic snapshots as basis profiles, "):
        command_sweep(folder, [0.07, 0.08], command, tmp_path / "sweep", keep_weights=False, use_classic=False)
    again = command_sweep(folder, [0.07, 0.08], command, tmp_path / "sweep", keep_weights=False)
    assert [row.sigma_rel for row in again.rows] == [0.07, 0.08]


def test_no_classic_is_refused_with_plain_checkpoints(tmp_path: Path) -> None:
    _, err = invoke("synthesize", "--from-checkpoints", tmp_path, "--sigma-rel", "0.1", "--no-classic", code=2)
    assert "--no-classic applies to snapshot folders, not to --from-checkpoints" in err
