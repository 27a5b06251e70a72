"""Side-by-side benchmarks: posthoc-ema against ema-pytorch and pytorch-posthoc-ema.

    python benchmarks/run.py [update|snapshot|synthesis|all] [--quick] [--threads N] [--fresh]

One run prints markdown tables, ready to paste into docs/benchmarks.md. It also writes
them, with every raw measurement, to benchmarks/.work/results/<date>[-quick].{md,json}.

Sections:
    update     one training step's EMA update (two EMAs) against a fused foreach lerp
    snapshot   the training-loop stall of a snapshot against a plain copy of the EMAs
    synthesis  8 sigma_rels from 40 snapshots against reading every snapshot byte once

Every measurement runs in its own subprocess and prints one JSON line. Our side runs
through this file's `job` command, the competitors through benchmarks/competitors.py.
Install the competitors first with `bash benchmarks/setup_competitors.sh`; without them
only our side runs. Machines are noisy, so every time is set against a floor, the least
work that does the job, and the tables give ratios to it. The update and snapshot jobs
time their floor in the same process, in rounds alternating with the library, and
report medians (and minimums) of many calls. Synthesis is one long call per process,
so its floor is a process of its own that reads the same files, alternating with ours.

A full run takes about 5 minutes, plus about a minute the first time to write the
snapshot folders it caches under benchmarks/.work/snapshots/ (12 GB; --fresh rewrites
them). --quick shrinks models and iterations into a smoke test of about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from competitors import (
    DEPS,
    SHAPES,
    SIGMA_RELS,
    TARGETS,
    build_model,
    checksum,
    emit,
    emit_folder,
    model_stats,
    peak_rss_mb,
    rss_mb,
    time_calls,
    training_noise,
)

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
COMPETITORS = HERE / "competitors.py"
LIB_NAMES = {
    "posthoc_ema": "posthoc-ema (ours)",
    "ema_pytorch": "ema-pytorch 0.8.3",
    "pytorch_posthoc_ema": "pytorch-posthoc-ema 1.0.10",
}
JOB_TIMEOUT_S = 1800
READ_BYTES = 32 << 20  # buffer of the read floor
PRODUCT_COLUMNS = 16384  # columns per matrix product when timing the arithmetic alone


@dataclass(frozen=True)
class Config:
    """How much work each section does."""

    update_iters: int  # timed calls per round
    update_rounds: int  # alternating library/floor rounds
    update_warmup: int
    snapshot_shapes: tuple[str, ...]
    snapshot_iters: int  # timed calls per case per round
    snapshot_rounds: int
    synth_shape: str
    synth_snapshots: int  # snapshots per EMA
    synth_every: int  # training steps between snapshots
    synth_few_step: int  # reconstruct at this step for the "fewer snapshots" row
    synth_rounds: int  # alternating floor/ours rounds
    synth_warm: bool  # read each folder once, unmeasured, before measuring it
    synth_all_variants: bool  # also pytorch-posthoc-ema's slower from_path without a model


FULL = Config(
    update_iters=50,
    update_rounds=5,
    update_warmup=5,
    snapshot_shapes=("big", "small"),
    snapshot_iters=5,
    snapshot_rounds=4,
    synth_shape="synth",
    synth_snapshots=20,
    synth_every=5,
    synth_few_step=25,  # 5 snapshots per EMA, 10 in all
    synth_rounds=3,
    synth_warm=True,
    synth_all_variants=True,
)
QUICK = Config(
    update_iters=5,
    update_rounds=2,
    update_warmup=1,
    snapshot_shapes=("small",),
    snapshot_iters=2,
    snapshot_rounds=1,
    synth_shape="big",
    synth_snapshots=4,
    synth_every=5,
    synth_few_step=10,  # 2 snapshots per EMA, 4 in all
    synth_rounds=1,
    synth_warm=False,
    synth_all_variants=False,
)


# =============================================================================== jobs
# Each job runs in a fresh process (`run.py job NAME ...`) and prints one JSON line.


def job_update(args: argparse.Namespace) -> None:
    """Our update() against the floor, in alternating rounds."""
    from posthoc_ema import PostHocEMA, __version__

    model = build_model(args.shape).to(getattr(torch, args.dtype))
    params = list(model.parameters())
    tracker = PostHocEMA(model, sigma_rels=SIGMA_RELS, snapshot_every=None)
    # The floor does what update() must: one fused lerp per EMA into float32 copies
    # (after one fused cast into float32 staging for a half-precision model). It runs
    # under no_grad, as update() does: a lerp towards a Parameter outside no_grad pays
    # autograd's overhead and would make the floor look slow.
    emas = [[p.detach().to(torch.float32, copy=True) for p in params] for _ in SIGMA_RELS]
    staging = None if args.dtype == "float32" else [torch.empty(p.shape, dtype=torch.float32) for p in params]

    @torch.no_grad()
    def floor() -> None:
        sources = params
        if staging is not None:
            torch._foreach_copy_(staging, params)
            sources = staging
        for ema in emas:
            torch._foreach_lerp_(ema, sources, 1.0 - 0.999)

    ours_s: list[float] = []
    floor_s: list[float] = []
    for r in range(args.rounds):
        pair = [(tracker.update, ours_s), (floor, floor_s)]
        for fn, samples in pair if r % 2 == 0 else pair[::-1]:
            samples += time_calls(fn, args.iters, args.warmup)
    emit(
        {
            "job": "update",
            "lib": "posthoc_ema",
            "version": __version__,
            "shape": args.shape,
            "dtype": args.dtype,
            **model_stats(model),
            "n_emas": len(SIGMA_RELS),
            "iters": args.iters,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "update_s": statistics.median(ours_s),
            "update_min_s": min(ours_s),
            "floor_s": statistics.median(floor_s),
            "floor_min_s": min(floor_s),
            "ratio": statistics.median(ours_s) / statistics.median(floor_s),
            "ratio_min": min(ours_s) / min(floor_s),
        }
    )


@dataclass
class Case:
    """One row of the snapshot job: a timed call, with untimed work around it."""

    call: Callable[[], Any]
    before: Callable[[], None] | None = None
    after: Callable[[], float] | None = None  # untimed clean-up; returns the seconds spent flushing
    samples: list[float] = field(default_factory=list)
    after_samples: list[float] = field(default_factory=list)


def _remove_files(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def job_snapshot(args: argparse.Namespace) -> None:
    """The stall of a snapshot, against a plain copy and blocking saves of both EMAs."""
    from safetensors.torch import save_file

    from posthoc_ema import PostHocEMA, __version__

    model = build_model(args.shape)
    named = dict(model.named_parameters())
    root = Path(tempfile.mkdtemp(prefix="snapshot-", dir=args.tmp_root))  # same disk as the snapshots
    manual_dir, every_dir, blocking_dir = root / "manual", root / "every", root / "blocking"
    blocking_dir.mkdir()
    try:
        manual = PostHocEMA(model, SIGMA_RELS, snapshot_dir=manual_dir, snapshot_every=None)
        every = PostHocEMA(model, SIGMA_RELS, snapshot_dir=every_dir, snapshot_every=1)
        manual.update()
        # stand-ins for the two EMAs, for the baselines: same names, shapes and dtype
        emas = [{k: p.detach().clone() for k, p in named.items()} for _ in SIGMA_RELS]

        def settle(flush: Callable[[], None], folder: Path) -> Callable[[], float]:
            def after() -> float:
                start = time.perf_counter()
                flush()  # the background writes of this sample, to the end
                flush_s = time.perf_counter() - start
                _remove_files(folder)
                os.sync()  # so that writing back this sample does not overlap the next
                return flush_s

            return after

        def no_flush() -> None:
            pass

        cases = {
            "copy": Case(lambda: [t.clone() for ema in emas for t in ema.values()]),
            # update() first, untimed, so that each snapshot is of a new step
            "snapshot": Case(manual.snapshot, before=manual.update, after=settle(manual.flush, manual_dir)),
            "update_at_snapshot": Case(every.update, after=settle(every.flush, every_dir)),
            "update": Case(manual.update),
            "save_file": Case(
                lambda: [save_file(ema, blocking_dir / f"{i}.safetensors") for i, ema in enumerate(emas)],
                after=settle(no_flush, blocking_dir),
            ),
            "torch_save": Case(
                lambda: [torch.save(ema, blocking_dir / f"{i}.pt") for i, ema in enumerate(emas)],
                after=settle(no_flush, blocking_dir),
            ),
        }
        names = list(cases)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                case = cases[name]
                for i in range(args.warmup + args.iters):
                    if case.before is not None:
                        case.before()
                    gc.collect()
                    gc.disable()
                    start = time.perf_counter()
                    result = case.call()
                    seconds = time.perf_counter() - start
                    gc.enable()
                    del result  # freeing a copy is not part of making it
                    after_s = 0.0 if case.after is None else case.after()
                    if i >= args.warmup:
                        case.samples.append(seconds)
                        case.after_samples.append(after_s)
        manual.close()
        every.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    copy_median = statistics.median(cases["copy"].samples)
    copy_min = min(cases["copy"].samples)
    emit(
        {
            "job": "snapshot",
            "lib": "posthoc_ema",
            "version": __version__,
            "shape": args.shape,
            **model_stats(model),
            "n_emas": len(SIGMA_RELS),
            "bytes": sum(t.numel() * t.element_size() for ema in emas for t in ema.values()),
            "iters": args.iters,
            "rounds": args.rounds,
            "cases": {
                name: {
                    "median_s": statistics.median(case.samples),
                    "min_s": min(case.samples),
                    "ratio": statistics.median(case.samples) / copy_median,
                    "ratio_min": min(case.samples) / copy_min,
                    "after_median_s": statistics.median(case.after_samples),
                    "samples_s": case.samples,
                }
                for name, case in cases.items()
            },
        }
    )


def job_make_snapshots(args: argparse.Namespace) -> None:
    """A folder of our snapshots, from the same training trajectory as the competitors'."""
    from posthoc_ema import PostHocEMA, __version__

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model = build_model(args.shape)
    params = [p.detach() for p in model.parameters()]
    tracker = PostHocEMA(model, SIGMA_RELS, snapshot_dir=out, snapshot_every=args.every)
    train_step = training_noise(params)
    start = time.perf_counter()
    for t in range(args.snapshots * args.every):
        train_step(t)
        tracker.update()
    tracker.close()
    seconds = time.perf_counter() - start
    os.sync()  # so that writing back these GiBs does not overlap a later job
    files = sorted(out.glob("*.safetensors"))
    meta = {
        "lib": "posthoc_ema",
        "version": __version__,
        "writer": writer_digest(),
        "shape": args.shape,
        "dtype": "float32",
        "sigma_rels": SIGMA_RELS,
        "snapshots_per_ema": args.snapshots,
        "every": args.every,
    }
    emit_folder(meta, model, out, files, seconds)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def system_seconds() -> float:
    """System CPU time of this process so far (page faults, copies out of the page cache)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _vm_hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM), a cross-check of ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def job_synthesize(args: argparse.Namespace) -> None:
    """Our synthesis of the 8 targets with `synthesize_many`: wall time, CPU time and peak memory."""
    rss_start = rss_mb()  # torch is imported, our library not yet
    import posthoc_ema

    rss_import = rss_mb()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_start, sys_start = cpu_seconds(), system_seconds()
        start = time.perf_counter()
        result = posthoc_ema.synthesize_many(args.folder, TARGETS, step=args.step)
        seconds = time.perf_counter() - start
        cpu_s, sys_s = cpu_seconds() - cpu_start, system_seconds() - sys_start
        peak = peak_rss_mb()
        the_plan = posthoc_ema.plan(args.folder, TARGETS, step=args.step)  # after timing: what was used
    emit(
        {
            "job": "synthesize",
            "lib": "posthoc_ema",
            "version": posthoc_ema.__version__,
            "folder": args.folder,
            "step": the_plan.step,
            "snapshots": len(the_plan.snapshots),
            "targets": TARGETS,
            "seconds": seconds,
            "cpu_s": cpu_s,
            "system_s": sys_s,
            "outputs_bytes": sum(t.numel() * t.element_size() for sd in result.values() for t in sd.values()),
            "rss_start_mb": rss_start,
            "rss_after_import_mb": rss_import,
            "peak_rss_mb": peak,
            "vm_hwm_mb": _vm_hwm_mb(),
            "predicted_errors": the_plan.errors.tolist(),
            "warnings": sorted({str(w.message) for w in caught}),
            "checksums": [checksum(sd.values()) for sd in result.values()],
        }
    )


def job_read_floor(args: argparse.Namespace) -> None:
    """The synthesis floor: read every snapshot byte once, into one reused buffer."""
    folder = Path(args.folder)
    if args.step is None:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".safetensors"))
    else:  # our folder, reconstructed at an earlier step: only the snapshots it uses
        from posthoc_ema import list_snapshots

        files = [info.path for info in list_snapshots(folder) if info.step <= args.step]
    rss_start = rss_mb()
    view = memoryview(bytearray(READ_BYTES))
    total = 0
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    seconds = time.perf_counter() - start
    cpu_s = cpu_seconds() - cpu_start
    emit(
        {
            "job": "read-floor",
            "folder": str(folder),
            "files": len(files),
            "bytes": total,
            "seconds": seconds,
            "cpu_s": cpu_s,
            "gb_per_s": total / seconds / 1e9,
            "rss_start_mb": rss_start,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def job_parts(args: argparse.Namespace) -> None:
    """What synthesis costs besides reading: creating the outputs, and the arithmetic alone."""
    n_out, n_in, n = len(TARGETS), args.snapshots, args.elements
    start = time.perf_counter()
    sums = torch.zeros(n_out, n)  # the first touch of fresh pages, as for any new output
    touch_s = time.perf_counter() - start
    weights = torch.randn(n_out, n_in)
    block = torch.randn(n_in, PRODUCT_COLUMNS)  # one block, reused: it stays in cache
    start = time.perf_counter()
    for e0 in range(0, n, PRODUCT_COLUMNS):
        e1 = min(n, e0 + PRODUCT_COLUMNS)
        sums[:, e0:e1].addmm_(weights, block[:, : e1 - e0])
    product_s = time.perf_counter() - start
    emit(
        {
            "job": "parts",
            "targets": n_out,
            "snapshots": n_in,
            "elements": n,
            "outputs_bytes": sums.numel() * sums.element_size(),
            "touch_s": touch_s,
            "product_s": product_s,
            "product_columns": PRODUCT_COLUMNS,
            "gflop_per_s": 2 * n_out * n_in * n / product_s / 1e9,
        }
    )


def job_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run.py job", description="one measurement (used by run.py itself)")
    jobs = parser.add_subparsers(dest="job", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = jobs.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--threads", type=int, default=1)
        return p

    p = add("update", job_update)
    p.add_argument("--shape", choices=("big", "small"), required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)

    p = add("snapshot", job_snapshot)
    p.add_argument("--shape", choices=("big", "small"), required=True)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tmp-root", default=str(WORK))

    p = add("make-snapshots", job_make_snapshots)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", choices=SHAPES, default="synth")
    p.add_argument("--snapshots", type=int, default=20, help="snapshots per EMA")
    p.add_argument("--every", type=int, default=5)

    p = add("synthesize", job_synthesize)
    p.add_argument("--folder", required=True)
    p.add_argument("--step", type=int, default=None)

    p = add("read-floor", job_read_floor)
    p.add_argument("--folder", required=True)
    p.add_argument("--step", type=int, default=None)

    p = add("parts", job_parts)
    p.add_argument("--elements", type=int, required=True, help="floating elements per output")
    p.add_argument("--snapshots", type=int, required=True)

    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.fn(args)


# ====================================================================== orchestration


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


class Jobs:
    """Runs jobs in subprocesses, one at a time, and keeps their records."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.records: list[dict[str, Any]] = []

    def run(self, label: str, script: Path, *job_args: str) -> dict[str, Any]:
        cmd = [sys.executable, str(script), *job_args, "--threads", str(self.threads)]
        print(f"  {label} ...", end="", file=sys.stderr, flush=True)
        load = loadavg()
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"exit code {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-5:]))
            record = json.loads(lines[-1])
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            record = {"error": str(err)}
        wall = time.perf_counter() - start
        record.update(label=label, cmd=cmd[1:], wall_s=wall, loadavg_before=load)
        self.records.append(record)
        status = "FAILED: " + record["error"] if "error" in record else f"{wall:.1f} s"
        print(f" {status}", file=sys.stderr, flush=True)
        return record

    def ours(self, label: str, *job_args: str) -> dict[str, Any]:
        return self.run(label, Path(__file__), "job", *job_args)

    def theirs(self, label: str, *job_args: str) -> dict[str, Any]:
        return self.run(label, COMPETITORS, *job_args)


