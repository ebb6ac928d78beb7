"""One chunk's optimizer update: the fused calls over its runs, wherever its state lives.

Module functions, not methods: the update worker runs them and must not hold the optimizer
(a model dropped while its updates run is freed as soon as they end). The optimizer's kind
(`OptimizerKind`) says which fused call updates a run and which state regions it takes; the
chunk's state is its fp32 master plus those regions, on the host (the CPU kernel), on the
device (the CUDA kernel) or in an NVMe staging slot (the CPU kernel, then written back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heteromem.memory.chunk import Chunk, DeviceState, HostState
from heteromem.runtime.optimizer_kind import OptimizerKind
from heteromem.runtime.speculation import Snapshot, take


class RunsFailed(Exception):
    """Raised by a chunk's update (worker thread) when run `done` failed: runs before it were
    applied whole, that one and those after it not at all."""

    def __init__(self, done: int, cause: BaseException) -> None:
        super().__init__(f"{done} run(s) applied before {cause!r}")
        self.done, self.cause = done, cause


@dataclass(frozen=True)
class Run:
    """Consecutive slots of one chunk updated by one fused call: elements [start, end) of
    this rank's buffers, the step count after the update, and the hyper-parameters
    (`OptimizerKind.run_group` of the slots' param group, as sorted (key, value) pairs)."""

    start: int
    end: int
    step: int
    hyper: tuple[tuple[str, Any], ...]

    def joins(self, other: Run) -> bool:
        """Whether `other`, the next slot's run, can be updated in the same call."""
        return (self.step, self.hyper) == (other.step, other.hyper)


def apply_runs(chunk: Chunk, source: torch.Tensor, runs: list[Run], grad_scale: float,
               kind: OptimizerKind, states: dict[str, torch.Tensor],
               target: torch.Tensor | None = None) -> None:
    """The fused calls of one chunk over `states` (``master`` and the kind's regions, flat and
    laid out like the chunk); the new compute-dtype values go to `target`, by default the
    device copy (state on the device) or the host buffer. Raises `RunsFailed` saying how many
    runs were applied (each run is applied whole or not at all: the ops check their arguments
    before they write)."""
    if target is None:
        target = chunk.device_view() if chunk.states_on_device else chunk.host
    master = states["master"]
    # fp32 compute: the parameter is the master itself, unless the master lives elsewhere
    # (device copy, NVMe), in which case it is copied over after the update.
    copy_master = chunk.dtype == torch.float32 and target is not master
    for done, run in enumerate(runs):
        sl = slice(run.start, run.end)
        lowp = None if chunk.dtype == torch.float32 else target[sl]
        try:
            views = kind.layout.views(states, run.start, run.end - run.start)
            kind.update_(dict(run.hyper), run.step, views.pop("master"), source[sl], views,
                         grad_scale=grad_scale, param_lowp=lowp)
        except Exception as exc:
            raise RunsFailed(done, exc) from exc
        if copy_master:
            target[sl].copy_(master[sl])


def chunk_states(chunk: Chunk) -> dict[str, torch.Tensor]:
    """A host- or device-state chunk's master and state regions by name."""
    return {"master": chunk.master, **chunk.states}


def finish_chunk(chunk: Chunk, source: torch.Tensor) -> None:
    """The chunk's update is complete: its gradient buffer is cleared and its copies say so."""
    if source is chunk.acc or source is chunk.grad_shard:
        source.zero_()
    if chunk.states_on_device:
        if chunk.device_state is DeviceState.MIXED:
            chunk.move_device(DeviceState.PARAMS)
    else:
        chunk.device_stale = True
    if chunk.host_state is not HostState.PARAMS:
        chunk.move_host(HostState.PARAMS)


def update_chunk(chunk: Chunk, source: torch.Tensor, runs: list[Run], grad_scale: float,
                 kind: OptimizerKind, landed: object = None,
                 snapshot: Snapshot | None = None) -> None:
    """A host- or device-state chunk's whole update (on the worker for host states); a
    speculative one keeps its snapshot first."""
    try:
        if landed is not None:
            landed.synchronize()
        if snapshot is not None:
            take(snapshot, chunk, source)
    except Exception as exc:
        raise RunsFailed(0, exc) from exc
    apply_runs(chunk, source, runs, grad_scale, kind, chunk_states(chunk))
    finish_chunk(chunk, source)


def apply_to_staging(chunk: Chunk, source: torch.Tensor | None, runs: list[Run],
                     grad_scale: float, kind: OptimizerKind, staging) -> None:
    """An NVMe chunk's update inside its staging slot (its states were read there; the new
    parameters are written there too, so nothing else changes before the image commits).
    Gradients come from `source`, or from the staging slot when the host cache spilled them."""
    layout, n = chunk.nvme.layout, chunk.host_len
    if chunk.grad_spill is not None:
        source = staging.grads(chunk.grad_spill.dtype, chunk.grad_spill.used)
    params = staging.view("params", n, layout)
    states = {"master": staging.view("master", n, layout) if "master" in layout.regions
              else params}
    states.update((r.name, staging.view(r.name, n, layout)) for r in kind.layout.state_regions)
    apply_runs(chunk, source, runs, grad_scale, kind, states, target=params)


def finish_nvme_chunk(chunk: Chunk, source: torch.Tensor | None, staging, manager) -> None:
    """An NVMe chunk's new image is committed: its gradient buffers go, and a host buffer it
    still has gets the new values (from the staging slot; None when the commit came later,
    for a sharded step: then the buffer is dropped and read again when needed)."""
    manager.nvme.drop_grads(chunk)
    cache = manager.cache
    cache.drop_acc(chunk)
    if chunk.grad_shard is not None and source is chunk.grad_shard:
        source.zero_()
    if chunk.host is not None:
        if staging is None:
            if chunk.host_state is not HostState.PARAMS:
                chunk.move_host(HostState.PARAMS)
            cache.forget(chunk)
        else:
            chunk.host[: chunk.host_len].copy_(staging.view("params", chunk.host_len,
                                                            chunk.nvme.layout))
    chunk.device_stale = True
    if chunk.host_state is not HostState.PARAMS:
        chunk.move_host(HostState.PARAMS)


def update_nvme_chunk(chunk: Chunk, source: torch.Tensor | None, runs: list[Run],
                      grad_scale: float, kind: OptimizerKind, landed: object, manager) -> None:
    """An NVMe chunk's whole update on the worker (updates during backward): read its
    states, update them in a staging slot, write and commit the image."""
    try:
        if landed is not None:
            landed.synchronize()
        manager.nvme.step(
            [chunk],
            lambda c, staging: apply_to_staging(c, source, runs, grad_scale, kind, staging),
            lambda c, staging: finish_nvme_chunk(c, source, staging, manager))
    except RunsFailed as exc:  # in the staging slot only: nothing of it was committed
        raise RunsFailed(0, exc.cause) from exc.cause
    except Exception as exc:
        raise RunsFailed(0, exc) from exc
