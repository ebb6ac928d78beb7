"""Copies between the host and the device tier.

On CUDA, copies run on a dedicated copy stream and return an event; the compute stream (or
the CPU) waits on that event only when it needs the data. On a CPU "device" (tests, CI) the
same calls copy at once and return None, so the chunk logic above is identical.

The compute stream waits for a copy on the GPU, never through the CPU: a host-side wait would
drain the queue of kernels the CPU has launched ahead, and every later launch and hook would
then cost GPU time. How long the compute stream stood waiting is measured with timing events
on both streams and read back once those events are done (`stall_seconds`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class CopyEngine:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.bytes_h2d = 0
        self.bytes_d2h = 0
        self._stall_seconds = 0.0
        # (copy done, compute reached the wait) event pairs not yet read back.
        self._waits: list[tuple[object, object]] = []
        # Called with (start, end, "copy") for each CPU-side wait (the memory timeline).
        self.on_stall: Callable[[float, float, str], None] | None = None

    @property
    def stall_seconds(self) -> float:
        """Seconds the compute stream (or the CPU) waited for copies. Copy waits still
        queued on the GPU are read once they have happened."""
        self._collect(block=False)
        return self._stall_seconds

    def _collect(self, block: bool) -> None:
        pending = []
        for done, reached in self._waits:
            if not block and not (done.query() and reached.query()):
                pending.append((done, reached))
                continue
            if block:
                done.synchronize()
                reached.synchronize()
            # Positive when the copy finished after the compute stream got to the wait.
            self._stall_seconds += max(0.0, reached.elapsed_time(done)) / 1e3
        self._waits = pending

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: object = None,
              after_compute: bool = False) -> object:
        if not self.cuda:
            dst.copy_(src)
            return None
        if after_compute:
            # NOTE: the source or destination was last touched by kernels on the compute
            # stream (gradients written, or a slab freed after use): order after them.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
        return event

    def h2d(self, dst: torch.Tensor, src: torch.Tensor, after: object = None) -> object:
        self.bytes_h2d += src.numel() * src.element_size()
        return self._copy(dst, src, after=after, after_compute=True)

    def d2h(self, dst: torch.Tensor, src: torch.Tensor) -> object:
        self.bytes_d2h += src.numel() * src.element_size()
        return self._copy(dst, src, after_compute=True)

    def wait_for_device_use(self, event: object) -> None:
        """Makes device data filled by `event` safe for the compute stream: the stream waits
        on the GPU, the CPU goes on launching. The wait is timed on the GPU (see class doc)."""
        if event is None or event.query():
            return  # the copy has landed: nothing to wait for
        stream = torch.cuda.current_stream(self.device)
        reached = torch.cuda.Event(enable_timing=True)
        reached.record(stream)
        stream.wait_event(event)
        self._waits.append((event, reached))
        if len(self._waits) > 256:  # bounded: old pairs are long done
            self._collect(block=True)

    def wait_for_host_use(self, event: object) -> None:
        """Blocks until host data filled by `event` has landed."""
        if event is None:
            return
        start = time.perf_counter()
        event.synchronize()
        end = time.perf_counter()
        self._stall_seconds += end - start
        if self.on_stall is not None:
            self.on_stall(start, end, "copy")
