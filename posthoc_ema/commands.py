"""Sweeps whose evaluation is an external command: run it, read its metric, resume.

:func:`run_command` runs one evaluation (``python eval.py {weights}``) in a
session of its own, with no stdin, and reads the metric from its last line of
output. :func:`command_sweep` is a :func:`~posthoc_ema.sweeps.sweep` built on
it: it writes each synthesized file, saves ``results.json`` and ``results.csv``
after every target and, run again, skips the targets already done, once it has
checked that the earlier results come from the same snapshots, command and metric.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from posthoc_ema.dtypes import parse_dtype
from posthoc_ema.errors import EvaluationError
from posthoc_ema.files import named_as
from posthoc_ema.results import DEFAULT_METRIC, RESULTS_CSV, RESULTS_JSON, SweepResult, SweepRow, row_order
from posthoc_ema.schedules import Schedule
from posthoc_ema.synthesis import Plan, StateDict, plan, save, target_key

if TYPE_CHECKING:
    from posthoc_ema.checkpoints import CheckpointPlan

__all__ = [
    "WEIGHTS_PLACEHOLDER",
    "command_sweep",
    "parse_metric_line",
    "run_command",
    "target_weights_name",
    "weights_name",
]

log = logging.getLogger(__name__)

#: Placeholder that :func:`run_command` replaces by the path of the weights.
WEIGHTS_PLACEHOLDER = "{weights}"

Metrics = float | Mapping[str, float]

# Lines of a failed command's stderr kept in its row.
_STDERR_LINES = 20

# Seconds to wait for the output pipes to close once the command's process group is killed.
_DRAIN_SECONDS = 5.0


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


def _decode(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw


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


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill the command and everything it started in its session (its process group)."""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    else:  # pragma: no cover - Windows has no process groups to kill
        process.kill()


def _communicate(argv: list[str], timeout: float | None) -> tuple[int, str, str]:
    """Run ``argv`` in a new session with stdin from /dev/null; (status, stdout, stderr), or TimeoutExpired.

    The command's process group is killed when it ends, times out or is
    interrupted, so nothing it started in the background outlives it.
    """
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            try:
                stdout, stderr = process.communicate(timeout=_DRAIN_SECONDS)
            except subprocess.TimeoutExpired:  # a process that left the group still holds the pipes
                stdout, stderr = b"", b""
            raise subprocess.TimeoutExpired(argv, timeout or 0.0, output=stdout, stderr=stderr) from None
    finally:
        _kill_group(process)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
        process.wait()
    return process.returncode, _decode(stdout), _decode(stderr)


