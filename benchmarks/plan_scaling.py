"""How planning scales with the number of snapshots: the dense Gram solve against the per-interval solve.

    python benchmarks/plan_scaling.py [--dense-max N] [--new-max N] [--repeats R]

Each row is one snapshot layout: every sigma_rel of a tracked set at every step of a
regular grid (the tracker's layout), planned at the last step for five targets
(0.02, 0.04, 0.07, 0.15, 0.25). "old dense" is the solver posthoc-ema used before
(the full Gram matrix of EDM2 eq. 151, scaled to unit diagonal and solved by an
eigendecomposition, the error as the quadratic form of the same matrix); it is still
the fallback for irregular folders. "new" is ``solve_coefficients`` followed by
``reconstruction_error``, what ``posthoc_ema.plan`` calls. Both are timed as that pair
(the minimum of ``--repeats`` runs), and their peak memory is traced with
``tracemalloc`` in a separate, untimed run (numpy reports its arrays to it). Where
both run, the table gives the largest difference of their coefficients, and the
largest change of a predicted error from old to new (negative: the new fit is
better). The "one missing" rows drop one snapshot, so the grid is no longer regular:
up to 500 snapshots the new code solves them densely (only the error uses the O(n)
Gram product), beyond that by sparse normal equations over each class's own cells.

BLAS runs on one thread (``OMP_NUM_THREADS`` etc. default to 1; set them to change
it): on a shared 2-core machine a multithreaded eigendecomposition is both slower
and far noisier. It prints one markdown table, ready for docs/benchmarks.md.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from posthoc_ema import profiles  # noqa: E402

TARGETS = (0.02, 0.04, 0.07, 0.15, 0.25)
LAYOUTS = {2: (0.05, 0.10), 4: (0.03, 0.05, 0.10, 0.20)}
EVERY = 100  # steps between snapshots


def old_dense_plan(steps: np.ndarray, sigma_rels: np.ndarray, out_step: float) -> tuple[np.ndarray, np.ndarray]:
    """The solver before the per-interval one: the dense Gram matrix, as in profiles._gram/_lstsq."""
    gammas = profiles.sigma_rel_to_gamma(sigma_rels)
    out_gammas = profiles.sigma_rel_to_gamma(TARGETS)
    gram = profiles._gram(steps, gammas)
    cross = profile_cross(steps, gammas, out_step, out_gammas)
    coef = profiles._lstsq(gram, cross)
    coef = coef / coef.sum(axis=0, keepdims=True)
    norm2 = profiles.profile_inner_product(out_step, out_gammas, out_step, out_gammas)
    sq = np.einsum("io,ij,jo->o", coef, gram, coef) - 2 * np.einsum("io,io->o", coef, cross) + norm2
    return coef, np.sqrt(np.maximum(sq, 0.0) / norm2)


def profile_cross(steps: np.ndarray, gammas: np.ndarray, out_step: float, out_gammas: np.ndarray) -> np.ndarray:
    return profiles.profile_inner_product(steps[:, None], gammas[:, None], out_step, out_gammas[None, :])


def new_plan(steps: np.ndarray, sigma_rels: np.ndarray, out_step: float) -> tuple[np.ndarray, np.ndarray]:
    coef = profiles.solve_coefficients(steps, sigma_rels, out_step, TARGETS)
    return coef, profiles.reconstruction_error(coef, steps, sigma_rels, out_step, TARGETS)


def layout(n_snapshots: int, n_classes: int, *, irregular: bool) -> tuple[np.ndarray, np.ndarray, float]:
    n_steps = n_snapshots // n_classes
    steps = np.repeat(np.arange(1, n_steps + 1, dtype=np.float64) * EVERY, n_classes)
    sigmas = np.tile(np.array(LAYOUTS[n_classes]), n_steps)
    if irregular:  # one snapshot missing in the middle
        keep = np.arange(steps.size) != steps.size // 2
        steps, sigmas = steps[keep], sigmas[keep]
    return steps, sigmas, float(steps.max())


def measure(fn: Callable[[], tuple[np.ndarray, np.ndarray]], repeats: int) -> dict[str, Any]:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": best, "peak_mib": peak / 2**20, "result": result}


def cell(row: dict[str, Any] | None, key: str, fmt: str, unit: str) -> str:
    return "-" if row is None else f"{row[key]:{fmt}} {unit}"


def number(value: float | None, *, sign: bool = False) -> str:
    return "-" if value is None else format(value, "+.1e" if sign else ".1e")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dense-max", type=int, default=4000, help="largest n_snapshots for the old dense solve")
    parser.add_argument("--new-max", type=int, default=100_000, help="largest n_snapshots for the new solve")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the minimum is shown)")
    args = parser.parse_args()

    sizes = [400, 1000, 2000, 4000, 6000, 10_000, 20_000, 50_000, 100_000]
    rows = []
    for n_classes in (2, 4):
        for irregular in (False, True):
            for n in sizes:
                steps, sigmas, out_step = layout(n, n_classes, irregular=irregular)
                problem = (steps, sigmas, out_step)
                old = (
                    measure(functools.partial(old_dense_plan, *problem), args.repeats) if n <= args.dense_max else None
                )
                new = measure(functools.partial(new_plan, *problem), args.repeats) if n <= args.new_max else None
                if old is None and new is None:
                    continue
                row = {"n": steps.size, "classes": n_classes, "irregular": irregular, "old": old, "new": new}
                if old is not None and new is not None:
                    row["coef_diff"] = float(np.abs(old["result"][0] - new["result"][0]).max())
                    change = new["result"][1] - old["result"][1]
                    row["error_diff"] = float(change[np.argmax(np.abs(change))])
                    row["max_error"] = float(new["result"][1].max())
                elif new is not None:
                    row["max_error"] = float(new["result"][1].max())
                rows.append(row)
                print(f"done: {steps.size} snapshots, {n_classes} classes, irregular={irregular}", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print(
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit}: "
        f"`python benchmarks/plan_scaling.py --dense-max {args.dense_max}`; Python {platform.python_version()}, "
        f"numpy {np.__version__}, {os.environ['OMP_NUM_THREADS']} BLAS thread(s), load average {load} after the run."
    )
    print()
    print(
        "| snapshots | layout | old dense: time | old: peak memory | new: time | new: peak memory "
        "| max coefficient difference | error change, new - old | largest predicted error (new) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        n_steps = (row["n"] + row["irregular"]) // row["classes"]
        shape = f"{n_steps} steps x {row['classes']}" + (", one missing" if row["irregular"] else "")
        old, new = row["old"], row["new"]
        print(
            f"| {row['n']:,} | {shape} "
            f"| {cell(old, 'seconds', '.3f', 's')} | {cell(old, 'peak_mib', '.1f', 'MiB')} "
            f"| {cell(new, 'seconds', '.3f', 's')} | {cell(new, 'peak_mib', '.1f', 'MiB')} "
            f"| {number(row.get('coef_diff'))} | {number(row.get('error_diff'), sign=True)} | {row['max_error']:.1e} |"
        )


if __name__ == "__main__":
    main()
