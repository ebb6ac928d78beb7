"""The optimizer's update worker: most urgent (lowest priority value) first, FIFO among
equals, failures handed to the waiter, and a thread that comes and goes with the work."""

from __future__ import annotations

import threading
import time

import pytest

from heteromem.runtime import update_queue
from heteromem.runtime.update_queue import UpdateQueue


def test_pending_work_runs_by_priority_then_submission_order():
    queue = UpdateQueue()
    gate = threading.Event()
    ran = []
    first = queue.submit(0, gate.wait)  # holds the worker while the rest queue up
    futures = [queue.submit(p, ran.append, name)
               for p, name in [(5, "e"), (1, "b"), (3, "d"), (1, "c"), (0, "a")]]
    gate.set()
    first.result(timeout=10)
    for f in futures:
        f.result(timeout=10)
    assert ran == ["a", "b", "c", "d", "e"]


def test_a_failure_reaches_whoever_waits_and_later_work_still_runs():
    queue = UpdateQueue()

    def fail() -> None:
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        queue.submit(0, fail).result(timeout=10)
    assert queue.submit(0, lambda: 7).result(timeout=10) == 7


def test_the_thread_ends_when_idle_and_a_new_one_takes_later_work(monkeypatch):
    monkeypatch.setattr(update_queue, "LINGER_SECONDS", 0.01)
    queue = UpdateQueue(name="hm-test-queue")
    assert queue.submit(0, lambda: 1).result(timeout=10) == 1
    deadline = time.monotonic() + 10
    while any(t.name == "hm-test-queue" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the idle worker thread never ended"
        time.sleep(0.01)
    assert queue.submit(0, lambda: 2).result(timeout=10) == 2
