"""The Lightning callback, written once for both package names (``lightning`` and ``pytorch_lightning``).

Follows the hooks and checkpoint state of Lightning's own ``WeightAveraging``
callback (Lightning-AI/pytorch-lightning, src/lightning/pytorch/callbacks/weight_averaging.py):
update in ``on_train_batch_end`` only when ``trainer.global_step`` advanced (so
gradient accumulation counts optimizer steps), swap the average in for
validation and back, and keep the averaging state in the callback's
``state_dict``, which Lightning stores in its checkpoints under ``"callbacks"``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

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


def define_callback(callback_base: type[Any], strategies: Any, package: str) -> type[Any]:
    """The ``PostHocEMACallback`` class on the ``Callback`` base of one Lightning package."""

    class PostHocEMACallback(callback_base):  # type: ignore[misc,unused-ignore]
        __doc__ = f"""Post-hoc EMA for a Lightning ``Trainer`` ({package}).

        Tracks power-function EMAs of the LightningModule with
        :class:`~posthoc_ema.PostHocEMA` and writes their snapshots, so the EMA of
        any width can be synthesized after training.

        - Updates once per optimizer step: ``on_train_batch_end`` updates only when
          ``trainer.global_step`` advanced, so with ``accumulate_grad_batches=k``
          the EMA sees one update per k batches. The tracker's step is
          ``trainer.global_step``.
        - Swaps the EMA of ``evaluate_with`` into the module for validation and
          test, and restores the raw weights bit for bit afterwards.
        - Its state (the tracker's ``state_dict``) goes into Lightning checkpoints,
          so ``trainer.fit(..., ckpt_path=...)`` resumes the EMAs exactly. Saving
          a checkpoint first flushes the snapshots written so far.
        - Under DDP every rank updates its replica; only rank 0 writes snapshots.
          Sharded strategies (FSDP, DeepSpeed, model parallel) are refused: the
          tracker would see one rank's shards only.

        Args:
            sigma_rels: the tracked widths.
            snapshot_dir: folder for the snapshots; ``None`` tracks without writing.
            snapshot_every: write snapshots every this many optimizer steps.
            evaluate_with: the tracked sigma_rel swapped in for validation and
                test; ``None`` evaluates the raw weights.
            **tracker_options: passed on to :class:`~posthoc_ema.PostHocEMA`
                (``update_every``, ``device``, ``snapshot_dtype``, ``trainable_only``, ``exclude``).

        Raises:
            ValueError: if ``evaluate_with`` is not one of ``sigma_rels`` or is
                given with ``rank0_only=True``, and (at fit start) for a sharded strategy.

        Example:
            >>> ema = PostHocEMACallback(sigma_rels=(0.05, 0.10), snapshot_dir="ckpts")  # doctest: +SKIP
            >>> trainer = Trainer(callbacks=[ema])  # doctest: +SKIP
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
            self._pending: dict[str, Any] | None = None
            self._swap: contextlib.ExitStack | None = None

        @property
        def state_key(self) -> str:
            return self._generate_state_key(sigma_rels=repr(self.sigma_rels))  # type: ignore[no-any-return]

        # -- building the tracker ----------------------------------------------

        def _ensure(self, pl_module: Any) -> PostHocEMA:
            if self.emas is None:
                self.emas = PostHocEMA(
                    pl_module,
                    self.sigma_rels,
                    snapshot_dir=self.snapshot_dir,
                    snapshot_every=self.snapshot_every,
                    **self.tracker_options,
                )
            if self._pending is not None:
                self.emas.load_state_dict(self._pending)
                self._pending = None
            return self.emas

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            # After strategy.setup: the module is on its device (the tracker holds its
            # tensors, as an optimizer does). A state restored before this point waits in _pending.
            sharded = tuple(
                getattr(strategies, name)
                for name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
                if hasattr(strategies, name)
            )
            if isinstance(trainer.strategy, sharded):
                raise ValueError(
                    f"PostHocEMACallback does not support {type(trainer.strategy).__name__} yet: the model is "
                    "sharded and the tracker would average one rank's shards; use DDP"
                )
            self._ensure(pl_module)

        # -- training ------------------------------------------------------------

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            emas = self._ensure(pl_module)
            # global_step counts optimizer steps: it stays put on the batches an accumulation skips.
            if trainer.global_step > emas.step:
                emas.update(step=trainer.global_step)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.emas is not None:
                self.emas.close()  # the end of training is snapshotted, the writer and lock released

        # -- evaluation ---------------------------------------------------------------

        def _swap_in(self, pl_module: Any) -> None:
            if self.evaluate_with is None or self._swap is not None:
                return
            if self.emas is None and self._pending is None:
                return  # validate()/test() without a fit and without a checkpoint to restore
            emas = self._ensure(pl_module)
            if emas.step == 0:
                return  # the sanity check before the first step: there is no average yet
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(emas.swapped(pl_module, self.evaluate_with))

        def _swap_out(self) -> None:
            if self._swap is not None:
                swap, self._swap = self._swap, None
                swap.close()

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self._swap_in(pl_module)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self._swap_out()

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:
            self._swap_in(pl_module)

        def on_test_end(self, trainer: Any, pl_module: Any) -> None:
            self._swap_out()

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            self._swap_out()

        # -- checkpoints ------------------------------------------------------------------

        def state_dict(self) -> dict[str, Any]:
            if self.emas is None:
                return dict(self._pending or {})
            self.emas.flush()  # a checkpoint implies its snapshots are on disk
            return self.emas.state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            if self.emas is not None:
                self.emas.load_state_dict(state_dict)
            else:
                self._pending = dict(state_dict)

    return PostHocEMACallback
