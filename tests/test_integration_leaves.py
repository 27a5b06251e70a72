"""Integrations are leaves: the core never imports a framework, and a missing framework is a clear ImportError."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def test_the_core_imports_no_framework() -> None:
    code = (
        "import sys, posthoc_ema, posthoc_ema.integrations, posthoc_ema.cli\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "hidden", "message"),
    [
        (
            "lightning",
            ("lightning", "lightning.pytorch", "pytorch_lightning"),
            r"pip install 'posthoc-ema\[lightning\]'",
        ),
        ("pytorch_lightning", ("pytorch_lightning",), r"needs pytorch_lightning: pip install pytorch-lightning"),
        ("transformers", ("transformers",), r"needs transformers: pip install 'posthoc-ema\[transformers\]'"),
    ],
)
def test_missing_framework_is_a_clear_import_error(
    module: str, hidden: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    monkeypatch.delitem(sys.modules, f"posthoc_ema.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=message):
        __import__(f"posthoc_ema.integrations.{module}")
