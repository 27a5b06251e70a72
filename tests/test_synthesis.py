"""Synthesis from snapshot folders, checked against EMAs tracked exactly on a known trajectory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import reference_gamma, write_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from posthoc_ema import PostHocEMA, SnapshotError, solve_coefficients
from posthoc_ema._version import __version__
from posthoc_ema.files import write_atomic
from posthoc_ema.snapshots import snapshot_name
from posthoc_ema.synthesis import (
    ERROR_WARNING_THRESHOLD,
    PoorReconstructionWarning,
    plan,
    run,
    save,
    synthesize,
    synthesize_many,
)

TRACKED = (0.05, 0.10)
TARGETS = (0.07, 0.15)  # one between the tracked sigma_rels, one outside
LAST, MID, EVERY = 2000, 1000, 100


# -- an independent reference: EDM2's formulas, written out ------------------------


def ref_p_dot_p(t_a, g_a, t_b, g_b):
    """<f_a, f_b> as the integral over (0, min(t_a, t_b)] of the two power profiles (EDM2 eq. 121).

    (g_a+1)(g_b+1) / (t_a^(g_a+1) t_b^(g_b+1)) * m^(g_a+g_b+1) / (g_a+g_b+1), with m = min(t_a, t_b),
    evaluated in logs so the powers of large steps cannot overflow.
    """
    m = np.minimum(t_a, t_b)
    log = (g_a + g_b + 1) * np.log(m) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * np.exp(log)


def ref_coefficients(steps, sigma_rels, out_step, targets):
    """EDM2 Algorithm 3: lstsq on the Gram matrix of the snapshot profiles, then columns normalised to sum 1."""
    t = np.asarray(steps, dtype=np.float64)[:, None]
    g = np.array([reference_gamma(s) for s in sigma_rels])[:, None]
    g_out = np.array([reference_gamma(s) for s in targets])[None, :]
    gram = ref_p_dot_p(t, g, t.T, g.T)
    cross = ref_p_dot_p(t, g, float(out_step), g_out)
    x = np.linalg.lstsq(gram, cross, rcond=None)[0]
    return x / x.sum(axis=0, keepdims=True)


def ref_error(coef, steps, sigma_rels, out_step, targets):
    """Relative L2 distance between the reconstructed and the target profiles, by the reference formulas."""
    t = np.asarray(steps, dtype=np.float64)[:, None]
    g = np.array([reference_gamma(s) for s in sigma_rels])[:, None]
    g_out = np.array([reference_gamma(s) for s in targets])
    gram = ref_p_dot_p(t, g, t.T, g.T)
    cross = ref_p_dot_p(t, g, float(out_step), g_out[None, :])
    norm2 = ref_p_dot_p(float(out_step), g_out, float(out_step), g_out)
    sq = np.einsum("io,ij,jo->o", coef, gram, coef) - 2 * np.einsum("io,io->o", coef, cross) + norm2
    return np.sqrt(np.maximum(sq, 0) / norm2)


def profile_mass(step, sigma_rel, lo, hi):
    """Mass of the profile of ``sigma_rel`` read at ``step`` over (lo, hi], for hi <= step (EDM2 eq. 121)."""
    g = reference_gamma(sigma_rel) + 1
    return (np.asarray(hi, dtype=np.float64) ** g - np.asarray(lo, dtype=np.float64) ** g) / float(step) ** g


# -- a model driven along a known trajectory ------------------------------------------


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))


def floating_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: t for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}


def residual_trajectory(target: float) -> np.ndarray:
    """Values at steps 1..LAST on which synthesizing ``target`` at LAST errs the most.

    The EMA read at T weights the value of step k by the profile's mass over (k-1, k];
    the synthesized EMA by the combination of the snapshots' masses. Following their
    difference d_k turns Cauchy-Schwarz into an equality: the error is then
    ||r - f|| ||w|| (to the resolution of one step), the bound the other tests use.
    """
    snap_steps = [s for s in range(EVERY, LAST + 1, EVERY) for _ in TRACKED]
    snap_sigmas = [s for _ in range(EVERY, LAST + 1, EVERY) for s in TRACKED]
    coef = ref_coefficients(snap_steps, snap_sigmas, LAST, [target])[:, 0]
    k = np.arange(1, LAST + 1, dtype=np.float64)
    d = -profile_mass(LAST, target, k - 1, k)
    for c, step, sigma in zip(coef, snap_steps, snap_sigmas, strict=True):
        d += c * np.where(k <= step, profile_mass(step, sigma, k - 1, np.minimum(k, step)), 0.0)
    return d / np.abs(d).max()


@dataclass
class Run:
    folder: Path
    trajectory: np.ndarray  # [LAST, n_values], the floating values of the model at steps 1..LAST
    truth: dict[int, dict[float, dict[str, torch.Tensor]]]  # step -> target -> EMA tracked exactly
    adversarial: dict[float, int]  # target -> the value that follows residual_trajectory(target)


@pytest.fixture(scope="module")
def trajectory_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Snapshots of TRACKED every EVERY steps, and TARGETS tracked directly as ground truth."""
    folder = tmp_path_factory.mktemp("run")
    model = make_model()
    entries = floating_entries(model)
    sizes = [t.numel() for t in entries.values()]
    n = sum(t.numel() for t in entries.values())
    rng = np.random.default_rng(1)
    x = np.arange(1, LAST + 1)[:, None] / LAST
    freq, phase = rng.uniform(0.5, 6.0, n), rng.uniform(0, 2 * np.pi, n)
    amp, drift = rng.uniform(0.5, 2.0, n), rng.normal(size=n)
    trajectory = amp * np.sin(2 * np.pi * freq * x + phase) + drift * x
    adversarial = {target: i for i, target in enumerate(TARGETS)}
    for target, i in adversarial.items():
        trajectory[:, i] = residual_trajectory(target)
    emas = PostHocEMA(model, TRACKED, snapshot_dir=folder, snapshot_every=EVERY)
    exact = PostHocEMA(model, TARGETS, snapshot_dir=None)
    counter = model[1].num_batches_tracked
    truth: dict[int, dict[float, dict[str, torch.Tensor]]] = {}
    values = torch.tensor(trajectory, dtype=torch.float32)
    with torch.no_grad():
        for k in range(1, LAST + 1):
            for t, part in zip(entries.values(), values[k - 1].split(sizes), strict=True):
                t.copy_(part.view_as(t))
            counter.fill_(k)
            emas.update()
            exact.update()
            if k in (MID, LAST):
                truth[k] = {s: exact.ema_state_dict(s) for s in TARGETS}
    emas.close()
    return Run(folder, trajectory, truth, adversarial)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float) -> None:
    # Not torch's assert_close: its first call costs ~2 s of imports.
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual, expected)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual - expected).abs().max()


