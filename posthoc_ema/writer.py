"""The background writer: snapshot files written on a thread, so training does not wait for the disk."""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from posthoc_ema.errors import SnapshotWriteError

__all__ = ["BackgroundWriter"]

log = logging.getLogger(__name__)


class BackgroundWriter:
    """Runs write jobs one at a time on a daemon thread.

    ``submit`` blocks when ``max_pending`` jobs wait, so a slow disk slows training
    down instead of filling memory. A failed job does not stop the later ones;
    failures are raised, naming the files and the first cause, by the next
    ``submit``/``check``/``flush``. Pending writes are finished at interpreter exit.
    """

    def __init__(self, max_pending: int = 2) -> None:
        self._jobs: queue.Queue[tuple[Path, Callable[[], None]] | None] = queue.Queue(max_pending)
        self._failed: list[tuple[Path, Exception]] = []
        self._thread = threading.Thread(target=self._run, name="posthoc-ema-writer", daemon=True)
        self._thread.start()
        _writers.add(self)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            path, write = job
            try:
                write()
            except Exception as err:  # kept and raised on the training thread
                self._failed.append((path, err))
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def check(self) -> None:
        """Raise the failures so far, once."""
        if self._failed:
            failed, self._failed = self._failed, []
            (path, cause), more = failed[0], len(failed) - 1
            also = f" (and {more} more: {', '.join(str(p) for p, _ in failed[1:4])}{'...' if more > 3 else ''})"
            raise SnapshotWriteError(f"could not write snapshot {path}: {cause}{also if more else ''}") from cause

    def submit(self, path: Path, write: Callable[[], None]) -> None:
        self.check()
        self._jobs.put((path, write))

    def flush(self) -> None:
        """Wait until every submitted write is on disk; raise if one failed."""
        self._jobs.join()
        self.check()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


@atexit.register
def _finish_pending_writes() -> None:
    for writer in list(_writers):
        try:
            writer.flush()
        except SnapshotWriteError as err:
            log.error("%s", err)
