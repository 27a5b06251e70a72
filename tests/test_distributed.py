"""DistributedDataParallel: two gloo processes on the CPU, each started as a subprocess with a timeout.

The tracker takes the DDP-wrapped model; its keys have no ``module.`` prefix; every
rank keeps the EMAs (so ``swapped()`` works on every rank); only rank 0 writes; and
the snapshots are bit for bit those of a single process fed the same weights. With
``rank0_only=True`` the other ranks hold no EMA tensor, count the steps, refuse reads,
and rank 0 writes the same snapshots.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from posthoc_ema import PostHocEMA
from posthoc_ema.snapshots import list_snapshots

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)
pytestmark = needs_gloo

SIGMA_RELS = (0.05, 0.10)
STEPS = 20
EVERY = 5
TIMEOUT = 180  # seconds for both ranks; a hang fails the test instead of blocking the suite

WORKER = textwrap.dedent(
    """
    import datetime, json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from posthoc_ema import PostHocEMA

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    steps, every = int(sys.argv[5]), int(sys.argv[6])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = torch.nn.parallel.DistributedDataParallel(net)
    emas = PostHocEMA(model, (0.05, 0.10), snapshot_dir=out / f"snaps{rank}", snapshot_every=every)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    trajectory = []
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=data), torch.randn(8, 2, generator=data)
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)  # each rank its part of the batch
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        emas.update()
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in net.state_dict().values()]))
    emas.close()
    probe = torch.randn(3, 6, generator=data)
    tensors = {"trajectory": torch.stack(trajectory)}
    for s in (0.05, 0.10):
        tensors |= {f"ema/{s}/{k}": v.detach().clone() for k, v in emas.ema_state_dict(s).items()}
        with emas.swapped(model, s), torch.no_grad():
            tensors[f"swapped/{s}"] = model(probe)  # evaluation with the EMA, on every rank
    tensors["trained"] = net(probe).detach()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"keys{rank}.json").write_text(json.dumps(sorted(emas.ema_state_dict(0.05))))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(WORKER, str(out), str(STEPS), str(EVERY))
    return out


def run_ranks(script: str, *args: str) -> list[str]:
    """Run ``script`` as two gloo ranks (``argv``: rank, world size, port, ``args``); return each rank's stdout.

    A rank that fails, or a pair that does not finish within :data:`TIMEOUT` (a hang), fails the test.
    """
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank), "2", port, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in ranks]
    except subprocess.TimeoutExpired:
        for p in ranks:
            p.kill()
            p.wait()
        pytest.fail(f"the two ranks did not finish within {TIMEOUT} s (a hang?)")
    for rank, (p, (_, err)) in enumerate(zip(ranks, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err}"
    return [out for out, _ in outputs]


def test_keys_have_no_module_prefix(ddp_run: Path) -> None:
    expected = sorted(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).state_dict())
    for rank in range(2):
        assert json.loads((ddp_run / f"keys{rank}.json").read_text()) == expected


def test_every_rank_keeps_the_same_emas(ddp_run: Path) -> None:
    zero, one = (load_file(ddp_run / f"rank{r}.safetensors") for r in range(2))
    assert zero.keys() == one.keys()
    assert torch.equal(zero["trajectory"], one["trajectory"])  # DDP kept the replicas equal
    for key in zero:
        assert torch.equal(zero[key], one[key]), key
    for s in SIGMA_RELS:  # swapped() evaluated the EMA, not the trained weights, on both ranks
        assert not torch.allclose(zero[f"swapped/{s}"], zero["trained"])


def test_only_rank_zero_writes(ddp_run: Path) -> None:
    written = list_snapshots(ddp_run / "snaps0")
    assert sorted((i.step, i.sigma_rel) for i in written) == sorted(
        (step, s) for step in range(EVERY, STEPS + 1, EVERY) for s in SIGMA_RELS
    )
    files = sorted(p.name for p in (ddp_run / "snaps0").iterdir() if p.name != ".phema.lock")  # the writer's lock
    assert files == sorted(i.path.name for i in written)
    other = ddp_run / "snaps1"
    assert not other.exists() or not any(other.iterdir())


