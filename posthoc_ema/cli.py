"""The ``posthoc-ema`` command: synthesize EMAs from a folder of snapshots, and inspect it.

A thin layer over :mod:`posthoc_ema.synthesis` and :mod:`posthoc_ema.snapshots`:
it parses the command line, calls the library and prints. Library errors
become one ``error: ...`` line on stderr and exit code 1; bad usage exits with 2.

Example:
    .. code-block:: console

        $ posthoc-ema info ckpts
        $ posthoc-ema synthesize ckpts --sigma-rel 0.15 -o ema.safetensors
        $ posthoc-ema synthesize ckpts --sigma-rel 0.05:0.25:0.01 -o emas/ --dry-run
        $ posthoc-ema sweep ckpts --sigma-rel 0.02:0.25:0.01 --eval "python eval.py {weights}" -o sweep/
        $ posthoc-ema synthesize ckpts --beta 0.9999 --half-life 2000 -o classic/
        $ posthoc-ema sweep ckpts --beta 0.998,0.999,0.9995 --ema-start 0,8000,12000 --eval "python eval.py {weights}"
        $ posthoc-ema plot ckpts --sigma-rel 0.15 -o profile.png
        $ posthoc-ema synthesize --from-checkpoints run/ --sigma-rel 0.10 --beta 0.9999 -o emas/
"""

from __future__ import annotations

import contextlib
import decimal
import enum
import json
import math
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import numpy as np
import typer

from posthoc_ema._version import __version__
from posthoc_ema.commands import command_sweep, target_weights_name, weights_name
from posthoc_ema.files import named_as
from posthoc_ema.folders import describe
from posthoc_ema.plots import plot_error_curve, plot_profile, plot_sweep
from posthoc_ema.profiles import same_sigma_rel
from posthoc_ema.results import RESULTS_CSV, RESULTS_JSON, SweepRow
from posthoc_ema.retention import apply_retention, estimate, plan_retention, sigma_rel_grid
from posthoc_ema.schedules import Constant, HalfLife, Schedule, parse_schedule
from posthoc_ema.sharded import existing_model_file, parse_size, synthesize_sharded
from posthoc_ema.snapshots import SUFFIX
from posthoc_ema.synthesis import (
    ERROR_WARNING_THRESHOLD,
    INITIAL_WEIGHT_THRESHOLD,
    Plan,
    PoorReconstructionWarning,
    format_error,
    plan,
    run,
    save,
)

if TYPE_CHECKING:
    from posthoc_ema.checkpoints import CheckpointPlan

__all__ = ["app", "classic_targets", "main", "parse_sigma_rels"]

app = typer.Typer(
    name="posthoc-ema",
    help="Choose your EMA after training: synthesize power-function EMAs (EDM2) from snapshots.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: rich's option tables squeeze each help text into a few columns at 80.
    rich_markup_mode=None,
)

#: Most targets one --sigma-rel range may expand to; more is surely a typo.
MAX_TARGETS = 10_000


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


