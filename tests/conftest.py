"""Shared fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from posthoc_ema import PostHocEMA


@pytest.fixture
def make_tracker() -> Iterator[Callable[..., PostHocEMA]]:
    """``PostHocEMA(...)`` that is closed (its writer thread stopped) when the test ends."""
    trackers: list[PostHocEMA] = []

    def make(model: torch.nn.Module, *args: Any, **kwargs: Any) -> PostHocEMA:
        tracker = PostHocEMA(model, *args, **kwargs)
        trackers.append(tracker)
        return tracker

    yield make
    for tracker in trackers:
        # A test that makes writes fail on purpose checks the error itself, and one
        # that wants a final snapshot takes it: stop the writer and release the folder only.
        tracker.final_snapshot = False
        with contextlib.suppress(OSError):
            tracker.close()
