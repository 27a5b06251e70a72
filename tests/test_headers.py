"""Safetensors header validation (issue 7): a malformed header is one SnapshotError naming the file and the field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import invoke, random_walk_run, write_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

from posthoc_ema import SnapshotError, plan, synthesize
from posthoc_ema.files import read_header
from posthoc_ema.snapshots import read_info

META = {"format": "posthoc-ema/snapshot", "format_version": "1", "step": "700", "sigma_rel": "0.05",
        "gamma": "16.97", "dtype": "float32", "update_every": "1", "library_version": "0"}  # fmt: skip


def write_raw(path: Path, header: Any, data_bytes: int) -> Path:
    """A file with ``header`` serialized as given (valid or not) followed by ``data_bytes`` bytes of data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data_bytes))
    return path


def table(**tensors: tuple[str, list[int], list[int]]) -> dict[str, Any]:
    return {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in tensors.items()}


# Each case: header (with snapshot metadata unless it replaces it), data bytes, the message after "header: ".
CASES: dict[str, tuple[Any, int, str]] = {
    "wrong span length": (
        {"__metadata__": META, **table(w=("F32", [3], [0, 8]))},
        8,
        r"tensor 'w' has data_offsets \[0, 8\] \(8 bytes\), but 3 elements of F32 \(shape \[3\]\) take 12",
    ),
    "overlap": (
        {"__metadata__": META, **table(a=("F32", [2], [0, 8]), b=("F32", [2], [4, 12]))},
        12,
        r"tensor 'b' starts at byte 4: it overlaps tensor 'a' \(which ends at 8\)",
    ),
    "gap": (
        {"__metadata__": META, **table(a=("F32", [2], [0, 8]), b=("F32", [2], [12, 20]))},
        20,
        r"tensor 'b' starts at byte 12: it leaves a gap after tensor 'a' \(which ends at 8\)",
    ),
    "gap at the start": (
        {"__metadata__": META, **table(a=("F32", [2], [8, 16]))},
        16,
        r"tensor 'a' starts at byte 8: it leaves a gap after the data start \(0\)",
    ),
    "unknown dtype": (
        {"__metadata__": META, **table(w=("F33", [2], [0, 8]))},
        8,
        r"tensor 'w' has dtype 'F33', not one of BOOL, U8, I8, F4, .*, BF16, I32, U32, F32, C64, F64, I64, U64",
    ),
    "negative dim": (
        {"__metadata__": META, **table(w=("F32", [-2, 1], [0, 8]))},
        8,
        r"tensor 'w' has shape \[-2, 1\], not a list of non-negative integers",
    ),
    "shape not a list": (
        {"__metadata__": META, **table(w=("F32", "2", [0, 8]))},  # type: ignore[arg-type]
        8,
        r"tensor 'w' has shape '2', not a list of non-negative integers",
    ),
    "reversed offsets": (
        {"__metadata__": META, **table(w=("F32", [2], [8, 0]))},
        8,
        r"tensor 'w' has data_offsets \[8, 0\], not \[start, end\] with 0 <= start <= end",
    ),
    "metadata not a map": (
        {"__metadata__": "x", **table(w=("F32", [2], [0, 8]))},
        8,
        r"__metadata__ is a str, not an object of strings",
    ),
    "metadata value not a string": (
        {"__metadata__": {**META, "step": 700}, **table(w=("F32", [2], [0, 8]))},
        8,
        r"__metadata__\['step'\] is 700, not a string",
    ),
    "header not an object": ([1, 2, 3], 0, r"the header is a JSON list, not an object"),
    "tensor entry not an object": (
        {"__metadata__": META, "w": 5},
        0,
        r"tensor 'w' is 5, not an object with dtype, shape and data_offsets",
    ),
    "tensor entry lacks a field": (
        {"__metadata__": META, "w": {"dtype": "F32", "shape": [2]}},
        8,
        r"tensor 'w' lacks 'data_offsets'",
    ),
}


def expected(path: Path, case: str) -> str:
    return re.escape(str(path)) + ": malformed safetensors header: " + CASES[case][2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_walk_run(tmp_path_factory.mktemp("ckpts"), steps=60, every=20)


@pytest.fixture
def folder(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "ckpts"))


@pytest.mark.parametrize("case", CASES)
def test_read_header_names_file_and_field(tmp_path: Path, case: str) -> None:
    header, data_bytes, _ = CASES[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data_bytes)
    for read in (read_header, read_info):
        with pytest.raises(SnapshotError, match="^" + expected(path, case) + "$"):
            read(path)


@pytest.mark.parametrize("case", CASES)
def test_plan_and_synthesize_name_file_and_field(folder: Path, case: str) -> None:
    header, data_bytes, _ = CASES[case]
    path = write_raw(folder / "phema-bad.safetensors", header, data_bytes)
    with pytest.raises(SnapshotError, match=expected(path, case)):
        plan(folder, 0.07)
    with pytest.raises(SnapshotError, match=expected(path, case)):
        synthesize(folder, 0.07)


