"""The runnable snippet of each framework page in docs/ runs as written (skipped when its framework is missing)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = {"lightning.md": "lightning", "transformers.md": "transformers", "accelerate.md": "accelerate"}


def first_python_block(page: Path) -> str:
    match = re.search(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert match is not None, f"{page} has no python block"
    return match.group(1)


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")  # Lightning's worker-count advice, etc.
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning")  # Lightning 2.6 on torch 2.13
@pytest.mark.parametrize("page", sorted(PAGES))
def test_snippet_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec(PAGES[page]) is None:
        pytest.skip(f"{PAGES[page]} is not installed")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    exec(compile(first_python_block(DOCS / page), str(DOCS / page), "exec"), namespace)
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir())  # the snippet wrote snapshots
