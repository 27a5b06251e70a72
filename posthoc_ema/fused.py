"""One pass over the weights for all the EMAs of a group (``PostHocEMA(..., fused=True)``).

The plain update runs one ``torch._foreach_lerp_(emas, sources, weight)`` per EMA,
so each EMA reads the model's weights again from memory: k EMAs cost 3k streams
(read the source, read the EMA, write the EMA). :class:`BlockedLerp` cuts the
group's tensors into blocks of about :data:`BLOCK_BYTES` of source and runs the k
lerps of a block back to back, while that block is still in cache: the weights
come from memory once, 1 + 2k streams in all. It needs no compiler.

Every element goes through the same ``lerp`` as in the plain update, with the
same weight, so the results are bit for bit the same. PyTorch's CPU kernel
(``aten/src/ATen/native/cpu/LerpKernel.cpp`` and ``aten/src/ATen/native/Lerp.h``
in pytorch/pytorch) computes ``start + w * (end - start)`` for ``|w| < 0.5`` and
``end - (end - start) * (1 - w)`` otherwise, per element, in its vector body and
its scalar tail alike (on CUDA, per thread); a block boundary only changes which
elements share a vector register, or fall in a tail. Blocks start at multiples
of :data:`_ALIGN` elements inside a tensor all the same, so whole vectors stay
whole. ``tests/test_fused.py`` checks the equality with ``torch.equal``.

:class:`CompiledLerp` (``fused="compile"``) goes one step further: a kernel made
by ``torch.compile`` reads each element of the weights once and updates every
EMA from the register, chunk of :data:`CHUNK` tensors by chunk. Torch's CPU
kernel computes ``fma(w, end - start, start)`` for ``|w| < 0.5`` (``lerp_vec``
in ``LerpKernel.cpp``: ``vec::fmadd(coeff, end - start, base)``), so the traced
function is ``w * (source - ema) + ema``, compiled with floating-point
contraction on, so that the C++ compiler makes it the same fused multiply-add
(on CUDA, Triton contracts it by default). Whether it did is not taken on
trust: each kernel is checked against ``torch._foreach_lerp_`` with
``torch.equal`` on a probe before it is used, and anything that is not the
same bit for bit, or no compiler at all, falls back to :class:`BlockedLerp`
with one log line.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["BLOCK_BYTES", "CHUNK", "MIN_COMPILED", "BlockedLerp", "CompiledLerp", "block_bytes_for", "plan"]

log = logging.getLogger(__name__)

#: Bytes of source per block on CPU: the benchmark machine's L2 size. In three runs of benchmarks/fused_update.py
#: on a 20M-parameter model, 1 and 2 MiB were the fastest, 512 KiB a little and 256 KiB clearly slower; on a model
#: of 2,000 small tensors (which the L3 cache holds) 256 KiB was a few percent faster than 1 MiB.
BLOCK_BYTES = 1 << 20
_CUDA_BLOCK_BYTES = 8 << 20  # when the device does not say its L2 size
_ALIGN = 64  # elements: a multiple of every SIMD width, so slices start on whole vectors


def block_bytes_for(device: torch.device) -> int:
    """Bytes of source per block on ``device``: :data:`BLOCK_BYTES` on CPU, half the L2 cache of a GPU.

    A GPU's L2 is tens of MiB and each block costs one kernel launch per EMA, so
    its blocks are larger (this size is not measured: the benchmark machine has no GPU).
    """
    if device.type != "cuda":
        return BLOCK_BYTES
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return max(BLOCK_BYTES, int(l2) // 2) if l2 else _CUDA_BLOCK_BYTES


class BlockedLerp:
    """The lerps of every EMA of one group, block by block over flat views of its tensors.

    Built once from the group's lists (the views are prepared here, not at each
    update); :meth:`matches` tells whether the group still holds those lists.

    Args:
        sources: the tensors the EMAs move towards (the model's, or their staging copies).
        emas: one list per EMA, parallel to ``sources``, of the same shapes.
        block_bytes: bytes of source per block; default :func:`block_bytes_for` the sources' device.

    Example:
        >>> sources = [torch.ones(1000), torch.ones(10)]
        >>> emas = [[torch.zeros(1000), torch.zeros(10)] for _ in range(2)]
        >>> lerps = BlockedLerp(sources, emas, block_bytes=1024)  # 256 floats per block
        >>> lerps.n_blocks
        4
        >>> lerps([0.25, 0.5])  # as torch._foreach_lerp_(emas[0], sources, 0.25), then 0.5 for emas[1]
        >>> emas[0][1][0].item(), emas[1][0][-1].item()
        (0.25, 0.5)
    """

    def __init__(
        self, sources: list[torch.Tensor], emas: list[list[torch.Tensor]], *, block_bytes: int | None = None
    ) -> None:
        if block_bytes is None:
            block_bytes = block_bytes_for(sources[0].device) if sources else BLOCK_BYTES
        self._sources = sources
        self._emas = emas
        self._pointers = list(map(torch.Tensor.data_ptr, sources))
        self._blocks: list[tuple[list[torch.Tensor], list[list[torch.Tensor]]]] = []
        block: list[torch.Tensor] = []
        block_emas: list[list[torch.Tensor]] = [[] for _ in emas]
        size = 0  # elements in the open block

        def add(source: torch.Tensor, targets: list[torch.Tensor], limit: int) -> None:
            nonlocal block, block_emas, size
            block.append(source)
            for into, target in zip(block_emas, targets, strict=True):
                into.append(target)
            size += source.numel()
            if size >= limit:
                self._blocks.append((block, block_emas))
                block, block_emas, size = [], [[] for _ in emas], 0

        for i, source in enumerate(sources):
            # Detached: a view of a parameter that requires grad costs each lerp the autograd checks (15% on
            # a model of 2,000 small tensors); a detached tensor shares its storage and version counter.
            source, targets = source.detach(), [ema[i].detach() for ema in emas]
            limit = max(_ALIGN, block_bytes // source.element_size() // _ALIGN * _ALIGN)
            if not (source.is_contiguous() and all(t.is_contiguous() for t in targets)):
                add(source, targets, limit)  # a strided tensor (channels_last, a transposed view) goes whole
                continue
            flat, flat_targets = source.view(-1), [t.view(-1) for t in targets]
            start, n = 0, flat.numel()
            while start < n:
                stop = min(n, start + -(-(limit - size) // _ALIGN) * _ALIGN)  # the room left, in whole vectors
                add(flat[start:stop], [t[start:stop] for t in flat_targets], limit)
                start = stop
        if block:
            self._blocks.append((block, block_emas))

    @property
    def n_blocks(self) -> int:
        """How many blocks the group's tensors are cut into."""
        return len(self._blocks)

    def matches(self, sources: list[torch.Tensor], emas: list[list[torch.Tensor]]) -> bool:
        """Whether these are the lists this was built from, their tensors' data where it was.

        A rebound list needs new views, and so does a tensor whose data was
        replaced in place (``p.data = ...``), which the plain update follows:
        one ``data_ptr()`` per source, a few percent of an update of small tensors.
        """
        return (
            sources is self._sources
            and emas is self._emas
            and list(map(torch.Tensor.data_ptr, sources)) == self._pointers
        )

    def __call__(self, weights: Sequence[float]) -> None:
        """``ema = lerp(ema, source, weight)`` for each EMA and its weight, one block at a time."""
        for sources, emas in self._blocks:
            for targets, weight in zip(emas, weights, strict=True):
                torch._foreach_lerp_(targets, sources, weight)


#: Tensors per call of a compiled kernel. A call costs about 5 us per tensor it is
#: given (``torch.compile``'s guards and wrappers) whatever the chunk, while the
#: compile time grows with it: 8 tensors compile in about 15 s on one core.
CHUNK = 8
#: Tensors with fewer elements (and strided ones, and any with a storage offset)
#: go through :class:`BlockedLerp`: for them the cost of a call outweighs the gain.
MIN_COMPILED = 1 << 16
# A 0-dim float32 weight times a bfloat16 tensor is bfloat16, where torch's lerp computes in float32: blocked.
_COMPILED_DTYPES = (torch.float32, torch.float64)
_PROBE_SIZES = tuple(MIN_COMPILED + 4099 * i + 37 for i in range(CHUNK))  # distinct, >= 2, not whole vectors
_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "cpp.enable_floating_point_contract_flag": "fast",
    "size_asserts": False,
}

