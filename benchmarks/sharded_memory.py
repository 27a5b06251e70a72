"""Peak memory of synthesis one shard at a time, against the outputs held whole.

Writes a folder of float32 snapshots (two sigma_rels at three steps) of a model
of ``--tensors`` tensors of ``--numel`` values, then synthesizes two targets in a
fresh process each way and prints the growth of its peak RSS (Linux's VmHWM,
reset after the imports) as one JSON line:

    python benchmarks/sharded_memory.py --tensors 64 --numel 4194304 --shard 32MiB
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from posthoc_ema import sigma_rel_to_gamma
from posthoc_ema._version import __version__
from posthoc_ema.files import write_atomic
from posthoc_ema.sharded import parse_size
from posthoc_ema.snapshots import SnapshotInfo, snapshot_name

JOB = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from posthoc_ema.synthesis import plan, run
from posthoc_ema.sharded import synthesize_sharded

def peak():
    with open("/proc/self/status") as status:
        return 1024 * next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

folder, out, how, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
the_plan = plan(folder, [0.06, 0.09])
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
before, start = peak(), time.perf_counter()
if how == "sharded":
    synthesize_sharded(the_plan, [out + "/a", out + "/b"], max_shard_size=shard)
else:
    sds = run(the_plan)
print(json.dumps({"growth": peak() - before, "seconds": time.perf_counter() - start}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--numel", type=int, default=1 << 22)
    parser.add_argument("--shard", default="32MiB")
    parser.add_argument("--work", type=Path, default=None, help="folder for the snapshots (default: a temporary one)")
    args = parser.parse_args()
    shard = parse_size(args.shard)
    work = Path(tempfile.mkdtemp(dir=args.work))
    try:
        folder = work / "snaps"
        folder.mkdir()
        generator = torch.Generator().manual_seed(0)
        for step in (100, 200, 300):
            for sigma_rel in (0.05, 0.10):
                tensors = {f"w{i:03d}": torch.randn(args.numel, generator=generator) for i in range(args.tensors)}
                info = SnapshotInfo(
                    path=folder / snapshot_name(step, sigma_rel), step=step, sigma_rel=sigma_rel,
                    gamma=float(sigma_rel_to_gamma(sigma_rel)), dtype="float32", update_every=1,
                    library_version=__version__,
                )  # fmt: skip
                write_atomic(info.path, tensors, info.metadata())
                del tensors
        result: dict[str, float] = {
            "model_bytes": 4 * args.tensors * args.numel,
            "targets": 2,
            "shard_bytes": shard,
            "snapshots": 6,
        }
        for how in ("sharded", "whole"):
            started = time.perf_counter()
            job = [sys.executable, "-c", JOB, str(folder), str(work), how, str(shard)]
            out = json.loads(subprocess.run(job, capture_output=True, text=True, check=True, timeout=3600).stdout)
            result[f"{how}_peak_growth_bytes"] = out["growth"]
            result[f"{how}_seconds"] = round(out["seconds"], 2)
            result[f"{how}_process_seconds"] = round(time.perf_counter() - started, 2)
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
