"""Figures: reconstructed EMA profiles, predicted error across sigma_rel, sweep curves.

Needs matplotlib (``pip install 'posthoc-ema[plot]'``), imported only when a
function here is called. Figures are drawn on matplotlib's Agg canvas without
pyplot, so nothing here changes the backend or the state of your session. Each
function returns the :class:`matplotlib.figure.Figure` and, given a ``path``,
also saves it under exactly that name (the format follows the suffix: ``.png``,
``.pdf``, ``.svg``; PNG for a name without one).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from posthoc_ema import profiles, schedules
from posthoc_ema.results import grid_axes
from posthoc_ema.schedules import Schedule
from posthoc_ema.snapshots import SnapshotInfo
from posthoc_ema.synthesis import ERROR_WARNING_THRESHOLD, Plan, PoorReconstructionWarning, _update_grid, plan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from posthoc_ema.sweeps import SweepResult

__all__ = ["plot_error_curve", "plot_profile", "plot_sweep"]

#: Default figure size in inches and resolution: 1050 x 630 pixels.
FIGSIZE = (7.0, 4.2)
DPI = 150

_MISSING = "plotting needs matplotlib, which is not installed: pip install 'posthoc-ema[plot]'"

# Errors below this (0.001%) are drawn at it on the log axis: at the tracked
# sigma_rels the exact error is 0, and what is computed there is float64 noise.
_ERROR_FLOOR = 1e-5


def _figure(figsize: tuple[float, float], dpi: int) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(_MISSING) from err
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, path: str | os.PathLike[str] | None) -> Figure:
    if path is not None:
        # Without a suffix matplotlib would append ".png"; write PNG under exactly the name given instead.
        fmt = None if Path(path).suffix else "png"
        fig.savefig(os.fspath(path), dpi=fig.dpi, format=fmt)
    return fig


def plot_profile(
    the_plan: Plan,
    index: int = 0,
    path: str | os.PathLike[str] | None = None,
    *,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> Figure:
    """The target profile of one planned EMA, its reconstruction, and the weighted snapshots.

    Draws, against the training step, the power-function profile of target
    ``index`` (EDM2 eq. 121; for a classic schedule, its piecewise-constant
    profile over its update steps), the reconstruction ``sum_i c_i f_i(t)`` from the
    plan's snapshots, and each weighted snapshot profile ``c_i f_i(t)`` as a thin
    line coloured by its sigma_rel (cf. EDM2 Fig. 5). Densities are scaled by the
    plan's step so that 1 is the uniform average over the run.

    Args:
        the_plan: a :func:`~posthoc_ema.synthesis.plan`.
        index: which of its targets.
        path: where to save the figure; default not saved.
        figsize: inches.
        dpi: pixels per inch.

    Returns:
        The figure.

    Raises:
        ImportError: if matplotlib is not installed.
        IndexError: if ``index`` is not a target of the plan.

    Example:
        >>> plot_profile(plan("ckpts", 0.15), 0, "profile.png")  # doctest: +SKIP
    """
    n = len(the_plan.sigma_rels)
    if not -n <= index < n:
        raise IndexError(f"index={index} is not a target of the plan, which has {n}")
    index %= n
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    out_step = float(the_plan.step)
    sigma_rel = the_plan.sigma_rels[index]
    gamma = float(the_plan.gammas[index])
    power = np.array([not s.is_classic for s in the_plan.snapshots], dtype=bool)
    steps = np.array([s.step for s in the_plan.snapshots], dtype=np.float64)
    classic_coef = the_plan.coefficients[~power, index]
    classic = [s for s in the_plan.snapshots if s.is_classic]
    steps, sigmas = steps[power], np.array([s.sigma_rel for s in the_plan.snapshots])[power]
    gammas = profiles.sigma_rel_to_gamma(sigmas)
    coef = the_plan.coefficients[power, index]
    # A fine grid plus both sides of every snapshot step, where a profile drops to 0.
    edges = np.unique(steps)
    just_after = edges * (1 + 1e-9)
    t = np.unique(np.concatenate([np.linspace(0, out_step, 4001)[1:], edges, just_after[just_after < out_step]]))

    tracked = sorted(set(sigmas.tolist()))
    colors = [f"C{2 + k % 8}" for k in range(len(tracked))]
    for k, s in enumerate(tracked):
        rows = np.flatnonzero(sigmas == s)
        for j, i in enumerate(rows):
            ax.plot(
                t,
                coef[i] * profiles.power_profile(t, steps[i], gammas[i]) * out_step,
                color=colors[k],
                linewidth=0.6,
                alpha=0.55,
                label=f"{len(rows)} weighted snapshots of sigma_rel={s:.3g}" if j == 0 else None,
            )
    recon = (coef[:, None] * profiles.power_profile(t, steps[:, None], gammas[:, None])).sum(axis=0) * out_step
    for k, name in enumerate(sorted({str(s.name) for s in classic})):
        members = [m for m, s in enumerate(classic) if s.name == name]
        for j, m in enumerate(members):
            line = classic_coef[m] * _snapshot_density(the_plan, classic[m], t) * out_step
            recon = recon + line
            ax.plot(
                t, line, color=f"C{(2 + len(tracked) + k) % 10}", linewidth=0.6, alpha=0.55, linestyle=":",
                label=f"{len(members)} weighted snapshots of {name}" if j == 0 else None,
            )  # fmt: skip
    if the_plan.is_classic(index):
        target = _classic_density(the_plan, index, t) * out_step
        name = the_plan.labels[index]
        target_label = f"target: {name}" + ("" if np.isnan(sigma_rel) else f" (~sigma_rel {sigma_rel:.3g})")
    else:
        target = profiles.power_profile(t, out_step, gamma) * out_step
        name = f"sigma_rel={sigma_rel:.3g}"
        target_label = f"target: sigma_rel={sigma_rel:.3g} (gamma={gamma:.3g})"
    ax.plot(t, target, color="black", linewidth=2.4, label=target_label)
    ax.plot(t, recon, color="C1", linewidth=1.6, linestyle="--", label="reconstruction from the snapshots")
    ax.axhline(0, color="0.5", linewidth=0.6)
    ax.set_xlim(0, out_step)
    # Large coefficients of opposite signs can send single snapshot lines far out;
    # the axes follow the target and the reconstruction, and clip those lines.
    top = max(float(target.max()), float(recon.max()))
    low = min(0.0, float(recon.min()))
    ax.set_ylim(low - 0.06 * top, 1.1 * top)
    # Start where the target or its reconstruction leaves 0 (a narrow profile uses
    # only the end of the run), with a margin.
    visible = np.flatnonzero(np.maximum(np.abs(target), np.abs(recon)) > 2e-3 * top)
    start = max(0.0, float(t[visible[0]]) - 0.05 * out_step) if visible.size else 0.0
    ax.set_xlim(start if start > 0.1 * out_step else 0.0, out_step)
    ax.set_xlabel("training step")
    ax.set_ylabel("weight density (1 = uniform over the run)")
    where = " (outside the tracked range)" if the_plan.outside[index] else ""
    ax.set_title(
        f"EMA profile {name} at step {the_plan.step}{where}\n"
        f"from {len(steps)} snapshots; predicted error {the_plan.errors[index]:.2%}",
        fontsize="medium",
    )
    ax.legend(loc="upper left", fontsize="small", framealpha=0.85)
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def _snapshot_density(the_plan: Plan, info: SnapshotInfo, t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A classic snapshot's piecewise-constant profile at times ``t``, on the update grid of its run."""
    schedule = schedules.from_metadata(str(info.schedule))
    update_steps = _update_grid(info.update_every, info.step, [s.step for s in the_plan.snapshots])
    return _classic_weights_density(schedule, float(info.step), update_steps, t)


