"""Snapshot files: self-describing metadata, dtypes, listing, corruption, atomic and failing writes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import importlib.metadata
import os
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import reference_gamma
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from posthoc_ema import SnapshotError, SnapshotWriteError, files, list_snapshots, synthesize
from posthoc_ema.snapshots import read_info, write_atomic

METADATA_KEYS = {
    "format", "format_version", "step", "sigma_rel", "gamma", "dtype", "update_every", "library_version", "run_id",
    "prefix",
}  # fmt: skip


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 5)
        self.norm = torch.nn.BatchNorm1d(5)


@torch.no_grad()
def step_model(model: torch.nn.Module, call: int) -> None:
    for t in model.state_dict().values():
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(call)))
        else:
            t.fill_(call)  # num_batches_tracked, an int64 counter


def write_snapshots(folder: Path, make_tracker, n_calls: int = 6, **kwargs):
    model = Net()
    options = {"sigma_rels": (0.05, 0.10), "snapshot_every": 3, "snapshot_dir": folder} | kwargs
    tracker = make_tracker(model, **options)
    for call in range(1, n_calls + 1):
        step_model(model, call)
        tracker.update()
    tracker.flush()
    return tracker


# -- metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize(("snapshot_dtype", "dtype_name"), [("float32", "float32"), (torch.bfloat16, "bfloat16")])
@pytest.mark.parametrize("update_every", [1, 2])
def test_metadata_describes_the_snapshot(tmp_path, make_tracker, snapshot_dtype, dtype_name, update_every):
    tracker = write_snapshots(tmp_path, make_tracker, snapshot_dtype=snapshot_dtype, update_every=update_every)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 4
    seen = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        assert set(meta) == METADATA_KEYS
        assert meta["format"] == "posthoc-ema/snapshot"
        assert meta["format_version"] == "1"
        assert meta["dtype"] == dtype_name
        assert meta["update_every"] == str(update_every)
        assert meta["library_version"] == importlib.metadata.version("posthoc-ema")
        assert meta["run_id"] == tracker.run_id and re.fullmatch("[0-9a-f]{32}", tracker.run_id)
        assert meta["prefix"] == "phema"
        sigma_rel = float(meta["sigma_rel"])
        assert sigma_rel in (0.05, 0.10)
        assert float(meta["gamma"]) == pytest.approx(reference_gamma(sigma_rel), rel=1e-12)
        seen.add((int(meta["step"]), sigma_rel))
        info = read_info(path)
        assert (info.step, info.sigma_rel, info.dtype, info.update_every, info.run_id, info.prefix) == (
            int(meta["step"]),
            sigma_rel,
            dtype_name,
            update_every,
            tracker.run_id,
            "phema",
        )
    assert seen == {(3, 0.05), (3, 0.10), (6, 0.05), (6, 0.10)}


def test_meaning_comes_from_metadata_not_file_names(tmp_path, make_tracker):
    write_snapshots(tmp_path, make_tracker)
    for i, path in enumerate(sorted(tmp_path.glob("*.safetensors"))):
        path.rename(tmp_path / f"renamed-{3 - i}.safetensors")
    infos = list_snapshots(tmp_path)
    assert [(i.step, i.sigma_rel) for i in infos] == [(3, 0.05), (3, 0.10), (6, 0.05), (6, 0.10)]


@pytest.mark.parametrize(
    ("snapshot_dtype", "torch_dtype"),
    [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32), ("float64", torch.float64)],
)
def test_snapshot_dtype_applies_to_floating_tensors_only(tmp_path, make_tracker, snapshot_dtype, torch_dtype):
    tracker = write_snapshots(tmp_path, make_tracker, snapshot_dtype=snapshot_dtype, n_calls=3)
    for info in list_snapshots(tmp_path):
        stored = load_file(info.path)
        ema = tracker.ema_state_dict(info.sigma_rel)
        assert set(stored) == set(ema)
        for name, value in stored.items():
            if name == "norm.num_batches_tracked":
                assert value.dtype == torch.int64 and int(value) == 3
            else:
                assert value.dtype == torch_dtype
                # a plain cast of the float32 EMA, with the usual round to nearest
                torch.testing.assert_close(value, ema[name].to(torch_dtype), rtol=0, atol=0)


# -- listing ----------------------------------------------------------------------------------


def test_list_snapshots_skips_temporary_and_foreign_files(tmp_path, make_tracker):
    write_snapshots(tmp_path, make_tracker)
    good = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    (tmp_path / "phema-000000000009-0.05.safetensors.tmp").write_bytes(b"\x10\x00partial")
    (tmp_path / "notes.txt").write_text("not a snapshot")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")  # no metadata
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    save_file({"w": torch.zeros(2)}, tmp_path / "synth.safetensors", metadata={"format": "posthoc-ema/synthesized"})
    (tmp_path / "sub").mkdir()
    infos = list_snapshots(tmp_path)
    assert sorted(i.path.name for i in infos) == good
    assert [(i.step, i.sigma_rel) for i in infos] == sorted((i.step, i.sigma_rel) for i in infos)


def test_list_snapshots_of_a_missing_folder(tmp_path):
    with pytest.raises(SnapshotError, match=re.escape(f"{tmp_path / 'nope'}: no such snapshot folder")):
        list_snapshots(tmp_path / "nope")


# -- corrupt files --------------------------------------------------------------------------


def small_snapshot(folder: Path, make_tracker) -> Path:
    model = torch.nn.Linear(2, 1)
    tracker = make_tracker(model, 0.1, snapshot_dir=folder, snapshot_every=None)
    tracker.update()
    (path,) = tracker.snapshot()
    tracker.flush()
    return path


def check_damaged(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    for read in (read_info, lambda p: list_snapshots(p.parent)):
        with pytest.raises(SnapshotError, match=re.escape(str(path))):
            read(path)


def test_every_truncation_is_reported(tmp_path, make_tracker):
    path = small_snapshot(tmp_path, make_tracker)
    data = path.read_bytes()
    assert read_info(path) is not None
    for size in range(len(data)):
        check_damaged(path, data[:size])


@given(st.data())
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_truncation_or_extension_is_reported_property(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("snap")
    shape = data.draw(st.tuples(st.integers(1, 40), st.integers(1, 40)))
    path = folder / "x.safetensors"
    meta = {"format": "posthoc-ema/snapshot", "format_version": "1", "step": "7", "sigma_rel": "0.1",
            "gamma": "6.94", "dtype": "float32", "update_every": "1", "library_version": "0"}  # fmt: skip
    save_file({"w": torch.ones(shape), "n": torch.zeros(3, dtype=torch.int64)}, path, metadata=meta)
    whole = path.read_bytes()
    if data.draw(st.booleans()):
        damaged = whole[: data.draw(st.integers(0, len(whole) - 1))]
    else:
        damaged = whole + data.draw(st.binary(min_size=1, max_size=64))
    check_damaged(path, damaged)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": None}, "snapshot metadata lacks the key 'step'"),
        ({"gamma": None}, "snapshot metadata lacks the key 'gamma'"),
        ({"step": "ten"}, "snapshot metadata has a malformed value"),
        ({"sigma_rel": "0.7"}, r"snapshot metadata has sigma_rel=0\.7; step must be > 0, sigma_rel in \(0, 0\.28867"),
        ({"step": "0"}, r"snapshot metadata has step=0; step must be > 0"),
        ({"gamma": "inf"}, r"snapshot metadata has gamma=inf; .* gamma in \(0, inf\)"),
        ({"format_version": "4"}, "snapshot format version 4 is newer than this posthoc-ema reads \\(3\\); upgrade"),
    ],
)
def test_malformed_metadata_is_reported(tmp_path, change, message):
    meta = {"format": "posthoc-ema/snapshot", "format_version": "1", "step": "5", "sigma_rel": "0.1",
            "gamma": "6.94", "dtype": "float32", "update_every": "1", "library_version": "0"}  # fmt: skip
    for key, value in change.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata=meta)
    with pytest.raises(SnapshotError, match=re.escape(str(path)) + ": " + message):
        list_snapshots(tmp_path)


# -- writing ------------------------------------------------------------------------------------


def test_write_atomic_leaves_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    write_atomic(path, {"w": torch.ones(3)}, {"k": "old"})
    assert os.listdir(tmp_path) == ["a.safetensors"]

    def fail_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "write_safetensors", fail_halfway)
    with pytest.raises(OSError, match="No space left on device"):
        write_atomic(path, {"w": torch.zeros(3)}, {"k": "new"})
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no *.tmp left behind
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"k": "old"}
        assert torch.equal(f.get_tensor("w"), torch.ones(3))


def wait_for_writer(tracker) -> None:
    # Reaches into the background writer only to make the test deterministic: wait
    # until the failed job is done, without surfacing the error.
    concurrent.futures.wait([future for _, future in tracker._writer._futures])


def snapshot_files(folder: Path) -> list[Path]:
    """The files of a folder but the tracker's lock file."""
    return sorted(p for p in folder.iterdir() if p.name != ".phema.lock")


