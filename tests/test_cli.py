"""The ``posthoc-ema`` command line: every command and option, and every way to get it wrong."""

from __future__ import annotations

import decimal
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import torch
import typer
from helpers import invoke, make_model, random_walk_run, write_snapshot
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import posthoc_ema.files as snapshots_module
import posthoc_ema.synthesis as synthesize_module
from posthoc_ema import cli, sigma_rel_to_gamma
from posthoc_ema._version import __version__
from posthoc_ema.snapshots import SnapshotInfo, list_snapshots, read_info, snapshot_name, write_atomic
from posthoc_ema.synthesis import plan, save, synthesize, synthesize_many

LAST, MID, EVERY = 600, 300, 50


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshots of sigma_rel 0.05 and 0.1 every 50 steps up to step 600, of a model that random-walks."""
    return random_walk_run(tmp_path_factory.mktemp("ckpts"), steps=LAST, every=EVERY)


@pytest.fixture
def copy_of_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "ckpts"))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "work"
    out.mkdir()
    monkeypatch.chdir(out)
    return out


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def usage_error(stderr: str) -> str:
    """The message of a usage error, unwrapped from typer's box."""
    return " ".join(stderr.replace("│", " ").split())


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not a mapping)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- synthesize ------------------------------------------------------------------------


def test_one_target_default_name_loads_strictly_with_metadata(run_dir: Path, in_tmp: Path) -> None:
    stdout, stderr = invoke("synthesize", run_dir, "--sigma-rel", "0.07")
    assert stderr == ""
    name = f"ema-0.07-{LAST}.safetensors"
    assert files(in_tmp) == [name]
    tensors, meta = read(in_tmp / name)
    make_model().load_state_dict(tensors, strict=True)
    assert same(tensors, synthesize(run_dir, 0.07))
    p = plan(run_dir, [0.07])
    assert meta["format"] == "posthoc-ema/synthesized"
    assert float(meta["sigma_rel"]) == 0.07
    assert float(meta["gamma"]) == float(sigma_rel_to_gamma(0.07))
    assert int(meta["step"]) == LAST
    assert float(meta["predicted_error"]) == float(p.errors[0])
    assert meta["library_version"] == __version__
    assert meta["dtype"] == "float32"
    lines = stdout.splitlines()
    assert lines[0] == f"reconstructing step {LAST} from 24 snapshots (steps 50..{LAST}, sigma_rels 0.05, 0.1)"
    assert lines[1].split() == ["sigma_rel", "gamma", "predicted", "error", "float32", "rounding", "coef", "norm"]
    numbers = [f"{p.gammas[0]:.4g}", f"{p.errors[0]:.2%}", "<0.01%", f"{p.coefficient_norms[0]:.4g}"]
    assert lines[2].split() == ["0.07", *numbers]
    assert lines[-1] == f"wrote {name}"


def test_output_file_in_a_new_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "ema.safetensors"
    invoke("synthesize", run_dir, "-s", "0.15", "-o", out)
    tensors, meta = read(out)
    assert float(meta["sigma_rel"]) == 0.15
    assert same(tensors, synthesize(run_dir, 0.15))


def test_one_target_into_an_existing_folder(run_dir: Path, tmp_path: Path) -> None:
    invoke("synthesize", run_dir, "-s", "0.1", "-o", tmp_path)
    assert (tmp_path / f"ema-0.1-{LAST}.safetensors").is_file()


