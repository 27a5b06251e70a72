"""Post-hoc synthesis: the EMA of any sigma_rel from the snapshots in a folder.

:func:`plan` reads only the snapshots' headers and solves for the weights
(:mod:`posthoc_ema.profiles`); :func:`synthesize_many` then streams the tensors
once, accumulating every target at the same time, so memory stays at about
the outputs plus a bounded buffer whatever the number of snapshots.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from safetensors import safe_open

from posthoc_ema import profiles
from posthoc_ema._version import __version__
from posthoc_ema.snapshots import (
    SYNTHESIZED_FORMAT,
    SnapshotError,
    SnapshotInfo,
    dtype_name,
    list_snapshots,
    parse_dtype,
    write_atomic,
)

__all__ = [
    "ERROR_WARNING_THRESHOLD",
    "Plan",
    "PoorReconstructionWarning",
    "StateDict",
    "plan",
    "run",
    "save",
    "synthesize",
    "synthesize_many",
]

StateDict = dict[str, torch.Tensor]

#: A predicted relative L2 error of the reconstructed profile above this draws a
#: :class:`PoorReconstructionWarning`: the result averages the run noticeably
#: differently from the requested EMA.
ERROR_WARNING_THRESHOLD = 0.05

# Bytes of snapshot data gathered for one matrix product; bounds the memory
# used beyond the outputs, whatever the number of snapshots.
_CHUNK_BYTES = 64 << 20
# Snapshot files open at once; more snapshots are streamed in several passes.
_MAX_OPEN = 256


class PoorReconstructionWarning(UserWarning):
    """The snapshots reproduce a requested profile only roughly (see :attr:`Plan.errors`)."""


@dataclass(frozen=True)
class Plan:
    """How targets are built from snapshots, known before any tensor is read.

    Attributes:
        step: the step reconstructed.
        sigma_rels: the targets.
        gammas: their exponents.
        snapshots: the snapshots used (step <= ``step``), sorted by (step, sigma_rel).
        coefficients: ``[n_snapshots, n_targets]`` float64 weights; columns sum to 1.
        errors: predicted relative L2 error of each reconstructed profile.
        coefficient_norms: L2 norm of each column; large norms amplify noise.
        outside: whether each target lies outside the tracked sigma_rel range.
    """

    step: int
    sigma_rels: tuple[float, ...]
    gammas: npt.NDArray[np.float64]
    snapshots: tuple[SnapshotInfo, ...]
    coefficients: npt.NDArray[np.float64]
    errors: npt.NDArray[np.float64]
    coefficient_norms: npt.NDArray[np.float64]
    outside: npt.NDArray[np.bool_]

    @property
    def tracked_sigma_rels(self) -> tuple[float, ...]:
        """The sigma_rels of the snapshots used."""
        return tuple(sorted({s.sigma_rel for s in self.snapshots}))

    def metadata(self, index: int) -> dict[str, str]:
        """Safetensors metadata describing target ``index``."""
        return {
            "format": SYNTHESIZED_FORMAT,
            "format_version": "1",
            "sigma_rel": repr(self.sigma_rels[index]),
            "gamma": repr(float(self.gammas[index])),
            "step": str(self.step),
            "predicted_error": repr(float(self.errors[index])),
            "snapshots": str(len(self.snapshots)),
            "library_version": __version__,
        }


def _check_consistent(snapshots: Sequence[SnapshotInfo]) -> None:
    seen: dict[tuple[int, float], SnapshotInfo] = {}
    for info in snapshots:
        twin = seen.setdefault((info.step, info.sigma_rel), info)
        if twin is not info:
            raise SnapshotError(
                f"{info.path} and {twin.path} are both snapshots of sigma_rel={info.sigma_rel} at step {info.step}; "
                "is the folder mixing two runs?"
            )
    first = snapshots[0]
    layout = {name: shape for name, (_, shape) in first.tensors.items()}
    for info in snapshots[1:]:
        other = {name: shape for name, (_, shape) in info.tensors.items()}
        if other != layout:
            names = sorted(set(layout) ^ set(other))
            detail = (
                f"tensor names differ (e.g. {names[0]!r})"
                if names
                else "shapes differ (e.g. {0!r}: {1} vs {2})".format(
                    *next((n, layout[n], other[n]) for n in layout if layout[n] != other[n])
                )
            )
            raise SnapshotError(f"{info.path} does not match {first.path}: {detail}")


def _pick_step(steps: Sequence[int], step: int | None) -> int:
    if step is None:
        return max(steps)
    grid = sorted(set(steps))
    if step > grid[-1]:
        raise ValueError(f"step={step} is after the last snapshot (step {grid[-1]})")
    if step not in grid:
        nearest = sorted(sorted(grid, key=lambda s: abs(s - step))[:2])
        raise ValueError(
            f"step={step} is not a snapshot step; the nearest are {', '.join(map(str, nearest))} "
            "(a synthesized EMA can only be read where snapshots were taken)"
        )
    return step


def plan(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: float | Iterable[float],
    *,
    step: int | None = None,
) -> Plan:
    """Solve for the weights of each target without reading any tensor.

    Args:
        snapshot_dir: folder of snapshots written by :class:`PostHocEMA`.
        sigma_rels: target sigma_rel(s), each in (0, sqrt(1/12)).
        step: a snapshot step to reconstruct at; default the latest. Only
            snapshots at or before it are used.

    Returns:
        A :class:`Plan` with coefficients and predicted errors.

    Raises:
        ValueError: for a sigma_rel out of range or a step that is not a snapshot step.
        SnapshotError: for a missing folder, a folder without snapshots, a corrupt
            snapshot, snapshots that disagree on tensors, or a repeated (step, sigma_rel).

    Example:
        >>> p = plan("ckpts", [0.05, 0.15])  # doctest: +SKIP
        >>> p.errors  # doctest: +SKIP
        array([0.0004, 0.0061])
    """
    targets = (float(sigma_rels),) if isinstance(sigma_rels, (int, float)) else tuple(float(s) for s in sigma_rels)
    if not targets:
        raise ValueError("sigma_rels is empty; give at least one target sigma_rel")
    gammas = profiles.sigma_rel_to_gamma(targets)
    found = list_snapshots(snapshot_dir)
    if not found:
        raise SnapshotError(f"{snapshot_dir}: no snapshots (no .safetensors file with posthoc-ema snapshot metadata)")
    out_step = _pick_step([s.step for s in found], step)
    used = tuple(s for s in found if s.step <= out_step)
    _check_consistent(used)
    in_steps = [s.step for s in used]
    in_sigmas = [s.sigma_rel for s in used]
    coef = profiles.solve_coefficients(in_steps, in_sigmas, out_step, targets)
    errors = profiles.reconstruction_error(coef, in_steps, in_sigmas, out_step, targets)
    lo, hi = min(in_sigmas), max(in_sigmas)
    result = Plan(
        step=out_step,
        sigma_rels=targets,
        gammas=gammas,
        snapshots=used,
        coefficients=coef,
        errors=errors,
        coefficient_norms=np.linalg.norm(coef, axis=0),
        outside=np.array([not (lo <= s <= hi) for s in targets]),
    )
    for s, err in zip(targets, errors):
        if err > ERROR_WARNING_THRESHOLD:
            warnings.warn(
                f"sigma_rel={s}: the snapshots reproduce its profile with a predicted relative error of "
                f"{err:.1%} (above {ERROR_WARNING_THRESHOLD:.0%}); track sigma_rels around it or snapshot more often",
                PoorReconstructionWarning,
                stacklevel=2,
            )
    return result


def _open(info: SnapshotInfo, device: str) -> safe_open:
    try:
        return safe_open(str(info.path), framework="pt", device=device)
    except Exception as err:  # safetensors raises its own types
        raise SnapshotError(f"{info.path}: cannot open snapshot ({err})") from None


def synthesize_many(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: Iterable[float],
    *,
    step: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[float, StateDict]:
    """Synthesize the EMA of several sigma_rels in one pass over the snapshots.

    Each snapshot tensor is read once (in bounded row chunks) and multiplied
    into every target at once, in float32 with float64-solved weights.

    Args:
        snapshot_dir: folder of snapshots.
        sigma_rels: target sigma_rels.
        step: snapshot step to reconstruct at; default the latest.
        device: where to accumulate (``"cuda"`` for a GPU); default CPU.
        dtype: dtype of floating outputs (float32, bfloat16, float16).
        progress: called with (bytes done, bytes total) as the pass goes on.

    Returns:
        ``{sigma_rel: state_dict}``; each loads with ``model.load_state_dict(sd, strict=True)``.
        Non-floating entries are copied from the latest snapshot used.

    Raises:
        ValueError, SnapshotError: as for :func:`plan`, and for a snapshot that
            cannot be read.

    Example:
        >>> sds = synthesize_many("ckpts", [0.05, 0.10, 0.15])  # doctest: +SKIP
        >>> model.load_state_dict(sds[0.15])  # doctest: +SKIP
    """
    return run(plan(snapshot_dir, sigma_rels, step=step), device=device, dtype=dtype, progress=progress)


def run(
    the_plan: Plan,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[float, StateDict]:
    """Carry out a :func:`plan`: the streaming pass of :func:`synthesize_many`."""
    out_dtype = parse_dtype(dtype)
    dev = torch.device(device if device is not None else "cpu")
    snaps = the_plan.snapshots
    n_out = len(the_plan.sigma_rels)
    weights = torch.tensor(the_plan.coefficients.T, dtype=torch.float32, device=dev)  # [n_out, n_in]
    latest = snaps[-1]
    floating = {k: shape for k, (dt, shape) in latest.tensors.items() if dt in _ITEMSIZE}
    sums = {k: torch.zeros(n_out, math.prod(shape), dtype=torch.float32, device=dev) for k, shape in floating.items()}
    total = sum(s.path.stat().st_size for s in snaps)
    done = 0
    for start in range(0, len(snaps), _MAX_OPEN):
        batch = snaps[start : start + _MAX_OPEN]
        handles = [_open(info, "cpu") for info in batch]
        w = weights[:, start : start + len(batch)]
        for key, shape in floating.items():
            _accumulate(sums[key], w, handles, batch, key, shape)
            done += sum(math.prod(shape) * _ITEMSIZE[info.tensors[key][0]] for info in batch)
            if progress is not None:
                progress(done, total)
    with _open(latest, "cpu") as f:
        copied = {k: f.get_tensor(k) for k in latest.tensors if k not in floating}
    result: dict[float, StateDict] = {}
    for j, sigma_rel in enumerate(the_plan.sigma_rels):
        sd: StateDict = {k: sums[k][j].view(shape).to(out_dtype) for k, shape in floating.items()}
        sd.update({k: t.to(dev, copy=True) for k, t in copied.items()})
        result[sigma_rel] = sd
    if progress is not None:
        progress(total, total)
    return result


# Floating safetensors dtypes, which are averaged, and their sizes in bytes.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _accumulate(
    out: torch.Tensor,
    weights: torch.Tensor,
    handles: Sequence[safe_open],
    infos: Sequence[SnapshotInfo],
    key: str,
    shape: tuple[int, ...],
) -> None:
    """``out += weights @ stack(snapshot tensors)``, reading ``key`` in row chunks."""
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if shape else 1
    rows_per_chunk = max(1, _CHUNK_BYTES // (4 * len(handles) * max(row_numel, 1)))
    buffer = torch.empty(len(handles), min(rows, rows_per_chunk) * row_numel, dtype=torch.float32, device=out.device)
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        chunk = buffer[:, : (r1 - r0) * row_numel]
        for i, (f, info) in enumerate(zip(handles, infos)):
            try:
                part = f.get_tensor(key) if (not shape or (r0 == 0 and r1 == rows)) else f.get_slice(key)[r0:r1]
            except Exception as err:
                raise SnapshotError(f"{info.path}: cannot read tensor {key!r} ({err})") from None
            chunk[i].copy_(part.reshape(-1))
        out[:, r0 * row_numel : r1 * row_numel].addmm_(weights, chunk)


def synthesize(
    snapshot_dir: str | os.PathLike[str],
    sigma_rel: float,
    *,
    step: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> StateDict:
    """Synthesize the EMA of one ``sigma_rel`` from a folder of snapshots.

    Same as ``synthesize_many(snapshot_dir, [sigma_rel], ...)[sigma_rel]``.

    Example:
        >>> sd = synthesize("ckpts", sigma_rel=0.15)  # doctest: +SKIP
        >>> model.load_state_dict(sd)  # doctest: +SKIP
    """
    return synthesize_many(snapshot_dir, [sigma_rel], step=step, device=device, dtype=dtype)[float(sigma_rel)]


def save(path: str | os.PathLike[str], state_dict: StateDict, the_plan: Plan, index: int) -> None:
    """Write target ``index`` of a plan atomically as a self-describing safetensors file."""
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state_dict.items()}
    meta = the_plan.metadata(index)
    meta["dtype"] = dtype_name(next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32))
    write_atomic(Path(path), tensors, meta)
