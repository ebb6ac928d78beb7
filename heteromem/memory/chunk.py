"""Chunks: fixed-capacity flat buffers of one dtype holding consecutive parameters.

A chunk has a home on the host (the parameters in the compute dtype, plus, when trainable,
the fp32 master and the optimizer's state regions: `Chunk.layout`, a `StateLayout`, says which
- Adam's fp32 moments, or 8-bit codes and block scales) and, while in use, a copy on the device tier in a slab. Both
sides move through states whose allowed transitions are data (`DEVICE_TRANSITIONS`,
`HOST_TRANSITIONS`), checked on every move, so an illegal move fails at once instead of
training on wrong data.

Where each parameter's gradient currently is (`ParamSlot.grad_loc`) is tracked per slot:
  None      no gradient yet this step
  "device"  in the parameter's own slot of the device copy (its value is no longer needed)
  "host"    in its slot of the host buffer (copied back; the host value is then a gradient)
  "acc"     added into the chunk's fp32 accumulation buffer (gradient accumulation, reuse)
  "nvme"    written to the NVMe tier by the host cache (`Chunk.grad_spill`), until the step

A chunk whose image lives on the NVMe tier (`Chunk.nvme`) has a host buffer only while the host
cache holds it (`host` is None otherwise; `host_read` is the ticket of a read in flight).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from heteromem.errors import IllegalTransition

if TYPE_CHECKING:
    from concurrent.futures import Future

    from heteromem.optim.layout import StateLayout


class DeviceState(enum.Enum):
    ABSENT = "absent"     # no device copy
    LOADING = "loading"   # host-to-device copy in flight
    PARAMS = "params"     # every slot holds its parameter value
    MIXED = "mixed"       # some slots hold gradients


class HostState(enum.Enum):
    PARAMS = "params"     # the host buffer holds parameter values
    GRADS = "grads"       # some slots hold gradients copied back from the device
    UPDATING = "updating"  # an optimizer update of this chunk is in flight


DEVICE_TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    DeviceState.ABSENT: frozenset({DeviceState.LOADING, DeviceState.PARAMS}),
    DeviceState.LOADING: frozenset({DeviceState.PARAMS}),
    DeviceState.PARAMS: frozenset({DeviceState.MIXED, DeviceState.ABSENT, DeviceState.LOADING}),
    DeviceState.MIXED: frozenset({DeviceState.MIXED, DeviceState.PARAMS, DeviceState.ABSENT}),
}

HOST_TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    HostState.PARAMS: frozenset({HostState.GRADS, HostState.UPDATING}),
    HostState.GRADS: frozenset({HostState.PARAMS, HostState.UPDATING}),
    # GRADS: an update that failed before it took the host buffer's gradients.
    HostState.UPDATING: frozenset({HostState.PARAMS, HostState.GRADS}),
}


@dataclass(eq=False)
class ParamSlot:
    """One parameter's place in a chunk."""

    name: str
    param: torch.nn.Parameter
    chunk: Chunk
    offset: int
    numel: int
    shape: torch.Size
    orig_dtype: torch.dtype
    trainable: bool
    group: int = 0           # optimizer param group index
    step: int = 0            # optimizer steps applied to this parameter
    grad_loc: str | None = None
    # Sharded: some of this step's gradient was already reduce-scattered into the owners'
    # `Chunk.grad_shard` (grad_loc then says where any further local part is).
    reduced: bool = False

    @property
    def has_grad(self) -> bool:
        return self.grad_loc is not None or self.reduced

    @property
    def range(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


@dataclass(eq=False)
class Chunk:
    """A flat buffer of parameters; trainable chunks also own their optimizer state."""

    index: int
    dtype: torch.dtype           # compute dtype
    capacity: int                # elements; every device slab holds this many
    trainable: bool
    slots: list[ParamSlot] = field(default_factory=list)
    used: int = 0                # elements occupied, including alignment padding
    host: torch.Tensor | None = None        # parameters (compute dtype) or, briefly, grads
    master: torch.Tensor | None = None      # fp32 master (the host buffer itself in fp32 mode)
    # Trainable: the optimizer's state layout, and its regions other than the master (flat,
    # laid out like the parameters: `layout.views(states, start, n)` covers a run).
    layout: StateLayout | None = None
    states: dict[str, torch.Tensor] | None = None
    acc: torch.Tensor | None = None         # fp32 gradient accumulation, allocated on demand
    acc_planned: bool = False    # room for `acc` was reserved on the host tier at wrap
    device_buffer: torch.Tensor | None = None  # storage allocated only while resident
    allocated: bool = False
    device_state: DeviceState = DeviceState.ABSENT
    host_state: HostState = HostState.PARAMS
    device_stale: bool = False   # the device copy predates the last optimizer update
    pins: int = 0                # modules currently using the device copy
    soft_pins: int = 0           # backward calls that may still need it (evictable last)
    keep_on_device: bool = False
    states_on_device: bool = False  # master/moments (and gradients) live on the device tier
    nvme: object = None          # NvmeImage when the chunk's image lives on the NVMe tier
    host_read: int | None = None  # ticket of a read of the image's values into `host`
    grad_spill: object = None    # SpilledGrads: gradients the host cache wrote to NVMe
    load_event: object = None    # CUDA event of the copy that filled the device copy
    d2h_event: object = None     # CUDA event of the copy that filled the host buffer
    update: Future | None = None  # optimizer update in flight
    # Sharded over `world` ranks: this rank's host buffers (host, master, moments) hold only
    # elements [shard_lo, shard_hi) of the chunk, and its reduced gradient is `grad_shard`.
    world: int = 1
    shard_lo: int = 0
    shard_hi: int | None = None
    grad_shard: torch.Tensor | None = None

    @property
    def host_len(self) -> int:
        """Elements of this rank's host buffers: the whole chunk, or its shard."""
        return self.used if self.shard_hi is None else self.shard_hi - self.shard_lo

    @property
    def host_capacity(self) -> int:
        """Elements a host (or NVMe) state buffer of a chunk of this capacity holds."""
        return self.capacity // self.world

    def move_device(self, new: DeviceState) -> None:
        if new not in DEVICE_TRANSITIONS[self.device_state]:
            raise IllegalTransition(f"chunk {self.index}: device copy cannot go from "
                                    f"{self.device_state.value} to {new.value}")
        self.device_state = new

    def move_host(self, new: HostState) -> None:
        if new not in HOST_TRANSITIONS[self.host_state]:
            raise IllegalTransition(f"chunk {self.index}: host buffer cannot go from "
                                    f"{self.host_state.value} to {new.value}")
        self.host_state = new

    @property
    def resident(self) -> bool:
        return self.device_state in (DeviceState.PARAMS, DeviceState.MIXED, DeviceState.LOADING)

    def device_view(self) -> torch.Tensor:
        assert self.allocated, f"chunk {self.index} has no device copy"
        return self.device_buffer[: self.used]

    def image_bytes_on_host(self) -> int:
        """Bytes a host-resident chunk keeps on the host: parameters and (trainable) optimizer
        states, the master being the parameter buffer itself in fp32."""
        return self.host_len * self.dtype.itemsize + self.state_bytes()

    def state_bytes(self, numel: int | None = None) -> int:
        """Bytes of the chunk's optimizer state off the device for `numel` elements (this
        rank's host buffers by default): the fp32 master and the layout's regions, the
        master being the parameter buffer itself in fp32 (0 when frozen)."""
        if not self.trainable:
            return 0
        n = self.host_len if numel is None else numel
        return self.layout.nbytes(n, master=self.dtype != torch.float32)

    def new_states(self, numel: int, pin: bool) -> dict[str, torch.Tensor]:
        """Fresh (zero: every optimizer's initial state) host buffers of the layout's regions
        other than the master, for `numel` elements."""
        return {r.name: torch.zeros(r.items(numel), dtype=r.dtype, pin_memory=pin)
                for r in self.layout.state_regions}

    def host_bytes(self) -> int:
        """Host bytes this chunk holds (parameters, and optimizer states when trainable)."""
        tensors = [self.host, self.acc, self.grad_shard, *(self.states or {}).values()]
        if self.master is not self.host:
            tensors.append(self.master)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
