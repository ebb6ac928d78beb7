"""`hm.report(model)`: bytes per tier (budget, current, peak), bytes moved, stall time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from heteromem.errors import format_bytes


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
        for key, value in self.details.items():
            lines.append(f"{key}: {format_bytes(value)}")
        return "\n".join(lines)


def report(model: torch.nn.Module) -> Report:
    """The memory report of a model returned by `hm.wrap`."""
    state = getattr(model, "_heteromem", None)
    if state is None:
        raise ValueError("hm.report: this model was not wrapped with hm.wrap")
    return state.report()
