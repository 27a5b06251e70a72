"""posthoc-ema: choose your EMA after training (EDM2 power-function EMA, post-hoc synthesis)."""

from posthoc_ema import schedules
from posthoc_ema._version import __version__
from posthoc_ema.checkpoints import CheckpointPlan, from_checkpoints, plan_checkpoints
from posthoc_ema.errors import (
    EvaluationError,
    ModelChangedError,
    PoorReconstructionWarning,
    PostHocEMAError,
    RoundingWarning,
    SnapshotError,
    SnapshotWriteError,
    UnresolvedProfileWarning,
)
from posthoc_ema.profiles import (
    MAX_SIGMA_REL,
    gamma_to_sigma_rel,
    power_beta,
    profile_inner_product,
    reconstruction_error,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from posthoc_ema.snapshots import SnapshotInfo, list_snapshots
from posthoc_ema.sweeps import SweepResult, SweepRow, sweep
from posthoc_ema.synthesis import (
    ERROR_WARNING_THRESHOLD,
    Plan,
    plan,
    synthesize,
    synthesize_many,
)
from posthoc_ema.tracker import PostHocEMA

__all__ = [
    "ERROR_WARNING_THRESHOLD",
    "MAX_SIGMA_REL",
    "CheckpointPlan",
    "EvaluationError",
    "ModelChangedError",
    "Plan",
    "PoorReconstructionWarning",
    "PostHocEMA",
    "PostHocEMAError",
    "RoundingWarning",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotWriteError",
    "SweepResult",
    "SweepRow",
    "UnresolvedProfileWarning",
    "__version__",
    "from_checkpoints",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "plan",
    "plan_checkpoints",
    "power_beta",
    "profile_inner_product",
    "reconstruction_error",
    "schedules",
    "sigma_rel_to_gamma",
    "solve_coefficients",
    "sweep",
    "synthesize",
    "synthesize_many",
]
