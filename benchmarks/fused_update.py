"""The fused update (``PostHocEMA(..., fused=True)``) against k bare foreach lerps.

    python benchmarks/fused_update.py [--emas 2 4] [--shapes big small] [--threads 1] [--no-compile]

Each (model, number of EMAs) runs in a fresh process that times, in
interleaved samples, the same update done five ways:

- floor: one ``torch._foreach_lerp_(emas, sources, weight)`` per EMA (today's
  update, bare: 3k memory streams for k EMAs);
- ``update()``: the tracker's plain update (the floor plus its bookkeeping);
- ``update(fused=True)``: the tracker's cache-blocked pass (1 + 2k streams);
- blocked at other block sizes (``BlockedLerp`` alone), to pick ``BLOCK_BYTES``;
- ``update(fused="compile")``: the tracker's compiled kernel (1 + 2k streams
  from one read of each weight), unless ``--no-compile``; the time of its
  first update, which compiles and checks the kernel, is reported too.

After ``--warmup`` untimed calls of each, every sample calls each variant once,
in an order that turns from sample to sample, and divides each time by the
floor's in the same sample; the table gives the median of these ratios over
``--rounds`` x ``--iters`` samples, and in parentheses the ratio of the
minimum times and the median ratio of CPU times (``time.process_time``, blind
to the time the process waits for a core). The machine may be shared: calls next to each other in time
share its load, so their ratios drift much less than the times. Prints a
markdown table, and one JSON line per job (every sample) on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from competitors import SHAPES, build_model

HERE = Path(__file__).resolve().parent
SIGMA_RELS = (0.05, 0.10, 0.15, 0.20)
BLOCK_SIZES = (256 << 10, 512 << 10, 2 << 20)
JOB_TIMEOUT_S = 1800


def job(args: argparse.Namespace) -> None:
    from posthoc_ema import PostHocEMA
    from posthoc_ema.fused import BLOCK_BYTES, BlockedLerp

    torch.set_num_threads(args.threads)
    model = build_model(args.shape)
    params = [p.detach() for p in model.parameters()]
    sigma_rels = SIGMA_RELS[: args.n_emas]
    plain = PostHocEMA(model, sigma_rels=sigma_rels, snapshot_every=None)
    fused = PostHocEMA(model, sigma_rels=sigma_rels, snapshot_every=None, fused=True)
    emas = [[p.clone() for p in params] for _ in sigma_rels]
    weights = [0.01 * (j + 1) for j in range(args.n_emas)]

    @torch.no_grad()
    def floor() -> None:
        for ema, weight in zip(emas, weights, strict=True):
            torch._foreach_lerp_(ema, params, weight)

    variants = {"floor": floor, "update()": plain.update, "update(fused=True)": fused.update}
    for size in BLOCK_SIZES:
        blocked = BlockedLerp(params, [[p.clone() for p in params] for _ in sigma_rels], block_bytes=size)
        variants[f"blocked {size >> 10} KiB"] = lambda b=blocked: b(weights)
    compile_s = None
    if args.compile:
        compiled = PostHocEMA(model, sigma_rels=sigma_rels, snapshot_every=None, fused="compile")
        start = time.perf_counter()
        compiled.update()  # builds the plan: compiles and checks the kernel
        compile_s = time.perf_counter() - start
        if not all(plan.compiled for plan in compiled._fused_plans.values()):
            print("fused='compile' fell back to the blocked update: see the log above", file=sys.stderr)
        for _ in range(20):  # past the first updates, whose weights of 0.5 or more go the blocked way
            compiled.update()
        variants['update(fused="compile")'] = compiled.update
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in variants}  # CPU time: blind to time off the CPU
    names = list(variants)
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    gc.collect()
    gc.disable()  # no collection inside a sample
    try:
        for i in range(args.rounds * args.iters):
            # One call of each variant, in an order that turns: neighbours in time share the load.
            order = names[i % len(names) :] + names[: i % len(names)]
            this, this_cpu = {}, {}
            for name in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                variants[name]()
                this_cpu[name] = time.process_time() - start_cpu
                this[name] = time.perf_counter() - start
            for name in names:
                times[name].append(this[name])
                ratios[name].append(this[name] / this["floor"])
                cpu_ratios[name].append(this_cpu[name] / max(this_cpu["floor"], 1e-9))
    finally:
        gc.enable()
    record = {
        "shape": args.shape,
        "n_emas": args.n_emas,
        "threads": args.threads,
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "block_bytes": BLOCK_BYTES,
        "compile_s": compile_s,
        "floor_ms": 1e3 * statistics.median(times["floor"]),
        "ratio": {name: statistics.median(values) for name, values in ratios.items()},
        "cpu_ratio": {name: statistics.median(values) for name, values in cpu_ratios.items()},
        "ratio_min": {name: min(times[name]) / min(times["floor"]) for name in names},
        "ratios": ratios,
        "times": times,
        "torch": torch.__version__,
    }
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shapes", nargs="+", default=["big", "small"], choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help='skip update(fused="compile")')
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="big", help=argparse.SUPPRESS)
    parser.add_argument("--n-emas", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args)
        return
    records = []
    for shape in args.shapes:
        for n_emas in args.emas:
            command = [sys.executable, __file__, "--job", "--shape", shape, "--n-emas", str(n_emas)]
            for flag in ("threads", "rounds", "iters", "warmup"):
                command += [f"--{flag}", str(getattr(args, flag))]
            command += [] if args.compile else ["--no-compile"]
            with tempfile.TemporaryDirectory() as cache:  # a cold compile: no kernel from an earlier run
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=True, env=env
                )
            record = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(record), file=sys.stderr, flush=True)
            records.append(record)
    names = list(records[0]["ratio"])[1:]
    samples = args.rounds * args.iters
    print(
        f"torch {records[0]['torch']}, {args.threads} thread(s); x floor: median of {samples} samples "
        "(ratio of the minimums, median ratio of CPU times)\n"
    )
    print("| model | EMAs | floor (ms) | " + " | ".join(names) + " | compile (s) |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for rec in records:
        model = f"{rec['shape']} ({rec['params'] / 1e6:.1f}M in {rec['tensors']})"
        cells = " | ".join(
            f"{rec['ratio'][n]:.2f}x ({rec['ratio_min'][n]:.2f}x, {rec['cpu_ratio'][n]:.2f}x)" for n in names
        )
        compile_cell = "" if rec["compile_s"] is None else f"{rec['compile_s']:.0f}"
        print(f"| {model} | {rec['n_emas']} | {rec['floor_ms']:.1f} | {cells} | {compile_cell} |")


if __name__ == "__main__":
    main()
