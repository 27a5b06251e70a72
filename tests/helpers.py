"""Helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from posthoc_ema import PostHocEMA, cli, sigma_rel_to_gamma
from posthoc_ema._version import __version__
from posthoc_ema.snapshots import SnapshotInfo, snapshot_name, write_atomic


def reference_gamma(sigma_rel: float) -> float:
    """EDM2 eq. 126 by ``numpy.roots``, independent of the library's closed form: the largest
    real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) (finite for sigma_rel >= 1e-150)."""
    c = sigma_rel**-2.0
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    # The imaginary-part test is relative: for small widths the roots are of order 1/sigma_rel.
    real = roots[np.abs(roots.imag) <= 1e-9 * np.abs(roots)].real
    return float(real.max())


def write_snapshot(folder: Path, step: int, sigma_rel: float, tensors: dict[str, torch.Tensor], name: str = "") -> Path:
    """Write ``tensors`` as the snapshot of ``sigma_rel`` at ``step``, as the tracker would."""
    info = SnapshotInfo(
        path=folder / (name or snapshot_name(step, sigma_rel)),
        step=step,
        sigma_rel=sigma_rel,
        gamma=float(sigma_rel_to_gamma(sigma_rel)),
        dtype="float32",
        update_every=1,
        library_version=__version__,
    )
    write_atomic(info.path, tensors, info.metadata())
    return info.path


def make_model() -> torch.nn.Module:
    """A small model with a parameter-free integer buffer (BatchNorm's counter), seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))


def random_walk_run(folder: Path, *, steps: int, every: int, drift: float = 0.0) -> Path:
    """Snapshots of sigma_rel 0.05 and 0.1 every ``every`` steps of :func:`make_model`,
    whose floating tensors random-walk (steps of 0.05 sigma, plus ``drift``)."""
    model = make_model()
    emas = PostHocEMA(model, (0.05, 0.10), snapshot_dir=folder, snapshot_every=every)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=generator), alpha=0.05).add_(drift)
            model[1].num_batches_tracked.add_(1)
            emas.update()
    emas.close()
    return folder


def invoke(*args: str | Path, code: int = 0) -> tuple[str, str]:
    """Run the CLI in-process; check the exit code and that nothing escaped as a traceback."""
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.stdout, result.stderr
