"""Planning the host tier once, at wrap: what stays on the host and what goes to NVMe.

Every host byte a training run can need is planned here, so that a `host_memory` that
`hm.wrap` accepts holds for the whole run (a larger budget never fails where a smaller one
works):

- a *host-resident* chunk keeps its parameters (compute dtype), its optimizer states (the fp32
  master and the regions of the optimizer's `StateLayout`) and room for its fp32 gradient
  accumulation buffer (allocated only when gradients accumulate or a parameter is used again
  after its gradient; in fp32 every gradient gathers there), and, sharded, its reduced
  gradient part;
- with `nvme_dir`, the chunks that do not fit go to the NVMe tier whole (an image of
  parameters and states per chunk, nvme.py); the host then holds the staging pool that streams
  their states through the optimizer, and a cache of their values and gradients
  (host_cache.py) of at least the chunks one module call pins on the device at once (plus the
  prefetched ones), each with room for an accumulation buffer; everything left over goes to
  the cache too.

Chunks stay host-resident in packing order while they fit. Without a budget nothing is planned
(and nothing goes to NVMe).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from heteromem.errors import OutOfMemory, format_bytes
from heteromem.memory.chunk import Chunk
from heteromem.memory.layout import state_layout
from heteromem.memory.nvme import MIN_STAGING_SLOTS, staging_bytes

FP32_BYTES = 4


@dataclass
class HostPlan:
    on_nvme: set[int] = field(default_factory=set)  # id(chunk) of the chunks on NVMe
    cache_bytes: int = 0                             # the host cache of NVMe chunks
    staging_bytes: int = 0                           # the NVMe staging pool
    staging_slots: int = 0                           # ... in slots of one image each
    # False when only frozen chunks went to NVMe: staging slots and cache hold no states or
    # gradients (LoRA over a base larger than the host budget).
    staging_trainable: bool = True
    shard_bytes: int = 0                             # sharded: every reduced gradient part
    # Sharded: room left free for the whole-chunk accumulation buffers, which the sharded
    # manager reserves and releases around each reduction.
    transient_bytes: int = 0
    # Bytes planned for each host-resident chunk (parameters, states, accumulation room).
    resident_bytes: dict[int, int] = field(default_factory=dict)

    @property
    def planned_bytes(self) -> int:
        return (sum(self.resident_bytes.values()) + self.staging_bytes + self.cache_bytes
                + self.shard_bytes + self.transient_bytes)


def resident_bytes(chunk: Chunk, sharded: bool) -> int:
    """Host bytes a chunk needs when it stays on the host for the whole run."""
    total = chunk.image_bytes_on_host()
    if chunk.trainable and not sharded:
        total += chunk.used * FP32_BYTES  # its accumulation buffer (see shard_bytes when sharded)
    return total


def cache_floor(capacity: int, dtype: torch.dtype, chunks_at_once: int) -> int:
    """The smallest host cache that can run: a buffer and an accumulation buffer for each chunk
    the device can hold pinned or in flight at once, plus one more leaving."""
    return (chunks_at_once + 1) * capacity * (dtype.itemsize + FP32_BYTES)


def plan_host(chunks: list[Chunk], dtype: torch.dtype, budget: int | None, nvme: bool,
              staging_slots: int, chunks_at_once: int, sharded: bool,
              staging_budget: int | None = None) -> HostPlan:
    """Places every chunk on the host or (with `nvme`) the NVMe tier so that the host needs
    at most `budget` bytes at any time; raises OutOfMemory for the host tier when it cannot.
    `staging_slots` trainable-image slots fit `staging_budget` (nvme_staging, or None)."""
    # Sharded, every trainable chunk's reduced gradient part stays on the host, and local
    # gradients gather in whole-chunk accumulation buffers only until the chunk is reduced,
    # which happens as soon as its gradients are complete: room for a few at once.
    capacity = max(c.capacity for c in chunks) if chunks else 0
    plan = HostPlan()
    if sharded:
        plan.shard_bytes = sum(c.host_len * FP32_BYTES for c in chunks if c.trainable)
        plan.transient_bytes = (chunks_at_once + 1) * capacity * FP32_BYTES
    costs = [(c, resident_bytes(c, sharded)) for c in chunks]
    total = sum(b for _, b in costs) + plan.shard_bytes + plan.transient_bytes
    if budget is None or total <= budget:
        plan.resident_bytes = {id(c): b for c, b in costs}
        return plan
    if not nvme:
        raise OutOfMemory(
            "host", total, budget,
            "raise host_memory, or set nvme_dir so the chunks that do not fit go to NVMe "
            f"(on the host each chunk needs its parameters, optimizer states and room to "
            f"accumulate gradients: {format_bytes(total)} in all)",
            what="the chunks (parameters, optimizer states, gradient accumulation)")
    host_capacity = max(c.host_capacity for c in chunks) if chunks else 0
    frozen_needed = None  # the host bytes the frozen-only plan needs, where it applies
    if not sharded and any(not c.trainable for c in chunks):
        frozen_only, frozen_needed = _plan_frozen_on_nvme(costs, dtype, budget, host_capacity,
                                                          chunks_at_once, staging_budget)
        if frozen_only is not None:
            return frozen_only
    layout = state_layout(chunks)
    if staging_slots < MIN_STAGING_SLOTS:
        slot = staging_bytes(host_capacity, 1, dtype, layout)
        if frozen_needed is not None and frozen_needed > budget:
            raise _short(frozen_needed, budget)
        raise ValueError(f"hm.wrap: nvme_staging={format_bytes(staging_budget or 0)} holds "
                         f"fewer than {MIN_STAGING_SLOTS} chunk images ({format_bytes(slot)} "
                         f"each); raise it to at least {format_bytes(MIN_STAGING_SLOTS * slot)} "
                         "or lower chunk_mb")
    plan.staging_slots = staging_slots
    plan.staging_bytes = staging_bytes(host_capacity, staging_slots, dtype, layout)
    floor = cache_floor(host_capacity, dtype, chunks_at_once)
    shard_parts = plan.shard_bytes + plan.transient_bytes
    fixed = plan.staging_bytes + floor + shard_parts
    if fixed > budget:
        raise OutOfMemory(
            "host", fixed, budget,
            f"with nvme_dir the host still holds the staging pool "
            f"({format_bytes(plan.staging_bytes)}: lower nvme_staging), a cache for "
            f"{chunks_at_once + 1} chunk(s) ({format_bytes(floor)}: lower chunk_mb)"
            + (f" and each rank's reduced gradients ({format_bytes(shard_parts)})"
               if shard_parts else "")
            + f"; raise host_memory to at least {format_bytes(fixed)}"
            + (f", or to {format_bytes(frozen_needed)} to keep every trainable chunk on the "
               "host and send only frozen ones to NVMe" if frozen_needed else ""),
            what="the NVMe staging pool and host cache")
    _fill(plan, costs, budget - fixed, floor)
    return plan


def _fill(plan: HostPlan, costs: list[tuple[Chunk, int]], left: int, floor: int) -> None:
    """Keeps chunks on the host in packing order while they fit `left` bytes; the others go
    to NVMe, and what is left joins the cache's `floor`."""
    for chunk, nbytes in costs:
        if nbytes <= left:
            plan.resident_bytes[id(chunk)] = nbytes
            left -= nbytes
        else:
            plan.on_nvme.add(id(chunk))
    plan.cache_bytes = floor + left


