"""The table of a sweep: one :class:`SweepRow` per target, gathered in a :class:`SweepResult`.

A result prints as aligned text (:meth:`SweepResult.format_table`), and is
written as ``results.json`` (read back by :meth:`SweepResult.from_json`, which
is what lets :func:`~posthoc_ema.sweeps.command_sweep` resume) and ``results.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posthoc_ema.files import atomic_path, named_as
from posthoc_ema.schedules import Constant, HalfLife, parse_schedule
from posthoc_ema.synthesis import format_error

__all__ = [
    "DEFAULT_METRIC",
    "RESULTS_CSV",
    "RESULTS_FORMAT",
    "RESULTS_JSON",
    "RESULTS_VERSION",
    "SweepResult",
    "SweepRow",
    "grid_axes",
    "row_order",
]

#: Name of a metric given as a bare number, when no ``metric`` name is chosen.
DEFAULT_METRIC = "metric"

#: The ``format`` entry of a ``results.json`` written by :meth:`SweepResult.to_json`.
RESULTS_FORMAT = "posthoc-ema/sweep"
RESULTS_VERSION = 1

#: Files :func:`~posthoc_ema.sweeps.command_sweep` writes into its output folder.
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


@dataclass(frozen=True)
class SweepRow:
    """One evaluated target.

    Attributes:
        sigma_rel: the target width; for a classic target its equivalent
            sigma_rel (:attr:`~posthoc_ema.synthesis.Plan.sigma_rels`), NaN when none.
        predicted_error: relative L2 error of its reconstructed profile (:attr:`Plan.errors`).
        outside: whether it lies outside the tracked sigma_rels.
        metrics: what ``evaluate`` returned, by name; empty if the evaluation failed.
        failure: why the evaluation failed, or None.
        weights: path of the synthesized file (:func:`command_sweep`), or None.
        target: a classic target's spec (:func:`~posthoc_ema.schedules.schedule_spec`,
            ``"constant:beta=0.999,start=8000"``); None for a power-function target.
    """

    sigma_rel: float
    predicted_error: float
    outside: bool
    metrics: Mapping[str, float] = field(default_factory=dict)
    failure: str | None = None
    weights: str | None = None
    target: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the evaluation succeeded."""
        return self.failure is None

    @property
    def label(self) -> str:
        """The target as text: its spec, or ``sigma_rel=...`` for a power function."""
        return self.target if self.target is not None else f"sigma_rel={self.sigma_rel:.4g}"


def grid_axes(row: SweepRow) -> tuple[str, float, float] | None:
    """``(kind, x, start)`` of a constant-decay or half-life row (``x`` its decay or half-life), else None.

    These are the two axes of a ``--beta ... --ema-start ...`` grid.

    Example:
        >>> grid_axes(SweepRow(0.05, 0.01, False, target="constant:beta=0.999,start=8000"))
        ('constant', 0.999, 8000.0)
    """
    if row.target is None:
        return None
    sched = parse_schedule(row.target)
    if isinstance(sched, Constant):
        return "constant", sched.decay, sched.start
    if isinstance(sched, HalfLife) and sched.update_interval == 1:
        return "half-life", sched.half_life, sched.start
    return None


def row_order(row: SweepRow) -> tuple[Any, ...]:
    """Sort key of rows: power-function targets by sigma_rel, then classic ones by kind, start and decay."""
    if row.target is None:
        return (0, row.sigma_rel)
    axes = grid_axes(row)
    if axes is None:
        return (2, row.target.partition(":")[0], 0.0, 0.0, row.target)
    kind, x, start = axes
    return (1, kind, start, x, row.target)