def test_snapshots_equal_a_single_process_fed_the_same_weights(ddp_run: Path, tmp_path: Path) -> None:
    # Replay rank 0's weight trajectory through a tracker on a plain model in this process.
    trajectory = load_file(ddp_run / "rank0.safetensors")["trajectory"]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    emas = PostHocEMA(net, SIGMA_RELS, snapshot_dir=tmp_path, snapshot_every=EVERY)
    emas.run_id = list_snapshots(ddp_run / "snaps0")[0].run_id  # the same run, so the same metadata
    try:
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        with torch.no_grad():
            for row in trajectory:
                for (key, shape), piece in zip(
                    shapes.items(), row.split([s.numel() for s in shapes.values()]), strict=True
                ):
                    net.state_dict()[key].copy_(piece.view(shape))
                emas.update()
    finally:
        emas.close()
    ddp_files = {i.path.name: i.path for i in list_snapshots(ddp_run / "snaps0")}
    single_files = {i.path.name: i.path for i in list_snapshots(tmp_path)}
    assert ddp_files.keys() == single_files.keys()
    for name, path in ddp_files.items():
        assert path.read_bytes() == single_files[name].read_bytes(), name
    ddp = load_file(ddp_run / "rank0.safetensors")
    for s in SIGMA_RELS:
        for key, value in emas.ema_state_dict(s).items():
            assert torch.equal(ddp[f"ema/{s}/{key}"], value), (s, key)


def test_ddp_training_matches_one_process_on_the_whole_batch(ddp_run: Path) -> None:
    # DDP averages the two halves' gradients: the same as the whole batch's, up to float rounding.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(STEPS):
        x, y = torch.randn(8, 6, generator=data), torch.randn(8, 2, generator=data)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        rows.append(torch.cat([p.detach().reshape(-1) for p in net.state_dict().values()]))
    torch.testing.assert_close(load_file(ddp_run / "rank0.safetensors")["trajectory"], torch.stack(rows))


