"""Sharded outputs: the Hugging Face layout, loading through the index, and synthesis one shard at a time."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import invoke, make_model, random_walk_run, write_snapshot
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from posthoc_ema import PostHocEMA
from posthoc_ema.errors import SnapshotError
from posthoc_ema.sharded import (
    INDEX_NAME,
    SINGLE_NAME,
    load_sharded,
    parse_size,
    save_sharded,
    shard_names,
    split_into_shards,
    synthesize_sharded,
)
from posthoc_ema.synthesis import Plan, plan, run, save

TARGETS = (0.05, 0.08, 0.12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_walk_run(tmp_path_factory.mktemp("run"), steps=60, every=10)


@pytest.fixture(scope="module")
def the_plan(folder: Path) -> Plan:
    return plan(folder, TARGETS)


def three_line_load(model: torch.nn.Module, folder: Path) -> None:
    """The loop documented in posthoc_ema.sharded and docs/api.md, verbatim."""
    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    model.load_state_dict({k: v for f in files for k, v in load_file(Path(folder, f)).items()}, strict=True)


# -- sizes and the split rule -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("1.5KiB", 1536), ("7", 7), ("3 kb", 3000), (64, 64)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2 parsecs", "is not a size such as"),
        ("GB", "is not a size such as"),
        (0, "must be positive"),
        ("0MB", "must be positive"),
    ],
)
def test_bad_size(text: str | int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def reference_split(sizes: list[int], limit: int) -> list[list[int]]:
    """huggingface_hub's rule restated: an oversize tensor alone; else fill a shard until the next would overflow."""
    shards, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if size > limit:
            shards.append([i])
        elif used + size > limit:
            shards.append(current)
            current, used = [i], size
        else:
            current.append(i)
            used += size
    return [*shards, current] if current else shards


@given(st.lists(st.integers(1, 50), min_size=1, max_size=30), st.integers(1, 60))
def test_split_follows_the_rule(sizes: list[int], limit: int) -> None:
    names = {f"t{i}": size for i, size in enumerate(sizes)}
    shards = split_into_shards(names, limit)
    assert shards == [[f"t{i}" for i in shard] for shard in reference_split(sizes, limit)]
    for shard in shards:  # each shard fits, or is one tensor that cannot
        assert sum(names[n] for n in shard) <= limit or len(shard) == 1
    assert sorted(n for shard in shards for n in shard) == sorted(names)


def test_split_matches_huggingface_hub() -> None:
    hub = pytest.importorskip("huggingface_hub")
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        f"layer{i}.weight": torch.empty(int(n), device="meta")
        for i, n in enumerate(torch.randint(1, 400, (40,), generator=generator))
    }
    split = hub.split_torch_state_dict_into_shards(state_dict, max_shard_size=1000)
    ours = split_into_shards({k: t.numel() * 4 for k, t in state_dict.items()}, 1000)
    assert split.filename_to_tensors == dict(zip(shard_names(len(ours)), ours, strict=True))


# -- synthesis one shard at a time -----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shards_hold_exactly_what_run_gives(the_plan: Plan, tmp_path: Path, dtype: str) -> None:
    whole = run(the_plan, dtype=dtype)
    outs = [tmp_path / f"t{j}" for j in range(len(TARGETS))]
    written = synthesize_sharded(the_plan, outs, max_shard_size=40, dtype=dtype)
    assert written == [out / INDEX_NAME for out in outs]
    for out, target in zip(outs, the_plan.sigma_rels, strict=True):
        loaded = load_sharded(out)
        assert loaded.keys() == whole[target].keys()
        for key, value in whole[target].items():
            assert loaded[key].dtype == value.dtype
            assert torch.equal(loaded[key], value), key


