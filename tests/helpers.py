"""Helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch

from posthoc_ema import sigma_rel_to_gamma
from posthoc_ema._version import __version__
from posthoc_ema.snapshots import SnapshotInfo, snapshot_name, write_atomic


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