def test_several_targets_write_one_file_each(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "emas"
    stdout, _ = invoke("synthesize", run_dir, "-s", "0.15", "-s", "0.07", "--sigma-rel", "0.1", "-o", out)
    assert files(out) == [f"ema-{s}-{LAST}.safetensors" for s in ("0.07", "0.1", "0.15")]
    expected = synthesize_many(run_dir, [0.15, 0.07, 0.1])
    for sigma_rel, sd in expected.items():
        tensors, meta = read(out / f"ema-{sigma_rel}-{LAST}.safetensors")
        assert same(tensors, sd)
        assert float(meta["sigma_rel"]) == sigma_rel
    assert [line.split()[0] for line in stdout.splitlines()[2:5]] == ["0.15", "0.07", "0.1"]  # in the order given


def test_several_targets_default_to_the_current_folder(run_dir: Path, in_tmp: Path) -> None:
    invoke("synthesize", run_dir, "-s", "0.06:0.08:0.01")
    assert files(in_tmp) == [f"ema-0.0{i}-{LAST}.safetensors" for i in (6, 7, 8)]


def test_range_names_carry_no_float_noise(run_dir: Path, tmp_path: Path) -> None:
    invoke("synthesize", run_dir, "-s", "0.05:0.1:0.01", "-s", "0.1", "-o", tmp_path)
    assert files(tmp_path) == sorted(
        f"ema-{s}-{LAST}.safetensors" for s in ("0.05", "0.06", "0.07", "0.08", "0.09", "0.1")
    )


def test_step_option(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mid.safetensors"
    stdout, _ = invoke("synthesize", run_dir, "-s", "0.07", "--step", MID, "-o", out)
    tensors, meta = read(out)
    assert int(meta["step"]) == MID
    assert int(tensors["1.num_batches_tracked"]) == MID
    assert same(tensors, synthesize(run_dir, 0.07, step=MID))
    assert stdout.startswith(f"reconstructing step {MID} from 12 snapshots (steps 50..{MID}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_option(run_dir: Path, tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "ema.safetensors"
    invoke("synthesize", run_dir, "-s", "0.07", "--dtype", dtype, "-o", out)
    tensors, meta = read(out)
    assert meta["dtype"] == dtype
    assert tensors["0.weight"].dtype == getattr(torch, dtype)
    assert tensors["1.num_batches_tracked"].dtype == torch.int64
    assert same(tensors, synthesize(run_dir, 0.07, dtype=dtype))


def test_device_cpu(run_dir: Path, tmp_path: Path) -> None:
    invoke("synthesize", run_dir, "-s", "0.07", "--device", "cpu", "-o", tmp_path / "ema.safetensors")
    assert same(read(tmp_path / "ema.safetensors")[0], synthesize(run_dir, 0.07))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_device_cuda_without_a_gpu(run_dir: Path, tmp_path: Path) -> None:
    _, stderr = invoke(
        "synthesize", run_dir, "-s", "0.07", "--device", "cuda", "-o", tmp_path / "x.safetensors", code=1
    )
    assert one_error_line(stderr) == "error: --device cuda: no CUDA device is available to PyTorch"
    assert files(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda(run_dir: Path, tmp_path: Path) -> None:
    invoke("synthesize", run_dir, "-s", "0.07", "--device", "cuda", "-o", tmp_path / "ema.safetensors")
    tensors, _ = read(tmp_path / "ema.safetensors")
    expected = synthesize(run_dir, 0.07)
    assert all(torch.allclose(tensors[k].float(), expected[k].float(), rtol=1e-5, atol=1e-6) for k in expected)


def test_dry_run_prints_the_plan_and_reads_no_tensor(
    run_dir: Path, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("--dry-run read tensor data")

    monkeypatch.setattr(cli, "run", forbidden)
    monkeypatch.setattr(synthesize_module, "safe_open", forbidden)
    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    for name in ("pread", "preadv"):
        monkeypatch.setattr(os, name, forbidden, raising=False)
    stdout, stderr = invoke("synthesize", run_dir, "-s", "0.07", "-s", "0.2", "--dry-run")
    assert files(in_tmp) == []
    assert stderr == ""
    p = plan(run_dir, [0.07, 0.2])
    lines = stdout.splitlines()
    numbers = [f"{p.gammas[1]:.4g}", f"{p.errors[1]:.2%}", "<0.01%", f"{p.coefficient_norms[1]:.4g}"]
    assert lines[3].split() == ["0.2", *numbers, "outside", "the", "tracked", "range"]
    table = lines[lines.index("coefficients (a column per target, summing to 1; a row per snapshot):") + 1 :]
    assert table[0].split() == ["step", "sigma_rel", "0.07", "0.2"]
    assert len(table) == 1 + len(p.snapshots)
    for row, snap, coef in zip(table[1:], p.snapshots, p.coefficients, strict=True):
        step, sigma_rel, *values = row.split()
        assert (int(step), float(sigma_rel)) == (snap.step, snap.sigma_rel)
        assert [float(v) for v in values] == pytest.approx(list(coef), abs=1e-6)


def test_poor_reconstruction_is_a_warning_line(run_dir: Path, tmp_path: Path) -> None:
    stdout, stderr = invoke("synthesize", run_dir, "-s", "0.07", "-s", "0.27", "-o", tmp_path)
    lines = stderr.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"warning: 1 of 2 targets \(sigma_rel 0.27\) have a predicted relative error above 5% \(\d+\.\d\d%\): .*",
        lines[0],
    )
    assert "outside the tracked range, POOR" in stdout
    assert len(files(tmp_path)) == 2  # a warning, not an error


def test_progress_callback_is_wired(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real_run = cli.run

    def recording_run(*args: object, progress: Callable[[int, int], None], **kwargs: object) -> object:
        def spy(done: int, total: int) -> None:
            calls.append((done, total))
            progress(done, total)

        return real_run(*args, progress=spy, **kwargs)

    monkeypatch.setattr(cli, "run", recording_run)
    monkeypatch.setattr(cli, "_interactive", lambda: True)  # draw the bar although the runner is no terminal
    invoke("synthesize", run_dir, "-s", "0.07", "-o", tmp_path / "ema.safetensors")
    assert calls
    assert calls[-1][0] == calls[-1][1]


def test_write_failure_leaves_no_file(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(tensors: object, path: Path, metadata: object = None) -> None:
        Path(path).write_bytes(b"half of a file")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(snapshots_module, "write_safetensors", disk_full)
    out = tmp_path / "out"
    _, stderr = invoke("synthesize", run_dir, "-s", "0.07", "-o", out / "ema.safetensors", code=1)
    # The error names the file asked for, not its temporary name, and the folder made for it is gone.
    assert one_error_line(stderr) == f"error: {out / 'ema.safetensors'}: No space left on device"
    assert not out.exists()


# -- bad input ---------------------------------------------------------------------------


def _truncate(folder: Path) -> str:
    path = folder / snapshot_name(300, 0.1)
    path.write_bytes(path.read_bytes()[:-10])
    return rf"error: {re.escape(str(path))}: truncated or corrupt: the header describes \d+ bytes, the file has \d+"


def _corrupt_header(folder: Path) -> str:
    path = folder / snapshot_name(200, 0.05)
    path.write_bytes((9).to_bytes(8, "little") + b"{not json")
    return rf"error: {re.escape(str(path))}: unreadable safetensors header \(.*\)"


def _other_names(folder: Path) -> str:
    write_snapshot(folder, LAST + 100, 0.05, {"w": torch.zeros(2)})
    return r"error: .*: tensor names differ \(e\.g\. '0\.bias'\)"


def _other_shapes(folder: Path) -> str:
    tensors, _ = read(folder / snapshot_name(LAST, 0.05))
    tensors["0.weight"] = torch.zeros(2, 2)
    write_snapshot(folder, LAST + 100, 0.1, tensors)
    return r"error: .*: tensor '0\.weight' has shape \(2, 2\), not \(4, 6\)"


def _two_runs(folder: Path) -> str:
    tensors, _ = read(folder / snapshot_name(MID, 0.1))
    write_snapshot(folder, MID, 0.1, tensors, name="run2.safetensors")
    return r"error: .* are both snapshots of sigma_rel=0\.1 at step 300; is the folder mixing two runs\?"


def _empty(folder: Path) -> str:
    for p in folder.iterdir():
        p.unlink()
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    return r"error: .*ckpts: no snapshots \(no \.safetensors file with posthoc-ema snapshot metadata\)"


def _missing(folder: Path) -> str:
    shutil.rmtree(folder)
    return r"error: .*ckpts: no such snapshot folder"


@pytest.mark.parametrize(
    "breaker", [_truncate, _corrupt_header, _other_names, _other_shapes, _two_runs, _empty, _missing]
)
@pytest.mark.parametrize("command", ["synthesize", "info"])
def test_broken_folders(copy_of_run: Path, tmp_path: Path, breaker: Callable[[Path], str], command: str) -> None:
    message = breaker(copy_of_run)
    out = tmp_path / "out"
    if command == "synthesize":
        _, stderr = invoke("synthesize", copy_of_run, "-s", "0.07", "-s", "0.08", "-o", out, code=1)
        assert re.fullmatch(message, one_error_line(stderr))
        assert not out.exists()
    elif breaker in (_empty, _missing):
        _, stderr = invoke("info", copy_of_run, code=1)
        assert re.fullmatch(message, one_error_line(stderr))
    else:  # info reports what synthesize refuses, and exits 0
        stdout, stderr = invoke("info", copy_of_run)
        assert stderr == ""
        assert "oddities      none" not in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-s", "0.3"],
            r"error: sigma_rel=0\.3 is outside \(0, 0\.2886751\d+\); sigma_rel must be > 0 and below sqrt\(1/12\).*",
        ),
        (["-s", "0.2:0.3:0.05"], r"error: sigma_rel=0\.3 is outside \(0, 0\.2886751\d+\).*"),
        (["-s", "0.07", "--step", "275"], r"error: step=275 is not a snapshot step; the nearest are 250, 300 .*"),
        (["-s", "0.07", "--step", "1"], r"error: step=1 is not a snapshot step; the nearest are 50, 100 .*"),
        (["-s", "0.07", "--step", "601"], r"error: step=601 is after the last snapshot \(step 600\)"),
    ],
)
def test_bad_values_exit_1(run_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    _, stderr = invoke("synthesize", run_dir, *args, "-o", tmp_path / "out", code=1)
    assert re.fullmatch(message, one_error_line(stderr))
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-s", "abc"], "Invalid value for '--sigma-rel' / '-s': 'abc' is not a number or a range START:STOP:STEP"),
        (["-s", "0.1:0.2"], "'0.1:0.2' is not a number or a range START:STOP:STEP (e.g. 0.05:0.25:0.01)"),
        (["-s", "0.1:0.2:0.05:1"], "'0.1:0.2:0.05:1' is not a number or a range"),
        (["-s", "0.2:0.1:0.01"], "'0.2:0.1:0.01': the range is empty (STOP is below START)"),
        (["-s", "0.1:0.2:0"], "'0.1:0.2:0': the step of a range must be positive"),
        (["-s", "0.1:0.2:-0.01"], "'0.1:0.2:-0.01': the step of a range must be positive"),
        (["-s", "0.01:0.2:1e-9"], "'0.01:0.2:1e-9' gives 190000001 targets; at most 10000 are allowed"),
        (["-s", "nan"], "'nan' is not a finite number"),
        (["-s", "0.1:inf:0.1"], "'0.1:inf:0.1' is not a finite number"),
        (["-s", ""], "'' is not a number or a range"),
        ([], "Missing option '--sigma-rel' / '-s'"),
        (["-s", "0.1", "--step", "0"], "Invalid value for '--step'"),  # typer words the rest its own way
        (["-s", "0.1", "--step", "x"], "Invalid value for '--step'"),
        (["-s", "0.1", "--dtype", "int8"], "Invalid value for '--dtype'"),
        (["-s", "0.1", "--device", "tpu"], "Invalid value for '--device'"),
        (["-s", "0.1", "--bogus"], "No such option: --bogus"),
    ],
)
def test_bad_usage_exits_2(run_dir: Path, in_tmp: Path, args: list[str], message: str) -> None:
    _, stderr = invoke("synthesize", run_dir, *args, code=2)
    assert message in usage_error(stderr)
    assert files(in_tmp) == []


def test_several_targets_into_a_file(run_dir: Path, tmp_path: Path) -> None:
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"mine")
    stdout, stderr = invoke("synthesize", run_dir, "-s", "0.07", "-s", "0.1", "-o", existing, code=2)
    assert "is a file; with 2 targets -o must be a folder (one file per target)" in usage_error(stderr)
    assert stdout == ""  # refused before any work
    assert existing.read_bytes() == b"mine"


def test_missing_arguments(in_tmp: Path) -> None:
    _, stderr = invoke("synthesize", code=2)
    assert "Missing argument 'CKPT_DIR'" in usage_error(stderr)
    _, stderr = invoke("info", code=2)
    assert "Missing argument 'CKPT_DIR'" in usage_error(stderr)
    _, stderr = invoke("frobnicate", code=2)
    assert "No such command 'frobnicate'" in usage_error(stderr)


# -- --sigma-rel ranges -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["0.05:0.25:0.01"], [float(f"0.{i:02d}") for i in range(5, 26)]),
        (["0.1:0.3:0.1"], [0.1, 0.2, 0.3]),  # a float arange gives 0.30000000000000004, or stops at 0.2
        (["0.05:0.1:0.02"], [0.05, 0.07, 0.09]),  # STOP off the grid
        (["0.1:0.1:0.05"], [0.1]),
        (["1e-2:3e-2:1e-2"], [0.01, 0.02, 0.03]),
        (["0.7:0.9:0.1"], [0.7, 0.8, 0.9]),
        ([" 0.15 ", ".2"], [0.15, 0.2]),
        (["0.1", "0.05:0.15:0.05", "0.05"], [0.1, 0.05, 0.15]),  # repeats kept once, first place
        (["0.3"], [0.3]),  # validity is the library's to judge
        ([], []),
    ],
)
def test_parse_sigma_rels(values: list[str], expected: list[float]) -> None:
    assert cli.parse_sigma_rels(values) == expected


