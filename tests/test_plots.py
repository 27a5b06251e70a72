"""posthoc_ema.plots and ``posthoc-ema plot``: figures of the right size, and a clear message without matplotlib."""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke

from posthoc_ema import PostHocEMA, plots, profiles
from posthoc_ema.plots import DPI, FIGSIZE, plot_error_curve, plot_profile, plot_sweep
from posthoc_ema.sweeps import EvaluationError, SweepResult, SweepRow, sweep
from posthoc_ema.synthesis import PoorReconstructionWarning, plan

LAST, EVERY = 300, 30
PIXELS = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
MISSING = "plotting needs matplotlib, which is not installed: pip install 'posthoc-ema[plot]'"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    emas = PostHocEMA(model, (0.05, 0.10), snapshot_dir=folder, snapshot_every=EVERY)
    with torch.no_grad():
        for _ in range(LAST):
            model.weight.add_(torch.randn_like(model.weight), alpha=0.05)
            emas.update()
    emas.close()
    return folder


@pytest.fixture
def mpl() -> None:
    pytest.importorskip("matplotlib")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def a_sweep(run_dir: Path) -> SweepResult:
    """Seven targets: 0.01 poorly reconstructed, the evaluation of 0.09 failed."""
    count = itertools.count()

    def evaluate(state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        if next(count) == 4:
            raise EvaluationError("crashed")
        norm = float(state_dict["weight"].norm())
        return {"norm": norm, "half": norm / 2}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)
        return sweep(run_dir, [0.01, 0.03, 0.05, 0.07, 0.09, 0.11, 0.15], evaluate)


# -- files -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.005, 0.05, 0.08, 0.25])
def test_plot_profile_writes_a_png(mpl: None, run_dir: Path, tmp_path: Path, sigma_rel: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)
        the_plan = plan(run_dir, [0.1, sigma_rel])
    path = tmp_path / "profile.png"
    fig = plot_profile(the_plan, 1, path)
    assert png_size(path) == PIXELS
    ax = fig.axes[0]
    assert ax.get_xlabel() == "training step"
    assert f"sigma_rel={sigma_rel:.3g} at step {LAST}" in ax.get_title()
    assert f"predicted error {the_plan.errors[1]:.2%}" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["10 weighted snapshots of sigma_rel=0.05", "10 weighted snapshots of sigma_rel=0.1"]
    assert labels[2].startswith(f"target: sigma_rel={sigma_rel:.3g}")
    assert ax.get_xlim()[1] == LAST


def test_plot_profile_reconstruction_matches_the_target(mpl: None, run_dir: Path) -> None:
    fig = plot_profile(plan(run_dir, 0.08), 0)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    target = next(line for label, line in lines.items() if label.startswith("target: sigma_rel=0.08")).get_ydata()
    recon = lines["reconstruction from the snapshots"].get_ydata()
    # Relative L2 error on the drawing grid, close to the predicted one.
    error = np.linalg.norm(recon - target) / np.linalg.norm(target)
    assert error == pytest.approx(plan(run_dir, 0.08).errors[0], rel=0.05, abs=1e-4)
    assert target.max() > 1  # scaled so that the uniform average is 1


def test_plot_profile_index(mpl: None, run_dir: Path) -> None:
    the_plan = plan(run_dir, [0.06, 0.09])
    assert "sigma_rel=0.09" in plot_profile(the_plan, -1).axes[0].get_title()
    with pytest.raises(IndexError, match="index=2 is not a target of the plan, which has 2"):
        plot_profile(the_plan, 2)