def _short(needed: int, budget: int) -> OutOfMemory:
    return OutOfMemory(
        "host", needed, budget,
        f"with nvme_dir and only frozen chunks on NVMe the host holds every trainable chunk, "
        f"two staging slots and a cache of frozen chunks' parameters; raise host_memory to at "
        f"least {format_bytes(needed)} or lower chunk_mb",
        what="the trainable chunks, NVMe staging pool and host cache")


def _plan_frozen_on_nvme(costs: list[tuple[Chunk, int]], dtype: torch.dtype, budget: int,
                         capacity: int, chunks_at_once: int, staging_budget: int | None
                         ) -> tuple[HostPlan | None, int | None]:
    """The plan with only frozen chunks on NVMe, when every trainable chunk fits on the host
    beside a staging pool and a cache sized for frozen images (else None), and the host
    bytes that needs (None if nvme_staging is too small for it).

    A frozen chunk's image is its parameters only and is never updated: staging it needs a
    ninth of a trainable image's bytes (bf16), and its cache buffer no room for gradients.
    LoRA over a base larger than the host budget then needs about (chunks at once + 3)
    chunks of parameters on the host, not the trainable pool's staging. Trainable chunks
    are kept first (they are the ones an update touches)."""
    slots = MIN_STAGING_SLOTS  # a frozen image is staged only to be placed, loaded or stored
    staging = staging_bytes(capacity, slots, dtype, trainable=False)
    if staging_budget is not None and staging_budget < staging:
        return None, None
    floor = (chunks_at_once + 1) * capacity * dtype.itemsize
    needed = staging + floor + sum(b for c, b in costs if c.trainable)
    if needed > budget:
        return None, needed
    plan = HostPlan(staging_bytes=staging, staging_slots=slots, staging_trainable=False)
    plan.resident_bytes = {id(c): b for c, b in costs if c.trainable}
    _fill(plan, [(c, b) for c, b in costs if not c.trainable], budget - needed, floor)
    return plan, needed
