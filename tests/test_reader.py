"""The synthesis reader (issue 7, portability): short reads are retried, and without os.preadv
(Windows) the seek + readinto path gives the same bytes."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import random_walk_run, write_snapshot
from safetensors import safe_open

from posthoc_ema import SnapshotError, plan, reader, synthesize_many
from posthoc_ema.synthesis import Plan, run

TARGETS = (0.06, 0.07, 0.12)


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tracker-written float32 snapshots: one run of bytes per file (the single-read path)."""
    return random_walk_run(tmp_path_factory.mktemp("f32"), steps=40, every=10)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshots mixing float64, float32 and bfloat16 tensors (the per-tensor path)."""
    folder = tmp_path_factory.mktemp("mixed")
    generator = torch.Generator().manual_seed(1)
    for step in (10, 20, 30, 40):
        for sigma_rel in (0.05, 0.1):
            tensors = {
                "a": torch.randn(5, 7, generator=generator, dtype=torch.float64),
                "b": torch.randn(33, generator=generator),
                "c": torch.randn(3, 11, generator=generator).to(torch.bfloat16),
                "n": torch.tensor(step),
            }
            write_snapshot(folder, step, sigma_rel, tensors)
    return folder


@pytest.fixture(params=["float32_run", "mixed_run"])
def folder(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(request.param))


@pytest.fixture(params=[False, True], ids=["one chunk", "small chunks"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param:  # chunks of 7 elements: reads start and end inside tensors
        monkeypatch.setattr(reader, "_MIN_READ", 7)
        monkeypatch.setattr(reader, "_CHUNK_BYTES", 8)
        monkeypatch.setattr(reader, "_PRODUCT_COLUMNS", 3)  # products of 3 columns: blocks end inside chunks


class Counter:
    calls = 0


def short_preadv(counter: type[Counter]):  # type: ignore[no-untyped-def]
    """An os.preadv that returns at most a third of what is asked (at least 1 byte), as NFS or FUSE may."""
    real = os.preadv

    def preadv(fd: int, buffers: list[memoryview], position: int) -> int:
        counter.calls += 1
        (buffer,) = buffers
        return real(fd, [buffer[: max(1, buffer.nbytes // 3)]], position)

    return preadv


class ShortFileIO(io.FileIO):
    """A file whose readinto returns at most 5 bytes."""

    calls = 0

    def readinto(self, buffer):  # type: ignore[no-untyped-def,override]
        ShortFileIO.calls += 1
        return super().readinto(memoryview(buffer).cast("B")[:5])


def same(a: dict[float, dict[str, torch.Tensor]], b: dict[float, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for target in a:
        assert a[target].keys() == b[target].keys()
        for name in a[target]:
            assert torch.equal(
                a[target][name].reshape(-1).view(torch.uint8), b[target][name].reshape(-1).view(torch.uint8)
            )


def reference(folder: Path) -> dict[float, dict[str, np.ndarray]]:
    """The targets in float64 from the coefficients and every snapshot loaded whole by safetensors."""
    the_plan = plan(folder, TARGETS)
    loaded = []
    for info in the_plan.snapshots:
        with safe_open(info.path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a mapping)
        loaded.append({k: t.double().numpy() for k, t in tensors.items() if t.is_floating_point()})
    weights = the_plan.coefficients
    return {
        s: {k: sum(c * sd[k] for c, sd in zip(weights[:, j], loaded, strict=True)) for k in loaded[0]}
        for j, s in enumerate(the_plan.sigma_rels)
    }


def assert_matches_reference(folder: Path, result: Mapping[Any, Mapping[str, torch.Tensor]]) -> None:
    """Every output tensor of ``result`` equals the float64 sum of the snapshots, to float32 accuracy."""
    for target, tensors in reference(folder).items():
        for name, expected in tensors.items():
            np.testing.assert_allclose(result[target][name].double().cpu().numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("chunking")
def test_fast_path_matches_float64_reference(folder: Path) -> None:
    result = synthesize_many(folder, TARGETS)
    assert_matches_reference(folder, result)


@pytest.mark.usefixtures("chunking")
def test_short_reads_are_retried(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = synthesize_many(folder, TARGETS)
    Counter.calls = 0
    monkeypatch.setattr(os, "preadv", short_preadv(Counter))
    same(synthesize_many(folder, TARGETS), expected)
    assert Counter.calls >= 3 * len(plan(folder, TARGETS).snapshots)  # the fake did cut reads short


@pytest.mark.usefixtures("chunking")
def test_without_preadv(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = synthesize_many(folder, TARGETS)
    monkeypatch.delattr(os, "preadv")
    same(synthesize_many(folder, TARGETS), expected)


@pytest.mark.usefixtures("chunking")
def test_without_preadv_and_short_reads(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = synthesize_many(folder, TARGETS)
    monkeypatch.delattr(os, "preadv")
    monkeypatch.setattr(reader, "_RawFile", ShortFileIO)
    ShortFileIO.calls = 0
    same(synthesize_many(folder, TARGETS), expected)
    assert ShortFileIO.calls > len(plan(folder, TARGETS).snapshots)


@pytest.mark.parametrize("has_preadv", [True, False])
def test_file_cut_after_planning(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_preadv: bool
) -> None:
    """A file that shrinks between plan() and run() is named as truncated, on either path."""
    if not has_preadv:
        monkeypatch.delattr(os, "preadv")
    the_plan = plan(folder, TARGETS)
    assert_cut_file_is_named(the_plan, the_plan.snapshots[-2].path)


def assert_cut_file_is_named(the_plan: Plan, victim: Path) -> None:
    """run() of a plan whose file ``victim`` lost its last 12 bytes names it as truncated; the file is restored."""
    data = victim.read_bytes()
    try:
        victim.write_bytes(data[:-12])
        with pytest.raises(SnapshotError, match=f"{victim}: file ended while reading .*; it is truncated"):
            run(the_plan)
    finally:
        victim.write_bytes(data)


# -- the workers (issue 10, item 5: synthesis at the read floor) --------------------------------


@pytest.mark.usefixtures("chunking")
@pytest.mark.parametrize("workers", [1, 3])
def test_any_number_of_workers_gives_the_same_bytes(
    folder: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Each chunk is one product whichever thread does it: the threads change no bit of the result."""
    expected = synthesize_many(folder, TARGETS)
    monkeypatch.setattr(reader, "_WORKERS", workers)
    same(synthesize_many(folder, TARGETS), expected)


