"""Classic-EMA targets on the command line: --beta, --half-life, --ema-start, --schedule (posthoc_ema.cli)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, random_walk_run
from safetensors import safe_open

from posthoc_ema.cli import classic_targets
from posthoc_ema.plots import plot_sweep
from posthoc_ema.results import RESULTS_JSON, SweepResult, SweepRow, grid_axes, row_order
from posthoc_ema.schedules import (
    Constant,
    ExpWarmup,
    HalfLife,
    PowerFunction,
    Threshold,
    Warmup,
    parse_schedule,
    schedule_spec,
)
from posthoc_ema.synthesis import synthesize_many

LAST, EVERY = 400, 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshots of sigma_rel 0.05 and 0.1 every 40 steps to step 400."""
    return random_walk_run(tmp_path_factory.mktemp("ckpts"), steps=LAST, every=EVERY, drift=0.01)


def usage_error(stderr: str) -> str:
    return " ".join(stderr.replace("│", " ").split())


# -- the spec parser ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "schedule"),
    [
        ("constant:beta=0.999,start=8000", Constant(0.999, start=8000)),
        ("constant:beta=0.999", Constant(0.999)),
        (" Constant : beta = 0.9 , start = 5 ", Constant(0.9, start=5)),
        ("half-life:half_life=2000", HalfLife(2000)),
        ("half-life:half-life=50,update_interval=4,start=1", HalfLife(50, update_interval=4, start=1)),
        ("warmup:inv_gamma=1,power=0.75,max_beta=0.9999", Warmup(inv_gamma=1, power=0.75, max_beta=0.9999)),
        ("warmup:", Warmup()),
        ("warmup", Warmup()),
        ("threshold:beta=0.9999", Threshold(0.9999)),
        ("exp-warmup:beta=0.9999,rate=15,total_steps=100000", ExpWarmup(0.9999, rate=15, total_steps=100000)),
        ("power:sigma_rel=0.1", PowerFunction(sigma_rel=0.1)),
        ("power:gamma=6.9", PowerFunction(gamma=6.9)),
    ],
)
def test_parse_schedule(spec: str, schedule: object) -> None:
    assert parse_schedule(spec) == schedule
    assert parse_schedule(schedule_spec(parse_schedule(spec))) == parse_schedule(spec) or spec.startswith("power:g")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("expo:beta=0.9", "schedule 'expo:beta=0.9': unknown kind 'expo'; use one of constant, half-life, warmup, "),
        (
            "constant:decay=0.9",
            "schedule 'constant:decay=0.9': constant has no field 'decay'; its fields are beta, start",
        ),
        ("constant:beta=high", "schedule 'constant:beta=high': beta='high' is not a number"),
        ("constant:beta=nan", "schedule 'constant:beta=nan': beta='nan' is not a finite number"),
        ("constant:beta=1", "schedule 'constant:beta=1': beta=1.0 is outside [0, 1)"),
        ("constant:start=5", "schedule 'constant:start=5': constant needs beta=..."),
        ("constant:beta", "schedule 'constant:beta': 'beta' is not FIELD=VALUE"),
        ("constant:beta=0.9,beta=0.8", "schedule 'constant:beta=0.9,beta=0.8': field 'beta' is given twice"),
        ("half-life:half_life=-3", "schedule 'half-life:half_life=-3': half_life=-3.0 must be a positive number"),
        ("power:sigma_rel=0.1,gamma=3", "schedule 'power:sigma_rel=0.1,gamma=3': PowerFunction needs exactly one of"),
    ],
)
def test_a_bad_spec_is_one_line_naming_it(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_schedule(spec)
    try:
        parse_schedule(spec)
    except ValueError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "expo:beta=0.9"], "schedule 'expo:beta=0.9': unknown kind 'expo'"),
        (["--schedule", "constant:beta=x"], "schedule 'constant:beta=x': beta='x' is not a number"),
        (["--beta", "0.9,x"], "--beta '0.9,x': 'x' is not a number"),
        (["--beta", "1.5"], "beta=1.5 is outside [0, 1)"),
        (["--half-life", "0"], "half_life=0.0 must be a positive number"),
        (["--ema-start", "100"], "--ema-start applies to --beta and --half-life targets; give one of them too"),
        (["--beta", "0.9", "--ema-start", "-1"], "start=-1.0 must be a step >= 0"),
        ([], "Missing option '--sigma-rel' / '-s': give at least one target with --sigma-rel, --beta"),
    ],
)
def test_bad_classic_options_exit_2_with_one_line(run_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    _, stderr = invoke("synthesize", run_dir, *args, "-o", tmp_path / "out", code=2)
    assert message in usage_error(stderr)
    assert not (tmp_path / "out").exists()


def test_classic_targets_make_a_grid_of_decays_and_starts() -> None:
    targets = classic_targets(betas=["0.998,0.999", "0.9995"], starts=["0,8000", "12000"], half_lives=["100"])
    assert targets[:4] == [Constant(0.998), Constant(0.998, 8000), Constant(0.998, 12000), Constant(0.999)]
    assert len(targets) == 3 * 3 + 3
    assert targets[-3:] == [HalfLife(100), HalfLife(100, start=8000), HalfLife(100, start=12000)]
    assert classic_targets(specs=["threshold:beta=0.99"], betas=["0.9", "0.9"]) == [Constant(0.9), Threshold(0.99)]


# -- synthesize ----------------------------------------------------------------------------


def test_synthesize_writes_mixed_targets_in_one_pass(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stdout, stderr = invoke(
        "synthesize", run_dir, "-s", "0.1", "--beta", "0.97", "--half-life", "20", "--ema-start", "0,200",
        "--schedule", "warmup:power=0.75,max_beta=0.97", "-o", out,
    )  # fmt: skip
    assert stderr == ""
    assert "classic EMAs update every step and start as a copy of the weights at step 0" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            f"ema-0.1-{LAST}.safetensors",
            f"ema-constant-beta=0.97-{LAST}.safetensors",
            f"ema-constant-beta=0.97_start=200-{LAST}.safetensors",
            f"ema-half-life-half_life=20-{LAST}.safetensors",
            f"ema-half-life-half_life=20_start=200-{LAST}.safetensors",
            f"ema-warmup-power=0.75_max_beta=0.97-{LAST}.safetensors",
        ]
    )
    expected = synthesize_many(run_dir, [Constant(0.97, start=200), 0.1])
    with safe_open(str(out / f"ema-constant-beta=0.97_start=200-{LAST}.safetensors"), framework="pt") as f:
        meta = f.metadata()
        weight = f.get_tensor("0.weight")
    assert meta["schedule"] == "constant:beta=0.97,start=200"
    assert parse_schedule(meta["schedule"]) == Constant(0.97, start=200)
    torch.testing.assert_close(weight, expected["constant:beta=0.97,start=200"]["0.weight"], rtol=0, atol=1e-6)
    report = stdout.splitlines()
    header = next(line for line in report if line.startswith("target"))
    assert header.split()[:4] == ["target", "sigma_rel", "gamma", "predicted"]
    assert any(re.match(r"constant:beta=0\.97,start=200 +~0\.0\d+ +- +\d", line) for line in report), report