def flat(state_dict: dict[str, torch.Tensor]) -> np.ndarray:
    """The floating values in the model's order (the trajectory's columns)."""
    keys = floating_entries(make_model())
    return np.concatenate([state_dict[k].double().numpy().ravel() for k in keys])


def error_bound(run: Run, target: float, step: int, predicted: float) -> np.ndarray:
    """Cauchy-Schwarz: |synthesized - exact| <= ||r - f|| * ||w - c|| = predicted * ||f|| * ||w - mean(w)||.

    ``||f||^2 = (g+1)^2 / ((2g+1) T)`` (EDM2 eq. 121); any constant c may be taken
    out of the trajectory w because both profiles have unit mass.
    """
    g = reference_gamma(target)
    f_norm = (g + 1) / math.sqrt((2 * g + 1) * step)
    w = run.trajectory[:step]
    return predicted * f_norm * np.linalg.norm(w - w.mean(axis=0), axis=0)


# -- synthesis against the exact EMA ---------------------------------------------------


@pytest.mark.parametrize("step", [LAST, MID])
@pytest.mark.parametrize("target", TARGETS)
def test_error_is_bounded_by_the_predicted_profile_error(trajectory_run: Run, target: float, step: int) -> None:
    p = plan(trajectory_run.folder, [target], step=step)
    predicted = float(p.errors[0])
    assert 0 < predicted < ERROR_WARNING_THRESHOLD
    assert bool(p.outside[0]) == (not TRACKED[0] <= target <= TRACKED[-1])
    actual = np.abs(flat(run(p)[target]) - flat(trajectory_run.truth[step][target]))
    bound = error_bound(trajectory_run, target, step, predicted)
    # 1e-5: float32 accumulation of values of size ~3 over 2000 updates.
    assert np.all(actual <= bound + 1e-5), np.max(actual - bound)
    # The check has teeth: the synthesized EMA is not just close to everything.
    assert np.max(actual) > 1e-4