class OutputDtype(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# -- shared by the commands ------------------------------------------------------


def _number(text: str, whole: str) -> decimal.Decimal:
    try:
        value = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        raise ValueError(f"{whole!r} is not a number or a range START:STOP:STEP (e.g. 0.05:0.25:0.01)") from None
    if not value.is_finite():
        raise ValueError(f"{whole!r} is not a finite number")
    return value


def parse_sigma_rels(values: Iterable[str]) -> list[float]:
    """Target sigma_rels from ``--sigma-rel`` values: numbers and ``START:STOP:STEP`` ranges.

    A range includes STOP when it lies on the grid. It is computed in decimal
    arithmetic, so ``0.05:0.25:0.01`` gives exactly the floats ``0.05, 0.06, ..., 0.25``
    that typing each number would. Repeated targets are kept once, in order.
    Whether each value is a valid sigma_rel is left to the library.

    Raises:
        ValueError: for a malformed number or range.

    Example:
        >>> parse_sigma_rels(["0.1:0.3:0.1", "0.05"])
        [0.1, 0.2, 0.3, 0.05]
    """
    targets: list[float] = []
    for text in values:
        parts = text.split(":")
        if len(parts) == 1:
            targets.append(float(_number(parts[0], text)))
            continue
        if len(parts) != 3:
            raise ValueError(f"{text!r} is not a number or a range START:STOP:STEP (e.g. 0.05:0.25:0.01)")
        start, stop, step = (_number(p, text) for p in parts)
        if step <= 0:
            raise ValueError(f"{text!r}: the step of a range must be positive")
        if stop < start:
            raise ValueError(f"{text!r}: the range is empty (STOP is below START)")
        count = int((stop - start) / step) + 1  # exact in decimal: STOP is kept when on the grid
        if count > MAX_TARGETS:
            raise ValueError(f"{text!r} gives {count} targets; at most {MAX_TARGETS} are allowed")
        targets.extend(float(start + i * step) for i in range(count))
    return list(dict.fromkeys(targets))


def _sigma_rels_option(values: list[str] | None) -> list[float]:
    try:
        return parse_sigma_rels(values or [])
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _numbers(values: Iterable[str], option: str) -> list[float]:
    """The numbers of a repeatable option whose values may also be comma-separated lists."""
    out: list[float] = []
    for text in values:
        for part in text.split(","):
            try:
                value = float(part)
            except ValueError:
                raise ValueError(f"{option} {text!r}: {part.strip()!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{option} {text!r}: {part.strip()!r} is not a finite number")
            out.append(value)
    return list(dict.fromkeys(out))


def classic_targets(
    *,
    betas: Iterable[str] = (),
    half_lives: Iterable[str] = (),
    starts: Iterable[str] = (),
    specs: Iterable[str] = (),
) -> list[Schedule]:
    """Classic-EMA targets from ``--beta``, ``--half-life``, ``--ema-start`` and ``--schedule`` values.

    ``--beta`` and ``--half-life`` take numbers or comma-separated lists; with
    ``--ema-start`` (also a list) every decay and half-life is taken at every
    start (a grid, decays first). ``--schedule`` takes specs
    (:func:`~posthoc_ema.schedules.parse_schedule`). Repeated targets are kept once.

    Raises:
        ValueError: in one line, for a value that is not a number, a bad spec, a
            decay or half-life out of range, or ``--ema-start`` without ``--beta``/``--half-life``.

    Example:
        >>> classic_targets(betas=["0.99,0.999"], starts=["0,100"])[1]
        Constant(beta=0.99, start=100)
    """
    beta_values = _numbers(betas, "--beta")
    half_life_values = _numbers(half_lives, "--half-life")
    start_values = _numbers(starts, "--ema-start") or [0.0]
    if list(starts) and not (beta_values or half_life_values):
        raise ValueError("--ema-start applies to --beta and --half-life targets; give one of them too")
    out: list[Schedule] = [Constant(b, start=s) for b in beta_values for s in start_values]
    out += [HalfLife(h, start=s) for h in half_life_values for s in start_values]
    out += [parse_schedule(spec) for spec in specs]
    return list(dict.fromkeys(out))


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else ""
        return f"{where}: {err.strerror}" if where else err.strerror
    text = " ".join(str(err).split())
    return text or type(err).__name__


@contextlib.contextmanager
def _library_errors() -> Iterator[None]:
    """Turn a library error into one ``error:`` line on stderr and exit code 1."""
    try:
        yield
    except (typer.Exit, typer.Abort, BrokenPipeError):
        raise  # BrokenPipeError: typer exits quietly when the reader of our output goes away
    except (ValueError, OSError, RuntimeError, MemoryError) as err:
        typer.secho(f"error: {_one_line(err)}", fg="red", err=True)
        raise typer.Exit(1) from None


@contextlib.contextmanager
def _shown_warnings() -> Iterator[None]:
    """Show a PoorReconstructionWarning as a ``warning:`` line instead of Python's warning output."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PoorReconstructionWarning)
            yield
    finally:
        shown: set[str] = set()
        for w in caught:
            if issubclass(w.category, PoorReconstructionWarning):
                line = f"warning: {_one_line(Exception(w.message))}"
                if line not in shown:  # a command may plan the same targets twice (a check, then the work)
                    shown.add(line)
                    typer.secho(line, fg="yellow", err=True)
            else:  # not ours to format: hand it back to the warnings machinery
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _interactive() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextlib.contextmanager
def _progress_bar(description: str) -> Iterator[Any]:
    """A ``progress(done, total)`` callback drawing a bar on stderr; silent unless both streams are terminals."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not _interactive(),
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> list[str]:
    """Columns two spaces apart, aligned left (``"l"``) or right (``"r"``) as ``align`` says."""
    rows = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _print_report(the_plan: Plan) -> None:
    steps = sorted({s.step for s in the_plan.snapshots})
    kinds = [f"sigma_rels {', '.join(map(_fmt, the_plan.tracked_sigma_rels))}"] if the_plan.tracked_sigma_rels else []
    by_name = Counter(str(s.name) for s in the_plan.classic_snapshots)
    if by_name:
        kinds.append("classic EMAs " + ", ".join(f"{name} ({n})" for name, n in sorted(by_name.items())))
    typer.echo(
        f"reconstructing step {the_plan.step} from {len(the_plan.snapshots)} snapshots "
        f"(steps {steps[0]}..{steps[-1]}, {', '.join(kinds)})"
    )
    n = len(the_plan.sigma_rels)
    classic = any(the_plan.is_classic(j) for j in range(n))
    if classic:
        every = f"every {the_plan.update_every} steps" if the_plan.update_every > 1 else "every step"
        typer.echo(f"classic EMAs update {every} and start as a copy of the weights at step 0")
    rows = []
    for j, sigma_rel in enumerate(the_plan.sigma_rels):
        err = float(the_plan.errors[j])
        notes = []
        initial = 0.0 if the_plan.initial_weights is None else float(the_plan.initial_weights[j])
        if the_plan.is_classic(j) and the_plan.copy_mismatch(j) > INITIAL_WEIGHT_THRESHOLD:
            at = 0.0 if the_plan.copy_steps is None else float(the_plan.copy_steps[j])
            copy = "initial copy" if at == 0 else f"copy at step {at:g}"
            notes.append(f"CANNOT BE REPRESENTED: its {copy} weighs {initial:.1%}")
        if the_plan.outside[j]:
            notes.append("outside the tracked range")
        if err > ERROR_WARNING_THRESHOLD:
            notes.append("POOR")
        gamma, norm = float(the_plan.gammas[j]), float(the_plan.coefficient_norms[j])
        rounding = format_error(float(the_plan.rounding_errors[j]))
        if the_plan.is_classic(j):  # its sigma_rel is the equivalent width
            width = "-" if math.isnan(sigma_rel) else f"~{sigma_rel:.4g}"
            cells = [width, "-"]
        else:
            cells = [_fmt(sigma_rel), f"{gamma:.4g}"]
        row = [*cells, format_error(err), rounding, f"{norm:.4g}", ", ".join(notes)]
        rows.append([the_plan.labels[j], *row] if classic else row)
    stored = "/".join(the_plan.storage_dtypes) or "no floating"
    header = ["sigma_rel", "gamma", "predicted error", f"{stored} rounding", "coef norm", ""]
    if classic:
        header, align = ["target", *header], "llrrrrl"
    else:
        align = "lrrrrl"
    for line in _table(header, rows, align):
        typer.echo(line)


def _print_coefficients(the_plan: Plan) -> None:
    typer.echo("")
    typer.echo("coefficients (a column per target, summing to 1; a row per snapshot):")
    header = ["step", "sigma_rel", *(_label(the_plan, j) for j in range(len(the_plan.sigma_rels)))]
    body = (
        [
            str(snap.step),
            str(snap.name) if snap.is_classic else _fmt(snap.sigma_rel),
            *(f"{c:.6f}".replace("-0.000000", "0.000000") for c in row),
        ]
        for snap, row in zip(the_plan.snapshots, the_plan.coefficients, strict=True)
    )
    for line in _table(header, body, "r" * len(header)):
        typer.echo(line)


def _label(the_plan: Plan, index: int) -> str:
    """A target as people read it: its sigma_rel, or its schedule's spec."""
    return the_plan.labels[index] if the_plan.is_classic(index) else _fmt(the_plan.sigma_rels[index])


def _output_paths(output: str | None, the_plan: Plan | CheckpointPlan) -> list[Path]:
    """Where ``synthesize`` writes: ``-o`` names a file for one target, unless it is a folder or ends with ``/``."""
    names = [target_weights_name(the_plan, j) for j in range(len(the_plan.sigma_rels))]
    as_folder = output is not None and (output.endswith(("/", os.sep)) or Path(output).is_dir())
    if len(names) == 1 and not as_folder:
        return [Path(output) if output is not None else Path(names[0])]
    folder = Path(output) if output is not None else Path(".")
    return [folder / name for name in names]


def _check_outputs(paths: Sequence[Path], ckpt_dir: Path, *, force: bool, source: str = "snapshot folder") -> None:
    """Refuse, before any work, outputs in the input folder (named ``source``) and existing files (unless ``force``)."""
    snapshot_folder = ckpt_dir.resolve()
    for path in paths:
        if path.parent.resolve() == snapshot_folder:
            raise ValueError(f"{path} is in the {source} {ckpt_dir}; write synthesized files elsewhere")
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]} exists{more}; pass --force to replace it")
    for path in existing:
        if path.is_dir():
            raise ValueError(f"{path} is a folder; it cannot be replaced by a file")


