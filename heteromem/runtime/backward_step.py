"""`hm.wrap(..., step_in_backward=True)`: each chunk's update starts during backward.

Without it, `opt.step()` starts the updates once the whole backward is done, because clipping
and the fp16 overflow check need the global norm first and gradient accumulation may add more
gradients. A user who declares that every backward pass is a step, with neither clipping nor
fp16, lets the CPU Adam of the last layers run while autograd is still on the first ones.

When is a chunk's gradient complete? A parameter normally gets one gradient per backward, but
one used by several reentrant checkpoint segments gets one per segment. So the count each
parameter got in the previous step is the expectation for this one: a chunk is updated as soon
as every trainable parameter in it has received that many (and at least one) gradients. A chunk
with a parameter that got none last step, or more than expected now, waits for `opt.step()`.
The first step has no expectation and runs entirely in `opt.step()`.

The contract is checked: a gradient arriving for a chunk already updated in this backward, a
new forward (with autograd on) between a backward and `opt.step()` (gradient accumulation),
and `opt.zero_grad()` after updates have begun each raise, naming what to change. The chunks
updated by then stay updated (each one whole, with its step count): nothing is half-applied.
After a backward pass that failed (that error, or any other) once updates had begun,
`opt.zero_grad()` is allowed: it drops the gradients of the chunks not updated yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from heteromem.errors import StepInBackwardError
from heteromem.memory.chunk import ParamSlot

if TYPE_CHECKING:
    from heteromem.runtime.optimizer import WrappedOptimizer


class StepInBackward:
    def __init__(self, optimizer: WrappedOptimizer) -> None:
        self.optimizer = optimizer
        # id(slot) -> gradients received: in the last step (the expectation), in this one.
        self._expected: dict[int, int] = {}
        self._received: dict[int, int] = {}
        # id(chunk) -> gradients it still expects in this step; absent: not updated early.
        self._remaining: dict[int, int] = {}
        self._updated: set[int] = set()  # id(chunk) updated during this step's backward
        self.chunks_updated = 0          # over the whole run (tests, NOTES)
        # A gradient came for a chunk already updated: this step's backward was aborted, and
        # zero_grad() may drop what is left of it.
        self._broken = False
        # Backward passes (autograd graph tasks) begun and not ended: one left open after the
        # training loop has it back was aborted by an error, which zero_grad() may clean up too.
        self._open_passes = 0

    # ------------------------------------------------------------------ hooks

    def before_forward(self) -> None:
        """A forward with autograd on: refused once updates of this step have begun (before
        that, it is the next micro-batch of gradient accumulation)."""
        if self._updated and self._open_passes > 0:
            raise StepInBackwardError(
                "heteromem: the last backward pass failed after its optimizer updates had begun "
                "(step_in_backward=True); call opt.zero_grad() to drop the rest of that step "
                "before the next forward")
        if self._updated:
            raise StepInBackwardError(
                "heteromem: a new forward with gradients enabled started after this step's "
                "updates had begun (step_in_backward=True). Updates begin when a chunk has as "
                "many gradients as in the step before, so gradient accumulation needs the same "
                "number of micro-batches every step; call opt.step() now, or wrap with "
                "step_in_backward=False (run evaluation forwards under torch.no_grad())")

    def pass_started(self) -> None:
        self._open_passes += 1

    def pass_ended(self) -> None:
        self._open_passes -= 1

    def before_grad(self, slot: ParamSlot) -> None:
        if id(slot.chunk) in self._updated:
            self._broken = True
            raise StepInBackwardError(
                f"heteromem: parameter {slot.name!r} got a gradient after its chunk was "
                "already updated in this backward pass (step_in_backward=True expects each "
                "parameter to get as many gradients per step as in the step before, e.g. from "
                "the same checkpointed segments). The chunks updated so far keep their update; "
                "call opt.zero_grad() to drop the rest of this step, and wrap with "
                "step_in_backward=False for a model whose gradient pattern changes")

    def after_grad(self, slot: ParamSlot) -> None:
        if slot.group < 0:
            return
        key = id(slot)
        received = self._received[key] = self._received.get(key, 0) + 1
        chunk = slot.chunk
        left = self._remaining.get(id(chunk))
        if left is None:
            return
        if received > self._expected.get(key, 0):
            del self._remaining[id(chunk)]  # more than last step: wait for opt.step()
            return
        self._remaining[id(chunk)] = left - 1
        if left == 1:
            del self._remaining[id(chunk)]
            if self.optimizer.update_during_backward(chunk):
                self._updated.add(id(chunk))
                self.chunks_updated += 1

    # ------------------------------------------------------------------ optimizer

    def before_zero_grad(self) -> None:
        aborted = self._broken or self._open_passes > 0
        if self._updated and not aborted and self.optimizer.undo_speculation():
            self._updated = set()  # speculative: put back, so the step can be dropped
        if self._updated and not aborted:
            raise StepInBackwardError(
                f"heteromem: opt.zero_grad() was called after {len(self._updated)} chunk(s) "
                "were already updated during this backward pass (step_in_backward=True), and "
                "an update cannot be taken back: call opt.step() to finish the step first, or "
                "wrap with step_in_backward=False to be able to drop a step's gradients")
        if self._broken:
            self._expected = {}  # the gradient pattern changed: learn it again in one step
        self._new_step()

    def step_taken(self) -> None:
        """`opt.step()` ran: this step's gradient counts are the next step's expectation."""
        self._expected = self._received
        self._new_step()

    def forget(self) -> None:
        """The chunks and slots were re-packed (new objects): the counts, keyed by the old
        ones, are dropped, and the next step learns them again in opt.step()."""
        self._expected = {}
        self._new_step()

    def _new_step(self) -> None:
        """Nothing received or updated yet; each chunk that can be updated in backward gets
        the number of gradients it expects."""
        self._received, self._updated = {}, set()
        self._broken, self._open_passes = False, 0
        self._remaining = {}
        for chunk in self.optimizer._chunks():
            counts = [self._expected.get(id(s), 0) for s in chunk.slots
                      if s.trainable and s.group >= 0]
            if counts and min(counts) >= 1:
                self._remaining[id(chunk)] = sum(counts)