@dataclass
class Target:
    what: str
    goal: str
    measured: str
    met: bool | None  # None: not measured


@dataclass
class Section:
    title: str
    intro: str
    tables: list[str]
    targets: list[Target]
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds * 1e3 < 100 else f"{seconds * 1e3:.0f}"


def ratio(x: float) -> str:
    return f"{x:.2f}"


def ok(record: dict[str, Any] | None) -> bool:
    return record is not None and "error" not in record


def missing_cells(record: dict[str, Any] | None, n: int) -> list[str]:
    """Cells of a row whose job did not run (competitor not installed) or failed."""
    return ["not installed: run setup_competitors.sh" if record is None else "failed", *[""] * (n - 1)]


def describe_model(record: dict[str, Any]) -> str:
    dtype = record.get("dtype", "float32")
    suffix = f", {dtype}" if dtype != "float32" else ""
    return f"{record['shape']}: {record['n_params'] / 1e6:.1f}M params, {record['n_tensors']} tensors{suffix}"


def run_update(cfg: Config, jobs: Jobs, available: dict[str, bool]) -> Section:
    load_before = loadavg()
    counts = ["--iters", str(cfg.update_iters), "--rounds", str(cfg.update_rounds), "--warmup", str(cfg.update_warmup)]
    rows: list[list[str]] = []
    targets: list[Target] = []
    for shape in ("big", "small"):
        ours = jobs.ours(f"update {shape}: posthoc-ema", "update", "--shape", shape, *counts)
        results: dict[str, dict[str, Any] | None] = {"posthoc_ema": ours}
        for lib in ("ema_pytorch", "pytorch_posthoc_ema"):
            results[lib] = (
                jobs.theirs(f"update {shape}: {lib}", "update", "--lib", lib, "--shape", shape, *counts)
                if available[lib]
                else None
            )
        model = describe_model(ours) if ok(ours) else shape
        for lib, record in results.items():
            if not ok(record):
                rows.append([model, LIB_NAMES[lib], *missing_cells(record, 6)])
                continue
            assert record is not None
            speedup = "" if lib == "posthoc_ema" or not ok(ours) else f"{record['ratio'] / ours['ratio']:.1f}x"
            rows.append(
                [
                    model,
                    LIB_NAMES[lib],
                    ms(record["update_s"]),
                    ms(record["update_min_s"]),
                    ms(record["floor_s"]),
                    ratio(record["ratio"]),
                    ratio(record["update_min_s"] / record["floor_min_s"]),
                    speedup,
                ]
            )
        if ok(ours):
            targets.append(
                Target(
                    f"update(), {shape}",
                    "≤ 1.15x floor (medians and minimums)",
                    f"{ours['ratio']:.2f}x (medians), {ours['ratio_min']:.2f}x (minimums)",
                    max(ours["ratio"], ours["ratio_min"]) <= 1.15,
                )
            )
        if shape == "small":
            ema = results["ema_pytorch"]
            if ok(ours) and ok(ema):
                assert ema is not None
                speedup_value = ema["ratio"] / ours["ratio"]
                targets.append(
                    Target(
                        "update(), small: speed-up over ema-pytorch",
                        "≥ 3x",
                        f"{speedup_value:.1f}x",
                        speedup_value >= 3,
                    )
                )
            else:
                targets.append(Target("update(), small: speed-up over ema-pytorch", "≥ 3x", "not measured", None))
    bf16 = jobs.ours("update big bfloat16: posthoc-ema", "update", "--shape", "big", "--dtype", "bfloat16", *counts)
    if ok(bf16):
        rows.append(
            [
                describe_model(bf16),
                LIB_NAMES["posthoc_ema"] + ", float32 EMAs",
                ms(bf16["update_s"]),
                ms(bf16["update_min_s"]),
                ms(bf16["floor_s"]),
                ratio(bf16["ratio"]),
                ratio(bf16["update_min_s"] / bf16["floor_min_s"]),
                "",
            ]
        )
    header = [
        "model",
        "library",
        "update median (ms)",
        "update min (ms)",
        "floor median (ms)",
        "x floor (median)",
        "x floor (min)",
        "ours faster by",
    ]
    intro = (
        f"One `update()` per training step, tracking two EMAs (sigma_rels {SIGMA_RELS[0]}, {SIGMA_RELS[1]}), no "
        "snapshot written. Each library's own process times the floor in alternating rounds "
        f"({cfg.update_rounds} rounds x {cfg.update_iters} timed calls, each round after "
        f"{cfg.update_warmup} untimed ones). "
        "The floor is one `torch._foreach_lerp_` per EMA over float32 copies of the same tensors; for the bfloat16 "
        "model it is one `torch._foreach_copy_` into float32 staging, then the lerps. "
        "'ours faster by' compares ratios to the floor: (their ratio to the floor) / (our ratio to the floor)."
    )
    return Section("update()", intro, [table(header, rows)], targets, load_before, loadavg())