@pytest.mark.parametrize("case", CASES)
def test_cli_synthesize_prints_one_error_line(folder: Path, tmp_path: Path, case: str) -> None:
    header, data_bytes, _ = CASES[case]
    path = write_raw(folder / "phema-bad.safetensors", header, data_bytes)
    out = tmp_path / "out.safetensors"
    _, stderr = invoke("synthesize", folder, "-s", "0.07", "-o", out, code=1)
    assert re.fullmatch("error: " + expected(path, case), stderr.strip()), stderr
    assert not out.exists()


@pytest.mark.parametrize("case", CASES)
def test_cli_info_reports_the_file(folder: Path, case: str) -> None:
    # info describes a damaged folder rather than refusing it (as for truncated files): the
    # malformed file is listed with its one-line error, and nothing escapes as a traceback.
    header, data_bytes, _ = CASES[case]
    path = write_raw(folder / "phema-bad.safetensors", header, data_bytes)
    stdout, stderr = invoke("info", "--json", folder)
    assert stderr == ""
    (corrupt,) = json.loads(stdout)["corrupt_files"]
    assert corrupt["file"] == path.name
    assert re.fullmatch(expected(path, case), corrupt["error"])
    # and alone in a folder, it is still reported, not a traceback
    alone = folder.parent / "alone"
    alone.mkdir()
    shutil.move(path, alone / path.name)
    stdout, _ = invoke("info", "--json", alone)
    assert [c["file"] for c in json.loads(stdout)["corrupt_files"]] == [path.name]


def test_valid_headers_still_read(tmp_path: Path) -> None:
    # null metadata, empty tensors at one offset, tensors listed out of offset order: all valid safetensors
    header = {"__metadata__": None, **table(b=("F32", [2], [8, 16]), e=("F32", [0], [16, 16]), a=("I64", [1], [0, 8]))}
    path = write_raw(tmp_path / "ok.safetensors", header, 16)
    meta, tensors = read_header(path)
    assert meta == {}
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert {name: t["offset"] - t["data_offsets"][0] for name, t in tensors.items()} == dict.fromkeys("bea", data_start)
    with safe_open(path, framework="pt") as f:
        assert f.get_tensor("b").shape == (2,)


def test_snapshots_the_tracker_writes_pass(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 5, 0.1, {"w": torch.ones(3, 2), "h": torch.ones(5, dtype=torch.float16),
                                             "n": torch.tensor(3), "b": torch.ones(3, dtype=torch.bool)})  # fmt: skip
    info = read_info(path)
    assert info is not None and info.tensors["h"] == ("F16", (5,))


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[str, list[int]]]:
    dtypes = st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "U8", "BOOL"])
    shapes = st.lists(st.integers(0, 4), max_size=3)
    return draw(st.lists(st.tuples(dtypes, shapes), min_size=1, max_size=5))


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


@given(layouts(), st.data())
@settings(max_examples=60, deadline=None)
def test_agrees_with_safetensors_property(tmp_path_factory: pytest.TempPathFactory, layout: Any, data: Any) -> None:
    """A random layout, and one of its offsets shifted or not: safetensors' own reader accepts it iff we do."""
    header: dict[str, Any] = {}
    offset = 0
    for i, (dtype, shape) in enumerate(layout):
        size = ITEMSIZE[dtype] * int(torch.tensor(shape).prod()) if shape else ITEMSIZE[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if data.draw(st.booleans()):
        entry = header[data.draw(st.sampled_from(sorted(header)))]
        which, shift = data.draw(st.integers(0, 1)), data.draw(st.sampled_from([-2, -1, 1, 2]))
        entry["data_offsets"][which] = max(0, entry["data_offsets"][which] + shift)
    path = write_raw(tmp_path_factory.mktemp("h") / "x.safetensors", header, offset)
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (not a mapping)
                f.get_tensor(name)
        theirs = True
    except SafetensorError:
        theirs = False
    try:
        read_header(path)
        ours = True
    except SnapshotError:
        ours = False
    assert ours == theirs, header


def test_files_of_other_safetensors_dtypes_are_skipped(folder: Path) -> None:
    """A model file in the folder with dtypes snapshots never hold (complex, 4-bit) is not a snapshot, not an error."""
    header = {"__metadata__": {"format": "pt"}, **table(z=("C64", [3], [0, 24]), q=("F4", [2, 3], [24, 27]))}
    write_raw(folder / "model.safetensors", header, 27)
    assert len(plan(folder, 0.07).snapshots) == len(list(folder.glob("phema-*")))


def test_sub_byte_tensor_must_fill_whole_bytes(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "x.safetensors", table(q=("F4", [3], [0, 2])), 2)
    with pytest.raises(SnapshotError, match=r"tensor 'q' has data_offsets \[0, 2\] \(2 bytes\), but 3 elements of F4"):
        read_header(path)
