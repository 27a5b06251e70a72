"""The Hugging Face Trainer callback against the real Trainer on CPU, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from posthoc_ema import PostHocEMA  # noqa: E402
from posthoc_ema.integrations.transformers import STATE_NAME, PostHocEMACallback  # noqa: E402

ACCUMULATE = 2
SAMPLES = 32  # batch 4, accumulation 2: 4 optimizer steps per epoch


class Tiny(torch.nn.Module):
    """A plain module the Trainer accepts: keyword inputs, a dict with the loss out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
        self.seen_in_eval: list[dict[str, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.training:
            self.seen_in_eval.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(SAMPLES, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(transformers.TrainerCallback):  # type: ignore[misc]
    """The weights after every optimizer step (placed before the EMA callback, which swaps at step end)."""

    def __init__(self, ema: PostHocEMACallback, stop_at: int | None = None) -> None:
        self.ema = ema
        self.stop_at = stop_at
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.ema_at_eval: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.after_step.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ema_at_eval.append(self.ema.emas.ema_state_dict(0.10))


def _trainer(tmp: Path, model: Tiny, callbacks: list[Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "output_dir": str(tmp / "out"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": ACCUMULATE,
        "max_steps": 8,
        "learning_rate": 0.01,
        "lr_scheduler_type": "constant",
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(kwargs)
    args = transformers.TrainingArguments(**options)
    return transformers.Trainer(model=model, args=args, train_dataset=Data(), eval_dataset=Data(), callbacks=callbacks)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def test_one_update_per_optimizer_step_equal_to_a_plain_tracker(tmp_path: Path) -> None:
    ema = PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_dir=tmp_path / "snaps", snapshot_every=2)
    recorder = Recorder(ema)
    trainer = _trainer(tmp_path, Tiny(), [recorder, ema])
    trainer.train()
    assert trainer.state.global_step == 8 == ema.emas.step == len(recorder.after_step)
    model = Tiny()
    plain = PostHocEMA(model, (0.05, 0.10))
    for step, state in enumerate(recorder.after_step, start=1):
        model.load_state_dict(state)
        plain.update(step=step)
    for s in (0.05, 0.10):
        assert _equal(ema.emas.ema_state_dict(s), plain.ema_state_dict(s))
    assert len(list((tmp_path / "snaps").glob("*.safetensors"))) == 8
    Tiny().load_state_dict(ema.emas.synthesize(0.08), strict=True)


def test_evaluation_sees_the_ema_and_the_raw_weights_come_back(tmp_path: Path) -> None:
    ema = PostHocEMACallback(sigma_rels=(0.05, 0.10), evaluate_with=0.10)
    recorder = Recorder(ema)
    model = Tiny()
    trainer = _trainer(tmp_path, model, [recorder, ema], eval_strategy="steps", eval_steps=4)
    trainer.train()
    assert len(recorder.ema_at_eval) == 2 and len(model.seen_in_eval) == 2 * SAMPLES // 8
    per_eval = len(model.seen_in_eval) // 2
    for n, expected in enumerate(recorder.ema_at_eval):
        for seen in model.seen_in_eval[n * per_eval : (n + 1) * per_eval]:
            assert _equal(seen, expected)
    assert not _equal(model.seen_in_eval[-1], recorder.after_step[-1])
    assert _equal(model.state_dict(), recorder.after_step[-1])  # raw weights back, bit for bit
    model.seen_in_eval.clear()
    with ema.swapped(trainer.model):
        trainer.evaluate()
    assert _equal(model.seen_in_eval[0], ema.emas.ema_state_dict(0.10))
    assert _equal(model.state_dict(), recorder.after_step[-1])


def test_resume_from_checkpoint_is_exact(tmp_path: Path, same_snapshots: Any) -> None:
    saving = {"save_strategy": "steps", "save_steps": 4}
    whole = PostHocEMACallback(snapshot_dir=tmp_path / "whole", snapshot_every=2)
    _trainer(tmp_path / "a", Tiny(), [whole], **saving).train()

    first = PostHocEMACallback(snapshot_dir=tmp_path / "resumed", snapshot_every=2)
    _trainer(tmp_path / "b", Tiny(), [Recorder(first, stop_at=4), first], **saving).train()
    assert (tmp_path / "b" / "out" / "checkpoint-4" / STATE_NAME).is_file()
    second = PostHocEMACallback(snapshot_dir=tmp_path / "resumed", snapshot_every=2)
    trainer = _trainer(tmp_path / "b", Tiny(), [second], **saving)
    trainer.train(resume_from_checkpoint=True)
    assert second.emas.step == whole.emas.step == 8
    for s in whole.emas.sigma_rels:
        assert _equal(second.emas.ema_state_dict(s), whole.emas.ema_state_dict(s))
    same_snapshots(tmp_path / "whole", tmp_path / "resumed")  # byte for byte, but for each run's id


def test_resume_without_the_tracker_state_is_an_error(tmp_path: Path) -> None:
    saving = {"save_strategy": "steps", "save_steps": 4, "max_steps": 4}
    _trainer(tmp_path, Tiny(), [], **saving).train()
    ema = PostHocEMACallback()
    with pytest.raises(ValueError, match=r"resuming at step 4 but .*checkpoint-4/posthoc_ema\.pt does not exist"):
        _trainer(tmp_path, Tiny(), [ema], **saving | {"max_steps": 8}).train(resume_from_checkpoint=True)


def test_evaluate_with_needs_the_ema_on_every_rank() -> None:
    with pytest.raises(ValueError, match=r"evaluate_with=0\.1 with rank0_only=True: the other ranks keep no EMA"):
        PostHocEMACallback(sigma_rels=(0.05, 0.10), rank0_only=True)