SNAPSHOT_CASES = {
    "copy": "plain copy of both EMAs (`t.clone()` each tensor)",
    "snapshot": "posthoc-ema `snapshot()`: stage a CPU copy, hand it to the writer thread",
    "update_at_snapshot": "posthoc-ema `update()` at a snapshot step (`snapshot_every=1`)",
    "update": "posthoc-ema `update()` at an ordinary step, for reference",
    "save_file": "blocking `safetensors.torch.save_file` of both EMAs (no fsync)",
    "torch_save": "blocking `torch.save` of both EMAs (no fsync)",
}


def run_snapshot(cfg: Config, jobs: Jobs) -> Section:
    load_before = loadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    targets: list[Target] = []
    for shape in cfg.snapshot_shapes:
        record = jobs.ours(
            f"snapshot {shape}: posthoc-ema and baselines",
            "snapshot",
            "--shape",
            shape,
            "--iters",
            str(cfg.snapshot_iters),
            "--rounds",
            str(cfg.snapshot_rounds),
            "--tmp-root",
            str(WORK),
        )
        if not ok(record):
            rows.append([shape, "all", *missing_cells(record, 5)])
            targets.append(
                Target(f"snapshot() stall, {shape}", "≤ 1.5x plain copy (medians and minimums)", "failed", None)
            )
            continue
        model = f"{describe_model(record)}; 2 EMAs = {record['bytes'] / 2**20:.0f} MiB"
        for name, text in SNAPSHOT_CASES.items():
            case = record["cases"][name]
            write = ""
            if name == "snapshot":
                write = f"then {ms(case['after_median_s'])} ms more until on disk (background, fsynced)"
            rows.append(
                [
                    model,
                    text,
                    ms(case["median_s"]),
                    ms(case["min_s"]),
                    ratio(case["ratio"]),
                    ratio(case["ratio_min"]),
                    write,
                ]
            )
        stall = record["cases"]["snapshot"]
        targets.append(
            Target(
                f"snapshot() stall, {shape}",
                "≤ 1.5x plain copy (medians and minimums)",
                f"{stall['ratio']:.2f}x (medians), {stall['ratio_min']:.2f}x (minimums)",
                max(stall["ratio"], stall["ratio_min"]) <= 1.5,
            )
        )
    header = [
        "model",
        "what the training loop waits for",
        "median (ms)",
        "min (ms)",
        "x copy (median)",
        "x copy (min)",
        "note",
    ]
    intro = (
        "The time a training step spends on a snapshot of both EMAs, all measured in one process in alternating "
        f"rounds ({cfg.snapshot_rounds} rounds x {cfg.snapshot_iters} timed calls per row, each round after 1 "
        "untimed one). Outside the timed region, after each call, the background writes are flushed (`flush()`), "
        "the files are deleted and `os.sync()` runs, so no sample overlaps the writing of the previous one. "
        "Files go to a temporary folder under benchmarks/.work/, on the same disk as the snapshots."
    )
    return Section("Snapshot stall", intro, [table(header, rows)], targets, load_before, loadavg())


