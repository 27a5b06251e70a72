"""Competitor side of the posthoc-ema benchmarks.

Run as a subprocess, one measurement per process; each job prints one JSON line:

    python benchmarks/competitors.py update --lib ema_pytorch --shape big --iters 50
    python benchmarks/competitors.py make-snapshots --lib pytorch_posthoc_ema --out DIR
    python benchmarks/competitors.py synthesize --lib pytorch_posthoc_ema --folder DIR
    python benchmarks/competitors.py all            # every job above, each in its own process

Libraries (install them first with benchmarks/setup_competitors.sh):
    ema_pytorch          ema-pytorch 0.8.3          (lucidrains), module `ema_pytorch`
    pytorch_posthoc_ema  pytorch-posthoc-ema 1.0.10, module `posthoc_ema`, same name as ours

Each library lives in its own directory under benchmarks/.deps/, which is put FIRST on
sys.path, and only inside the job that needs it, so this file never imports our own
`posthoc_ema`. Importing this module (e.g. for `time_calls`) imports no competitor.

Threads: every job calls torch.set_num_threads(--threads), default 1. One thread gives
the steadiest numbers on the 2-core benchmark machine and makes the per-tensor Python
overhead (what the libraries differ in) most visible; pass --threads 2 to use both cores.
Use the same value for our library's side.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DEPS = {"ema_pytorch": HERE / ".deps" / "ema_pytorch", "pytorch_posthoc_ema": HERE / ".deps" / "pytorch_posthoc_ema"}
MODULES = {"ema_pytorch": "ema_pytorch", "pytorch_posthoc_ema": "posthoc_ema"}
DISTS = {"ema_pytorch": "ema-pytorch", "pytorch_posthoc_ema": "pytorch-posthoc-ema"}

SIGMA_RELS = (0.05, 0.10)  # the two EMAs tracked during training
TARGETS = (0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.18, 0.22)  # 8 sigma_rels synthesized post hoc

# shape -> (number of Linear(d, d) layers, d); each layer has 2 tensors (weight, bias)
SHAPES = {
    "big": (150, 364),  # 19.9M parameters in 300 tensors
    "small": (1000, 44),  # 1.98M parameters in 2000 tensors
    "synth": (96, 512),  # 25.2M parameters in 192 tensors (snapshots for `synthesize`)
}


# ----------------------------------------------------------------------------- helpers


def time_calls(fn, iters: int, warmup: int = 3) -> list[float]:
    """Call fn() `warmup` times untimed, then `iters` times; return each call's seconds.

    The garbage collector is paused while timing so a collection does not land in one sample.
    """
    for _ in range(warmup):
        fn()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    finally:
        if was_enabled:
            gc.enable()
    return samples


def rss_mb() -> float:
    """Current resident set size of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(shape: str, seed: int = 0) -> nn.Module:
    layers, d = SHAPES[shape]
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)])


def load_competitor(lib: str):
    """Import a competitor from its isolated directory, put first on sys.path."""
    target = DEPS[lib]
    if not target.is_dir():
        sys.exit(f"{target} is missing: run benchmarks/setup_competitors.sh first")
    sys.path.insert(0, str(target))
    module = importlib.import_module(MODULES[lib])
    origin = Path(module.__file__).resolve()
    if target not in origin.parents:  # e.g. our own posthoc_ema was imported already
        sys.exit(f"{MODULES[lib]} came from {origin}, not from {target}")
    return module


def emit(record: dict) -> None:
    """Print the job's one JSON line on the real stdout (main() sends all else to stderr)."""
    record.update(torch=torch.__version__, threads=torch.get_num_threads())
    print(json.dumps(record), file=sys.__stdout__, flush=True)


def model_stats(model: nn.Module) -> dict:
    params = list(model.parameters())
    return {"n_params": sum(p.numel() for p in params), "n_tensors": len(params)}


# ------------------------------------------------------------------- library adapters


def make_tracker(
    lib: str,
    model: nn.Module,
    folder: Path,
    checkpoint_every: int | None,
    snapshot_dtype: torch.dtype,
    max_snapshots: int = 20,
):
    """Wrap `model` in the library's post-hoc EMA (two EMAs, updated every step).

    Returns a zero-argument function doing one training-step update.
    checkpoint_every=None: never write a snapshot (pure update timing).
    """
    module = load_competitor(lib)
    if lib == "ema_pytorch":
        tracker = module.PostHocEMA(
            model,
            sigma_rels=SIGMA_RELS,
            update_every=1,
            checkpoint_every_num_steps=checkpoint_every or "manual",
            checkpoint_folder=str(folder),
            checkpoint_dtype=snapshot_dtype,
        )
        return tracker.update
    tracker = module.PostHocEMA.from_model(
        model,
        folder,
        sigma_rels=SIGMA_RELS,
        update_every=1,
        # its default update_after_step=100 would skip the first 99 calls entirely
        update_after_step=0,
        checkpoint_every=checkpoint_every or 2**62,
        checkpoint_dtype=snapshot_dtype,
        max_checkpoints=max_snapshots,
    )
    return lambda: tracker.update_(model)


