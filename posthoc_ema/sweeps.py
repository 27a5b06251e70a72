"""Sweep sigma_rel: synthesize many EMAs from the snapshots, evaluate each, keep the best.

:func:`sweep` solves one :func:`~posthoc_ema.synthesis.plan` for every target,
then streams the snapshots once per batch of targets (one batch when the outputs
fit in :data:`DEFAULT_MEMORY_BUDGET`), calls your ``evaluate(state_dict)`` on each
synthesized EMA and returns a :class:`SweepResult` table: sigma_rel, the metric(s),
the predicted reconstruction error and whether the target lies outside the
tracked range.

:func:`command_sweep` does the same with an external command as the evaluation
(``python eval.py {weights}``): it writes each synthesized file, runs the command,
reads the metric from its last line of output, saves ``results.json`` and
``results.csv`` after every target and, run again, skips the targets already done.

This module is the in-process sweep. The result table lives in
:mod:`posthoc_ema.results` and the external commands in :mod:`posthoc_ema.commands`;
their names stay importable from here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

# The command runner and the result table have modules of their own; they stay importable from here.
from posthoc_ema.commands import (  # noqa: F401
    WEIGHTS_PLACEHOLDER,
    command_sweep,
    parse_metric_line,
    run_command,
    weights_name,
)
from posthoc_ema.dtypes import FLOATING_DTYPES, ITEMSIZE, parse_dtype
from posthoc_ema.errors import EvaluationError
from posthoc_ema.results import (  # noqa: F401
    DEFAULT_METRIC,
    RESULTS_CSV,
    RESULTS_FORMAT,
    RESULTS_JSON,
    RESULTS_VERSION,
    SweepResult,
    SweepRow,
    row_order,
)
from posthoc_ema.schedules import Schedule
from posthoc_ema.synthesis import Plan, StateDict, plan, run

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_METRIC",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "EvaluationError",
    "SweepResult",
    "SweepRow",
    "command_sweep",
    "parse_metric_line",
    "run_command",
    "sweep",
    "target_bytes",
    "weights_name",
]

log = logging.getLogger(__name__)

#: Bytes of synthesized outputs held at once by :func:`sweep` (2 GiB). Targets
#: that do not fit together are synthesized in batches, each batch one more pass
#: over the snapshots: a 100M-parameter model in float32 takes 400 MB per target,
#: so five targets per pass.
DEFAULT_MEMORY_BUDGET = 2 << 30

Metrics = float | Mapping[str, float]


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{what} is {value!r}; return a number or a dict of numbers")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        raise TypeError(f"{what} is a {type(value).__name__}; return a number or a dict of numbers") from None


def _as_metrics(value: Any, metric: str | None) -> dict[str, float]:
    if isinstance(value, Mapping):
        if not value:
            raise TypeError("evaluate returned an empty dict; return a number or a dict of numbers")
        return {str(k): _as_float(v, f"evaluate(...)[{k!r}]") for k, v in value.items()}
    return {metric or DEFAULT_METRIC: _as_float(value, "evaluate(...)")}


def _nan_failure(metrics: Mapping[str, float]) -> str | None:
    """Why a result with a NaN metric counts as a failed evaluation, or None."""
    nans = [name for name, value in metrics.items() if math.isnan(value)]
    return f"the evaluation gave NaN for {', '.join(map(repr, nans))}" if nans else None


# -- the sweep ------------------------------------------------------------------


def target_bytes(the_plan: Plan, dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes one synthesized target of ``the_plan`` holds in memory, from the snapshots' headers.

    Floating tensors are accumulated in float32, then cast to ``dtype`` (a second
    copy unless ``dtype`` is float32); other tensors are copied.
    """
    out_dtype = parse_dtype(dtype)
    cast_size = 0 if out_dtype == torch.float32 else torch.empty((), dtype=out_dtype).element_size()
    total = 0
    for dt, shape in the_plan.snapshots[-1].tensors.values():
        numel = math.prod(shape)
        total += numel * (4 + cast_size if dt in FLOATING_DTYPES else ITEMSIZE.get(dt, 1))
    return total


