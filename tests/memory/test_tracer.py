"""The trace of chunk uses drives furthest-next-use (Belady) eviction and prefetching: the
previous iteration's order predicts the next uses; once the current iteration departs from
it, eviction falls back to least-recently-used and the new order replaces the old one."""

from __future__ import annotations

import math

from heteromem.memory.tracer import Trace


def _trace(order: list[int]) -> Trace:
    trace = Trace()
    for chunk in order:
        trace.record(chunk)
    trace.new_iteration()
    return trace


def test_furthest_next_use_is_evicted_first():
    trace = _trace([0, 1, 2, 0, 3])
    trace.record(0)
    keys = {c: trace.eviction_key(c) for c in range(5)}
    # Next uses after position 1: chunk 1 at 1, chunk 2 at 2, chunk 0 at 3, chunk 3 at 4.
    assert keys[3] > keys[0] > keys[2] > keys[1]
    assert max(range(4), key=keys.get) == 3
    assert keys[4] == math.inf  # never used again: the best victim of all


def test_a_chunk_not_needed_again_this_iteration_is_the_best_victim():
    trace = _trace([0, 1, 2, 0, 3])
    for chunk in (0, 1, 2, 0):
        trace.record(chunk)
    assert trace.eviction_key(1) == math.inf and trace.eviction_key(2) == math.inf
    assert trace.eviction_key(0) == math.inf
    assert trace.eviction_key(3) == 0  # needed right now


def test_prefetch_looks_ahead_in_the_reference():
    trace = _trace([0, 1, 2, 0, 3])
    trace.record(0)
    assert trace.upcoming(2) == [1, 2]
    assert trace.upcoming(3) == [1, 2, 0]
    assert trace.upcoming(10) == [1, 2, 0, 3]


def test_divergence_falls_back_to_least_recently_used():
    trace = _trace([0, 1, 2, 0, 3])
    trace.record(0)
    trace.record(2)  # the reference expected 1 here
    assert trace.upcoming(2) == []  # the reference no longer predicts anything
    keys = {c: trace.eviction_key(c) for c in range(4)}
    # Unused this iteration (1, 3) before the least recently used (0) before the latest (2).
    assert keys[1] == keys[3] > keys[0] > keys[2]


def test_the_new_order_replaces_the_reference_after_divergence():
    trace = _trace([0, 1, 2, 0, 3])
    for chunk in (3, 2, 1, 0):
        trace.record(chunk)
    trace.new_iteration()
    assert trace.first_use_order() == [3, 2, 1, 0]
    trace.record(3)
    assert trace.upcoming(1) == [2]
    assert trace.eviction_key(0) > trace.eviction_key(1) > trace.eviction_key(2)


def test_running_past_the_reference_is_divergence():
    trace = _trace([0, 1])
    for chunk in (0, 1, 2):
        trace.record(chunk)
    assert trace.upcoming(1) == []
    assert trace.eviction_key(0) > trace.eviction_key(1) > trace.eviction_key(2)


def test_first_iteration_has_no_reference():
    trace = Trace()
    trace.record(0)
    trace.record(1)
    assert trace.upcoming(2) == []
    assert trace.eviction_key(0) > trace.eviction_key(1)  # LRU
    assert trace.first_use_order() == [0, 1]


def test_first_use_order_ignores_repeats():
    assert _trace([2, 0, 2, 1, 0]).first_use_order() == [2, 0, 1]