Kernel = Callable[[list[torch.Tensor], list[list[torch.Tensor]], torch.Tensor], None]
_kernels: dict[tuple[int, torch.dtype, str], Kernel | None] = {}  # None: tried, and it could not be used
_unavailable: list[str] = []  # why torch.compile failed, once: then it is not tried again in this process


def _lerps(sources: list[torch.Tensor], emas: list[list[torch.Tensor]], weights: torch.Tensor) -> None:
    """What a compiled kernel computes: ``ema += w * (source - ema)`` for each EMA of each tensor, w < 0.5."""
    for i, source in enumerate(sources):
        for j, targets in enumerate(emas):
            ema = targets[i]
            ema.copy_(weights[j] * (source - ema) + ema)


def _compile(fn: Kernel) -> Kernel:
    """``torch.compile`` of a fresh copy of ``fn``, with the shapes symbolic (one kernel for every chunk).

    Dynamo keys its cache, and its limit on recompiles, on the code object:
    a copy per kernel keeps one dtype's kernel from counting against another's.
    """
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
    return torch.compile(fresh, fullgraph=True, dynamic=True, options=_OPTIONS)


def _first_lines(err: Exception) -> str:
    """The exception's type and the first two lines of its message (torch's run to pages)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return ": ".join([type(err).__name__, " ".join(lines[:2])]) if lines else type(err).__name__


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A flat tensor on ``t``'s storage that is not a view: ``torch.compile`` would guard on a view's base."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (t.numel(),), (1,))


def _exact(kernel: Kernel, n_emas: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``kernel`` computes ``torch._foreach_lerp_`` bit for bit on a probe (compiling it for the state now).

    Raises what ``torch.compile`` raises when it cannot compile.
    """
    generator = torch.Generator().manual_seed(0)

    def probe() -> torch.Tensor:
        return torch.cat([torch.randn(n, generator=generator, dtype=dtype) for n in _PROBE_SIZES]).to(device)

    split = list(_PROBE_SIZES)
    with torch.inference_mode(False):  # plain tensors, as the EMAs are, whatever the caller's mode
        source, emas = probe(), [probe() for _ in range(n_emas)]
        weights = (torch.rand(n_emas, generator=generator, dtype=dtype) * 0.5).to(device)
        weights[0] = 1e-3  # a decay near 1, as most updates have
        expected = [ema.clone() for ema in emas]
        for ema, weight in zip(expected, weights.tolist(), strict=True):
            torch._foreach_lerp_(list(torch.split(ema, split)), list(torch.split(source, split)), weight)
        sources = [_alias(t.clone()) for t in torch.split(source, split)]
        got = [[_alias(t.clone()) for t in torch.split(ema, split)] for ema in emas]
    with torch.no_grad():
        kernel(sources, got, weights)
    return all(torch.equal(torch.cat(tensors), want) for tensors, want in zip(got, expected, strict=True))


