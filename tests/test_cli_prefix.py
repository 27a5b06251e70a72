"""``--prefix``: every command that synthesizes or plans reads one tracker of a shared folder (a GAN's two)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import torch
from helpers import invoke
from safetensors.torch import load_file

import posthoc_ema
from posthoc_ema import sigma_rel_to_gamma
from posthoc_ema._version import __version__
from posthoc_ema.snapshots import SnapshotInfo, snapshot_name, write_atomic

TRACKED = (0.05, 0.10)
MIXED = "pass prefix= (--prefix on the command line)"


@pytest.fixture
def gan(tmp_path: Path) -> Path:
    """Snapshots of two trackers in one folder: ``gen``'s tensors are positive, ``disc``'s negative."""
    folder = tmp_path / "gan"
    folder.mkdir()
    for k in range(1, 13):
        for sigma_rel in TRACKED:
            for prefix, sign in (("gen", 1.0), ("disc", -1.0)):
                info = SnapshotInfo(
                    path=folder / snapshot_name(100 * k, sigma_rel, prefix),
                    step=100 * k,
                    sigma_rel=sigma_rel,
                    gamma=float(sigma_rel_to_gamma(sigma_rel)),
                    dtype="float32",
                    update_every=1,
                    library_version=__version__,
                    run_id=prefix,
                    prefix=prefix,
                )
                write_atomic(info.path, {"w": torch.full((3,), sign * k)}, info.metadata())
    return folder


def test_synthesize_prefix(gan: Path, tmp_path: Path) -> None:
    _, err = invoke("synthesize", gan, "-s", "0.08", "-o", tmp_path / "x.safetensors", code=1)
    assert MIXED in err
    for prefix in ("gen", "disc"):
        out = tmp_path / f"{prefix}.safetensors"
        invoke("synthesize", gan, "-s", "0.08", "--prefix", prefix, "-o", out)
        expected = posthoc_ema.synthesize(gan, 0.08, prefix=prefix)
        torch.testing.assert_close(load_file(str(out))["w"], expected["w"], rtol=0, atol=0)
        assert (load_file(str(out))["w"] > 0).all() == (prefix == "gen")


def test_sharded_synthesize_prefix(gan: Path, tmp_path: Path) -> None:
    invoke("synthesize", gan, "-s", "0.08", "--prefix", "disc", "--max-shard-size", "1MB", "-o", tmp_path / "sh")
    assert (load_file(str(tmp_path / "sh" / "model.safetensors"))["w"] < 0).all()


def test_sweep_prefix(gan: Path, tmp_path: Path) -> None:
    command = f"{shlex.quote(sys.executable)} -c 'print(1.5)' {{weights}}"
    _, err = invoke("sweep", gan, "-s", "0.08", "-e", command, "-o", tmp_path / "no", code=1)
    assert MIXED in err
    out = tmp_path / "sweep"
    invoke("sweep", gan, "-s", "0.07:0.09:0.01", "-e", command, "-o", out, "--prefix", "gen")
    result = posthoc_ema.SweepResult.from_json(out / "results.json")
    assert len(result.rows) == 3 and all(r.ok for r in result.rows)
    assert (load_file(str(result.rows[0].weights))["w"] > 0).all()


def test_api_sweeps_take_a_prefix(gan: Path, tmp_path: Path) -> None:
    seen: list[float] = []
    posthoc_ema.sweep(gan, [0.08], lambda sd: seen.append(float(sd["w"][0])) or 0.0, prefix="disc")
    assert seen == [pytest.approx(float(posthoc_ema.synthesize(gan, 0.08, prefix="disc")["w"][0]))]
    assert seen[0] < 0


def test_plot_prefix(gan: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, err = invoke("plot", gan, "-s", "0.08", "-o", tmp_path / "p.png", code=1)
    assert MIXED in err
    invoke("plot", gan, "-s", "0.08", "--prefix", "gen", "-o", tmp_path / "p.png")
    invoke("plot", gan, "--error-curve", "0.03:0.2:0.01", "--prefix", "gen", "-o", tmp_path / "e.png")
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "e.png").stat().st_size > 0
