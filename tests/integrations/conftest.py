"""Integration tests run the real frameworks on CPU, offline; each module skips when its framework is missing.

They carry the ``integration`` marker, which the default run leaves out (the
frameworks take a while to import): run them with ``python -m pytest -m integration``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # Not even imported unless the run asks for the marker: importing the frameworks takes half a minute.
    expr = config.getoption("markexpr") or ""
    if collection_path.name.startswith("test_") and ("integration" not in expr or "not integration" in expr):
        return True
    return None


def _same_snapshots(a: Path, b: Path) -> None:
    """Two folders hold the same snapshot files, byte for byte but for each run's own id (two runs, one trajectory)."""
    from posthoc_ema.snapshots import read_info

    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))  # not the writer's lock file
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    for name in names:
        info_a, info_b = read_info(a / name), read_info(b / name)
        assert info_a is not None and info_b is not None and info_a.run_id and info_b.run_id, name
        assert (a / name).read_bytes().replace(info_a.run_id.encode(), info_b.run_id.encode()) == (
            b / name
        ).read_bytes(), name


@pytest.fixture
def same_snapshots() -> Any:
    """``same_snapshots(folder_a, folder_b)``: see :func:`_same_snapshots`."""
    return _same_snapshots
