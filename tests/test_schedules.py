"""posthoc_ema.schedules: decays against their libraries, weights against a brute-force EMA, profiles by quadrature."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_ema import profiles, schedules
from posthoc_ema.schedules import (
    Constant,
    ExpWarmup,
    HalfLife,
    PowerFunction,
    Schedule,
    Threshold,
    Warmup,
    as_schedule,
    equivalent_sigma_rel,
)

SCHEDULES = [
    PowerFunction(sigma_rel=0.1),
    PowerFunction(gamma=0.5),
    Constant(0.9),
    Constant(0.8, start=7),
    HalfLife(3.0),
    HalfLife(5.0, update_interval=4, start=2),
    Warmup(),
    Warmup(inv_gamma=2.0, power=0.75, min_beta=0.3, max_beta=0.95, update_after_step=5),
    Threshold(0.95),
    ExpWarmup(0.9, rate=15.0, total_steps=40),
]
GRIDS = {
    "every step": np.arange(1.0, 41.0),
    "every 4": np.arange(4.0, 41.0, 4.0),
    "irregular": np.array([1.0, 2.0, 5.0, 6.0, 7.0, 13.0, 20.0, 21.0, 30.0, 38.0, 40.0]),
}


def brute_force_weights(schedule: Schedule, steps: np.ndarray, out_step: float) -> np.ndarray:
    """The EMA of one-hot trajectories, in float64: row j is the weight of update j (0: the initial copy)."""
    ema = np.zeros(steps.size + 1)
    ema[0] = 1.0
    prev = 0.0
    for i, t in enumerate(steps):
        if t > out_step:
            break
        beta = float(schedule.beta(t, prev))
        onehot = np.zeros_like(ema)
        onehot[i + 1] = 1.0
        ema = beta * ema + (1.0 - beta) * onehot
        prev = t
    return ema


def densities(schedule: Schedule, steps: np.ndarray, out_step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intervals (a, b] and densities of the piecewise-constant profile, from the brute-force weights."""
    w = brute_force_weights(schedule, steps, out_step)
    used = steps <= out_step
    b = steps[used]
    a = np.concatenate([[0.0], b[:-1]])
    mass = w[1 : 1 + b.size].copy()
    mass[0] += w[0]  # the initial copy is counted on the first interval
    return a, b, mass / (b - a)


# -- the decays -----------------------------------------------------------------------------------


def test_decays_follow_their_formulas():
    t = np.arange(1.0, 30.0)
    prev = t - 1
    assert np.array_equal(Constant(0.9, start=3).beta(t, prev), np.where(t <= 3, 0.0, 0.9))
    np.testing.assert_allclose(HalfLife(4.0).beta(t, prev), 2 ** (-1 / 4.0), rtol=1e-15)
    np.testing.assert_allclose(HalfLife(4.0).beta(t[1:], t[:-1] - 1), 2 ** (-2 / 4.0), rtol=1e-15)
    e = t - 6 - 1
    warm = np.where(e <= 0, 0.0, np.clip(1 - (1 + np.maximum(e, 0) / 2.0) ** -0.75, 0.3, 0.95))
    np.testing.assert_allclose(Warmup(2.0, 0.75, 0.3, 0.95, 6).beta(t, prev), warm, rtol=1e-15)
    np.testing.assert_allclose(Threshold(0.9).beta(t, prev), np.minimum(0.9, (1 + t) / (10 + t)), rtol=1e-15)
    np.testing.assert_allclose(ExpWarmup(0.9, 15.0, 29).beta(t, prev), 0.9 * (1 - np.exp(-15.0 * t / 29)), rtol=1e-14)
    np.testing.assert_allclose(PowerFunction(gamma=2.0).beta(t, prev), (prev / t) ** 3, rtol=1e-15)


def test_half_life_with_an_interval_decays_only_at_its_multiples():
    sched = HalfLife(10.0, update_interval=5)
    t = np.arange(1.0, 21.0)
    expected = np.where(t % 5 == 0, 2 ** (-5 / 10.0), 1.0)
    np.testing.assert_allclose(sched.beta(t, t - 1), expected, rtol=1e-15)
    assert sched.smoothing == pytest.approx(2 ** (-0.5), rel=1e-15)
    # Sparse updates cross several multiples at once.
    assert float(sched.beta(17, 3)) == pytest.approx(2 ** (-15 / 10.0), rel=1e-15)


