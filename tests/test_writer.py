"""Snapshots are never lost: write failures, the end of training, dropped trackers (issue 7, "Lost").

Each test reproduces one way snapshots went missing before, and fails on the code that had it.
"""

from __future__ import annotations

import copy
import errno
import gc
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch

from posthoc_ema import PostHocEMA, SnapshotWriteError, files, list_snapshots
from posthoc_ema.files import TMP_SUFFIX, atomic_path, named_as
from posthoc_ema.writer import BackgroundWriter

SNAPSHOT = re.compile(r"phema-(\d+)-([0-9.e-]+)\.safetensors")


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("posthoc-ema-writer")]


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


@torch.no_grad()
def nudge(model: torch.nn.Module, call: int) -> None:
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(call)))


def named_in(error: SnapshotWriteError) -> set[tuple[int, float]]:
    """(step, sigma_rel) of the snapshots an error names, read from its message, as a user would."""
    return {(int(step), float(sigma)) for step, sigma in SNAPSHOT.findall(str(error))}


def test_a_write_failure_loses_no_later_snapshot_and_shifts_no_step(tmp_path, make_tracker, monkeypatch):
    # Snapshots every 2 steps; the folder is unwritable for steps 8-12 and writable again from 14.
    real = files.write_safetensors

    def unwritable_for_8_to_12(tensors, path, metadata):
        if 8 <= int(metadata["step"]) <= 12:
            raise PermissionError(13, "Permission denied", str(path))
        real(tensors, path, metadata)

    monkeypatch.setattr(files, "write_safetensors", unwritable_for_8_to_12)
    model = net()
    tracker = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=2)
    named: set[tuple[int, float]] = set()
    for call in range(1, 21):
        nudge(model, call)
        try:
            tracker.update()
        except SnapshotWriteError as err:  # a caller that logs the error and goes on
            named |= named_in(err)
        assert tracker.step == call  # no step shifted by an error
    try:
        tracker.close()
    except SnapshotWriteError as err:
        named |= named_in(err)
    written = {(i.step, i.sigma_rel) for i in list_snapshots(tmp_path)}
    expected = {(step, s) for step in range(2, 21, 2) for s in (0.05, 0.10)}
    assert named == {(step, s) for step in (8, 10, 12) for s in (0.05, 0.10)}
    assert written == expected - named  # step 20 included: nothing vanished


def test_every_failure_is_named_in_paths(tmp_path, make_tracker, monkeypatch):
    def disk_full(tensors, path, metadata):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_safetensors", disk_full)
    tracker = make_tracker(net(), (0.05, 0.10, 0.15), snapshot_dir=tmp_path, snapshot_every=1)
    failed: list[Path] = []
    for _ in range(5):
        try:
            tracker.update()
        except SnapshotWriteError as err:
            failed += err.paths
    with pytest.raises(SnapshotWriteError, match="No space left on device") as caught:
        tracker.flush()
    failed += caught.value.paths
    assert sorted(failed) == sorted(
        tmp_path / f"phema-{s:012d}-{r}.safetensors" for s in range(1, 6) for r in (0.05, 0.1, 0.15)
    )


class Interrupted(BaseException):
    """Not an Exception: what a KeyboardInterrupt or SystemExit in a job looks like."""


def test_a_base_exception_in_a_job_does_not_hang_flush(tmp_path, make_tracker, monkeypatch):
    def interrupted(tensors, path, metadata):
        raise Interrupted

    monkeypatch.setattr(files, "write_safetensors", interrupted)
    tracker = make_tracker(net(), 0.05, snapshot_dir=tmp_path, snapshot_every=None)
    tracker.update()
    paths = tracker.snapshot()
    outcome: list[BaseException | None] = []

    def flush() -> None:
        try:
            tracker.flush()
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    # A guard against the hang, not a timing assertion: flush() returns at once when it works.
    waiter = threading.Thread(target=flush, daemon=True)
    waiter.start()
    waiter.join(timeout=60)
    assert not waiter.is_alive(), "flush() hangs after a BaseException in a write job"
    [error] = outcome
    assert isinstance(error, SnapshotWriteError) and isinstance(error.__cause__, Interrupted)
    assert error.paths == tuple(paths)
    monkeypatch.undo()  # the writer survived it
    tracker.update()
    tracker.snapshot()
    tracker.flush()
    assert [i.step for i in list_snapshots(tmp_path)] == [2]


