"""The Lightning callback against the real Trainer on CPU: steps, equality with a plain tracker, swaps, exact resume."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from posthoc_ema import PostHocEMA  # noqa: E402
from posthoc_ema.integrations.lightning import PostHocEMACallback  # noqa: E402

# Lightning's advice about dataloader workers and missing loops is noise for these tiny runs.
pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    # Lightning 2.6 on torch 2.13 calls a deprecated torch.utils._pytree API.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning"),
]

ACCUMULATE = 2
BATCHES_PER_EPOCH = 8  # 4 optimizer steps per epoch


class Tiny(pl.LightningModule):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
        self.seen_in_validation: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in_validation.append({k: v.detach().clone() for k, v in self.state_dict().items()})

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES_PER_EPOCH * 4, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(len(x), 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)


class Recorder(pl.Callback):  # type: ignore[misc]
    """The module's weights after every optimizer step, and the EMA each validation saw."""

    def __init__(self, ema: Any) -> None:
        self.ema = ema
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.ema_at_validation: list[dict[str, torch.Tensor]] = []
        self.raw_after_validation: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step > len(self.after_step):
            self.after_step.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.ema.emas is not None and self.ema.emas.step > 0:
            self.ema_at_validation.append(self.ema.emas.ema_state_dict(0.10))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.ema.emas is not None and self.ema.emas.step > 0:
            self.raw_after_validation.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _trainer(callbacks: list[Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "accumulate_grad_batches": ACCUMULATE,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _replay(states: list[dict[str, torch.Tensor]], **options: Any) -> PostHocEMA:
    model = Tiny()
    plain = PostHocEMA(model, (0.05, 0.10), **options)
    for step, state in enumerate(states, start=1):
        model.load_state_dict(state)
        plain.update(step=step)
    plain.close()
    return plain


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_update_per_optimizer_step_equal_to_a_plain_tracker(tmp_path: Path) -> None:
    ema = PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_dir=tmp_path / "snaps", snapshot_every=2)
    recorder = Recorder(ema)
    module = Tiny()
    _trainer([ema, recorder], max_epochs=2).fit(module, _loader())
    steps = 2 * BATCHES_PER_EPOCH // ACCUMULATE
    assert module.trainer.global_step == steps
    assert ema.emas.step == steps and len(recorder.after_step) == steps
    plain = _replay(recorder.after_step)
    for s in (0.05, 0.10):
        assert _equal(ema.emas.ema_state_dict(s), plain.ema_state_dict(s))
    names = sorted(p.name for p in (tmp_path / "snaps").glob("*.safetensors"))
    assert len(names) == 2 * steps // 2  # two sigma_rels every 2 steps
    sd = ema.emas.synthesize(0.08)
    Tiny().load_state_dict(sd, strict=True)


def test_validation_and_test_see_the_ema_and_the_raw_weights_come_back(tmp_path: Path) -> None:
    ema = PostHocEMACallback(sigma_rels=(0.05, 0.10), evaluate_with=0.10)
    recorder = Recorder(ema)
    module = Tiny()
    trainer = _trainer([ema, recorder], max_epochs=2, limit_val_batches=1)
    trainer.fit(module, _loader(), _loader())
    assert len(module.seen_in_validation) == 2 == len(recorder.ema_at_validation)
    for seen, expected in zip(module.seen_in_validation, recorder.ema_at_validation, strict=True):
        assert _equal(seen, {k: v.to(seen[k].dtype) for k, v in expected.items()})
    # After each validation the raw weights of that step are back, bit for bit.
    per_epoch = BATCHES_PER_EPOCH // ACCUMULATE
    for epoch, raw in enumerate(recorder.raw_after_validation, start=1):
        assert _equal(raw, recorder.after_step[epoch * per_epoch - 1])
    assert _equal(module.state_dict(), recorder.after_step[-1])
    assert not _equal(module.seen_in_validation[-1], recorder.after_step[-1])
    module.seen_in_validation.clear()
    trainer.test(module, _loader(), verbose=False)
    assert _equal(
        module.seen_in_validation[0],
        {k: v.to(module.seen_in_validation[0][k].dtype) for k, v in ema.emas.ema_state_dict(0.10).items()},
    )
    assert _equal(module.state_dict(), recorder.after_step[-1])


def test_resume_from_a_lightning_checkpoint_is_exact(tmp_path: Path, same_snapshots: Any) -> None:
    whole = PostHocEMACallback(snapshot_dir=tmp_path / "whole", snapshot_every=2)
    _trainer([whole], max_epochs=2).fit(Tiny(), _loader())

    first = PostHocEMACallback(snapshot_dir=tmp_path / "resumed", snapshot_every=2)
    trainer = _trainer([first], max_epochs=1)
    trainer.fit(Tiny(), _loader())
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    checkpoint = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)
    assert checkpoint["callbacks"][first.state_key]["step"] == BATCHES_PER_EPOCH // ACCUMULATE

    second = PostHocEMACallback(snapshot_dir=tmp_path / "resumed", snapshot_every=2)
    _trainer([second], max_epochs=2).fit(Tiny(), _loader(), ckpt_path=tmp_path / "epoch1.ckpt")
    assert second.emas.step == whole.emas.step
    for s in whole.emas.sigma_rels:
        assert _equal(second.emas.ema_state_dict(s), whole.emas.ema_state_dict(s))
    same_snapshots(tmp_path / "whole", tmp_path / "resumed")  # byte for byte, but for each run's id


