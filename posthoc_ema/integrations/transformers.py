"""Post-hoc EMA as a Hugging Face ``TrainerCallback``: ``PostHocEMACallback``.

The events it uses (transformers, src/transformers/trainer_callback.py and the
training loop in trainer.py):

- ``on_train_begin``: builds the tracker on the model the Trainer trains (after
  ``accelerator.prepare``, so on its device), and on a resumed run
  (``state.global_step > 0``) loads the tracker state saved in the checkpoint
  folder being resumed.
- ``on_step_end``: fires once per optimizer step, after
  ``state.global_step += 1`` (the accumulation substeps fire ``on_substep_end``
  instead), so ``gradient_accumulation_steps=k`` gives one update per k
  batches. The tracker's step is ``state.global_step``.
- Evaluation: there is no event before ``evaluate()``. The Trainer decides to
  evaluate in ``on_step_end`` / ``on_epoch_end`` (``DefaultFlowCallback``, which
  runs before user callbacks, sets ``control.should_evaluate``) and evaluates
  right after them; ``on_evaluate`` fires when evaluation is done. So the
  callback swaps the EMA in at the end of ``on_step_end`` / ``on_epoch_end``
  when ``control.should_evaluate`` is set, and restores the raw weights in
  ``on_evaluate`` (before the checkpoint of that step is saved). For a
  ``trainer.evaluate()`` of your own, wrap it: ``with callback.swapped(trainer.model): trainer.evaluate()``.
- ``on_save``: fires after ``checkpoint-N`` is written; the tracker state goes
  into ``checkpoint-N/posthoc_ema.pt`` (process zero writes it).

The callback is not an ``ExportableState``: the Trainer would rebuild such
callbacks from JSON on resume, which cannot hold the EMA tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from posthoc_ema.files import atomic_path
from posthoc_ema.integrations._common import TrackerCallback

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError(
        "posthoc_ema.integrations.transformers needs transformers: pip install 'posthoc-ema[transformers]'"
    ) from None

__all__ = ["STATE_NAME", "PostHocEMACallback"]

#: The file in each ``checkpoint-N`` folder that holds the tracker's state.
STATE_NAME = "posthoc_ema.pt"


class PostHocEMACallback(TrackerCallback, TrainerCallback):  # type: ignore[misc,unused-ignore]  # Any when transformers is missing
    """Post-hoc EMA for a Hugging Face ``Trainer``.

    Tracks power-function EMAs of the model with :class:`~posthoc_ema.PostHocEMA`
    and writes their snapshots; the EMA of ``evaluate_with`` is what the
    Trainer's evaluations during training see. Its state is saved in every
    checkpoint folder and restored by ``trainer.train(resume_from_checkpoint=...)``.

    Args:
        sigma_rels: the tracked widths.
        snapshot_dir: folder for the snapshots; ``None`` tracks without writing.
        snapshot_every: write snapshots every this many optimizer steps.
        evaluate_with: the tracked sigma_rel swapped in for evaluations during
            training; ``None`` evaluates the raw weights.
        **tracker_options: passed on to :class:`~posthoc_ema.PostHocEMA`.

    Raises:
        ValueError: if ``evaluate_with`` is not one of ``sigma_rels`` or is given
            with ``rank0_only=True``; at the start of a resumed run, if the
            checkpoint holds no tracker state.

    Example:
        >>> ema = PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_dir="ckpts")  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[ema])  # doctest: +SKIP
    """

    resume_from: Path | None = None  # set by load(): the checkpoint folder of the next train()

    def load(self, checkpoint_dir: str | os.PathLike[str]) -> None:
        """Resume the tracker from ``checkpoint_dir`` at the next ``train()``, for a
        checkpoint outside ``args.output_dir`` (by default the callback reads
        ``args.output_dir/checkpoint-<global_step>``)."""
        self.resume_from = Path(checkpoint_dir)

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The EMA of ``evaluate_with`` in ``model`` for the block, e.g. around ``trainer.evaluate()``."""
        if self.emas is None or self.evaluate_with is None:
            raise ValueError("nothing to swap in: the callback has no tracker yet, or evaluate_with is None")
        with self.emas.swapped(model, self.evaluate_with):
            yield model

    # -- training -----------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.emas is not None:
            self.emas.close()
        self.emas = self._new_tracker(model)
        if state.global_step > 0:  # resumed: _init_training_state restored the global step
            folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path = folder / STATE_NAME
            if not path.is_file():
                raise ValueError(
                    f"resuming at step {state.global_step} but {path} does not exist; for a checkpoint outside "
                    "args.output_dir call callback.load(checkpoint_dir) before trainer.train()"
                )
            self.emas.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.resume_from = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.emas is None:
            return
        if state.global_step > self.emas.step:
            self.emas.update(step=state.global_step)
        if control.should_evaluate:
            self._swap_in(model)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if control.should_evaluate:
            self._swap_in(model)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._swap_out()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._swap_out()
        if self.emas is not None:
            self.emas.close()  # the end of training is snapshotted, the writer and lock released

    def _swap_in(self, model: Any) -> None:
        if self.emas is not None:
            self._swap_into(self.emas, model)

    # -- checkpoints ----------------------------------------------------------------

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.emas is None:
            return
        self.emas.flush()  # a checkpoint implies its snapshots are on disk
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            with atomic_path(folder / STATE_NAME) as tmp:
                torch.save(self.emas.state_dict(), tmp)