def _meta_matches(folder: Path, expected: dict[str, Any]) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in expected.items())


def ensure_folder(jobs: Jobs, cfg: Config, lib: str, fresh: bool) -> tuple[Path, dict[str, Any] | None]:
    """The cached snapshot folder of one library, (re)made when missing, stale or --fresh."""
    folder = WORK / "snapshots" / f"{lib}-{cfg.synth_shape}-{cfg.synth_snapshots}x{cfg.synth_every}"
    expected: dict[str, Any] = {
        "lib": lib,
        "shape": cfg.synth_shape,
        "dtype": "float32",
        "snapshots_per_ema": cfg.synth_snapshots,
        "every": cfg.synth_every,
    }
    if lib == "posthoc_ema":
        expected["writer"] = writer_digest()
    if not fresh and _meta_matches(folder, expected):
        return folder, None
    common = ["--out", str(folder), "--shape", cfg.synth_shape]
    common += ["--snapshots", str(cfg.synth_snapshots), "--every", str(cfg.synth_every)]
    label = f"make snapshots: {lib}"
    if lib == "posthoc_ema":
        record = jobs.ours(label, "make-snapshots", *common)
    else:
        record = jobs.theirs(label, "make-snapshots", "--lib", lib, *common, "--dtype", "float32")
    return folder, record


