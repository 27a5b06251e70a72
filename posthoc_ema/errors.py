"""The exceptions and warnings of posthoc-ema, under one base class.

Every error this library raises on purpose is a :class:`PostHocEMAError`. Each
subclass also keeps the built-in base it had before the common base existed
(``ValueError``, ``OSError``, ``RuntimeError``), so existing ``except`` clauses
go on catching it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "EvaluationError",
    "ModelChangedError",
    "PoorReconstructionWarning",
    "PostHocEMAError",
    "RoundingWarning",
    "SnapshotError",
    "SnapshotWriteError",
    "UnresolvedProfileWarning",
]


class PostHocEMAError(Exception):
    """Base class of every error posthoc-ema raises on purpose."""


class SnapshotError(PostHocEMAError, ValueError):
    """A snapshot folder or file that cannot be used, with the file and the reason."""


class SnapshotWriteError(PostHocEMAError, OSError):
    """Snapshots that could not be written in the background, raised at the next call.

    Attributes:
        paths: every file that failed (the message names the first few).
    """

    paths: tuple[Path, ...] = ()


class ModelChangedError(PostHocEMAError, RuntimeError):
    """A tracked tensor of the model was removed, moved, or replaced by one of another shape, dtype or device."""


class EvaluationError(PostHocEMAError, RuntimeError):
    """An evaluation that failed; :func:`~posthoc_ema.sweep` records it in the row and goes on.

    Raise it from ``evaluate`` to mark a target as failed without stopping the
    sweep; any other exception stops it.
    """


class PoorReconstructionWarning(UserWarning):
    """The snapshots reproduce a requested profile only roughly (see :attr:`~posthoc_ema.Plan.errors`)."""


class RoundingWarning(PoorReconstructionWarning):
    """The rounding of 16-bit snapshots, amplified by the coefficients, dominates a target's error
    (see :attr:`~posthoc_ema.Plan.rounding_errors`)."""


class UnresolvedProfileWarning(PoorReconstructionWarning):
    """Plain checkpoints too sparse to resolve a target profile (see :class:`~posthoc_ema.CheckpointPlan`)."""