RANK0_ONLY_WORKER = textwrap.dedent(
    """
    import dataclasses, datetime, json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from posthoc_ema import PostHocEMA

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    steps, every, run_id = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )

    def held(tracker, model):
        # Every tensor the tracker's attributes reach (containers and its dataclasses, not modules)
        # that is not one of the model's own: (count, bytes).
        own = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
        found, seen, todo = {}, set(), list(vars(tracker).values())
        while todo:
            x = todo.pop()
            if id(x) in seen or isinstance(x, torch.nn.Module):
                continue
            seen.add(id(x))
            if isinstance(x, torch.Tensor):
                if x.untyped_storage().data_ptr() not in own:
                    found[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            elif isinstance(x, dict):
                todo += list(x.values())
            elif isinstance(x, (list, tuple, set)):
                todo += list(x)
            elif dataclasses.is_dataclass(x) and not isinstance(x, type):
                todo += [getattr(x, f.name) for f in dataclasses.fields(x)]
        return len(found), sum(found.values())

    torch.manual_seed(0)  # the same model and data as WORKER, so the same trajectory
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = torch.nn.parallel.DistributedDataParallel(net)
    emas = PostHocEMA(model, (0.05, 0.10), snapshot_dir=out / f"snaps{rank}", snapshot_every=every, rank0_only=True)
    emas.run_id = run_id  # the default run's, so that the snapshot files can be compared byte for byte
    report = {"holds_emas": emas.holds_emas, "held": held(emas, net)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=data), torch.randn(8, 2, generator=data)
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()
        emas.update()
    try:
        emas.update(step=emas.step)  # steps are validated on every rank
    except ValueError as err:
        report["repeated step"] = str(err)
    report["paths"] = [p.name for p in emas.snapshot()]  # the current step has one: snapshot() works anyway
    emas.flush()
    emas.close()
    report |= {"step": emas.step, "ema_step": emas.ema_step, "held after": held(emas, net)}
    errors = {}
    for name, call in {
        "ema_state_dict": lambda: emas.ema_state_dict(0.05),
        "copy_to": lambda: emas.copy_to(net, 0.05),
        "swapped": lambda: emas.swapped(net, 0.05).__enter__(),
        "functional_call": lambda: emas.functional_call(net, 0.05, (torch.ones(1, 6),)),
    }.items():
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    report["errors"] = errors
    state = emas.state_dict()
    report["state"] = {k: v for k, v in state.items() if k not in ("emas", "schedule_emas")}
    report["state tensors"] = sum(len(sd) for sd in [*state["emas"], *state["schedule_emas"].values()])
    torch.save(state, out / f"state{rank}.pt")
    dist.barrier()
    # Resume: every rank loads rank 0's state; rank 0 refuses rank 1's counters-only state.
    fresh = PostHocEMA(net, (0.05, 0.10), rank0_only=True)
    fresh.load_state_dict(torch.load(out / "state0.pt", weights_only=True))
    report["resumed"] = [fresh.step, fresh.ema_step, fresh.run_id == run_id]
    if rank == 0:
        try:
            fresh.load_state_dict(torch.load(out / "state1.pt", weights_only=True))
        except ValueError as err:
            report["counters-only state"] = str(err)
        mine, resumed = emas.ema_state_dict(0.10), fresh.ema_state_dict(0.10)
        report["resumed ema"] = all(torch.equal(resumed[k], v) for k, v in mine.items())
    default = PostHocEMA(net, (0.05, 0.10))  # the default on this rank: every EMA kept
    report["held by default"] = held(default, net)
    (out / f"report{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def rank0_only_run(ddp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rank0_only")
    run_id = list_snapshots(ddp_run / "snaps0")[0].run_id
    assert run_id is not None
    run_ranks(RANK0_ONLY_WORKER, str(out), str(STEPS), str(EVERY), run_id)
    return out


def _report(run: Path, rank: int) -> dict[str, Any]:
    return dict(json.loads((run / f"report{rank}.json").read_text()))


def test_rank0_only_keeps_no_ema_memory_on_other_ranks(rank0_only_run: Path) -> None:
    zero, one = _report(rank0_only_run, 0), _report(rank0_only_run, 1)
    assert zero["holds_emas"] and not one["holds_emas"]
    assert one["held"] == [0, 0] and one["held after"] == [0, 0]
    # Rank 0 holds what the default holds on every rank: 2 EMAs of 4 float32 tensors (6*8 + 8 + 8*2 + 2 values).
    assert zero["held"] == zero["held by default"] == one["held by default"]
    assert zero["held"][1] >= 2 * 4 * (6 * 8 + 8 + 8 * 2 + 2)


def test_rank0_only_snapshots_equal_the_default_runs(rank0_only_run: Path, ddp_run: Path) -> None:
    default = {i.path.name: i.path for i in list_snapshots(ddp_run / "snaps0")}
    ours = {i.path.name: i.path for i in list_snapshots(rank0_only_run / "snaps0")}
    assert ours.keys() == default.keys()
    for name, path in ours.items():
        assert path.read_bytes() == default[name].read_bytes(), name
    other = rank0_only_run / "snaps1"
    assert not other.exists() or not any(other.iterdir())


def test_rank0_only_other_ranks_count_steps_and_refuse_reads(rank0_only_run: Path) -> None:
    zero, one = _report(rank0_only_run, 0), _report(rank0_only_run, 1)
    for rank in (zero, one):  # every rank agrees on the steps, and validates them
        assert (rank["step"], rank["ema_step"]) == (STEPS, STEPS)
        assert "must be an integer greater than the previous step 20" in rank["repeated step"]
        assert rank["paths"] == sorted(rank["paths"]) and len(rank["paths"]) == len(SIGMA_RELS)
        assert rank["resumed"] == [STEPS, STEPS, True]
    assert zero["errors"] == {}
    message = "this is rank 1, and rank0_only=True keeps the EMAs on rank 0 only; read them on rank 0"
    assert set(one["errors"]) == {"ema_state_dict", "copy_to", "swapped", "functional_call"}
    assert all(e.startswith(message) for e in one["errors"].values())
    assert one["state"]["counters_only"] is True and one["state tensors"] == 0
    assert "counters_only" not in zero["state"] and zero["state tensors"] == 2 * 4
    assert {k: v for k, v in one["state"].items() if k != "counters_only"} == zero["state"]
    assert zero["counters-only state"].startswith("the state_dict holds the counters only")
    assert zero["resumed ema"] is True


def test_rank0_only_without_a_process_group_has_no_effect() -> None:
    assert not torch.distributed.is_initialized()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plain, flagged = PostHocEMA(model, SIGMA_RELS), PostHocEMA(model, SIGMA_RELS, rank0_only=True)
    with torch.no_grad():
        for _ in range(5):
            model.weight.add_(0.1)
            plain.update()
            flagged.update()
    assert flagged.holds_emas and flagged.rank0_only and not plain.rank0_only
    for s in SIGMA_RELS:
        for k, v in plain.ema_state_dict(s).items():
            assert torch.equal(flagged.ema_state_dict(s)[k], v)
    state = flagged.state_dict()
    assert "counters_only" not in state
    with pytest.raises(ValueError, match=r"holds the counters only .* load the state saved on rank 0"):
        flagged.load_state_dict(state | {"emas": [], "schedule_emas": {}, "counters_only": True})