@pytest.mark.usefixtures("chunking")
def test_batches_of_open_files_match_float64_reference(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More snapshots than may be open at once: several passes, the later ones adding to the sums."""
    monkeypatch.setattr(reader, "_MAX_OPEN", 3)
    result = synthesize_many(folder, TARGETS)
    assert_matches_reference(folder, result)


@pytest.mark.usefixtures("chunking")
def test_the_device_pipeline_matches_float64_reference(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's reader thread, double buffers and staging copies, run on the CPU (no CUDA streams)."""
    monkeypatch.setattr(reader, "_cpu_pass", reader._device_pass)
    result = synthesize_many(folder, TARGETS)
    assert_matches_reference(folder, result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.usefixtures("chunking")
def test_cuda_pinned_pipeline_matches_float64_reference(folder: Path) -> None:
    result = synthesize_many(folder, TARGETS, device="cuda")
    assert all(t.device.type == "cuda" for sd in result.values() for t in sd.values())
    assert_matches_reference(folder, result)


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_file_cut_after_planning_in_a_later_chunk(folder: Path, monkeypatch: pytest.MonkeyPatch, pipeline: str) -> None:
    """A file cut short is named when a chunk far into the pass reads it, with later chunks already queued."""
    monkeypatch.setattr(reader, "_MIN_READ", 7)
    monkeypatch.setattr(reader, "_CHUNK_BYTES", 8)
    if pipeline == "device":
        monkeypatch.setattr(reader, "_cpu_pass", reader._device_pass)
    the_plan = plan(folder, TARGETS)
    assert_cut_file_is_named(the_plan, the_plan.snapshots[1].path)


def test_an_error_in_progress_stops_the_pass(float32_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception raised by the progress callback reaches the caller, and no chunk is read after it."""
    monkeypatch.setattr(reader, "_MIN_READ", 7)
    monkeypatch.setattr(reader, "_CHUNK_BYTES", 8)
    fills: list[int] = []
    real_fill = reader._fill

    def counting_fill(*args: object, **kwargs: object) -> torch.Tensor:
        fills.append(1)
        return real_fill(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reader, "_fill", counting_fill)

    def progress(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize_many(float32_run, TARGETS, progress=progress)
    # At most the chunks already queued to the workers (2 per worker, plus the one reported) were read.
    assert 1 <= len(fills) <= 2 * reader._WORKERS + 1
    floats = sum(
        math.prod(shape) for dtype, shape in plan(float32_run, TARGETS).snapshots[0].tensors.values() if dtype == "F32"
    )
    assert math.ceil(floats / 7) > 2 * reader._WORKERS + 1  # the pass had more chunks than that