# -- the end of training -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "with"])
def test_the_end_of_training_is_snapshotted(tmp_path, how):
    before = set(writer_threads())  # threads of earlier tests are not this test's
    model = net()
    options = {"sigma_rels": (0.05, 0.10), "snapshot_dir": tmp_path, "snapshot_every": 10}
    if how == "close":
        emas = PostHocEMA(model, **options)
        for call in range(1, 26):
            nudge(model, call)
            emas.update()
        emas.close()
    else:
        with PostHocEMA(model, **options) as emas:
            for call in range(1, 26):
                nudge(model, call)
                emas.update()
    assert emas.step == 25
    assert sorted({i.step for i in list_snapshots(tmp_path)}) == [10, 20, 25]
    final = emas.synthesize(0.05)  # the latest step that can be synthesized is 25
    assert torch.equal(final["0.weight"], emas.ema_state_dict(0.05)["0.weight"])
    assert set(writer_threads()) <= before
    emas.close()  # again: nothing more
    assert sorted({i.step for i in list_snapshots(tmp_path)}) == [10, 20, 25]


def test_no_final_snapshot_when_turned_off_or_the_block_raises(tmp_path):
    before = set(writer_threads())  # threads of earlier tests are not this test's
    model = net()
    emas = PostHocEMA(model, 0.05, snapshot_dir=tmp_path / "off", snapshot_every=10, final_snapshot=False)
    for _ in range(25):
        emas.update()
    emas.close()
    assert [i.step for i in list_snapshots(tmp_path / "off")] == [10, 20]
    with (
        pytest.raises(ZeroDivisionError),
        PostHocEMA(model, 0.05, snapshot_dir=tmp_path / "raised", snapshot_every=10) as emas,
    ):
        for _ in range(25):
            emas.update()
        1 / 0  # noqa: B018
    assert [i.step for i in list_snapshots(tmp_path / "raised")] == [10, 20]
    assert set(writer_threads()) <= before


def test_dropped_trackers_release_their_threads(tmp_path):
    before = set(writer_threads())  # threads of earlier tests are not this test's
    for n in range(4):
        emas = PostHocEMA(net(), (0.05, 0.10), snapshot_dir=tmp_path / str(n), snapshot_every=1)
        emas.update()
        emas.update()
        del emas
    gc.collect()
    assert set(writer_threads()) <= before
    # Their writes were finished, and their folders released.
    for n in range(4):
        assert [i.step for i in list_snapshots(tmp_path / str(n))] == [1, 1, 2, 2]
        again = PostHocEMA(net(), (0.05, 0.10), snapshot_dir=tmp_path / str(n), snapshot_every=1, existing="overwrite")
        again.update()
        again.close()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_tracker_that_has_snapshotted_copies(tmp_path, how):
    model = net()
    emas = PostHocEMA(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=2)
    for call in range(1, 4):
        nudge(model, call)
        emas.update()
    twin = copy.deepcopy(emas) if how == "deepcopy" else pickle.loads(pickle.dumps(emas))
    assert twin.run_id == emas.run_id and twin.step == 3
    for sigma_rel in emas.sigma_rels:
        a, b = emas.ema_state_dict(sigma_rel), twin.ema_state_dict(sigma_rel)
        assert all(torch.equal(a[k], b[k]) for k in a)
    emas.close()  # the original lets the folder go; the copy goes on with the same run
    twin.update()
    twin.close()
    assert [i.step for i in list_snapshots(tmp_path)] == [2, 2, 3, 3, 4, 4]
    assert {i.run_id for i in list_snapshots(tmp_path)} == {emas.run_id}


def test_a_stopped_writer_names_the_snapshot_it_cannot_write(tmp_path):
    writer = BackgroundWriter()
    writer.stop()  # as at interpreter shutdown: the executor takes no more jobs
    with pytest.raises(SnapshotWriteError, match=r"could not write snapshot .*a\.safetensors: cannot schedule"):
        writer.submit(tmp_path / "a.safetensors", lambda: None)


def test_named_as_gives_an_os_error_the_name_asked_for(tmp_path):
    wanted = tmp_path / "missing" / "out.safetensors"  # its folder does not exist: the write fails
    with pytest.raises(OSError) as caught, named_as(wanted), atomic_path(wanted) as tmp:
        tmp.write_bytes(b"x")
    assert caught.value.filename == str(wanted) and caught.value.errno == errno.ENOENT
    assert "out.safetensors" in str(caught.value) and TMP_SUFFIX not in str(caught.value)
    with named_as(wanted):  # no error: nothing changes
        pass