@given(
    start=st.integers(1, 10_000),
    step=st.integers(1, 500),
    count=st.integers(1, 60),
    overshoot=st.integers(0, 499),
    digits=st.integers(0, 6),
)
def test_parse_range_property(start: int, step: int, count: int, overshoot: int, digits: int) -> None:
    # START:STOP:STEP as a user types it, with STOP somewhere in [last point, next point).
    overshoot %= step
    as_text = [str(decimal.Decimal(n).scaleb(-digits)) for n in (start, start + (count - 1) * step + overshoot, step)]
    got = cli.parse_sigma_rels([":".join(as_text)])
    assert got == [float(decimal.Decimal(start + k * step).scaleb(-digits)) for k in range(count)]


# -- info -----------------------------------------------------------------------------------


def test_info_text(run_dir: Path) -> None:
    stdout, stderr = invoke("info", run_dir)
    assert stderr == ""
    size = sum(p.stat().st_size for p in run_dir.iterdir())
    n_values = sum(t.numel() for t in make_model().state_dict().values() if t.is_floating_point())
    rows = dict(line.split("  ", 1) for line in stdout.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["folder"] == str(run_dir)
    assert rows["snapshots"] == f"24 files, {size / 1024:.1f} KiB ({size // 24} B each)"
    assert rows["steps"] == f"50 .. {LAST}: 12 steps, every 50"
    assert rows["sigma_rels"] == "0.05 (12), 0.1 (12)"
    assert rows["stored dtype"] == "float32"
    assert rows["tensors"] == f"7 ({n_values} floating values averaged)"
    assert rows["update_every"] == "1"
    assert rows["written by"] == f"posthoc-ema {__version__}"
    assert rows["oddities"] == "none"


def test_info_json(run_dir: Path) -> None:
    stdout, _ = invoke("info", run_dir, "--json")
    summary = json.loads(stdout)
    n_values = sum(t.numel() for t in make_model().state_dict().values() if t.is_floating_point())
    assert summary == {
        "folder": str(run_dir),
        "snapshots": 24,
        "size_bytes": sum(p.stat().st_size for p in run_dir.iterdir()),
        "steps": {"first": 50, "last": LAST, "count": 12, "spacing": 50},
        "sigma_rels": {"0.05": 12, "0.1": 12},
        "dtypes": {"float32": 24},
        "update_every": {"1": 24},
        "library_versions": {__version__: 24},
        "runs": {run: 24 for run in {i.run_id for i in list_snapshots(run_dir)}},
        "tensors": 7,
        "parameters": n_values,
        "layout": {"sharded": False},
        "files": [
            {
                "file": i.path.name,
                "step": i.step,
                "sigma_rel": i.sigma_rel,
                "dtype": "float32",
                "size": i.path.stat().st_size,
                "run": i.run_id,
            }
            for i in list_snapshots(run_dir)
        ],
        "other_files": [],
        "tmp_files": [],
        "corrupt_files": [],
        "oddities": [],
    }


def test_info_reports_oddities(copy_of_run: Path) -> None:
    folder = copy_of_run
    (folder / snapshot_name(400, 0.1)).unlink()  # a step missing a sigma_rel
    tensors, _ = read(folder / snapshot_name(LAST, 0.05))
    for sigma_rel, dtype, update_every in ((0.05, "bfloat16", 1), (0.1, "float32", 4)):  # irregular, mixed
        info = SnapshotInfo(
            path=folder / snapshot_name(LAST + 37, sigma_rel),
            step=LAST + 37,
            sigma_rel=sigma_rel,
            gamma=float(sigma_rel_to_gamma(sigma_rel)),
            dtype=dtype,
            update_every=update_every,
            library_version=__version__,
        )
        write_atomic(info.path, tensors, info.metadata())
    (folder / (snapshot_name(LAST + 100, 0.05) + ".tmp")).write_bytes(b"interrupted")
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    (folder / "bad.safetensors").write_bytes(b"short")
    summary = json.loads(invoke("info", folder, "--json")[0])
    assert summary["snapshots"] == 25
    assert summary["steps"] == {"first": 50, "last": LAST + 37, "count": 13, "spacing": 50}
    assert summary["sigma_rels"] == {"0.05": 13, "0.1": 12}
    assert summary["other_files"] == ["model.safetensors"]
    assert summary["tmp_files"] == [snapshot_name(LAST + 100, 0.05) + ".tmp"]
    assert summary["corrupt_files"] == [
        {"file": "bad.safetensors", "error": f"{folder / 'bad.safetensors'}: not a safetensors file (only 5 bytes)"}
    ]
    assert summary["oddities"] == [
        f"{folder / 'bad.safetensors'}: not a safetensors file (only 5 bytes)",
        f"1 leftover temporary file(s) from interrupted writes (safe to delete): {summary['tmp_files'][0]}",
        "mixed dtype: bfloat16 (1), float32 (24)",
        "mixed update every: 1 (24), 4 (1)",
        f"irregular spacing: 1 of 12 gaps differ from 50 ({LAST}->{LAST + 37})",
        "step 400 lacks sigma_rel 0.1",
    ]
    stdout, _ = invoke("info", folder)
    assert "oddities      6" in stdout
    assert "  - step 400 lacks sigma_rel 0.1" in stdout.splitlines()
    assert "other files   1 .safetensors file(s) that are not snapshots (ignored)" in stdout


def test_info_two_runs_and_layouts(copy_of_run: Path) -> None:
    _two_runs(copy_of_run)
    _other_names(copy_of_run)
    oddities = json.loads(invoke("info", copy_of_run, "--json")[0])["oddities"]
    assert "step 300, sigma_rel 0.1 has 2 snapshots: is the folder mixing two runs?" in oddities
    assert (
        f"25 snapshot(s) hold other tensor names or shapes than the latest, e.g. {snapshot_name(50, 0.05)}" in oddities
    )


# -- the program as installed ---------------------------------------------------------------


def test_version_and_help() -> None:
    stdout, _ = invoke("--version")
    assert stdout == f"posthoc-ema {__version__}\n"
    for command in ([], ["synthesize"], ["info"]):
        stdout, _ = invoke(*command, "--help")
        assert "Usage:" in stdout


def console_script() -> list[str]:
    beside = Path(sys.executable).parent / "posthoc-ema"
    found = str(beside) if beside.is_file() else shutil.which("posthoc-ema")
    return [found] if found else [sys.executable, "-m", "posthoc_ema.cli"]


def test_installed_console_script(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    done = subprocess.run(
        [*console_script(), "synthesize", str(run_dir), "-s", "0.07", "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"wrote {out}"
    assert same(read(out)[0], synthesize(run_dir, 0.07))
    assert "\x1b[" not in done.stdout + done.stderr  # no colours and no progress bar without a terminal
    done = subprocess.run(
        [*console_script(), "synthesize", str(tmp_path / "nope"), "-s", "0.07"], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        f"error: {tmp_path / 'nope'}: no such snapshot folder\n",
    )


def test_closed_pipe_is_quiet(run_dir: Path) -> None:
    # A reader that stops early (`| head -1`) must not draw a traceback or an error line.
    proc = subprocess.Popen(
        [*console_script(), "synthesize", str(run_dir), "-s", "0.05:0.15:0.0001", "--dry-run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait()
    assert "Traceback" not in stderr
    assert "error:" not in stderr
    assert list_snapshots(run_dir)  # the folder is untouched


# -- folder diagnosis in the library ---------------------------------------------------------


def test_the_folder_diagnosis_lives_in_the_library(run_dir: Path) -> None:
    from posthoc_ema.folders import describe

    assert not hasattr(cli, "_describe")
    assert json.loads(invoke("info", run_dir, "--json")[0]) == describe(run_dir)


def test_info_says_a_folder_mixes_runs(copy_of_run: Path) -> None:
    tensors, _ = read(copy_of_run / snapshot_name(LAST, 0.05))
    for step, run_id in ((LAST + 50, "run-a"), (LAST + 100, "run-b"), (LAST + 150, "run-b")):
        info = SnapshotInfo(
            path=copy_of_run / snapshot_name(step, 0.05),
            step=step,
            sigma_rel=0.05,
            gamma=float(sigma_rel_to_gamma(0.05)),
            dtype="float32",
            update_every=1,
            library_version=__version__,
            run_id=run_id,
        )
        write_atomic(info.path, tensors, info.metadata())
    for path in copy_of_run.glob("*.safetensors"):  # the run's own files, as if from an older version
        if (info := read_info(path)) is not None and info.step <= LAST:
            older = dict(info.metadata())
            del older["run_id"]
            write_atomic(path, read(path)[0], older)
    summary = json.loads(invoke("info", copy_of_run, "--json")[0])
    assert summary["runs"] == {"run-a": 1, "run-b": 2}
    assert "mixes 2 runs: run-a (1), run-b (2)" in summary["oddities"]
    assert [f["run"] for f in summary["files"] if f["step"] > LAST] == ["run-a", "run-b", "run-b"]
    # One run among files without a run id (older ones) is not a mix.
    for step in (LAST + 100, LAST + 150):
        (copy_of_run / snapshot_name(step, 0.05)).unlink()
    assert not any("mixes" in o for o in json.loads(invoke("info", copy_of_run, "--json")[0])["oddities"])


# -- day-one edges ------------------------------------------------------------------------------


def test_python_dash_m(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "posthoc_ema", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert (done.returncode, done.stdout) == (0, f"posthoc-ema {__version__}\n"), done.stderr


def size_words(n_bytes: int) -> list[str]:
    return [str(n_bytes), "B"] if n_bytes < 1024 else [f"{n_bytes / 1024:.1f}", "KiB"]


def test_info_files_lists_every_snapshot(run_dir: Path) -> None:
    stdout, _ = invoke("info", run_dir, "--files")
    table = stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["file", "step", "sigma_rel", "dtype", "size", "run"]
    expected = [
        [i.path.name, str(i.step), f"{i.sigma_rel:.6g}", "float32", *size_words(i.path.stat().st_size), i.run_id or "-"]
        for i in list_snapshots(run_dir)
    ]
    assert [line.split() for line in table[1:]] == expected


def test_one_target_into_a_new_folder_with_a_trailing_slash(run_dir: Path, tmp_path: Path) -> None:
    stdout, _ = invoke("synthesize", run_dir, "-s", "0.07", "-o", f"{tmp_path / 'newdir'}/")
    assert files(tmp_path / "newdir") == [f"ema-0.07-{LAST}.safetensors"]
    assert stdout.endswith(f"wrote {tmp_path / 'newdir' / f'ema-0.07-{LAST}.safetensors'}\n")


def test_a_failed_synthesis_leaves_no_empty_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    invoke("synthesize", run_dir, "-s", "0.07", "--step", "275", "-o", f"{out}/", code=1)
    invoke("synthesize", run_dir, "-s", "0.07", "-s", "0.1", "--step", "275", "-o", out, code=1)
    assert files(tmp_path) == []


@pytest.mark.parametrize("command", ["synthesize", "sweep", "plot"])
def test_a_sigma_rel_too_small_to_compute_is_refused(run_dir: Path, tmp_path: Path, command: str) -> None:
    extra = ["-e", "sh -c 'echo 1' {weights}"] if command == "sweep" else []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy warning may leak
        _, stderr = invoke(command, run_dir, "-s", "1e-300", *extra, "-o", tmp_path / "out", code=1)
    assert one_error_line(stderr).startswith("error: sigma_rel=1e-300 is too small: its profile (gamma=1e+300)")
    assert files(tmp_path) == []


def test_the_sigma_rel_bound_is_printed_in_full(run_dir: Path, tmp_path: Path) -> None:
    _, stderr = invoke("synthesize", run_dir, "-s", "0.2887", "-o", tmp_path / "x.safetensors", code=1)
    assert one_error_line(stderr).startswith("error: sigma_rel=0.2887 is outside (0, 0.28867513459481287)")


@pytest.mark.parametrize("command", ["synthesize", "info", "sweep", "plot"])
def test_help_is_readable_at_80_columns(command: str) -> None:
    result = CliRunner().invoke(cli.app, [command, "--help"], terminal_width=80)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    # Each option's help starts with at least 30 characters on one line, not a word or two per line.
    params = [p for p in typer.main.get_command(cli.app).commands[command].params if getattr(p, "help", None)]
    assert params
    for param in params:
        start = " ".join(param.help.split())[:30]
        assert any(start in line for line in lines), (start, result.stdout)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_info_and_listing_skip_a_fifo(copy_of_run: Path) -> None:
    os.mkfifo(copy_of_run / "pipe.safetensors")
    code = (
        "import sys; from posthoc_ema.snapshots import list_snapshots; from posthoc_ema.cli import main; "
        "print(len(list_snapshots(sys.argv[1]))); sys.argv[1:] = ['info', sys.argv[1]]; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(copy_of_run)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("24\n") and "oddities      none" in done.stdout


# -- outputs: never replaced without --force, never in the snapshot folder ------------------------


def test_an_existing_output_is_kept_unless_forced(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    out.write_bytes(b"mine")
    stdout, stderr = invoke("synthesize", run_dir, "-s", "0.07", "-o", out, code=1)
    assert one_error_line(stderr) == f"error: {out} exists; pass --force to replace it"
    assert "wrote" not in stdout and out.read_bytes() == b"mine"
    invoke("synthesize", run_dir, "-s", "0.07", "-o", out, "--force")
    assert same(read(out)[0], synthesize(run_dir, 0.07))


def test_two_default_names_do_not_replace_each_other(run_dir: Path, in_tmp: Path) -> None:
    invoke("synthesize", run_dir, "-s", "0.07", "-s", "0.1")
    before = (in_tmp / f"ema-0.1-{LAST}.safetensors").read_bytes()
    _, stderr = invoke("synthesize", run_dir, "-s", "0.1", "-s", "0.12", code=1)
    assert one_error_line(stderr) == f"error: ema-0.1-{LAST}.safetensors exists; pass --force to replace it"
    assert (in_tmp / f"ema-0.1-{LAST}.safetensors").read_bytes() == before
    assert not (in_tmp / f"ema-0.12-{LAST}.safetensors").exists()  # refused before any work


@pytest.mark.parametrize("where", ["folder", "file", "dotted"])
def test_synthesize_refuses_the_snapshot_folder(copy_of_run: Path, where: str) -> None:
    before = {p.name: p.read_bytes() for p in copy_of_run.iterdir()}
    target = {
        "folder": copy_of_run,
        "file": copy_of_run / snapshot_name(LAST, 0.1),
        "dotted": copy_of_run / "sub" / ".." / "x.safetensors",
    }[where]
    _, stderr = invoke("synthesize", copy_of_run, "-s", "0.07", "-o", target, "--force", code=1)
    assert "is in the snapshot folder" in one_error_line(stderr)
    assert {p.name: p.read_bytes() for p in copy_of_run.iterdir()} == before


def test_save_refuses_to_replace_unless_told(run_dir: Path, tmp_path: Path) -> None:
    the_plan = plan(run_dir, [0.07])
    state_dict = synthesize(run_dir, 0.07)
    out = tmp_path / "ema.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="the file exists; pass overwrite=True to replace it"):
        save(out, state_dict, the_plan, 0)
    assert out.read_bytes() == b"mine"
    save(out, state_dict, the_plan, 0, overwrite=True)
    assert same(read(out)[0], state_dict)
    with pytest.raises(ValueError, match="is in the snapshot folder; write synthesized files elsewhere"):
        save(run_dir / "ema.safetensors", state_dict, the_plan, 0, overwrite=True)
