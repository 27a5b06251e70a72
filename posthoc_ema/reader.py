"""The streaming pass of synthesis: every snapshot read once, in chunks, and multiplied into the sums.

:func:`weighted_sums` is what :func:`posthoc_ema.synthesis.run` does with a
plan's coefficients: the floating tensors of a snapshot are seen as one flat
vector (in file order); a chunk of every snapshot is read into a
``[n_snapshots, chunk]`` float32 buffer with plain positioned reads (no mmap,
so the page cache does not count as our memory), then multiplied into the
``[n_targets, chunk]`` columns of the sums while the buffer is still in cache.
On the CPU, :data:`_WORKERS` threads (one torch thread each) take whole
chunks, read then multiply, and first-touch the outputs they fill; on a GPU one
thread reads into pinned buffers while the previous chunk is copied on a
stream of its own and multiplied.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import io
import os
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from posthoc_ema.dtypes import FLOATING_DTYPES
from posthoc_ema.errors import SnapshotError
from posthoc_ema.snapshots import SnapshotInfo

__all__ = ["weighted_sums"]

# Bytes of float32 snapshot data gathered for one matrix product (each worker
# thread has such a buffer): small enough to stay in cache between the read and
# the product, with at least _MIN_READ elements per file so reads stay large.
_CHUNK_BYTES = 2 << 20
_MIN_READ = 16384
# Columns of one matrix product (a chunk is multiplied in such blocks).
_PRODUCT_COLUMNS = 4096
# Threads that read and multiply on the CPU, each taking whole chunks.
_WORKERS = 2
# Snapshot files open at once; more snapshots are streamed in several passes.
_MAX_OPEN = 256


def weighted_sums(
    snaps: Sequence[SnapshotInfo],
    coefficients: npt.NDArray[np.float64],
    keys: Sequence[str],
    starts: Sequence[int],
    *,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``coefficients.T @ X`` as a float32 ``[n_targets, starts[-1]]`` tensor on ``device``, X the snapshots.

    Row i of X is snapshot i's floating tensors ``keys`` as one flat vector
    (tensor k at ``[starts[k], starts[k+1])``), read from its file chunk by chunk.
    ``progress`` is called with (work done, total work).
    """
    dev, total = device, starts[-1]
    weights = torch.tensor(coefficients.T, dtype=torch.float32, device=dev)  # [n_out, n_in]
    # Not zeroed: the first batch overwrites (beta=0 ignores what is there), saving a pass over the outputs.
    sums = torch.empty(coefficients.shape[1], total, dtype=torch.float32, device=dev)
    work, done = total * len(snaps), 0
    for first in range(0, len(snaps), _MAX_OPEN):
        batch = snaps[first : first + _MAX_OPEN]
        chunk = max(_MIN_READ, _CHUNK_BYTES // (4 * len(batch)))
        bounds = [(e0, min(total, e0 + chunk)) for e0 in range(0, total, chunk)]
        if not bounds:  # no floating tensors at all
            break
        bases = [_flat_base(info, keys, starts) for info in batch]
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(_open_raw(info)) for info in batch]
            fill = functools.partial(_fill, files=files, infos=batch, bases=bases, keys=keys, starts=starts)
            product = functools.partial(
                _product, sums=sums, weights=weights[:, first : first + len(batch)], beta=1.0 if first else 0.0
            )
            shape = (len(batch), min(chunk, total))
            passing = _cpu_pass if dev.type == "cpu" else _device_pass
            # closing: on an error, the threads are stopped before the files close.
            chunks = stack.enter_context(
                contextlib.closing(passing(bounds, fill=fill, product=product, shape=shape, device=dev))
            )
            for e0, e1 in chunks:
                done += (e1 - e0) * len(batch)
                if progress is not None:
                    progress(done, work)
    return sums


# Fills a buffer with elements [e0, e1) of every snapshot of a batch, and returns those rows.
_Fill = Callable[[torch.Tensor, int, int], torch.Tensor]
# Adds rows (elements [e0, e1) of every snapshot) times the weights into the sums' columns [e0, e1).
_Product = Callable[[torch.Tensor, int, int], None]


def _product(x: torch.Tensor, e0: int, e1: int, *, sums: torch.Tensor, weights: torch.Tensor, beta: float) -> None:
    # In blocks of columns: on one thread, [8, 40] @ [40, 4096] products ran
    # 1.5x faster than [40, 16384] ones (the blocks of outputs stay in L2).
    for a in range(0, e1 - e0, _PRODUCT_COLUMNS):
        b = min(e1 - e0, a + _PRODUCT_COLUMNS)
        sums[:, e0 + a : e0 + b].addmm_(weights, x[:, a:b], beta=beta)


