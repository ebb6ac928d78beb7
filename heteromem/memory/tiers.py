"""Per-tier byte budgets and the device slab pool.

Every byte heteromem places on a tier is reserved here first, so budgets are enforced in one
place and the report's current/peak figures are exact. Device chunks come from a pool of
equal slabs that are allocated once and reused, so paging never fragments the caching
allocator.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from heteromem.errors import OutOfMemory, format_bytes


@dataclass
class Tier:
    """Byte accounting of one tier; `budget` None means unbounded. `recorder`, when set, is
    called with the tier after every reserve and release (the memory timeline)."""

    name: str
    budget: int | None
    current: int = 0
    peak: int = 0
    recorder: Callable[["Tier"], None] | None = field(default=None, repr=False, compare=False)
    # The update worker releases and reserves too (NVMe chunks' buffers).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def left(self) -> int | None:
        return None if self.budget is None else self.budget - self.current

    def fits(self, nbytes: int) -> bool:
        return self.budget is None or self.current + nbytes <= self.budget

    def reserve(self, nbytes: int, what: str, advice: str) -> None:
        with self._lock:
            if not self.fits(nbytes):
                raise OutOfMemory(self.name, nbytes, max(self.left() or 0, 0), advice, what)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            if self.recorder is not None:
                self.recorder(self)

    def release(self, nbytes: int) -> None:
        with self._lock:
            if nbytes > self.current:
                raise AssertionError(f"{self.name} tier: releasing {nbytes} bytes but only "
                                     f"{self.current} are reserved")
            self.current -= nbytes
            if self.recorder is not None:
                self.recorder(self)


class DeviceChunkMemory:
    """Device memory for chunks: every chunk has one device tensor of the same size (a slab)
    whose storage is allocated while the chunk is resident and resized to zero bytes when it
    is evicted.

    NOTE: the storage object lives as long as the chunk, so tensors that autograd saved during
    forward as *views* of a parameter (e.g. `weight.t()` inside `linear`) see the right values
    again as soon as the chunk is fetched back for backward. Equal slab sizes let the caching
    allocator hand the same blocks back, so paging does not fragment device memory.
    """

    def __init__(self, tier: Tier, slab_bytes: int, device: torch.device) -> None:
        self.tier, self.slab_bytes, self.device = tier, slab_bytes, device

    def fits(self) -> bool:
        return self.tier.fits(self.slab_bytes)

    def allocate(self, buffer: torch.Tensor | None, dtype: torch.dtype, numel: int,
                 what: str) -> torch.Tensor:
        self.tier.reserve(self.slab_bytes, what, advice=(
            f"raise device_memory, lower chunk_mb (slabs are {format_bytes(self.slab_bytes)}), "
            "or keep fewer modules on the device"))
        if buffer is None:
            return torch.empty(numel, dtype=dtype, device=self.device)
        buffer.untyped_storage().resize_(self.slab_bytes)
        return buffer

    def free(self, buffer: torch.Tensor) -> None:
        buffer.untyped_storage().resize_(0)
        self.tier.release(self.slab_bytes)
