"""How chunks are split over ranks: every rank owns one equal, contiguous part of every chunk.

A chunk's element count is padded to a multiple of `world * align`, so each part starts
aligned (vector loads in the optimizer kernels) and the parts are equal (all-gather and
reduce-scatter move equal pieces). `align` is the chunk's parameter alignment
(`memory.layout.slot_align`): 256 for the 8-bit optimizers, so a part starts on a block and
each rank updates whole blocks, exactly those one process would. Parameters may straddle
parts: a parameter's elements are owned by whichever ranks' parts they fall in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

from heteromem.memory.chunk import Chunk, ParamSlot
from heteromem.memory.layout import ALIGN


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shardable_capacity(capacity: int, world: int, align: int = ALIGN) -> int:
    """A chunk capacity whose chunks split into `world` equal parts aligned to `align`."""
    return _round_up(capacity, world * align)


def reduce_buffer_bytes(capacity: int, world: int) -> int:
    """Device bytes a rank reserves to reduce one chunk's gradients: the chunk's fp32 sum and
    this rank's fp32 part of it."""
    return (capacity + capacity // world) * 4


def shard_chunks(chunks: list[Chunk], rank: int, world: int, align: int = ALIGN) -> None:
    """Pads each chunk and records which part of it this rank owns."""
    for chunk in chunks:
        chunk.used = _round_up(max(chunk.used, 1), world * align)
        assert chunk.used <= chunk.capacity, "capacity must come from shardable_capacity"
        part = chunk.used // world
        chunk.world, chunk.shard_lo, chunk.shard_hi = world, rank * part, (rank + 1) * part


def owned_ranges(chunk: Chunk) -> Iterator[tuple[ParamSlot, slice, slice]]:
    """(slot, range in this rank's host buffers, range in the flat parameter) for every
    parameter with elements in this rank's part (every parameter when not sharded)."""
    for slot in chunk.slots:
        part = owned_part(chunk, slot)
        if part is not None:
            yield slot, part[0], part[1]


def owned_part(chunk: Chunk, slot: ParamSlot) -> tuple[slice, slice] | None:
    """(range in this rank's host buffers, range in the flat parameter) of the part of
    `slot` this rank owns; None when it owns none of it."""
    lo, hi = chunk.shard_lo, chunk.shard_lo + chunk.host_len
    start, stop = max(slot.offset, lo), min(slot.offset + slot.numel, hi)
    if start >= stop:
        return None
    return slice(start - lo, stop - lo), slice(start - slot.offset, stop - slot.offset)


def rank_dir(nvme_dir: object, rank: int) -> str:
    """`nvme_dir/rank<r>`, created: each rank's NVMe files in a folder of their own."""
    path = os.path.join(os.fspath(nvme_dir), f"rank{rank}")
    os.makedirs(path, exist_ok=True)
    return path


def check_same_model(comm, chunks: list[Chunk], options: dict) -> None:
    """Every rank must wrap the same model with the same options, or their collectives
    would not match: compare a digest of both over the ranks and name what differs."""
    layout = [[(s.name, list(s.shape), str(s.orig_dtype), s.trainable, s.group, s.offset)
               for s in c.slots] for c in chunks]
    mine = {"model": hashlib.sha256(json.dumps(layout).encode()).hexdigest(),
            "options": json.dumps(options, sort_keys=True, default=str)}
    everyone = comm.all_gather_object(mine, "comparing the wrapped model over the ranks")
    for rank, theirs in enumerate(everyone):
        if theirs["model"] != mine["model"]:
            raise ValueError(f"hm.wrap: rank {rank} wraps a different model than rank "
                             f"{comm.rank} (parameter names, shapes, dtypes, requires_grad or "
                             "param groups differ); every rank must build the same model")
        if theirs["options"] != mine["options"]:
            raise ValueError(f"hm.wrap: rank {rank} passed other wrap options than rank "
                             f"{comm.rank}: {theirs['options']} against {mine['options']}; pass "
                             "the same arguments on every rank")
