"""Post-hoc synthesis of classic EMA schedules (posthoc_ema.synthesis with posthoc_ema.schedules targets)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from posthoc_ema import profiles, schedules
from posthoc_ema._version import __version__
from posthoc_ema.errors import PoorReconstructionWarning
from posthoc_ema.schedules import Constant, HalfLife, PowerFunction, Threshold, Warmup
from posthoc_ema.snapshots import SnapshotInfo, snapshot_name, write_atomic
from posthoc_ema.synthesis import plan, save, synthesize, synthesize_many

STEPS, DIMS, EVERY, SIGMA_RELS, WALK = 2000, 1000, 100, (0.05, 0.10), 0.05
TARGETS = {
    "constant": Constant(0.99),
    "constant from step 1000": Constant(0.99, start=1000),
    "half-life": HalfLife(150.0),
    "warm-up": Warmup(power=0.75, max_beta=0.999),
    "threshold": Threshold(0.995),
}


def write_run(folder: Path, *, update_every: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A float64 random walk from 1 and its power-function EMAs (EDM2 eq. 127) every EVERY steps,
    written as float64 snapshot files; returns (trajectory, snapshots, their steps, their gammas)."""
    rng = np.random.default_rng(0)
    theta = np.ones((STEPS + 1, DIMS))
    theta[1:] += np.cumsum(rng.standard_normal((STEPS, DIMS)) * WALK, axis=0)
    gammas = profiles.sigma_rel_to_gamma(np.array(SIGMA_RELS))
    ema = np.repeat(theta[:1], gammas.size, axis=0)
    snaps, steps, snap_gammas = [], [], []
    for t in range(1, STEPS + 1):
        beta = (1 - 1 / t) ** (gammas + 1)
        ema = beta[:, None] * ema + (1 - beta[:, None]) * theta[t]
        if t % EVERY == 0:
            for k, sigma_rel in enumerate(SIGMA_RELS):
                info = SnapshotInfo(
                    path=folder / snapshot_name(t, sigma_rel),
                    step=t,
                    sigma_rel=sigma_rel,
                    gamma=float(gammas[k]),
                    dtype="float64",
                    update_every=update_every,
                    library_version=__version__,
                )
                write_atomic(info.path, {"w": torch.from_numpy(ema[k].copy())}, info.metadata())
                snaps.append(ema[k].copy())
                steps.append(float(t))
                snap_gammas.append(float(gammas[k]))
    return theta, np.array(snaps), np.array(steps), np.array(snap_gammas)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("run")
    return folder, write_run(folder)


def tracked_directly(schedule: schedules.Schedule, theta: np.ndarray) -> np.ndarray:
    """The EMA of ``schedule`` applied update by update to the trajectory, in float64."""
    ema = theta[0].copy()
    for t in range(1, theta.shape[0]):
        beta = float(schedule.beta(t, t - 1))
        ema = beta * ema + (1 - beta) * theta[t]
    return ema