def test_the_report_names_a_target_its_initial_copy_holds(run_dir: Path, tmp_path: Path) -> None:
    stdout, stderr = invoke("synthesize", run_dir, "--beta", "0.995", "--dry-run")
    line = next(line for line in stdout.splitlines() if line.startswith("constant:beta=0.995"))
    weight = 0.995**LAST
    assert f"CANNOT BE REPRESENTED: its initial copy weighs {weight:.1%}" in line
    assert (
        f"cannot be represented: constant:beta=0.995 still keeps {weight:.1%} of its weight at step {LAST} "
        "on the copy of the weights at step 0 it started from" in usage_error(stderr)
    )


# -- sweep: decay x start in one pass --------------------------------------------------------

EVALUATE = """\
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    size = struct.unpack("<Q", f.read(8))[0]
    meta = json.loads(f.read(size))["__metadata__"]
with open(sys.argv[2], "a") as log:
    log.write(meta.get("schedule", meta["sigma_rel"]) + "\\n")
print(json.dumps({"err": float(meta["predicted_error"])}))
"""


def test_sweep_a_grid_of_decay_and_start_end_to_end(run_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE)
    command = f"{sys.executable} {script} {{weights}} {tmp_path / 'calls.log'}"
    out = tmp_path / "sweep"
    args = ["sweep", run_dir, "--beta", "0.95,0.97", "--ema-start", "0,200", "-s", "0.1", "-e", command, "-o", out]
    stdout, stderr = invoke(*args)
    assert stderr == ""
    calls = (tmp_path / "calls.log").read_text().split()
    grid = ["constant:beta=0.95", "constant:beta=0.97", "constant:beta=0.95,start=200", "constant:beta=0.97,start=200"]
    assert sorted(calls) == sorted(["0.1", *grid])  # one synthesis pass, five evaluations
    result = SweepResult.from_json(out / RESULTS_JSON)
    assert [r.target for r in result.rows] == [None, *grid]  # power first, then by start and decay
    for row in result.rows[1:]:
        assert row.ok and row.metrics["err"] == row.predicted_error
        assert math.isfinite(row.sigma_rel) and row.weights is not None and Path(row.weights).exists()
    assert "constant:beta=0.97,start=200  err=" in stdout
    assert f"best: {result.best.label} (lowest err=" in stdout
    table = result.format_table().splitlines()
    assert table[0].split()[:3] == ["target", "sigma_rel", "err"]
    assert (out / "results.csv").read_text().splitlines()[0].endswith(",weights,target")
    if "no plot:" not in stdout:
        assert (out / "sweep.png").stat().st_size > 0
    # Run again: everything is done, nothing is evaluated twice.
    stdout, _ = invoke(*args)
    assert stdout.startswith(f"{out / RESULTS_JSON}: 5 of 5 targets already evaluated; skipping them\n")
    assert len((tmp_path / "calls.log").read_text().split()) == 5