@contextlib.contextmanager
def _folders_made() -> Iterator[Callable[[Path], None]]:
    """A ``make(folder)`` that creates folders as needed, and removes the ones it created if the block fails."""
    created: list[Path] = []

    def make(folder: Path) -> None:
        missing = [f for f in [folder, *folder.parents] if not f.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        created.extend(missing)  # deepest first

    try:
        yield make
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: something was written there after all
                folder.rmdir()
        raise


def _check_device(device: Device) -> None:
    """Refuse ``--device cuda`` without a CUDA device, before any work."""
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to PyTorch")


def _checked_plan(
    ckpt_dir: Path,
    targets: float | Sequence[float | Schedule],
    step: int | None,
    prefix: str | None = None,
    *,
    use_classic: bool = True,
) -> Plan:
    """:func:`plan`, refusing targets too narrow to compute in float64 (NumPy's warnings kept inside)."""
    with np.errstate(all="ignore"):
        the_plan = plan(ckpt_dir, targets, step=step, prefix=prefix, use_classic=use_classic)
    bad = [j for j, e in enumerate(the_plan.errors) if not math.isfinite(float(e)) and not the_plan.is_classic(j)]
    if bad:
        sigma_rel, gamma = float(the_plan.sigma_rels[bad[0]]), float(the_plan.gammas[bad[0]])
        raise ValueError(
            f"sigma_rel={sigma_rel!r} is too small: its profile (gamma={gamma:.3g}) overflows float64 "
            "arithmetic, so its error cannot be predicted; choose a larger sigma_rel"
        )
    return the_plan


def _size_option(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_size(value)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
    return value


def _check_shard_folders(folders: Sequence[Path], ckpt_dir: Path, *, force: bool) -> None:
    """As :func:`_check_outputs`, for folders of shards: not the snapshot folder, not one already holding a model."""
    snapshot_folder = ckpt_dir.resolve()
    for folder in folders:
        if snapshot_folder in (folder.resolve(), folder.resolve().parent):
            raise ValueError(f"{folder} is the snapshot folder {ckpt_dir} or in it; write shards elsewhere")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file; --max-shard-size writes a folder of shards")
        held = existing_model_file(folder)  # an index, model.safetensors or a shard
        if held is not None and not force:
            raise ValueError(f"{held} exists; pass --force to replace it")


def _shard_folders(output: Path | None, the_plan: Plan) -> list[Path]:
    """One folder of shards per target: ``-o`` itself for one target, else ema-SIGMA-STEP/ inside ``-o``."""
    names = [weights_name(s, the_plan.step).removesuffix(SUFFIX) for s in the_plan.sigma_rels]
    if len(names) == 1 and output is not None:
        return [output]
    folder = output if output is not None else Path(".")
    return [folder / name for name in names]


# -- commands ---------------------------------------------------------------------

CkptDir = Annotated[
    Path, typer.Argument(help="Folder of snapshots written by PostHocEMA.", metavar="CKPT_DIR", show_default=False)
]
Step = Annotated[
    int | None,
    typer.Option(
        min=1, metavar="STEP", help="Snapshot step to reconstruct at. Default: the latest.", show_default=False
    ),
]
SigmaRels = Annotated[
    list[str] | None,
    typer.Option(
        "--sigma-rel",
        "-s",
        metavar="SIGMA_REL",
        help="Target sigma_rel; repeat it, or give a range START:STOP:STEP (STOP included when on the grid).",
        callback=_sigma_rels_option,
        show_default=False,
    ),
]
Betas = Annotated[
    list[str] | None,
    typer.Option(
        "--beta",
        metavar="BETA",
        help="Target: a classic EMA of constant decay BETA (timm's ModelEmaV2); repeat it or give a list "
        "0.998,0.999,0.9995.",
        show_default=False,
    ),
]
HalfLives = Annotated[
    list[str] | None,
    typer.Option(
        "--half-life",
        metavar="STEPS",
        help="Target: a classic EMA of this half-life in steps (Composer's EMA); repeat it or give a list.",
        show_default=False,
    ),
]
EmaStarts = Annotated[
    list[str] | None,
    typer.Option(
        "--ema-start",
        metavar="STEP",
        help="Start the --beta and --half-life EMAs as a copy of the weights at these steps (a list: "
        "every decay at every start). Default: 0, when tracking began.",
        show_default=False,
    ),
]
Specs = Annotated[
    list[str] | None,
    typer.Option(
        "--schedule",
        metavar="SPEC",
        help="Target: any classic EMA, e.g. 'warmup:inv_gamma=1,power=0.75,max_beta=0.9999' (kinds constant, "
        "half-life, warmup, threshold, exp-warmup, power).",
        show_default=False,
    ),
]


# typer's own click (it vendors one): its UsageError is what exits with 2. BadParameter's parent.
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _all_targets(
    sigma_rels: list[float] | None,
    betas: list[str] | None,
    half_lives: list[str] | None,
    starts: list[str] | None,
    specs: list[str] | None,
) -> list[float | Schedule]:
    """Every target of the command line, sigma_rels first; a usage error (exit 2) when bad or none."""
    try:
        classic = classic_targets(
            betas=betas or [], half_lives=half_lives or [], starts=starts or [], specs=specs or []
        )
    except ValueError as err:
        raise _UsageError(_one_line(err)) from None
    targets: list[float | Schedule] = [*(sigma_rels or []), *classic]
    if not targets:
        raise _UsageError(
            "Missing option '--sigma-rel' / '-s': give at least one target with --sigma-rel, --beta, --half-life "
            "or --schedule"
        )
    return targets


Prefix = Annotated[
    str | None,
    typer.Option(
        metavar="PREFIX",
        help="Use the snapshots of this tracker prefix only (a folder shared by several trackers, e.g. a GAN's).",
        show_default=False,
    ),
]
NoClassic = Annotated[
    bool,
    typer.Option(
        "--no-classic",
        help="Leave out the snapshots of classic EMAs (PostHocEMA(schedules=...)); by default they are "
        "combined with the power-function ones, their profiles being known exactly.",
    ),
]

# The options of the commands that write synthesized files (synthesize, from-checkpoints).
Output = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        metavar="PATH",
        help="Output file (one target), or folder (several targets, or a path ending in /). "
        "Default: ema-SIGMA-STEP.safetensors (ema-SPEC-STEP for a classic EMA), here.",
        show_default=False,
    ),
]
AccumulateDevice = Annotated[Device, typer.Option(help="Where to accumulate.")]
WrittenDtype = Annotated[OutputDtype, typer.Option(help="Dtype of the floating tensors written.")]
Force = Annotated[bool, typer.Option("--force", help="Replace output files that exist.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"posthoc-ema {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Choose your EMA after training: synthesize power-function EMAs (EDM2) from snapshots."""


class InterpolationChoice(str, enum.Enum):
    piecewise_constant = "piecewise-constant"
    trapezoidal = "trapezoidal"


OptionalCkptDir = Annotated[
    Path | None,
    typer.Argument(
        help="Folder of snapshots written by PostHocEMA (or give --from-checkpoints RUN_DIR instead).",
        metavar="CKPT_DIR",
        show_default=False,
    ),
]
FromCheckpoints = Annotated[
    Path | None,
    typer.Option(
        "--from-checkpoints",
        metavar="RUN_DIR",
        help="Synthesize from the plain model checkpoints in RUN_DIR (a run that tracked no EMA) instead of "
        "a snapshot folder.",
        show_default=False,
    ),
]
Key = Annotated[
    str | None,
    typer.Option(help="Entry of torch.save checkpoints holding the state dict, e.g. state_dict.", show_default=False),
]
StepPattern = Annotated[
    str | None,
    typer.Option(
        help=r"Regex with one group for the step in checkpoint file names, e.g. 'step=(\d+)'.", show_default=False
    ),
]
Glob = Annotated[
    str | None, typer.Option(help="Which paths under RUN_DIR are checkpoints. Default: its files.", show_default=False)
]
InterpolationOption = Annotated[
    InterpolationChoice | None,
    typer.Option(help="The trajectory assumed between checkpoints. Default: piecewise-constant.", show_default=False),
]


def _checkpoint_options(
    from_checkpoints: Path | None, ckpt_dir: Path | None, given: dict[str, object], snapshot_only: dict[str, object]
) -> None:
    """Exactly one of CKPT_DIR and --from-checkpoints, and only the options of that input (usage errors)."""
    if ckpt_dir is not None and from_checkpoints is not None:
        raise _UsageError(
            f"give CKPT_DIR (a snapshot folder) or --from-checkpoints RUN_DIR (plain checkpoints), not both; "
            f"got {ckpt_dir} and --from-checkpoints {from_checkpoints}"
        )
    if ckpt_dir is None and from_checkpoints is None:
        raise _UsageError(
            "Missing argument 'CKPT_DIR': give a folder of snapshots, or --from-checkpoints RUN_DIR for plain "
            "model checkpoints"
        )
    if ckpt_dir is not None:
        for name, value in given.items():
            if value is not None:
                raise _UsageError(f"{name} applies to --from-checkpoints RUN_DIR, not to a snapshot folder")
    else:
        for name, value in snapshot_only.items():
            if value:
                raise _UsageError(f"{name} applies to snapshot folders, not to --from-checkpoints")


@app.command(short_help="Write the EMA of each target sigma_rel.")
def synthesize(
    ckpt_dir: OptionalCkptDir = None,
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    half_life: HalfLives = None,
    ema_start: EmaStarts = None,
    schedule: Specs = None,
    output: Output = None,
    step: Step = None,
    prefix: Prefix = None,
    no_classic: NoClassic = False,
    device: AccumulateDevice = Device.cpu,
    dtype: WrittenDtype = OutputDtype.float32,
    force: Force = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and the coefficients; read and write no tensors.")
    ] = False,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE",
            help="Write each target as a folder of Hugging Face style shards of at most SIZE (e.g. 2GB, 500MiB), "
            "built one shard at a time so memory stays at about targets x SIZE.",
            callback=_size_option,
            show_default=False,
        ),
    ] = None,
    from_checkpoints: FromCheckpoints = None,
    key: Key = None,
    step_pattern: StepPattern = None,
    glob: Glob = None,
    interpolation: InterpolationOption = None,
) -> None:
    """Synthesize the EMA of each target (a sigma_rel or a classic EMA) and write it as a safetensors file.

    Targets mix freely in one pass: --sigma-rel, --beta (constant decay),
    --half-life and --schedule (any classic EMA), --ema-start making a grid of
    the decays and half-lives. The quality report (predicted error of each reconstructed profile, ...) is
    always printed; a warning line marks targets the snapshots reproduce poorly.
    Existing files are not replaced unless --force is given, and nothing is
    written into the snapshot folder.

    With --from-checkpoints RUN_DIR instead of CKPT_DIR, the input is a run's
    plain model checkpoints (safetensors, or torch.save dicts read with
    weights_only=True; --key, --step-pattern, --glob and --interpolation say how
    to read them), and the report says how well they resolve each target.
    """
    _checkpoint_options(
        from_checkpoints,
        ckpt_dir,
        {"--key": key, "--step-pattern": step_pattern, "--glob": glob, "--interpolation": interpolation},
        {"--prefix": prefix, "--max-shard-size": max_shard_size, "--no-classic": no_classic},
    )
    targets = _all_targets(sigma_rel, beta, half_life, ema_start, schedule)  # type: ignore[arg-type]
    _check_output_for(targets, output)
    if from_checkpoints is not None:
        _synthesize_checkpoints(
            from_checkpoints, targets, output=output, key=key, step_pattern=step_pattern, glob=glob or "*",
            interpolation=interpolation or InterpolationChoice.piecewise_constant, step=step, device=device,
            dtype=dtype, force=force, dry_run=dry_run,
        )  # fmt: skip
        return
    ckpt_dir = cast(Path, ckpt_dir)  # not None: checked by _checkpoint_options
    with _library_errors():
        _check_device(device)
        with _shown_warnings():
            the_plan = _checked_plan(ckpt_dir, targets, step, prefix, use_classic=not no_classic)
            _print_report(the_plan)
        if dry_run:
            _print_coefficients(the_plan)
            return
        if max_shard_size is not None:
            folders = _shard_folders(None if output is None else Path(output), the_plan)
            _check_shard_folders(folders, ckpt_dir, force=force)
            with _folders_made() as make, _progress_bar("synthesizing") as progress:
                for folder in folders:
                    make(folder)
                try:
                    written = synthesize_sharded(
                        the_plan, folders, max_shard_size=max_shard_size, device=device.value, dtype=dtype.value,
                        progress=progress, overwrite=force,
                    )  # fmt: skip
                except OSError as err:  # name the output folder, not a shard's temporary name
                    where = Path(err.filename).parent if err.filename is not None else None
                    raise OSError(err.errno, err.strerror or str(err), str(where) if where else None) from None
            for path in written:
                typer.echo(f"wrote {path}")
            return
        paths = _output_paths(output, the_plan)
        _check_outputs(paths, ckpt_dir, force=force)
        with _progress_bar("synthesizing") as progress:
            state_dicts = run(the_plan, device=device.value, dtype=dtype.value, progress=progress)
        with _folders_made() as make:
            for index, path in enumerate(paths):
                make(path.parent)
                with named_as(path):
                    save(path, state_dicts[the_plan.key(index)], the_plan, index, overwrite=force)
                typer.echo(f"wrote {path}")


def _print_info(summary: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = [("folder", summary["folder"])]
    n = summary["snapshots"]
    steps = summary["steps"]
    if steps is not None:
        spacing = f", every {steps['spacing']}" if steps["spacing"] is not None else ""
        rows += [
            (
                "snapshots",
                f"{n} {'snapshots' if summary.get('layout', {}).get('sharded') else 'files'}, "
                f"{_size(summary['size_bytes'])} ({_size(summary['size_bytes'] // n)} each)",
            ),
            ("steps", f"{steps['first']} .. {steps['last']}: {steps['count']} steps{spacing}"),
            ("sigma_rels", ", ".join(f"{_fmt(float(s))} ({k})" for s, k in summary["sigma_rels"].items())),
            ("stored dtype", ", ".join(summary["dtypes"])),
            ("tensors", f"{summary['tensors']} ({summary['parameters']:,} floating values averaged)"),
            ("update_every", ", ".join(summary["update_every"])),
            ("written by", ", ".join(f"posthoc-ema {v}" for v in summary["library_versions"])),
        ]
    else:
        rows.append(("snapshots", "no power-function snapshots" if "classic" in summary else "none readable"))
    if "classic" in summary:
        classic = summary["classic"]
        named = ", ".join(f"{name} ({classic['schedules'][name]}) x{k}" for name, k in classic["names"].items())
        rows.append(("classic EMAs", f"{classic['snapshots']} files: {named}"))
    sharding = summary.get("layout", {})
    if sharding.get("sharded"):  # a sharded model's snapshots: one file per rank each
        worlds = "/".join(map(str, sharding["world_size"]))
        rows.append(
            (
                "layout",
                f"sharded, {worlds} ranks: {sharding['complete']} complete snapshots, "
                f"{sharding['incomplete']} incomplete",
            )
        )
    if summary["other_files"]:
        count = len(summary["other_files"])
        rows.append(("other files", f"{count} .safetensors file(s) that are not snapshots (ignored)"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        typer.echo(f"{label.ljust(width)}  {value}")
    oddities = summary["oddities"]
    typer.echo(f"{'oddities'.ljust(width)}  {'none' if not oddities else len(oddities)}")
    for line in oddities:
        typer.echo(f"  - {line}")


@app.command(short_help="Summarize a snapshot folder, oddities included.")
def info(
    ckpt_dir: CkptDir,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON object (with a 'files' list) instead of text.")
    ] = False,
    list_files: Annotated[bool, typer.Option("--files", help="Also list every snapshot file.")] = False,
) -> None:
    """Summarize a snapshot folder: steps, sigma_rels, size, dtypes, and anything odd."""
    with _library_errors():
        summary = describe(ckpt_dir)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_info(summary)
    if list_files:
        typer.echo("")
        rows = (
            [f["file"], str(f["step"]), _fmt(f["sigma_rel"]), f["dtype"], _size(f["size"]), f["run"] or "-"]
            for f in summary["files"]
        )
        for line in _table(["file", "step", "sigma_rel", "dtype", "size", "run"], rows, "lrrlrl"):
            typer.echo(line)
        if "classic" in summary:
            typer.echo("")
            rows = (
                [f["file"], str(f["step"]), f["name"], f["schedule"], f["dtype"], _size(f["size"]), f["run"] or "-"]
                for f in summary["classic"]["files"]
            )
            for line in _table(["file", "step", "name", "schedule", "dtype", "size", "run"], rows, "lrlllrl"):
                typer.echo(line)


# -- sweep and plot -----------------------------------------------------------------


def _range_option(value: str | None) -> list[float] | None:
    return None if value is None else _sigma_rels_option([value])


def _row_label(row: SweepRow) -> str:
    return row.target if row.target is not None else f"sigma_rel={_fmt(row.sigma_rel)}"


def _failed_labels(rows: Sequence[SweepRow]) -> str:
    if all(r.target is None for r in rows):
        return "sigma_rel " + ", ".join(_fmt(r.sigma_rel) for r in rows)
    return ", ".join(_row_label(r) for r in rows)


def _print_row(row: SweepRow) -> None:
    """One line per evaluated target as the sweep goes; a failure on stderr with the command's stderr."""
    if row.ok:
        values = "  ".join(f"{name}={value:.6g}" for name, value in row.metrics.items())
        typer.echo(f"{_row_label(row)}  {values}  (predicted error {format_error(row.predicted_error)})")
        return
    first, *rest = (row.failure or "failed").splitlines()
    typer.secho(f"failed: {_row_label(row)}: {first}", fg="red", err=True)
    for line in rest:
        typer.echo(f"    {line}", err=True)


def _plot_or_say(draw: Any, *args: Any) -> bool:
    """Draw a figure; when matplotlib is missing, say so in one line and go on."""
    try:
        draw(*args)
    except ImportError as err:
        typer.echo(f"no plot: {_one_line(err)}")
        return False
    return True


@app.command("sweep", short_help="Evaluate many targets with a command; keep the best.")
def sweep_command(
    ckpt_dir: CkptDir,
    eval_command: Annotated[
        str,
        typer.Option(
            "--eval",
            "-e",
            metavar="COMMAND",
            help="Evaluation command, {weights} standing for the synthesized file, e.g. 'python eval.py {weights}'. "
            "Its last line of stdout is the result: a number or a JSON object of numbers.",
            show_default=False,
        ),
    ],
    metric: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Metric to rank by: a key of the JSON object, or the name given to a bare number. "
            "Default: the first key (a number is called 'metric').",
            show_default=False,
        ),
    ] = None,
    maximize: Annotated[
        bool, typer.Option("--maximize/--minimize", help="Whether larger values of the metric are better.")
    ] = False,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="DIR",
            help="Folder for the synthesized files, results.json, results.csv and sweep.png. "
            "Run again with the same folder to resume: targets already evaluated are skipped.",
        ),
    ] = Path("sweep"),
    step: Step = None,
    prefix: Prefix = None,
    no_classic: NoClassic = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="Seconds each evaluation may take (it is killed after).", show_default=False
        ),
    ] = None,
    keep_weights: Annotated[
        bool,
        typer.Option("--keep-weights/--delete-weights", help="Keep each synthesized file after its evaluation."),
    ] = True,
    device: AccumulateDevice = Device.cpu,
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    half_life: HalfLives = None,
    ema_start: EmaStarts = None,
    schedule: Specs = None,
) -> None:
    """Synthesize each target, evaluate it with a command, and tabulate the results.

    Targets are as for synthesize: --sigma-rel, --beta, --half-life, --schedule,
    and --ema-start for a grid (--beta 0.998,0.999 --ema-start 0,8000 sweeps
    decay x start in one pass; the plot draws one curve per start).

    Results are saved after every target, so an interrupted sweep loses nothing;
    a failed evaluation is reported with its stderr and retried on the next run.
    Exits with 1 if any evaluation failed.
    """
    targets = _all_targets(sigma_rel, beta, half_life, ema_start, schedule)  # type: ignore[arg-type]
    with _library_errors(), _shown_warnings():
        _check_device(device)
        with warnings.catch_warnings():  # command_sweep plans again, and warns then
            warnings.simplefilter("ignore", PoorReconstructionWarning)
            _checked_plan(ckpt_dir, targets, step, prefix, use_classic=not no_classic)  # headers only, before any work
        result = command_sweep(
            ckpt_dir,
            targets,
            eval_command,
            output,
            metric=metric,
            maximize=maximize,
            step=step,
            prefix=prefix,
            use_classic=not no_classic,
            timeout=timeout,
            keep_weights=keep_weights,
            device=device.value,
            on_row=_print_row,
            on_skip=lambda done: typer.echo(
                f"{output / RESULTS_JSON}: {len(done)} of {len(targets)} targets already evaluated; skipping them"
            ),
        )
    typer.echo("")
    typer.echo(result.format_table())
    typer.echo(f"wrote {output / RESULTS_JSON}, {output / RESULTS_CSV}")
    ranked = [r for r in result.rows if math.isfinite(r.metrics.get(result.metric, math.nan))]
    if ranked:
        best = result.best
        direction = "highest" if maximize else "lowest"
        typer.echo(f"best: {_row_label(best)} ({direction} {result.metric}={best.metrics[result.metric]:.6g})")
        with _library_errors():
            if _plot_or_say(plot_sweep, result, output / "sweep.png"):
                typer.echo(f"wrote {output / 'sweep.png'}")
    failed = [r for r in result.rows if not r.ok]
    if failed:
        typer.secho(
            f"error: {len(failed)} of {len(result.rows)} evaluations failed "
            f"({_failed_labels(failed)}); run the same command again to retry them",
            fg="red",
            err=True,
        )
        raise typer.Exit(1)