def writer_digest() -> str:
    """A digest of the code that writes our snapshots: our folder is rewritten when it changes.

    Read from the files, not imported: importing the library here would grow this
    process's RSS, which the measured processes start from.
    """
    spec = importlib.util.find_spec("posthoc_ema")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return "unknown"
    package = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256()
    for name in ("tracker.py", "snapshots.py"):
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:16]


def _median_of(records: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in records)


def run_synthesis(cfg: Config, jobs: Jobs, available: dict[str, bool], fresh: bool) -> Section:
    load_before = loadavg()
    folders: dict[str, Path] = {}
    for lib in ("posthoc_ema", "ema_pytorch", "pytorch_posthoc_ema"):
        if lib == "posthoc_ema" or available[lib]:
            folder, made = ensure_folder(jobs, cfg, lib, fresh)
            if made is None or ok(made):
                folders[lib] = folder
    n_snapshots = 2 * cfg.synth_snapshots
    n_few = 2 * (cfg.synth_few_step // cfg.synth_every)
    rows: list[list[str]] = []
    targets: list[Target] = []
    if "posthoc_ema" not in folders:
        return Section("Synthesis", "Our snapshot folder could not be made.", [], targets, load_before, loadavg())

    def warm(label: str, folder_args: list[str]) -> None:
        if cfg.synth_warm:
            jobs.ours(f"{label}, warming the page cache", "read-floor", *folder_args)

    def measure_ours(step: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Our synthesis and the read floor of the same files, in alternating rounds."""
        folder_args = ["--folder", str(folders["posthoc_ema"])] + ([] if step is None else ["--step", str(step)])
        label = "synthesis: posthoc-ema" + ("" if step is None else f" at step {step}")
        warm("synthesis: read floor", folder_args)
        floors, runs = [], []
        for r in range(cfg.synth_rounds):
            for job in ("read-floor", "synthesize") if r % 2 == 0 else ("synthesize", "read-floor"):
                if job == "read-floor":
                    floors.append(jobs.ours("synthesis: read floor", job, *folder_args))
                else:
                    runs.append(jobs.ours(label, job, *folder_args))
        return [f for f in floors if ok(f)], [x for x in runs if ok(x)]

    def memory_cells(record: dict[str, Any]) -> list[str]:
        above = record["peak_rss_mb"] - record["rss_start_mb"]
        return [f"{above:.0f}", ratio(above / outputs_mb)]

    floors, runs = measure_ours(None)
    few_floors, few_runs = measure_ours(cfg.synth_few_step)
    if not (floors and runs):
        return Section("Synthesis", "Our synthesis failed.", [], targets, load_before, loadavg())
    ours = max(runs, key=lambda x: x["peak_rss_mb"])  # memory: the worst run
    outputs_mb = ours["outputs_bytes"] / 2**20
    ours_ratio = _median_of(runs, "seconds") / _median_of(floors, "seconds")
    ours_min_ratio = min(r["seconds"] for r in runs) / min(f["seconds"] for f in floors)
    rows.append(
        [
            LIB_NAMES["posthoc_ema"] + ": `synthesize_many`",
            str(ours["snapshots"]),
            f"{_median_of(runs, 'seconds'):.2f}",
            f"{_median_of(floors, 'seconds'):.2f}",
            ratio(ours_ratio),
            "",
            "",
            *memory_cells(ours),
        ]
    )
    few = max(few_runs, key=lambda x: x["peak_rss_mb"]) if few_runs and few_floors else None
    if few is not None:
        few_s, few_floor_s = _median_of(few_runs, "seconds"), _median_of(few_floors, "seconds")
        rows.append(
            [
                LIB_NAMES["posthoc_ema"] + f": `synthesize_many(step={cfg.synth_few_step})`",
                str(few["snapshots"]),
                f"{few_s:.2f}",
                f"{few_floor_s:.2f}",
                ratio(few_s / few_floor_s),
                "",
                "",
                *memory_cells(few),
            ]
        )
    targets.append(
        Target(
            f"synthesis time, {n_snapshots} snapshots",
            "≤ 1.3x read floor (medians and minimums)",
            f"{ours_ratio:.2f}x (medians), {ours_min_ratio:.2f}x (minimums)",
            max(ours_ratio, ours_min_ratio) <= 1.3,
        )
    )
    elements = ours["outputs_bytes"] // 4 // len(TARGETS)
    parts = jobs.ours(
        "synthesis: outputs and products alone", "parts", "--elements", str(elements), "--snapshots", str(n_snapshots)
    )
    floor_s = _median_of(floors, "seconds")
    parts_rows = [
        [
            "read every snapshot byte once (the floor above)",
            f"{floor_s:.2f}",
            "1.00",
            f"{_median_of(floors, 'cpu_s'):.2f}",
        ]
    ]
    if ok(parts):
        parts_rows += [
            [
                f"allocate and first-touch the {len(TARGETS)} outputs ({outputs_mb:.0f} MiB)",
                f"{parts['touch_s']:.2f}",
                ratio(parts["touch_s"] / floor_s),
                "(one thread)",
            ],
            [
                f"the products alone: [{len(TARGETS)}, {n_snapshots}] @ [{n_snapshots}, {PRODUCT_COLUMNS}] blocks over "
                f"the touched outputs, one thread, input in cache ({parts['gflop_per_s']:.0f} GFLOP/s)",
                f"{parts['product_s']:.2f}",
                ratio(parts["product_s"] / floor_s),
                "(one thread)",
            ],
        ]
    parts_rows.append(
        [
            "posthoc-ema `synthesize_many` (two threads, each reading then multiplying its chunks), as above",
            f"{_median_of(runs, 'seconds'):.2f}",
            ratio(ours_ratio),
            f"{_median_of(runs, 'cpu_s'):.2f}",
        ]
    )

    variants = {
        "ema_pytorch": [("default", "`synthesize_ema_model`, 8 calls")],
        "pytorch_posthoc_ema": [("model", "`from_path(dir, model)`, `state_dict(s)`, 8 calls")],
    }
    if cfg.synth_all_variants:
        variants["pytorch_posthoc_ema"].insert(0, ("state_dict", "`from_path(dir)`, `state_dict(s)`, 8 calls"))
    ours_s = _median_of(runs, "seconds")
    ema = None  # (speed-up from ratios to the floor, speed-up in time)
    for lib, lib_variants in variants.items():
        if lib not in folders:
            record = None if not available[lib] else {"error": "snapshots not made"}
            rows += [
                [f"{LIB_NAMES[lib]}: {text}", str(n_snapshots), *missing_cells(record, 7)] for _, text in lib_variants
            ]
            continue
        folder_args = ["--folder", str(folders[lib])]
        warm(f"synthesis: read floor of {lib}", folder_args)
        # the floor before and after the library's runs: they are single samples, minutes apart
        lib_floors = [jobs.ours(f"synthesis: read floor of {lib}", "read-floor", *folder_args)]
        records = [
            jobs.theirs(f"synthesis: {lib} {variant}", "synthesize", "--lib", lib, *folder_args, "--variant", variant)
            for variant, _ in lib_variants
        ]
        lib_floors.append(jobs.ours(f"synthesis: read floor of {lib}", "read-floor", *folder_args))
        lib_floors = [f for f in lib_floors if ok(f)]
        for (_, text), record in zip(lib_variants, records, strict=True):
            if not (ok(record) and lib_floors):
                rows.append([f"{LIB_NAMES[lib]}: {text}", str(n_snapshots), *missing_cells({"error": ""}, 7)])
                continue
            seconds = record["setup_s"] + record["synth_s"]
            lib_floor_s = _median_of(lib_floors, "seconds")
            lib_ratio = seconds / lib_floor_s
            if lib == "ema_pytorch":
                ema = (lib_ratio / ours_ratio, seconds / ours_s)
            rows.append(
                [
                    f"{LIB_NAMES[lib]}: {text}",
                    str(record["snapshots"]),
                    f"{seconds:.2f}",
                    f"{lib_floor_s:.2f}",
                    ratio(lib_ratio),
                    f"{lib_ratio / ours_ratio:.1f}x",
                    f"{seconds / ours_s:.1f}x",
                    *memory_cells(record),
                ]
            )
    targets.append(
        Target(
            "synthesis: speed-up over ema-pytorch's 8 calls",
            "≥ 5x",
            "not measured" if ema is None else f"{ema[0]:.1f}x in ratios to the floor ({ema[1]:.1f}x in time)",
            None if ema is None else ema[0] >= 5,
        )
    )
    import_mb = ours["rss_after_import_mb"] - ours["rss_start_mb"]
    # the constant: what importing our library (numpy, scipy, safetensors) adds after torch
    beyond = ours["peak_rss_mb"] - ours["rss_after_import_mb"]
    targets.append(
        Target(
            "synthesis: peak memory",
            "≤ 1.2x outputs + a constant",
            f"{beyond / outputs_mb:.2f}x outputs + {import_mb:.0f} MiB of imports ({outputs_mb:.0f} MiB of outputs "
            f"+ {beyond - outputs_mb:.0f} MiB)",
            beyond <= 1.2 * outputs_mb,
        )
    )
    if few is not None:
        delta = ours["peak_rss_mb"] - ours["rss_start_mb"] - (few["peak_rss_mb"] - few["rss_start_mb"])
        targets.append(
            Target(
                f"synthesis: memory flat in the number of snapshots ({n_few} vs {n_snapshots})",
                "peaks differ by ≤ 5% of the outputs",
                f"{delta:+.0f} MiB ({delta / outputs_mb:+.1%})",
                abs(delta) <= 0.05 * outputs_mb,
            )
        )
    header = [
        "library: call",
        "snapshots",
        "8 targets (s)",
        "read floor (s)",
        "x floor",
        "ours faster by (x floor)",
        "ours faster by (time)",
        "peak RSS above torch (MiB)",
        "x outputs",
    ]
    n_params = ours["outputs_bytes"] / len(TARGETS) / 4
    intro = (
        f"The EMAs of {len(TARGETS)} sigma_rels ({', '.join(map(str, TARGETS))}) from {n_snapshots} float32 snapshots "
        f"({cfg.synth_snapshots} snapshot steps, every {cfg.synth_every} steps, x sigma_rels {SIGMA_RELS[0]}, "
        f"{SIGMA_RELS[1]}) of the {n_params / 1e6:.1f}M-parameter `{cfg.synth_shape}` model. Each library's "
        "snapshots are written by its own tracker along the same training trajectory. Outputs: "
        f"{len(TARGETS)} x {outputs_mb / len(TARGETS):.0f} MiB = {outputs_mb:.0f} MiB. Every row is a fresh process. "
        "The read floor reads every byte of the same snapshot files once, with plain `readinto` calls into a reused "
        f"{READ_BYTES >> 20} MiB buffer on one thread, from the page cache"
        + (", which one unmeasured read warms just before" if cfg.synth_warm else "")
        + f". Ours times `synthesize_many`, median of {cfg.synth_rounds} run(s) alternating with "
        "the floor. The competitors' time is their tracker's setup plus the 8 calls, without building the model. "
        "'ours faster by (x floor)' divides their ratio to their folder's floor (the median of a read before "
        "and one after their runs) by ours; '(time)' divides the seconds. Peak RSS is `ru_maxrss` minus the RSS right "
        "after `import torch`. The competitors hold one output at a time, but 'x outputs' still divides by the size "
        "of all 8."
    )
    parts_header = [
        f"our synthesis of {n_snapshots} snapshots, and its parts (a process each)",
        "s",
        "x read floor",
        "CPU s (all threads)",
    ]
    tables = [table(header, rows), table(parts_header, parts_rows)]
    return Section("Synthesis", intro, tables, targets, load_before, loadavg())


# ========================================================================== reporting


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def git_commit() -> str:
    """The commit measured, marked "+ changes" when posthoc_ema/ differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + changes" if git("status", "--porcelain", "--", "../posthoc_ema") else "")


def load_text(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def render(sections: list[Section], info: dict[str, Any]) -> str:
    m = info["machine"]
    quick = " --quick" if info["quick"] else ""
    command = f"python benchmarks/run.py {info['section']}{quick} --threads {info['threads']}"
    out = [
        f"Run {info['date']}{' (--quick: a smoke test, not a benchmark)' if quick else ''}: "
        f"`{command}`, {info['wall_s'] / 60:.1f} minutes.",
        "",
        f"- posthoc-ema at commit {info['commit']}"
        + ("." if info["commit_end"] == info["commit"] else f", changed to {info['commit_end']} during the run!"),
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM; Python {m['python']}, "
        f"torch {m['torch']}; torch threads per process: {info['threads']}.",
        f"- Load average (1 / 5 / 15 min): {load_text(info['loadavg_start'])} before the run, "
        f"{load_text(info['loadavg_end'])} after.",
    ]
    for section in sections:
        out.append(
            f"- {section.title}: load {load_text(section.loadavg_before)} before, "
            f"{load_text(section.loadavg_after)} after."
        )
    targets = [t for section in sections for t in section.targets]
    if targets:
        rows = [
            [t.what, t.goal, t.measured, {True: "met", False: "**missed**", None: "not measured"}[t.met]]
            for t in targets
        ]
        out += ["", "### Targets", "", table(["target", "goal", "measured", ""], rows)]
    for section in sections:
        out += ["", f"### {section.title}", "", section.intro, ""]
        out += ["\n\n".join(section.tables)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["job"]:
        job_main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Sections: update, snapshot, synthesis, or all (default)."
    )
    parser.add_argument("section", nargs="?", default="all", choices=("update", "snapshot", "synthesis", "all"))
    parser.add_argument("--quick", action="store_true", help="a smoke test of about a minute")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every job (default 1)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached snapshot folders")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL

    available = {lib: path.is_dir() for lib, path in DEPS.items()}
    if not all(available.values()):
        print(
            "benchmarks/.deps/ lacks the competitors ("
            + ", ".join(lib for lib, there in available.items() if not there)
            + "): run `bash benchmarks/setup_competitors.sh` to compare against them. Running our side alone.",
            file=sys.stderr,
        )
    started = time.time()
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "section": args.section,
        "quick": args.quick,
        "threads": args.threads,
        "config": dataclasses.asdict(cfg),
        "machine": machine(),
        "commit": git_commit(),
        "competitors_installed": available,
        "loadavg_start": loadavg(),
    }
    jobs = Jobs(args.threads)
    sections: list[Section] = []
    wanted = ("update", "snapshot", "synthesis") if args.section == "all" else (args.section,)
    for name in wanted:
        print(f"[{name}]", file=sys.stderr, flush=True)
        if name == "update":
            sections.append(run_update(cfg, jobs, available))
        elif name == "snapshot":
            sections.append(run_snapshot(cfg, jobs))
        else:
            sections.append(run_synthesis(cfg, jobs, available, args.fresh))
    info["loadavg_end"] = loadavg()
    info["commit_end"] = git_commit()
    info["wall_s"] = time.time() - started
    markdown = render(sections, info)
    results = WORK / "results"
    results.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S", time.localtime(started)) + ("-quick" if args.quick else "")
    (results / f"{stem}.md").write_text(markdown)
    info["sections"] = [dataclasses.asdict(section) for section in sections]
    info["records"] = jobs.records
    (results / f"{stem}.json").write_text(json.dumps(info, indent=1))
    print(markdown)
    print(f"written: {results / stem}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
