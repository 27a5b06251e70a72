"""FSDP2 (``fully_shard``): two gloo processes on the CPU, each started as a subprocess with a timeout.

Each rank keeps the EMAs of its local shards and writes one shard file per EMA
and snapshot; synthesis assembles whole tensors. The model has a Linear of odd
out-dim (uneven shards: 3 and 2 rows), a Linear of out-dim 1 (rank 1's shards
are empty), a BatchNorm (plain floating buffers and an integer counter,
written by rank 0). Everything is compared with a single process fed rank 0's
gathered weights, and with an exact float64 EMA recursion.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_distributed import needs_gloo, run_ranks

from posthoc_ema import PostHocEMA, plan, synthesize, synthesize_many
from posthoc_ema.errors import PoorReconstructionWarning, SnapshotError
from posthoc_ema.folders import describe
from posthoc_ema.snapshots import list_snapshots, read_info

pytestmark = needs_gloo

SIGMA_RELS = (0.05, 0.10)
STEPS = 20
EVERY = 5
RESUME_AT = 10  # a snapshot step: the interrupted tracker writes nothing extra when it closes

MODEL = """
def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 1)
    )
"""

WORKER = (
    textwrap.dedent(
        """
    import datetime, json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from safetensors.torch import save_file
    from posthoc_ema import PostHocEMA

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    steps, every, resume_at = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    """
    )
    + MODEL
    + textwrap.dedent(
        """
    model = make_model()
    fully_shard(model[0], reshard_after_forward=False)  # unsharded between forward and backward
    fully_shard(model[3])
    fully_shard(model)
    sigmas = (0.05, 0.10)
    emas = PostHocEMA(model, sigmas, snapshot_dir=out / "snaps", snapshot_every=every)
    gathered = PostHocEMA(model, sigmas, snapshot_dir=out / "gathered", snapshot_every=every, gather_snapshots=True)
    first = PostHocEMA(model, sigmas, snapshot_dir=out / "resumed", snapshot_every=every)
    second = None
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    trajectory = {}
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 6, generator=data), torch.randn(8, 1, generator=data)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step % 3 == 0:  # a forward outside training leaves FSDP's unsharded parameters in place
            with torch.no_grad():
                model(x)
        emas.update()
        gathered.update()
        (first if second is None else second).update()
        if step == resume_at:
            torch.save(first.state_dict(), out / f"state{rank}.pt")
            first.close()
            second = PostHocEMA(model, sigmas, snapshot_dir=out / "resumed", snapshot_every=every)
            second.load_state_dict(torch.load(out / f"state{rank}.pt", weights_only=True))
        for k, v in model.state_dict().items():  # full_tensor(): a collective, on every rank
            whole = v.full_tensor() if hasattr(v, "full_tensor") else v
            trajectory.setdefault(k, []).append(whole.detach().clone())
    emas.close()
    gathered.close()
    second.close()
    model.eval()
    probe = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    tensors = {f"trajectory/{k}": torch.stack(v) for k, v in trajectory.items()}
    with torch.no_grad():
        tensors["trained"] = model(probe)
        for s in sigmas:
            with emas.swapped(model, s):
                tensors[f"swapped/{s}"] = model(probe)
            sd = emas.ema_state_dict(s)
            for k, v in sd.items():
                tensors[f"ema/{s}/{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
        tensors["restored"] = model(probe)
    kinds = {k: type(v).__name__ for k, v in emas.ema_state_dict(0.05).items()}
    local = sum(t.numel() * t.element_size() for g in emas._groups for t in g.emas[0])
    whole = sum(v[0].numel() * 4 for k, v in trajectory.items() if v[0].is_floating_point())
    try:
        emas.functional_call(model, 0.05, (probe,))
    except ValueError as err:
        refused = str(err)
    else:
        refused = "accepted"
    # Another run in the same folder: refused on every rank, or its files deleted by their own ranks.
    runs = []
    for existing in ("error", "error", "overwrite"):
        other = PostHocEMA(model, sigmas, snapshot_dir=out / "again", snapshot_every=every, existing=existing)
        try:
            for _ in range(every):
                other.update()
            other.close()
        except Exception as err:
            runs.append(str(err))
        else:
            runs.append(other.run_id)
        dist.barrier()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    facts = {"kinds": kinds, "ema_bytes": local, "whole_bytes": whole, "functional_call": refused,
             "run_id": emas.run_id, "runs": runs}
    (out / f"facts{rank}.json").write_text(json.dumps(facts))
    dist.barrier()
    dist.destroy_process_group()
    """
    )
)

REFUSED = textwrap.dedent(
    """
    import datetime, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from posthoc_ema import PostHocEMA

    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))
    fully_shard(model, mesh=init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard")))  # HSDP
    try:
        PostHocEMA(model, (0.05, 0.10))
    except ValueError as err:
        print(err)
    else:
        print("accepted")
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(WORKER, str(out), str(STEPS), str(EVERY), str(RESUME_AT))
    return out


def _make_model() -> torch.nn.Module:
    scope: dict[str, object] = {"torch": torch}
    exec(MODEL, scope)
    return scope["make_model"]()  # type: ignore[operator,no-any-return]


def _trajectory(run: Path) -> dict[str, torch.Tensor]:
    saved = load_file(run / "rank0.safetensors")
    return {k.removeprefix("trajectory/"): v for k, v in saved.items() if k.startswith("trajectory/")}


@pytest.fixture(scope="module")
def replay(fsdp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PostHocEMA, torch.nn.Module]:
    """A single process fed rank 0's gathered weights (and buffers) step by step: the reference run."""
    folder = tmp_path_factory.mktemp("single")
    net = _make_model()
    emas = PostHocEMA(net, SIGMA_RELS, snapshot_dir=folder, snapshot_every=EVERY)
    emas.run_id = json.loads((fsdp_run / "facts0.json").read_text())["run_id"]
    trajectory = _trajectory(fsdp_run)
    with torch.no_grad():
        for n in range(STEPS):
            for key, values in trajectory.items():
                net.state_dict()[key].copy_(values[n])
            emas.update()
    emas.close()
    return folder, emas, net


def _float64_ema(trajectory: torch.Tensor, sigma_rel: float) -> torch.Tensor:
    """EDM2 eq. 127, step by step in float64: beta_t = (1 - 1/t)**(gamma + 1), the first update a copy."""
    from posthoc_ema.profiles import sigma_rel_to_gamma

    gamma = float(sigma_rel_to_gamma(sigma_rel))
    ema = trajectory[0].double()
    for t in range(2, len(trajectory) + 1):
        beta = (1 - 1 / t) ** (gamma + 1)
        ema = beta * ema + (1 - beta) * trajectory[t - 1].double()
    return ema


def test_each_rank_writes_its_shard_files_with_placements(fsdp_run: Path) -> None:
    files = list_snapshots(fsdp_run / "snaps")
    steps = range(EVERY, STEPS + 1, EVERY)
    assert sorted((i.step, i.sigma_rel, i.shard.rank) for i in files if i.shard) == sorted(
        (step, s, r) for step in steps for s in SIGMA_RELS for r in range(2)
    )
    assert len({i.run_id for i in files}) == 1  # one run id, agreed at construction
    zero = read_info(fsdp_run / "snaps" / "phema-000000000005-0.05-rank00000-of-00002.safetensors")
    one = read_info(fsdp_run / "snaps" / "phema-000000000005-0.05-rank00001-of-00002.safetensors")
    assert zero is not None and one is not None and zero.shard is not None and one.shard is not None
    assert (zero.shard.rank, zero.shard.world_size, one.shard.rank) == (0, 2, 1)
    # Uneven (5 rows: 3 and 2) and empty (1 row: 1 and 0) shards, at their offsets.
    assert zero.tensors["0.weight"][1] == (3, 6) and one.tensors["0.weight"][1] == (2, 6)
    assert one.shard.tensors["0.weight"].offsets == (3, 0) and one.shard.tensors["0.weight"].global_shape == (5, 6)
    assert zero.tensors["3.weight"][1] == (1, 5) and one.tensors["3.weight"][1] == (0, 5)
    assert one.shard.tensors["3.bias"].offsets == (1,) and one.shard.tensors["3.bias"].placement == "Shard(0)"
    # The buffers are plain tensors on every rank: rank 0 writes them.
    assert zero.shard.tensors["1.running_mean"].placement == "Replicate()"
    assert "1.num_batches_tracked" in zero.tensors and "1.running_mean" not in one.tensors
    with safe_open(str(zero.path), framework="pt") as f:
        assert f.metadata()["format_version"] == "3"


def test_an_older_reader_refuses_shard_files(fsdp_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from posthoc_ema import snapshots

    monkeypatch.setattr(snapshots, "FORMAT_VERSION", 2)  # what posthoc-ema before shard files reads
    with pytest.raises(SnapshotError, match="snapshot format version 3 is newer than this posthoc-ema reads"):
        list_snapshots(fsdp_run / "snaps")


def test_shard_snapshots_equal_a_single_process_bit_for_bit(
    fsdp_run: Path, replay: tuple[Path, PostHocEMA, torch.nn.Module]
) -> None:
    folder, _, _ = replay
    single = {(i.step, i.sigma_rel): i.path for i in list_snapshots(folder)}
    shards: dict[tuple[int, float], list[Path]] = {}
    for info in list_snapshots(fsdp_run / "snaps"):
        shards.setdefault((info.step, info.sigma_rel), []).append(info.path)
    assert shards.keys() == single.keys()
    for key, paths in shards.items():
        whole = load_file(single[key])
        parts = [load_file(p) for p in paths]
        for name, value in whole.items():
            if name in parts[1]:
                torch.testing.assert_close(torch.cat([parts[0][name], parts[1][name]]), value, rtol=0, atol=0)
            else:
                assert torch.equal(parts[0][name], value), (key, name)


def test_synthesis_assembles_whole_tensors_equal_to_a_single_process(
    fsdp_run: Path, replay: tuple[Path, PostHocEMA, torch.nn.Module]
) -> None:
    folder, _, net = replay
    targets = [0.05, 0.07, 0.10, 0.12]
    sharded = synthesize_many(fsdp_run / "snaps", targets)
    single = synthesize_many(folder, targets)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    worst = 0.0
    for s in targets:
        assert {k: tuple(v.shape) for k, v in sharded[s].items()} == expected
        for key, value in single[s].items():
            assert sharded[s][key].dtype == value.dtype
            worst = max(worst, float((sharded[s][key].double() - value.double()).abs().max()))
    assert worst <= 1e-6
    for step in (EVERY, 3 * EVERY):  # an earlier step reads fewer snapshots
        with warnings.catch_warnings():  # few snapshots so early: a poor reconstruction, the same in both
            warnings.simplefilter("ignore", PoorReconstructionWarning)
            a, b = synthesize(fsdp_run / "snaps", 0.07, step=step), synthesize(folder, 0.07, step=step)
        for key, value in b.items():
            torch.testing.assert_close(a[key], value, rtol=1e-6, atol=1e-6)
    assert plan(fsdp_run / "snaps", 0.1).snapshots[-1].tensors["0.weight"][1] == (5, 6)


def test_tracked_emas_equal_a_float64_recursion(fsdp_run: Path) -> None:
    trajectory = _trajectory(fsdp_run)
    for s in SIGMA_RELS:
        sd = synthesize(fsdp_run / "snaps", s)
        for key, values in trajectory.items():
            if not values.is_floating_point():
                assert torch.equal(sd[key], values[-1])
                continue
            reference = _float64_ema(values, s)
            torch.testing.assert_close(sd[key].double(), reference, rtol=1e-6, atol=1e-7)


def test_gathered_snapshots_are_whole_files_equal_to_the_shard_files(fsdp_run: Path) -> None:
    gathered = list_snapshots(fsdp_run / "gathered")
    assert gathered and all(i.shard is None for i in gathered)
    names = sorted(p.name for p in (fsdp_run / "gathered").iterdir())
    assert names == sorted([".phema.lock", *(i.path.name for i in gathered)])  # only rank 0 writes
    a, b = synthesize_many(fsdp_run / "gathered", [0.07]), synthesize_many(fsdp_run / "snaps", [0.07])
    for key, value in a[0.07].items():
        assert torch.equal(value, b[0.07][key]), key


def test_a_resumed_run_writes_the_same_snapshots(fsdp_run: Path) -> None:
    straight = {i.path.name: i for i in list_snapshots(fsdp_run / "snaps")}
    resumed = {i.path.name: i for i in list_snapshots(fsdp_run / "resumed")}
    assert straight.keys() == resumed.keys()
    for name, info in straight.items():
        assert load_file(info.path).keys() == load_file(resumed[name].path).keys()
        for key, value in load_file(info.path).items():
            assert torch.equal(value, load_file(resumed[name].path)[key]), (name, key)
        with safe_open(str(info.path), framework="pt") as f, safe_open(str(resumed[name].path), framework="pt") as g:
            mine, theirs = f.metadata(), g.metadata()
        assert {k: v for k, v in mine.items() if k != "run_id"} == {k: v for k, v in theirs.items() if k != "run_id"}


def test_ema_state_dict_swapped_and_memory_on_every_rank(
    fsdp_run: Path, replay: tuple[Path, PostHocEMA, torch.nn.Module]
) -> None:
    _, single, net = replay
    ranks = [load_file(fsdp_run / f"rank{r}.safetensors") for r in range(2)]
    facts = [json.loads((fsdp_run / f"facts{r}.json").read_text()) for r in range(2)]
    assert facts[0]["kinds"]["0.weight"] == "DTensor" and facts[0]["kinds"]["1.running_mean"] == "Tensor"
    probe = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    net.eval()
    for s in SIGMA_RELS:
        for key, value in single.ema_state_dict(s).items():  # gathered from the DTensors on each rank
            assert torch.equal(ranks[0][f"ema/{s}/{key}"], value), key
            if (value.is_floating_point() and key.startswith(("0.", "3."))) or key in ("1.weight", "1.bias"):
                assert torch.equal(ranks[1][f"ema/{s}/{key}"], value), key
        with single.swapped(net, s), torch.no_grad():
            expected = net(probe)
        for r in range(2):  # the sharded model evaluated with the EMA on both ranks (rank 1 with its own buffers)
            if r == 0:
                torch.testing.assert_close(ranks[r][f"swapped/{s}"], expected, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(ranks[r][f"swapped/{s}"], ranks[r]["trained"])
        assert torch.equal(ranks[0]["restored"], ranks[0]["trained"])  # the weights came back
    assert all("functional_call() cannot run a sharded model" in f["functional_call"] for f in facts)
    from posthoc_ema.distributed import chunk_block

    for rank, f in enumerate(facts):  # each rank's float32 EMA holds its row blocks, and the float buffers whole
        rows = {
            k: chunk_block(v.shape[0], 2, rank)[1] for k, v in net.state_dict().items() if k.startswith(("0.", "3."))
        }
        rows |= {k: chunk_block(5, 2, rank)[1] for k in ("1.weight", "1.bias")}
        shards = sum(n * (net.state_dict()[k].numel() // net.state_dict()[k].shape[0]) for k, n in rows.items())
        assert f["ema_bytes"] == 4 * (shards + 5 + 5)  # running_mean and running_var
        assert f["whole_bytes"] == 4 * 61


def test_an_incomplete_shard_set_is_named(fsdp_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    shutil.copytree(fsdp_run / "snaps", folder)
    (folder / "phema-000000000015-0.1-rank00001-of-00002.safetensors").unlink()
    with pytest.raises(
        SnapshotError,
        match=r"the snapshot of sigma_rel=0\.1 at step 15 \(prefix 'phema'\) is incomplete: the shard files of "
        r"rank 1 of 2 are missing \(found phema-000000000015-0\.1-rank00000-of-00002\.safetensors\)",
    ):
        synthesize(folder, 0.1)
    summary = describe(folder)
    assert summary["layout"] == {"sharded": True, "world_size": [2], "complete": 7, "incomplete": 1}
    assert any("is incomplete" in odd for odd in summary["oddities"])


def test_info_describes_a_sharded_folder(fsdp_run: Path) -> None:
    summary = describe(fsdp_run / "snaps")
    assert summary["layout"] == {"sharded": True, "world_size": [2], "complete": 8, "incomplete": 0}
    assert summary["snapshots"] == 8 and summary["oddities"] == []
    assert summary["parameters"] == 6 * 5 + 5 + 5 + 5 + 5 + 5 + 5 + 1  # the whole tensors' floating elements
    assert describe(fsdp_run / "gathered")["layout"] == {"sharded": False}


def test_unsupported_placements_are_refused_at_construction() -> None:
    pytest.importorskip("torch.distributed.fsdp")
    for out in run_ranks(REFUSED):
        assert out.strip().startswith("'0.weight' is a DTensor on a 2-D device mesh (HSDP or 2-D parallelism)")
        assert "Shard(d) or Replicate() placement" in out


def test_chunk_blocks_tile_every_dimension() -> None:
    from posthoc_ema.distributed import chunk_block

    for size in range(0, 12):
        for world in range(1, 6):
            blocks = [chunk_block(size, world, r) for r in range(world)]
            covered = np.concatenate([np.arange(o, o + n) for o, n in blocks]) if blocks else np.array([])
            assert covered.tolist() == list(range(size))
            expected = [len(c) for c in torch.arange(size).chunk(world)] if size else []
            assert [n for _, n in blocks if n] == expected


def test_the_cli_synthesizes_and_describes_a_sharded_folder(
    fsdp_run: Path, replay: tuple[Path, PostHocEMA, torch.nn.Module], tmp_path: Path
) -> None:
    from helpers import invoke

    folder, _, net = replay
    stdout, _ = invoke("info", fsdp_run / "snaps")
    assert "sharded, 2 ranks: 8 complete snapshots, 0 incomplete" in stdout
    assert "8 snapshots, " in stdout  # each of two rank files
    invoke("synthesize", fsdp_run / "snaps", "-s", "0.08", "-o", tmp_path / "one.safetensors")
    invoke("synthesize", fsdp_run / "snaps", "-s", "0.08", "-o", tmp_path / "hf", "--max-shard-size", "200B")
    expected = synthesize(folder, 0.08)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1  # whole tensors split into Hugging Face shards
    for loaded in (
        load_file(tmp_path / "one.safetensors"),
        {k: v for f in files for k, v in load_file(tmp_path / "hf" / f).items()},
    ):
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-7)
    net.load_state_dict(load_file(tmp_path / "one.safetensors"), strict=True)


def test_prune_deletes_every_shard_file_of_a_snapshot(fsdp_run: Path, tmp_path: Path) -> None:
    from posthoc_ema.retention import apply_retention, plan_retention

    folder = tmp_path / "snaps"
    shutil.copytree(fsdp_run / "snaps", folder)
    kept = plan_retention(folder, [0.05, 0.1], max_snapshots=4)
    deleted = apply_retention(kept)
    assert deleted and all("-rank0000" in p.name for p in deleted)
    assert len(deleted) == 2 * len(kept.remove)  # each removed snapshot's two rank files
    assert describe(folder)["layout"]["incomplete"] == 0
    synthesize(folder, 0.1)


SNIPPET_LAUNCHER = textwrap.dedent(
    """
    import os, runpy, sys
    rank, world, port, snippet, folder = sys.argv[1:6]
    os.environ.update(RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # as torchrun sets
    os.chdir(folder)
    runpy.run_path(snippet, run_name="__main__")
    """
)


@pytest.mark.slow  # two more processes, 100 steps of FSDP2 over gloo
def test_the_docs_snippet_runs_on_two_ranks(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    page = Path(__file__).resolve().parents[1] / "docs" / "fsdp.md"
    snippet = tmp_path / "train.py"
    snippet.write_text(page.read_text().split("```python\n", 1)[1].split("```", 1)[0])
    outputs = run_ranks(SNIPPET_LAUNCHER, str(snippet), str(tmp_path))
    assert "'0.weight': (33, 16)" in outputs[0] and outputs[1] == ""
    files = list_snapshots(tmp_path / "ckpts")
    assert len(files) == 4 * 2 * 2  # 4 snapshot steps, 2 sigma_rels, 2 ranks
    assert sorted(p.name for p in tmp_path.glob("ema-rank*.pt")) == ["ema-rank0.pt", "ema-rank1.pt"]


# -- shard files written by hand: the assembly without processes ----------------------------


def _write_sharded_run(folder: Path, whole: Path, *, world: int, dim: int) -> None:
    """Snapshots of random tensors, as whole files in ``whole`` and as ``world`` shard files each in ``folder``."""
    from helpers import write_snapshot

    from posthoc_ema import sigma_rel_to_gamma
    from posthoc_ema._version import __version__
    from posthoc_ema.distributed import chunk_block
    from posthoc_ema.snapshots import ShardLayout, SnapshotInfo, TensorPlacement, snapshot_name, write_atomic

    generator = torch.Generator().manual_seed(3)
    shapes = {"a": (7, 4), "b": (2, 5), "c": (1, 3)}  # uneven, and (on 3 ranks or more) empty blocks
    for step in range(10, 60, 10):
        for sigma in SIGMA_RELS:
            tensors = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
            tensors["stat"] = torch.randn(3, generator=generator)  # replicated, in rank 0's file
            tensors["count"] = torch.tensor(step)
            write_snapshot(whole, step, sigma, tensors)
            for rank in range(world):
                placements, local = {}, {}
                for k, t in tensors.items():
                    if k in shapes:
                        d = dim % t.dim()
                        start, length = chunk_block(t.shape[d], world, rank)
                        local[k] = t.narrow(d, start, length).contiguous()
                        offsets = tuple(start if i == d else 0 for i in range(t.dim()))
                        placements[k] = TensorPlacement(f"Shard({d})", tuple(t.shape), offsets)
                    elif rank == 0:
                        local[k] = t
                        placements[k] = TensorPlacement("Replicate()", tuple(t.shape), (0,) * t.dim())
                info = SnapshotInfo(
                    path=folder / snapshot_name(step, sigma, shard=(rank, world)),
                    step=step,
                    sigma_rel=sigma,
                    gamma=float(sigma_rel_to_gamma(sigma)),
                    dtype="float32",
                    update_every=1,
                    library_version=__version__,
                    shard=ShardLayout(rank, world, placements),
                )
                write_atomic(info.path, local, info.metadata())


@pytest.mark.parametrize(("world", "dim"), [(1, 0), (2, 0), (3, 0), (3, 1), (4, -1)])
def test_hand_written_shard_files_synthesize_as_whole_files(tmp_path: Path, world: int, dim: int) -> None:
    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    sharded.mkdir()
    whole.mkdir()
    _write_sharded_run(sharded, whole, world=world, dim=dim)
    targets = [0.05, 0.08, 0.10]
    a, b = synthesize_many(sharded, targets), synthesize_many(whole, targets)
    for s in targets:
        assert a[s].keys() == b[s].keys()
        for key, value in b[s].items():
            assert a[s][key].dtype == value.dtype and a[s][key].shape == value.shape
            torch.testing.assert_close(a[s][key], value, rtol=1e-6, atol=1e-7)
    assert describe(sharded)["layout"] == {"sharded": True, "world_size": [world], "complete": 10, "incomplete": 0}


def test_a_repeated_or_misplaced_shard_file_is_named(tmp_path: Path) -> None:
    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    sharded.mkdir()
    whole.mkdir()
    _write_sharded_run(sharded, whole, world=2, dim=0)
    shutil.copy(sharded / "phema-000000000020-0.05-rank00000-of-00002.safetensors", sharded / "copy.safetensors")
    with pytest.raises(SnapshotError, match=r"at step 20 \(prefix 'phema'\) has two shard files of rank 0"):
        synthesize(sharded, 0.05)


def test_malformed_placements_are_refused(tmp_path: Path) -> None:
    from posthoc_ema.snapshots import write_atomic

    meta = {
        "format": "posthoc-ema/snapshot",
        "format_version": "3",
        "step": "10",
        "sigma_rel": "0.1",
        "gamma": "6.937203937601806",
        "dtype": "float32",
        "update_every": "1",
        "library_version": "0",
        "shard_rank": "0",
        "shard_world_size": "2",
    }
    path = tmp_path / "bad.safetensors"
    cases = [
        ({"w": {"placement": "Shard(0)", "global_shape": [3, 2], "offsets": [2, 0]}}, "which is not a Shard"),
        ({"w": {"placement": "Shard(1)", "global_shape": [4, 2], "offsets": [0, 0]}}, "which is not a Shard"),
        ({"w": {"placement": "Partial()", "global_shape": [2, 2], "offsets": [0, 0]}}, "which is not a Shard"),
        ({"v": {"placement": "Replicate()", "global_shape": [2, 2], "offsets": [0, 0]}}, "an entry per tensor"),
    ]
    for placements, message in cases:
        write_atomic(path, {"w": torch.ones(2, 2)}, meta | {"placements": json.dumps(placements)})
        with pytest.raises(SnapshotError, match=message):
            read_info(path)
    write_atomic(path, {"w": torch.ones(2, 2)}, meta | {"shard_rank": "2", "placements": "{}"})
    with pytest.raises(SnapshotError, match="shard_rank=2 and shard_world_size=2; the rank must be in"):
        read_info(path)


def test_dtensor_support_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torch.distributed.tensor (a torch built without distributed) plain models are tracked as before."""
    import sys

    from posthoc_ema import distributed

    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", None)  # its import now raises ImportError
    assert distributed.dtensor_type() is None
    model = torch.nn.Linear(3, 2)
    emas = PostHocEMA(model, 0.1)
    emas.update()
    with emas.swapped(model, 0.1):
        pass
    assert sorted(emas.ema_state_dict(0.1)) == ["bias", "weight"]


def test_another_run_in_the_folder_is_refused_or_deleted_on_every_rank(fsdp_run: Path) -> None:
    facts = [json.loads((fsdp_run / f"facts{r}.json").read_text()) for r in range(2)]
    first, _, overwriting = facts[0]["runs"]
    assert facts[1]["runs"][0] == first and facts[1]["runs"][2] == overwriting  # one run id on both ranks
    for f in facts:
        assert "holds 4 snapshots of another training run" in f["runs"][1]  # each rank saw both ranks' files
    files = list_snapshots(fsdp_run / "again")
    assert len(files) == 4 and {i.run_id for i in files} == {overwriting}  # the first run's files are gone


@pytest.fixture
def world_of_one() -> object:
    """A one-process gloo group in this process, destroyed after the test."""
    dist = torch.distributed
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield None
    finally:
        dist.destroy_process_group()


def test_a_replaced_local_shard_is_followed_and_replicated_dtensors_kept_whole(
    world_of_one: object, tmp_path: Path
) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from posthoc_ema.profiles import sigma_rel_to_gamma

    mesh = init_device_mesh("cpu", (1,))
    model = torch.nn.Linear(3, 2)
    model.weight = torch.nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
    model.bias = torch.nn.Parameter(distribute_tensor(model.bias.detach(), mesh, [Replicate()]))
    first = model.weight._local_tensor.clone()
    emas = PostHocEMA(model, 0.1, snapshot_dir=tmp_path, snapshot_every=None)
    emas.update()
    model.weight._local_tensor = first + 1.0  # a new local tensor object, as FSDP2's reset_sharded_param may make
    emas.update()
    beta = (1 / 2) ** (float(sigma_rel_to_gamma(0.1)) + 1)
    sd = emas.ema_state_dict(0.1)
    assert isinstance(sd["weight"], DTensor) and sd["weight"].placements == (Shard(0),)
    assert isinstance(sd["bias"], DTensor) and sd["bias"].placements == (Replicate(),)
    torch.testing.assert_close(sd["weight"].to_local().double(), first.double() + (1 - beta), rtol=0, atol=1e-6)
    emas.snapshot()
    emas.close()
    (info,) = list_snapshots(tmp_path)
    assert info.path.name == "phema-000000000002-0.1-rank00000-of-00001.safetensors"
    assert info.shard is not None and info.shard.tensors["bias"].placement == "Replicate()"
    whole = synthesize(tmp_path, 0.1)
    torch.testing.assert_close(whole["weight"], sd["weight"].to_local(), rtol=0, atol=0)
    torch.testing.assert_close(whole["bias"], sd["bias"].to_local(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"functional_call\(\) cannot run a sharded model \(FSDP2\)"):
        emas.functional_call(model, 0.1, (torch.ones(1, 3),))


def test_rank0_only_is_refused_for_a_sharded_model(world_of_one: object) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = torch.nn.Linear(3, 2)
    model.weight = torch.nn.Parameter(
        distribute_tensor(model.weight.detach(), init_device_mesh("cpu", (1,)), [Shard(0)])
    )
    with pytest.raises(ValueError, match=r"rank0_only=True keeps whole EMAs on rank 0, but this model is sharded"):
        PostHocEMA(model, 0.1, rank0_only=True)


def test_gathered_snapshots_equal_a_single_process_bit_for_bit(
    fsdp_run: Path, replay: tuple[Path, PostHocEMA, torch.nn.Module]
) -> None:
    folder, _, _ = replay
    single = {i.path.name: i.path for i in list_snapshots(folder)}
    gathered = {i.path.name: i.path for i in list_snapshots(fsdp_run / "gathered")}
    assert gathered.keys() == single.keys()
    for name, path in gathered.items():
        with safe_open(str(path), framework="pt") as f, safe_open(str(single[name]), framework="pt") as g:
            assert {k: v for k, v in f.metadata().items() if k != "run_id"} == {
                k: v for k, v in g.metadata().items() if k != "run_id"
            }
            assert sorted(f.keys()) == sorted(g.keys())
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                assert torch.equal(f.get_tensor(key), g.get_tensor(key)), (name, key)