@app.command("plot", short_help="Draw a reconstructed profile or the error curve.")
def plot_command(
    ckpt_dir: CkptDir,
    sigma_rel: Annotated[
        float | None,
        typer.Option(
            "--sigma-rel",
            "-s",
            metavar="SIGMA_REL",
            help="Draw the profile of this target: the target, its reconstruction and the weighted snapshots.",
            show_default=False,
        ),
    ] = None,
    error_curve: Annotated[
        str | None,
        typer.Option(
            "--error-curve",
            metavar="START:STOP:STEP",
            help="Instead, draw the predicted reconstruction error across this sigma_rel range.",
            callback=_range_option,
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Image file (.png, .pdf, .svg; .png is added to a name without one). "
            "Default: profile-SIGMA.png or error-curve.png, here.",
            show_default=False,
        ),
    ] = None,
    step: Step = None,
    prefix: Prefix = None,
    no_classic: NoClassic = False,
) -> None:
    """Draw a reconstructed EMA profile (--sigma-rel) or the predicted error across sigma_rel (--error-curve)."""
    grid: list[float] | None = error_curve  # type: ignore[assignment]  # converted by the callback
    if (sigma_rel is None) == (grid is None):
        raise typer.BadParameter(
            "give either --sigma-rel or --error-curve", param_hint="'--sigma-rel' / '--error-curve'"
        )
    with _library_errors():
        try:
            if grid is not None:
                path = _image_path(output, "error-curve.png")
                with warnings.catch_warnings():  # the curve shows the errors; no warning per target
                    warnings.simplefilter("ignore", PoorReconstructionWarning)
                    curve = _checked_plan(ckpt_dir, grid, step, prefix, use_classic=not no_classic)
                    # Add the tracked sigma_rels inside the grid, where the error drops to 0 (as plot_error_curve does).
                    extra = [
                        s
                        for s in curve.tracked_sigma_rels
                        if min(grid) <= s <= max(grid) and not any(same_sigma_rel(s, g) for g in grid)
                    ]
                    if extra:
                        curve = plan(
                            ckpt_dir, [*grid, *extra], step=curve.step, prefix=prefix, use_classic=not no_classic
                        )
                plot_error_curve(curve, None, path)
            elif sigma_rel is not None:
                path = _image_path(output, f"profile-{sigma_rel!r}.png")
                with _shown_warnings():
                    the_plan = _checked_plan(ckpt_dir, sigma_rel, step, prefix, use_classic=not no_classic)
                plot_profile(the_plan, 0, path)
        except ImportError as err:
            typer.secho(f"error: {_one_line(err)}", fg="red", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"wrote {path}")