def _inexact(dtype: torch.dtype, device: torch.device) -> None:
    log.warning(
        "fused='compile': torch.compile's lerp is not torch's bit for bit here (%s, %s); "
        "using the blocked update (fused=True) instead",
        dtype,
        device,
    )


def _kernel(n_emas: int, dtype: torch.dtype, device: torch.device) -> Kernel | None:
    """The compiled lerps of ``n_emas`` EMAs for this dtype and device, checked on a probe; None if unusable."""
    key = (n_emas, dtype, str(device))
    if key in _kernels:
        return _kernels[key]
    if _unavailable:
        return None
    if not hasattr(torch.compiler, "set_stance"):  # what keeps a kernel from being compiled again unchecked
        _unavailable.append("torch < 2.6")
        log.warning("fused='compile' needs torch 2.6 or later; using the blocked update (fused=True) instead")
        return None
    kernel: Kernel | None = None
    try:
        compiled = _compile(_lerps)
        if _exact(compiled, n_emas, dtype, device):
            kernel = compiled
        else:
            _inexact(dtype, device)
    except Exception as err:  # no compiler, an unsupported platform: whatever torch.compile raises
        _unavailable.append(_first_lines(err))
        log.warning(
            "fused='compile': torch.compile is not available here (%s); using the blocked update (fused=True) instead",
            _first_lines(err),
        )
    _kernels[key] = kernel
    return kernel


