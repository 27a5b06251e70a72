"""What the Lightning and Hugging Face callbacks share: their options, the tracker they build, the swap."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from posthoc_ema import profiles
from posthoc_ema.tracker import PostHocEMA


def check_evaluate_with(
    sigma_rels: Sequence[float] | float, evaluate_with: float | None, tracker_options: Mapping[str, Any]
) -> None:
    """Raise ValueError unless ``evaluate_with`` is None, or a tracked sigma_rel (the identity rule) on every rank."""
    if evaluate_with is None:
        return
    if tracker_options.get("rank0_only"):
        raise ValueError(
            f"evaluate_with={evaluate_with!r} with rank0_only=True: the other ranks keep no EMA to swap in for "
            "evaluation; pass evaluate_with=None, or leave rank0_only off"
        )
    tracked = [
        profiles.canonical_sigma_rel(float(s))
        for s in ([sigma_rels] if isinstance(sigma_rels, (int, float)) else sigma_rels)
    ]
    if not any(profiles.same_sigma_rel(s, evaluate_with) for s in tracked):
        raise ValueError(
            f"evaluate_with={evaluate_with!r} is not among sigma_rels {tuple(tracked)}; "
            "pick a tracked one, or None to evaluate the raw weights"
        )


class TrackerCallback:
    """The base both callbacks add to their framework's callback class: options checked, tracker, swap.

    Args:
        sigma_rels, snapshot_dir, snapshot_every: as :class:`~posthoc_ema.PostHocEMA`'s.
        evaluate_with: the tracked sigma_rel swapped in for evaluation; None for the raw weights.
        **tracker_options: passed on to :class:`~posthoc_ema.PostHocEMA`.
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] | float = (0.05, 0.10),
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_every: int | None = 1000,
        evaluate_with: float | None = 0.10,
        **tracker_options: Any,
    ) -> None:
        super().__init__()
        check_evaluate_with(sigma_rels, evaluate_with, tracker_options)
        self.sigma_rels = sigma_rels
        self.snapshot_dir = snapshot_dir
        self.snapshot_every = snapshot_every
        self.evaluate_with = evaluate_with
        self.tracker_options = tracker_options
        self.emas: PostHocEMA | None = None
        self._swap: contextlib.ExitStack | None = None

    def _new_tracker(self, model: torch.nn.Module) -> PostHocEMA:
        return PostHocEMA(
            model,
            self.sigma_rels,
            snapshot_dir=self.snapshot_dir,
            snapshot_every=self.snapshot_every,
            **self.tracker_options,
        )

    def _swap_into(self, emas: PostHocEMA, model: torch.nn.Module) -> None:
        """The EMA of ``evaluate_with`` into ``model`` until :meth:`_swap_out`; nothing before the first update."""
        if self.evaluate_with is None or self._swap is not None or emas.step == 0:
            return
        self._swap = contextlib.ExitStack()
        self._swap.enter_context(emas.swapped(model, self.evaluate_with))

    def _swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.close()