def _batch_size(the_plan: Plan, dtype: torch.dtype, batch_size: int | None, memory_budget: int | None) -> int:
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not a positive integer")
        return batch_size
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"memory_budget={budget!r} is not a positive number of bytes")
    return max(1, budget // max(1, target_bytes(the_plan, dtype)))


def _run_plan(
    the_plan: Plan,
    evaluate_at: Callable[[int, StateDict], Metrics],
    *,
    metric: str | None,
    maximize: bool,
    device: str | torch.device | None,
    dtype: torch.dtype,
    batch: int,
    on_row: Callable[[SweepRow], None] | None,
) -> SweepResult:
    rows: list[SweepRow] = []
    n = len(the_plan.sigma_rels)
    for start in range(0, n, batch):
        index = list(range(start, min(n, start + batch)))
        if len(index) < n:
            log.info("synthesizing targets %d-%d of %d", index[0] + 1, index[-1] + 1, n)
        outputs = run(the_plan.subset(index), device=device, dtype=dtype)
        for i in index:
            sigma_rel = the_plan.sigma_rels[i]
            state_dict = outputs.pop(the_plan.key(i))
            failure = None
            metrics: dict[str, float] = {}
            try:
                metrics = _as_metrics(evaluate_at(i, state_dict), metric)
                failure = _nan_failure(metrics)  # NaN ranks nowhere: retried on resume like any failure
            except EvaluationError as err:
                failure = str(err) or type(err).__name__
            if failure is not None:
                log.info("%s: evaluation failed: %s", the_plan.labels[i], failure)
            del state_dict
            row = SweepRow(
                sigma_rel=float(sigma_rel),
                predicted_error=float(the_plan.errors[i]),
                outside=bool(the_plan.outside[i]),
                metrics=metrics,
                failure=failure,
                target=the_plan.labels[i] if the_plan.is_classic(i) else None,
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)  # recorded before the metric name is checked: an evaluation is never lost
            if metric is not None and metrics and metric not in metrics:
                raise ValueError(
                    f"metric={metric!r} is not among the metrics the evaluation returned: {', '.join(metrics)}"
                )
            if metric is None and metrics:
                metric = next(iter(metrics))  # the first metric of the first result ranks
    return SweepResult(
        rows=tuple(sorted(rows, key=row_order)),
        metric=metric or DEFAULT_METRIC,
        maximize=maximize,
        step=the_plan.step,
        tracked_sigma_rels=the_plan.tracked_sigma_rels,
    )


def sweep(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: float | Schedule | Iterable[float | Schedule],
    evaluate: Callable[[StateDict], Metrics],
    *,
    metric: str | None = None,
    maximize: bool = False,
    step: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    on_row: Callable[[SweepRow], None] | None = None,
    prefix: str | None = None,
    use_classic: bool = True,
) -> SweepResult:
    """Synthesize the EMA of each sigma_rel, evaluate it, and tabulate the results.

    One :func:`~posthoc_ema.synthesis.plan` covers every target; the snapshots are
    then streamed once per batch of targets, a batch being as many targets as fit
    in ``memory_budget`` (estimated from the snapshot headers). Each synthesized
    state dict is passed to ``evaluate`` and dropped before the next batch.

    Args:
        snapshot_dir: folder of snapshots written by :class:`~posthoc_ema.PostHocEMA`.
        sigma_rels: the targets: sigma_rels, each in (0, sqrt(1/12)), and classic
            schedules (:mod:`posthoc_ema.schedules`), mixed.
        evaluate: called with each synthesized state dict (load it with
            ``model.load_state_dict``); returns a number or a dict of numbers.
            Raise :class:`EvaluationError` to record a failure and go on; a NaN
            value is recorded as a failure too.
        metric: the metric :attr:`SweepResult.best` ranks by; default: a bare
            number is named ``"metric"``, and of a dict the first key ranks.
        maximize: rank larger values first (accuracy) instead of smaller (loss).
        step: snapshot step to synthesize at; default the latest.
        device: where to synthesize (``"cuda"``); default CPU.
        dtype: dtype of the floating outputs.
        memory_budget: bytes of outputs held at once; default
            :data:`DEFAULT_MEMORY_BUDGET` (2 GiB).
        batch_size: targets per pass over the snapshots; overrides ``memory_budget``.
        on_row: called with each :class:`SweepRow` as soon as it is evaluated.
        prefix: use the snapshots of this tracker prefix only, as for
            :func:`~posthoc_ema.synthesis.plan` (needed for a folder shared by several trackers).
        use_classic: combine the snapshots of classic EMAs too, as for
            :func:`~posthoc_ema.synthesis.plan` (the default).

    Returns:
        A :class:`SweepResult`, rows sorted by sigma_rel, then the classic
        targets by kind, start and decay (:func:`~posthoc_ema.results.row_order`).

    Raises:
        ValueError, SnapshotError: as for :func:`~posthoc_ema.synthesis.plan`, for
            repeated targets, a non-positive batch size or budget, or a ``metric``
            missing from what ``evaluate`` returned (raised once ``on_row`` has
            seen that row, so a caller that records rows keeps it).
        TypeError: if ``evaluate`` returns something other than a number or a dict of numbers.

    Warns:
        PoorReconstructionWarning: once, naming the targets whose predicted error
            is above :data:`~posthoc_ema.synthesis.ERROR_WARNING_THRESHOLD`.

    Example:
        >>> def evaluate(state_dict):
        ...     model.load_state_dict(state_dict)
        ...     return {"val_loss": val_loss(model), "val_acc": val_acc(model)}
        >>> result = sweep("ckpts", np.arange(0.02, 0.25, 0.01), evaluate, metric="val_loss")  # doctest: +SKIP
        >>> result.best.sigma_rel  # doctest: +SKIP
        0.13
    """
    the_plan = plan(snapshot_dir, sigma_rels, step=step, prefix=prefix, use_classic=use_classic)
    out_dtype = parse_dtype(dtype)
    return _run_plan(
        the_plan,
        lambda _, state_dict: evaluate(state_dict),
        metric=metric,
        maximize=maximize,
        device=device,
        dtype=out_dtype,
        batch=_batch_size(the_plan, out_dtype, batch_size, memory_budget),
        on_row=on_row,
    )