@pytest.mark.parametrize("target", TARGETS)
def test_the_predicted_error_is_attained_on_the_worst_trajectory(trajectory_run: Run, target: float) -> None:
    p = plan(trajectory_run.folder, [target])
    i = trajectory_run.adversarial[target]
    actual = abs(flat(run(p)[target])[i] - flat(trajectory_run.truth[LAST][target])[i])
    bound = error_bound(trajectory_run, target, LAST, float(p.errors[0]))[i]
    assert actual == pytest.approx(bound, rel=0.02)


def test_the_bound_check_catches_a_wrong_reconstruction(trajectory_run: Run) -> None:
    p = plan(trajectory_run.folder, [0.07])
    wrong = flat(synthesize(trajectory_run.folder, 0.08))
    actual = np.abs(wrong - flat(trajectory_run.truth[LAST][0.07]))
    assert np.mean(actual > error_bound(trajectory_run, 0.07, LAST, float(p.errors[0])) + 1e-5) > 0.5


def test_synthesize_many_equals_separate_calls(trajectory_run: Run) -> None:
    targets = [0.06, 0.07, 0.12, 0.15]
    together = synthesize_many(trajectory_run.folder, targets, step=MID)
    assert list(together) == targets
    for target in targets:
        alone = synthesize(trajectory_run.folder, target, step=MID)
        assert together[target].keys() == alone.keys()
        for key, value in alone.items():
            assert_close(together[target][key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("step", [LAST, MID])
def test_coefficients_match_edm2_algorithm_3(trajectory_run: Run, step: int) -> None:
    targets = [0.04, 0.07, 0.12, 0.15]
    p = plan(trajectory_run.folder, targets, step=step)
    steps = [s.step for s in p.snapshots]
    sigmas = [s.sigma_rel for s in p.snapshots]
    assert max(steps) == step
    np.testing.assert_allclose(p.gammas, [reference_gamma(s) for s in targets], rtol=1e-10)
    ref = ref_coefficients(steps, sigmas, step, targets)
    np.testing.assert_allclose(p.coefficients.sum(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p.coefficients, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    np.testing.assert_allclose(p.errors, ref_error(ref, steps, sigmas, step, targets), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(p.coefficient_norms, np.linalg.norm(ref, axis=0), rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    n_steps=st.integers(1, 12),
    every=st.integers(1, 1000),
    tracked=st.lists(st.sampled_from([0.02, 0.05, 0.08, 0.1, 0.15, 0.2]), min_size=1, max_size=3, unique=True),
    target=st.floats(0.01, 0.28),
    out_index=st.integers(0, 11),
)
def test_coefficients_property(n_steps: int, every: int, tracked: list[float], target: float, out_index: int) -> None:
    steps = [every * (k + 1) for k in range(n_steps) for _ in tracked]
    sigmas = [s for _ in range(n_steps) for s in tracked]
    out_step = every * (min(out_index, n_steps - 1) + 1)
    used = [i for i, s in enumerate(steps) if s <= out_step]
    ours = solve_coefficients(steps, sigmas, out_step, target)
    ref = ref_coefficients([steps[i] for i in used], [sigmas[i] for i in used], out_step, [target])
    assert np.all(ours[[i for i in range(len(steps)) if i not in used]] == 0)
    np.testing.assert_allclose(ours.sum(axis=0), 1.0, rtol=1e-9)
    # Where lstsq is well posed the weights agree; everywhere, ours fit the target as well.
    ours_used = ours[used]
    ref_err = ref_error(ref, [steps[i] for i in used], [sigmas[i] for i in used], out_step, [target])
    our_err = ref_error(ours_used, [steps[i] for i in used], [sigmas[i] for i in used], out_step, [target])
    assert our_err[0] <= ref_err[0] + 1e-6
    t = np.array([steps[i] for i in used], dtype=np.float64)[:, None]
    g = np.array([reference_gamma(sigmas[i]) for i in used])[:, None]
    gram = ref_p_dot_p(t, g, t.T, g.T)
    d = 1 / np.sqrt(np.diag(gram))
    condition = np.linalg.cond(gram * d[:, None] * d[None, :])
    if condition < 1e6:
        # One solution, to rounding amplified by the condition number (the per-interval
        # solve and lstsq round differently).
        np.testing.assert_allclose(ours_used, ref, rtol=0, atol=1e-11 * condition * np.abs(ref).max())


# -- what comes out --------------------------------------------------------------------


@pytest.mark.parametrize("step", [LAST, MID])
def test_loads_strictly_with_buffers_and_counters_from_the_latest_snapshot(trajectory_run: Run, step: int) -> None:
    sd = synthesize(trajectory_run.folder, 0.07, step=step)
    model = make_model()
    model.load_state_dict(sd, strict=True)
    assert sd["1.num_batches_tracked"].dtype == torch.int64
    assert int(model[1].num_batches_tracked) == step  # copied from the latest snapshot used, not averaged
    assert sd["1.running_mean"].dtype == torch.float32


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float32"])
def test_output_dtype(trajectory_run: Run, dtype: str | torch.dtype) -> None:
    reference = synthesize(trajectory_run.folder, 0.07)
    sd = synthesize(trajectory_run.folder, 0.07, dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.int64
            assert torch.equal(value, reference[key])
        else:
            assert value.dtype == want
            assert_close(value.float(), reference[key], rtol=1e-2, atol=1e-2)


def test_bad_dtype(trajectory_run: Run) -> None:
    with pytest.raises(ValueError, match=r"dtype='int8' is not one of float32, float64, bfloat16, float16"):
        synthesize(trajectory_run.folder, 0.07, dtype="int8")


def test_progress_reports_growing_work_up_to_the_total(trajectory_run: Run) -> None:
    calls: list[tuple[int, int]] = []
    synthesize_many(trajectory_run.folder, [0.07], progress=lambda done, total: calls.append((done, total)))
    assert calls
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert len({t for _, t in calls}) == 1
    assert calls[-1][0] == calls[-1][1] > 0


def test_save_writes_a_self_describing_file(trajectory_run: Run, tmp_path: Path) -> None:
    from safetensors import safe_open

    p = plan(trajectory_run.folder, [0.07, 0.15], step=MID)
    sds = run(p, dtype="bfloat16")
    save(tmp_path / "ema.safetensors", sds[0.15], p, 1)
    with safe_open(tmp_path / "ema.safetensors", framework="pt") as f:
        meta = f.metadata()
        loaded = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    assert float(meta["sigma_rel"]) == 0.15
    assert float(meta["gamma"]) == pytest.approx(reference_gamma(0.15))
    assert int(meta["step"]) == MID
    assert float(meta["predicted_error"]) == float(p.errors[1])
    assert meta["library_version"] == __version__
    assert meta["dtype"] == "bfloat16"
    for key, value in sds[0.15].items():
        assert torch.equal(loaded[key], value)
    make_model().load_state_dict(loaded, strict=True)
    assert [q.name for q in tmp_path.iterdir()] == ["ema.safetensors"]


def test_poor_reconstruction_warns(trajectory_run: Run) -> None:
    with pytest.warns(
        PoorReconstructionWarning,
        match=r"^1 of \d targets \(sigma_rel 0.27\) have a predicted relative error above 5% \(\d+\.\d\d%\)",
    ):
        p = plan(trajectory_run.folder, [0.07, 0.27])
    assert p.errors[1] > ERROR_WARNING_THRESHOLD > p.errors[0]


# -- bad folders and arguments ---------------------------------------------------------


def small_tensors(step: int, sigma_rel: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), step * sigma_rel), "n": torch.tensor(step)}


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """Snapshots of 0.05 and 0.1 at steps 100, 200, 300; entry w is step * sigma_rel."""
    folder = tmp_path / "small"
    folder.mkdir()
    for step in (100, 200, 300):
        for sigma_rel in TRACKED:
            write_snapshot(folder, step, sigma_rel, small_tensors(step, sigma_rel))
    return folder


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.2887, 0.5, math.nan, math.inf])
def test_sigma_rel_out_of_range(small: Path, sigma_rel: float) -> None:
    with pytest.raises(ValueError, match=r"sigma_rel=\S+ is outside \(0, 0\.2886751\d+\); sigma_rel must be > 0"):
        synthesize(small, sigma_rel)


def test_no_targets(small: Path) -> None:
    with pytest.raises(ValueError, match="sigma_rels is empty; give at least one target sigma_rel"):
        synthesize_many(small, [])


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"nope: no such snapshot folder"):
        synthesize(tmp_path / "nope", 0.1)


def test_folder_without_snapshots(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SnapshotError, match=r"no snapshots \(no \.safetensors file with posthoc-ema snapshot metadata"):
        synthesize(tmp_path, 0.1)


def test_step_after_the_last_snapshot(small: Path) -> None:
    with pytest.raises(ValueError, match=r"step=301 is after the last snapshot \(step 300\)"):
        synthesize(small, 0.07, step=301)


@pytest.mark.parametrize(("step", "nearest"), [(250, "200, 300"), (120, "100, 200"), (50, "100, 200"), (1, "100, 200")])
def test_off_grid_step_lists_the_nearest(small: Path, step: int, nearest: str) -> None:
    with pytest.raises(ValueError, match=rf"step={step} is not a snapshot step; the nearest are {nearest} "):
        synthesize(small, 0.07, step=step)


def test_truncated_snapshot(small: Path) -> None:
    path = small / snapshot_name(200, 0.1)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(SnapshotError, match=rf"{path.name}: truncated or corrupt: the header describes \d+ bytes"):
        synthesize(small, 0.07)


def test_snapshot_cut_inside_its_header(small: Path) -> None:
    path = small / snapshot_name(300, 0.05)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SnapshotError, match=rf"{path.name}: truncated or not a safetensors file \(header of \d+ bytes"):
        plan(small, 0.07)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{not json", "unreadable safetensors header"),
        (b"[1, 2, 3]", "malformed safetensors header"),
        (b'{"w": {"dtype": "F32"}}', "malformed safetensors header"),
    ],
)
def test_corrupt_header(small: Path, header: bytes, message: str) -> None:
    path = small / snapshot_name(100, 0.05)
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(SnapshotError, match=rf"{path.name}: {message}"):
        synthesize(small, 0.07)