@pytest.mark.parametrize("suffix", ["png", "pdf", "svg"])
def test_the_suffix_chooses_the_format(mpl: None, run_dir: Path, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"profile.{suffix}"
    plot_profile(plan(run_dir, 0.07), 0, path)
    assert path.stat().st_size > 1000


def test_plot_error_curve(mpl: None, run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "error.png"
    fig = plot_error_curve(run_dir, np.linspace(0.011, 0.251, 41), path)  # holds neither 0.05 nor 0.1
    assert png_size(path) == PIXELS
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "sigma_rel (EMA width / training length)"
    x, y = fig.axes[0].get_lines()[0].get_data()
    # The tracked sigma_rels are added to the grid: the curve drops to the floor there.
    assert 0.05 in x and 0.1 in x and len(x) == 41 + 2
    assert y[list(x).index(0.05)] == pytest.approx(1e-5)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["outside the tracked range", "predicted error", "warning threshold (5%)", "tracked sigma_rels"]
    assert "errors below 0.001% are drawn at 0.001%" in ax.get_title()


def test_plot_error_curve_from_a_plan(mpl: None, run_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoorReconstructionWarning)
        the_plan = plan(run_dir, [0.2, 0.01, 0.07])
    x, y = plot_error_curve(the_plan).axes[0].get_lines()[0].get_data()
    assert list(x) == [0.01, 0.07, 0.2]
    np.testing.assert_array_equal(y, np.maximum(the_plan.errors[[1, 2, 0]], 1e-5))


def test_plot_error_curve_arguments(mpl: None, run_dir: Path) -> None:
    with pytest.raises(ValueError, match="sigma_rels is required with a snapshot folder"):
        plot_error_curve(run_dir)
    with pytest.raises(ValueError, match="give sigma_rels and step with a snapshot folder, not with a plan"):
        plot_error_curve(plan(run_dir, 0.07), [0.05])


def test_plot_error_curve_does_not_warn(mpl: None, run_dir: Path) -> None:
    plot_error_curve(run_dir, [0.001, 0.01, 0.27])  # poorly reconstructed, and drawn as such


def test_plot_sweep(mpl: None, run_dir: Path, tmp_path: Path) -> None:
    result = a_sweep(run_dir)
    path = tmp_path / "sweep.png"
    fig = plot_sweep(result, path)
    assert png_size(path) == PIXELS
    ax = fig.axes[0]
    assert ax.get_ylabel() == "norm (lower is better)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    best = result.best
    assert labels == [
        "norm",
        "predicted error > 5%",
        "tracked sigma_rels",
        "evaluation failed",
        f"best: sigma_rel={best.sigma_rel:.3g}, norm={best.metrics['norm']:.4g}",
    ]


def test_plot_sweep_another_metric(mpl: None, run_dir: Path) -> None:
    ax = plot_sweep(a_sweep(run_dir), metric="half").axes[0]
    assert ax.get_ylabel() == "half"
    assert not any(t.get_text().startswith("best") for t in ax.get_legend().get_texts())
    with pytest.raises(ValueError, match="no row of the sweep has a finite value of metric 'acc'"):
        plot_sweep(a_sweep(run_dir), metric="acc")


def test_plot_sweep_maximized(mpl: None) -> None:
    rows = tuple(SweepRow(s, 0.0, False, {"acc": v}) for s, v in [(0.05, 0.9), (0.1, 0.95), (0.15, 0.92)])
    result = SweepResult(rows=rows, metric="acc", maximize=True, step=10, tracked_sigma_rels=(0.05, 0.1))
    ax = plot_sweep(result).axes[0]
    assert ax.get_ylabel() == "acc (higher is better)"
    assert ax.get_legend().get_texts()[-1].get_text() == "best: sigma_rel=0.1, acc=0.95"


def test_no_pyplot_and_no_backend_change(run_dir: Path, tmp_path: Path) -> None:
    """Drawing leaves matplotlib's global state alone: a notebook's inline backend keeps working."""
    pytest.importorskip("matplotlib")
    code = f"""
import sys, matplotlib
backend = lambda: dict.__getitem__(matplotlib.rcParams, "backend")  # read without resolving it
before = backend()
from posthoc_ema.plots import plot_profile
from posthoc_ema.synthesis import plan
plot_profile(plan({str(run_dir)!r}, 0.07), 0, {str(tmp_path / "p.png")!r})
print("matplotlib.pyplot" in sys.modules, backend() == before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.split() == ["False", "True"]


# -- without matplotlib ------------------------------------------------------------------------


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``import matplotlib...`` fail, as when it is not installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_matplotlib_says_what_to_install(no_matplotlib: None, run_dir: Path, tmp_path: Path) -> None:
    rows = (SweepRow(0.1, 0.0, False, {"m": 1.0}),)
    result = SweepResult(rows=rows, metric="m", maximize=False, step=1, tracked_sigma_rels=(0.1,))
    calls = [
        lambda: plot_profile(plan(run_dir, 0.07), 0, tmp_path / "a.png"),
        lambda: plot_error_curve(run_dir, [0.05, 0.1], tmp_path / "b.png"),
        lambda: plot_sweep(result, tmp_path / "c.png"),
    ]
    for call in calls:
        with pytest.raises(ImportError, match=r"^plotting needs matplotlib, .*: pip install 'posthoc-ema\[plot\]'$"):
            call()
    assert not list(tmp_path.iterdir())


def test_cli_plot_without_matplotlib(no_matplotlib: None, run_dir: Path, tmp_path: Path) -> None:
    _, stderr = invoke("plot", run_dir, "-s", "0.07", "-o", tmp_path / "p.png", code=1)
    assert stderr == f"error: {MISSING}\n"


def test_cli_sweep_without_matplotlib_says_so_in_one_line(no_matplotlib: None, run_dir: Path, tmp_path: Path) -> None:
    command = f"{sys.executable} -c 'print(0.5)' {{weights}}"
    stdout, _ = invoke("sweep", run_dir, "-s", "0.07", "-e", command, "-o", tmp_path / "out")
    assert f"no plot: {MISSING}\n" in stdout
    assert (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "sweep.png").exists()


# -- posthoc-ema plot ------------------------------------------------------------------------------


def test_cli_plot_profile(mpl: None, run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "profile.png"
    stdout, stderr = invoke("plot", run_dir, "--sigma-rel", "0.15", "-o", path)
    assert stdout == f"wrote {path}\n" and stderr == ""
    assert png_size(path) == PIXELS


def test_cli_plot_default_names(mpl: None, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert invoke("plot", run_dir, "-s", "0.15")[0] == "wrote profile-0.15.png\n"
    assert invoke("plot", run_dir, "--error-curve", "0.02:0.25:0.005")[0] == "wrote error-curve.png\n"
    assert png_size(tmp_path / "error-curve.png") == PIXELS


def test_cli_plot_step(mpl: None, run_dir: Path, tmp_path: Path) -> None:
    invoke("plot", run_dir, "-s", "0.1", "--step", "150", "-o", tmp_path / "p.png")
    _, stderr = invoke("plot", run_dir, "-s", "0.1", "--step", "155", "-o", tmp_path / "p.png", code=1)
    assert stderr.startswith("error: step=155 is not a snapshot step")


def test_cli_plot_warns_about_a_poor_target(mpl: None, run_dir: Path, tmp_path: Path) -> None:
    _, stderr = invoke("plot", run_dir, "-s", "0.005", "-o", tmp_path / "p.png")
    assert stderr.startswith("warning: 1 of 1 targets (sigma_rel 0.005) have a predicted relative error above 5%")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "give either --sigma-rel or --error-curve"),
        (["-s", "0.1", "--error-curve", "0.05:0.1:0.01"], 2, "give either --sigma-rel or --error-curve"),
        (["--error-curve", "0.05:0.1"], 2, "is not a number or a range START:STOP:STEP"),
        (["-s", "0.4"], 1, "error: sigma_rel=0.4 is outside (0, 0.28867513459481287)"),
        (["-s", "0.1", "-o", "FOLDER/p.xyz"], 1, "error: Format 'xyz' is not supported"),
    ],
)
def test_cli_plot_errors(mpl: None, run_dir: Path, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    args = [a.replace("FOLDER", str(tmp_path)) for a in args]
    _, stderr = invoke("plot", run_dir, *args, code=code)
    assert message in " ".join(stderr.replace("│", " ").split())
    if code == 1:
        assert len(stderr.splitlines()) == 1


def test_cli_plot_missing_folder(run_dir: Path, tmp_path: Path) -> None:
    _, stderr = invoke("plot", tmp_path / "nope", "-s", "0.1", code=1)
    assert stderr == f"error: {tmp_path / 'nope'}: no such snapshot folder\n"


def test_cli_plot_writes_the_name_it_prints(mpl: None, run_dir: Path, tmp_path: Path) -> None:
    stdout, _ = invoke("plot", run_dir, "-s", "0.1", "-o", tmp_path / "prof")
    assert stdout == f"wrote {tmp_path / 'prof.png'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof.png"]
    assert png_size(tmp_path / "prof.png") == PIXELS


def test_a_figure_is_saved_under_exactly_the_name_given(mpl: None, run_dir: Path, tmp_path: Path) -> None:
    plot_profile(plan(run_dir, 0.1), 0, tmp_path / "prof")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof"]
    assert png_size(tmp_path / "prof") == PIXELS


def test_the_profile_density_is_eq_121() -> None:
    # EDM2 eq. 121, written out independently: (gamma + 1) t^gamma / T^(gamma + 1) on (0, T].
    t = np.array([-1.0, 0.0, 0.5, 2.0, 4.0, 4.5])
    for gamma in (0.0, 0.5, 6.94, 16.97):
        expected = [(gamma + 1) * x**gamma / 4.0 ** (gamma + 1) if 0 < x <= 4.0 else 0.0 for x in t]
        np.testing.assert_allclose(profiles.power_profile(t, 4.0, gamma), expected, rtol=1e-13)
    grid = np.linspace(0, 10, 200_001)
    density = profiles.power_profile(grid, 10.0, 6.94)
    assert abs(np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid)) - 1) < 1e-6
    assert "def _density" not in Path(plots.__file__).read_text()