def test_power_function_log_beta_is_its_log():
    sched = PowerFunction(sigma_rel=0.05)
    t = np.array([1.0, 2.0, 10.0, 1e7])
    prev = np.array([0.0, 1.0, 3.0, 1e7 - 1])
    with np.errstate(divide="ignore"):
        # log(prev / t) rounds prev / t first: good to ~1e-16 / (1 - prev / t) only.
        np.testing.assert_allclose(sched.log_beta(t, prev), (sched.gamma + 1) * np.log(prev / t), rtol=1e-9)
    assert float(sched.log_beta(1e7, 1e7 - 1)) == pytest.approx((sched.gamma + 1) * math.log1p(-1e-7), rel=1e-15)


# -- exact weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("grid", list(GRIDS), ids=str)
@pytest.mark.parametrize("out_step", [40.0, 21.5])
def test_weights_match_a_brute_force_ema_of_one_hot_trajectories(schedule, grid, out_step):
    steps = GRIDS[grid]
    w = schedule.weights(steps, out_step)
    expected = brute_force_weights(schedule, steps, out_step)
    np.testing.assert_allclose(w, expected, rtol=1e-12, atol=1e-15)
    assert w.dtype == np.float64
    assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)
    assert np.all(w[1:][steps > out_step] == 0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 400), min_size=1, max_size=30, unique=True),
    st.floats(0.0, 0.999),
    st.integers(0, 50),
)
def test_constant_weights_property(raw, beta, start):
    steps = np.sort(np.array(raw, dtype=np.float64))
    sched = Constant(beta, start=start)
    out = float(steps[-1])
    np.testing.assert_allclose(
        sched.weights(steps, out), brute_force_weights(sched, steps, out), rtol=1e-11, atol=1e-14
    )


def test_weights_of_long_runs_sum_to_one_and_stay_exact():
    # 1e5 updates: several chunks, and the weights before the last ~74000 underflow to exactly 0.
    steps = np.arange(1.0, 100_001.0)
    w = Constant(0.99).weights(steps, steps[-1])
    assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)
    n = np.arange(steps.size)[::-1]  # updates after each one
    np.testing.assert_allclose(w[1:], 0.01 * 0.99**n, rtol=1e-9, atol=1e-300)
    assert w[0] == 0.0 and w[1] == 0.0 and w[-70_000] > 0


def test_before_the_first_update_the_ema_is_the_initial_copy():
    assert np.array_equal(Constant(0.9).weights([5.0, 6.0], 4.0), [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"no update at or before out_step=4\.0"):
        Constant(0.9).cross(4.0, [4.0], [1.0], update_steps=[5.0, 6.0])


# -- profile inner products, norms, widths -----------------------------------------------------------

SNAPSHOTS = [(40.0, 0.0), (40.0, 3.0), (25.0, 1.5), (33.0, 60.0), (12.0, 7.0)]


def power_profile(step: float, gamma: float):
    return lambda t: (gamma + 1) * t**gamma / step ** (gamma + 1) if t <= step else 0.0


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if not isinstance(s, PowerFunction)], ids=repr)
@pytest.mark.parametrize("grid", list(GRIDS), ids=str)
def test_cross_norm_and_std_match_numerical_integration(schedule, grid):
    steps = GRIDS[grid]
    out = 40.0
    a, b, d = densities(schedule, steps, out)
    expected = []
    for step, gamma in SNAPSHOTS:
        f = power_profile(step, gamma)
        expected.append(
            sum(
                di * scipy.integrate.quad(f, ai, bi, epsabs=0, epsrel=1e-13)[0]
                for ai, bi, di in zip(a, b, d, strict=True)
            )
        )
    in_steps, in_gammas = zip(*SNAPSHOTS, strict=True)
    got = schedule.cross(out, in_steps, in_gammas, update_steps=None if grid == "every step" else steps)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-17)
    norm = sum(di * di * (bi - ai) for ai, bi, di in zip(a, b, d, strict=True))
    assert schedule.norm_sq(out, update_steps=steps) == pytest.approx(norm, rel=1e-12)
    # The width, from fine midpoint sums of the density.
    fine = [(np.linspace(ai, bi, 2001)[:-1] + (bi - ai) / 4000, di) for ai, bi, di in zip(a, b, d, strict=True)]
    t = np.concatenate([x for x, _ in fine])
    p = np.concatenate([np.full(x.size, di * (x[1] - x[0])) for x, di in fine])
    mean = np.sum(p * t) / p.sum()
    std = math.sqrt(np.sum(p * (t - mean) ** 2) / p.sum())
    assert schedule.std(out, update_steps=steps) == pytest.approx(std, rel=1e-6)