def disk_full(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("surfaces_at", ["update", "snapshot", "flush"])
def test_a_failing_write_surfaces_at_the_next_call(tmp_path, make_tracker, monkeypatch, surfaces_at):
    model = Net()
    # One sigma_rel, so snapshot() queues a single write and the next call is well defined.
    tracker = make_tracker(model, 0.05, snapshot_dir=tmp_path, snapshot_every=None)
    tracker.update()
    monkeypatch.setattr(files, "write_safetensors", disk_full)
    paths = tracker.snapshot()  # queued; fails in the background
    if surfaces_at != "flush":
        wait_for_writer(tracker)
    with pytest.raises(SnapshotWriteError) as caught:
        getattr(tracker, surfaces_at)()
    message = str(caught.value)
    assert str(paths[0]) in message and "No space left on device" in message
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    assert isinstance(caught.value, OSError)
    assert not snapshot_files(tmp_path)  # neither a partial snapshot nor a *.tmp

    # update() records its step before it raises: the caller may go on.
    assert tracker.step == (2 if surfaces_at == "update" else 1)
    # Raised once; once the disk has room again, snapshots are written.
    monkeypatch.undo()
    tracker.update()
    written = tracker.snapshot()
    tracker.flush()
    assert snapshot_files(tmp_path) == sorted(written)
    assert [i.step for i in list_snapshots(tmp_path)] == [tracker.step]


def test_a_failing_write_surfaces_by_flush_at_the_latest(tmp_path, make_tracker, monkeypatch):
    # With several sigma_rels the first failure may already stop snapshot() itself.
    model = Net()
    tracker = make_tracker(model, (0.05, 0.10, 0.15), snapshot_dir=tmp_path, snapshot_every=2)
    monkeypatch.setattr(files, "write_safetensors", disk_full)
    with pytest.raises(SnapshotWriteError, match=re.escape(str(tmp_path / "phema-")) + ".*No space left on device"):
        for _ in range(2):
            tracker.update()
        tracker.flush()
    with contextlib.suppress(SnapshotWriteError):  # writes queued behind the failure still run
        tracker.close()
    assert not snapshot_files(tmp_path)


def test_snapshot_files_have_the_usual_mode(tmp_path, make_tracker):
    # safetensors >= 0.8.1 creates its files 0600 (safetensors issue #782); snapshots
    # must be readable like any file the process creates, e.g. by an evaluation job.
    write_snapshots(tmp_path, make_tracker)
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    modes = {p.stat().st_mode & 0o777 for p in tmp_path.glob("*.safetensors")}
    assert modes == {plain.stat().st_mode & 0o777}


EXITING = textwrap.dedent(
    """
    import sys
    import torch
    from posthoc_ema import PostHocEMA

    model = torch.nn.Linear(512, 512)
    tracker = PostHocEMA(model, (0.05, 0.10), snapshot_dir=sys.argv[1], snapshot_every=1)
    for _ in range(3):
        tracker.update()
    """
)


def test_pending_writes_finish_at_exit(tmp_path):
    # The script ends right after queueing snapshots, without flush() or close().
    script = tmp_path / "exiting.py"
    script.write_text(EXITING)
    folder = tmp_path / "snapshots"
    subprocess.run([sys.executable, str(script), str(folder)], check=True, timeout=120)
    infos = list_snapshots(folder)
    assert [(i.step, i.sigma_rel) for i in infos] == [(s, r) for s in (1, 2, 3) for r in (0.05, 0.10)]
    for info in infos:
        assert tuple(load_file(info.path)["weight"].shape) == (512, 512)


# -- atomicity under SIGKILL ------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from posthoc_ema import PostHocEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024), torch.nn.BatchNorm1d(1024))
    # Each round is a new run in the folder of the killed one (whose lock the kill released).
    tracker = PostHocEMA(model, (0.05, 0.10), snapshot_dir=sys.argv[1], snapshot_every=1, existing="overwrite")
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        tracker.update()
        if tracker.step == 2:
            tracker.flush()
            print("ready", flush=True)
    """
)
WRITER_SHAPES = {
    "0.weight": (1024, 1024), "0.bias": (1024,), "1.weight": (1024, 1024), "1.bias": (1024,),
    "2.weight": (1024,), "2.bias": (1024,), "2.running_mean": (1024,), "2.running_var": (1024,),
    "2.num_batches_tracked": (),
}  # fmt: skip


def is_temporary(name: str) -> bool:
    # Ours are "<name>.tmp"; safetensors >= 0.8.1 itself writes through a ".tmpXXXXXX"
    # file beside the target (safetensors PR #764), which a kill can also leave behind.
    return name.endswith(".tmp") or (name.startswith(".tmp") and not name.endswith(".safetensors"))


def check_folder_after_crash(folder: Path) -> None:
    infos = list_snapshots(folder)  # raises on any partial *.safetensors
    assert infos
    assert {p.name for p in snapshot_files(folder) if not is_temporary(p.name)} == {i.path.name for i in infos}
    for info in infos:
        tensors = load_file(info.path)
        assert {k: tuple(t.shape) for k, t in tensors.items()} == WRITER_SHAPES
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_snapshots_survive_sigkill(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    folder = tmp_path / "snapshots"
    rng = random.Random(0)
    deadline = time.monotonic() + 10  # at least 3 kills, more while time allows
    rounds = 0
    while rounds < 3 or (rounds < 8 and time.monotonic() < deadline):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            line = proc.stdout.readline()
            assert line == "ready\n", proc.stderr.read() if proc.poll() is not None else line
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        rounds += 1
        check_folder_after_crash(folder)


# -- float16 range and the write handle ---------------------------------------------------------


def test_float16_snapshots_keep_values_beyond_its_range(tmp_path, make_tracker, caplog):
    # A BatchNorm whose running_var is about 8e5, beyond float16's 65504.
    model = Net()
    with torch.no_grad():
        model.norm.running_var.fill_(8e5)
    tracker = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path, snapshot_every=5, snapshot_dtype="float16")
    with caplog.at_level("WARNING", logger="posthoc_ema.tracker"):
        for call in range(1, 21):
            with torch.no_grad():
                model.norm.running_var.fill_(8e5 + 1000 * call)
                model.lin.weight.fill_(0.01 * call)
            tracker.update()
        tracker.flush()
    warnings = [r.getMessage() for r in caplog.records if "float16" in r.getMessage()]
    assert len(warnings) == 1 and "norm.running_var" in warnings[0] and "lin.weight" not in warnings[0]
    info = list_snapshots(tmp_path)[-1]
    assert info.tensors["norm.running_var"][0] == "F32" and info.tensors["lin.weight"][0] == "F16"
    ema = synthesize(tmp_path, 0.05)
    reference = tracker.ema_state_dict(0.05)
    assert torch.isfinite(ema["norm.running_var"]).all()
    torch.testing.assert_close(ema["norm.running_var"], reference["norm.running_var"], rtol=1e-6, atol=0)
    torch.testing.assert_close(ema["lin.weight"], reference["lin.weight"], rtol=2e-3, atol=0)


def test_the_handle_that_wrote_is_fsynced(tmp_path, monkeypatch):
    # Windows cannot fsync a read-only handle: every file fsynced must be open for writing.
    fcntl = pytest.importorskip("fcntl")
    real, modes = os.fsync, []

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            modes.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(tmp_path / "a.safetensors", {"w": torch.ones(3)}, {"k": "v"})
    with files.atomic_path(tmp_path / "b.txt") as tmp:  # a writer that closes its own handle
        tmp.write_text("b")
    assert len(modes) == 2 and os.O_RDONLY not in modes