def order(steps: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """Row order of the plan's snapshots (sorted by step, then sigma_rel) in the arrays of write_run."""
    return np.lexsort((-gammas, steps))


@pytest.mark.parametrize("name", list(TARGETS))
def test_synthesized_schedule_matches_the_directly_tracked_ema(name: str, run) -> None:  # type: ignore[no-untyped-def]
    folder, (theta, snaps, steps, gammas) = run
    schedule = TARGETS[name]
    the_plan = plan(folder, schedule)
    assert the_plan.targets == (schedule,)
    assert the_plan.step == STEPS
    idx = order(steps, gammas)
    assert [s.step for s in the_plan.snapshots] == steps[idx].tolist()
    coef = the_plan.coefficients[:, 0]
    # The predicted error, recomputed independently with the dense Gram matrix.
    gram = profiles._gram(steps[idx], gammas[idx])
    cross, norm_sq = schedules.target_products(schedule, STEPS, steps[idx], gammas[idx])
    predicted = math.sqrt(max(coef @ gram @ coef - 2 * coef @ cross + norm_sq, 0.0) / norm_sq)
    assert float(the_plan.errors[0]) == pytest.approx(predicted, rel=1e-5, abs=1e-9)
    assert float(coef.sum()) == pytest.approx(1.0, abs=1e-12)
    # Realized: the same L2 measure of the weight errors on the unit steps where weights live
    # (the relation of tests/test_schedules.py: predicted**2 = realized**2 + within-step variation**2).
    grid = np.arange(1.0, STEPS + 1)
    g1 = gammas[idx][:, None] + 1
    s = steps[idx][:, None]
    masses = (np.minimum(grid, s) / s) ** g1 - (np.minimum(grid - 1, s) / s) ** g1
    target = schedule.weights(grid, STEPS)
    target[1] += target[0]
    error = coef @ masses - target[1:]
    realized = math.sqrt(np.sum(error**2) / norm_sq)
    within = math.sqrt(max(coef @ gram @ coef - np.sum((coef @ masses) ** 2), 0.0) / norm_sq)
    assert predicted**2 == pytest.approx(realized**2 + within**2, rel=1e-6, abs=1e-14)
    assert realized <= predicted < 1e-2
    # The synthesized tensors are those weights applied to the snapshots (float32 accumulation)...
    synthesized = synthesize(folder, schedule, dtype=torch.float64)["w"].numpy()
    np.testing.assert_allclose(synthesized, coef @ snaps[idx], rtol=0, atol=2e-5)
    # ... and sit where those weight errors put them from the EMA tracked directly: under a
    # random walk of step WALK, E|synthesized - direct|**2 = dims WALK**2 sum_j (sum_{i>=j} error_i)**2.
    direct = tracked_directly(schedule, theta)
    tails = np.cumsum(error[::-1])[::-1]
    expected = math.sqrt(DIMS * WALK**2 * np.sum(tails**2))
    distance = float(np.linalg.norm(synthesized - direct))
    assert distance == pytest.approx(expected, rel=0.15)
    assert distance < 1e-2 * float(np.linalg.norm(direct - theta[0]))


def test_mixed_targets_in_one_pass_equal_the_separate_results(run) -> None:  # type: ignore[no-untyped-def]
    folder, _ = run
    mixed = [0.07, Constant(0.99), 0.12, HalfLife(150.0)]
    together = plan(folder, mixed)
    alone = [plan(folder, [t]) for t in mixed]
    for j, single in enumerate(alone):  # equal up to the rounding of solving several columns at once
        np.testing.assert_allclose(together.coefficients[:, j], single.coefficients[:, 0], rtol=1e-9, atol=1e-16)
        assert together.errors[j] == pytest.approx(single.errors[0], rel=1e-6, abs=1e-12)
    # sigma_rels are solved exactly as before schedules existed, bit for bit.
    in_steps = [s.step for s in together.snapshots]
    in_sigmas = [s.sigma_rel for s in together.snapshots]
    np.testing.assert_array_equal(
        together.coefficients[:, [0, 2]], profiles.solve_coefficients(in_steps, in_sigmas, STEPS, [0.07, 0.12])
    )
    assert together.sigma_rels[0] == 0.07 and together.sigma_rels[2] == 0.12
    assert together.labels == ("0.07", "constant:beta=0.99", "0.12", "half-life:half_life=150")
    sds = synthesize_many(folder, mixed)
    for t in mixed:
        torch.testing.assert_close(sds[t]["w"], synthesize(folder, t)["w"], rtol=0, atol=1e-5)


def test_results_are_found_by_schedule_by_equal_schedule_and_by_label(run) -> None:  # type: ignore[no-untyped-def]
    folder, _ = run
    sds = synthesize_many(folder, [0.1, Constant(0.99, start=1000)])
    expected = sds[Constant(0.99, start=1000)]
    assert sds[Constant(0.99, 1000.0)] is expected
    assert sds["constant:beta=0.99,start=1000"] is expected
    assert Constant(0.99, start=1000) in sds and Constant(0.99) not in sds
    assert sds[PowerFunction(sigma_rel=0.1)] is sds[0.1] is sds["power:sigma_rel=0.1"]
    with pytest.raises(KeyError):
        sds["constant:beta=0.98"]


def test_classic_sigma_rels_are_their_equivalent_ones(run) -> None:  # type: ignore[no-untyped-def]
    folder, _ = run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)
        the_plan = plan(folder, [Constant(0.99), Constant(0.9997)])
    assert the_plan.sigma_rels[0] == profiles.canonical_sigma_rel(schedules.equivalent_sigma_rel(Constant(0.99), STEPS))
    assert math.isnan(the_plan.sigma_rels[1])  # half of it is its initial copy: wider than any power function
    assert np.isnan(the_plan.gammas).all()