def test_power_function_uses_the_closed_form_of_its_continuous_profile():
    sched = PowerFunction(sigma_rel=0.08)
    g = float(sched.gamma)
    for step, gamma in SNAPSHOTS:
        f, p = power_profile(step, gamma), power_profile(30.0, g)
        expected = scipy.integrate.quad(lambda t, f=f, p=p: f(t) * p(t), 0, min(step, 30.0), epsabs=0, epsrel=1e-12)[0]
        assert sched.cross(30.0, step, gamma)[0] == pytest.approx(expected, rel=1e-9)
    norm = scipy.integrate.quad(lambda t: power_profile(30.0, g)(t) ** 2, 0, 30.0, epsrel=1e-12)[0]
    assert sched.norm_sq(30.0) == pytest.approx(norm, rel=1e-9)
    assert equivalent_sigma_rel(sched, 30.0) == pytest.approx(0.08, rel=1e-12)


def test_cross_is_safe_for_large_gammas_and_long_runs():
    # 1e7 steps, gammas up to 1e4: against the direct sum of masses F(b) - F(a), formed in log space.
    out = 1e7
    sched = Constant(0.9995)
    in_steps = np.array([1e7, 1e7, 9.99e6, 5e6, 1e7])
    in_gammas = np.array([1e4, 500.0, 1e4, 2.0, 0.0])
    got = sched.cross(out, in_steps, in_gammas)
    n = 200_000  # the weight left beyond this many updates is 0.9995**2e5 ~ 1e-44
    # The naive F(b) - F(a), in extended precision (eps 1e-19 on x86: the cancellation costs at most
    # 1e7 / (gamma + 1) of it).
    t = np.arange(out - n + 1, out + 1, dtype=np.longdouble)
    d = np.longdouble(0.0005) * np.longdouble(0.9995) ** (np.longdouble(out) - t)
    steps_k, g1 = in_steps.astype(np.longdouble), in_gammas.astype(np.longdouble) + 1
    F = lambda x: (np.minimum(x[:, None], steps_k) / steps_k) ** g1  # noqa: E731
    expected = (d @ (F(t) - F(t - 1))).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got[3] == 0.0  # the snapshot at 5e6 ends where this EMA's weights are 0 in float64
    assert np.all(np.isfinite(got)) and np.all(got[[0, 1, 2, 4]] > 0)


def test_equivalent_sigma_rel_of_a_constant_decay_depends_on_the_run_length():
    short, long = (equivalent_sigma_rel(Constant(0.9999), s) for s in (100_000, 10_000_000))
    assert long < short / 50
    # A geometric profile of time constant 1 / (1 - beta) has about that std.
    assert long == pytest.approx(1 / (1 - 0.9999) / 1e7, rel=1e-3)


# -- live: the same updates as each library, in float32 --------------------------------------------


