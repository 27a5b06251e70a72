"""Synthesis against the read floor: today's code, the code of an earlier commit, and the parts.

    python benchmarks/synthesis_floor.py [--layers 48] [--rounds 5] [--baseline REF]

The task is run.py's synthesis task (8 sigma_rels from 40 float32 snapshots
written by our tracker), on a model small enough for a shared machine: 48 x
Linear(512, 512), 12.6M parameters, so the folder is 1.9 GB (it must stay in the
page cache) and the outputs 385 MiB. Every measurement is a fresh process
(`synthesis_floor.py job NAME`, one JSON line), and the rows alternate in each
round, so a burst of load from other jobs hits every row alike; the table gives
medians over rounds, and ratios of medians to the floor's.

Rows:
    floor      read every byte of the snapshot files once, `readinto` into a
               reused 32 MiB buffer on one thread (as run.py's floor)
    baseline   `synthesize_many` of the commit REF (default: the merge base
               with main), exported with `git archive` under .work/ and put
               first on PYTHONPATH: the same files, process and timer
    ours       `synthesize_many` of this checkout
    reads      ours with the products switched off: the reads alone, into the
               workers' chunk buffers, and the outputs left untouched
    products   ours with the reads switched off (the buffers hold ones): the
               products alone, with the first touch of the outputs
    touch      allocate the outputs and first-touch them (zero_), on the
               worker threads, each its half
    mmap-copy, mmap-direct
               tried and not kept: the files memory-mapped (see _use_mmap);
               their peak RSS counts the mapped page cache

The page cache is warmed by one unmeasured read first. Dropping it (cold
reads) needs root on a machine of one's own (`echo 1 > /proc/sys/vm/drop_caches`)
and is not done here: the folder is shared with other jobs' page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
TARGETS = (0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.18, 0.22)
SIGMA_RELS = (0.05, 0.10)
READ_BYTES = 32 << 20
ROWS = ("floor", "baseline", "ours", "reads", "products", "touch", "mmap-copy", "mmap-direct")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(record: dict[str, Any]) -> None:
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(record), flush=True)


def job_make(folder: Path, layers: int) -> None:
    import torch
    from torch import nn

    from posthoc_ema import PostHocEMA

    if folder.exists():
        shutil.rmtree(folder)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(layers)])
    params = [p.detach() for p in model.parameters()]
    tracker = PostHocEMA(model, SIGMA_RELS, snapshot_dir=folder, snapshot_every=5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):  # 20 snapshot steps x 2 sigma_rels = 40 snapshots
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator), alpha=1e-2)
        tracker.update()
    tracker.close()
    (folder / "layers.txt").write_text(str(layers))
    _emit({"job": "make"})


def job_floor(folder: Path) -> None:
    view = memoryview(bytearray(READ_BYTES))
    files = sorted(folder.glob("*.safetensors"))
    total, cpu, start = 0, _cpu_s(), time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    _emit({"job": "floor", "seconds": time.perf_counter() - start, "cpu_s": _cpu_s() - cpu, "bytes": total})


def _pass_module() -> Any:
    """The module that holds the pass's _fill and _product: posthoc_ema.reader, or synthesis in older baselines."""
    import importlib

    try:
        return importlib.import_module("posthoc_ema.reader")
    except ImportError:
        return importlib.import_module("posthoc_ema.synthesis")


def job_synthesize(folder: Path, part: str) -> None:
    import torch

    import posthoc_ema
    from posthoc_ema import synthesis

    passes = _pass_module()
    if part == "reads":
        passes._product = lambda *args, **kwargs: None
    elif part == "products":
        ones: set[int] = set()

        def fill(buffer: torch.Tensor, e0: int, e1: int, **kwargs: Any) -> torch.Tensor:
            if buffer.data_ptr() not in ones:  # not left uninitialised: NaNs or subnormals could slow the products
                buffer.fill_(1.0)
                ones.add(buffer.data_ptr())
            return buffer[:, : e1 - e0]

        passes._fill = fill
    elif part in ("mmap-copy", "mmap-direct"):
        _use_mmap(passes, direct=part == "mmap-direct")
    the_plan = posthoc_ema.plan(folder, TARGETS)
    cpu, start = _cpu_s(), time.perf_counter()
    result = synthesis.run(the_plan)
    seconds, cpu_s = time.perf_counter() - start, _cpu_s() - cpu
    checksum = float(sum(t.double().sum() for t in result[0.1].values() if t.is_floating_point()))
    _emit(
        {
            "job": part,
            "seconds": seconds,
            "cpu_s": cpu_s,
            "snapshots": len(the_plan.snapshots),
            "outputs_bytes": sum(t.numel() * t.element_size() for sd in result.values() for t in sd.values()),
            "checksum": checksum,
            "library": str(Path(posthoc_ema.__file__).parent),
        }
    )