def run_command(command: str, weights: str | os.PathLike[str], *, timeout: float | None = None) -> Metrics:
    """Run an evaluation command on a weights file and read its metric.

    ``{weights}`` in ``command`` is replaced by the path. The command is split
    like a shell would (``shlex``) but run without a shell; use ``sh -c '...'``
    for pipes. It runs in a session of its own (``start_new_session``) with
    stdin from ``/dev/null``, so it cannot wait for input; when it ends or times
    out, its whole process group is killed, background processes included. Its
    output is decoded as UTF-8, undecodable bytes replaced. Its last non-empty
    line of stdout must be a number or a JSON object of numbers.

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
        status, stdout, stderr = _communicate(argv, timeout)
    except FileNotFoundError:
        raise EvaluationError(f"{shown}: command not found: {argv[0]!r}") from None
    except subprocess.TimeoutExpired as err:
        partial = _tail(_decode(err.stderr))
        detail = f"\n{partial}" if partial.strip() else ""
        raise EvaluationError(f"{shown}: timed out after {timeout} s{detail}") from None
    except OSError as err:
        raise EvaluationError(f"{shown}: cannot run ({err})") from None
    stderr = _tail(stderr)
    if status != 0:
        raise EvaluationError(f"{shown}: exited with status {status}" + (f"\n{stderr}" if stderr else ""))
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise EvaluationError(
            f"{shown}: printed nothing on stdout; its last line must be a number or a JSON object"
            + (f"\n{stderr}" if stderr else "")
        )
    try:
        return parse_metric_line(lines[-1])
    except ValueError as err:
        raise EvaluationError(f"{shown}: the last line of its stdout is not a metric: {err}") from None


def weights_name(sigma_rel: float, step: int) -> str:
    """File name of the synthesized EMA of ``sigma_rel`` at ``step`` in a sweep's output folder.

    >>> weights_name(0.1, 4000)
    'ema-0.1-4000.safetensors'
    """
    return f"ema-{float(sigma_rel)!r}-{int(step)}.safetensors"


def target_weights_name(the_plan: Plan | CheckpointPlan, index: int) -> str:
    """File name of target ``index`` of a plan (of snapshots or checkpoints): :func:`weights_name` for a sigma_rel.

    For a classic schedule, its spec with ``:`` and ``,`` made ``-`` and ``_``:
    ``ema-constant-beta=0.999_start=8000-20000.safetensors``.
    """
    if not the_plan.is_classic(index):
        return weights_name(the_plan.sigma_rels[index], the_plan.step)
    spec = the_plan.labels[index].replace(":", "-").replace(",", "_")
    return f"ema-{spec}-{int(the_plan.step)}.safetensors"


def _row_key(row: SweepRow) -> str:
    return row.target if row.target is not None else target_key(row.sigma_rel)


def _fingerprint(
    the_plan: Plan, snapshot_dir: str | os.PathLike[str], command: str, metric: str | None
) -> dict[str, Any]:
    return {
        "snapshot_dir": str(Path(snapshot_dir).resolve()),
        "run_ids": sorted({s.run_id for s in the_plan.snapshots if s.run_id is not None}),
        "command": command,
        "metric": metric,
        "classic_basis": bool(the_plan.classic_snapshots),
    }


def _check_fingerprint(path: Path, earlier: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse to resume from results computed from other snapshots or by another command or metric."""
    advice = "choose another output folder, or remove it to start afresh"
    if earlier.get("run_ids") != now["run_ids"] or earlier.get("snapshot_dir") != now["snapshot_dir"]:
        raise ValueError(
            f"{path} holds results of the snapshots in {earlier.get('snapshot_dir')} "
            f"(runs {', '.join(earlier.get('run_ids') or []) or 'unnamed'}), not of {now['snapshot_dir']} "
            f"(runs {', '.join(now['run_ids']) or 'unnamed'}); {advice}"
        )
    if bool(earlier.get("classic_basis", False)) != now["classic_basis"]:  # results older than the key used none
        used = "with" if now["classic_basis"] else "without"
        raise ValueError(
            f"{path} holds results synthesized {'without' if now['classic_basis'] else 'with'} the classic snapshots "
            f"as basis profiles, and this sweep is {used} them (--no-classic / use_classic=); {advice}"
        )
    if shlex.split(str(earlier.get("command"))) != shlex.split(now["command"]):
        raise ValueError(
            f"{path} holds results of the evaluation command {earlier.get('command')!r}, "
            f"not of {now['command']!r}; {advice}"
        )
    if now["metric"] is not None and earlier.get("metric") not in (None, now["metric"]):
        raise ValueError(
            f"{path} holds results ranked by metric {earlier.get('metric')!r}, not {now['metric']!r}; "
            f"pass metric={earlier.get('metric')!r} to resume, or {advice}"
        )


def _earlier_result(path: Path, step: int, fingerprint: Mapping[str, Any]) -> SweepResult | None:
    if not path.exists():
        return None
    previous = SweepResult.from_json(path)
    if previous.step != step:
        raise ValueError(
            f"{path} holds results synthesized at step {previous.step}, the snapshots now give step {step}; "
            "choose another output folder or remove it to start afresh"
        )
    if previous.fingerprint is not None:  # results written before fingerprints existed are taken on trust
        _check_fingerprint(path, previous.fingerprint, fingerprint)
    metric = fingerprint["metric"]
    done = [r for r in previous.rows if r.ok]
    if metric is not None and done and not any(metric in r.metrics for r in done):
        names = sorted({n for r in done for n in r.metrics})
        raise ValueError(f"{path}: metric={metric!r} is not among the metrics of its results: {', '.join(names)}")
    return previous


@contextlib.contextmanager
def _removed_if_left_empty(folder: Path) -> Iterator[None]:
    """Create ``folder`` (and its parents); remove what was created if the block fails before filling it."""
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for made in created:  # deepest first; rmdir refuses a folder with something in it
            try:
                made.rmdir()
            except OSError:
                break
        raise


