"""EMAs from plain checkpoints: the weights against quadrature, convergence on known trajectories, the reading rules."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_schedules import composer_ema, timm_v2_ema

import posthoc_ema
from posthoc_ema import SnapshotError, UnresolvedProfileWarning, schedules, sigma_rel_to_gamma
from posthoc_ema.checkpoints import (
    checkpoint_weights,
    find_checkpoints,
    plan_checkpoints,
    schedule_checkpoint_weights,
)
from posthoc_ema.schedules import Constant, HalfLife, PowerFunction, Schedule, equivalent_sigma_rel, parse_schedule

INTERPOLATIONS = ("piecewise-constant", "trapezoidal")


def _hat(steps: list[float], k: int, t: float) -> float:
    """The interpolation's basis function of sample k at time t (constant before the first sample)."""
    if k == 0 and t <= steps[0]:
        return 1.0
    if k > 0 and steps[k - 1] <= t <= steps[k]:
        return (t - steps[k - 1]) / (steps[k] - steps[k - 1])
    if k < len(steps) - 1 and steps[k] <= t <= steps[k + 1]:
        return (steps[k + 1] - t) / (steps[k + 1] - steps[k])
    return 0.0


def _box(steps: list[float], k: int, t: float) -> float:
    lo = steps[k - 1] if k else 0.0
    return 1.0 if lo < t <= steps[k] else 0.0


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("sigma_rel", [0.03, 0.1, 0.25])
def test_weights_are_the_profile_integrated_against_the_interpolation(interpolation: str, sigma_rel: float) -> None:
    steps = [0.0, 3.0, 5.0, 11.0, 12.0, 20.0]
    out = 20.0
    gamma = float(sigma_rel_to_gamma(sigma_rel))
    basis = _hat if interpolation == "trapezoidal" else _box

    def density(t: float) -> float:  # EDM2 eq. 121
        return (gamma + 1) * t**gamma / out ** (gamma + 1)

    expected = [
        scipy.integrate.quad(lambda t, k=k: density(t) * basis(steps, k, t), 0, out, points=steps, epsabs=1e-15)[0]
        for k in range(len(steps))
    ]
    w = checkpoint_weights(steps, gamma, out, interpolation=interpolation)  # type: ignore[arg-type]
    np.testing.assert_allclose(w[:, 0], expected, rtol=1e-9, atol=1e-14)


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 1000), min_size=1, max_size=30),
    start=st.integers(0, 50),
    sigma_rels=st.lists(st.floats(0.01, 0.28), min_size=1, max_size=3),
    interpolation=st.sampled_from(INTERPOLATIONS),
)
def test_weights_sum_to_one_and_are_non_negative(
    gaps: list[int], start: int, sigma_rels: list[float], interpolation: str
) -> None:
    steps = np.cumsum([start, *gaps]).astype(float)
    w = checkpoint_weights(steps, sigma_rel_to_gamma(sigma_rels), steps[-1], interpolation=interpolation)  # type: ignore[arg-type]
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-12)
    assert np.all(w >= -1e-15)


def test_weights_reject_bad_steps() -> None:
    with pytest.raises(ValueError, match="steps must increase"):
        checkpoint_weights([2, 1], 1.0, 2)
    with pytest.raises(ValueError, match="interpolation='linear' is not one of"):
        checkpoint_weights([1, 2], 1.0, 2, interpolation="linear")  # type: ignore[arg-type]


# -- known trajectories -------------------------------------------------------

T_END = 1000
FREQUENCIES = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)


def _theta(t: float) -> dict[str, torch.Tensor]:
    """A smooth trajectory: sines of several frequencies, plus a polynomial, and an integer counter."""
    u = t / T_END
    return {
        "w": torch.sin(FREQUENCIES * 2 * u + 0.3),
        "b": torch.tensor([1.0 + 2.0 * u - 3.0 * u**3], dtype=torch.float64),
        "count": torch.tensor(int(t)),
    }


def _exact(sigma_rel: float) -> dict[str, np.ndarray]:
    gamma = float(sigma_rel_to_gamma(sigma_rel))

    def density(t: float) -> float:
        return (gamma + 1) * t**gamma / T_END ** (gamma + 1)

    w = [
        scipy.integrate.quad(lambda t, f=f: density(t) * np.sin(f * 2 * t / T_END + 0.3), 0, T_END, epsabs=1e-15)[0]
        for f in FREQUENCIES.tolist()
    ]
    # int u**j f = (gamma + 1) / (gamma + 1 + j) for u = t / T.
    b = 1.0 + 2.0 * (gamma + 1) / (gamma + 2) - 3.0 * (gamma + 1) / (gamma + 4)
    return {"w": np.array(w), "b": np.array([b])}