def test_old_results_without_targets_still_load(tmp_path: Path) -> None:
    old = {
        "format": "posthoc-ema/sweep",
        "format_version": 1,
        "metric": "loss",
        "maximize": False,
        "step": 400,
        "tracked_sigma_rels": [0.05, 0.1],
        "rows": [
            {"sigma_rel": 0.1, "metrics": {"loss": 0.5}, "predicted_error": 0.001, "outside": False,
             "failure": None, "weights": None},
        ],
    }  # fmt: skip
    (tmp_path / RESULTS_JSON).write_text(json.dumps(old))
    result = SweepResult.from_json(tmp_path / RESULTS_JSON)
    assert result.rows[0].target is None and result.rows[0].sigma_rel == 0.1
    assert result.to_dict()["rows"][0] == old["rows"][0]  # written back as it was
    new = SweepRow(math.nan, 0.3, True, {"loss": 1.0}, target="constant:beta=0.9999")
    data = SweepResult((new,), "loss", False, 400, (0.05,)).to_dict()
    assert data["rows"][0]["target"] == "constant:beta=0.9999" and data["rows"][0]["sigma_rel"] is None
    (tmp_path / "new.json").write_text(json.dumps(data))
    back = SweepResult.from_json(tmp_path / "new.json").rows[0]
    assert back.target == new.target and math.isnan(back.sigma_rel)


def test_rows_sort_power_first_then_by_kind_start_and_decay() -> None:
    rows = [
        SweepRow(0.1, 0.0, False, target="half-life:half_life=20"),
        SweepRow(0.2, 0.0, False, target="constant:beta=0.9,start=10"),
        SweepRow(0.3, 0.0, False, target="constant:beta=0.99"),
        SweepRow(0.15, 0.0, False),
        SweepRow(0.05, 0.0, False, target="warmup:power=0.75"),
        SweepRow(0.25, 0.0, False, target="constant:beta=0.9"),
    ]
    ordered = [r.target for r in sorted(rows, key=row_order)]
    assert ordered == [
        None, "constant:beta=0.9", "constant:beta=0.99", "constant:beta=0.9,start=10", "half-life:half_life=20",
        "warmup:power=0.75",
    ]  # fmt: skip
    assert grid_axes(rows[1]) == ("constant", 0.9, 10.0)
    assert grid_axes(rows[4]) is None


def test_the_sweep_plot_draws_one_curve_per_start() -> None:
    pytest.importorskip("matplotlib")
    rows = [SweepRow(0.1, 0.001, False, {"loss": 2.0})]
    for start in (0, 8000, 12000):
        for beta in (0.998, 0.999, 0.9995):
            loss = 1.0 + (beta - 0.999) ** 2 + start * 1e-6
            rows.append(SweepRow(0.05, 0.001, False, {"loss": loss}, target=schedule_spec(Constant(beta, start=start))))
    result = SweepResult(tuple(sorted(rows, key=row_order)), "loss", False, 20000, (0.05, 0.1))
    fig = plot_sweep(result)
    power_ax, grid_ax = fig.axes
    assert power_ax.get_xlabel().startswith("sigma_rel")
    assert grid_ax.get_xlabel().startswith("decay beta")
    curves = [line for line in grid_ax.get_lines() if line.get_label().startswith("EMA start")]
    assert [c.get_label() for c in curves] == ["EMA start 0", "EMA start 8000", "EMA start 12000"]
    for c in curves:
        np.testing.assert_allclose(c.get_xdata(), [0.998, 0.999, 0.9995])
    legend = [t.get_text() for t in grid_ax.get_legend().get_texts()]
    assert "best: constant:beta=0.999, loss=1" in legend