def trajectory(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Float32 weights that random-walk around 1 (so relative differences mean something)."""
    generator = torch.Generator().manual_seed(seed)
    state = {"weight": torch.ones(4, 6), "bias": torch.ones(4)}
    out = [{k: v.clone() for k, v in state.items()}]
    for _ in range(steps):
        for v in state.values():
            v.add_(torch.randn(v.shape, generator=generator), alpha=0.05)
        out.append({k: v.clone() for k, v in state.items()})
    return out


def reference_ema(schedule: Schedule, states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """A tracker's float32 loop: a copy at step 0, then ``lerp_(weights, 1 - beta)`` at steps 1, 2, ..."""
    ema = {k: v.clone() for k, v in states[0].items()}
    out = []
    for step in range(1, len(states)):
        beta = float(schedule.beta(step, step - 1))
        for k, v in ema.items():
            v.lerp_(states[step][k], 1.0 - beta)
        out.append({k: v.clone() for k, v in ema.items()})
    return out


def assert_same(ours: list[dict[str, torch.Tensor]], theirs: list[dict[str, torch.Tensor]]) -> None:
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for k in a:
            rel = float((a[k] - b[k]).abs().max() / b[k].abs().max())
            assert rel < 1e-5, (step, k, rel)


def linear(state: dict[str, torch.Tensor]) -> torch.nn.Linear:
    model = torch.nn.Linear(6, 4)
    with torch.no_grad():
        model.weight.copy_(state["weight"])
        model.bias.copy_(state["bias"])
    return model


def load(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


#: Warm-up settings checked against ema-pytorch (also by tests/test_tracker_schedules.py).
WARMUP_SETTINGS = [
    {},
    {"inv_gamma": 2.0, "power": 0.75, "min_beta": 0.3, "max_beta": 0.99, "update_after_step": 5},
    {"power": 1.0, "max_beta": 0.995, "update_after_step": 20},
]
WARMUP_IDS = ["defaults", "clamped", "late start"]


def ema_pytorch_ema(schedule: Warmup, states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """ema-pytorch's own ``EMA`` with ``schedule``'s settings, after each state but the first."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = linear(states[0])
    theirs_ema = ema_pytorch.EMA(
        model,
        beta=schedule.max_beta,
        min_value=schedule.min_beta,
        inv_gamma=schedule.inv_gamma,
        power=schedule.power,
        update_after_step=int(schedule.update_after_step),
        update_every=1,
    )
    theirs = []
    for state in states[1:]:
        load(model, state)
        theirs_ema.update()
        theirs.append(params(theirs_ema.ema_model))
    return theirs


@pytest.mark.parametrize("settings_", WARMUP_SETTINGS, ids=WARMUP_IDS)
def test_warmup_equals_ema_pytorch(settings_):
    sched = Warmup(**settings_)
    states = trajectory(300)
    assert_same(reference_ema(sched, states), ema_pytorch_ema(sched, states))


def averaged_model_ema(beta: float, states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """torch's ``AveragedModel`` with ``get_ema_multi_avg_fn(beta)``, after each state but the first."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = linear(states[0])
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(beta))
    theirs = []
    for state in states[1:]:
        load(model, state)
        averaged.update_parameters(model)
        theirs.append({k.removeprefix("module."): v for k, v in params(averaged).items()})
    return theirs


def timm_v2_ema(decay: float, states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """timm's ``ModelEmaV2`` update, restated from timm/utils/model_ema.py (huggingface/pytorch-image-models):
    a deepcopy at construction, then ``decay * e + (1 - decay) * m`` on every state_dict entry at each update."""
    ema = {k: v.clone() for k, v in states[0].items()}
    theirs = []
    for state in states[1:]:
        for k, e in ema.items():
            e.copy_(decay * e + (1.0 - decay) * state[k])
        theirs.append({k: v.clone() for k, v in ema.items()})
    return theirs


def composer_ema(
    half_life: float, interval: int, ema_start: int, states: list[dict[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """Composer's EMA, restated from composer/algorithms/ema/ema.py (mosaicml/composer).

    smoothing = 2 ** (-interval / half_life); at the first batch end with batch >= ema_start the EMA
    becomes a deepcopy of the model, and at every batch end with batch % interval == 0 it is updated
    (the batch count is already incremented at BATCH_END, so the first batch end sees batch 1).
    """
    smoothing = 2 ** (-interval / half_life)
    ema: dict[str, torch.Tensor] | None = None
    theirs = []
    for batch, state in enumerate(states[1:], start=1):
        if ema is None and batch >= ema_start:
            ema = {k: v.clone() for k, v in state.items()}
        if ema is not None and batch % interval == 0:
            for k, e in ema.items():
                e.copy_(e * smoothing + (1.0 - smoothing) * state[k])
        theirs.append({k: v.clone() for k, v in (ema or state).items()})
    return theirs


def test_constant_equals_torch_averaged_model_from_its_second_update():
    states = trajectory(200)
    theirs = averaged_model_ema(0.97, states)
    # AveragedModel copies at its first update_parameters: start=1.
    assert_same(reference_ema(Constant(0.97, start=1), states), theirs)
    # Constant(beta) keeps the copy made at step 0 instead, so the two differ.
    with pytest.raises(AssertionError):
        assert_same(reference_ema(Constant(0.97), states), theirs)


def test_constant_equals_timm_model_ema_v2():
    states = trajectory(300)
    assert_same(reference_ema(Constant(0.98), states), timm_v2_ema(0.98, states))


@pytest.mark.parametrize(("half_life", "interval", "ema_start"), [(20, 1, 0), (30, 4, 0), (25, 3, 10)])
def test_half_life_equals_composer(half_life, interval, ema_start):
    states = trajectory(200)
    ours = reference_ema(HalfLife(half_life, update_interval=interval, start=max(ema_start, 1)), states)
    assert_same(ours, composer_ema(half_life, interval, ema_start, states))


def super_gradients_ema(states, decay_function):
    # src/super_gradients/training/utils/ema.py (Deci-AI/super-gradients), ModelEMA: a deepcopy at
    # construction; update(model, step, total_steps) with the trainer's 1-based global_step
    # (sg_trainer.py: local_step = batch_idx + 1) applies ``e * decay + (1 - decay) * m``.
    ema = {k: v.clone() for k, v in states[0].items()}
    theirs = []
    total_steps = len(states) - 1
    for step, state in enumerate(states[1:], start=1):
        decay = decay_function(step, total_steps)
        for k, e in ema.items():
            e.copy_(e * decay + (1.0 - decay) * state[k])
        theirs.append({k: v.clone() for k, v in ema.items()})
    return theirs


def test_threshold_equals_super_gradients():
    # ema_decay_schedules.py, ThresholdDecay: min(decay, (1 + step) / (10 + step)).
    states = trajectory(200)
    theirs = super_gradients_ema(states, lambda step, total: min(0.99, (1 + step) / (10 + step)))
    assert_same(reference_ema(Threshold(0.99), states), theirs)


def test_exp_warmup_equals_super_gradients():
    # ema_decay_schedules.py, ExpDecay(beta): decay * (1 - exp(-(step / total_steps) * beta)).
    states = trajectory(200)
    theirs = super_gradients_ema(states, lambda step, total: 0.995 * (1 - math.exp(-(step / total) * 15)))
    assert_same(reference_ema(ExpWarmup(0.995, rate=15, total_steps=200), states), theirs)


# -- conversions --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta", "step"), [(0.999, 10_000), (0.9999, 100_000), (0.99, 1_000), (0.9995, 20_000)])
def test_constant_from_sigma_rel_round_trips(beta, step):
    sigma_rel = equivalent_sigma_rel(Constant(beta), step)
    back = Constant.from_sigma_rel(sigma_rel, step)
    assert back.decay == pytest.approx(beta, abs=1e-10)
    assert equivalent_sigma_rel(back, step) == pytest.approx(sigma_rel, rel=1e-8)


@pytest.mark.parametrize(("half_life", "step"), [(700.0, 10_000), (50.0, 5_000)])
def test_half_life_from_sigma_rel_round_trips(half_life, step):
    sigma_rel = equivalent_sigma_rel(HalfLife(half_life), step)
    back = HalfLife.from_sigma_rel(sigma_rel, step)
    assert back.half_life == pytest.approx(half_life, rel=1e-8)


def test_sigma_rel_to_constant_and_back():
    for sigma_rel in (0.01, 0.05, 0.15):
        sched = Constant.from_sigma_rel(sigma_rel, 20_000)
        assert equivalent_sigma_rel(sched, 20_000) == pytest.approx(sigma_rel, rel=1e-8)


def test_a_decay_whose_initial_copy_dominates_has_no_equivalent_sigma_rel():
    with pytest.raises(ValueError, match=r"wider \(std/step=0\.\d+\) than any power-function EMA"):
        equivalent_sigma_rel(Constant(0.99995), 10_000)
    # Narrower than a single step: the copy of the last update alone is uniform on (9, 10].
    with pytest.raises(ValueError, match=r"no Constant schedule has sigma_rel=0\.01 at step=10\.0: the reachable"):
        Constant.from_sigma_rel(0.01, 10)
    with pytest.raises(ValueError, match=r"sigma_rel=0\.3 is outside \(0, 0\.288675"):
        HalfLife.from_sigma_rel(0.3, 10_000)


# -- docs table --------------------------------------------------------------------------------------

TABLE_DECAYS = (0.999, 0.9995, 0.9999, 0.99995)
TABLE_STEPS = (10_000, 100_000, 1_000_000)


def decay_table() -> str:
    """The docs table of :func:`equivalent_sigma_rel` for common decays and run lengths."""
    lines = [
        "| decay | " + " | ".join(f"{s:,} steps" for s in TABLE_STEPS) + " |",
        "|---|" + "---|" * len(TABLE_STEPS),
    ]
    for beta in TABLE_DECAYS:
        cells = []
        for step in TABLE_STEPS:
            try:
                cells.append(f"{equivalent_sigma_rel(Constant(beta), step):.4f}")
            except ValueError:
                cells.append("wider than any")
        lines.append(f"| {beta} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_docs_table_of_classic_decays_matches_the_code():
    text = (Path(__file__).parent.parent / "docs" / "concepts.md").read_text()
    assert decay_table() in text, "regenerate the table in docs/concepts.md with tests/test_schedules.py:decay_table"


# -- conversions of arguments, errors, layering ---------------------------------------------------------


def test_as_schedule():
    assert as_schedule(0.1) == PowerFunction(sigma_rel=0.1)
    assert as_schedule(np.float32(0.05)).sigma_rel == pytest.approx(0.05, rel=1e-7)
    c = Constant(0.9)
    assert as_schedule(c) is c
    with pytest.raises(TypeError, match=r"'0\.1' is neither a sigma_rel nor a schedule"):
        as_schedule("0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="neither"):
        as_schedule(True)


BAD = [
    (lambda: Constant(1.0), r"beta=1\.0 is outside \[0, 1\)"),
    (lambda: Constant(0.9, start=-1), r"start=-1\.0 must be a step >= 0"),
    (lambda: HalfLife(0), r"half_life=0\.0 must be a positive number"),
    (lambda: HalfLife(5, update_interval=-1), r"update_interval=-1\.0 must be a positive number"),
    (lambda: Warmup(min_beta=0.5, max_beta=0.4), r"min_beta=0\.5 is outside \[0, max_beta=0\.4\]"),
    (lambda: Warmup(power=0), r"power=0 must be a positive number"),
    (lambda: Threshold(-0.1), r"beta=-0\.1 is outside \[0, 1\)"),
    (lambda: ExpWarmup(0.9, rate=1, total_steps=0), r"total_steps=0\.0 must be a positive number"),
    (lambda: PowerFunction(), r"exactly one of sigma_rel and gamma"),
    (lambda: PowerFunction(sigma_rel=0.1, gamma=1.0), r"exactly one of sigma_rel and gamma"),
    (lambda: PowerFunction(sigma_rel=0.5), r"sigma_rel=0\.5 is outside"),
    (lambda: Constant(0.9).beta(3, 3), r"step=3\.0 with prev_step=3\.0: an update needs 0 <= prev_step < step"),
    (lambda: Constant(0.9).weights([1, 3, 2], 3), r"update_steps must increase strictly, but 2\.0 follows 3\.0"),
    (lambda: Constant(0.9).weights([0, 1], 3), r"update_steps holds 0\.0; every update step must be a positive"),
    (lambda: Constant(0.9).weights([1, 2], -1), r"out_step=-1 is not a positive step"),
]


@pytest.mark.parametrize(("call", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_arguments_name_the_value_and_the_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_reprs_use_the_constructor_names():
    assert repr(Constant(0.9, start=3)) == "Constant(beta=0.9, start=3)"
    assert repr(Threshold(0.99)) == "Threshold(beta=0.99)"
    assert re.fullmatch(r"ExpWarmup\(beta=0\.9, rate=15\.0, total_steps=100\)", repr(ExpWarmup(0.9, 15, 100)))
    assert Constant(0.9) == Constant(0.9) and hash(Constant(0.9)) == hash(Constant(0.9))


def test_exported_as_a_module():
    import posthoc_ema

    assert posthoc_ema.schedules is schedules
    assert "schedules" in posthoc_ema.__all__


def test_schedules_does_not_import_torch():
    # posthoc_ema/__init__ imports torch: stand in an empty package so only our two modules load.
    package = Path(schedules.__file__).parent
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('posthoc_ema')\n"
        f"pkg.__path__ = [{str(package)!r}]\n"
        "sys.modules['posthoc_ema'] = pkg\n"
        "from posthoc_ema import schedules\n"
        "assert abs(schedules.equivalent_sigma_rel(schedules.Constant(0.99), 1000) - 0.1) < 0.02\n"
        "assert 'torch' not in sys.modules, 'posthoc_ema.schedules imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_profiles_functions_are_the_ones_schedules_use():
    # PowerFunction's decay is profiles.power_beta (EDM2 eq. 127), not a second definition.
    t = np.array([5.0, 9.0])
    np.testing.assert_array_equal(PowerFunction(gamma=3.0).beta(t, t - 2), profiles.power_beta(3.0, t, t - 2))


# -- synthesis of a classic EMA from power-function snapshots -------------------------------------------

RUN_STEPS, RUN_DIMS, RUN_EVERY, RUN_SIGMA_RELS = 2000, 1000, 100, (0.05, 0.10)
REPRESENTABLE = {
    "constant": Constant(0.99),
    "constant from step 1000": Constant(0.99, start=1000),
    "half-life": HalfLife(150.0),
    "warm-up": Warmup(power=0.75, max_beta=0.999),
    "threshold": Threshold(0.995),
    "exp warm-up": ExpWarmup(0.995, rate=15.0, total_steps=RUN_STEPS),
}


def make_power_function_run():
    """A float64 random walk (steps of 0.05 sigma from 1, like tests/helpers.random_walk_run) and its
    power-function snapshots every RUN_EVERY steps, tracked as the tracker does (EDM2 eq. 127)."""
    rng = np.random.default_rng(0)
    theta = np.ones((RUN_STEPS + 1, RUN_DIMS))
    theta[1:] += np.cumsum(rng.standard_normal((RUN_STEPS, RUN_DIMS)) * 0.05, axis=0)
    gammas = profiles.sigma_rel_to_gamma(np.array(RUN_SIGMA_RELS))
    ema = np.repeat(theta[:1], gammas.size, axis=0)
    snapshots, steps, snapshot_gammas = [], [], []
    for t in range(1, RUN_STEPS + 1):
        beta = (1 - 1 / t) ** (gammas + 1)
        ema = beta[:, None] * ema + (1 - beta[:, None]) * theta[t]
        if t % RUN_EVERY == 0:
            snapshots.extend(ema.copy())
            steps.extend([float(t)] * gammas.size)
            snapshot_gammas.extend(gammas)
    return theta, np.array(snapshots), np.array(steps), np.array(snapshot_gammas)


@pytest.fixture(scope="module")
def power_function_run():
    return make_power_function_run()


def synthesize_schedule(schedule: Schedule, run) -> dict[str, float]:
    """Solve for ``schedule`` at the run's end with target_products and profiles' dense machinery,
    and measure the result against the same EMA tracked directly on the trajectory."""
    theta, snapshots, steps, gammas = run
    out = float(RUN_STEPS)
    gram = profiles._gram(steps, gammas)
    cross, norm_sq = schedules.target_products(schedule, out, steps, gammas)
    coef = profiles._lstsq(gram, cross[:, None])[:, 0]
    coef /= coef.sum()  # as solve_coefficients: a constant trajectory is reproduced exactly
    predicted = math.sqrt(max(coef @ gram @ coef - 2 * coef @ cross + norm_sq, 0.0) / norm_sq)
    # The target tracked directly, in float64.
    direct = theta[0].copy()
    for t in range(1, RUN_STEPS + 1):
        beta = float(schedule.beta(t, t - 1))
        direct = beta * direct + (1 - beta) * theta[t]
    synthesized = coef @ snapshots
    # Weights on theta_1..theta_N: the snapshots' are their profiles' masses per step (eq. 127);
    # the target's come from its own recursion (the initial copy counted on the first step).
    grid = np.arange(1.0, out + 1)
    g1 = gammas[:, None] + 1
    masses = (np.minimum(grid, steps[:, None]) / steps[:, None]) ** g1
    masses -= (np.minimum(grid - 1, steps[:, None]) / steps[:, None]) ** g1
    target = brute_force_weights(schedule, grid, out)
    target[1] += target[0]
    error = coef @ masses - target[1:]
    realized = math.sqrt(np.sum(error**2) / norm_sq)  # the same L2 measure, on unit steps
    # Under a random walk of step sigma, E|synthesized - direct|^2 = dims sigma^2 sum_j (sum_{i>=j} error_i)^2.
    tails = np.cumsum(error[::-1])[::-1]
    expected = math.sqrt(RUN_DIMS * 0.05**2 * np.sum(tails**2))
    return {
        "predicted": predicted,
        "realized": realized,
        "within_steps": math.sqrt(max(coef @ gram @ coef - np.sum((coef @ masses) ** 2), 0.0) / norm_sq),
        "distance": float(np.linalg.norm(synthesized - direct)),
        "expected_distance": expected,
        "scale": float(np.linalg.norm(direct - theta[0])),
    }


@pytest.mark.parametrize("name", list(REPRESENTABLE))
def test_synthesized_classic_ema_matches_the_directly_tracked_one(name, power_function_run):
    r = synthesize_schedule(REPRESENTABLE[name], power_function_run)
    # The predicted error is the L2 distance from the continuous snapshot profiles; the realized one
    # measures the same coefficients on the unit steps where weights live. Histograms are an orthogonal
    # projection, so predicted**2 = realized**2 + (what the snapshots vary within single steps)**2.
    assert r["predicted"] ** 2 == pytest.approx(r["realized"] ** 2 + r["within_steps"] ** 2, rel=1e-6, abs=1e-14)
    assert r["realized"] <= r["predicted"] < 1e-2
    # The synthesized EMA is where those weights put it: the distance to the directly tracked EMA is
    # what the weight errors imply for this random walk (1000 dimensions: within a few percent).
    assert r["distance"] == pytest.approx(r["expected_distance"], rel=0.15)
    assert r["distance"] < 1e-2 * r["scale"]


def test_a_classic_ema_dominated_by_its_initial_copy_is_reported_as_unrepresentable(power_function_run):
    # 0.999**2000 = 13.5% of this EMA is the copy made at step 0; snapshot profiles vanish there.
    r = synthesize_schedule(Constant(0.999), power_function_run)
    assert r["predicted"] > 0.5
    assert r["distance"] > 10 * synthesize_schedule(Constant(0.99), power_function_run)["distance"]


def test_target_products_of_a_power_function_are_eq_151():
    cross, norm_sq = schedules.target_products(0.1, 500.0, [500.0, 300.0], [6.937203937601806, 2.0])
    gamma = float(profiles.sigma_rel_to_gamma(0.1))
    np.testing.assert_allclose(cross, profiles.profile_inner_product([500.0, 300.0], [gamma, 2.0], 500.0, gamma))
    assert norm_sq == pytest.approx(float(profiles.profile_inner_product(500.0, gamma, 500.0, gamma)), rel=1e-15)
