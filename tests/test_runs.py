"""One run per folder: run ids, the folder lock, unique temporary names, prefixes (issue 7, "Mixed").

Each test reproduces one way two runs got mixed before, and fails on the code that allowed it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from helpers import write_snapshot

from posthoc_ema import PostHocEMA, SnapshotError, list_snapshots, synthesize
from posthoc_ema.files import TMP_SUFFIX, atomic_path, temporary_name
from posthoc_ema.folders import describe
from posthoc_ema.snapshots import mixed_runs


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


@torch.no_grad()
def train(emas: PostHocEMA, model: torch.nn.Module, steps: int, *, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=generator), alpha=0.1)
        emas.update()


# -- two trackers, one folder -----------------------------------------------------------------------


def test_two_trackers_in_one_folder_are_refused_at_once(tmp_path, make_tracker):
    first = make_tracker(net(), 0.05, snapshot_dir=tmp_path, snapshot_every=2)
    second = make_tracker(net(1), 0.05, snapshot_dir=tmp_path, snapshot_every=2)
    first.update()
    first.update()  # first snapshot: the folder is first's
    second.update()
    with pytest.raises(SnapshotError, match=f"^{re.escape(str(tmp_path))} is in use by another PostHocEMA .*prefix="):
        second.update()
    assert second.step == 2  # the step is recorded anyway
    first.close()  # the folder is free again; second's run is another run, so it is still refused
    with pytest.raises(SnapshotError, match=r"holds 1 snapshot of another training run .*existing='overwrite'"):
        second.snapshot()
    assert {i.run_id for i in list_snapshots(tmp_path)} == {first.run_id}


LOCKER = textwrap.dedent(
    """
    import sys
    import torch
    from posthoc_ema import PostHocEMA

    emas = PostHocEMA(torch.nn.Linear(2, 2), 0.05, snapshot_dir=sys.argv[1], snapshot_every=1)
    emas.update()
    emas.flush()
    print("ready", flush=True)
    sys.stdin.readline()  # hold the folder until told
    emas.close()
    """
)


def test_a_folder_in_use_by_another_process_is_refused(tmp_path):
    script = tmp_path / "locker.py"
    script.write_text(LOCKER)
    folder = tmp_path / "snapshots"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        emas = PostHocEMA(torch.nn.Linear(2, 2), 0.05, snapshot_dir=folder, snapshot_every=1, existing="overwrite")
        with pytest.raises(SnapshotError, match="is in use by another PostHocEMA"):
            emas.update()
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, proc.stderr
    emas.update()  # released by the other process: now it overwrites that run
    emas.close()
    assert {i.run_id for i in list_snapshots(folder)} == {emas.run_id}


def test_temporary_names_are_unique_per_writer(tmp_path):
    target = tmp_path / "a.safetensors"
    names = {temporary_name(target) for _ in range(100)}
    assert len(names) == 100
    assert all(re.fullmatch(r"a\.safetensors\.\d+-[0-9a-f]{8}\.tmp", n.name) and n.suffix == TMP_SUFFIX for n in names)
    # Two writers of one file at the same time each write their own temporary file.
    with atomic_path(target) as mine, atomic_path(target) as theirs:
        assert mine != theirs
        mine.write_bytes(b"mine")
        theirs.write_bytes(b"theirs")
    assert target.read_bytes() in (b"mine", b"theirs")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_two_prefixes_share_a_folder(tmp_path, make_tracker):
    # A GAN: generator and discriminator, one folder, a prefix each.
    generator, discriminator = net(0), torch.nn.Linear(5, 1)
    g = make_tracker(generator, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=5, prefix="generator")
    d = make_tracker(discriminator, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=5, prefix="discriminator")
    for n in range(20):
        train(g, generator, 1, seed=n)
        train(d, discriminator, 1, seed=100 + n)
    g.close()
    d.close()
    assert {i.prefix for i in list_snapshots(tmp_path, prefix="generator")} == {"generator"}
    assert len(list_snapshots(tmp_path, prefix="discriminator")) == 8
    assert sorted(p.name for p in tmp_path.glob(".*.lock")) == [".discriminator.lock", ".generator.lock"]
    for emas, model in ((g, generator), (d, discriminator)):
        ema = emas.synthesize(0.05)  # the tracker's own prefix
        assert ema.keys() == model.state_dict().keys()
        assert torch.equal(
            ema["0.weight" if emas is g else "weight"], emas.ema_state_dict(0.05)["0.weight" if emas is g else "weight"]
        )
    with pytest.raises(
        SnapshotError,
        match=r"holds the snapshots of 2 trackers \(prefixes 'discriminator', 'generator'\); pass prefix=",
    ):
        synthesize(tmp_path, 0.05)


@pytest.mark.parametrize("prefix", ["", "a/b", ".hidden", "a b", 3])
def test_bad_prefix(prefix):
    with pytest.raises(ValueError, match="is not a valid snapshot prefix"):
        PostHocEMA(torch.nn.Linear(2, 2), prefix=prefix)


def test_bad_existing():
    with pytest.raises(ValueError, match="existing='keep' is not one of 'error', 'overwrite'"):
        PostHocEMA(torch.nn.Linear(2, 2), existing="keep")


# -- a new run in an old run's folder ---------------------------------------------------------------


def test_a_new_run_does_not_overwrite_an_old_one_step_by_step(tmp_path, make_tracker):
    # A 200-step run, then a fresh 100-step run in the same folder.
    model = net(0)
    old = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=10)
    train(old, model, 200)
    old.close()
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    fresh_model = net(1)
    fresh = make_tracker(fresh_model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=10)
    with pytest.raises(SnapshotError) as caught:
        train(fresh, fresh_model, 100, seed=1)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"{tmp_path} holds 40 snapshots of another training run (e.g. phema-000000000010-0.05.safetensors): "
        "to resume that run, call load_state_dict() with its state before the first snapshot; otherwise choose "
        "another snapshot_dir, or pass existing='overwrite' to delete them"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == before  # untouched


def test_existing_overwrite_deletes_the_old_runs_snapshots_only(tmp_path, make_tracker):
    model = net(0)
    old = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=10)
    train(old, model, 200)
    old.close()
    (tmp_path / "notes.txt").write_text("keep me")
    # A snapshot of an older version (no run id) is another run too.
    legacy = write_snapshot(tmp_path, 10, 0.05, {"w": torch.ones(2)}, name="legacy.safetensors")
    g = PostHocEMA(torch.nn.Linear(2, 2), 0.05, snapshot_dir=tmp_path, snapshot_every=10, prefix="g")
    train(g, torch.nn.Linear(2, 2), 10)
    g.close()
    fresh_model = net(1)
    fresh = make_tracker(fresh_model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=10, existing="overwrite")
    train(fresh, fresh_model, 9, seed=1)
    assert len(list_snapshots(tmp_path, prefix="phema")) == 41  # nothing deleted before the first snapshot
    train(fresh, fresh_model, 91, seed=1)
    fresh.close()
    infos = list_snapshots(tmp_path, prefix="phema")
    assert [i.step for i in infos] == [s for s in range(10, 101, 10) for _ in (0, 1)]
    assert {i.run_id for i in infos} == {fresh.run_id}
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert [i.prefix for i in list_snapshots(tmp_path, prefix="g")] == ["g"]
    assert not legacy.exists()
    synthesize(tmp_path, 0.07, prefix="phema")


def test_a_resumed_run_keeps_its_id_and_its_folder(tmp_path, make_tracker):
    model = net(0)
    first = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=10, final_snapshot=False)
    train(first, model, 30)
    state = first.state_dict()
    first.close()
    assert state["run_id"] == first.run_id
    resumed = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=10)
    assert resumed.run_id != first.run_id
    resumed.load_state_dict(state)
    assert resumed.run_id == first.run_id
    train(resumed, model, 20, seed=1)
    resumed.close()
    assert {i.run_id for i in list_snapshots(tmp_path)} == {first.run_id}
    assert [i.step for i in list_snapshots(tmp_path)][-1] == 50


def test_a_state_without_run_id_resumes_a_folder_of_an_older_version(tmp_path, make_tracker):
    for step in (10, 20):
        for s in (0.05, 0.10):
            write_snapshot(
                tmp_path,
                step,
                s,
                {k: v.float() if v.is_floating_point() else v for k, v in net(0).state_dict().items()},
            )
    model = net(0)
    old = make_tracker(model, (0.05, 0.10), final_snapshot=False)
    train(old, model, 20)
    state = old.state_dict()
    del state["run_id"]  # as an older version wrote it
    resumed = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=10)
    resumed.load_state_dict(state)
    train(resumed, model, 10, seed=1)
    resumed.close()
    assert {i.run_id for i in list_snapshots(tmp_path)} == {None, resumed.run_id}
    synthesize(tmp_path, 0.07)  # one run after all


# -- synthesis and info see mixed folders ------------------------------------------------------------


def test_synthesis_refuses_a_folder_that_mixes_runs(tmp_path, make_tracker):
    # Two runs' snapshots copied into one folder.
    for name, seed, steps in (("a", 0, 200), ("b", 1, 100)):
        model = net(seed)
        emas = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path / name, snapshot_every=10)
        train(emas, model, steps, seed=seed)
        emas.close()
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "a", mixed)
    for path in (tmp_path / "b").glob("*.safetensors"):
        shutil.copy(path, mixed / path.name)
    infos = list_snapshots(mixed)
    assert mixed_runs(infos) is not None and mixed_runs(infos).startswith("mixes 2 training runs, e.g. ")
    with pytest.raises(
        SnapshotError, match=r"mixes 2 training runs, e.g. phema-\S+ and phema-\S+ .*synthesis combines one run"
    ):
        synthesize(mixed, 0.12)
    assert mixed_runs(list_snapshots(tmp_path / "a")) is None


def test_folders_of_older_versions_still_synthesize(tmp_path):
    weights = {"w": torch.arange(4.0)}
    for step in (10, 20, 30):
        for s in (0.05, 0.10):
            write_snapshot(tmp_path, step, s, weights)
    infos = list_snapshots(tmp_path)
    assert {i.run_id for i in infos} == {None} and {i.prefix for i in infos} == {"phema"}
    assert mixed_runs(infos) is None
    torch.testing.assert_close(synthesize(tmp_path, 0.07)["w"], weights["w"])


def test_a_dropped_tracker_releases_its_folder(tmp_path):
    before = {t for t in threading.enumerate() if t.name.startswith("posthoc-ema-writer")}
    emas = PostHocEMA(net(), 0.05, snapshot_dir=tmp_path, snapshot_every=1)
    emas.update()
    run_id = emas.run_id
    state = emas.state_dict()
    del emas
    again = PostHocEMA(net(), 0.05, snapshot_dir=tmp_path, snapshot_every=1)
    again.load_state_dict(state)
    assert again.run_id == run_id
    again.update()  # the lock was released with the dropped tracker
    again.close()
    assert {t for t in threading.enumerate() if t.name.startswith("posthoc-ema-writer")} <= before
    assert [i.step for i in list_snapshots(tmp_path)] == [1, 2]


def test_info_does_not_call_two_prefixes_a_mix_of_runs(tmp_path: Path) -> None:
    folder = tmp_path / "gan"
    for prefix, seed in (("generator", 0), ("discriminator", 1)):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        with PostHocEMA(model, (0.05, 0.10), snapshot_dir=folder, snapshot_every=5, prefix=prefix) as emas:
            for _ in range(10):
                emas.update()
    summary = describe(folder)
    assert len(summary["runs"]) == 2
    assert not any("mixes" in line for line in summary["oddities"])
