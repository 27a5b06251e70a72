"""PostHocEMA with Accelerate, through register_for_checkpointing: no integration module is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from posthoc_ema import PostHocEMA  # noqa: E402

ACCUMULATE = 2


def _setup(snapshot_dir: Path) -> tuple[Any, Any, Any, Any, PostHocEMA]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    emas = PostHocEMA(model, (0.05, 0.10), snapshot_dir=snapshot_dir, snapshot_every=2)
    accelerator.register_for_checkpointing(emas)
    return accelerator, model, optimizer, loader, emas


def _train(accelerator: Any, model: Any, optimizer: Any, batches: list[Any], emas: PostHocEMA) -> list[Any]:
    after_step = []
    for x, y in batches:
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:  # one update per optimizer step
            emas.update()
            after_step.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return after_step


def test_accumulation_equality_and_exact_resume_through_save_state(tmp_path: Path, same_snapshots: Any) -> None:
    accelerator, model, optimizer, loader, whole = _setup(tmp_path / "whole")
    batches = list(loader)
    after_step = _train(accelerator, model, optimizer, batches, whole)
    whole.close()
    assert whole.step == len(batches) // ACCUMULATE == len(after_step)

    plain_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    plain = PostHocEMA(plain_model, (0.05, 0.10))
    for state in after_step:
        plain_model.load_state_dict(state)
        plain.update()
    for s in (0.05, 0.10):
        sd = whole.ema_state_dict(s)
        assert all(torch.equal(sd[k], v) for k, v in plain.ema_state_dict(s).items())

    accelerator, model, optimizer, loader, first = _setup(tmp_path / "resumed")
    half = len(batches) // 2
    _train(accelerator, model, optimizer, batches[:half], first)
    accelerator.save_state(tmp_path / "state")
    first.close()

    accelerator, model, optimizer, loader, second = _setup(tmp_path / "resumed")
    accelerator.load_state(tmp_path / "state")
    assert second.step == half // ACCUMULATE
    _train(accelerator, model, optimizer, batches[half:], second)
    second.close()
    for s in (0.05, 0.10):
        a, b = whole.ema_state_dict(s), second.ema_state_dict(s)
        assert all(torch.equal(a[k], b[k]) for k in a)
    same_snapshots(tmp_path / "whole", tmp_path / "resumed")  # byte for byte, but for each run's id
    bare = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    bare.load_state_dict(second.synthesize(0.08), strict=True)