def _image_path(output: Path | None, default: str) -> Path:
    """The file ``plot`` writes: ``-o`` as given, ``.png`` appended when it has no suffix (as matplotlib would)."""
    if output is None:
        return Path(default)
    return output if output.suffix else output.with_name(output.name + ".png")


def _check_output_for(targets: Sequence[object], output: str | None) -> None:
    if len(targets) > 1 and output is not None and Path(output).exists() and not Path(output).is_dir():
        raise typer.BadParameter(
            f"{output} is a file; with {len(targets)} targets -o must be a folder (one file per target)",
            param_hint="'-o' / '--output'",
        )


def _print_checkpoint_weights(the_plan: CheckpointPlan) -> None:
    typer.echo("")
    typer.echo("weights (a column per target, summing to 1; a row per checkpoint):")
    labels = [the_plan.labels[j] if the_plan.is_classic(j) else _fmt(s) for j, s in enumerate(the_plan.sigma_rels)]
    body = (
        [str(info.step), *(f"{w:.6f}" for w in row)]
        for info, row in zip(the_plan.checkpoints, the_plan.weights, strict=True)
    )
    for line in _table(["step", *labels], body, "r" * (len(labels) + 1)):
        typer.echo(line)


def _synthesize_checkpoints(
    run_dir: Path,
    targets: Sequence[float | Schedule],
    *,
    output: str | None,
    key: str | None,
    step_pattern: str | None,
    glob: str,
    interpolation: InterpolationChoice,
    step: int | None,
    device: Device,
    dtype: OutputDtype,
    force: bool,
    dry_run: bool,
) -> None:
    """``synthesize --from-checkpoints`` (and ``from-checkpoints``): plan, report, then one pass over them."""
    from posthoc_ema import checkpoints

    with _library_errors():
        _check_device(device)
        with _shown_warnings():
            the_plan = checkpoints.plan_checkpoints(
                run_dir, targets, step_pattern=step_pattern, glob=glob, interpolation=interpolation.value, step=step
            )
        typer.echo(the_plan.format_report())
        if dry_run:
            _print_checkpoint_weights(the_plan)
            return
        paths = _output_paths(output, the_plan)
        _check_outputs(paths, run_dir, force=force, source="checkpoint folder")
        state_dicts = checkpoints.run_checkpoints(the_plan, key=key, device=device.value, dtype=dtype.value)
        with _folders_made() as make:
            for index, path in enumerate(paths):
                make(path.parent)
                with named_as(path):
                    checkpoints.save(path, state_dicts[the_plan.key(index)], the_plan, index, overwrite=force)
                typer.echo(f"wrote {path}")