def test_a_target_held_by_its_initial_copy_is_named_as_unrepresentable(run) -> None:  # type: ignore[no-untyped-def]
    folder, _ = run
    with pytest.warns(PoorReconstructionWarning) as caught:
        the_plan = plan(folder, [0.1, Constant(0.999)])
    messages = [str(w.message) for w in caught]
    assert any(
        "1 of 2 targets cannot be represented: constant:beta=0.999 still keeps 13.5% of its weight at step 2000 "
        "on the copy of the weights at step 0 it started from" in m
        for m in messages
    ), messages
    assert the_plan.initial_weights[1] == pytest.approx(0.999**STEPS, rel=1e-9)
    assert the_plan.initial_weights[0] == 0.0 and the_plan.copy_steps[1] == 0.0
    assert the_plan.errors[1] > 0.3
    # A late start is a copy too: of the weights at that step, held as a point mass.
    with pytest.warns(PoorReconstructionWarning) as caught:
        late = plan(folder, Constant(0.99, start=1900))
    assert any("constant:beta=0.99,start=1900 still keeps 36.6% of its weight" in str(w.message) for w in caught)
    assert late.copy_steps[0] == 1900.0 and late.initial_weights[0] == pytest.approx(0.99**100, rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan(folder, Constant(0.99, start=1000)).initial_weights[0] < 1e-4  # no warning at all


def test_output_files_record_the_schedule(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder, _ = run
    the_plan = plan(folder, [0.1, Warmup(power=0.75, max_beta=0.999)])
    sds = synthesize_many(folder, [0.1, Warmup(power=0.75, max_beta=0.999)])
    save(tmp_path / "warm.safetensors", sds[the_plan.key(1)], the_plan, 1)
    save(tmp_path / "power.safetensors", sds[the_plan.key(0)], the_plan, 0)
    with safe_open(str(tmp_path / "warm.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["schedule"] == "warmup:power=0.75,max_beta=0.999"
    assert schedules.parse_schedule(meta["schedule"]) == Warmup(power=0.75, max_beta=0.999)
    assert meta["update_every"] == "1"
    assert float(meta["copy_step"]) == 1.0 and float(meta["initial_weight"]) < 1e-6  # warm-up copies at step 1
    assert float(meta["sigma_rel"]) == the_plan.sigma_rels[1]
    with safe_open(str(tmp_path / "power.safetensors"), framework="pt") as f:
        power_meta = f.metadata()
    assert "schedule" not in power_meta and float(power_meta["sigma_rel"]) == 0.1


def test_the_update_grid_follows_the_snapshots_update_every(tmp_path: Path) -> None:
    _, _, steps, gammas = write_run(tmp_path, update_every=4)
    target = HalfLife(150.0)
    the_plan = plan(tmp_path, target)
    assert the_plan.update_every == 4
    idx = order(steps, gammas)
    grid = np.arange(4.0, STEPS + 1, 4.0)
    np.testing.assert_array_equal(the_plan.update_steps(), grid)
    cross, norm_sq = schedules.target_products(target, STEPS, steps[idx], gammas[idx], update_steps=grid)
    expected, _ = profiles._solve_targets(steps[idx], gammas[idx], np.array([norm_sq]), cross=cross[:, None])
    np.testing.assert_allclose(the_plan.coefficients, expected, rtol=1e-12, atol=1e-15)
    # A constant decay is per update: every 4th step, it averages 4 times as long.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)  # 100 updates are too few for these snapshots
        every_step = plan(tmp_path, Constant(0.99), update_every=1)
        every_fourth = plan(tmp_path, Constant(0.99))
    assert every_fourth.sigma_rels[0] == pytest.approx(4 * every_step.sigma_rels[0], rel=0.05)
    with pytest.raises(ValueError, match=r"update_every=0 is not a positive integer"):
        plan(tmp_path, Constant(0.99), update_every=0)


def test_repeated_schedules_are_refused(run) -> None:  # type: ignore[no-untyped-def]
    folder, _ = run
    with pytest.raises(ValueError, match=r"sigma_rels repeats Constant\(beta=0.99, start=0\)"):
        plan(folder, [Constant(0.99), 0.1, Constant(0.99, start=0)])
    with pytest.raises(ValueError, match=r"sigma_rels repeats sigma_rel=0.1"):
        plan(folder, [PowerFunction(sigma_rel=0.1), 0.1])


def test_the_profile_plot_draws_a_classic_target(run) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    from posthoc_ema.plots import plot_profile

    folder, _ = run
    the_plan = plan(folder, [0.1, HalfLife(150.0, start=500)])
    ax = plot_profile(the_plan, 1).axes[0]
    target = next(line for line in ax.get_lines() if line.get_label().startswith("target: half-life"))
    t, y = np.asarray(target.get_xdata()), np.asarray(target.get_ydata())
    # The density x step: exact weights per unit step, 0 before the start, 2**(-age/150) shape after it.
    weights = HalfLife(150.0, start=500).weights(np.arange(1.0, STEPS + 1), STEPS)
    inside = (t > 600) & (t <= STEPS)
    np.testing.assert_allclose(y[inside], weights[np.ceil(t[inside]).astype(int)] * STEPS, rtol=1e-12)
    assert np.all(y[(t > 0) & (t <= 499)] == 0)
    assert "half-life:half_life=150,start=500" in ax.get_title()


def test_an_in_process_sweep_takes_schedules(run) -> None:  # type: ignore[no-untyped-def]
    from posthoc_ema.sweeps import sweep

    folder, _ = run
    targets = [Constant(0.99, start=1000), 0.1, Constant(0.99), HalfLife(150.0)]
    expected = synthesize_many(folder, targets)
    seen: list[float] = []

    def evaluate(state_dict: dict[str, torch.Tensor]) -> float:
        seen.append(float(state_dict["w"].sum()))
        return float(state_dict["w"].mean())

    result = sweep(folder, targets, evaluate)
    assert [r.target for r in result.rows] == [None, "constant:beta=0.99", "constant:beta=0.99,start=1000",
                                               "half-life:half_life=150"]  # fmt: skip
    for row, key in zip(result.rows, [0.1, Constant(0.99), Constant(0.99, start=1000), HalfLife(150.0)], strict=True):
        assert row.metrics["metric"] == pytest.approx(float(expected[key]["w"].mean()), rel=1e-6)
    assert len(seen) == 4
