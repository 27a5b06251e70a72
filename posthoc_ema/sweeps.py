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
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posthoc_ema.dtypes import FLOATING_DTYPES, ITEMSIZE, parse_dtype
from posthoc_ema.errors import EvaluationError
from posthoc_ema.files import atomic_path
from posthoc_ema.synthesis import (
    Plan,
    StateDict,
    format_error,
    plan,
    run,
    save,
    target_key,
)

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

#: Name of a metric given as a bare number, when no ``metric`` name is chosen.
DEFAULT_METRIC = "metric"

#: The ``format`` entry of a ``results.json`` written by :meth:`SweepResult.to_json`.
RESULTS_FORMAT = "posthoc-ema/sweep"
RESULTS_VERSION = 1

#: Placeholder that :func:`run_command` replaces by the path of the weights.
WEIGHTS_PLACEHOLDER = "{weights}"

Metrics = float | Mapping[str, float]


@dataclass(frozen=True)
class SweepRow:
    """One evaluated target.

    Attributes:
        sigma_rel: the target width.
        predicted_error: relative L2 error of its reconstructed profile (:attr:`Plan.errors`).
        outside: whether it lies outside the tracked sigma_rels.
        metrics: what ``evaluate`` returned, by name; empty if the evaluation failed.
        failure: why the evaluation failed, or None.
        weights: path of the synthesized file (:func:`command_sweep`), or None.
    """

    sigma_rel: float
    predicted_error: float
    outside: bool
    metrics: Mapping[str, float] = field(default_factory=dict)
    failure: str | None = None
    weights: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the evaluation succeeded."""
        return self.failure is None


@dataclass(frozen=True)
class SweepResult:
    """The table of a sweep, sorted by sigma_rel.

    Attributes:
        rows: one :class:`SweepRow` per target.
        metric: the metric :attr:`best` ranks by.
        maximize: whether larger values of ``metric`` are better.
        step: the snapshot step the EMAs were synthesized at.
        tracked_sigma_rels: the sigma_rels of the snapshots used.
    """

    rows: tuple[SweepRow, ...]
    metric: str
    maximize: bool
    step: int
    tracked_sigma_rels: tuple[float, ...]

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        """The targets, in row order."""
        return tuple(r.sigma_rel for r in self.rows)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric name that appears in a row, in order of first appearance."""
        names: dict[str, None] = {}
        for r in self.rows:
            names.update(dict.fromkeys(r.metrics))
        return tuple(names)

    def values(self, metric: str | None = None) -> np.ndarray:
        """The values of ``metric`` (default :attr:`metric`) in row order; NaN where missing."""
        name = self.metric if metric is None else metric
        return np.array([r.metrics.get(name, math.nan) for r in self.rows], dtype=np.float64)

    @property
    def best(self) -> SweepRow:
        """The row with the best finite value of :attr:`metric` (the first one on ties).

        Raises:
            ValueError: if no row has a finite value of the metric.
        """
        candidates = [r for r in self.rows if math.isfinite(r.metrics.get(self.metric, math.nan))]
        if not candidates:
            failed = sum(not r.ok for r in self.rows)
            raise ValueError(
                f"no row has a finite value of metric {self.metric!r} "
                f"({len(self.rows)} rows, {failed} failed evaluations); metrics present: "
                f"{', '.join(self.metric_names) or 'none'}"
            )
        sign = -1.0 if self.maximize else 1.0
        return min(candidates, key=lambda r: sign * r.metrics[self.metric])

    def format_table(self) -> str:
        """The table as aligned text, the best row marked with ``*``.

        Example:
            >>> print(result.format_table())  # doctest: +SKIP
              sigma_rel  val_loss  predicted_error
              0.0500     0.2311    0.0012%
            * 0.1000     0.2207    0.0009%
        """
        names = self.metric_names
        try:
            best: SweepRow | None = self.best
        except ValueError:
            best = None
        header = ["", "sigma_rel", *names, "predicted_error", ""]
        lines = []
        for r in self.rows:
            note = []
            if r.outside:
                note.append("outside tracked range")
            if r.failure is not None:
                note.append("FAILED: " + r.failure.splitlines()[0] if r.failure else "FAILED")
            lines.append(
                [
                    "*" if r is best else "",
                    f"{r.sigma_rel:.4g}",
                    *(_format_number(r.metrics[n]) if n in r.metrics else "-" for n in names),
                    format_error(r.predicted_error),
                    "; ".join(note),
                ]
            )
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *lines]
        )

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the table as CSV: sigma_rel, each metric, predicted_error, outside, failure, weights."""
        names = self.metric_names
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["sigma_rel", *names, "predicted_error", "outside", "failure", "weights"])
        for r in self.rows:
            writer.writerow(
                [
                    repr(r.sigma_rel),
                    *(repr(r.metrics[n]) if n in r.metrics else "" for n in names),
                    repr(r.predicted_error),
                    str(r.outside).lower(),
                    r.failure or "",
                    r.weights or "",
                ]
            )
        _write_text(Path(path), buffer.getvalue())

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data (non-finite numbers become None)."""
        return {
            "format": RESULTS_FORMAT,
            "format_version": RESULTS_VERSION,
            "metric": self.metric,
            "maximize": self.maximize,
            "step": self.step,
            "tracked_sigma_rels": list(self.tracked_sigma_rels),
            "rows": [
                {
                    "sigma_rel": r.sigma_rel,
                    "metrics": {k: _json_number(v) for k, v in r.metrics.items()},
                    "predicted_error": r.predicted_error,
                    "outside": r.outside,
                    "failure": r.failure,
                    "weights": r.weights,
                }
                for r in self.rows
            ],
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON; :meth:`from_json` reads it back."""
        _write_text(Path(path), json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> SweepResult:
        """Read a result written by :meth:`to_json`.

        Raises:
            ValueError: if the file is not a sweep result this version reads.
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read sweep results ({err})") from None
        if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
            raise ValueError(f"{path}: not a posthoc-ema sweep result (its 'format' entry is missing or different)")
        if data.get("format_version", 0) > RESULTS_VERSION:
            raise ValueError(
                f"{path}: sweep result version {data['format_version']} is newer than this posthoc-ema reads"
            )
        try:
            rows = tuple(
                SweepRow(
                    sigma_rel=float(r["sigma_rel"]),
                    predicted_error=float(r["predicted_error"]),
                    outside=bool(r["outside"]),
                    metrics={str(k): math.nan if v is None else float(v) for k, v in r["metrics"].items()},
                    failure=r.get("failure"),
                    weights=r.get("weights"),
                )
                for r in data["rows"]
            )
            return cls(
                rows=rows,
                metric=str(data["metric"]),
                maximize=bool(data["maximize"]),
                step=int(data["step"]),
                tracked_sigma_rels=tuple(float(s) for s in data["tracked_sigma_rels"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: malformed sweep result ({type(err).__name__}: {err})") from None


def _format_number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


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
        metrics = {str(k): _as_float(v, f"evaluate(...)[{k!r}]") for k, v in value.items()}
        if metric is not None and metric not in metrics:
            raise ValueError(f"metric={metric!r} is not among the metrics evaluate returned: {', '.join(metrics)}")
        return metrics
    return {metric or DEFAULT_METRIC: _as_float(value, "evaluate(...)")}


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
            state_dict = outputs.pop(sigma_rel)
            failure = None
            metrics: dict[str, float] = {}
            try:
                metrics = _as_metrics(evaluate_at(i, state_dict), metric)
            except EvaluationError as err:
                failure = str(err) or type(err).__name__
                log.info("sigma_rel=%.4g: evaluation failed: %s", sigma_rel, failure)
            del state_dict
            if metric is None and metrics:
                metric = next(iter(metrics))  # the first metric of the first result ranks
            row = SweepRow(
                sigma_rel=sigma_rel,
                predicted_error=float(the_plan.errors[i]),
                outside=bool(the_plan.outside[i]),
                metrics=metrics,
                failure=failure,
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return SweepResult(
        rows=tuple(sorted(rows, key=lambda r: r.sigma_rel)),
        metric=metric or DEFAULT_METRIC,
        maximize=maximize,
        step=the_plan.step,
        tracked_sigma_rels=the_plan.tracked_sigma_rels,
    )


def sweep(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: float | Iterable[float],
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
) -> SweepResult:
    """Synthesize the EMA of each sigma_rel, evaluate it, and tabulate the results.

    One :func:`~posthoc_ema.synthesis.plan` covers every target; the snapshots are
    then streamed once per batch of targets, a batch being as many targets as fit
    in ``memory_budget`` (estimated from the snapshot headers). Each synthesized
    state dict is passed to ``evaluate`` and dropped before the next batch.

    Args:
        snapshot_dir: folder of snapshots written by :class:`~posthoc_ema.PostHocEMA`.
        sigma_rels: the targets, each in (0, sqrt(1/12)).
        evaluate: called with each synthesized state dict (load it with
            ``model.load_state_dict``); returns a number or a dict of numbers.
            Raise :class:`EvaluationError` to record a failure and go on.
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

    Returns:
        A :class:`SweepResult`, rows sorted by sigma_rel.

    Raises:
        ValueError, SnapshotError: as for :func:`~posthoc_ema.synthesis.plan`, for
            repeated targets, a non-positive batch size or budget, or a ``metric``
            missing from what ``evaluate`` returned.
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
    the_plan = plan(snapshot_dir, sigma_rels, step=step)
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


# -- evaluation by an external command ------------------------------------------------

# Lines of a failed command's stderr kept in its row.
_STDERR_LINES = 20


def _command_argv(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as err:
        raise ValueError(f"cannot parse the evaluation command {command!r}: {err}") from None
    if not argv:
        raise ValueError("the evaluation command is empty")
    if not any(WEIGHTS_PLACEHOLDER in arg for arg in argv):
        raise ValueError(
            f"the evaluation command {command!r} has no {WEIGHTS_PLACEHOLDER} placeholder; "
            f"write it where the path of the weights goes, e.g. 'python eval.py {WEIGHTS_PLACEHOLDER}'"
        )
    return argv


def _tail(text: str, lines: int = _STDERR_LINES) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join(kept)


def parse_metric_line(line: str) -> Metrics:
    """The metric(s) in a line of output: a number, or a JSON object of numbers.

    Raises:
        ValueError: if the line is neither.

    Example:
        >>> parse_metric_line('{"loss": 0.25, "acc": 0.9}')
        {'loss': 0.25, 'acc': 0.9}
        >>> parse_metric_line("0.9731")
        0.9731
    """
    text = line.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"the value of {k!r} in {text!r} is not a number")
            out[str(k)] = float(v)
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(text)  # also "nan", "inf"
    except ValueError:
        raise ValueError(f"{text!r} is neither a number nor a JSON object of numbers") from None


def run_command(command: str, weights: str | os.PathLike[str], *, timeout: float | None = None) -> Metrics:
    """Run an evaluation command on a weights file and read its metric.

    ``{weights}`` in ``command`` is replaced by the path. The command is split
    like a shell would (``shlex``) but run without a shell; use ``sh -c '...'``
    for pipes. Its last non-empty line of stdout must be a number or a JSON object
    of numbers.

    Args:
        command: e.g. ``"python eval.py --weights {weights}"``.
        weights: the path to put in place of ``{weights}``.
        timeout: seconds before the command is killed; default none.

    Returns:
        A float or a dict of floats.

    Raises:
        ValueError: if ``command`` cannot be parsed or lacks ``{weights}``.
        EvaluationError: if the command cannot start, exits with a non-zero status,
            times out, or does not print a metric; the message holds the end of
            its stderr.

    Example:
        >>> run_command("python eval.py {weights}", "sweep/ema-0.1-4000.safetensors")  # doctest: +SKIP
        {'val_loss': 0.231, 'val_acc': 0.941}
    """
    argv = [arg.replace(WEIGHTS_PLACEHOLDER, os.fspath(weights)) for arg in _command_argv(command)]
    shown = shlex.join(argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise EvaluationError(f"{shown}: command not found: {argv[0]!r}") from None
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        detail = f"\n{_tail(stderr)}" if stderr.strip() else ""
        raise EvaluationError(f"{shown}: timed out after {timeout} s{detail}") from None
    except OSError as err:
        raise EvaluationError(f"{shown}: cannot run ({err})") from None
    stderr = _tail(done.stderr)
    if done.returncode != 0:
        raise EvaluationError(f"{shown}: exited with status {done.returncode}" + (f"\n{stderr}" if stderr else ""))
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    if not lines:
        raise EvaluationError(
            f"{shown}: printed nothing on stdout; its last line must be a number or a JSON object"
            + (f"\n{stderr}" if stderr else "")
        )
    try:
        return parse_metric_line(lines[-1])
    except ValueError as err:
        raise EvaluationError(f"{shown}: the last line of its stdout is not a metric: {err}") from None


#: Files :func:`command_sweep` writes into its output folder.
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def weights_name(sigma_rel: float, step: int) -> str:
    """File name of the synthesized EMA of ``sigma_rel`` at ``step`` in a sweep's output folder.

    >>> weights_name(0.1, 4000)
    'ema-0.1-4000.safetensors'
    """
    return f"ema-{sigma_rel!r}-{step}.safetensors"


def command_sweep(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: float | Iterable[float],
    command: str,
    out_dir: str | os.PathLike[str],
    *,
    metric: str | None = None,
    maximize: bool = False,
    step: int | None = None,
    timeout: float | None = None,
    keep_weights: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    on_row: Callable[[SweepRow], None] | None = None,
    on_skip: Callable[[list[float]], None] | None = None,
) -> SweepResult:
    """A :func:`sweep` whose evaluation is an external command, resumable.

    Each target is written to ``out_dir`` (:func:`weights_name`) as a
    self-describing safetensors file and evaluated with :func:`run_command`.
    ``results.json`` and ``results.csv`` are rewritten after every target; a
    failed evaluation is recorded with its stderr and the sweep goes on. Run
    again with the same ``out_dir``, targets that already succeeded are skipped
    (failed ones are retried) and their rows kept.

    Args:
        snapshot_dir, sigma_rels, metric, maximize, step, device, dtype,
            memory_budget, batch_size, on_row: as for :func:`sweep`.
        command: the evaluation, with ``{weights}`` where the file path goes.
        out_dir: folder for the synthesized files and the results; created if needed.
        timeout: seconds each evaluation may take.
        keep_weights: keep each synthesized file after its evaluation.
        on_skip: called, before anything runs, with the targets already done.

    Returns:
        A :class:`SweepResult` with the rows of this run and of earlier runs in ``out_dir``.

    Raises:
        ValueError, SnapshotError: as for :func:`sweep`; if ``command`` lacks
            ``{weights}`` or its program is not found; or if ``out_dir`` holds
            results of another snapshot step.

    Example:
        >>> result = command_sweep("ckpts", [0.05, 0.1, 0.15], "python eval.py {weights}", "sweep")  # doctest: +SKIP
    """
    argv = _command_argv(command)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout={timeout!r} is not a positive number of seconds")
    if shutil.which(argv[0]) is None:
        raise ValueError(f"the evaluation command's program {argv[0]!r} is not found (not a file, not on PATH)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Plan every requested target, so the step and tracked range are known before anything runs.
    the_plan = plan(snapshot_dir, sigma_rels, step=step)
    targets = the_plan.sigma_rels
    earlier = _earlier_rows(out / RESULTS_JSON, the_plan.step)
    done = {k for k, r in earlier.items() if r.ok}
    todo = [i for i, s in enumerate(the_plan.sigma_rels) if target_key(s) not in done]
    if len(todo) < len(targets):
        skipped = [s for s in the_plan.sigma_rels if target_key(s) in done]
        log.info("%s: %d of %d targets already evaluated; skipping them", out, len(skipped), len(targets))
        if on_skip is not None:
            on_skip(skipped)
    rows = dict(earlier)
    # The ranking metric: the one asked for, else the one of the earlier run, else the first one returned.
    previous = SweepResult.from_json(out / RESULTS_JSON).metric if earlier and metric is None else None
    paths = {i: out / weights_name(the_plan.sigma_rels[i], the_plan.step) for i in todo}

    def result() -> SweepResult:
        ordered = tuple(sorted(rows.values(), key=lambda r: r.sigma_rel))
        first = next((r for r in ordered if r.metrics), None)
        return SweepResult(
            rows=ordered,
            metric=metric or previous or (next(iter(first.metrics)) if first else DEFAULT_METRIC),
            maximize=maximize,
            step=the_plan.step,
            tracked_sigma_rels=the_plan.tracked_sigma_rels,
        )

    def evaluate_at(j: int, state_dict: StateDict) -> Metrics:
        i = todo[j]
        save(paths[i], state_dict, the_plan, i)
        try:
            return run_command(command, paths[i], timeout=timeout)
        finally:
            if not keep_weights:
                paths[i].unlink(missing_ok=True)

    def record(row: SweepRow) -> None:
        path = out / weights_name(row.sigma_rel, the_plan.step)
        row = replace(row, weights=str(path) if keep_weights else None)
        rows[target_key(row.sigma_rel)] = row
        current = result()
        current.to_json(out / RESULTS_JSON)
        current.to_csv(out / RESULTS_CSV)
        if on_row is not None:
            on_row(row)

    if todo:
        out_dtype = parse_dtype(dtype)
        sub = the_plan.subset(todo)
        _run_plan(
            sub,
            evaluate_at,
            metric=metric,
            maximize=maximize,
            device=device,
            dtype=out_dtype,
            batch=_batch_size(sub, out_dtype, batch_size, memory_budget),
            on_row=record,
        )
    final = result()
    final.to_json(out / RESULTS_JSON)
    final.to_csv(out / RESULTS_CSV)
    return final


def _earlier_rows(path: Path, step: int) -> dict[str, SweepRow]:
    if not path.exists():
        return {}
    previous = SweepResult.from_json(path)
    if previous.step != step:
        raise ValueError(
            f"{path} holds results synthesized at step {previous.step}, the snapshots now give step {step}; "
            "choose another output folder or remove it to start afresh"
        )
    return {target_key(r.sigma_rel): r for r in previous.rows}
