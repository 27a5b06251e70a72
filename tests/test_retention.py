"""The disk budget: pruning that keeps the predicted error low, and estimates before training."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, write_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_ema import plan, profiles
from posthoc_ema.errors import SnapshotError
from posthoc_ema.retention import (
    apply_retention,
    estimate,
    plan_retention,
    predicted_errors,
    select_snapshots,
    sigma_rel_grid,
)
from posthoc_ema.snapshots import DEFAULT_PREFIX

TRACKED = (0.05, 0.10)
RANGE = sigma_rel_grid(0.03, 0.25, 9)


def tiny_run(folder: Path, *, n_steps: int, every: int) -> Path:
    """Snapshots of two sigma_rels every ``every`` steps of a 3-value model: the headers are what matters."""
    folder.mkdir(exist_ok=True)
    for k in range(1, n_steps + 1):
        for sigma_rel in TRACKED:
            write_snapshot(folder, k * every, sigma_rel, {"w": torch.full((3,), float(k)), "n": torch.tensor(k)})
    return folder


@pytest.fixture
def run40(tmp_path: Path) -> Path:
    return tiny_run(tmp_path / "run", n_steps=40, every=100)


def schedule(n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(1, n_steps + 1) * 100.0, len(TRACKED)), np.tile(TRACKED, n_steps)


# -- the choice -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_steps", "keep"), [(6, 4), (7, 5), (8, 5), (9, 4)])
def test_greedy_is_close_to_the_best_subset(n_steps: int, keep: int) -> None:
    steps, sigmas = schedule(n_steps)
    chosen = select_snapshots(steps, sigmas, RANGE, max_count=keep)
    assert len(chosen) == keep
    last = [len(steps) - 2, len(steps) - 1]
    assert set(last) <= set(chosen)
    ours = predicted_errors(steps[chosen], sigmas[chosen], steps.max(), RANGE).max()
    best = min(
        predicted_errors(steps[[*c, *last]], sigmas[[*c, *last]], steps.max(), RANGE).max()
        for c in itertools.combinations(range(len(steps) - 2), keep - 2)
    )
    assert ours <= 1.05 * best, (ours, best)


@settings(deadline=None, max_examples=25)
@given(st.integers(3, 30), st.integers(2, 20), st.sampled_from(["max", "mean"]))
def test_never_worse_than_keeping_the_last_files(n_steps: int, keep: int, objective: str) -> None:
    steps, sigmas = schedule(n_steps)
    keep = min(keep, len(steps))
    chosen = select_snapshots(steps, sigmas, RANGE, max_count=keep, objective=objective)  # type: ignore[arg-type]
    assert len(chosen) == keep and list(chosen) == sorted(set(chosen))
    ours = predicted_errors(steps[chosen], sigmas[chosen], steps.max(), RANGE)
    last = predicted_errors(steps[-keep:], sigmas[-keep:], steps.max(), RANGE)
    stat = np.max if objective == "max" else np.mean
    assert stat(ours) <= stat(last) + 1e-9


def test_recent_dense_old_sparse() -> None:
    # Narrow targets need recent snapshots dense; the wide end of the range keeps some old ones.
    steps, sigmas = schedule(200)
    chosen = select_snapshots(steps, sigmas, sigma_rel_grid(0.03, 0.10), max_count=30)
    kept_steps = np.unique(steps[chosen])
    assert kept_steps[0] < 0.8 * steps.max()
    gaps = np.diff(kept_steps)
    assert gaps[: len(gaps) // 3].mean() > 2 * gaps[-len(gaps) // 3 :].mean()


def test_byte_budget_with_files_of_different_sizes() -> None:
    steps, sigmas = schedule(12)
    sizes = np.where(np.arange(len(steps)) % 2 == 0, 30.0, 10.0)
    chosen = select_snapshots(steps, sigmas, RANGE, sizes=sizes, max_bytes=125)
    assert sizes[chosen].sum() <= 125
    # Full: no file left out fits in what remains.
    assert all(sizes[j] > 125 - sizes[chosen].sum() for j in set(range(len(steps))) - set(chosen))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give a budget"),
        ({"max_count": 1}, "the 2 snapshot.s. of the latest step .4000. alone take"),
        ({"max_bytes": 10}, "max_bytes needs the size of each snapshot"),
        ({"max_count": 5, "objective": "median"}, "objective='median' is not 'max' or 'mean'"),
    ],
)
def test_select_errors(kwargs: dict[str, object], message: str) -> None:
    steps, sigmas = schedule(40)
    with pytest.raises(ValueError, match=message):
        select_snapshots(steps, sigmas, RANGE, **kwargs)  # type: ignore[arg-type]


def test_sigma_rel_grid() -> None:
    assert sigma_rel_grid(0.05, 0.25, 5) == (0.05, 0.1, 0.15, 0.2, 0.25)
    assert sigma_rel_grid(0.1, 0.1) == (0.1,)
    with pytest.raises(ValueError, match="must satisfy 0 < lo <= hi"):
        sigma_rel_grid(0.2, 0.1)


# -- a folder ---------------------------------------------------------------------------------


def test_pruning_keeps_the_error_it_reports(run40: Path) -> None:
    before = plan(run40, RANGE).errors
    retention = plan_retention(run40, RANGE, max_snapshots=12)
    np.testing.assert_allclose(retention.errors_before, before, rtol=1e-9, atol=1e-12)
    assert len(retention.keep) == 12 and len(retention.remove) == 68
    deleted = apply_retention(retention)
    assert sorted(deleted) == sorted(i.path for i in retention.remove)
    assert sorted(run40.glob("*.safetensors")) == sorted(i.path for i in retention.keep)
    assert (run40 / f".{DEFAULT_PREFIX}.lock").is_file()  # the lock taken while deleting stays, as a tracker's does
    # Planning on what is left gives the predicted error reported, at the same step.
    with pytest.warns(UserWarning, match="predicted relative error above"):
        after = plan(run40, RANGE)
    assert after.step == retention.step == 4000
    np.testing.assert_allclose(after.errors, retention.errors_after, rtol=1e-9, atol=1e-12)
    # And far better than keeping the last 12 files.
    steps, sigmas = schedule(40)
    last = predicted_errors(steps[-12:], sigmas[-12:], 4000, RANGE)
    np.testing.assert_allclose(retention.errors_last, last, rtol=1e-9)
    assert retention.errors_after.max() < 0.7 * last.max()


def test_byte_budget_of_a_folder(run40: Path) -> None:
    size = next(run40.iterdir()).stat().st_size
    retention = plan_retention(run40, RANGE, budget=10 * size + size // 2)
    assert retention.bytes_after == sum(i.path.stat().st_size for i in retention.keep) <= 10 * size + size // 2
    assert len(retention.keep) == 10
    assert retention.bytes_before == 80 * size


def test_a_folder_within_budget_loses_nothing(run40: Path) -> None:
    retention = plan_retention(run40, RANGE, budget="1GB")
    assert retention.remove == () and apply_retention(retention) == []
    np.testing.assert_allclose(retention.errors_after, retention.errors_before)


def test_apply_refuses_a_file_that_changed(run40: Path) -> None:
    retention = plan_retention(run40, RANGE, max_snapshots=70)
    victim = retention.remove[0].path
    victim.unlink()
    write_snapshot(run40, 100, 0.07, {"w": torch.zeros(3), "n": torch.tensor(0)}, name=victim.name)
    with pytest.raises(SnapshotError, match="is no longer the snapshot of step"):
        apply_retention(retention)
    assert victim.exists()


# -- estimate -----------------------------------------------------------------------------------


def test_estimate_matches_a_folder_of_that_schedule(tmp_path: Path) -> None:
    folder = tiny_run(tmp_path / "run", n_steps=20, every=50)
    result = estimate(params=3, steps=1049, snapshot_every=50, sigma_rels=TRACKED, targets=RANGE, max_snapshots=8)
    assert (result.snapshot_steps, result.files, result.bytes_per_file, result.total_bytes) == (20, 40, 12, 480)
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(result.errors, plan(folder, RANGE).errors, rtol=1e-9, atol=1e-12)
    steps, sigmas = schedule(20)
    keep = select_snapshots(steps / 2, sigmas, RANGE, max_count=8)
    assert result.kept_files == 8 and result.kept_bytes == 96
    assert result.errors_kept is not None and result.errors_last is not None
    np.testing.assert_allclose(result.errors_kept, predicted_errors(steps[keep], sigmas[keep], 2000, RANGE), rtol=1e-9)
    np.testing.assert_allclose(result.errors_last, predicted_errors(steps[-8:], sigmas[-8:], 2000, RANGE), rtol=1e-9)


def test_estimate_dtype_and_default_targets() -> None:
    result = estimate(params=1e6, steps=1e4, snapshot_every=1000, sigma_rels=TRACKED, dtype="bfloat16")
    assert result.bytes_per_file == 2_000_000 and result.files == 20
    assert min(result.sigma_rels) == 0.05 and max(result.sigma_rels) == 0.1
    assert result.kept_files is None and result.errors_kept is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 10, "snapshot_every": 100}, "no snapshot would be taken"),
        ({"params": 0}, "params=0 must be a finite number >= 1"),
        ({"dtype": "int8"}, "dtype='int8' is not one of"),
        ({"sigma_rels": (0.5,)}, "sigma_rel=0.5 is outside"),
    ],
)
def test_estimate_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"params": 100, "steps": 1000, "snapshot_every": 100, "sigma_rels": TRACKED}
    with pytest.raises(ValueError, match=message):
        estimate(**(args | kwargs))  # type: ignore[arg-type]


# -- the command line ------------------------------------------------------------------------------


def test_prune_is_a_dry_run_without_apply(run40: Path) -> None:
    files = sorted(run40.iterdir())
    out, _ = invoke("prune", run40, "--sigma-rel", "0.03:0.25", "--max-snapshots", "12")
    assert sorted(run40.iterdir()) == files
    retention = plan_retention(run40, sigma_rel_grid(0.03, 0.25), max_snapshots=12)
    assert out.count("would delete ") == len(retention.remove) == 68
    assert "dry run: nothing deleted; add --apply" in out
    before, after = retention.errors_before.max(), retention.errors_after.max()
    assert f"max {before:.2%}" in out and f"max {after:.2%}" in out
    assert f"keeping the newest 12 instead: max {retention.errors_last.max():.2%}" in out
    out, _ = invoke("prune", run40, "--sigma-rel", "0.03:0.25", "--max-snapshots", "12", "--apply")
    assert out.count("deleted ") == 68
    assert sorted(run40.glob("*.safetensors")) == sorted(i.path for i in retention.keep)


def test_prune_budget_in_bytes(run40: Path) -> None:
    size = next(run40.iterdir()).stat().st_size
    invoke("prune", run40, "-s", "0.05,0.1,0.2", "--budget", f"{20 * size}B", "--apply")
    assert len(list(run40.glob("*.safetensors"))) == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-s", "0.03:0.25"], "give --budget, --max-snapshots or both"),
        (["-s", "0.03:0.25", "--budget", "lots"], "is not a size such as"),
        (["-s", "0.3:0.1", "--max-snapshots", "4"], "must satisfy 0 < lo <= hi"),
        (["-s", "0.03:0.25", "--max-snapshots", "4", "--objective", "median"], "'median' is not max or mean"),
    ],
)
def test_prune_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    _, err = invoke("prune", tmp_path, *args, code=2)
    assert message in " ".join(err.split())


def test_prune_budget_too_small(run40: Path) -> None:
    _, err = invoke("prune", run40, "-s", "0.03:0.25", "--max-snapshots", "1", code=1)
    assert "alone take" in err and len(list(run40.iterdir())) == 80


def test_estimate_command() -> None:
    out, _ = invoke(
        "estimate", "--params", "2.5e9", "--steps", "1e5", "--snapshot-every", "4096", "--sigma-rel", "0.05,0.10",
        "--dtype", "float32", "--target", "0.03:0.25", "--max-snapshots", "10",
    )  # fmt: skip
    result = estimate(
        params=2.5e9, steps=1e5, snapshot_every=4096, sigma_rels=TRACKED, targets=sigma_rel_grid(0.03, 0.25),
        max_snapshots=10,
    )  # fmt: skip
    assert "24 steps x 2 sigma_rels = 48 files of 10 GB (float32): 480 GB" in out
    assert f"max {result.errors.max():.2%}" in out
    assert result.errors_last is not None and f"max {result.errors_last.max():.2%}" in out
    assert profiles.canonical_sigma_rel(0.03) in result.sigma_rels


# -- which snapshots a plan covers, and the folder lock ------------------------------------------


def _write(folder: Path, step: int, sigma_rel: float, **fields: object) -> Path:
    """A snapshot with the given prefix / run_id / start_step metadata."""
    from posthoc_ema import sigma_rel_to_gamma
    from posthoc_ema._version import __version__
    from posthoc_ema.snapshots import SnapshotInfo, snapshot_name, write_atomic

    prefix = str(fields.get("prefix", DEFAULT_PREFIX))
    info = SnapshotInfo(
        path=folder / snapshot_name(step, sigma_rel, prefix),
        step=step,
        sigma_rel=sigma_rel,
        gamma=float(sigma_rel_to_gamma(sigma_rel)),
        dtype="float32",
        update_every=1,
        library_version=__version__,
        **fields,  # type: ignore[arg-type]
    )
    write_atomic(info.path, {"w": torch.full((3,), float(step))}, info.metadata())
    return info.path


def _gan_folder(folder: Path) -> Path:
    folder.mkdir()
    for k in range(1, 11):
        for sigma_rel in TRACKED:
            _write(folder, 100 * k, sigma_rel, prefix="gen", run_id="a")
            _write(folder, 100 * k, sigma_rel, prefix="disc", run_id="b")
    return folder


def test_a_folder_of_two_trackers_needs_a_prefix(tmp_path: Path) -> None:
    folder = _gan_folder(tmp_path / "gan")
    with pytest.raises(SnapshotError, match=r"2 trackers .*pass prefix= \(--prefix on the command line\)"):
        plan_retention(folder, RANGE, max_snapshots=6)
    retention = plan_retention(folder, RANGE, max_snapshots=6, prefix="gen")
    assert {i.prefix for i in (*retention.keep, *retention.remove)} == {"gen"}
    assert len(retention.keep) + len(retention.remove) == 20
    apply_retention(retention)
    assert len(list(folder.glob("disc-*"))) == 20 and len(list(folder.glob("gen-*"))) == 6
    # The CLI says how to choose, and takes --prefix.
    _, err = invoke("prune", folder, "-s", "0.05:0.2", "--max-snapshots", "4", code=1)
    assert "pass prefix= (--prefix on the command line)" in err
    out, _ = invoke("prune", folder, "-s", "0.05:0.2", "--max-snapshots", "4", "--prefix", "disc", "--apply")
    assert out.count("deleted ") == 16 and len(list(folder.glob("gen-*"))) == 6


def test_mixed_runs_are_refused_and_late_emas_left_alone(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for k in range(1, 6):
        _write(mixed, 100 * k, 0.05, run_id="a")
        _write(mixed, 100 * k + 50, 0.1, run_id="b")
    with pytest.raises(SnapshotError, match="run"):
        plan_retention(mixed, RANGE, max_snapshots=4)
    late = tiny_run(tmp_path / "late", n_steps=10, every=100)
    added = [_write(late, 100 * k, 0.2, start_step=500) for k in range(6, 11)]
    retention = plan_retention(late, RANGE, max_snapshots=4)
    planned = {i.path for i in (*retention.keep, *retention.remove)}
    assert planned.isdisjoint(added) and len(planned) == 20
    apply_retention(retention)
    assert all(p.exists() for p in added)


def test_apply_waits_for_no_tracker(run40: Path) -> None:
    from posthoc_ema.writer import FolderLock

    retention = plan_retention(run40, RANGE, max_snapshots=12)
    lock = FolderLock(run40, f".{DEFAULT_PREFIX}.lock")  # as a live tracker holds it
    lock.acquire()
    try:
        with pytest.raises(SnapshotError, match=r"a tracker \(prefix 'phema'\) is writing snapshots there"):
            apply_retention(retention)
        assert all(i.path.exists() for i in retention.remove)
    finally:
        lock.release()
    assert len(apply_retention(retention)) == 68