def checksum(tensors) -> float:
    return float(sum(t.double().sum() for t in tensors))


def synthesizer(lib: str, variant: str, folder: Path, model: nn.Module | None):
    """Return synth(sigma_rel) -> (seconds, checksum of the result).

    ema_pytorch: a PostHocEMA over `model` reading `folder`, then
        synthesize_ema_model(sigma_rel=s) per target (its only post-hoc API; it needs a model).
    pytorch_posthoc_ema: PostHocEMA.from_path(folder, sigma_rels=...) and the
        `with state_dict(sigma_rel=s) as sd` context manager per target; variant "model"
        also passes the model to from_path (then it keeps EMA copies of the model but no
        longer opens every snapshot a second time per target, looking for a sigma_rel).
    Only the library call is timed; the checksum of its result is taken afterwards.
    """
    module = load_competitor(lib)
    if lib == "ema_pytorch":
        tracker = module.PostHocEMA(
            model, sigma_rels=SIGMA_RELS, checkpoint_every_num_steps="manual", checkpoint_folder=str(folder)
        )

        def synth(sigma_rel):
            start = time.perf_counter()
            ema = tracker.synthesize_ema_model(sigma_rel=sigma_rel)
            seconds = time.perf_counter() - start
            return seconds, checksum(ema.ema_model.parameters())

        return synth

    # from_path must be told the sigma_rels: it would otherwise assume (0.05, 0.28)
    kwargs = {"model": model} if model is not None else {}
    tracker = module.PostHocEMA.from_path(folder, sigma_rels=SIGMA_RELS, **kwargs)

    def synth(sigma_rel):
        start = time.perf_counter()
        with tracker.state_dict(sigma_rel=sigma_rel) as state_dict:
            seconds = time.perf_counter() - start
            return seconds, checksum(state_dict.values())

    return synth


def needs_model(lib: str, variant: str) -> bool:
    return lib == "ema_pytorch" or variant == "model"


# ------------------------------------------------------------------------------ jobs


def job_update(args) -> None:
    model = build_model(args.shape)
    params = [p.detach() for p in model.parameters()]
    with tempfile.TemporaryDirectory() as tmp:
        step = make_tracker(args.lib, model, Path(tmp), None, torch.float32)
        # the floor: one fused lerp per EMA over float32 copies of the same tensors
        emas = [[p.clone() for p in params] for _ in SIGMA_RELS]

        def floor():
            for ema in emas:
                torch._foreach_lerp_(ema, params, 1.0 - 0.999)

        # interleave the two so that drift on the machine hits both alike
        lib_s, floor_s = [], []
        for _ in range(args.rounds):
            lib_s += time_calls(step, args.iters, args.warmup)
            floor_s += time_calls(floor, args.iters, args.warmup)
    lib_med, floor_med = statistics.median(lib_s), statistics.median(floor_s)
    emit(
        {
            "job": "update",
            "lib": args.lib,
            "version": importlib.metadata.version(DISTS[args.lib]),
            "shape": args.shape,
            **model_stats(model),
            "n_emas": len(SIGMA_RELS),
            "iters": args.iters,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "update_s": lib_med,
            "update_min_s": min(lib_s),
            "floor_s": floor_med,
            "floor_min_s": min(floor_s),
            "ratio": lib_med / floor_med,
        }
    )


def training_noise(params: list[torch.Tensor]) -> Callable[[int], None]:
    """The make-snapshots "training", the same for every library: step t adds a
    shifted view of one fixed noise vector to every tensor."""
    generator = torch.Generator().manual_seed(1)
    noise = 1e-2 * torch.randn(max(p.numel() for p in params) + 4096, generator=generator)

    def train_step(t: int) -> None:
        for i, p in enumerate(params):
            offset = (t * 7919 + i * 104729) % 4096
            p.add_(noise[offset : offset + p.numel()].view_as(p))

    return train_step


def emit_folder(meta: dict[str, Any], model: nn.Module, out: Path, files: list[Path], seconds: float) -> None:
    """Record a snapshot folder: its meta.json, and the job's JSON line."""
    (out / "meta.json").write_text(json.dumps(meta))
    emit(
        {
            "job": "make-snapshots",
            **meta,
            **model_stats(model),
            "folder": str(out),
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files),
            "seconds": seconds,
        }
    )


