"""`hm.report(model)`: bytes per tier (budget, current, peak), bytes moved, stall time, and
a memory timeline of one iteration (`Report.plot` draws it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from heteromem.errors import format_bytes
from heteromem.memory.timeline import MemoryTimeline
from heteromem.runtime.wrapped import wrapped_state


@dataclass
class TierReport:
    budget_bytes: int | None
    current_bytes: int
    peak_bytes: int


@dataclass
class Report:
    """Memory and traffic of one wrapped model; `str()` is a readable table."""

    tiers: dict[str, TierReport]
    bytes_h2d: int
    bytes_d2h: int
    stall_seconds: float
    chunks: int = 0
    chunk_bytes: int = 0
    resident_chunks: int = 0
    state_chunks_on_device: int = 0   # chunks updated on the device (optimizer state there)
    details: dict[str, int] = field(default_factory=dict)
    # The NVMe tier: chunks whose image lives there, the host cache's hit rate (reads served
    # without the disk) and the bytes read and written over the last whole iteration.
    nvme_chunks: int = 0
    host_cache_hit_rate: float | None = None
    nvme_bytes_per_step: tuple[int, int] | None = None
    # step_in_backward with clipping or fp16: chunk updates made during backward before the
    # norm was known, those redone because clipping fired (or undone: fp16 overflow,
    # zero_grad), and the seconds spent putting them back (over the whole run).
    speculative_updates: int = 0
    updates_redone: int = 0
    updates_undone: int = 0
    redo_seconds: float = 0.0
    # Per-tier bytes, stalls and phases over the latest iteration (see MemoryTimeline).
    timeline: MemoryTimeline | None = None
    # Sharded over ranks: this rank, how many, and the bytes its collectives sent and
    # received (ring-equivalent: (N-1)/N of each gathered or reduced chunk).
    rank: int = 0
    world_size: int = 1
    bytes_sent: int = 0
    bytes_received: int = 0

    def __str__(self) -> str:
        lines = [f"{'tier':<8}{'budget':>14}{'current':>14}{'peak':>14}"]
        for name, t in self.tiers.items():
            budget = "unbounded" if t.budget_bytes is None else format_bytes(t.budget_bytes)
            lines.append(f"{name:<8}{budget:>14}{format_bytes(t.current_bytes):>14}"
                         f"{format_bytes(t.peak_bytes):>14}")
        lines.append(f"chunks: {self.chunks} of {format_bytes(self.chunk_bytes)} "
                     f"({self.resident_chunks} on the device now, {self.state_chunks_on_device} "
                     "with their optimizer state there)")
        lines.append(f"moved: host->device {format_bytes(self.bytes_h2d)}, "
                     f"device->host {format_bytes(self.bytes_d2h)}; "
                     f"stalled {self.stall_seconds:.3f} s waiting for copies/updates")
        if self.world_size > 1:
            lines.append(f"rank {self.rank} of {self.world_size}: sent "
                         f"{format_bytes(self.bytes_sent)}, received "
                         f"{format_bytes(self.bytes_received)} in collectives")
        if self.nvme_chunks:
            rate = ("-" if self.host_cache_hit_rate is None
                    else f"{self.host_cache_hit_rate:.0%}")
            per_step = ("-" if self.nvme_bytes_per_step is None else
                        f"read {format_bytes(self.nvme_bytes_per_step[0])}, written "
                        f"{format_bytes(self.nvme_bytes_per_step[1])}")
            lines.append(f"nvme: {self.nvme_chunks} chunk(s) there; host cache hit rate {rate}; "
                         f"last step {per_step}")
        if self.speculative_updates:
            lines.append(f"updates during backward: {self.speculative_updates} speculative, "
                         f"{self.updates_redone} redone (clipping fired), {self.updates_undone} "
                         f"undone; {self.redo_seconds:.3f} s putting them back")
        for key, value in self.details.items():
            lines.append(f"{key}: {format_bytes(value)}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> str | os.PathLike:
        """Draws the memory timeline to `path` (any format matplotlib writes: .png, .svg,
        .pdf) and returns `path`: one panel per tier with its reserved bytes over the
        iteration, the budget dashed where bounded, the periods the training thread stalled
        shaded, and where forward, backward and step began. Needs matplotlib
        (`pip install matplotlib`); it draws off-screen, never opening a window."""
        from heteromem.runtime.plot import plot_timeline

        if self.timeline is None:
            raise ValueError("Report.plot: this report has no memory timeline; take it with "
                             "hm.report(model) after a training step")
        budgets = {name: t.budget_bytes for name, t in self.tiers.items()}
        return plot_timeline(self.timeline, budgets, path, title=title)


def report(model: torch.nn.Module) -> Report:
    """The memory report of a model returned by `hm.wrap`."""
    return wrapped_state(model, "hm.report").report()