def command_sweep(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: float | Schedule | Iterable[float | Schedule],
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
    on_skip: Callable[[list[str]], None] | None = None,
    prefix: str | None = None,
    use_classic: bool = True,
) -> SweepResult:
    """A :func:`~posthoc_ema.sweeps.sweep` whose evaluation is an external command, resumable.

    Each target is written to ``out_dir`` (:func:`weights_name`) as a
    self-describing safetensors file and evaluated with :func:`run_command`.
    ``results.json`` and ``results.csv`` are rewritten after every target; a
    failed evaluation (or a NaN metric) is recorded with its stderr and the
    sweep goes on. ``results.json`` holds a fingerprint: the resolved snapshot
    folder, the run ids of its snapshots, the command and the metric asked for.
    Run again with the same ``out_dir``, the fingerprint is checked, targets that
    already succeeded are skipped (failed ones are retried) and their rows kept.

    Args:
        snapshot_dir, sigma_rels, metric, maximize, step, device, dtype,
            memory_budget, batch_size, on_row, prefix, use_classic: as for :func:`~posthoc_ema.sweeps.sweep`.
        command: the evaluation, with ``{weights}`` where the file path goes.
        out_dir: folder for the synthesized files and the results; created if
            needed (and removed again if the sweep fails before writing to it).
            It must not be the snapshot folder.
        timeout: seconds each evaluation may take.
        keep_weights: keep each synthesized file after its evaluation.
        on_skip: called, before anything runs, with the labels of the targets already done
            (:attr:`~posthoc_ema.synthesis.Plan.labels`).

    Returns:
        A :class:`~posthoc_ema.results.SweepResult` with the rows of this run and of earlier runs in ``out_dir``.

    Raises:
        ValueError, SnapshotError: as for :func:`~posthoc_ema.sweeps.sweep`; if
            ``command`` lacks ``{weights}`` or its program is not found; if
            ``out_dir`` is the snapshot folder; if ``out_dir`` holds results of
            another snapshot step, snapshot folder, run, command or metric; or if
            ``metric`` is not among the metrics the first evaluation printed (its
            row is saved first).

    Example:
        >>> result = command_sweep("ckpts", [0.05, 0.1, 0.15], "python eval.py {weights}", "sweep")  # doctest: +SKIP
    """
    from posthoc_ema.sweeps import _batch_size, _run_plan  # the in-process sweep drives this one

    argv = _command_argv(command)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout={timeout!r} is not a positive number of seconds")
    if shutil.which(argv[0]) is None:
        raise ValueError(f"the evaluation command's program {argv[0]!r} is not found (not a file, not on PATH)")
    out = Path(out_dir)
    if out.resolve() == Path(snapshot_dir).resolve():
        raise ValueError(f"the output folder {out} is the snapshot folder; choose another one (e.g. {out / 'sweep'})")
    # Plan every requested target, so the step and tracked range are known before anything runs.
    the_plan = plan(snapshot_dir, sigma_rels, step=step, prefix=prefix, use_classic=use_classic)
    targets = the_plan.sigma_rels
    fingerprint = _fingerprint(the_plan, snapshot_dir, command, metric)
    previous_result = _earlier_result(out / RESULTS_JSON, the_plan.step, fingerprint)
    earlier = {} if previous_result is None else {_row_key(r): r for r in previous_result.rows}
    done = {k for k, r in earlier.items() if r.ok}
    labels = the_plan.labels
    todo = [i for i, label in enumerate(labels) if label not in done]
    if len(todo) < len(targets):
        skipped = [label for label in labels if label in done]
        log.info("%s: %d of %d targets already evaluated; skipping them", out, len(skipped), len(targets))
        if on_skip is not None:
            on_skip(skipped)
    rows = dict(earlier)
    # The ranking metric: the one asked for, else the one of the earlier run, else the first one returned.
    previous = previous_result.metric if previous_result is not None and earlier and metric is None else None
    paths = {i: out / target_weights_name(the_plan, i) for i in todo}
    path_of = {labels[i]: paths[i] for i in todo}

    # Cleared when an evaluation lacks the metric asked for: its row is saved as if none was asked for.
    asked = metric

    def result() -> SweepResult:
        ordered = tuple(sorted(rows.values(), key=row_order))
        first = next((r for r in ordered if r.metrics), None)
        return SweepResult(
            rows=ordered,
            metric=asked or previous or (next(iter(first.metrics)) if first else DEFAULT_METRIC),
            maximize=maximize,
            step=the_plan.step,
            tracked_sigma_rels=the_plan.tracked_sigma_rels,
            fingerprint={**fingerprint, "metric": asked},
        )

    def evaluate_at(j: int, state_dict: StateDict) -> Metrics:
        i = todo[j]
        with named_as(paths[i]):
            save(paths[i], state_dict, the_plan, i, overwrite=True)  # its own file of an earlier, failed try
        try:
            return run_command(command, paths[i], timeout=timeout)
        finally:
            if not keep_weights:
                paths[i].unlink(missing_ok=True)

    def record(row: SweepRow) -> None:
        nonlocal asked
        if asked is not None and row.metrics and asked not in row.metrics:
            asked = None  # the sweep stops after this row; a resume may then name a metric it has
        path = path_of[_row_key(row)]
        row = replace(row, weights=str(path) if keep_weights else None)
        rows[_row_key(row)] = row
        current = result()
        current.to_json(out / RESULTS_JSON)
        current.to_csv(out / RESULTS_CSV)
        if on_row is not None:
            on_row(row)

    with _removed_if_left_empty(out):
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