def job_make_snapshots(args) -> None:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = build_model(args.shape)
    params = [p.detach() for p in model.parameters()]
    dtype = getattr(torch, args.dtype)
    step = make_tracker(args.lib, model, out, args.every, dtype, max_snapshots=args.snapshots)
    train_step = training_noise(params)
    start = time.perf_counter()
    for t in range(args.snapshots * args.every):
        train_step(t)
        step()
    seconds = time.perf_counter() - start
    os.sync()  # so that writing back these GiBs does not overlap a later synthesize job
    files = sorted(out.glob("*.pt"))
    meta = {
        "lib": args.lib,
        "shape": args.shape,
        "dtype": args.dtype,
        "sigma_rels": SIGMA_RELS,
        "snapshots_per_ema": args.snapshots,
        "every": args.every,
    }
    emit_folder(meta, model, out, files, seconds)


def job_synthesize(args) -> None:
    folder = Path(args.folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta["lib"] != args.lib:
        sys.exit(f"{folder} holds {meta['lib']} snapshots, not {args.lib}")
    variant = args.variant if args.lib == "pytorch_posthoc_ema" else "default"
    rss_start = rss_mb()
    start = time.perf_counter()
    model = build_model(meta["shape"]) if needs_model(args.lib, variant) else None
    model_s = time.perf_counter() - start
    start = time.perf_counter()
    synth = synthesizer(args.lib, variant, folder, model)
    setup_s = time.perf_counter() - start
    rss_setup = rss_mb()
    per_target, sums = [], []
    for sigma_rel in TARGETS:
        seconds, total = synth(sigma_rel)
        per_target.append(seconds)
        sums.append(total)
    emit(
        {
            "job": "synthesize",
            "lib": args.lib,
            "version": importlib.metadata.version(DISTS[args.lib]),
            "variant": variant,
            "shape": meta["shape"],
            "snapshot_dtype": meta["dtype"],
            "snapshots": len(list(folder.glob("*.pt"))),
            "targets": TARGETS,
            "model_s": model_s,
            "setup_s": setup_s,
            "synth_s": sum(per_target),
            "synth_median_s": statistics.median(per_target),
            "per_target_s": per_target,
            "rss_start_mb": rss_start,
            "rss_after_setup_mb": rss_setup,
            "peak_rss_mb": peak_rss_mb(),
            "checksums": sums,
        }
    )


def job_all(args) -> None:
    """Every measurement, each in a fresh subprocess; prints their JSON lines."""

    def run(*job_args):
        cmd = [sys.executable, __file__, *job_args, "--threads", str(args.threads)]
        print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)

    libs = ("ema_pytorch", "pytorch_posthoc_ema")
    for lib in libs:
        for shape in ("big", "small"):
            run("update", "--lib", lib, "--shape", shape, "--iters", str(args.iters))
    work = Path(args.work)
    for lib in libs:
        folder = work / lib
        run("make-snapshots", "--lib", lib, "--out", str(folder), "--dtype", args.dtype)
        variants = ("state_dict", "model") if lib == "pytorch_posthoc_ema" else ("default",)
        for variant in variants:
            run("synthesize", "--lib", lib, "--folder", str(folder), "--variant", variant)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    jobs = parser.add_subparsers(dest="job", required=True)

    def add(name, fn, help):
        p = jobs.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
        return p

    p = add("update", job_update, "median seconds per EMA update, and the foreach-lerp floor")
    p.add_argument("--lib", choices=DEPS, required=True)
    p.add_argument("--shape", choices=("big", "small"), required=True)
    p.add_argument("--iters", type=int, default=50, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating library/floor rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before each round")

    p = add("make-snapshots", job_make_snapshots, "write a snapshot folder in the library's format")
    p.add_argument("--lib", choices=DEPS, required=True)
    p.add_argument("--out", required=True, help="folder to (re)create")
    p.add_argument("--shape", choices=SHAPES, default="synth")
    p.add_argument("--snapshots", type=int, default=20, help="snapshots per EMA")
    p.add_argument("--every", type=int, default=5, help="training steps between snapshots")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")

    p = add("synthesize", job_synthesize, "time synthesizing 8 sigma_rels from a snapshot folder")
    p.add_argument("--lib", choices=DEPS, required=True)
    p.add_argument("--folder", required=True, help="written by make-snapshots")
    p.add_argument(
        "--variant",
        choices=("default", "state_dict", "model"),
        default="state_dict",
        help="pytorch_posthoc_ema only: from_path without (state_dict) or with the model",
    )

    p = add("all", job_all, "run every job, each in its own subprocess")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--work", default=str(HERE / ".work"), help="where snapshot folders go")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")

    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the libraries print (e.g. solver fallbacks): keep stdout for the JSON line alone
    with contextlib.redirect_stdout(sys.stderr):
        args.fn(args)


if __name__ == "__main__":
    main()
