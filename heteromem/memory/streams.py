"""Copies between the host and the device tier.

On CUDA, copies run on a dedicated copy stream and return an event; the compute stream (or
the CPU) waits on that event only when it needs the data. On a CPU "device" (tests, CI) the
same calls copy at once and return None, so the chunk logic above is identical.
"""

from __future__ import annotations

import time

import torch


class CopyEngine:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.bytes_h2d = 0
        self.bytes_d2h = 0
        self.stall_seconds = 0.0

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
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def h2d(self, dst: torch.Tensor, src: torch.Tensor, after: object = None) -> object:
        self.bytes_h2d += src.numel() * src.element_size()
        return self._copy(dst, src, after=after, after_compute=True)

    def d2h(self, dst: torch.Tensor, src: torch.Tensor) -> object:
        self.bytes_d2h += src.numel() * src.element_size()
        return self._copy(dst, src, after_compute=True)

    def wait_for_device_use(self, event: object) -> None:
        """Makes device data filled by `event` safe for the compute stream. A copy still in
        flight is a stall: the CPU waits for it and the time is counted."""
        if event is None:
            return
        if not event.query():
            start = time.perf_counter()
            event.synchronize()
            self.stall_seconds += time.perf_counter() - start
        torch.cuda.current_stream(self.device).wait_event(event)

    def wait_for_host_use(self, event: object) -> None:
        """Blocks until host data filled by `event` has landed."""
        if event is None:
            return
        start = time.perf_counter()
        event.synchronize()
        self.stall_seconds += time.perf_counter() - start