def _use_mmap(passes: Any, *, direct: bool) -> None:
    """Tried and not kept: the snapshots memory-mapped instead of read (tracker-written float32 files only).

    ``direct``: no copy at all, each snapshot's mapped chunk multiplied into the
    outputs (one rank-1 product per snapshot, per block of columns); else the
    mapped chunks are copied into the worker's buffer (a copy out of the page
    cache in user space instead of the kernel's) and multiplied as ours is.
    """
    import mmap
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # read-only on purpose
    flats: dict[Path, torch.Tensor] = {}

    def flat(info: Any, base: int, total: int) -> torch.Tensor:
        x = flats.get(info.path)
        if x is None:
            with open(info.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            x = flats[info.path] = torch.frombuffer(mapped, dtype=torch.float32, offset=base, count=total)
        return x

    def fill(buffer: torch.Tensor, e0: int, e1: int, *, infos: Any, bases: Any, starts: Any, **kwargs: Any) -> Any:
        xs = [flat(info, base, starts[-1])[e0:e1] for info, base in zip(infos, bases, strict=True)]
        if direct:
            return xs
        rows = buffer[:, : e1 - e0]
        for row, x in zip(rows, xs, strict=True):
            row.copy_(x)
        return rows

    def product(xs: Any, e0: int, e1: int, *, sums: torch.Tensor, weights: torch.Tensor, beta: float) -> None:
        for a in range(0, e1 - e0, passes._PRODUCT_COLUMNS):
            b = min(e1 - e0, a + passes._PRODUCT_COLUMNS)
            block = sums[:, e0 + a : e0 + b]
            for k, x in enumerate(xs):
                block.addmm_(weights[:, k : k + 1], x[None, a:b], beta=beta if k == 0 else 1.0)

    passes._fill = fill
    if direct:
        passes._product = product


def job_touch(folder: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    import posthoc_ema

    the_plan = posthoc_ema.plan(folder, TARGETS)
    total = sum(int(torch.Size(shape).numel()) for dt, shape in the_plan.snapshots[-1].tensors.values() if dt == "F32")
    workers = getattr(_pass_module(), "_WORKERS", 1)
    cpu, start = _cpu_s(), time.perf_counter()
    sums = torch.empty(len(TARGETS), total)
    edges = [total * w // workers for w in range(workers + 1)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda w: sums[:, edges[w] : edges[w + 1]].zero_(), range(workers)))
    _emit({"job": "touch", "seconds": time.perf_counter() - start, "cpu_s": _cpu_s() - cpu})


def job_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="synthesis_floor.py job")
    parser.add_argument("name", choices=(*ROWS, "make"))
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=48)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as run.py's jobs: one torch thread per process
    if args.name == "make":
        job_make(args.folder, args.layers)
    elif args.name == "floor":
        job_floor(args.folder)
    elif args.name == "touch":
        job_touch(args.folder)
    else:
        job_synthesize(args.folder, "ours" if args.name == "baseline" else args.name)


def _job(name: str, folder: Path, *, pythonpath: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    cmd = [sys.executable, str(Path(__file__)), "job", name, "--folder", str(folder), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"job {name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    record: dict[str, Any] = json.loads(lines[-1])
    record["loadavg"] = float(Path("/proc/loadavg").read_text().split()[0])
    return record


def _baseline(ref: str) -> tuple[str, Path]:
    """The library of commit ``ref``, exported under .work/ (once per commit)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()

    if ref == "merge-base":
        ref = git("merge-base", "HEAD", "main")
    sha = git("rev-parse", "--short", ref)
    root = WORK / f"baseline-{sha}"
    if not (root / "posthoc_ema" / "__init__.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", sha, "posthoc_ema"], cwd=HERE.parent, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return sha, root


def main() -> None:
    if sys.argv[1:2] == ["job"]:
        job_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=48, help="Linear(512, 512) layers of the model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default="merge-base", help="commit whose synthesis is the baseline row")
    args = parser.parse_args()
    ours_path = HERE.parent
    sha, base_path = _baseline(args.baseline)
    folder = WORK / "snapshots" / f"floor-{args.layers}"
    if not (folder / "layers.txt").exists():
        print(f"writing {folder} ...", file=sys.stderr)
        _job("make", folder, pythonpath=ours_path, extra=("--layers", str(args.layers)))
    _job("floor", folder, pythonpath=ours_path)  # warms the page cache
    rows = ROWS
    records: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    for r in range(args.rounds):
        order = rows if r % 2 == 0 else rows[::-1]
        for row in order:
            path = base_path if row == "baseline" else ours_path
            records[row].append(_job(row, folder, pythonpath=path))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    before, now = records["baseline"][0]["checksum"], records["ours"][0]["checksum"]
    # The chunks differ, so the products may round differently: the sums agree to float32 precision.
    agree = f"the sums of sigma_rel 0.1's floats agree to {abs(now - before) / abs(before):.1e}"
    floor = statistics.median(x["seconds"] for x in records["floor"])
    info = records["ours"][0]
    labels = {
        "floor": "read floor: every byte once, `readinto` a 32 MiB buffer, one thread",
        "baseline": f"`synthesize_many` at {sha} (before)",
        "ours": "`synthesize_many` now",
        "reads": "now, reads alone (products off)",
        "products": "now, products alone (reads off), with the outputs' first touch",
        "touch": "allocate and first-touch the outputs alone",
        "mmap-copy": "tried: files memory-mapped, chunks copied into the buffers",
        "mmap-direct": "tried: files memory-mapped, products straight from the page cache (rank-1 per snapshot)",
    }
    loads = [x["loadavg"] for v in records.values() for x in v]
    print(
        f"{info['snapshots']} snapshots, {records['floor'][0]['bytes'] / 1e9:.2f} GB; outputs "
        f"{info['outputs_bytes'] / 2**20:.0f} MiB; {args.rounds} rounds; load average during the rounds "
        f"{min(loads):.1f}-{max(loads):.1f}; {agree}\n"
    )
    print("| what | s (median) | s (min) | x floor (medians) | CPU s (median) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        values = records[row]
        seconds = statistics.median(x["seconds"] for x in values)
        print(
            f"| {labels[row]} | {seconds:.2f} | {min(x['seconds'] for x in values):.2f} | {seconds / floor:.2f} | "
            f"{statistics.median(x['cpu_s'] for x in values):.2f} | {max(x['peak_rss_mb'] for x in values):.0f} |"
        )
    out = WORK / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("floor-%Y%m%d-%H%M%S")
    (out / f"{stem}.json").write_text(json.dumps(records, indent=1))
    print(f"\nraw records: {out / stem}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
