"""Integration tests run the real frameworks on CPU, offline; each module skips when its framework is missing.

They carry the ``integration`` marker, which the default run leaves out (the
frameworks take a while to import): run them with ``python -m pytest -m integration``.
"""

from __future__ import annotations

import os
from pathlib import Path

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