def _write_run(folder: Path, n: int, *, at_zero: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    steps = np.linspace(0 if at_zero else T_END / n, T_END, n + 1 if at_zero else n)
    for s in steps:
        step = round(float(s))
        save_file(_theta(step), str(folder / f"model-{step:06d}.safetensors"), metadata={"step": str(step)})
    return folder


def _max_error(sd: dict[str, torch.Tensor], exact: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(sd[k].numpy() - v))) for k, v in exact.items())


def convergence_table(tmp: Path, sigma_rel: float) -> list[tuple[int, float, float]]:
    """(checkpoint spacing, max error piecewise-constant, max error trapezoidal) for denser and denser runs."""
    exact = _exact(sigma_rel)
    rows = []
    for n in (10, 20, 40, 80, 160):
        run = _write_run(tmp / f"n{n}", n)
        errors = []
        for interpolation in INTERPOLATIONS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnresolvedProfileWarning)  # the coarsest runs are sparse on purpose
                sds = posthoc_ema.from_checkpoints(run, [sigma_rel], interpolation=interpolation, dtype=torch.float64)
            errors.append(_max_error(sds[sigma_rel], exact))
        rows.append((T_END // n, *errors))
    return rows


@pytest.mark.parametrize("sigma_rel", [0.05, 0.15])
def test_converges_to_the_exact_ema_as_checkpoints_get_denser(tmp_path: Path, sigma_rel: float) -> None:
    rows = convergence_table(tmp_path, sigma_rel)
    constant = np.array([r[1] for r in rows])
    trapezoid = np.array([r[2] for r in rows])
    assert np.all(np.diff(constant) < 0) and np.all(np.diff(trapezoid) < 0)
    # First order for piecewise constant, second order for the trapezoid, once the spacing resolves the profile.
    np.testing.assert_allclose(constant[-1] / constant[-2], 0.5, atol=0.05)
    np.testing.assert_allclose(trapezoid[-1] / trapezoid[-2], 0.25, atol=0.03)
    assert trapezoid[-1] < constant[-1] / 100


def test_trapezoidal_is_exact_for_a_linear_trajectory(tmp_path: Path) -> None:
    steps = [0, 7, 30, 31, 90, 200]
    for s in steps:
        save_file(
            {"x": torch.tensor([2.0, -1.0], dtype=torch.float64) * s / 200 + 0.5},
            str(tmp_path / f"{s}.safetensors"),
            metadata={"step": str(s)},
        )
    gamma = float(sigma_rel_to_gamma(0.1))
    with pytest.warns(UnresolvedProfileWarning):  # six samples are sparse, but a linear trajectory needs only two
        sd = posthoc_ema.from_checkpoints(tmp_path, 0.1, interpolation="trapezoidal", dtype=torch.float64)[0.1]
    mean_u = (gamma + 1) / (gamma + 2)  # the profile's mean time, in units of the last step
    np.testing.assert_allclose(sd["x"].numpy(), np.array([2.0, -1.0]) * mean_u + 0.5, rtol=0, atol=1e-13)


def test_integer_tensors_come_from_the_last_checkpoint_and_the_result_loads_strict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    for step in (100, 200, 300):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].num_batches_tracked.fill_(step)
        torch.save({"state_dict": model.state_dict(), "global_step": step}, tmp_path / f"epoch={step}.ckpt")
    with pytest.warns(UnresolvedProfileWarning):
        sds = posthoc_ema.from_checkpoints(tmp_path, [0.2, 0.25], key="state_dict", interpolation="trapezoidal")
    for sd in sds.values():
        assert int(sd["1.num_batches_tracked"]) == 300
        model.load_state_dict(sd, strict=True)
    assert list(sds[0.2]) == list(model.state_dict())


# -- reading checkpoints ----------------------------------------------------------


def test_step_sources_in_order(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a-step=5.safetensors"), metadata={"global_step": "10"})
    torch.save({"x": torch.zeros(1), "step": torch.tensor(20)}, tmp_path / "b-step=6.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "c-step=30.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    found = find_checkpoints(tmp_path, step_pattern=r"step=(\d+)")
    assert [(c.path.name, c.step, c.step_source) for c in found] == [
        ("a-step=5.safetensors", 10, "metadata"),
        ("b-step=6.pt", 20, "entry"),
        ("c-step=30.pt", 30, "file name"),
    ]


def test_hugging_face_layout_through_glob_and_pattern(tmp_path: Path) -> None:
    for step in (10, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file({"x": torch.full((2,), float(step))}, str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    with pytest.warns(UnresolvedProfileWarning):
        sd = posthoc_ema.from_checkpoints(
            tmp_path, 0.25, glob="checkpoint-*/model.safetensors", step_pattern=r"checkpoint-(\d+)/"
        )[0.25]
    gamma = float(sigma_rel_to_gamma(0.25))
    w20 = 1 - 0.5 ** (gamma + 1)
    torch.testing.assert_close(sd["x"], torch.full((2,), 10 * (1 - w20) + 20 * w20), rtol=1e-6, atol=0)


def test_errors_name_the_file(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(1)}, tmp_path / "nostep.pt")
    with pytest.raises(
        SnapshotError,
        match=re.escape(f"{tmp_path / 'nostep.pt'}: no step: no 'step' or 'global_step' entry; give step_pattern="),
    ):
        find_checkpoints(tmp_path)
    with pytest.raises(SnapshotError, match="does not match its name"):
        find_checkpoints(tmp_path, step_pattern=r"step=(\d+)")
    with pytest.raises(ValueError, match="has 0 groups; it needs exactly one"):
        find_checkpoints(tmp_path, step_pattern=r"step=\d+")
    with pytest.raises(SnapshotError, match="no checkpoints"):
        find_checkpoints(tmp_path, glob="*.safetensors")
    with pytest.raises(SnapshotError, match="not a folder"):
        find_checkpoints(tmp_path / "missing")


def test_repeated_step_and_snapshot_files_are_refused(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(1), "step": 5}, tmp_path / "a.pt")
    torch.save({"x": torch.zeros(1), "step": 5}, tmp_path / "b.pt")
    with pytest.raises(SnapshotError, match=r"b\.pt and .*a\.pt are both checkpoints of step 5"):
        find_checkpoints(tmp_path)
    other = tmp_path / "snaps"
    emas = posthoc_ema.PostHocEMA(torch.nn.Linear(1, 1), 0.1, snapshot_dir=other, snapshot_every=1)
    emas.update()
    emas.close()
    with pytest.raises(SnapshotError, match="is a posthoc-ema snapshot, not a plain checkpoint"):
        find_checkpoints(other)


@pytest.mark.filterwarnings("ignore::posthoc_ema.UnresolvedProfileWarning")
def test_key_and_layout_errors(tmp_path: Path) -> None:
    torch.save({"model": {"x": torch.zeros(2)}, "step": 1}, tmp_path / "a.pt")
    torch.save({"model": {"x": torch.zeros(3)}, "step": 2}, tmp_path / "b.pt")
    with pytest.raises(
        SnapshotError,
        match=r"a\.pt: no tensors at the top level \(entries: \['model', 'step'\]\); choose the nested state dict",
    ):
        posthoc_ema.from_checkpoints(tmp_path, 0.28)
    with pytest.raises(SnapshotError, match=r"no entry 'state_dict' \(top-level entries: \['model', 'step'\]\)"):
        posthoc_ema.from_checkpoints(tmp_path, 0.28, key="state_dict")
    with pytest.raises(SnapshotError, match=r"b\.pt: tensor 'x' has shape \(3,\) here, not as in .*a\.pt"):
        posthoc_ema.from_checkpoints(tmp_path, 0.28, key="model")


def test_plan_reports_resolution_and_warns_when_sparse(tmp_path: Path) -> None:
    run = _write_run(tmp_path, 10)
    with pytest.warns(UnresolvedProfileWarning, match=r"1 of 2 targets \(sigma_rel 0\.02\) rest on fewer than 4"):
        p = plan_checkpoints(run, [0.02, 0.2])
    assert p.unresolved.tolist() == [True, False]
    np.testing.assert_allclose(p.interval_mass.sum(axis=0), 1.0)
    np.testing.assert_allclose(p.effective_checkpoints, 1 / np.sum(p.weights**2, axis=0))
    report = p.format_report()
    assert "11 checkpoints up to step 1000, piecewise-constant interpolation" in report
    assert f"(900, 1000] {p.interval_mass[-1, 0]:.1%}" in report
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense = plan_checkpoints(_write_run(tmp_path / "dense", 200), [0.05])
    assert dense.effective_checkpoints[0] > MIN_EFFECTIVE
    with pytest.raises(ValueError, match="step=555 is not a checkpoint step"):
        plan_checkpoints(run, [0.2], step=555)
    with pytest.warns(UnresolvedProfileWarning, match="too sparse near step 500"):
        p500 = plan_checkpoints(run, [0.2], step=500)
    assert p500.step == 500 and p500.checkpoints[-1].step == 500


MIN_EFFECTIVE = posthoc_ema.checkpoints.MIN_EFFECTIVE_CHECKPOINTS


def test_cli_from_checkpoints(tmp_path: Path) -> None:
    from helpers import invoke

    run = _write_run(tmp_path / "run", 40)
    out = tmp_path / "ema.safetensors"
    stdout, _ = invoke("from-checkpoints", run, "--sigma-rel", "0.1", "--interpolation", "trapezoidal", "-o", out)
    assert "41 checkpoints up to step 1000, trapezoidal interpolation" in stdout
    expected = posthoc_ema.from_checkpoints(run, 0.1, interpolation="trapezoidal")[0.1]
    from safetensors.torch import load_file

    got = load_file(str(out))
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_cli_from_checkpoints_output_rules(tmp_path: Path) -> None:
    """As for synthesize: no silent replacement, -o DIR/ is a folder, never into RUN_DIR, no stray folders."""
    from helpers import invoke

    run = _write_run(tmp_path / "run", 10)
    out = tmp_path / "ema.safetensors"
    out.write_bytes(b"keep me")
    _, stderr = invoke("from-checkpoints", run, "-s", "0.1", "-o", out, code=1)
    assert f"{out} exists; pass --force to replace it" in stderr
    assert out.read_bytes() == b"keep me"
    invoke("from-checkpoints", run, "-s", "0.1", "-o", out, "--force")
    assert posthoc_ema.checkpoints.FROM_CHECKPOINTS_FORMAT in out.read_bytes()[:2000].decode("latin-1")
    # -o newdir/ writes a file inside a new folder, named as the default.
    invoke("from-checkpoints", run, "-s", "0.1", "-o", f"{tmp_path / 'newdir'}/")
    assert (tmp_path / "newdir" / "ema-0.1-1000.safetensors").is_file()
    # Never into RUN_DIR (a later run would read the output as a checkpoint).
    _, stderr = invoke("from-checkpoints", run, "-s", "0.1", "-o", f"{run}/", code=1)
    assert f"is in the checkpoint folder {run}; write synthesized files elsewhere" in stderr
    assert not list(run.glob("ema-*"))
    # A failure after the folders were made leaves none behind, and names the file asked for, not a .tmp.
    deep = tmp_path / "a" / "b"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(posthoc_ema.checkpoints, "write_atomic", _failing_write)
        _, stderr = invoke("from-checkpoints", run, "-s", "0.1", "-o", deep / "ema.safetensors", code=1)
    assert not (tmp_path / "a").exists()
    assert ".tmp" not in stderr and str(deep / "ema.safetensors") in stderr


def _failing_write(path: Path, tensors: object, metadata: object) -> None:
    raise OSError(28, "No space left on device", str(path) + ".tmp")


def test_synthesized_files_in_the_run_folder_are_not_checkpoints(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", 40)
    the_plan = plan_checkpoints(run, [0.1])
    sds = posthoc_ema.checkpoints.run_checkpoints(the_plan)
    elsewhere = tmp_path / "ema.safetensors"
    posthoc_ema.checkpoints.save(elsewhere, sds[0.1], the_plan, 0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        posthoc_ema.checkpoints.save(elsewhere, sds[0.1], the_plan, 0)
    posthoc_ema.checkpoints.save(elsewhere, sds[0.1], the_plan, 0, overwrite=True)
    with pytest.raises(ValueError, match="checkpoint folder"):
        posthoc_ema.checkpoints.save(run / "ema.safetensors", sds[0.1], the_plan, 0)
    # An EMA carrying step metadata that landed in the run folder anyway (copied there) is skipped.
    (run / "ema-copy.safetensors").write_bytes(elsewhere.read_bytes())
    assert [c.path for c in find_checkpoints(run)] == [c.path for c in the_plan.checkpoints]


def test_cli_from_checkpoints_device_option(tmp_path: Path) -> None:
    from helpers import invoke

    run = _write_run(tmp_path / "run", 10)
    invoke("from-checkpoints", run, "-s", "0.1", "--device", "cpu", "-o", tmp_path / "ema.safetensors")
    if not torch.cuda.is_available():
        _, stderr = invoke("from-checkpoints", run, "-s", "0.1", "--device", "cuda", "-o", tmp_path / "x", code=1)
        assert "no CUDA device" in stderr


def test_cli_names_a_pickle_weights_only_refuses(tmp_path: Path) -> None:
    from helpers import invoke

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"step": 1, "w": torch.ones(2), "odd": _Unpicklable()}, run / "ckpt.pt")
    _, stderr = invoke("from-checkpoints", run, "-s", "0.1", "-o", tmp_path / "ema.safetensors", code=1)
    assert f"{run / 'ckpt.pt'}: weights_only=True refused" in stderr


class _Unpicklable:
    """A class weights_only=True will not unpickle."""


# -- classic targets --------------------------------------------------------------


def _states(steps: int) -> list[dict[str, torch.Tensor]]:
    """The float tensors of :func:`_theta` at every step 0, 1, ..., steps (float64)."""
    return [{k: v for k, v in _theta(t).items() if v.is_floating_point()} for t in range(steps + 1)]


def _reference(target: Schedule, states: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """The EMA after the last state by the libraries' own float64 recursions (restated in test_schedules)."""
    if isinstance(target, HalfLife):  # Composer: HalfLife(h, start=max(s, 1)) is EMA(half_life=h, ema_start=s)
        last = composer_ema(target.half_life, int(target.update_interval), int(target.start), states)[-1]
    else:
        assert isinstance(target, Constant) and target.start == 0  # timm's ModelEmaV2
        last = timm_v2_ema(target.decay, states)[-1]
    return {k: v.numpy() for k, v in last.items()}


CLASSIC = [Constant(0.99), Constant(0.995), HalfLife(60.0, start=300)]
SPACINGS = (40, 20, 10, 5)


def classic_convergence_table(tmp: Path, target: Schedule) -> list[tuple[int, float, float]]:
    """(checkpoint spacing, max error piecewise-constant, max error trapezoidal) against the exact EMA."""
    exact = _reference(target, _states(T_END))
    rows = []
    for spacing in SPACINGS:
        run = tmp / f"every{spacing}"
        if not run.exists():
            _write_run(run, T_END // spacing)
        errors = []
        for interpolation in INTERPOLATIONS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnresolvedProfileWarning)
                sds = posthoc_ema.from_checkpoints(run, target, interpolation=interpolation, dtype=torch.float64)
            errors.append(_max_error(sds[target], exact))
        rows.append((spacing, *errors))
    return rows


@pytest.fixture(scope="module")
def spaced_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the runs of :func:`classic_convergence_table`, written once for every target."""
    return tmp_path_factory.mktemp("spaced")


@pytest.mark.parametrize("target", CLASSIC, ids=repr)
def test_classic_targets_converge_to_the_libraries_ema(spaced_runs: Path, target: Schedule) -> None:
    rows = classic_convergence_table(spaced_runs, target)
    constant = np.array([r[1] for r in rows])
    trapezoid = np.array([r[2] for r in rows])
    assert np.all(np.diff(constant) < 0) and np.all(np.diff(trapezoid) < 0)
    # First order for piecewise constant, second order for the trapezoid, in the spacing h measured against
    # the exact EMA of the per-step trajectory (h = 1 is exact): errors in proportion to h - 1 and h**2 - 1.
    h, h_before = SPACINGS[-1], SPACINGS[-2]
    np.testing.assert_allclose(constant[-1] / constant[-2], (h - 1) / (h_before - 1), atol=0.01)
    np.testing.assert_allclose(trapezoid[-1] / trapezoid[-2], (h**2 - 1) / (h_before**2 - 1), atol=0.01)
    assert trapezoid[-1] < constant[-1] / 100


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_a_checkpoint_at_every_step_gives_the_exact_ema(tmp_path: Path, interpolation: str) -> None:
    """Every step sampled: no interpolation is left, and each library's recursion comes out to float64 noise."""
    steps = 200
    run = tmp_path / "run"
    run.mkdir()
    for t in range(steps + 1):
        save_file(_theta(t), str(run / f"{t:04d}.safetensors"), metadata={"step": str(t)})
    targets = [Constant(0.97), HalfLife(15.0, start=40), Constant(0.9)]
    sds = posthoc_ema.from_checkpoints(run, targets, interpolation=interpolation, dtype=torch.float64)  # type: ignore[arg-type]
    for target in targets:
        expected = _reference(target, _states(steps))
        assert _max_error(sds[target], expected) < 1e-13


@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 60), min_size=1, max_size=12),
    first=st.integers(0, 30),
    beta=st.floats(0.5, 0.995),
    start=st.integers(0, 100),
    interpolation=st.sampled_from(INTERPOLATIONS),
)
def test_classic_weights_are_the_step_weights_through_the_basis_functions(
    gaps: list[int], first: int, beta: float, start: int, interpolation: str
) -> None:
    """Against a direct sum: every step's exact weight times the basis function of each checkpoint at that step."""
    steps = np.cumsum([first, *gaps]).astype(float)
    out = float(steps[-1])
    target = Constant(beta, start=min(start, int(out)))
    step_weights = target.weights(np.arange(1.0, out + 1), out)  # [initial copy, step 1, ..., step out]
    basis = _hat if interpolation == "trapezoidal" else _box
    expected = [sum(w * basis(list(steps), k, float(t)) for t, w in enumerate(step_weights)) for k in range(steps.size)]
    if interpolation == "piecewise-constant":  # the box of the first checkpoint also holds step 0
        expected[0] += step_weights[0] * (1 - basis(list(steps), 0, 0.0))
    got = schedule_checkpoint_weights(target, steps, out, interpolation=interpolation)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-12)


