"""The exceptions and warnings of posthoc-ema, under one base class.

Every error this library raises on purpose is a :class:`PostHocEMAError`. Each
subclass also keeps the built-in base it had before the common base existed
(``ValueError``, ``OSError``, ``RuntimeError``), so existing ``except`` clauses
go on catching it.
"""

from __future__ import annotations

__all__ = [
    "EvaluationError",
    "PoorReconstructionWarning",
    "PostHocEMAError",
    "SnapshotError",
    "SnapshotWriteError",
    "UnresolvedProfileWarning",
]


class PostHocEMAError(Exception):
    """Base class of every error posthoc-ema raises on purpose."""


class SnapshotError(PostHocEMAError, ValueError):
    """A snapshot folder or file that cannot be used, with the file and the reason."""


class SnapshotWriteError(PostHocEMAError, OSError):
    """A snapshot that could not be written in the background, raised at the next call."""


class EvaluationError(PostHocEMAError, RuntimeError):
    """An evaluation that failed; :func:`~posthoc_ema.sweep` records it in the row and goes on.

    Raise it from ``evaluate`` to mark a target as failed without stopping the
    sweep; any other exception stops it.
    """


class PoorReconstructionWarning(UserWarning):
    """The snapshots reproduce a requested profile only roughly (see :attr:`~posthoc_ema.Plan.errors`)."""


class UnresolvedProfileWarning(PoorReconstructionWarning):
    """Plain checkpoints too sparse to resolve a target profile (see :class:`~posthoc_ema.CheckpointPlan`)."""