def test_tensor_names_disagree(small: Path) -> None:
    write_snapshot(small, 400, 0.05, {"v": torch.zeros(3, 2), "n": torch.tensor(400)})
    with pytest.raises(SnapshotError, match=r"does not match .*: tensor names differ \(e\.g\. 'v'\)"):
        synthesize(small, 0.07)
    assert synthesize(small, 0.07, step=300)["w"].shape == (3, 2)  # the snapshots up to 300 are fine


def test_tensor_shapes_disagree(small: Path) -> None:
    write_snapshot(small, 400, 0.1, {"w": torch.zeros(2, 3), "n": torch.tensor(400)})
    with pytest.raises(SnapshotError, match=r"tensor 'w' has shape \(2, 3\), not \(3, 2\)"):
        synthesize(small, 0.07)


def test_two_runs_mixed(small: Path) -> None:
    write_snapshot(small, 200, 0.1, small_tensors(200, 0.1), name="other-run-200.safetensors")
    message = r"0.1.safetensors and .*other-run-200.safetensors are both snapshots of sigma_rel=0.1 at step 200; is the"
    with pytest.raises(SnapshotError, match=message):
        synthesize(small, 0.07)


def test_other_files_are_ignored(small: Path, tmp_path: Path) -> None:
    before = synthesize(small, 0.07)
    p = plan(small, [0.07])
    # A synthesized output next to its snapshots (save() refuses to put it there; write it directly).
    write_atomic(small / "ema-0.07.safetensors", before, p.metadata(0))
    save_file({"w": torch.ones(5)}, small / "model.safetensors")
    (small / (snapshot_name(400, 0.1) + ".tmp")).write_bytes(b"half a file")
    (small / "README").write_text("snapshots")
    after = synthesize(small, 0.07)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert plan(small, [0.07]).step == 300


