"""Updates during backward that still clip: speculate, check, redo.

With `hm.wrap(step_in_backward=True)` and clipping (`max_grad_norm`) or fp16 loss scaling, a
chunk's update starts during backward with its gradients as they are (unclipped), before the
global norm is known. The update first keeps a *snapshot* of what it changes: the chunk's fp32
master, its optimizer state regions (fp32 moments, or 8-bit codes and block scales) and its
gradients (the update overwrites the buffer holding them with the
new parameters, or clears it). The chunk's per-parameter squared gradient norms are taken on the
training thread when it is launched, so when the backward ends, `opt.step()` knows the global
norm without reading any updated chunk again. Then:

- the norm is within `max_grad_norm` and finite (the usual case): the speculative updates were
  right, bit for bit (the same gradient scale as the step would have used), and their
  snapshots go;
- clipping fires: every chunk updated speculatively gets its snapshot back (states, gradients,
  step counts) and is updated again with the clipped gradients; the others are updated clipped
  as usual. The result equals updating after the backward, bit for bit;
- fp16 overflow: every speculative update is undone and the step skipped, as without the mode.

Why a snapshot rather than inverting the update: Adam's moments cannot be recovered from their
new values accurately when clipping shrinks the gradients a lot (v = (v' - (1-b2) g^2) / b2
cancels when v is small next to g^2, and the redo multiplies that error by 1/c^2 for a clip
factor c), so inversion misses the float-rounding bound exactly when clipping matters; a copy
is exact. Its costs: the state's bytes (12 per parameter for Adam and AGD, 6 for the 8-bit
optimizers) plus the gradient bytes per parameter, held from a
chunk's launch to the end of the backward, and one extra copy pass over them (measured in
bench_wrap's CPU group: see docs/wrap.md). Snapshots are taken from what the host budget
planned free; when a chunk's snapshot does not fit, it is not updated early (opt.step() does it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from heteromem.errors import OutOfMemory
from heteromem.memory.chunk import Chunk
from heteromem.memory.tiers import Tier


@dataclass(eq=False)
class Snapshot:
    """A chunk's state before its speculative update (filled on the worker)."""

    buffer: torch.Tensor              # uint8: master | each state region | gradients
    nbytes: int                       # reserved on the host tier for it
    sq_norms: list[torch.Tensor]      # each updated parameter's squared gradient norm
    launch: object = None             # the optimizer's record of how the update started
    source: torch.Tensor | None = None


@dataclass
class SpeculationStats:
    """Over the whole run: chunks updated speculatively, redone, and what the redos cost."""

    speculated: int = 0
    redone: int = 0
    undone: int = 0          # fp16 overflow: speculative updates undone, step skipped
    steps_redone: int = 0    # steps in which clipping fired after speculation
    redo_seconds: float = 0.0
    last_step_redone: int = 0
    history: list[int] = field(default_factory=list)  # chunks redone per step, last 100


class Speculation:
    """The snapshots of the chunks updated speculatively in this step."""

    def __init__(self, host_tier: Tier) -> None:
        self.tier = host_tier
        self.snapshots: dict[int, Snapshot] = {}  # id(chunk) -> its snapshot
        self.stats = SpeculationStats()

    def reserve(self, chunk: Chunk, source: torch.Tensor, sq_norms: list[torch.Tensor]
                ) -> Snapshot | None:
        """Room for the chunk's snapshot, or None when the host budget has none left (the
        chunk then waits for opt.step())."""
        nbytes = _states_bytes(chunk) + source.numel() * source.element_size()
        try:
            self.tier.reserve(nbytes, f"the snapshot of chunk {chunk.index} (clipping in "
                              "backward)", advice="raise host_memory")
        except OutOfMemory:
            return None
        snap = Snapshot(torch.empty(nbytes, dtype=torch.uint8, pin_memory=source.is_pinned()),
                        nbytes, sq_norms)
        self.snapshots[id(chunk)] = snap
        self.stats.speculated += 1
        return snap

    def sq_norms(self) -> dict[int, list[torch.Tensor]]:
        """id(chunk) -> the squared norms of its gradients, taken when it was launched."""
        return {key: snap.sq_norms for key, snap in self.snapshots.items()}

    def finish(self, redone: int) -> None:
        """The step is decided: the snapshots go."""
        for snap in self.snapshots.values():
            self.tier.release(snap.nbytes)
        self.snapshots.clear()
        self.stats.last_step_redone = redone
        self.stats.history = (self.stats.history + [redone])[-100:]
        if redone:
            self.stats.steps_redone += 1


_PIECE_ALIGN = 16  # each piece of a snapshot starts aligned for its dtype's view


def _pieces(chunk: Chunk) -> list[tuple[torch.Tensor, int, int]]:
    """(live tensor, items it holds for the chunk, byte offset in the snapshot) for the
    master and every state region, in layout order."""
    out, offset = [], 0
    live = {"master": chunk.master, **chunk.states}
    for region in chunk.layout.regions:
        tensor, items = live[region.name], region.items(chunk.host_len)
        out.append((tensor, items, offset))
        offset += _aligned(items * tensor.element_size())
    return out


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _PIECE_ALIGN) * _PIECE_ALIGN


def _states_bytes(chunk: Chunk) -> int:
    """Bytes of a snapshot before its gradients."""
    tensor, items, offset = _pieces(chunk)[-1]
    return offset + _aligned(items * tensor.element_size())


def _view(snap: Snapshot, tensor: torch.Tensor, items: int, offset: int) -> torch.Tensor:
    return snap.buffer[offset:offset + items * tensor.element_size()].view(tensor.dtype)


def take(snap: Snapshot, chunk: Chunk, source: torch.Tensor) -> None:
    """Copies what the update will change into the snapshot (on the worker, first)."""
    for tensor, items, offset in _pieces(chunk):
        _view(snap, tensor, items, offset).copy_(tensor[:items])
    grads = snap.buffer[_states_bytes(chunk):].view(source.dtype)
    grads.copy_(source.reshape(-1))
    snap.source = source


def put_back(snap: Snapshot, chunk: Chunk) -> float:
    """The chunk's states and gradients as they were before the speculative update; returns
    the seconds it took."""
    start = time.perf_counter()
    n = chunk.host_len
    for tensor, items, offset in _pieces(chunk):
        tensor[:items].copy_(_view(snap, tensor, items, offset))
    source = snap.source
    source.reshape(-1).copy_(snap.buffer[_states_bytes(chunk):].view(source.dtype))
    if chunk.dtype != torch.float32 and source.data_ptr() != chunk.host.data_ptr():
        # The host buffer took the speculative parameters: they come back from the master.
        chunk.host[:n].copy_(chunk.master[:n])
    return time.perf_counter() - start
