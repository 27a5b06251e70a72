"""posthoc_ema.sweeps: the library sweep, its result table, external evaluation commands, and ``posthoc-ema sweep``."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, random_walk_run
from hypothesis import given
from hypothesis import strategies as st

import posthoc_ema.sweeps as sweep_module
from posthoc_ema.snapshots import list_snapshots
from posthoc_ema.sweeps import (
    RESULTS_CSV,
    RESULTS_JSON,
    EvaluationError,
    SweepResult,
    SweepRow,
    command_sweep,
    parse_metric_line,
    run_command,
    sweep,
    target_bytes,
    weights_name,
)
from posthoc_ema.synthesis import PoorReconstructionWarning, plan, synthesize_many

LAST, EVERY = 400, 40
TARGETS = (0.05, 0.07, 0.1, 0.13)  # all reconstructed to well under 5%


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshots of sigma_rel 0.05 and 0.1 every 40 steps to step 400, of weights that drift and jitter."""
    return random_walk_run(tmp_path_factory.mktemp("ckpts"), steps=LAST, every=EVERY, drift=0.01)


def weight_norm(state_dict: dict[str, torch.Tensor]) -> float:
    return float(state_dict["0.weight"].norm())


# -- SweepResult.best ------------------------------------------------------------------


def table(values: list[float | None], *, maximize: bool) -> SweepResult:
    rows = tuple(
        SweepRow(
            sigma_rel=0.01 * (i + 1),
            predicted_error=0.0,
            outside=False,
            metrics={} if v is None else {"m": v},
            failure="boom" if v is None else None,
        )
        for i, v in enumerate(values)
    )
    return SweepResult(rows=rows, metric="m", maximize=maximize, step=100, tracked_sigma_rels=(0.05, 0.1))


@pytest.mark.parametrize(
    ("values", "lowest", "highest"),
    [
        ([3.0, 1.0, 2.0], 1, 0),
        ([1.0], 0, 0),
        ([2.0, 2.0, 1.0, 1.0], 2, 0),  # ties: the first
        ([None, 5.0, float("nan"), 4.0], 3, 1),  # failures and NaN are never best
        ([float("inf"), 1.0, -float("inf"), 2.0], 1, 3),  # nor infinities
        ([-1.0, -3.0, -2.0], 1, 0),
    ],
)
def test_best_in_both_directions(values: list[float | None], lowest: int, highest: int) -> None:
    assert table(values, maximize=False).best.sigma_rel == pytest.approx(0.01 * (lowest + 1))
    assert table(values, maximize=True).best.sigma_rel == pytest.approx(0.01 * (highest + 1))


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.none(), min_size=1, max_size=12), st.booleans())
def test_best_is_the_extreme_finite_value(values: list[float | None], maximize: bool) -> None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    result = table(values, maximize=maximize)
    if not finite:
        with pytest.raises(ValueError, match="no row has a finite value of metric 'm'"):
            result.best  # noqa: B018
        return
    best = result.best
    assert best.metrics["m"] == (max(finite) if maximize else min(finite))
    first = next(i for i, v in enumerate(values) if v == best.metrics["m"])
    assert best is result.rows[first]


def test_best_names_the_metrics_present_when_none_is_finite() -> None:
    result = SweepResult(
        rows=(SweepRow(0.1, 0.0, False, {"loss": 1.0}),), metric="acc", maximize=True, step=1, tracked_sigma_rels=()
    )
    with pytest.raises(ValueError, match=r"metric 'acc' \(1 rows, 0 failed evaluations\); metrics present: loss"):
        result.best  # noqa: B018


# -- sweep() -------------------------------------------------------------------------------


def test_sweep_evaluates_what_synthesize_gives(run_dir: Path) -> None:
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate(state_dict: dict[str, torch.Tensor]) -> float:
        seen.append(state_dict)
        return weight_norm(state_dict)

    result = sweep(run_dir, TARGETS, evaluate)
    reference = synthesize_many(run_dir, TARGETS)
    assert [r.sigma_rel for r in result.rows] == list(TARGETS)
    assert len(seen) == len(TARGETS)
    for row, state_dict in zip(result.rows, seen, strict=True):
        for key, tensor in reference[row.sigma_rel].items():
            assert torch.equal(state_dict[key], tensor), key
        assert row.metrics == {"metric": weight_norm(reference[row.sigma_rel])}
    assert result.metric == "metric"
    assert result.step == LAST
    assert result.tracked_sigma_rels == (0.05, 0.1)
    assert [r.outside for r in result.rows] == [False, False, False, True]
    assert all(r.ok and r.weights is None for r in result.rows)
    assert result.rows[0].predicted_error < 1e-6 and 0 < result.rows[1].predicted_error < 0.05


def test_rows_come_sorted_whatever_the_order_asked(run_dir: Path) -> None:
    result = sweep(run_dir, TARGETS[::-1], weight_norm)
    assert result.sigma_rels == TARGETS