def _classic_weights_density(
    schedule: Schedule, out_step: float, update_steps: npt.NDArray[np.float64] | None, t: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    grid = np.arange(1.0, out_step + 1) if update_steps is None else update_steps
    weights = schedule.weights(grid, out_step)
    weights[1] += weights[0]
    density = weights[1:] / np.diff(np.concatenate([[0.0], grid]))
    slot = np.clip(np.searchsorted(grid, t, side="left"), 0, grid.size - 1)
    return np.where((t > 0) & (t <= out_step), density[slot], 0.0)


def _classic_density(the_plan: Plan, index: int, t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A classic target's piecewise-constant profile at times ``t`` (its initial copy counted on the first update)."""
    update_steps = the_plan.update_steps()
    grid = np.arange(1.0, the_plan.step + 1) if update_steps is None else update_steps
    weights = the_plan.targets[index].weights(grid, float(the_plan.step))
    weights[1] += weights[0]
    density = weights[1:] / np.diff(np.concatenate([[0.0], grid]))
    slot = np.clip(np.searchsorted(grid, t, side="left"), 0, grid.size - 1)
    return np.where(t > 0, density[slot], 0.0)


def plot_error_curve(
    source: str | os.PathLike[str] | Plan,
    sigma_rels: Iterable[float] | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    step: int | None = None,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> Figure:
    """Predicted reconstruction error across sigma_rel for the snapshots on disk (log scale).

    Reads only the snapshots' headers. The tracked sigma_rels are marked, the
    range outside them shaded, and :data:`~posthoc_ema.synthesis.ERROR_WARNING_THRESHOLD`
    drawn as a line.

    Args:
        source: a snapshot folder, or a plan already solved for the sigma_rels to draw.
        sigma_rels: the sigma_rels to draw (a fine grid); required with a folder.
        path: where to save the figure; default not saved.
        step: snapshot step, with a folder; default the latest.
        figsize: inches.
        dpi: pixels per inch.

    Returns:
        The figure.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError, SnapshotError: as for :func:`~posthoc_ema.synthesis.plan`.

    Example:
        >>> plot_error_curve("ckpts", np.linspace(0.01, 0.25, 97), "error.png")  # doctest: +SKIP
    """
    if isinstance(source, Plan):
        the_plan = source
        if sigma_rels is not None or step is not None:
            raise ValueError("give sigma_rels and step with a snapshot folder, not with a plan")
    else:
        if sigma_rels is None:
            raise ValueError("sigma_rels is required with a snapshot folder, e.g. np.linspace(0.01, 0.25, 97)")
        grid = np.asarray(list(sigma_rels), dtype=np.float64)
        with warnings.catch_warnings():  # the curve shows the errors; no warning per target
            warnings.simplefilter("ignore", PoorReconstructionWarning)
            the_plan = plan(source, grid, step=step)
            # Add the tracked sigma_rels inside the grid, where the error drops to 0.
            extra = [
                s
                for s in the_plan.tracked_sigma_rels
                if grid.min() <= s <= grid.max() and not any(profiles.same_sigma_rel(g, s) for g in grid)
            ]
            if extra:
                the_plan = plan(source, np.concatenate([grid, extra]), step=step)
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    order = np.argsort(the_plan.sigma_rels)
    x = np.asarray(the_plan.sigma_rels)[order]
    err = np.maximum(the_plan.errors[order], _ERROR_FLOOR)
    tracked = the_plan.tracked_sigma_rels
    lo, hi = min(tracked), max(tracked)
    x0, x1 = float(x.min()), float(x.max())
    pad = 0.02 * (x1 - x0 or 1.0)
    ax.set_xlim(x0 - pad, x1 + pad)
    if x0 < lo:
        ax.axvspan(x0 - pad, lo, color="0.94", zorder=0)
    if x1 > hi:
        ax.axvspan(hi, x1 + pad, color="0.94", zorder=0, label="outside the tracked range")
    ax.plot(
        x, err, color="C0", linewidth=1.6, marker="o" if len(x) <= 40 else None, markersize=3, label="predicted error"
    )
    ax.axhline(
        ERROR_WARNING_THRESHOLD,
        color="C3",
        linestyle="--",
        linewidth=1,
        label=f"warning threshold ({ERROR_WARNING_THRESHOLD:.0%})",
    )
    for k, s in enumerate(tracked):
        ax.axvline(s, color="0.3", linestyle=":", linewidth=1.2, label="tracked sigma_rels" if k == 0 else None)
    ax.set_yscale("log")
    ax.set_ylim(_ERROR_FLOOR / 1.5, max(1.0, float(err.max()) * 2))
    ax.yaxis.set_major_formatter(_percent_formatter())
    floor_note = (
        f"\n(errors below {_ERROR_FLOOR:.3%} are drawn at {_ERROR_FLOOR:.3%})"
        if (the_plan.errors < _ERROR_FLOOR).any()
        else ""
    )
    ax.set_xlabel("sigma_rel (EMA width / training length)")
    ax.set_ylabel("predicted relative L2 error of the profile")
    steps = sorted({s.step for s in the_plan.snapshots})
    ax.set_title(
        f"Reconstruction error at step {the_plan.step} from {len(the_plan.snapshots)} snapshots "
        f"(steps {steps[0]}-{steps[-1]}){floor_note}",
        fontsize="medium",
    )
    ax.legend(loc="lower right", fontsize="small", framealpha=0.9)
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def _percent_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v * 100:.10g}%")


def plot_sweep(
    result: SweepResult,
    path: str | os.PathLike[str] | None = None,
    *,
    metric: str | None = None,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> Figure:
    """A sweep's metric against sigma_rel, the best point and the tracked sigma_rels marked.

    Power-function targets are drawn against sigma_rel. Constant-decay and
    half-life targets (``--beta``, ``--half-life``) get a panel each, with one
    curve per EMA start against the decay (or half-life), so a decay x start
    grid shows both axes. Other classic targets are drawn as diamonds on the
    sigma_rel panel at their equivalent sigma_rel. Targets whose predicted reconstruction error exceeds
    :data:`~posthoc_ema.synthesis.ERROR_WARNING_THRESHOLD` are drawn hollow (their
    weights average the run differently from their label); failed evaluations are
    marked with a cross on the x axis.

    Args:
        result: a :class:`~posthoc_ema.sweeps.SweepResult`.
        path: where to save the figure; default not saved.
        metric: the metric to draw; default the one the result ranks by.
        figsize: inches.
        dpi: pixels per inch.

    Returns:
        The figure.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError: if no row has a value of the metric.

    Example:
        >>> plot_sweep(sweep("ckpts", grid, evaluate), "sweep.png")  # doctest: +SKIP
    """
    name = result.metric if metric is None else metric
    values = result.values(name)
    if not np.isfinite(values).any():
        raise ValueError(f"no row of the sweep has a finite value of metric {name!r}")
    grids: dict[str, list[int]] = {}
    for i, r in enumerate(result.rows):
        axes = grid_axes(r)
        if axes is not None:
            grids.setdefault(axes[0], []).append(i)
    power = [i for i, r in enumerate(result.rows) if r.target is None]
    others = [i for i, r in enumerate(result.rows) if r.target is not None and grid_axes(r) is None]
    panels = int(bool(power or others)) + len(grids)
    fig = _figure((figsize[0] * (1 + 0.7 * (panels - 1)), figsize[1]), dpi)
    best = result.best if name == result.metric else None
    direction = "higher is better" if result.maximize else "lower is better"
    ylabel = f"{name} ({direction})" if name == result.metric else name
    n_panel = 0
    if power or others:
        n_panel += 1
        ax = fig.add_subplot(1, panels, n_panel)
        _sigma_rel_panel(ax, result, power, others, name, best)
        ax.set_ylabel(ylabel)
    for kind, index in grids.items():
        n_panel += 1
        ax = fig.add_subplot(1, panels, n_panel, sharey=fig.axes[0] if fig.axes else None)
        _grid_panel(ax, result, kind, index, name, best)
        if n_panel == 1:
            ax.set_ylabel(ylabel)
    title = f"Post-hoc EMA sweep at step {result.step} ({len(result.rows)} targets)"
    if panels == 1:
        fig.axes[0].set_title(title, fontsize="medium")
    else:
        fig.suptitle(title, fontsize="medium")
    return _finish(fig, path)


def _nines(beta: Any) -> Any:
    return -np.log10(np.clip(1.0 - np.asarray(beta, dtype=np.float64), 1e-15, None))


def _from_nines(nines: Any) -> Any:
    return 1.0 - 10.0 ** -np.asarray(nines, dtype=np.float64)


def _grid_panel(ax: Any, result: SweepResult, kind: str, index: list[int], name: str, best: Any) -> None:
    """One curve per EMA start, the metric against the decay (or half-life)."""
    rows = [result.rows[i] for i in index]
    axes = [grid_axes(r) for r in rows]
    starts = sorted({a[2] for a in axes if a is not None})
    for k, start in enumerate(starts):
        pts = sorted(
            (a[1], r.metrics.get(name, np.nan), r) for a, r in zip(axes, rows, strict=True) if a and a[2] == start
        )
        x = np.array([p[0] for p in pts])
        y = np.array([p[1] for p in pts], dtype=np.float64)
        poor = np.array([p[2].predicted_error > ERROR_WARNING_THRESHOLD for p in pts])
        color = f"C{k % 10}"
        ax.plot(x, y, color=color, linewidth=1.2, marker="o", markersize=4, label=f"EMA start {start:g}")
        if (np.isfinite(y) & poor).any():
            ax.scatter(x[poor], y[poor], facecolors="white", edgecolors=color, s=30, zorder=3)
        for p in pts:
            if p[2] is best:
                ax.scatter(
                    [p[0]],
                    [p[1]],
                    marker="*",
                    s=220,
                    color="C1",
                    edgecolors="black",
                    zorder=4,
                    label=f"best: {best.target}, {name}={p[1]:.4g}",
                )
    if kind == "constant":
        ax.set_xlabel("decay beta (hollow: predicted error > 5%)")
        if all(a is not None and a[1] > 0.9 for a in axes):
            # Decays near 1 spread out as -log10(1 - beta): 0.999 and 0.9999 one unit apart.
            ax.set_xscale("function", functions=(_nines, _from_nines))
    else:
        ax.set_xlabel("half-life in steps (hollow: predicted error > 5%)")
        ax.set_xscale("log")
    ax.set_title(f"{kind} EMAs: one curve per start", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", framealpha=0.9)


def _sigma_rel_panel(ax: Any, result: SweepResult, power: list[int], others: list[int], name: str, best: Any) -> None:
    """The power-function targets against sigma_rel (the classic figure); other classic targets as diamonds."""
    rows = [result.rows[i] for i in power]
    x = np.array([r.sigma_rel for r in rows], dtype=np.float64)
    y = np.array([r.metrics.get(name, np.nan) for r in rows], dtype=np.float64)
    ok = np.isfinite(y)
    poor = np.array([r.predicted_error > ERROR_WARNING_THRESHOLD for r in rows], dtype=bool)
    ax.plot(x, y, color="C0", linewidth=1.2, zorder=2)  # NaN (failed, missing) breaks the line
    good = ok & ~poor
    ax.scatter(x[good], y[good], color="C0", s=22, zorder=3, label=name)
    if (ok & poor).any():
        ax.scatter(
            x[ok & poor],
            y[ok & poor],
            facecolors="white",
            edgecolors="C0",
            s=22,
            zorder=3,
            label=f"predicted error > {ERROR_WARNING_THRESHOLD:.0%}",
        )
    for k, s in enumerate(result.tracked_sigma_rels):
        ax.axvline(
            s, color="0.3", linestyle=":", linewidth=1.2, zorder=1, label="tracked sigma_rels" if k == 0 else None
        )
    failed = np.array([not r.ok for r in rows], dtype=bool)
    if failed.any():
        # At the foot of the axes, in axes coordinates: a failure has no value to draw.
        ax.scatter(
            x[failed],
            np.full(int(failed.sum()), 0.03),
            transform=ax.get_xaxis_transform(),
            marker="x",
            color="C3",
            s=30,
            zorder=3,
            label="evaluation failed",
        )
    for i in others:
        r = result.rows[i]
        value = r.metrics.get(name, np.nan)
        if np.isfinite(r.sigma_rel) and np.isfinite(value):
            ax.scatter([r.sigma_rel], [value], marker="D", s=30, color="C2", zorder=3)
            ax.annotate(
                r.target or "", (r.sigma_rel, value), fontsize="x-small", xytext=(4, 4), textcoords="offset points"
            )
    if best is not None and best.target is None:
        value = best.metrics[name]
        ax.scatter(
            [best.sigma_rel],
            [value],
            marker="*",
            s=220,
            color="C1",
            edgecolors="black",
            zorder=4,
            label=f"best: sigma_rel={best.sigma_rel:.3g}, {name}={value:.4g}",
        )
    ax.set_xlabel("sigma_rel (EMA width / training length)")
    ax.margins(x=0.03, y=0.12)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", framealpha=0.9)