@app.command("from-checkpoints")
def from_checkpoints_command(
    run_dir: Annotated[
        Path, typer.Argument(help="Folder of plain model checkpoints (no tracker).", show_default=False)
    ],
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    half_life: HalfLives = None,
    ema_start: EmaStarts = None,
    schedule: Specs = None,
    output: Output = None,
    key: Key = None,
    step_pattern: StepPattern = None,
    glob: Annotated[str, typer.Option(help="Which paths under RUN_DIR are checkpoints.")] = "*",
    interpolation: Annotated[
        InterpolationChoice, typer.Option(help="The trajectory assumed between checkpoints.")
    ] = InterpolationChoice.piecewise_constant,
    step: Step = None,
    device: AccumulateDevice = Device.cpu,
    dtype: WrittenDtype = OutputDtype.float32,
    force: Force = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the report and the weights; read and write no tensors.")
    ] = False,
) -> None:
    """The EMA of each target from plain checkpoints of a finished run: the same as synthesize --from-checkpoints.

    Targets are sigma_rels and classic EMAs (--beta, --half-life, --ema-start,
    --schedule), as for synthesize. Each checkpoint is a sample of the
    trajectory, weighted by the target integrated against the interpolation.
    Prints how well the checkpoints resolve each target (effective number of
    checkpoints, profile mass per interval). Existing files are not replaced
    unless --force is given, and nothing is written into RUN_DIR.
    """
    targets = _all_targets(sigma_rel, beta, half_life, ema_start, schedule)  # type: ignore[arg-type]
    _check_output_for(targets, output)
    _synthesize_checkpoints(
        run_dir, targets, output=output, key=key, step_pattern=step_pattern, glob=glob, interpolation=interpolation,
        step=step, device=device, dtype=dtype, force=force, dry_run=dry_run,
    )  # fmt: skip