def test_power_function_weights_agree_with_its_per_step_weights(tmp_path: Path) -> None:
    """The closed form of a power function is its every-step EMA's weights through the boxes (eq. 127 summed)."""
    steps = np.array([0.0, 13.0, 40.0, 41.0, 90.0, 200.0])
    for sigma_rel in (0.05, 0.2):
        per_step = PowerFunction(sigma_rel=sigma_rel).weights(np.arange(1.0, 201.0), 200.0)
        boxed = [sum(per_step[int(lo) + 1 : int(hi) + 1]) for lo, hi in zip([-1.0, *steps[:-1]], steps, strict=True)]
        got = schedule_checkpoint_weights(sigma_rel, steps, 200)
        np.testing.assert_allclose(got, boxed, rtol=1e-12, atol=1e-15)


def test_classic_and_power_targets_mix_in_one_call(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", 100)
    targets: list[float | Schedule] = [0.1, Constant(0.99), HalfLife(50.0), Constant(0.99, start=500)]
    sds = posthoc_ema.from_checkpoints(run, targets, interpolation="trapezoidal", dtype=torch.float64)
    assert list(sds) == [0.1, Constant(0.99), HalfLife(50.0), Constant(0.99, start=500)]
    for target in targets:
        alone = posthoc_ema.from_checkpoints(run, [target], interpolation="trapezoidal", dtype=torch.float64)
        for k, v in alone[target].items():
            torch.testing.assert_close(sds[target][k], v, rtol=0, atol=0)
    assert sds["constant:beta=0.99,start=500"] is sds[Constant(0.99, start=500)]
    assert "count" in sds[HalfLife(50.0)] and int(sds[HalfLife(50.0)]["count"]) == T_END
    with pytest.raises(ValueError, match=r"targets repeats Constant\(beta=0.99, start=0\)"):
        plan_checkpoints(run, [Constant(0.99), Constant(0.99)])
    with pytest.raises(ValueError, match=r"targets repeats sigma_rel=0\.1"):
        plan_checkpoints(run, [0.1, PowerFunction(sigma_rel=0.1)])
    with pytest.raises(ValueError, match="targets is empty; give at least one target sigma_rel or schedule"):
        plan_checkpoints(run, [])


def test_classic_targets_in_the_resolution_report_and_the_file(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", 10)  # every 100 steps
    narrow, wide, held = Constant(0.9), Constant(0.999), Constant(0.9999)
    with pytest.warns(UnresolvedProfileWarning) as caught:
        p = plan_checkpoints(run, [0.2, narrow, wide, held])
    message = str(caught[0].message)
    assert message.startswith("2 of 4 targets (constant:beta=0.9; constant:beta=0.9999) rest on fewer than 4")
    assert "constant:beta=0.9999: 90.5% of its weight is on its starting copy of the weights at step 0" in message
    assert p.unresolved.tolist() == [False, True, False, True]
    np.testing.assert_allclose(p.interval_mass.sum(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p.effective_checkpoints, 1 / np.sum(p.weights**2, axis=0))
    # Constant(0.9): all but 0.9**100 of its weight is on the last interval.
    np.testing.assert_allclose(p.interval_mass[-1, 1], 1 - 0.9**100, rtol=1e-12)
    np.testing.assert_allclose(p.initial_weights, [0.0, 0.9**1000, 0.999**1000, 0.9999**1000], rtol=1e-9, atol=1e-300)
    assert math.isnan(p.gammas[1]) and p.gammas[0] == sigma_rel_to_gamma(0.2)
    # The equivalent width: 0.999 spreads 37% on its start copy over (0, 1], wider than any power function.
    assert math.isnan(p.sigma_rels[2])
    assert "constant:beta=0.999 (no power function is as wide; 36.8% of" in p.format_report()
    np.testing.assert_allclose(p.sigma_rels[1], equivalent_sigma_rel(narrow, 1000), rtol=1e-5)
    report = p.format_report()
    assert "constant:beta=0.9 (~sigma_rel 0.00" in report and "(unresolved: checkpoints too sparse" in report
    held_width = f"~sigma_rel {equivalent_sigma_rel(held, 1000):.4g}"
    assert f"constant:beta=0.9999 ({held_width}; 90.5% of its weight is on its starting copy" in report
    assert "(few: much weight on its starting copy)" in report
    assert f"(900, 1000] {p.interval_mass[-1, 1]:.1%}" in report
    sds = posthoc_ema.checkpoints.run_checkpoints(p)
    out = tmp_path / "ema.safetensors"
    posthoc_ema.checkpoints.save(out, sds[wide], p, 2)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == posthoc_ema.checkpoints.FROM_CHECKPOINTS_FORMAT
    assert meta["schedule"] == "constant:beta=0.999" and meta["schedule_repr"] == repr(wide)
    assert schedules.from_metadata(schedules.to_metadata(wide)) == parse_schedule(meta["schedule"])
    assert meta["update_every"] == "1" and meta["copy_step"] == "0.0" and meta["gamma"] == "nan"
    assert float(meta["initial_weight"]) == pytest.approx(0.999**1000)
    assert meta["sigma_rel"] == "nan" and meta["interpolation"] == "piecewise-constant"
    posthoc_ema.checkpoints.save(tmp_path / "power.safetensors", sds[0.2], p, 0)
    with safe_open(str(tmp_path / "power.safetensors"), framework="pt") as f:
        assert "schedule" not in f.metadata() and f.metadata()["sigma_rel"] == "0.2"


# -- synthesize --from-checkpoints ------------------------------------------------


def _usage_error(stderr: str) -> str:
    return " ".join(stderr.replace("│", " ").split())


def test_cli_synthesize_from_checkpoints_is_the_from_checkpoints_command(tmp_path: Path) -> None:
    """The issue's spelling writes what from-checkpoints writes, and prints the same report."""
    from helpers import invoke

    run = _write_run(tmp_path / "run", 40)
    one, two = tmp_path / "ema.safetensors", tmp_path / "ema2.safetensors"
    options = ["--sigma-rel", "0.10", "--interpolation", "trapezoidal"]
    stdout, _ = invoke("synthesize", "--from-checkpoints", run, *options, "-o", one)
    stdout_alias, _ = invoke("from-checkpoints", run, *options, "-o", two)
    assert stdout.replace(str(one), "OUT") == stdout_alias.replace(str(two), "OUT")
    assert "41 checkpoints up to step 1000, trapezoidal interpolation" in stdout
    with safe_open(str(one), framework="pt") as f, safe_open(str(two), framework="pt") as g:
        assert f.metadata() == g.metadata()
        assert f.metadata()["format"] == posthoc_ema.checkpoints.FROM_CHECKPOINTS_FORMAT
        expected = posthoc_ema.from_checkpoints(run, 0.1, interpolation="trapezoidal")[0.1]
        for k in expected:
            torch.testing.assert_close(f.get_tensor(k), expected[k], rtol=0, atol=0)
            torch.testing.assert_close(g.get_tensor(k), expected[k], rtol=0, atol=0)


def test_cli_classic_targets_from_checkpoints(tmp_path: Path) -> None:
    from helpers import invoke

    run = tmp_path / "run"
    run.mkdir()
    for step in range(0, 1001, 50):  # a Lightning-style run: torch.save dicts, the step in the file name
        torch.save({"state_dict": _theta(step)}, run / f"epoch=0-step={step}.ckpt")
    out = tmp_path / "emas"
    args = ["--beta", "0.99", "--half-life", "80", "--ema-start", "0,300", "--schedule", "warmup:power=0.75"]
    stdout, _ = invoke(
        "synthesize", "--from-checkpoints", run, "-s", "0.1", *args, "--key", "state_dict",
        "--step-pattern", r"step=(\d+)", "--glob", "*.ckpt", "-o", f"{out}/",
    )  # fmt: skip
    targets: list[float | Schedule] = [
        0.1, Constant(0.99), Constant(0.99, start=300), HalfLife(80.0), HalfLife(80.0, start=300),
        parse_schedule("warmup:power=0.75"),
    ]  # fmt: skip
    expected = posthoc_ema.from_checkpoints(run, targets, key="state_dict", step_pattern=r"step=(\d+)", glob="*.ckpt")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "ema-0.1-1000.safetensors",
            "ema-constant-beta=0.99-1000.safetensors",
            "ema-constant-beta=0.99_start=300-1000.safetensors",
            "ema-half-life-half_life=80-1000.safetensors",
            "ema-half-life-half_life=80_start=300-1000.safetensors",
            "ema-warmup-power=0.75-1000.safetensors",
        ]
    )
    assert "constant:beta=0.99,start=300 (~sigma_rel" in stdout
    for target in targets:
        label = posthoc_ema.synthesis.target_label(target)
        name = (
            "ema-0.1-1000.safetensors"
            if label == "0.1"
            else f"ema-{label.replace(':', '-').replace(',', '_')}-1000.safetensors"
        )
        with safe_open(str(out / name), framework="pt") as f:
            meta = f.metadata()
            for k, v in expected[target].items():
                torch.testing.assert_close(f.get_tensor(k), v, rtol=0, atol=0)
        assert meta.get("schedule", "power") == ("power" if label == "0.1" else label)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-s", "0.1"], "Missing argument 'CKPT_DIR': give a folder of snapshots, or --from-checkpoints RUN_DIR"),
        (["RUN", "--from-checkpoints", "RUN", "-s", "0.1"], "give CKPT_DIR (a snapshot folder) or --from-checkpoints"),
        (["RUN", "-s", "0.1", "--key", "model"], "--key applies to --from-checkpoints RUN_DIR, not to a snapshot"),
        (["RUN", "-s", "0.1", "--interpolation", "trapezoidal"], "--interpolation applies to --from-checkpoints"),
        (["--from-checkpoints", "RUN", "-s", "0.1", "--prefix", "g"], "--prefix applies to snapshot folders, not to"),
        (["--from-checkpoints", "RUN", "-s", "0.1", "--max-shard-size", "1GB"], "--max-shard-size applies to"),
        (["--from-checkpoints", "RUN"], "Missing option '--sigma-rel' / '-s': give at least one target"),
        (
            ["--from-checkpoints", "RUN", "-s", "0.1", "--interpolation", "linear"],
            "Invalid value for '--interpolation'",
        ),
    ],
)
def test_cli_synthesize_input_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    from helpers import invoke

    run = _write_run(tmp_path / "run", 10)
    out = tmp_path / "out"
    _, stderr = invoke("synthesize", *(str(run) if a == "RUN" else a for a in args), "-o", f"{out}/", code=2)
    assert message in _usage_error(stderr)
    assert not out.exists()


