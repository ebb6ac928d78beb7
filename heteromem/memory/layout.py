"""Packing parameters into chunks: consecutive, in the given order (first use), trainable
and frozen parameters in separate chunks (frozen chunks never hold gradients or optimizer
state), each parameter whole inside one chunk.

A trainable parameter starts at a multiple of its optimizer's `StateLayout.align` too (256
for the 8-bit optimizers): then no block of 256 elements, which shares one scale, holds two
parameters, every run of a chunk starts on a block, and each parameter's blocks are exactly
the standalone optimizer's, so a chunk holds the standalone optimizer's state bit for bit.
"""

from __future__ import annotations

import math

import torch

from heteromem.memory.chunk import Chunk, ParamSlot
from heteromem.optim.layout import FP32_MOMENTS, StateLayout

# Slot offsets are multiples of this many elements, so every slot view starts 128-byte
# aligned for fp32 (vector loads in the Adam kernels, coalesced copies).
ALIGN = 32


def slot_align(layout: StateLayout | None) -> int:
    """The alignment of parameters in chunks holding `layout`'s state (None: frozen)."""
    return ALIGN if layout is None else math.lcm(ALIGN, layout.align)


def state_layout(chunks: list[Chunk]) -> StateLayout:
    """The optimizer state layout of a model's trainable chunks (Adam's when all are
    frozen: nothing then holds state)."""
    return next((c.layout for c in chunks if c.trainable), FP32_MOMENTS)


def _align(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def pack(entries: list[tuple[str, torch.nn.Parameter, torch.Size]], capacity: int,
         dtype: torch.dtype, group_of: dict[int, int],
         layout: StateLayout | None = None) -> list[Chunk]:
    """Assigns each (name, parameter, shape) a slot; returns the chunks (no buffers yet).
    Shapes are passed because a wrapped parameter's `.data` may be a placeholder. Trainable
    chunks get `layout`, the optimizer's state (Adam's fp32 moments by default).

    Raises ValueError when a parameter is larger than the chunk capacity.
    """
    layout = FP32_MOMENTS if layout is None else layout
    chunks: list[Chunk] = []
    open_chunk: dict[bool, Chunk] = {}
    for name, param, shape in entries:
        numel = shape.numel()
        if numel > capacity:
            raise ValueError(
                f"chunk_mb is too small: parameter {name!r} has {numel} elements but a chunk holds "
                f"{capacity}; raise chunk_mb to at least "
                f"{numel * torch.empty((), dtype=dtype).element_size() / 2**20:.3f}")
        trainable = param.requires_grad
        align = slot_align(layout if trainable else None)
        chunk = open_chunk.get(trainable)
        if chunk is None or _align(chunk.used, align) + numel > capacity:
            chunk = Chunk(index=len(chunks), dtype=dtype, capacity=capacity, trainable=trainable,
                          layout=layout if trainable else None)
            chunks.append(chunk)
            open_chunk[trainable] = chunk
        offset = _align(chunk.used, align)
        chunk.slots.append(ParamSlot(name=name, param=param, chunk=chunk, offset=offset,
                                     numel=numel, shape=shape, orig_dtype=param.dtype,
                                     trainable=trainable, group=group_of.get(id(param), 0)))
        chunk.used = offset + numel
    return chunks
