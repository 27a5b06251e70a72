"""Every script in examples/ runs end to end on its tiny ``--quick`` setting, warnings as errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Each example run once with ``--quick --out DIR``: its process and its output folder."""
    pytest.importorskip("sklearn")
    runs = {}
    for path in EXAMPLES:
        out = tmp_path_factory.mktemp(path.stem) / "out"
        done = subprocess.run(
            [sys.executable, "-W", "error", str(path), "--quick", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        runs[path.name] = (done, out)
    return runs


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/ holds no script"


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_example_runs_quick(quick_runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]], name: str) -> None:
    done, _ = quick_runs[name]
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_digits_reports_the_sweep_and_the_test_split(
    quick_runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]],
) -> None:
    pytest.importorskip("matplotlib")
    done, out = quick_runs["digits.py"]
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines.index("   sigma_rel  val_loss  val_acc  predicted_error")
    rows = lines[header + 1 : header + 7]
    assert [float(row.lstrip("* ").split()[0]) for row in rows] == [0.03, 0.07, 0.11, 0.15, 0.19, 0.23]
    assert sum(row.startswith("*") for row in rows) == 1
    for name in ("raw final weights", "tracked EMA, sigma_rel=0.05", "tracked EMA, sigma_rel=0.10", "best synthesized"):
        assert any(line.startswith(name) for line in lines), name
    assert sum(" beats " in line or " does NOT beat " in line for line in lines) == 3
    for name in ("sweep.png", "profile.png", "error_curve.png", "sweep.csv", "sweep.json"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "snapshots").glob("*.safetensors"))) == 2 * 400 // 20
