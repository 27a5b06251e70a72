"""The background writer, so training does not wait for the disk, and the lock that keeps one writer per folder.

Write jobs run one at a time on a :class:`concurrent.futures.ThreadPoolExecutor`
thread; each job's outcome, an exception included (also a ``BaseException``
such as ``KeyboardInterrupt``), travels back in its future. Futures are only
looked at from the thread that submits, so no state is shared with the writer
thread except through them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, ClassVar

from posthoc_ema.errors import SnapshotError, SnapshotWriteError

__all__ = ["BackgroundWriter", "FolderLock"]

log = logging.getLogger(__name__)

#: Name of the writer threads (the executor appends ``_0``).
THREAD_NAME = "posthoc-ema-writer"


class BackgroundWriter:
    """Runs write jobs one at a time on a thread of its own.

    ``submit`` blocks while ``max_pending`` jobs wait behind the one being
    written, so a slow disk slows training down instead of filling memory. A
    failed job does not stop the later ones. Failures are raised, naming every
    failed file and the first cause, by the next :meth:`check` or :meth:`flush`;
    ``submit`` never raises them, so a job it accepted is always either written
    or named in such an error (``submit`` itself raises only once the writer can
    run no more jobs). Pending writes are finished at interpreter exit.

    Use it from one thread (the training loop's).
    """

    def __init__(self, max_pending: int = 2) -> None:
        self._max_pending = max_pending
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
        # (path, future) in submission order; one thread writes, so they complete in this order.
        self._futures: collections.deque[tuple[Path, concurrent.futures.Future[None]]] = collections.deque()
        self._failed: list[tuple[Path, BaseException]] = []

    def _reap(self) -> None:
        futures = self._futures
        while futures and futures[0][1].done():
            path, future = futures.popleft()
            cause = future.exception()
            if cause is not None:
                self._failed.append((path, cause))

    def check(self) -> None:
        """Raise the failures of the writes done so far, once (cheap when none is done).

        Raises:
            SnapshotWriteError: naming the failed files (all of them in its
                ``paths``) and the first cause, chained.
        """
        if self._futures and self._futures[0][1].done():
            self._reap()
        if self._failed:
            failed, self._failed = self._failed, []
            raise write_error(failed)

    def submit(self, path: Path, write: Callable[[], None]) -> concurrent.futures.Future[None]:
        """Queue ``write``, the job that writes ``path``; wait first while ``max_pending`` jobs wait.

        Returns:
            The job's future; its failure is also raised by a later :meth:`check` or :meth:`flush`.

        Raises:
            SnapshotWriteError: only when the writer can run no more jobs (it was
                stopped, or the interpreter is shutting down): ``path`` is not written.
        """
        self._reap()
        while len(self._futures) > self._max_pending:
            concurrent.futures.wait([self._futures[0][1]])
            self._reap()
        try:
            future = self._executor.submit(write)
        except RuntimeError as err:  # "cannot schedule new futures after (interpreter) shutdown"
            raise write_error([(path, err)]) from None
        self._futures.append((path, future))
        return future

    def wait(self) -> list[tuple[Path, BaseException]]:
        """Wait until every submitted write is done; return the failures not raised yet, and forget them."""
        concurrent.futures.wait([future for _, future in self._futures])
        self._reap()
        failed, self._failed = self._failed, []
        return failed

    def flush(self) -> None:
        """Wait until every submitted write is done; raise if one failed.

        Raises:
            SnapshotWriteError: as :meth:`check`.
        """
        failed = self.wait()
        if failed:
            raise write_error(failed)

    def stop(self) -> None:
        """Stop the thread once the submitted writes are done, without raising their failures."""
        # Never join the thread from itself (a finalizer may run anywhere).
        self._executor.shutdown(wait=not threading.current_thread().name.startswith(THREAD_NAME))

    def close(self) -> None:
        """Finish the submitted writes and stop the thread; raise if one failed (the thread is stopped anyway).

        Raises:
            SnapshotWriteError: as :meth:`check`.
        """
        try:
            self.flush()
        finally:
            self.stop()


def write_error(failed: list[tuple[Path, BaseException]]) -> SnapshotWriteError:
    """One error naming every failed file (``paths``), with the first cause chained."""
    (path, cause), more = failed[0], len(failed) - 1
    listed = ", ".join(str(p) for p, _ in failed[1:4]) + ("..." if more > 3 else "")
    error = SnapshotWriteError(
        f"could not write snapshot {path}: {cause or repr(cause)}" + (f" (and {more} more: {listed})" if more else "")
    )
    error.paths = tuple(p for p, _ in failed)
    error.__cause__ = cause
    return error


class FolderLock:
    """An OS lock on ``<folder>/<name>``, held while a tracker writes snapshots there.

    Another holder, a tracker in this process or in another one, makes
    :meth:`acquire` fail at once. On Linux and macOS it is ``fcntl.flock``; on
    Windows ``msvcrt.locking`` of the file's first byte. Both are released by the
    operating system when the process dies, so a crash never leaves the folder
    locked; the lock file itself stays (removing it would race with a new holder).
    Locks on network file systems are as good as the file system's own (NFS
    emulates ``flock`` with byte-range locks), so a registry of the locks held by
    this process backs them up.

    Args:
        folder: the snapshot folder.
        name: the lock file's name in it.
    """

    _held: ClassVar[set[tuple[int, int]]] = set()  # (device, inode) of the lock files this process holds
    _held_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, folder: Path, name: str) -> None:
        self.path = folder / name
        self._file: IO[bytes] | None = None
        self._key = (0, 0)

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            SnapshotError: if another writer holds it, naming the folder.
        """
        if self._file is not None:
            return
        f = open(self.path, "a+b")  # noqa: SIM115 (held open for as long as the lock)
        try:
            stat = os.fstat(f.fileno())
            key = (stat.st_dev, stat.st_ino)
            with FolderLock._held_lock:
                if key in FolderLock._held or not _try_lock(f):
                    raise SnapshotError(
                        f"{self.path.parent} is in use by another PostHocEMA (it holds {self.path.name}): "
                        "give each tracker its own snapshot_dir, or a prefix= of its own"
                    )
                FolderLock._held.add(key)
        except BaseException:
            f.close()
            raise
        self._file, self._key = f, key

    def release(self) -> None:
        """Let the lock go (idempotent)."""
        f, self._file = self._file, None
        if f is None:
            return
        with FolderLock._held_lock:
            FolderLock._held.discard(self._key)
        try:
            _unlock(f)
        finally:
            f.close()


if sys.platform == "win32":
    import msvcrt

    def _try_lock(f: IO[bytes]) -> bool:
        f.seek(0)
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(f: IO[bytes]) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(f: IO[bytes]) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(f: IO[bytes]) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def release(writer: BackgroundWriter | None, lock: FolderLock | None) -> None:
    """Stop ``writer`` after its pending writes and release ``lock``; log failures (nobody is left to raise them to).

    What a dropped tracker's :func:`weakref.finalize` calls, also at interpreter exit.
    """
    try:
        if writer is not None:
            writer.close()
    except SnapshotWriteError as err:
        log.error("%s", err)
    finally:
        if lock is not None:
            lock.release()
