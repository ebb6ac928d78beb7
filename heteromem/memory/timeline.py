"""A memory timeline of one iteration: each tier's reserved bytes after every change, the
periods the training thread stalled, and the phases (forward, backward, step).

Recording is always on and cheap: a timestamp and a list append per tier reservation or
release (per chunk move, never per element) and per stall. Only two iterations are ever
kept, the one running and the last one that ended, so memory stays bounded however long
training runs. An iteration starts at the model's forward (where the chunk-order trace starts
one too) and lasts until the next forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from heteromem.memory.tiers import Tier

# An iteration that never ends (the wrapped model's own forward is never called, only its
# submodules') stops recording here instead of growing without bound.
MAX_EVENTS = 1_000_000


@dataclass
class MemoryTimeline:
    """One iteration, times in seconds since it started.

    `tiers`: tier name -> [(time, reserved bytes)], starting with the bytes at time 0, one
    point per change, and the bytes at `duration`. `stalls`: [(start, end, what)] for the
    periods the training thread waited ("copy": a device-to-host copy, "update": a chunk's
    optimizer update, "nvme": a state read or write). `phases`: [(time, name)] where forward,
    backward and step began.
    """

    duration: float
    tiers: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    stalls: list[tuple[float, float, str]] = field(default_factory=list)
    phases: list[tuple[float, str]] = field(default_factory=list)


class _Iteration:
    __slots__ = ("start", "end", "samples", "stalls", "phases", "events", "stepped")

    def __init__(self, tiers: list[Tier]) -> None:
        self.start = time.perf_counter()
        self.end: float | None = None
        self.samples = {t.name: [(self.start, t.current)] for t in tiers}
        self.stalls: list[tuple[float, float, str]] = []
        self.phases: list[tuple[float, str]] = [(self.start, "forward")]
        self.events = 0
        self.stepped = False


class TimelineRecorder:
    """Records into the current iteration; `new_iteration` keeps it as the last complete one."""

    def __init__(self, tiers: list[Tier]) -> None:
        self.tiers: list[Tier] = []
        self._current = _Iteration([])
        self._last: _Iteration | None = None
        for tier in tiers:
            self.add_tier(tier)

    def add_tier(self, tier: Tier) -> None:
        self.tiers.append(tier)
        self._current.samples[tier.name] = [(self._current.start, tier.current)]
        tier.recorder = self.sample

    def sample(self, tier: Tier) -> None:
        """Called by `tier` after each reserve/release."""
        it = self._current
        if it.events < MAX_EVENTS:
            it.events += 1
            it.samples[tier.name].append((time.perf_counter(), tier.current))

    def stall(self, start: float, end: float, what: str) -> None:
        """The training thread waited from `start` to `end` (`time.perf_counter()` values)."""
        it = self._current
        if it.events < MAX_EVENTS:
            it.events += 1
            it.stalls.append((start, end, what))

    def mark(self, phase: str) -> None:
        """`phase` ("backward", "step") begins now; repeats of the running phase are dropped."""
        it = self._current
        if it.phases[-1][1] != phase:
            it.phases.append((time.perf_counter(), phase))
        if phase == "step":
            it.stepped = True

    def new_iteration(self) -> None:
        """A forward of the wrapped model begins: the running iteration becomes the last one."""
        it = self._current
        it.end = time.perf_counter()
        self._last = it
        self._current = _Iteration(self.tiers)

    def snapshot(self) -> MemoryTimeline:
        """The running iteration, up to now, if it got to an optimizer step (the usual moment
        to ask: after `opt.step()`), else the last iteration that ended, else what the running
        one has so far."""
        it = self._current
        if not it.stepped and self._last is not None:
            it = self._last
        end = it.end if it.end is not None else time.perf_counter()  # running: up to now
        t0 = it.start
        tiers = {}
        for name, points in it.samples.items():
            series = [(t - t0, nbytes) for t, nbytes in points]
            series.append((end - t0, points[-1][1]))
            tiers[name] = series
        return MemoryTimeline(duration=end - t0, tiers=tiers,
                              stalls=[(max(s - t0, 0.0), e - t0, what) for s, e, what in it.stalls],
                              phases=[(t - t0, name) for t, name in it.phases])
