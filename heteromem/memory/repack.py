"""Re-packing chunks in the order the model first used its parameters.

`hm.wrap` packs parameters in registration order before anything has run. The first
iteration records the order in which modules actually use them; if it differs, the chunks
are rebuilt once, between iterations, so that consecutive chunks serve consecutive modules
(fewer chunks per module, better prefetching). Values, fp32 masters, optimizer states and
step counts move with their parameters; nothing else changes.
"""

from __future__ import annotations

import torch

from heteromem.memory.chunk import Chunk, HostState, ParamSlot
from heteromem.memory.host_plan import resident_bytes
from heteromem.memory.layout import pack, state_layout
from heteromem.memory.manager import ChunkManager
from heteromem.memory.tracer import Trace


def host_reservation(chunk: Chunk) -> int:
    """Bytes reserved on the host tier for the chunk's buffers: what wrap planned for it
    (parameters, states, accumulation room), or, unplanned, its buffers and any accumulation
    buffer it allocated since."""
    planned = resident_bytes(chunk, sharded=False)
    if chunk.acc_planned:
        return planned
    return planned - chunk.used * 4 * chunk.trainable + (
        chunk.used * 4 if chunk.acc is not None else 0)


def can_repack(manager: ChunkManager) -> bool:
    """Only at a clean boundary: no gradient pending, no update in flight, nothing pinned."""
    manager.wait_updates()
    return all(s.grad_loc is None for c in manager.chunks for s in c.slots) and \
        all(c.pins == 0 and c.host_state is HostState.PARAMS for c in manager.chunks)


def repack(manager: ChunkManager, order: list[ParamSlot],
           pin: bool) -> dict[int, ParamSlot] | None:
    """Rebuilds the manager's chunks with parameters in `order` (then any not in it), one new
    chunk at a time, freeing each old chunk as soon as all its parameters have moved, so the
    host needs only a few chunks more than before. Returns None, changing nothing, when even
    that does not fit the host budget (the layout only affects speed).

    Returns {id(old slot): new slot}. The caller must update every structure holding slots.
    """
    old_chunks = manager.chunks
    seen = {id(s) for s in order}
    slots = order + [s for c in old_chunks for s in c.slots if id(s) not in seen]
    capacity, dtype = old_chunks[0].capacity, old_chunks[0].dtype
    new_chunks = pack([(s.name, s.param, s.shape) for s in slots], capacity, dtype,
                      {id(s.param): s.group for s in slots}, state_layout(old_chunks))
    new_by_param = {id(s.param): s for c in new_chunks for s in c.slots}
    old_by_param = {id(s.param): s for s in slots}
    # The last new chunk that takes a parameter from each old chunk: it can go after that.
    last_use = {}
    for k, chunk in enumerate(new_chunks):
        for slot in chunk.slots:
            last_use[old_by_param[id(slot.param)].chunk.index] = k
    planned = [c.acc_planned for c in old_chunks]
    for chunk in new_chunks:
        chunk.acc_planned = any(planned)
    extra, peak = 0, 0
    for k, chunk in enumerate(new_chunks):
        extra += host_reservation(chunk)
        peak = max(peak, extra)
        extra -= sum(host_reservation(c) for c in old_chunks if last_use.get(c.index) == k)
    if peak > 0 and not manager.host_tier.fits(peak):
        return None
    kept_params = {id(s.param) for c in old_chunks if c.keep_on_device for s in c.slots}
    for chunk in old_chunks:
        if chunk.allocated:
            chunk.keep_on_device = False
            manager.evict(chunk)
    mapping: dict[int, ParamSlot] = {}
    for old in slots:
        new = new_by_param[id(old.param)]
        new.orig_dtype, new.step, new.group, new.shape = old.orig_dtype, old.step, old.group, old.shape
        mapping[id(old)] = new
    fp32 = dtype == torch.float32
    for k, chunk in enumerate(new_chunks):
        manager.host_tier.reserve(host_reservation(chunk), f"chunk {chunk.index} (re-packing)",
                                  advice="raise host_memory")
        chunk.host = torch.zeros(chunk.used, dtype=dtype, pin_memory=pin)
        if chunk.trainable:
            chunk.master = chunk.host if fp32 else torch.zeros(chunk.used, dtype=torch.float32,
                                                               pin_memory=pin)
            chunk.states = chunk.new_states(chunk.used, pin)
        with torch.no_grad():
            for new in chunk.slots:
                old = old_by_param[id(new.param)]
                src = old.chunk
                chunk.host[new.range].copy_(src.host[old.range])
                if chunk.trainable:
                    if not fp32:
                        chunk.master[new.range].copy_(src.master[old.range])
                    # Both offsets are multiples of the layout's alignment, so a block-scaled
                    # region moves whole blocks (the scale with its codes).
                    for region in chunk.layout.state_regions:
                        to = region.item_slice(new.offset, new.offset + new.numel)
                        frm = region.item_slice(old.offset, old.offset + old.numel)
                        chunk.states[region.name][to].copy_(src.states[region.name][frm])
        for old_chunk in old_chunks:
            if last_use.get(old_chunk.index) == k:
                manager.host_tier.release(host_reservation(old_chunk))
                old_chunk.host = old_chunk.master = old_chunk.states = old_chunk.acc = None
    manager.chunks = new_chunks
    manager.trace = Trace()
    for chunk in new_chunks:
        if any(id(s.param) in kept_params for s in chunk.slots):
            chunk.keep_on_device = True
            manager.release(manager.acquire(chunk.slots))
    return mapping