# -- disk budget -----------------------------------------------------------------------


def _sigma_rel_range(text: str) -> tuple[float, ...]:
    """``LO:HI`` (a grid of 25), ``START:STOP:STEP``, or numbers separated by commas."""
    try:
        parts = text.split(":")
        if len(parts) == 2:
            return sigma_rel_grid(float(_number(parts[0], text)), float(_number(parts[1], text)))
        return tuple(parse_sigma_rels(p for p in text.split(",") if p.strip()))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _gb(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.0f} B"


def _errors(errors: Any) -> str:
    return f"max {format_error(float(errors.max()))}, mean {format_error(float(errors.mean()))}"


def _range_text(sigma_rels: Sequence[float]) -> str:
    return f"sigma_rel {_fmt(min(sigma_rels))}..{_fmt(max(sigma_rels))} ({len(sigma_rels)} targets)"


Budget = Annotated[
    str | None,
    typer.Option(
        metavar="SIZE", help="Most bytes of snapshots to keep, e.g. 50GB or 200GiB.", callback=_size_option,
        show_default=False,
    ),
]  # fmt: skip
MaxSnapshots = Annotated[int | None, typer.Option(min=1, help="Most snapshot files to keep.", show_default=False)]


@app.command("prune")
def prune_command(
    ckpt_dir: CkptDir,
    sigma_rel: Annotated[
        str,
        typer.Option(
            "--sigma-rel",
            "-s",
            metavar="LO:HI",
            help="Target sigma_rels whose reconstruction must stay good: a range LO:HI (25 points), "
            "START:STOP:STEP, or numbers separated by commas.",
            show_default=False,
        ),
    ],
    budget: Budget = None,
    max_snapshots: MaxSnapshots = None,
    objective: Annotated[
        str, typer.Option(metavar="max|mean", help="Keep the max or the mean predicted error lowest.")
    ] = "max",
    apply: Annotated[bool, typer.Option("--apply", help="Delete the files; without it, only report.")] = False,
    prefix: Prefix = None,
) -> None:
    """Thin a snapshot folder to a disk budget, keeping the predicted error over a sigma_rel range lowest.

    Narrow targets keep recent snapshots dense; wide ones keep some old snapshots
    spread over the run. Without --apply this is a dry run: it reports which
    files would go and the predicted error before and after, and deletes nothing.
    """
    targets = _sigma_rel_range(sigma_rel)
    if budget is None and max_snapshots is None:
        raise typer.BadParameter("give --budget, --max-snapshots or both", param_hint="'--budget'")
    if objective not in ("max", "mean"):
        raise typer.BadParameter(f"{objective!r} is not max or mean", param_hint="'--objective'")
    with _library_errors():
        the_plan = plan_retention(
            ckpt_dir, targets, budget=budget, max_snapshots=max_snapshots,
            objective="max" if objective == "max" else "mean", prefix=prefix,
        )  # fmt: skip
        n_all = len(the_plan.keep) + len(the_plan.remove)
        typer.echo(f"{ckpt_dir}: {n_all} snapshots, {_gb(the_plan.bytes_before)}; errors at step {the_plan.step}")
        typer.echo(
            f"keep {len(the_plan.keep)} ({_gb(the_plan.bytes_after)}), "
            f"delete {len(the_plan.remove)} ({_gb(the_plan.bytes_before - the_plan.bytes_after)})"
        )
        typer.echo(f"predicted error over {_range_text(the_plan.sigma_rels)}:")
        typer.echo(f"  before: {_errors(the_plan.errors_before)}")
        typer.echo(f"  after:  {_errors(the_plan.errors_after)}")
        typer.echo(f"  (keeping the newest {len(the_plan.keep)} instead: {_errors(the_plan.errors_last)})")
        if not the_plan.remove:
            typer.echo("nothing to delete: the folder fits the budget")
            return
        if not apply:
            for info in the_plan.remove:
                typer.echo(f"would delete {info.path}")
            typer.echo(f"dry run: nothing deleted; add --apply to delete these {len(the_plan.remove)} files")
            return
        for path in apply_retention(the_plan):
            typer.echo(f"deleted {path}")