def test_small_folder_values(small: Path) -> None:
    # w is step * sigma_rel in every snapshot: an exact combination is easy to check by hand.
    p = plan(small, [0.05, 0.1, 0.09], step=200)
    sds = run(p)
    assert torch.allclose(sds[0.05]["w"], torch.full((3, 2), 10.0))
    assert torch.allclose(sds[0.1]["w"], torch.full((3, 2), 20.0))
    w = np.array([s.step * s.sigma_rel for s in p.snapshots])
    assert torch.allclose(sds[0.09]["w"], torch.full((3, 2), float(w @ p.coefficients[:, 2])))
    assert int(sds[0.09]["n"]) == 200


# -- resources -------------------------------------------------------------------------

PEAK_RSS = textwrap.dedent(
    """
    import json, resource, sys, warnings
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from posthoc_ema.synthesis import synthesize
    warnings.simplefilter("ignore")

    def peak():
        # Linux's VmHWM, reset below so the import of torch (whose peak varies with
        # how much of its libraries is paged in) cannot hide what follows.
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
    before = peak()
    if sys.argv[2] == "synthesize":
        sd = synthesize(sys.argv[1], 0.07)
    else:  # the naive way, every snapshot in memory at once: shows that the measure sees growth
        files = sorted(Path(sys.argv[1]).glob("*.safetensors"))
        everything = [{k: t.clone() for k, t in load_file(f).items()} for f in files]
        sd = everything[-1]
    after = peak()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    print(json.dumps({"before": before * scale, "after": after * scale, "values": sum(t.numel() for t in sd.values())}))
    """
)