def test_cli_synthesize_from_checkpoints_dry_run_and_errors(tmp_path: Path) -> None:
    from helpers import invoke

    run = _write_run(tmp_path / "run", 10)
    out = tmp_path / "out"
    stdout, stderr = invoke(
        "synthesize", "--from-checkpoints", run, "-s", "0.2", "--beta", "0.99", "--dry-run", "-o", out
    )
    assert "weights (a column per target, summing to 1; a row per checkpoint):" in stdout
    with pytest.warns(UnresolvedProfileWarning):
        the_plan = plan_checkpoints(run, [0.2, Constant(0.99)])
    assert f"{the_plan.weights[-1, 1]:.6f}" in stdout.splitlines()[-1] and stdout.splitlines()[-1].startswith("1000")
    assert "warning: 1 of 2 targets (constant:beta=0.99) rest on fewer than 4" in stderr
    assert not out.exists()
    _, stderr = invoke("synthesize", "--from-checkpoints", tmp_path / "missing", "-s", "0.1", code=1)
    assert stderr.strip() == f"error: {tmp_path / 'missing'}: not a folder"
    _, stderr = invoke("synthesize", "--from-checkpoints", run, "-s", "0.1", "-o", f"{run}/", code=1)
    assert f"is in the checkpoint folder {run}; write synthesized files elsewhere" in stderr
