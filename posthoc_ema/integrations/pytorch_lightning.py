"""Post-hoc EMA as a callback of the ``pytorch_lightning`` package (see :mod:`posthoc_ema.integrations.lightning`).

Example:
    >>> from posthoc_ema.integrations.pytorch_lightning import PostHocEMACallback  # doctest: +SKIP
    >>> trainer = pytorch_lightning.Trainer(callbacks=[PostHocEMACallback(snapshot_dir="ckpts")])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from posthoc_ema.integrations._lightning import define_callback

try:
    from pytorch_lightning import Callback, strategies
except ImportError:
    raise ImportError(
        "posthoc_ema.integrations.pytorch_lightning needs pytorch_lightning: pip install pytorch-lightning"
    ) from None

__all__ = ["PostHocEMACallback"]

PostHocEMACallback: Any = define_callback(Callback, strategies, "pytorch_lightning")
