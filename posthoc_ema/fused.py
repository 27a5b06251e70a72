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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BLOCK_BYTES", "BlockedLerp", "block_bytes_for"]

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
            targets = [ema[i] for ema in emas]
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
        """Whether these are the lists this was built from (a rebound list needs a new one)."""
        return sources is self._sources and emas is self._emas

    def __call__(self, weights: Sequence[float]) -> None:
        """``ema = lerp(ema, source, weight)`` for each EMA and its weight, one block at a time."""
        for sources, emas in self._blocks:
            for targets, weight in zip(emas, weights, strict=True):
                torch._foreach_lerp_(targets, sources, weight)
