"""Post-hoc EMA as a Lightning callback: ``PostHocEMACallback``.

Uses the ``lightning`` package (``lightning.pytorch``), or ``pytorch_lightning``
when only that one is installed. A ``Trainer`` only accepts callbacks of its
own package: with ``import pytorch_lightning as pl`` while both are installed,
use :mod:`posthoc_ema.integrations.pytorch_lightning`.

Example:
    >>> from posthoc_ema.integrations.lightning import PostHocEMACallback  # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[PostHocEMACallback(snapshot_dir="ckpts")])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from posthoc_ema.integrations._lightning import define_callback

try:
    from lightning.pytorch import Callback, strategies
except ImportError:
    try:
        from pytorch_lightning import Callback, strategies  # type: ignore[assignment,no-redef]
    except ImportError:
        raise ImportError(
            "posthoc_ema.integrations.lightning needs Lightning: pip install 'posthoc-ema[lightning]'"
        ) from None

__all__ = ["PostHocEMACallback"]

PostHocEMACallback: Any = define_callback(Callback, strategies, "lightning.pytorch")