def peak_rss(folder: Path, how: str = "synthesize") -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder), how], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow  # ~15 s: writes 576 MiB of snapshots and starts three interpreters
@pytest.mark.skipif(sys.platform == "win32", reason="resource is POSIX only")
def test_memory_stays_flat_as_snapshots_grow(tmp_path: Path) -> None:
    shape = (2048, 1024)  # two such tensors: 4.2M parameters, 16 MiB per float32 snapshot
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for n_steps in (2, 16):  # 4 and 32 snapshots
        folder = tmp_path / f"n{n_steps}"
        folder.mkdir()
        for k in range(1, n_steps + 1):
            for sigma_rel in TRACKED:
                tensors = {"a": torch.randn(shape, generator=generator), "b": torch.randn(shape, generator=generator)}
                write_snapshot(folder, 100 * k, sigma_rel, {**tensors, "n": torch.tensor(k)})
        folders[n_steps] = folder
    few, many = peak_rss(folders[2]), peak_rss(folders[16])
    assert few["values"] == many["values"] == 2 * math.prod(shape) + 1
    snapshot_bytes = 8 * math.prod(shape)
    # 28 more snapshots are 448 MiB more data; allow 3 snapshots' worth of noise.
    growth = {n: r["after"] - r["before"] for n, r in ((2, few), (16, many))}
    assert growth[16] - growth[2] < 3 * snapshot_bytes, (few, many)
    # The measure can fail: holding every snapshot shows up.
    everything = peak_rss(folders[16], "load_all")
    assert everything["after"] - everything["before"] - growth[16] > 20 * snapshot_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(trajectory_run: Run) -> None:
    on_cpu = synthesize_many(trajectory_run.folder, TARGETS)
    on_gpu = synthesize_many(trajectory_run.folder, TARGETS, device="cuda")
    for target in TARGETS:
        for key, value in on_cpu[target].items():
            assert on_gpu[target][key].device.type == "cuda"
            assert_close(on_gpu[target][key].cpu(), value, rtol=1e-5, atol=1e-6)
    model = make_model().cuda()
    model.load_state_dict(on_gpu[0.07], strict=True)


@pytest.mark.parametrize("other_dtype", [torch.float64, torch.bfloat16])
def test_files_read_whole_or_tensor_by_tensor_agree(tmp_path: Path, other_dtype: torch.dtype) -> None:
    # float32 snapshots stored back to back are read one range per chunk; other
    # dtypes, or an integer tensor between the floating ones, tensor by tensor.
    generator = torch.Generator().manual_seed(1)
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast.mkdir()
    slow.mkdir()
    for k in range(1, 5):
        for sigma_rel in TRACKED:
            values = {name: torch.randn(shape, generator=generator) for name, shape in (("a", (5, 3)), ("b", (7,)))}
            values = {name: t.to(torch.bfloat16).float() for name, t in values.items()}  # exact in every dtype
            write_snapshot(fast, 100 * k, sigma_rel, {**values, "n": torch.tensor(k)})
            write_snapshot(
                slow, 100 * k, sigma_rel, {"a": values["a"].to(other_dtype), "b": values["b"], "n": torch.tensor(k)}
            )
    a, b = synthesize(fast, 0.07), synthesize(slow, 0.07)
    assert a.keys() == b.keys()
    for name in ("a", "b"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