def test_index_and_shard_files(the_plan: Plan, tmp_path: Path) -> None:
    out = tmp_path / "ema"
    synthesize_sharded(the_plan.subset([1]), [out], max_shard_size=40)
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(p.name for p in out.iterdir())
    shards = sorted(set(index["weight_map"].values()))
    assert files == sorted([*shards, INDEX_NAME])
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", name) for name in shards)
    tensors = {k: t for name in shards for k, t in load_file(out / name).items()}
    assert index["weight_map"].keys() == tensors.keys() == make_model().state_dict().keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["sigma_rel"] == repr(TARGETS[1])
    for name in shards:
        with safe_open(str(out / name), framework="pt") as f:
            meta = f.metadata()
            # Each shard is at most 40 bytes, unless it holds one tensor larger than that.
            keys = list(f.keys())
            assert sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys) <= 40 or len(keys) == 1
        assert meta["format"] == "pt"
        assert meta["posthoc_ema_format"] == "posthoc-ema/synthesized"
        assert meta["step"] == str(the_plan.step)
        assert all(index["weight_map"][k] == name for k in keys)


def test_three_line_loop_loads_a_plain_model_strictly(the_plan: Plan, tmp_path: Path) -> None:
    synthesize_sharded(the_plan.subset([0]), [tmp_path], max_shard_size=40)
    model = make_model()
    three_line_load(model, tmp_path)
    expected = run(the_plan.subset([0]))[TARGETS[0]]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_everything_in_one_shard_is_model_safetensors_without_index(the_plan: Plan, tmp_path: Path) -> None:
    (written,) = synthesize_sharded(the_plan.subset([2]), [tmp_path], max_shard_size="2GB")
    assert written == tmp_path / SINGLE_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_NAME]
    expected = run(the_plan.subset([2]))[TARGETS[2]]
    loaded = load_sharded(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_rewriting_with_another_split_leaves_no_stale_files(the_plan: Plan, tmp_path: Path) -> None:
    synthesize_sharded(the_plan.subset([0]), [tmp_path], max_shard_size=40)
    synthesize_sharded(the_plan.subset([0]), [tmp_path], max_shard_size=100, overwrite=True)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*set(index["weight_map"].values()), INDEX_NAME])
    synthesize_sharded(the_plan.subset([0]), [tmp_path], max_shard_size="1MB", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_NAME]


def test_save_with_max_shard_size_writes_the_same_shards(the_plan: Plan, tmp_path: Path) -> None:
    whole = run(the_plan)
    save(tmp_path / "a", whole[TARGETS[1]], the_plan, 1, max_shard_size=40)
    synthesize_sharded(the_plan.subset([1]), [tmp_path / "b"], max_shard_size=40)
    a, b = (json.loads((tmp_path / x / INDEX_NAME).read_text()) for x in "ab")
    assert a["metadata"] == b["metadata"]
    # save() keeps the state dict's order, synthesize_sharded() the file's: the split may differ, not the tensors.
    loaded_a, loaded_b = load_sharded(tmp_path / "a"), load_sharded(tmp_path / "b")
    assert loaded_a.keys() == loaded_b.keys()
    assert all(torch.equal(loaded_a[k], loaded_b[k]) for k in loaded_a)