@dataclass(frozen=True)
class SweepResult:
    """The table of a sweep, sorted by sigma_rel.

    Attributes:
        rows: one :class:`SweepRow` per target.
        metric: the metric :attr:`best` ranks by.
        maximize: whether larger values of ``metric`` are better.
        step: the snapshot step the EMAs were synthesized at.
        tracked_sigma_rels: the sigma_rels of the snapshots used.
        fingerprint: what the rows were computed from, for
            :func:`~posthoc_ema.sweeps.command_sweep` to check on resume: the
            snapshot folder, its run ids, the command and the metric asked for;
            None for an in-process :func:`~posthoc_ema.sweeps.sweep` and for
            results written before fingerprints existed.
    """

    rows: tuple[SweepRow, ...]
    metric: str
    maximize: bool
    step: int
    tracked_sigma_rels: tuple[float, ...]
    fingerprint: Mapping[str, Any] | None = None

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
        classic = any(r.target is not None for r in self.rows)
        header = ["", "sigma_rel", *names, "predicted_error", ""]
        if classic:
            header.insert(1, "target")
        lines = []
        for r in self.rows:
            note = []
            if r.outside:
                note.append("outside tracked range")
            if r.failure is not None:
                note.append("FAILED: " + r.failure.splitlines()[0] if r.failure else "FAILED")
            width = f"{r.sigma_rel:.4g}"
            if r.target is not None:
                width = "-" if math.isnan(r.sigma_rel) else f"~{width}"  # the equivalent sigma_rel
            line = [
                "*" if r is best else "",
                width,
                *(_format_number(r.metrics[n]) if n in r.metrics else "-" for n in names),
                format_error(r.predicted_error),
                "; ".join(note),
            ]
            if classic:
                line.insert(1, r.target or "power")
            lines.append(line)
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *lines]
        )

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the table as CSV: sigma_rel, each metric, predicted_error, outside, failure, weights
        (and target, the spec of a classic target, when there is one)."""
        names = self.metric_names
        classic = any(r.target is not None for r in self.rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            ["sigma_rel", *names, "predicted_error", "outside", "failure", "weights"] + ["target"] * classic
        )
        for r in self.rows:
            writer.writerow(
                [
                    repr(float(r.sigma_rel)),
                    *(repr(float(r.metrics[n])) if n in r.metrics else "" for n in names),
                    repr(float(r.predicted_error)),
                    str(r.outside).lower(),
                    r.failure or "",
                    r.weights or "",
                ]
                + [r.target or ""] * classic
            )
        _write_text(Path(path), buffer.getvalue())

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data (non-finite numbers become None).

        NumPy and PyTorch scalars become Python numbers.
        """
        data: dict[str, Any] = {
            "format": RESULTS_FORMAT,
            "format_version": RESULTS_VERSION,
            "metric": str(self.metric),
            "maximize": bool(self.maximize),
            "step": int(self.step),
            "tracked_sigma_rels": [float(s) for s in self.tracked_sigma_rels],
            "rows": [
                {
                    "sigma_rel": _json_number(r.sigma_rel),
                    "metrics": {str(k): _json_number(v) for k, v in r.metrics.items()},
                    "predicted_error": _json_number(r.predicted_error),
                    "outside": bool(r.outside),
                    "failure": None if r.failure is None else str(r.failure),
                    "weights": None if r.weights is None else str(r.weights),
                }
                | ({} if r.target is None else {"target": str(r.target)})
                for r in self.rows
            ],
        }
        if self.fingerprint is not None:
            data["fingerprint"] = _plain(self.fingerprint)
        return data

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
                    sigma_rel=math.nan if r["sigma_rel"] is None else float(r["sigma_rel"]),
                    predicted_error=math.nan if r["predicted_error"] is None else float(r["predicted_error"]),
                    outside=bool(r["outside"]),
                    metrics={str(k): math.nan if v is None else float(v) for k, v in r["metrics"].items()},
                    failure=r.get("failure"),
                    weights=r.get("weights"),
                    target=r.get("target"),  # absent from results written before classic targets
                )
                for r in data["rows"]
            )
            return cls(
                rows=rows,
                metric=str(data["metric"]),
                maximize=bool(data["maximize"]),
                step=int(data["step"]),
                tracked_sigma_rels=tuple(float(s) for s in data["tracked_sigma_rels"]),
                fingerprint=_fingerprint(data.get("fingerprint")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: malformed sweep result ({type(err).__name__}: {err})") from None


def _format_number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _json_number(value: float) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _plain(value: Any) -> Any:
    """``value`` with NumPy scalars and tuples turned into JSON's own types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fingerprint(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"the fingerprint is a {type(value).__name__}, not an object")
    return value


def _write_text(path: Path, text: str) -> None:
    with named_as(path), atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
