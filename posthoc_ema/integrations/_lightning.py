"""The Lightning callback, written once for both package names (``lightning`` and ``pytorch_lightning``).

Follows the hooks and checkpoint state of Lightning's own ``WeightAveraging``
callback (Lightning-AI/pytorch-lightning, src/lightning/pytorch/callbacks/weight_averaging.py):
update in ``on_train_batch_end`` only when ``trainer.global_step`` advanced (so
gradient accumulation counts optimizer steps), swap the average in for
validation and back, and keep the averaging state in the callback's
``state_dict``, which Lightning stores in its checkpoints under ``"callbacks"``.
"""

from __future__ import annotations

from typing import Any

from posthoc_ema.integrations._common import TrackerCallback
from posthoc_ema.tracker import PostHocEMA


def define_callback(callback_base: type[Any], strategies: Any, package: str) -> type[Any]:
    """The ``PostHocEMACallback`` class on the ``Callback`` base of one Lightning package."""

    class PostHocEMACallback(TrackerCallback, callback_base):  # type: ignore[misc,unused-ignore]
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

        _pending: dict[str, Any] | None = None  # a checkpoint's state, restored before the tracker exists

        @property
        def state_key(self) -> str:
            return self._generate_state_key(sigma_rels=repr(self.sigma_rels))  # type: ignore[no-any-return]

        # -- building the tracker ----------------------------------------------

        def _ensure(self, pl_module: Any) -> PostHocEMA:
            if self.emas is None:
                self.emas = self._new_tracker(pl_module)
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
            self._swap_into(self._ensure(pl_module), pl_module)  # not at the sanity check before the first step

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