def test_evaluate_with_must_be_tracked() -> None:
    with pytest.raises(ValueError, match=r"evaluate_with=0\.2 is not among sigma_rels \(0\.05, 0\.1\)"):
        PostHocEMACallback(sigma_rels=(0.05, 0.10), evaluate_with=0.2)


def test_evaluate_with_needs_the_ema_on_every_rank() -> None:
    with pytest.raises(ValueError, match=r"evaluate_with=0\.1 with rank0_only=True: the other ranks keep no EMA"):
        PostHocEMACallback(sigma_rels=(0.05, 0.10), rank0_only=True)
    PostHocEMACallback(sigma_rels=(0.05, 0.10), evaluate_with=None, rank0_only=True)


def test_pytorch_lightning_package_name(tmp_path: Path) -> None:
    ptl = pytest.importorskip("pytorch_lightning")
    from posthoc_ema.integrations.pytorch_lightning import PostHocEMACallback as Callback

    class Module(ptl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    ema = Callback(sigma_rels=0.10, snapshot_dir=tmp_path, snapshot_every=3)
    trainer = ptl.Trainer(
        accelerator="cpu",
        max_steps=3,
        callbacks=[ema],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), _loader())
    assert isinstance(ema, ptl.Callback) and ema.emas.step == 3
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


DDP_SCRIPT = """
import sys
import torch
import lightning.pytorch as pl
from posthoc_ema.integrations.lightning import PostHocEMACallback
from posthoc_ema.snapshots import list_snapshots


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    ema = PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_dir=sys.argv[1], snapshot_every=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, callbacks=[ema], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(), data)
    # Each rank's tracker has its own run id: the files of this rank's run are the ones it wrote.
    wrote = any(i.run_id == ema.emas.run_id for i in list_snapshots(sys.argv[1]))
    print(f"rank {trainer.global_rank} step {ema.emas.step} wrote {wrote}")
"""


@pytest.mark.slow
def test_under_ddp_every_rank_updates_and_rank_zero_writes(tmp_path: Path) -> None:
    import subprocess

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "snaps")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 step 4 wrote True",
        "rank 1 step 4 wrote False",
    ]
    names = sorted(p.name for p in (tmp_path / "snaps").glob("*.safetensors"))
    assert len(names) == 4 and all(n.endswith(".safetensors") for n in names)  # 2 sigma_rels x steps 2, 4; no .tmp left
