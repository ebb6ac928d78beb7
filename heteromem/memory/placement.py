"""Placement: which chunks keep their optimizer state on the device.

Decided once, when the first iteration has ended (so the order of use is known and chunks are
packed in it): in forward order, a trainable chunk moves its fp32 master and optimizer states
(the regions of its `StateLayout`) to the device, and stays resident there, as long as the device budget still holds those states,
the model's buffers, the chunks kept on the device, and - unless every chunk became resident -
the slabs paging needs (the largest module's chunks plus prefetch). Such a chunk is updated
on the device (the optimizer's CUDA kernel) without any copy; the others are updated on the
host (its CPU kernel).
"""

from __future__ import annotations

from heteromem.memory.chunk import Chunk
from heteromem.memory.manager import PREFETCH_CHUNKS, ChunkManager

# Planned, not reserved up front: the fp32 gradient accumulation buffer such a chunk allocates
# on the device if gradients are accumulated or a parameter is reused after its gradient.
ACC_BYTES_PER_ELEM = 4


def plan_device_states(manager: ChunkManager, working_set_chunks: int,
                       fixed_bytes: int) -> list[Chunk]:
    """The chunks (in forward order) whose optimizer state fits on the device."""
    budget = manager.device_tier.budget
    trainable = [c for c in manager.chunks if c.trainable]
    if budget is None:
        return trainable
    slab = manager.memory.slab_bytes
    kept = sum(1 for c in manager.chunks if c.keep_on_device)
    paging = (working_set_chunks + (PREFETCH_CHUNKS if manager.copies.cuda else 0)) * slab
    frozen_paged = sum(1 for c in manager.chunks if not c.trainable and not c.keep_on_device)
    chosen: list[Chunk] = []
    states = 0
    for chunk in trainable:
        candidate = chosen + [chunk]
        candidate_states = states + device_state_bytes(chunk) + chunk.used * ACC_BYTES_PER_ELEM
        slabs = kept + sum(1 for c in candidate if not c.keep_on_device)
        everything_resident = len(candidate) == len(trainable) and frozen_paged == 0
        needed = fixed_bytes + slabs * slab + candidate_states + (0 if everything_resident else paging)
        if needed > budget:
            break
        chosen, states = candidate, candidate_states
    return chosen


def device_state_bytes(chunk: Chunk) -> int:
    """Device bytes of a chunk's optimizer state there: its master (a copy of its own even
    in fp32, where the device copy of the parameters is paged separately) and regions."""
    return chunk.layout.nbytes(chunk.used)


def promote(manager: ChunkManager, chunk: Chunk) -> None:
    """Moves a chunk's optimizer state to the device and keeps its parameters resident."""
    manager.wait_updates()
    chunk.keep_on_device = True
    manager.release(manager.acquire(chunk.slots))
    nbytes = device_state_bytes(chunk)
    manager.make_room(nbytes, f"optimizer state of chunk {chunk.index}")
    manager.device_tier.reserve(nbytes, f"optimizer state of chunk {chunk.index}",
                                advice="raise device_memory")
    # copy=True: the master must not stay the host buffer (fp32), nor a staging view (NVMe).
    states = {name: t.to(manager.device, copy=True)
              for name, t in manager.states(chunk).items()}
    chunk.master = states.pop("master")
    chunk.states = states
    if chunk.nvme is not None:
        # Its image and host cache buffer are no longer needed: the device copy is home now.
        manager.nvme.drop(chunk)
        manager.cache.forget(chunk)
        chunk.states_on_device = True
        return
    # Its accumulation buffer will be on the device too: the host room goes with the states.
    if chunk.acc is not None and not chunk.acc_planned:
        manager.host_tier.release(chunk.used * 4)
    chunk.acc = None
    if chunk.acc_planned:
        manager.host_tier.release(chunk.used * 4)
        chunk.acc_planned = False
    manager.host_tier.release(chunk.state_bytes())
    chunk.states_on_device = True


def promote_planned(manager: ChunkManager, working_set_chunks: int, fixed_bytes: int) -> int:
    """Plans and promotes; returns how many chunks now keep their state on the device."""
    plan = plan_device_states(manager, working_set_chunks, fixed_bytes)
    if not plan:
        return 0
    for chunk in manager.chunks:  # start from a clean device: only kept chunks stay
        if chunk.allocated and not chunk.keep_on_device and chunk.pins == 0:
            manager.evict(chunk)
    for chunk in plan:
        promote(manager, chunk)
    if manager.nvme is not None and all(c.nvme is None for c in manager.chunks):
        manager.nvme_emptied()  # every image moved to the device: files and cache go
    return len(plan)