def test_progress_reaches_the_total_once(the_plan: Plan, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    synthesize_sharded(
        the_plan, [tmp_path / str(j) for j in range(3)], max_shard_size=40, progress=lambda d, t: calls.append((d, t))
    )
    done = [d for d, _ in calls]
    assert done == sorted(done) and len({t for _, t in calls}) == 1
    n_floating = sum(t.numel() for t in make_model().state_dict().values() if t.is_floating_point())
    assert calls[-1] == (n_floating * len(the_plan.snapshots),) * 2


def test_wrong_number_of_folders(the_plan: Plan, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 output folders for 3 targets"):
        synthesize_sharded(the_plan, [tmp_path / "a", tmp_path / "b"], max_shard_size=40)


def test_output_that_is_a_file(the_plan: Plan, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file; a sharded output is a folder"):
        synthesize_sharded(the_plan.subset([0]), [tmp_path / "f"], max_shard_size=40)


def test_load_sharded_errors(the_plan: Plan, tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"neither model\.safetensors\.index\.json nor model\.safetensors"):
        load_sharded(tmp_path)
    synthesize_sharded(the_plan.subset([0]), [tmp_path], max_shard_size=40)
    next(tmp_path.glob("model-00001-*")).unlink()
    with pytest.raises(SnapshotError, match=r"names model-00001-of-\d+\.safetensors, which is missing"):
        load_sharded(tmp_path)


# -- loading with the frameworks ----------------------------------------------------------------


def test_loads_with_transformers_load_sharded_checkpoint(the_plan: Plan, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # transformers 5 moved it from modeling_utils to trainer_utils.
    from_trainer_utils = getattr(transformers.trainer_utils, "load_sharded_checkpoint", None)
    load_sharded_checkpoint = from_trainer_utils or transformers.modeling_utils.load_sharded_checkpoint
    synthesize_sharded(the_plan.subset([0]), [tmp_path], max_shard_size=40)
    model = make_model()
    load_sharded_checkpoint(model, tmp_path, strict=True)
    expected = run(the_plan.subset([0]))[TARGETS[0]]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_transformers_model_loads_with_from_pretrained(
    tmp_path: Path, make_tracker: Callable[..., PostHocEMA]
) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=20,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    emas = make_tracker(model, (0.05, 0.10), snapshot_dir=tmp_path / "snaps", snapshot_every=5)
    with torch.no_grad():
        for _ in range(20):
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
            emas.update()
    emas.close()
    the_plan = plan(tmp_path / "snaps", 0.07)
    (index,) = synthesize_sharded(the_plan, [tmp_path / "out"], max_shard_size=20_000)
    assert index.name == INDEX_NAME
    config.save_pretrained(tmp_path / "out")
    # from_pretrained checks each shard's metadata format ("pt") and reads the index.
    loaded = transformers.BertModel.from_pretrained(tmp_path / "out").state_dict()
    expected = run(the_plan)[0.07]
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_loads_with_accelerate(the_plan: Plan, tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")
    synthesize_sharded(the_plan.subset([0]), [tmp_path], max_shard_size=40)
    model = make_model()
    accelerate.load_checkpoint_in_model(model, tmp_path / INDEX_NAME, strict=True)
    expected = run(the_plan.subset([0]))[TARGETS[0]]
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


# -- the command line -----------------------------------------------------------------------------


def test_cli_max_shard_size(folder: Path, the_plan: Plan, tmp_path: Path) -> None:
    out, _ = invoke("synthesize", folder, "-s", "0.05", "-s", "0.08", "-o", tmp_path, "--max-shard-size", "40B")
    whole = run(the_plan.subset([0, 1]))
    for target in (0.05, 0.08):
        sub = tmp_path / f"ema-{target!r}-{the_plan.step}"
        assert f"wrote {sub / INDEX_NAME}" in out
        loaded = load_sharded(sub)
        assert all(torch.equal(loaded[k], v) for k, v in whole[target].items())
    invoke("synthesize", folder, "-s", "0.05", "-o", tmp_path / "one", "--max-shard-size", "40")
    assert (tmp_path / "one" / INDEX_NAME).exists()


def test_cli_bad_max_shard_size(folder: Path, tmp_path: Path) -> None:
    _, err = invoke("synthesize", folder, "-s", "0.05", "-o", tmp_path, "--max-shard-size", "lots", code=2)
    assert "is not a size such as" in err


# -- memory: larger than the bound ------------------------------------------------------------------

PEAK_RSS = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from posthoc_ema.synthesis import plan, run, save
    from posthoc_ema.sharded import synthesize_sharded

    def peak():
        with open("/proc/self/status") as status:
            return 1024 * next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    folder, out, how, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    the_plan = plan(folder, [0.06, 0.09])
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM: the import of torch does not count
    before = peak()
    if how == "sharded":
        synthesize_sharded(the_plan, [out + "/a", out + "/b"], max_shard_size=shard)
    else:
        sds = run(the_plan)
    print(json.dumps({"before": before, "after": peak()}))
    """
)


def write_big_run(folder: Path, *, tensors: int, numel: int) -> int:
    """Two sigma_rels at three steps of a model of ``tensors`` float32 tensors; returns its bytes."""
    generator = torch.Generator().manual_seed(0)
    for step in (100, 200, 300):
        for sigma_rel in (0.05, 0.10):
            state = {f"w{i:03d}": torch.randn(numel, generator=generator) for i in range(tensors)}
            write_snapshot(folder, step, sigma_rel, {**state, "n": torch.tensor(step)})
    return tensors * numel * 4


@pytest.mark.slow  # ~20 s: writes 1.5 GiB of snapshots, synthesizes 2 x 256 MiB
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to reset the peak RSS")
def test_peak_memory_is_bounded_by_targets_times_shard_size(tmp_path: Path) -> None:
    folder = tmp_path / "snaps"
    folder.mkdir()
    model_bytes = write_big_run(folder, tensors=64, numel=1 << 20)  # 256 MiB per target
    shard = 8 << 20  # two 4 MiB tensors per shard

    def measure(how: str) -> int:
        args = [sys.executable, "-c", PEAK_RSS, str(folder), str(tmp_path), how, str(shard)]
        result = json.loads(subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout)
        return int(result["after"] - result["before"])

    sharded, whole = measure("sharded"), measure("whole")
    # The bound: 2 targets x the shard, plus the reader's buffers and the allocator's slack (its arenas for
    # the reader and product threads keep up to some tens of MiB: 30 to 60 MiB measured); far below the
    # 2 x 256 MiB outputs.
    assert sharded < 2 * shard + 64 * 2**20, sharded
    assert sharded < 2 * model_bytes / 6
    # The measure can fail: holding both outputs whole shows up.
    assert whole > 2 * model_bytes * 0.9, whole
    assert math.isfinite(sharded)


def test_an_existing_model_is_replaced_only_with_overwrite(the_plan: Plan, tmp_path: Path) -> None:
    one = the_plan.subset([0])
    # Shards without an index (an interrupted write, or a model saved by hand) count as a model too.
    stray = tmp_path / "out" / "model-00001-of-00002.safetensors"
    stray.parent.mkdir()
    stray.write_bytes(b"someone's shard")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synthesize_sharded(one, [stray.parent], max_shard_size=40)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_sharded(stray.parent, run(one)[TARGETS[0]], one, 0, max_shard_size=40)
    assert stray.read_bytes() == b"someone's shard"
    synthesize_sharded(one, [stray.parent], max_shard_size=40, overwrite=True)
    assert load_sharded(stray.parent).keys() == run(one)[TARGETS[0]].keys()
    save_sharded(stray.parent, run(one)[TARGETS[0]], one, 0, max_shard_size=40, overwrite=True)


def test_the_snapshot_folder_is_refused(the_plan: Plan, folder: Path) -> None:
    before = sorted(folder.iterdir())
    for out in (folder, folder / "ema"):
        with pytest.raises(ValueError, match="is the snapshot folder or in it"):
            synthesize_sharded(the_plan.subset([0]), [out], max_shard_size=40, overwrite=True)
        with pytest.raises(ValueError, match="is the snapshot folder or in it"):
            save_sharded(out, run(the_plan.subset([0]))[TARGETS[0]], the_plan, 0, max_shard_size=40, overwrite=True)
    assert sorted(folder.iterdir()) == before


def test_cli_shards_need_force_and_leave_no_folder_on_failure(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00002-of-00003.safetensors").write_bytes(b"keep")
    _, err = invoke("synthesize", folder, "-s", "0.08", "--max-shard-size", "40B", "-o", out, code=1)
    assert "model-00002-of-00003.safetensors exists; pass --force" in err
    assert (out / "model-00002-of-00003.safetensors").read_bytes() == b"keep"
    invoke("synthesize", folder, "-s", "0.08", "--max-shard-size", "40B", "-o", out, "--force")
    import posthoc_ema.sharded

    def failing_run(*args: object, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(posthoc_ema.sharded, "run", failing_run)
    deep = tmp_path / "a" / "b"
    invoke("synthesize", folder, "-s", "0.08", "--max-shard-size", "40B", "-o", deep, code=1)
    assert not (tmp_path / "a").exists()


def test_cli_shard_write_errors_name_the_folder(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import posthoc_ema.sharded

    def failing_write(path: Path, tensors: object, metadata: object) -> None:
        raise OSError(28, "No space left on device", str(path.with_name("." + path.name + ".tmp")))

    monkeypatch.setattr(posthoc_ema.sharded, "write_atomic", failing_write)
    out = tmp_path / "out"
    _, err = invoke("synthesize", folder, "-s", "0.08", "--max-shard-size", "40B", "-o", out, code=1)
    assert err == f"error: {out}: No space left on device\n"
    assert not out.exists()