@app.command("estimate")
def estimate_command(
    params: Annotated[float, typer.Option(min=1, help="Floating values tracked, e.g. 2.5e9.", show_default=False)],
    steps: Annotated[float, typer.Option(min=1, help="Training steps, e.g. 1e6.", show_default=False)],
    snapshot_every: Annotated[float, typer.Option(min=1, help="Steps between snapshots.", show_default=False)],
    sigma_rel: Annotated[
        str,
        typer.Option(
            "--sigma-rel",
            "-s",
            metavar="S1,S2",
            help="The tracked sigma_rels, separated by commas.",
            show_default=False,
        ),
    ],
    dtype: Annotated[
        str, typer.Option(metavar="DTYPE", help="Snapshot dtype: float32, bfloat16, float16, float64.")
    ] = ("float32"),
    target: Annotated[
        str | None,
        typer.Option(
            metavar="LO:HI",
            help="Target sigma_rels to predict the error of (as for prune). Default: the tracked range.",
            show_default=False,
        ),
    ] = None,
    budget: Budget = None,
    max_snapshots: MaxSnapshots = None,
) -> None:
    """Predict the disk use and reconstruction error of a run before it starts (no files are read)."""
    tracked = _sigma_rel_range(sigma_rel)
    targets = None if target is None else _sigma_rel_range(target)
    with _library_errors():
        result = estimate(
            params=params, steps=steps, snapshot_every=snapshot_every, sigma_rels=tracked, dtype=dtype,
            targets=targets, budget=budget, max_snapshots=max_snapshots,
        )  # fmt: skip
    typer.echo(
        f"snapshots: {result.snapshot_steps} steps x {len(tracked)} sigma_rels = {result.files} files "
        f"of {_gb(result.bytes_per_file)} ({dtype}): {_gb(result.total_bytes)}"
    )
    typer.echo(f"predicted error over {_range_text(result.sigma_rels)}: {_errors(result.errors)}")
    if result.errors_kept is not None and result.errors_last is not None and result.kept_bytes is not None:
        typer.echo(
            f"pruned to {result.kept_files} files ({_gb(result.kept_bytes)}): {_errors(result.errors_kept)}; "
            f"the last {result.kept_files} files instead: {_errors(result.errors_last)}"
        )


def main() -> None:
    """Entry point of the ``posthoc-ema`` console script."""
    app(prog_name="posthoc-ema")


if __name__ == "__main__":
    main()
