"""The order in which chunks are used in one iteration (a forward and its backward), and
next-use distances taken from the previous iteration's order for furthest-next-use
(Belady) eviction and prefetching.

When the current iteration departs from the recorded order (a different module order, a
different branch), the reference is no longer trusted for the rest of the iteration:
eviction falls back to least-recently-used, and the new order replaces the old one when the
iteration ends. Eviction choices only affect speed, never which data is used.
"""

from __future__ import annotations

import bisect


class Trace:
    def __init__(self) -> None:
        self.reference: list[int] = []       # the previous iteration's order
        self._positions: dict[int, list[int]] = {}
        self.current: list[int] = []
        self.diverged = True                  # no reference yet
        self.last_use: dict[int, int] = {}

    def record(self, chunk: int) -> None:
        k = len(self.current)
        if not self.diverged and (k >= len(self.reference) or self.reference[k] != chunk):
            self.diverged = True
        self.current.append(chunk)
        self.last_use[chunk] = k

    def new_iteration(self) -> None:
        if self.current:
            if self.diverged or self.current != self.reference:
                self.reference = self.current
                self._positions = {}
                for i, c in enumerate(self.reference):
                    self._positions.setdefault(c, []).append(i)
            self.diverged = False
        self.current = []
        self.last_use = {}

    def eviction_key(self, chunk: int) -> float:
        """Larger means a better chunk to evict now."""
        k = len(self.current)
        if self.diverged:
            return float(k - self.last_use.get(chunk, -1))  # least recently used
        uses = self._positions.get(chunk, [])
        i = bisect.bisect_left(uses, k)
        return float("inf") if i == len(uses) else float(uses[i] - k)

    def upcoming(self, count: int) -> list[int]:
        """The next `count` distinct chunks the reference expects after the current position."""
        if self.diverged:
            return []
        out: list[int] = []
        # NOTE: indexes, not a slice: this runs at every acquire, and a slice would copy the
        # rest of the trace each time.
        for i in range(len(self.current), len(self.reference)):
            c = self.reference[i]
            if c not in out:
                out.append(c)
                if len(out) == count:
                    break
        return out

    def first_use_order(self) -> list[int]:
        seen: dict[int, None] = {}
        for c in self.reference or self.current:
            seen.setdefault(c, None)
        return list(seen)