def test_minimize_and_maximize_pick_opposite_ends(run_dir: Path) -> None:
    low = sweep(run_dir, TARGETS, weight_norm)
    high = sweep(run_dir, TARGETS, weight_norm, maximize=True)
    values = low.values()
    assert low.best.sigma_rel == TARGETS[int(np.argmin(values))]
    assert high.best.sigma_rel == TARGETS[int(np.argmax(values))]
    assert low.best.sigma_rel != high.best.sigma_rel


def test_dict_metrics_rank_by_the_chosen_one(run_dir: Path) -> None:
    def evaluate(state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        norm = weight_norm(state_dict)
        return {"norm": norm, "negative": -norm}

    by_first = sweep(run_dir, TARGETS, evaluate)
    assert by_first.metric == "norm"
    assert by_first.metric_names == ("norm", "negative")
    by_negative = sweep(run_dir, TARGETS, evaluate, metric="negative")
    assert by_negative.metric == "negative"
    assert by_negative.best.sigma_rel == sweep(run_dir, TARGETS, evaluate, metric="norm", maximize=True).best.sigma_rel
    np.testing.assert_array_equal(by_negative.values("norm"), -by_negative.values())


def test_a_bare_number_takes_the_metric_name(run_dir: Path) -> None:
    result = sweep(run_dir, TARGETS[:2], weight_norm, metric="norm")
    assert result.metric_names == ("norm",)


def test_a_metric_missing_from_the_results_is_an_error(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="metric='acc' is not among the metrics the evaluation returned: loss"):
        sweep(run_dir, TARGETS, lambda sd: {"loss": 1.0}, metric="acc")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.5", "evaluate\\(...\\) is '0.5'; return a number or a dict of numbers"),
        ([1.0, 2.0], "evaluate\\(...\\) is a list"),
        (torch.ones(2), "evaluate\\(...\\) is a Tensor"),
        ({}, "evaluate returned an empty dict"),
        ({"loss": "low"}, "evaluate\\(...\\)\\['loss'\\] is 'low'"),
        (None, "evaluate\\(...\\) is a NoneType"),
    ],
)
def test_evaluate_must_return_numbers(run_dir: Path, value: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        sweep(run_dir, TARGETS[:1], lambda sd: value)


def test_numbers_of_other_types_are_accepted(run_dir: Path) -> None:
    values = iter([np.float32(0.5), torch.tensor(2.0), 3, {"a": np.float64(1.5)}])
    first = sweep(run_dir, TARGETS[:3], lambda sd: next(values))
    assert first.values().tolist() == [0.5, 2.0, 3.0]
    assert sweep(run_dir, TARGETS[:1], lambda sd: next(values)).rows[0].metrics == {"a": 1.5}


def test_an_evaluation_error_is_recorded_and_the_sweep_goes_on(run_dir: Path) -> None:
    def evaluate(state_dict: dict[str, torch.Tensor]) -> float:
        norm = weight_norm(state_dict)
        if len(calls) == 1:
            calls.append(norm)
            raise EvaluationError("out of memory")
        calls.append(norm)
        return norm

    calls: list[float] = []
    result = sweep(run_dir, TARGETS, evaluate)
    assert [r.ok for r in result.rows] == [True, False, True, True]
    assert result.rows[1].failure == "out of memory" and result.rows[1].metrics == {}
    assert math.isnan(result.values()[1])
    assert result.best.ok


def test_other_exceptions_stop_the_sweep(run_dir: Path) -> None:
    def evaluate(state_dict: dict[str, torch.Tensor]) -> float:
        raise KeyError("fc.weight")

    with pytest.raises(KeyError, match=r"fc\.weight"):
        sweep(run_dir, TARGETS, evaluate)


def test_on_row_sees_each_row_as_it_is_done(run_dir: Path) -> None:
    rows: list[SweepRow] = []
    result = sweep(run_dir, TARGETS, weight_norm, on_row=rows.append)
    assert rows == list(result.rows)


def test_repeated_and_empty_targets_are_errors(run_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"sigma_rels repeats sigma_rel=0\.07"):
        sweep(run_dir, [0.07, 0.05, 0.07000000000000001], weight_norm)
    with pytest.raises(ValueError, match="sigma_rels is empty"):
        sweep(run_dir, [], weight_norm)


def test_one_warning_for_all_poor_targets(run_dir: Path) -> None:
    with pytest.warns(PoorReconstructionWarning, match=r"^2 of 3 targets \(sigma_rel 0.005, 0.01\)") as caught:
        result = sweep(run_dir, [0.005, 0.01, 0.07], weight_norm)
    assert len(caught) == 1
    assert [r.predicted_error > 0.05 for r in result.rows] == [True, True, False]


# -- batches -----------------------------------------------------------------------------


def count_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of targets of each streaming pass over the snapshots."""
    passes: list[int] = []
    real_run = sweep_module.run

    def counting_run(the_plan, **kwargs):  # type: ignore[no-untyped-def]
        passes.append(len(the_plan.sigma_rels))
        return real_run(the_plan, **kwargs)

    monkeypatch.setattr(sweep_module, "run", counting_run)
    return passes


def test_plan_subset_is_the_plan_of_its_targets(run_dir: Path) -> None:
    full = plan(run_dir, TARGETS)
    sub = full.subset([3, 1])
    assert sub.sigma_rels == (TARGETS[3], TARGETS[1])
    assert [sub.metadata(0), sub.metadata(1)] == [full.metadata(3), full.metadata(1)]
    np.testing.assert_array_equal(sub.coefficients, full.coefficients[:, [3, 1]])
    for name in ("gammas", "errors", "coefficient_norms", "outside"):
        np.testing.assert_array_equal(getattr(sub, name), getattr(full, name)[[3, 1]])
    assert (sub.step, sub.snapshots) == (full.step, full.snapshots)


def test_target_bytes_from_the_headers(run_dir: Path) -> None:
    the_plan = plan(run_dir, 0.07)
    floats = 6 * 4 + 4 + 4 * 4  # Linear weight and bias; BatchNorm weight, bias, running mean and var
    assert target_bytes(the_plan) == floats * 4 + 8  # float32 sums + the int64 counter
    assert target_bytes(the_plan, "bfloat16") == floats * (4 + 2) + 8


@pytest.mark.parametrize(
    ("options", "passes"),
    [
        ({}, [4]),
        ({"batch_size": 1}, [1, 1, 1, 1]),
        ({"batch_size": 3}, [3, 1]),
        ({"batch_size": 10}, [4]),
        ({"memory_budget": 2 * 184}, [2, 2]),
        ({"memory_budget": 3 * 184 - 1}, [2, 2]),
        ({"memory_budget": 1}, [1, 1, 1, 1]),  # never less than one target per pass
    ],
)
def test_batches_give_the_results_of_one_pass(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, int], passes: list[int]
) -> None:
    seen = count_passes(monkeypatch)
    reference = sweep(run_dir, TARGETS, weight_norm)
    seen.clear()
    batched = sweep(run_dir, TARGETS, weight_norm, **options)
    assert seen == passes
    assert batched.sigma_rels == reference.sigma_rels
    # Float32 matrix products of other shapes may round the last bit differently.
    np.testing.assert_allclose(batched.values(), reference.values(), rtol=1e-6)
    assert [r.predicted_error for r in batched.rows] == [r.predicted_error for r in reference.rows]


@pytest.mark.parametrize(
    "options", [{"batch_size": 0}, {"batch_size": True}, {"memory_budget": 0}, {"memory_budget": 1.5}]
)
def test_bad_batch_options(run_dir: Path, options: dict[str, object]) -> None:
    name, value = next(iter(options.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r} is not a positive"):
        sweep(run_dir, TARGETS, weight_norm, **options)  # type: ignore[arg-type]


# -- files -------------------------------------------------------------------------------


def test_csv_and_json_are_written_and_read_back(run_dir: Path, tmp_path: Path) -> None:
    def evaluate(state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        norm = weight_norm(state_dict)
        if norm == weights[1]:
            raise EvaluationError("crashed\nwith a second line")
        return {"norm": norm, "inf": math.inf}

    weights = [weight_norm(sd) for sd in synthesize_many(run_dir, TARGETS).values()]
    result = sweep(run_dir, TARGETS, evaluate)
    result.to_csv(tmp_path / "r.csv")
    result.to_json(tmp_path / "r.json")
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["sigma_rel", "norm", "inf", "predicted_error", "outside", "failure", "weights"]
    assert [float(r["sigma_rel"]) for r in rows] == list(TARGETS)
    assert float(rows[0]["norm"]) == result.rows[0].metrics["norm"]
    assert rows[0]["inf"] == "inf"
    assert rows[1]["norm"] == "" and rows[1]["failure"] == "crashed\nwith a second line"
    assert [r["outside"] for r in rows] == ["false", "false", "false", "true"]
    data = json.loads((tmp_path / "r.json").read_text())  # strict JSON: no NaN or Infinity
    assert data["format"] == "posthoc-ema/sweep" and data["metric"] == "norm" and data["step"] == LAST
    assert data["rows"][0]["metrics"]["inf"] is None
    back = SweepResult.from_json(tmp_path / "r.json")
    assert back.rows[0].metrics["norm"] == result.rows[0].metrics["norm"]
    assert math.isnan(back.rows[0].metrics["inf"])
    assert [(r.sigma_rel, r.predicted_error, r.outside, r.failure) for r in back.rows] == [
        (r.sigma_rel, r.predicted_error, r.outside, r.failure) for r in result.rows
    ]
    assert (back.metric, back.maximize, back.step, back.tracked_sigma_rels) == (
        result.metric,
        result.maximize,
        result.step,
        result.tracked_sigma_rels,
    )
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "cannot read sweep results"),
        ('{"format": "other"}', "not a posthoc-ema sweep result"),
        ('{"format": "posthoc-ema/sweep", "format_version": 99}', "version 99 is newer"),
        ('{"format": "posthoc-ema/sweep", "format_version": 1, "rows": []}', "malformed sweep result \\(KeyError"),
    ],
)
def test_from_json_rejects_other_files(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        SweepResult.from_json(tmp_path / "r.json")


def test_format_table_marks_the_best_and_the_notes(run_dir: Path) -> None:
    result = sweep(run_dir, TARGETS, weight_norm)
    lines = result.format_table().splitlines()
    assert lines[0].split() == ["sigma_rel", "metric", "predicted_error"]
    best_line = next(line for line in lines if line.startswith("*"))
    assert best_line.split()[1] == f"{result.best.sigma_rel:.4g}"
    assert lines[1].split()[2] == "<0.01%"  # a tracked sigma_rel
    assert lines[-1].endswith("outside tracked range")


# -- external commands ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("0.5", 0.5),
        ("  -3 ", -3.0),
        ("1e-3", 0.001),
        ("nan", math.nan),
        ("-inf", -math.inf),
        ('{"loss": 0.25, "acc": 1}', {"loss": 0.25, "acc": 1.0}),
        ('{"loss": NaN}', {"loss": math.nan}),
    ],
)
def test_parse_metric_line(line: str, value: float | dict[str, float]) -> None:
    parsed = parse_metric_line(line)
    if isinstance(value, dict):
        assert isinstance(parsed, dict)
        assert list(parsed) == list(value)
        np.testing.assert_array_equal(list(parsed.values()), list(value.values()))
    else:
        np.testing.assert_array_equal(parsed, value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("loss: 0.5", "'loss: 0.5' is neither a number nor a JSON object of numbers"),
        ("{}", "'{}' is neither"),
        ("[1, 2]", "neither"),
        ("true", "neither"),
        ('{"loss": "low"}', "the value of 'loss' in .* is not a number"),
        ('{"ok": true}', "the value of 'ok'"),
    ],
)
def test_parse_metric_line_rejects(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_metric_line(line)


@given(st.floats(allow_nan=False), st.dictionaries(st.text(min_size=1), st.floats(allow_nan=False), min_size=1))
def test_parse_metric_line_reads_what_python_prints(number: float, metrics: dict[str, float]) -> None:
    assert parse_metric_line(repr(number)) == number
    assert parse_metric_line(str(number)) == number
    assert parse_metric_line(json.dumps(metrics)) == metrics


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "evaluate.py"
    path.write_text(textwrap.dedent(body))
    return f"{sys.executable} {path} {{weights}}"


def test_run_command_reads_the_last_line(tmp_path: Path) -> None:
    command = script(
        tmp_path,
        """
        import sys
        print("loading", sys.argv[1])
        print('{"loss": 0.5}')
        print()
        """,
    )
    assert run_command(command, tmp_path / "a b.safetensors") == {"loss": 0.5}


def test_run_command_gets_the_path_as_one_argument(tmp_path: Path) -> None:
    command = script(tmp_path, "import sys; print(len(sys.argv[1:]), sys.argv[1] == sys.argv[2])")
    command = command + " --again={weights}"
    with pytest.raises(EvaluationError, match="'2 False' is neither"):
        run_command(command, tmp_path / "with space.safetensors")
    assert run_command(f"{sys.executable} -c 'import sys; print(len(sys.argv))' {{weights}}", "a b") == 2.0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "import sys; print('CUDA out of memory', file=sys.stderr); sys.exit(3)",
            "exited with status 3\nCUDA out of memory$",
        ),
        ("print('done')", "the last line of its stdout is not a metric: 'done' is neither"),
        ("import sys; print('warming up', file=sys.stderr)", "printed nothing on stdout; .*\nwarming up$"),
    ],
)
def test_run_command_failures_carry_stderr(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(EvaluationError, match=message):
        run_command(script(tmp_path, body), "w.safetensors")


def test_run_command_keeps_the_end_of_a_long_stderr(tmp_path: Path) -> None:
    body = "import sys\nfor i in range(100): print('line', i, file=sys.stderr)\nsys.exit(1)"
    with pytest.raises(EvaluationError) as caught:
        run_command(script(tmp_path, body), "w")
    lines = str(caught.value).splitlines()
    assert lines[1:] == [f"line {i}" for i in range(80, 100)]


def test_run_command_timeout(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"timed out after 0\.2 s"):
        run_command(script(tmp_path, "import time; time.sleep(30)"), "w", timeout=0.2)


def test_run_command_missing_program() -> None:
    with pytest.raises(EvaluationError, match="command not found: 'no-such-program-xyz'"):
        run_command("no-such-program-xyz {weights}", "w")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("python eval.py", "has no \\{weights\\} placeholder; write it where the path of the weights goes"),
        ("", "the evaluation command is empty"),
        ("python 'eval.py {weights}", "cannot parse the evaluation command"),
    ],
)
def test_run_command_bad_commands(command: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_command(command, "w")


# -- command_sweep and the CLI ----------------------------------------------------------------------

EVALUATE = """
import json, sys
path = sys.argv[1]
with open(path, "rb") as f:  # the sigma_rel from the file's own metadata, with the stdlib only
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
sigma_rel = float(header["__metadata__"]["sigma_rel"])
with open(sys.argv[2], "a") as log:
    log.write(repr(sigma_rel) + "\\n")
with open(sys.argv[3]) as f:
    failing = f.read().split()
if repr(sigma_rel) in failing:
    print("loading", path, file=sys.stderr)
    print("RuntimeError: CUDA out of memory", file=sys.stderr)
    sys.exit(3)
print("evaluating", path)
print(json.dumps({"loss": (sigma_rel - 0.09) ** 2, "acc": 1 - abs(sigma_rel - 0.1)}))
"""


@pytest.fixture
def evaluator(tmp_path: Path) -> Callable[..., str]:
    """``evaluator(*failing)``: an evaluation command that fails for the sigma_rels given.

    The command is the same whatever fails (the list is in a file), as a resumed sweep requires.
    """
    path = tmp_path / "evaluate.py"
    path.write_text(EVALUATE)

    def command(*failing: float) -> str:
        (tmp_path / "failing.txt").write_text(" ".join(map(repr, failing)))
        return " ".join(
            [sys.executable, str(path), "{weights}", str(tmp_path / "calls.log"), str(tmp_path / "failing.txt")]
        )

    return command


def calls(tmp_path: Path) -> list[float]:
    log = tmp_path / "calls.log"
    return [float(line) for line in log.read_text().split()] if log.exists() else []


def test_command_sweep_writes_weights_and_results(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    out = tmp_path / "sweep"
    result = command_sweep(run_dir, TARGETS, evaluator(), out, metric="acc", maximize=True)
    assert calls(tmp_path) == list(TARGETS)
    assert result.best.sigma_rel == 0.1
    for row in result.rows:
        assert row.weights == str(out / weights_name(row.sigma_rel, LAST))
        assert Path(row.weights).exists()
    assert SweepResult.from_json(out / RESULTS_JSON).rows == result.rows
    assert (out / RESULTS_CSV).read_text().startswith("sigma_rel,loss,acc,predicted_error")


def test_command_sweep_can_delete_the_weights(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    result = command_sweep(run_dir, TARGETS[:2], evaluator(), tmp_path / "out", keep_weights=False)
    assert all(r.weights is None and r.ok for r in result.rows)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [RESULTS_CSV, RESULTS_JSON]


def test_command_sweep_checks_the_program_first(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="program 'no-such-program-xyz' is not found"):
        command_sweep(run_dir, TARGETS, "no-such-program-xyz {weights}", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_sweep(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    out = tmp_path / "sweep"
    stdout, stderr = invoke("sweep", run_dir, "--sigma-rel", "0.05:0.13:0.02", "--eval", evaluator(), "-o", out)
    assert calls(tmp_path) == [0.05, 0.07, 0.09, 0.11, 0.13]
    assert "sigma_rel=0.07  loss=0.0004  acc=0.97  (predicted error " in stdout
    assert f"wrote {out / RESULTS_JSON}, {out / RESULTS_CSV}" in stdout
    assert "best: sigma_rel=0.09 (lowest loss=0)" in stdout
    assert f"wrote {out / 'sweep.png'}" in stdout or "no plot:" in stdout
    assert stderr == ""
    data = json.loads((out / RESULTS_JSON).read_text())
    assert data["metric"] == "loss" and data["maximize"] is False
    assert [r["sigma_rel"] for r in data["rows"]] == [0.05, 0.07, 0.09, 0.11, 0.13]
    assert sorted(p.name for p in out.glob("ema-*")) == [
        f"ema-{s}-{LAST}.safetensors" for s in (0.05, 0.07, 0.09, 0.11, 0.13)
    ]


def test_cli_sweep_metric_and_direction(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    out = tmp_path / "sweep"
    stdout, _ = invoke(
        "sweep", run_dir, "-s", "0.05", "-s", "0.1", "-e", evaluator(), "--metric", "acc", "--maximize", "-o", out
    )
    assert "best: sigma_rel=0.1 (highest acc=1)" in stdout
    data = json.loads((out / RESULTS_JSON).read_text())
    assert data["metric"] == "acc" and data["maximize"] is True


def test_cli_sweep_reports_a_failure_and_keeps_the_others(
    run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]
) -> None:
    out = tmp_path / "sweep"
    stdout, stderr = invoke("sweep", run_dir, "-s", "0.05:0.13:0.02", "-e", evaluator(0.07), "-o", out, code=1)
    assert calls(tmp_path) == [0.05, 0.07, 0.09, 0.11, 0.13]
    assert f"failed: sigma_rel=0.07: {sys.executable}" in stderr
    assert "exited with status 3\n    loading" in stderr
    assert "    RuntimeError: CUDA out of memory\n" in stderr
    assert stderr.endswith(
        "error: 1 of 5 evaluations failed (sigma_rel 0.07); run the same command again to retry them\n"
    )
    assert "best: sigma_rel=0.09" in stdout
    rows = {r.sigma_rel: r for r in SweepResult.from_json(out / RESULTS_JSON).rows}
    assert [s for s, r in rows.items() if r.ok] == [0.05, 0.09, 0.11, 0.13]
    assert "CUDA out of memory" in (rows[0.07].failure or "")


def test_cli_sweep_resumes(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    out = tmp_path / "sweep"
    invoke("sweep", run_dir, "-s", "0.05:0.09:0.02", "-e", evaluator(0.07), "-o", out, code=1)
    first = SweepResult.from_json(out / RESULTS_JSON)
    assert calls(tmp_path) == [0.05, 0.07, 0.09]
    # Again, with a wider range and the evaluation fixed: only the failed and the new targets run.
    stdout, _ = invoke("sweep", run_dir, "-s", "0.05:0.13:0.02", "-e", evaluator(), "-o", out)
    assert stdout.startswith(f"{out / RESULTS_JSON}: 2 of 5 targets already evaluated; skipping them\n")
    assert calls(tmp_path)[3:] == [0.07, 0.11, 0.13]
    result = SweepResult.from_json(out / RESULTS_JSON)
    assert result.sigma_rels == (0.05, 0.07, 0.09, 0.11, 0.13)
    assert all(r.ok for r in result.rows)
    kept = {r.sigma_rel: r for r in first.rows}
    assert result.rows[0] == kept[0.05] and result.rows[2] == kept[0.09]
    # A third time, nothing is left to do.
    stdout, _ = invoke("sweep", run_dir, "-s", "0.05:0.13:0.02", "-e", evaluator(), "-o", out)
    assert "5 of 5 targets already evaluated" in stdout
    assert len(calls(tmp_path)) == 6


def test_cli_sweep_saves_after_every_target(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    out = tmp_path / "sweep"
    seen: list[int] = []

    def on_row(row: SweepRow) -> None:
        seen.append(len(SweepResult.from_json(out / RESULTS_JSON).rows))

    command_sweep(run_dir, TARGETS, evaluator(), out, on_row=on_row)
    assert seen == [1, 2, 3, 4]


def test_cli_sweep_refuses_results_of_another_step(
    run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]
) -> None:
    out = tmp_path / "sweep"
    invoke("sweep", run_dir, "-s", "0.07", "-e", evaluator(), "-o", out)
    _, stderr = invoke("sweep", run_dir, "-s", "0.07", "-e", evaluator(), "-o", out, "--step", "200", code=1)
    assert stderr == (
        f"error: {out / RESULTS_JSON} holds results synthesized at step {LAST}, the snapshots now give step 200; "
        "choose another output folder or remove it to start afresh\n"
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-s", "0.07", "-e", "python eval.py"], 1, "error: the evaluation command 'python eval.py' has no {weights}"),
        (["-s", "0.07", "-e", "no-such-program-xyz {weights}"], 1, "error: the evaluation command's program"),
        (["-s", "0.5", "-e", "EVAL"], 1, "error: sigma_rel=0.5 is outside (0, 0.28867513459481287)"),
        (["-s", "0.1:0.05:0.01", "-e", "EVAL"], 2, "the range is empty"),
        (["-s", "0.07"], 2, "Missing option '--eval'"),
        (["-s", "0.07", "-e", "EVAL", "--timeout", "0"], 1, "error: timeout=0.0 is not a positive number of seconds"),
        (["-e", "EVAL"], 2, "Missing option '--sigma-rel'"),
    ],
)
def test_cli_sweep_errors(
    run_dir: Path, tmp_path: Path, evaluator: Callable[..., str], args: list[str], code: int, message: str
) -> None:
    args = [evaluator() if a == "EVAL" else a for a in args]
    _, stderr = invoke("sweep", run_dir, *args, "-o", tmp_path / "out", code=code)
    assert message in " ".join(stderr.replace("│", " ").split())
    if code == 1:
        assert len(stderr.splitlines()) == 1


def test_cli_sweep_a_missing_folder(tmp_path: Path, evaluator: Callable[..., str]) -> None:
    _, stderr = invoke("sweep", tmp_path / "nope", "-s", "0.1", "-e", evaluator(), "-o", tmp_path / "o", code=1)
    assert stderr == f"error: {tmp_path / 'nope'}: no such snapshot folder\n"


def test_cli_sweep_warns_about_poor_targets_in_one_line(
    run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]
) -> None:
    _, stderr = invoke("sweep", run_dir, "-s", "0.005", "-s", "0.07", "-e", evaluator(), "-o", tmp_path / "o")
    assert stderr.startswith("warning: 1 of 2 targets (sigma_rel 0.005) have a predicted relative error above 5%")
    assert len(stderr.splitlines()) == 1


# -- the layout: one job per module --------------------------------------------------------


def test_the_sweep_modules_split_along_their_seams() -> None:
    import posthoc_ema.commands as commands
    import posthoc_ema.results as results

    for name in ("SweepResult", "SweepRow", "RESULTS_JSON", "RESULTS_CSV", "DEFAULT_METRIC"):
        assert getattr(sweep_module, name) is getattr(results, name)
    for name in ("run_command", "command_sweep", "parse_metric_line", "weights_name"):
        assert getattr(sweep_module, name) is getattr(commands, name)
    source = Path(sweep_module.__file__).read_text()
    assert "import subprocess" not in source and "import csv" not in source and "import json" not in source
    assert "subprocess" not in Path(results.__file__).read_text()


@pytest.mark.parametrize("module", ["posthoc_ema.commands", "posthoc_ema.results", "posthoc_ema.sweeps"])
def test_each_sweep_module_imports_first(module: str) -> None:
    code = f"import {module}; from posthoc_ema.sweeps import command_sweep, SweepResult; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout == "ok\n", done.stderr


# -- evaluations that misbehave: no hang, nothing left running, nothing lost ------------------


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for a reaper has ended too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_timeout_kills_what_the_evaluation_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "sleep.pid"
    command = "sh -c 'sleep 60 & echo $! > \"$1\"; wait' sh {weights}"
    with pytest.raises(EvaluationError, match=r"timed out after 3\.0 s"):
        run_command(command, pid_file, timeout=3.0)  # ample time for sh to start sleep and write its pid
    pid = int(pid_file.read_text())
    for _ in range(100):  # SIGKILL is delivered at once; allow the scheduler up to 10 s
        if gone(pid):
            break
        time.sleep(0.1)
    survived = not gone(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    assert not survived, "the background sleep outlived its evaluation"


def test_an_evaluation_reads_no_stdin(tmp_path: Path) -> None:
    # A pipe nobody writes to as our stdin: an evaluation that inherited it would wait for input.
    read_end, write_end = os.pipe()
    saved = os.dup(0)
    os.dup2(read_end, 0)
    try:
        with pytest.raises(EvaluationError, match=r"exited with status 1\n(.|\n)*EOFError"):
            run_command(script(tmp_path, "input()\nprint(1.0)"), "w", timeout=30)
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)


def test_an_evaluation_may_print_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    body = "import sys; sys.stdout.buffer.write(b'caf\\xe9 \\xff\\n0.25\\n'); sys.stderr.buffer.write(b'\\xfe')"
    assert run_command(script(tmp_path, body), "w") == 0.25
    failing = "import sys; sys.stderr.buffer.write(b'bad \\xff byte'); sys.exit(2)"
    with pytest.raises(EvaluationError, match=r"exited with status 2\nbad \ufffd byte$"):
        run_command(script(tmp_path, failing), "w")


def test_a_nan_metric_is_a_failed_row_retried_on_resume(run_dir: Path, tmp_path: Path) -> None:
    flag = tmp_path / "nan"
    flag.write_text("")
    body = f"""
        import os, json
        print(json.dumps({{"loss": float("nan") if os.path.exists({str(flag)!r}) else 0.5, "acc": 0.9}}))
    """
    out = tmp_path / "out"
    first = command_sweep(run_dir, [0.07], script(tmp_path, body), out)
    assert not first.rows[0].ok and first.rows[0].failure == "the evaluation gave NaN for 'loss'"
    flag.unlink()
    again = command_sweep(run_dir, [0.07], script(tmp_path, body), out)
    assert again.rows[0].ok and again.rows[0].metrics == {"loss": 0.5, "acc": 0.9}


def test_the_in_process_sweep_fails_nan_rows(run_dir: Path) -> None:
    result = sweep(run_dir, [0.05, 0.07], lambda sd: math.nan if weight_norm(sd) > 0 else 1.0)
    assert [r.ok for r in result.rows] == [False, False]
    assert all(r.failure == "the evaluation gave NaN for 'metric'" for r in result.rows)


def test_a_missing_metric_keeps_the_first_evaluation(
    run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]
) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match="metric='nosuch' is not among the metrics the evaluation returned: loss, acc"):
        command_sweep(run_dir, [0.05, 0.07], evaluator(), out, metric="nosuch")
    assert calls(tmp_path) == [0.05]
    kept = SweepResult.from_json(out / RESULTS_JSON)
    assert [r.sigma_rel for r in kept.rows] == [0.05] and kept.rows[0].ok
    # With the missing metric again, the error comes before any evaluation.
    with pytest.raises(ValueError, match="metric='nosuch' is not among the metrics of its results: acc, loss"):
        command_sweep(run_dir, [0.05, 0.07], evaluator(), out, metric="nosuch")
    assert calls(tmp_path) == [0.05]
    # Resumed with a metric it has, the first evaluation is not run again.
    result = command_sweep(run_dir, [0.05, 0.07], evaluator(), out, metric="loss")
    assert calls(tmp_path) == [0.05, 0.07]
    assert result.metric == "loss" and len(result.rows) == 2
    with pytest.raises(ValueError, match="holds results ranked by metric 'loss', not 'nosuch'"):
        command_sweep(run_dir, [0.05, 0.07], evaluator(), out, metric="nosuch")


def test_cli_sweep_with_a_missing_metric(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    out = tmp_path / "sweep"
    _, stderr = invoke("sweep", run_dir, "-s", "0.07", "-e", evaluator(), "--metric", "nosuch", "-o", out, code=1)
    assert stderr.endswith("error: metric='nosuch' is not among the metrics the evaluation returned: loss, acc\n")
    assert SweepResult.from_json(out / RESULTS_JSON).rows[0].metrics.keys() == {"loss", "acc"}


def test_results_carry_a_fingerprint(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    out = tmp_path / "sweep"
    command_sweep(run_dir, [0.07], evaluator(), out, metric="loss")
    data = json.loads((out / RESULTS_JSON).read_text())
    assert data["fingerprint"] == {
        "snapshot_dir": str(run_dir.resolve()),
        "run_ids": sorted({i.run_id for i in list_snapshots(run_dir) if i.run_id is not None}),
        "command": evaluator(),
        "metric": "loss",
        "classic_basis": False,
    }
    assert SweepResult.from_json(out / RESULTS_JSON).fingerprint == data["fingerprint"]


def test_resuming_refuses_another_folder_command_or_metric(
    run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]
) -> None:
    out = tmp_path / "sweep"
    command_sweep(run_dir, [0.07], evaluator(), out, metric="loss")
    other = Path(shutil.copytree(run_dir, tmp_path / "other"))
    with pytest.raises(ValueError, match=f"holds results of the snapshots in {re.escape(str(run_dir.resolve()))}"):
        command_sweep(other, [0.07], evaluator(), out)
    with pytest.raises(
        ValueError, match=r"holds results of the evaluation command .*, not of \"sh -c 'echo 1' \{weights\}\""
    ):
        command_sweep(run_dir, [0.07], "sh -c 'echo 1' {weights}", out)
    with pytest.raises(ValueError, match="holds results ranked by metric 'loss', not 'acc'; pass metric='loss'"):
        command_sweep(run_dir, [0.07], evaluator(), out, metric="acc")
    assert calls(tmp_path) == [0.07]
    # The same folder, command and metric (or none) resume.
    assert command_sweep(run_dir, [0.07], evaluator(), out).metric == "loss"
    assert calls(tmp_path) == [0.07]


def test_cli_sweep_refuses_to_mix_two_folders(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    out = tmp_path / "sweep"
    invoke("sweep", run_dir, "-s", "0.07", "-e", evaluator(), "-o", out)
    other = Path(shutil.copytree(run_dir, tmp_path / "other"))
    stdout, stderr = invoke("sweep", other, "-s", "0.07", "-e", evaluator(), "-o", out, code=1)
    assert "already evaluated" not in stdout
    assert stderr.startswith(f"error: {out / RESULTS_JSON} holds results of the snapshots in {run_dir.resolve()}")
    assert len(stderr.splitlines()) == 1


def test_numpy_scalars_are_accepted(run_dir: Path, tmp_path: Path, evaluator: Callable[..., str]) -> None:
    result = command_sweep(run_dir, np.array([0.07]), evaluator(), tmp_path / "out", step=np.int64(LAST))
    assert result.step == LAST and result.rows[0].ok
    assert weights_name(np.float64(0.07), np.int64(LAST)) == f"ema-0.07-{LAST}.safetensors"
    row = SweepRow(
        sigma_rel=np.float64(0.1),
        predicted_error=np.float32(0.01),
        outside=np.bool_(False),
        metrics={"m": np.float32(2)},
    )
    table = SweepResult(
        rows=(row,), metric="m", maximize=False, step=np.int64(7), tracked_sigma_rels=(np.float64(0.05),)
    )
    table.to_json(tmp_path / "r.json")
    table.to_csv(tmp_path / "r.csv")
    back = SweepResult.from_json(tmp_path / "r.json")
    assert back.step == 7 and back.rows[0].sigma_rel == 0.1 and back.rows[0].metrics == {"m": 2.0}
    assert (tmp_path / "r.csv").read_text().splitlines()[1].startswith("0.1,2.0,")


def test_a_sweep_refuses_the_snapshot_folder_as_output(run_dir: Path, evaluator: Callable[..., str]) -> None:
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ValueError, match=r"the output folder .* is the snapshot folder; choose another one"):
        command_sweep(run_dir, [0.07], evaluator(), run_dir / ".")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_failed_sweep_leaves_no_empty_folder(
    run_dir: Path, tmp_path: Path, evaluator: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_run(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sweep_module, "run", broken_run)
    with pytest.raises(OSError, match="No space left"):
        command_sweep(run_dir, [0.07], evaluator(), tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    _, stderr = invoke("sweep", run_dir, "-s", "0.07", "-e", evaluator(), "-o", tmp_path / "c", code=1)
    assert stderr == "error: No space left on device\n"
    assert not (tmp_path / "c").exists()


def test_cli_sweep_checks_the_device_first(
    run_dir: Path, tmp_path: Path, evaluator: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, stderr = invoke(
        "sweep", run_dir, "-s", "0.07", "-e", evaluator(), "--device", "cuda", "-o", tmp_path / "o", code=1
    )
    assert stderr == "error: --device cuda: no CUDA device is available to PyTorch\n"
    assert not (tmp_path / "o").exists() and calls(tmp_path) == []