def _cpu_pass(
    bounds: Sequence[tuple[int, int]], *, fill: _Fill, product: _Product, shape: tuple[int, int], device: torch.device
) -> Generator[tuple[int, int], None, None]:
    """Read and multiply each chunk on one of :data:`_WORKERS` threads; yield the chunks in order as they are done."""
    # Without os.preadv a read moves the file's offset (seek + readinto), so
    # each file may be read by one thread only.
    workers = _WORKERS if getattr(os, "preadv", None) is not None else 1
    local = threading.local()  # each thread's buffer, reused from chunk to chunk

    def step(e0: int, e1: int) -> None:
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = torch.empty(shape, dtype=torch.float32)
        product(fill(buffer, e0, e1), e0, e1)

    default = torch.get_num_threads()
    init = functools.partial(_limit_to_one_thread, default)
    with ThreadPoolExecutor(workers, thread_name_prefix="posthoc-ema-synthesis", initializer=init) as pool:
        # A few chunks queued per thread, so that no thread waits for the next one;
        # they are consumed in order, so progress is monotonic.
        pending: collections.deque[tuple[Future[None], int, int]] = collections.deque()
        try:
            for e0, e1 in bounds:
                pending.append((pool.submit(step, e0, e1), e0, e1))
                if len(pending) > 2 * workers:
                    future, a, b = pending.popleft()
                    future.result()
                    yield a, b
            while pending:
                future, a, b = pending.popleft()
                future.result()
                yield a, b
        finally:
            for future, _, _ in pending:  # an error: leave the rest unread
                future.cancel()


def _device_pass(
    bounds: Sequence[tuple[int, int]], *, fill: _Fill, product: _Product, shape: tuple[int, int], device: torch.device
) -> Generator[tuple[int, int], None, None]:
    """Read each chunk on a reader thread while the previous one is copied to the device and multiplied there."""
    cuda = device.type == "cuda"
    # Pinned host buffers: their copies to a CUDA device are asynchronous, and
    # run on a stream of their own beside the products.
    hosts = [torch.empty(shape, dtype=torch.float32, pin_memory=cuda) for _ in range(2)]
    staged = [torch.empty(shape, dtype=torch.float32, device=device) for _ in range(2)]
    copy_stream = torch.cuda.Stream(device) if cuda else None  # type: ignore[no-untyped-call]
    copied: list[Any] = [None, None]  # CUDA events: host buffer i has been copied (may be refilled)
    used: list[Any] = [None, None]  # CUDA events: the product reading staged[i] is done (may be overwritten)
    with ThreadPoolExecutor(1, thread_name_prefix="posthoc-ema-reader") as reader:
        pending = reader.submit(fill, hosts[0], *bounds[0])
        for n, (e0, e1) in enumerate(bounds):
            i = n % 2
            rows = pending.result()
            x = staged[i][:, : e1 - e0]
            if copy_stream is None:
                x.copy_(rows)
            else:
                with torch.cuda.stream(copy_stream):
                    if used[i] is not None:
                        copy_stream.wait_event(used[i])
                    x.copy_(rows, non_blocking=True)
                    copied[i] = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    copied[i].record(copy_stream)
                torch.cuda.current_stream(device).wait_event(copied[i])
            if n + 1 < len(bounds):
                j = (n + 1) % 2
                if copied[j] is not None:
                    copied[j].synchronize()  # host buffer j's copy is done before the reader refills it
                pending = reader.submit(fill, hosts[j], *bounds[n + 1])
            product(x, e0, e1)
            if cuda:
                used[i] = torch.cuda.Event()  # type: ignore[no-untyped-call]
                used[i].record(torch.cuda.current_stream(device))
            yield e0, e1


def _fill(
    buffer: torch.Tensor,
    e0: int,
    e1: int,
    *,
    files: Sequence[io.FileIO],
    infos: Sequence[SnapshotInfo],
    bases: Sequence[int | None],
    keys: Sequence[str],
    starts: Sequence[int],
) -> torch.Tensor:
    """Rows of elements ``[e0, e1)`` of each snapshot's flat floating vector, in ``buffer``."""
    rows = buffer[:, : e1 - e0]
    raw = buffer.numpy().data.cast("B")  # the buffer's bytes: a row's slice is cheap
    row_bytes, size = 4 * buffer.shape[1], 4 * (e1 - e0)
    for i, (file, info, base) in enumerate(zip(files, infos, bases, strict=True)):
        if base is None:
            _read_flat(file, info, keys, starts, e0, e1, rows[i])
        else:
            _read_into(file, raw[i * row_bytes : i * row_bytes + size], base + 4 * e0, info=info, what="its data")
    return rows


