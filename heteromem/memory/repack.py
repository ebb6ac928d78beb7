"""Re-packing chunks in the order the model first used its parameters.

`hm.wrap` packs parameters in registration order before anything has run. The first
iteration records the order in which modules actually use them; if it differs, the chunks
are rebuilt once, between iterations, so that consecutive chunks serve consecutive modules
(fewer chunks per module, better prefetching). Values, fp32 masters, Adam moments and step
counts move with their parameters; nothing else changes.
"""

from __future__ import annotations

import torch

from heteromem.memory.chunk import Chunk, HostState, ParamSlot
from heteromem.memory.layout import pack
from heteromem.memory.manager import ChunkManager
from heteromem.memory.tracer import Trace


def host_reservation(chunk: Chunk) -> int:
    """Bytes `hm.wrap` reserved on the host tier for the chunk's buffers (not the acc)."""
    states = 0 if chunk.nvme is not None else chunk.state_bytes()
    return chunk.used * chunk.host.element_size() + states


def can_repack(manager: ChunkManager) -> bool:
    """Only at a clean boundary: no gradient pending, no update in flight, nothing pinned."""
    manager.wait_updates()
    return all(s.grad_loc is None for c in manager.chunks for s in c.slots) and \
        all(c.pins == 0 and c.host_state is HostState.PARAMS for c in manager.chunks)


def repack(manager: ChunkManager, order: list[ParamSlot], pin: bool) -> dict[int, ParamSlot]:
    """Rebuilds the manager's chunks with parameters in `order` (then any not in it).

    Returns {id(old slot): new slot}. The caller must update every structure holding slots.
    """
    old_chunks = manager.chunks
    seen = {id(s) for s in order}
    slots = order + [s for c in old_chunks for s in c.slots if id(s) not in seen]
    capacity, dtype = old_chunks[0].capacity, old_chunks[0].dtype
    kept_params = {id(s.param) for c in old_chunks if c.keep_on_device for s in c.slots}
    for chunk in old_chunks:
        if chunk.allocated:
            chunk.keep_on_device = False
            manager.evict(chunk)
    new_chunks = pack([(s.name, s.param, s.shape) for s in slots], capacity, dtype,
                      {id(s.param): s.group for s in slots})
    mapping: dict[int, ParamSlot] = {}
    new_by_param = {id(s.param): s for c in new_chunks for s in c.slots}
    for old in slots:
        new = new_by_param[id(old.param)]
        new.orig_dtype, new.step, new.group, new.shape = old.orig_dtype, old.step, old.group, old.shape
        mapping[id(old)] = new
    fp32 = dtype == torch.float32
    for chunk in new_chunks:
        chunk.host = torch.zeros(chunk.used, dtype=dtype, pin_memory=pin)
        if chunk.trainable:
            chunk.master = chunk.host if fp32 else torch.zeros(chunk.used, dtype=torch.float32, pin_memory=pin)
            chunk.exp_avg = torch.zeros(chunk.used, dtype=torch.float32, pin_memory=pin)
            chunk.exp_avg_sq = torch.zeros(chunk.used, dtype=torch.float32, pin_memory=pin)
        manager.host_tier.reserve(host_reservation(chunk), f"chunk {chunk.index} (re-packing)",
                                  advice="raise host_memory")
    with torch.no_grad():
        for old in slots:
            new = mapping[id(old)]
            src, dst = old.chunk, new.chunk
            dst.host[new.range].copy_(src.host[old.range])
            if dst.trainable:
                if not fp32:
                    dst.master[new.range].copy_(src.master[old.range])
                dst.exp_avg[new.range].copy_(src.exp_avg[old.range])
                dst.exp_avg_sq[new.range].copy_(src.exp_avg_sq[old.range])
    for chunk in old_chunks:
        manager.host_tier.release(host_reservation(chunk) + (chunk.used * 4 if chunk.acc is not None else 0))
    manager.chunks = new_chunks
    manager.trace = Trace()
    for chunk in new_chunks:
        if any(id(s.param) in kept_params for s in chunk.slots):
            chunk.keep_on_device = True
            manager.release(manager.acquire(chunk.slots))
    return mapping
