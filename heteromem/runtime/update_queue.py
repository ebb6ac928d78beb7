"""The worker thread that runs the CPU optimizer updates, most urgent first.

Updates are queued with a priority: the position of their chunk in the forward order. When
`step()` queues every chunk at once, that is first-in first-out. When updates start during
backward (`step_in_backward`), chunks complete in reverse forward order; the worker then
always takes the pending chunk the next forward needs first, so the forward's first layers do
not wait behind the last layers' updates.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future
from typing import Callable

# Seconds the worker waits for more work before its thread ends (a new one starts on demand).
LINGER_SECONDS = 0.1


class UpdateQueue:
    """One worker thread running submitted calls in order of (priority, submission)."""

    def __init__(self, name: str = "heteromem-adam") -> None:
        self._name = name
        self._heap: list[tuple[int, int, Future, Callable, tuple]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, priority: int, fn: Callable, *args) -> Future:
        """Queues `fn(*args)`; lower `priority` runs first. Returns its future."""
        future: Future = Future()
        with self._cond:
            heapq.heappush(self._heap, (priority, next(self._order), future, fn, args))
            if self._thread is None:
                # NOTE: the thread ends once idle for LINGER_SECONDS, so nothing has to shut it
                # down, and the interpreter's exit waits for queued updates (a daemon thread
                # would be killed inside a torch op, which aborts the process).
                self._thread = threading.Thread(target=self._run, name=self._name)
                self._thread.start()
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._heap:
                    self._cond.wait(LINGER_SECONDS)
                if not self._heap:
                    self._thread = None
                    return
                _, _, future, fn, args = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue
            _call(future, fn, args)
            # NOTE: the call and its arguments (chunks, tensors) must not outlive the call in
            # this frame while the thread lingers: dropping a model frees them at once.
            del fn, args, future


def _call(future: Future, fn: Callable, args: tuple) -> None:
    try:
        result = fn(*args)
    except BaseException as exc:  # handed to whoever waits on the future
        future.set_exception(exc)
    else:
        future.set_result(result)