class CompiledLerp:
    """The lerps of every EMA of one group, by a compiled kernel that reads each weight once.

    Tensors of at least :data:`MIN_COMPILED` elements (contiguous, float32 or
    float64, no storage offset) go through the kernel in chunks of :data:`CHUNK`,
    the last one padded; the rest, and every update with a weight of 0.5 or
    more (a tracker's first steps), through :class:`BlockedLerp`. Built once
    from the group's lists, as :class:`BlockedLerp`. The kernel is compiled at
    the first use for each number of EMAs, dtype and device (seconds to a
    minute); the weights are given as a tensor, so a new beta never compiles
    again. Another global state of torch (an update under ``autocast`` or
    ``inference_mode``, another ``torch.set_num_threads``, default dtype or
    deterministic setting) needs one more compile, which is made on the probe
    and checked there before the update goes on. While the kernel runs,
    ``torch.compiler``'s stance is ``"fail_on_recompile"``; the stance is
    global, so a ``torch.compile`` function that another thread runs at that
    moment would be refused a recompile too.

    Args:
        sources: the tensors the EMAs move towards.
        emas: one list per EMA, parallel to ``sources``.
    """

    def __init__(self, sources: list[torch.Tensor], emas: list[list[torch.Tensor]]) -> None:
        self._sources = sources
        self._emas = emas
        self._blocked = BlockedLerp(sources, emas)
        self._chunks: list[tuple[list[torch.Tensor], list[list[torch.Tensor]]]] = []
        self._kernel: Kernel | None = None
        if not sources or not emas:
            return
        first = sources[0]

        def fits(i: int) -> bool:
            tensors = [sources[i], *(ema[i] for ema in emas)]
            return sources[i].numel() >= MIN_COMPILED and all(
                t.is_contiguous() and t.storage_offset() == 0 and t.dtype == first.dtype and t.device == first.device
                for t in tensors
            )

        picked = [i for i in range(len(sources)) if fits(i)] if first.dtype in _COMPILED_DTYPES else []
        if not picked or (kernel := _kernel(len(emas), first.dtype, first.device)) is None:
            return
        self._kernel = kernel
        rest = sorted(set(range(len(sources))) - set(picked))
        self._rest = BlockedLerp([sources[i] for i in rest], [[ema[i] for i in rest] for ema in emas])
        padding = -len(picked) % CHUNK  # scratch tensors: every call has CHUNK tensors, so one kernel serves all

        def padded(column: list[torch.Tensor]) -> list[torch.Tensor]:
            return column + [torch.zeros(MIN_COMPILED, dtype=first.dtype, device=first.device) for _ in range(padding)]

        columns = [padded([sources[i] for i in picked]), *(padded([ema[i] for i in picked]) for ema in emas)]
        for start in range(0, len(columns[0]), CHUNK):
            part = [[_alias(t) for t in column[start : start + CHUNK]] for column in columns]
            self._chunks.append((part[0], part[1:]))

    @property
    def compiled(self) -> bool:
        """Whether updates with weights below 0.5 go through the compiled kernel."""
        return self._kernel is not None

    def matches(self, sources: list[torch.Tensor], emas: list[list[torch.Tensor]]) -> bool:
        """Whether these are the lists this was built from, their tensors' data where it was."""
        return self._blocked.matches(sources, emas)

    def __call__(self, weights: Sequence[float]) -> None:
        """``ema = lerp(ema, source, weight)`` for each EMA and its weight."""
        if self._kernel is None or not all(abs(w) < 0.5 for w in weights):
            self._blocked(weights)
            return
        first = self._sources[0]
        with torch.inference_mode(False):  # a plain tensor, as the probe's (guards tell them apart)
            tensor = torch.tensor(list(weights), dtype=first.dtype).to(first.device, non_blocking=True)
        done = 0
        rechecked = False
        with torch.no_grad():
            while done < len(self._chunks):
                try:
                    with torch.compiler.set_stance("fail_on_recompile"):
                        for sources, emas in self._chunks[done:]:
                            self._kernel(sources, emas, tensor)  # a failed guard raises before the kernel runs
                            done += 1
                    continue
                except Exception as err:
                    reason = _first_lines(err)
                if not rechecked:
                    # Another global state (autocast, torch.set_num_threads, the default dtype, inference
                    # mode...) asks for another compile: made on the probe and checked there, then used.
                    rechecked = True
                    try:
                        if _exact(self._kernel, len(self._emas), first.dtype, first.device):
                            log.info("fused='compile': compiled again for a new global state (%s)", reason)
                            continue
                        _inexact(first.dtype, first.device)
                    except Exception as err:
                        reason = _first_lines(err)
                log.warning(
                    "fused='compile': the compiled kernel cannot be used (%s); "
                    "using the blocked update (fused=True) for this group from now on",
                    reason,
                )
                self._kernel = None
                for sources, emas in self._chunks[done:]:
                    for targets, weight in zip(emas, weights, strict=True):
                        torch._foreach_lerp_(targets, sources, weight)
                break
        self._rest(weights)


def plan(
    sources: list[torch.Tensor], emas: list[list[torch.Tensor]], *, compile: bool = False
) -> BlockedLerp | CompiledLerp:
    """The fused update of one group: :class:`CompiledLerp` if ``compile``, else :class:`BlockedLerp`."""
    return CompiledLerp(sources, emas) if compile else BlockedLerp(sources, emas)