def _flat_base(info: SnapshotInfo, keys: Sequence[str], starts: Sequence[int]) -> int | None:
    """Where the flat vector lies in the file, when it is float32 and stored back to back (as the tracker writes)."""
    base = info.offsets[keys[0]] if keys else 0
    for key, start in zip(keys, starts, strict=False):
        if info.tensors[key][0] != "F32" or info.offsets[key] != base + 4 * start:
            return None
    return base


def _limit_to_one_thread(default: int) -> None:
    """Give the calling thread one torch thread, and put the process default back to ``default``."""
    # The products are thin ([n_targets, n_snapshots] @ [n_snapshots, chunk])
    # and memory-bound: an intra-op thread pool would compete with the other
    # workers' reads. torch.set_num_threads sets the calling thread's OpenMP and
    # MKL counts, and the process default that threads take when they first use
    # torch. So each worker sets one thread, and the default is put back at once
    # from a fresh thread: the caller and every other thread keep their settings.
    # The lock keeps two workers from interleaving these steps.
    with _THREAD_SETTINGS:
        torch.get_num_threads()  # a thread's first torch call takes the process default: take it now
        torch.set_num_threads(1)
        restore = threading.Thread(target=torch.set_num_threads, args=(default,))
        restore.start()
        restore.join()


_THREAD_SETTINGS = threading.Lock()


# The class snapshot files are opened with: unbuffered, so that a read goes straight into our buffer.
_RawFile = io.FileIO


@contextlib.contextmanager
def _open_raw(info: SnapshotInfo) -> Iterator[io.FileIO]:
    try:
        file = _RawFile(info.path, "r")
    except OSError as err:
        raise SnapshotError(f"{info.path}: cannot open snapshot ({err.strerror})") from None
    with file:
        yield file


def _read_into(file: io.FileIO, buffer: memoryview, position: int, *, info: SnapshotInfo, what: str) -> None:
    """Fill ``buffer`` (bytes) with the file's bytes from ``position`` on, in as many reads as it takes.

    A read may return fewer bytes than asked for without being at the end of
    the file (NFS, FUSE, a signal), so this reads until the buffer is full; a
    read of 0 bytes means the file ended early. ``os.preadv`` reads at a
    position without moving the file's offset; where it is missing (Windows)
    the file is positioned with ``seek`` and read with ``readinto``, which is
    the same bytes since each file is read by one thread only.
    """
    preadv = getattr(os, "preadv", None)  # looked up per read: tests take it away to force the other path
    size, done = buffer.nbytes, 0
    while done < size:
        rest = buffer[done:] if done else buffer
        try:
            if preadv is not None:
                got = preadv(file.fileno(), [rest], position + done)
            else:
                file.seek(position + done)
                got = file.readinto(rest) or 0
        except OSError as err:
            raise SnapshotError(f"{info.path}: cannot read {what} ({err.strerror})") from None
        if got <= 0:
            raise SnapshotError(f"{info.path}: file ended while reading {what}; it is truncated")
        done += got


def _read_flat(
    file: io.FileIO, info: SnapshotInfo, keys: Sequence[str], starts: Sequence[int], e0: int, e1: int, out: torch.Tensor
) -> None:
    """Read elements ``[e0, e1)`` of one snapshot's flat floating vector into ``out`` (float32)."""
    k = bisect.bisect_right(starts, e0) - 1
    while k < len(keys) and starts[k] < e1:
        lo, hi = max(e0, starts[k]), min(e1, starts[k + 1])
        st_dtype = info.tensors[keys[k]][0]
        torch_dtype = FLOATING_DTYPES[st_dtype]
        size = torch_dtype.itemsize
        position = info.offsets[keys[k]] + (lo - starts[k]) * size
        # Take in the following tensors stored right after this one in the same
        # dtype: with the layout the tracker writes, a whole chunk is one read.
        while (
            hi == starts[k + 1]
            and hi < e1
            and info.tensors[keys[k + 1]][0] == st_dtype
            and info.offsets[keys[k + 1]] == info.offsets[keys[k]] + (starts[k + 1] - starts[k]) * size
        ):
            k += 1
            hi = min(e1, starts[k + 1])
        dest = out[lo - e0 : hi - e0]
        target = dest if torch_dtype == torch.float32 else torch.empty(hi - lo, dtype=torch_dtype)
        _read_into(file, target.view(torch.uint8).numpy().data, position, info=info, what=repr(keys[k]))
        if target is not dest:
            dest.copy_(target)
        k += 1
