"""Packing parameters into chunks: consecutive, in the given order (first use), trainable
and frozen parameters in separate chunks (frozen chunks never hold gradients or optimizer
state), each parameter whole inside one chunk."""

from __future__ import annotations

import torch

from heteromem.memory.chunk import Chunk, ParamSlot

# Slot offsets are multiples of this many elements, so every slot view starts 128-byte
# aligned for fp32 (vector loads in the Adam kernels, coalesced copies).
ALIGN = 32


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack(entries: list[tuple[str, torch.nn.Parameter, torch.Size]], capacity: int,
         dtype: torch.dtype, group_of: dict[int, int]) -> list[Chunk]:
    """Assigns each (name, parameter, shape) a slot; returns the chunks (no buffers yet).
    Shapes are passed because a wrapped parameter's `.data` may be a placeholder.

    Raises ValueError when a parameter is larger than the chunk capacity.
    """
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
        chunk = open_chunk.get(trainable)
        if chunk is None or _align(chunk.used) + numel > capacity:
            chunk = Chunk(index=len(chunks), dtype=dtype, capacity=capacity, trainable=trainable)
            chunks.append(chunk)
            open_chunk[trainable] = chunk
        offset = _align(chunk.used)
        chunk.slots.append(ParamSlot(name=name, param=param, chunk=chunk, offset=offset,
                                     numel=numel, shape=shape, orig_dtype=param.dtype,
                                     trainable=trainable, group=group_of.get(id(param), 0)))
        chunk.used = offset + numel
    return chunks
