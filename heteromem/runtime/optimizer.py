"""The optimizer `hm.wrap` returns: the optimizer it took over (torch's Adam/AdamW or one of
`heteromem.optim`'s, its `OptimizerKind`) running over chunks, pipelined with the next forward.

`step()` first knows the global gradient norm (clipping, fp16 overflow) because every gradient
is home by then; it then queues one fused update per chunk (chunk_update.py), in the order the forward
uses the chunks, on a worker thread, and returns. The next forward's hooks wait only for the
chunks they need, so the first layers compute while later chunks are still being updated.
Hyper-parameters are read from `param_groups` when `step()` is called, so LR schedulers work.
With `step_in_backward` (see backward_step.py) a chunk's update is queued as soon as its
gradients are complete during backward, and `step()` queues only the chunks left.

Chunks whose image is on NVMe are updated in `step()` itself, in a read-ahead pipeline through
the staging slots (or, with `step_in_backward`, one by one on the worker): their states are
read into a slot, updated there with the new parameters, written as a new image and committed.

A failed update never half-applies: each fused call (a run of parameters) is applied whole or
not at all, an NVMe chunk's update is committed whole or not at all, and what was not applied
keeps its values, step counts and gradients for `step()` to finish or `zero_grad()` to drop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from heteromem.errors import NotWrappedError, UpdateError, storage_error
from heteromem.memory.chunk import Chunk, HostState, ParamSlot
from heteromem.memory.manager import ChunkManager
from heteromem.runtime import optimizer_state
from heteromem.runtime.backward_step import StepInBackward
from heteromem.runtime.chunk_update import (Run, RunsFailed, apply_to_staging,
                                            finish_nvme_chunk, update_chunk, update_nvme_chunk)
from heteromem.runtime.optimizer_kind import OptimizerKind
from heteromem.runtime.scaler import LossScaler
from heteromem.runtime.speculation import Snapshot, Speculation, put_back
from heteromem.runtime.update_queue import UpdateQueue


@dataclass(frozen=True)
class _Launch:
    """What a chunk's update changed on the training thread when it was started, so that a
    failure can be put back: each slot's gradient location before the update took it, and
    the scale its gradients are divided by (a retried step must use the same)."""

    chunk: Chunk
    runs: list
    grad_scale: float
    slots: list[tuple[ParamSlot, str | None, bool, slice | None]]  # slot, grad_loc, reduced, range


class WrappedOptimizer(torch.optim.Optimizer):
    """The optimizer hm.wrap took over (`kind`: Adam, AdamW, AGD, AdamW8bit or Adam8bit),
    its state living in heteromem chunks.

    Use it like the optimizer it replaced: `step()`, `zero_grad()`, `param_groups`, LR
    schedulers, `state_dict()` (in that optimizer's own format). For fp16, call
    `opt.backward(loss)` to apply dynamic loss scaling.
    """

    def __init__(self, param_groups: list[dict], manager: ChunkManager, slots: list[ParamSlot],
                 *, kind: OptimizerKind, max_grad_norm: float | None,
                 scaler: LossScaler | None, step_in_backward: bool = False,
                 defaults: dict | None = None) -> None:
        super().__init__(param_groups, dict(kind.defaults if defaults is None else defaults))
        self.manager = manager
        self.slots = slots
        self.kind = kind
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler
        self._grads_scaled_by = 1.0
        self._worker = UpdateQueue()
        # Set when every backward pass is a step: updates then start during backward
        # (speculatively, when clipping or loss scaling needs the norm first).
        self.in_backward = StepInBackward(self) if step_in_backward else None
        self._speculation = Speculation(manager.host_tier) if step_in_backward else None
        self._order: dict[int, int] = {}  # chunk index -> place in the forward order
        # id(chunk) -> how its update in flight was started (see `_update_failed`).
        self._launched: dict[int, _Launch] = {}
        # A step that failed part-way: the gradient scale a retry must use (set while parts
        # of that step are unfinished, None otherwise).
        self._retry_scale: float | None = None
        # fp16: the step found no overflow; the loss scaler counts it once it is finished.
        self._scale_was_good = False
        manager.on_update_failed = self._update_failed
        # The global gradient norm of the last step (before clipping), when clipping or fp16
        # loss scaling needed it; None otherwise.
        self.last_grad_norm: float | None = None
        self.skipped_steps = 0
        # Why this optimizer can no longer be used (its model was unwrapped), or None.
        self.released: str | None = None

    def _check_usable(self, what: str) -> None:
        if self.released is not None:
            raise NotWrappedError(f"opt.{what}: {self.released}; this optimizer's state is gone. "
                                  "Wrap the model again for a new one")

    # ------------------------------------------------------------------ user API

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """`loss.backward()`, scaled by the dynamic loss scale in fp16 mode."""
        if self.scaler is None:
            loss.backward(**kwargs)
            return
        self._grads_scaled_by = self.scaler.scale
        (loss * self.scaler.scale).backward(**kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discards gradients gathered since the last step (parameters keep no `.grad`)."""
        self._check_usable("zero_grad()")
        if self.in_backward is not None:
            self.in_backward.before_zero_grad()
        self.manager.grads_home()
        for chunk in self._chunks():
            self._discard(chunk)
        self._grads_scaled_by = 1.0
        self._step_finished()

    @torch.no_grad()
    def step(self, closure=None):
        self._check_usable("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            for i, group in enumerate(self.param_groups):
                self.kind.check_group(group, f"opt.step(): param group {i}")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc}. Nothing was updated and the gradients are kept: fix "
                            "opt.param_groups and call opt.step() again") from None
        manager = self.manager
        manager.timeline.mark("step")
        manager.end_backward()
        manager.grads_home()
        # id(chunk) -> the buffer holding its gradients (taken once: it may gather them);
        # gradients the host cache spilled to NVMe are read by the NVMe step itself.
        sources = {id(c): src for c in self._chunks()
                   if (src := manager.grad_source(c)) is not None}
        chunks = [c for c in self._chunks() if id(c) in sources or c.grad_spill is not None]
        if self._retry_scale is not None:
            # Finishing a step that failed part-way: its norm, clipping and loss scale were
            # settled when it began, and the parts it did update must not count twice.
            grad_scale = self._retry_scale
        else:
            speculated = self._speculated_chunks()
            grad_scale = self._grad_scale(chunks, sources, speculated)
            if speculated:
                # Updated during backward before the norm was known: right as they are, or
                # put back and taken again below (clipped), or undone (fp16 overflow).
                reason = ("overflow" if grad_scale is None else
                          "clip" if grad_scale != self._unclipped_scale() else None)
                self._settle_speculation(speculated, reason, chunks, sources)
            if grad_scale is None:  # fp16 overflow: the step is skipped
                return loss
            self._scale_was_good = self.scaler is not None
        self._order = {index: k for k, index in enumerate(manager.trace.first_use_order())}
        chunks.sort(key=self._priority)
        runs = {id(c): self._runs(c) for c in chunks}
        # From here a failure of one chunk's update leaves the others' as they are: the
        # scale is kept until every chunk is done (see `_update_failed`, `_nvme_failed`).
        self._retry_scale = grad_scale
        on_nvme = [c for c in chunks if c.nvme is not None]
        if self.in_backward is not None:
            # Updates during backward: chunks on NVMe take the worker too, one at a time.
            for chunk in on_nvme:
                self._launch(chunk, sources.get(id(chunk)), runs[id(chunk)], grad_scale)
        elif manager.nvme is not None and (on_nvme or manager.agree_nvme is not None):
            # Sharded, every rank takes part (its NVMe chunks may have no gradient this step).
            self._nvme_step(on_nvme, sources, runs, grad_scale)
        for chunk in chunks:
            if chunk.nvme is None:
                self._launch(chunk, sources[id(chunk)], runs[id(chunk)], grad_scale)
        if self._scale_was_good:
            self.scaler.update(False)
        if manager.nvme is not None:
            manager.nvme.release_spilled_space()
        self._grads_scaled_by = 1.0
        self._step_finished()
        self._step_done()
        return loss

    def _nvme_step(self, chunks: list[Chunk], sources: dict, runs: dict,
                   grad_scale: float) -> None:
        """The chunks whose image is on NVMe, in a read-ahead pipeline in this thread; each
        chunk's update is committed as soon as its new image is written (see NvmeTier.step)."""
        manager = self.manager

        def update(c: Chunk, staging) -> None:
            apply_to_staging(c, sources.get(id(c)), runs[id(c)], grad_scale, self.kind,
                             staging)

        def committed(c: Chunk, staging) -> None:
            self._count_step(c)
            finish_nvme_chunk(c, sources.get(id(c)), staging, manager)
        try:
            manager.nvme.step(chunks, update, committed, agree=manager.agree_nvme)
        except (OSError, RunsFailed) as err:
            self._nvme_failed(err, grad_scale)

    def _unclipped_scale(self) -> float:
        """What gradients are divided by before clipping: the loss scale and, sharded, the
        number of ranks summed (the update uses their mean)."""
        return self._grads_scaled_by * self.manager.grad_divisor

    def _grad_scale(self, chunks: list[Chunk], sources: dict[int, torch.Tensor],
                    speculated: list[Chunk] = ()) -> float | None:
        """What this step divides the gradients by (loss scale, ranks, clipping); None when
        fp16 loss scaling found an overflow, in which case the step is skipped here (the
        caller undoes speculative updates). `speculated`: chunks updated during backward,
        whose squared norms were taken when they started."""
        # The global norm is one more pass over every gradient, on the critical path before
        # the first update: taken only when clipping or loss scaling needs it.
        norm = None
        divisor = self._unclipped_scale()
        if self.max_grad_norm is not None or self.scaler is not None:
            taken = self._speculation.sq_norms() if speculated else {}
            norm = self._global_norm(chunks, sources, taken) / divisor
        self.last_grad_norm = norm
        if self.scaler is not None and not math.isfinite(norm):
            self.scaler.update(True)
            self.skipped_steps += 1
            for chunk in chunks:
                self._discard(chunk)
            self._grads_scaled_by = 1.0
            self._step_done()
            return None
        if self.max_grad_norm is not None and math.isfinite(norm):
            # As torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).
            # (A non-finite norm is not clipped: the update propagates inf/nan as torch would.)
            return divisor / min(1.0, self.max_grad_norm / (norm + 1e-6))
        return divisor

    def _step_finished(self) -> None:
        """No part of a step is left unfinished (it completed, or zero_grad dropped it)."""
        self._retry_scale = None
        self._scale_was_good = False
        self.manager.unfinished_step = None

    @torch.no_grad()
    def update_during_backward(self, chunk: Chunk) -> bool:
        """Queues the update of a chunk whose gradients of this step are complete
        (step_in_backward): gradients still on the device are copied home first, and the
        worker waits for that copy, not the training thread. With clipping or fp16 loss
        scaling the update is speculative (speculation.py): its squared norms are taken now,
        its snapshot first on the worker. Returns whether it was queued (a speculative one
        is not for a chunk whose state is on the device or NVMe, or whose snapshot does not
        fit the host budget: opt.step() updates those)."""
        manager = self.manager
        snapshot = None
        if self._speculative:
            if chunk.states_on_device or chunk.nvme is not None:
                return False
            sq_norms = self._chunk_sq_norms(chunk)
        manager.send_home(chunk)
        landed, chunk.d2h_event = chunk.d2h_event, None
        source = manager.grad_source(chunk)
        if self._speculative:
            snapshot = self._speculation.reserve(chunk, source, sq_norms)
            if snapshot is None:
                chunk.d2h_event = landed
                return False
        runs = self._runs(chunk)
        self._launch(chunk, source, runs, self._unclipped_scale(), landed, snapshot)
        return True

    @property
    def _speculative(self) -> bool:
        return self.in_backward is not None and (
            self.max_grad_norm is not None or self.scaler is not None)

    def _chunk_sq_norms(self, chunk: Chunk) -> list[torch.Tensor]:
        """Each of the chunk's gradients' squared norm (fp64 scalars, on whichever tier holds
        that gradient: no synchronisation here)."""
        out = []
        for slot, sl in self.manager.grad_ranges(chunk):
            if slot.grad_loc == "device":
                grads = chunk.device_view()
            elif slot.grad_loc == "acc":
                grads = chunk.acc
            else:
                self.manager.grads_home_of(chunk)
                grads = chunk.host
            out.append(torch.linalg.vector_norm(grads[sl], dtype=torch.float32).double() ** 2)
        return out

    def undo_speculation(self) -> bool:
        """opt.zero_grad() after speculative updates: they are put back (their gradients
        dropped next). Returns False when there are none (updates without clipping or loss
        scaling cannot be taken back)."""
        if not self._speculative or not self._speculation.snapshots:
            return False
        self._settle_speculation(self._speculated_chunks(), "dropped", [], {})
        return True

    def _speculated_chunks(self) -> list[Chunk]:
        """The chunks updated speculatively in this step, their updates finished (a failed
        one raises here, put back)."""
        if not self._speculative or not self._speculation.snapshots:
            return []
        chunks = [c for c in self._chunks() if id(c) in self._speculation.snapshots]
        for chunk in chunks:
            self.manager._wait_update(chunk)
        return chunks

    def _settle_speculation(self, speculated: list[Chunk], reason: str | None,
                            chunks: list[Chunk], sources: dict) -> None:
        """Keeps the speculative updates (`reason` None), or puts them back: their states,
        gradients and step counts as before them. Clipping fired ("clip"): they join `chunks`
        (with their gradient sources) to be updated again, clipped. fp16 overflow
        ("overflow"): their gradients go, as the step is skipped. zero_grad() ("dropped"):
        it drops their gradients next."""
        spec = self._speculation
        redone = 0
        if reason is not None:
            start = time.perf_counter()
            for chunk in speculated:
                snap = spec.snapshots[id(chunk)]
                put_back(snap, chunk)
                self._restore_slots(snap.launch, 0)
                redone += 1
                if reason == "clip":
                    sources[id(chunk)] = self.manager.grad_source(chunk)
                    chunks.append(chunk)
                elif reason == "overflow":
                    self._discard(chunk)
            end = time.perf_counter()
            self.manager.timeline.stall(start, end, "redo")
            spec.stats.redo_seconds += end - start
            if reason == "clip":
                spec.stats.redone += redone
            else:
                spec.stats.undone += redone
        spec.finish(redone if reason == "clip" else 0)

    def _step_done(self) -> None:
        if self.in_backward is not None:
            self.in_backward.step_taken()

    def _priority(self, chunk: Chunk) -> int:
        """The chunk's place in the forward order as of the last step (chunks the trace had
        not seen go last)."""
        return self._order.get(chunk.index, len(self._order) + chunk.index)

    @staticmethod
    def _count_step(chunk: Chunk) -> None:
        """The update of `chunk` is committed: its parameters' step counts move on and its
        gradients are consumed."""
        for slot in chunk.slots:
            if slot.has_grad and slot.group >= 0:
                slot.step += 1
            slot.grad_loc, slot.reduced = None, False

    def _launch(self, chunk: Chunk, source: torch.Tensor, runs: list[Run], grad_scale: float,
                landed: object = None, snapshot: Snapshot | None = None) -> None:
        """Starts the update of a host- or device-state chunk (not NVMe): its step counts move
        on and its gradients are taken. `landed`: the CUDA event of the copy that brought its
        gradients home, if not yet waited for."""
        ranges = {id(slot): sl for slot, sl in self.manager.grad_ranges(chunk)}
        launch = _Launch(chunk, runs, grad_scale,
                         [(s, s.grad_loc, s.reduced, ranges.get(id(s))) for s in chunk.slots])
        self._count_step(chunk)
        chunk.move_host(HostState.UPDATING)
        if chunk.nvme is not None:
            # Read, update, write and commit its image on the worker (the host buffer holding
            # its gradients stays put: the host cache does not evict a chunk in UPDATING).
            self._launched[id(chunk)] = launch
            chunk.update = self._worker.submit(self._priority(chunk), update_nvme_chunk,
                                               chunk, source, runs, grad_scale, self.kind,
                                               landed, self.manager)
        elif chunk.states_on_device:
            # The CUDA kernel, queued on the current stream: nothing to wait for on the host.
            try:
                update_chunk(chunk, source, runs, grad_scale, self.kind)
            except RunsFailed as exc:
                self._roll_back(launch, exc.done)
                raise self._failure(chunk, exc.cause) from exc.cause
        else:
            # NOTE: the worker gets the chunk and tensors, not the optimizer: a model dropped
            # while its updates run is freed as soon as they end.
            self._launched[id(chunk)] = launch
            if snapshot is not None:
                snapshot.launch = launch
            chunk.update = self._worker.submit(self._priority(chunk), update_chunk, chunk,
                                               source, runs, grad_scale, self.kind, landed,
                                               snapshot)

    def _update_failed(self, chunk: Chunk, exc: BaseException) -> None:
        """Called on the training thread by the manager when it finds that the update of
        `chunk` on the worker failed: puts back what that update did not do, and raises."""
        launch = self._launched.pop(id(chunk))
        done = exc.done if isinstance(exc, RunsFailed) else 0
        cause = exc.cause if isinstance(exc, RunsFailed) else exc
        snap = self._speculation.snapshots.pop(id(chunk), None) if self._speculation else None
        if snap is None:
            self._roll_back(launch, done)
            raise self._failure(chunk, cause) from cause
        # A speculative update: everything goes back as it was before it. The step's scale
        # is not settled yet (the norm is taken in opt.step()), so a retry takes it anew.
        if snap.source is not None:
            put_back(snap, chunk)
        self._speculation.tier.release(snap.nbytes)
        self._restore_slots(launch, 0)
        self.manager.unfinished_step = (
            "an optimizer update made during the last backward failed (see the error it "
            "raised): call opt.step() to take the step, or opt.zero_grad() to drop it, "
            "before the next forward")
        raise self._failure(chunk, cause) from cause

    def _roll_back(self, launch: _Launch, done: int) -> None:
        """The first `done` runs of the update were applied, the rest not: parameters in the
        rest get their gradients and step counts back, so `opt.step()` can finish the step
        with the same gradient scale, or `opt.zero_grad()` drop it."""
        if self._restore_slots(launch, done):
            self._retry_scale = launch.grad_scale
            self.manager.unfinished_step = (
                "the last opt.step() did not finish (see the error it raised): call opt.step() "
                "to finish it, or opt.zero_grad() to drop its remaining gradients, before the "
                "next forward")

    def _restore_slots(self, launch: _Launch, done: int) -> bool:
        """The parameters an update (the runs from `done` on) did not apply get their
        gradient locations and step counts back; returns whether any did."""
        chunk = launch.chunk
        applied_to = launch.runs[done - 1].end if done > 0 else -1
        source_cleared = []
        pending = False
        for slot, grad_loc, reduced, sl in launch.slots:
            if sl is None or slot.group < 0:
                continue
            if sl.stop <= applied_to:
                source_cleared.append(sl)  # updated: its gradient is used up
                continue
            slot.step -= 1
            slot.grad_loc, slot.reduced = grad_loc, reduced
            pending = True
        for sl in source_cleared:
            for buffer in (chunk.acc, chunk.grad_shard):
                if buffer is not None:
                    buffer[sl].zero_()
        host_grads = any(s.grad_loc == "host" for s in chunk.slots)
        target = HostState.GRADS if host_grads else HostState.PARAMS
        if chunk.host_state is not target:
            chunk.move_host(target)
        if done > 0 and not chunk.states_on_device:
            chunk.device_stale = True  # the host has new values for the applied part
        return pending

    @staticmethod
    def _failure(chunk: Chunk, cause: BaseException) -> UpdateError:
        return UpdateError(
            f"heteromem: the optimizer update of chunk {chunk.index} failed: "
            f"{type(cause).__name__}: {cause}. Its parameters that were not updated keep their "
            "values from before the step and their gradients; fix the cause, then call "
            "opt.step() to finish the step (nothing is updated twice) or opt.zero_grad() to "
            "drop it")

    def _nvme_failed(self, err: BaseException, grad_scale: float) -> None:
        """The NVMe step stopped at a chunk: the chunks committed before it are updated, that
        one and the rest keep their images, values and gradients (an update writes only into
        its staging slot until it commits), for `opt.step()` to finish the step or
        `opt.zero_grad()` to drop it. Raises."""
        self._retry_scale = grad_scale
        self.manager.unfinished_step = (
            "the last opt.step() did not finish (see the error it raised): call opt.step() to "
            "finish it, or opt.zero_grad() to drop its remaining gradients, before the next "
            "forward")
        if isinstance(err, RunsFailed):
            raise UpdateError(
                f"heteromem: the optimizer step failed: {type(err.cause).__name__}: "
                f"{err.cause}. The chunks not yet updated keep their parameters, optimizer "
                "states and gradients from before this step. Fix the cause, then call "
                "opt.step() to finish the step (nothing is updated twice), or opt.zero_grad() "
                "to drop it") from err.cause
        raise storage_error(err.errno, (
            f"heteromem: the optimizer step failed on the NVMe tier: {err}. The chunks not yet "
            "updated keep their parameters, optimizer states and gradients from before this "
            "step (each chunk's update is committed whole or not at all). Fix the cause (e.g. "
            "free disk space under nvme_dir), then call opt.step() to finish the step (nothing "
            "is updated twice), or opt.zero_grad() to drop it"), err.filename) from err

    def synchronize(self) -> None:
        """Waits for every queued update (state_dict, checkpoints, reports call this)."""
        self.manager.wait_updates()

    # ------------------------------------------------------------------ internals

    def _chunks(self) -> list[Chunk]:
        return [c for c in self.manager.chunks if c.trainable]

    def _discard(self, chunk: Chunk) -> None:
        if chunk.update is not None and not any(s.has_grad for s in chunk.slots):
            # The update in flight consumed this chunk's gradients and finishes the chunk
            # itself (`_finish`); none came since, because a new gradient first waits for the
            # update. Nothing to discard, and waiting here would serialise every update with
            # the usual `step(); zero_grad()` before the next forward could overlap them.
            return
        manager = self.manager
        manager._wait_update(chunk)
        if chunk.states_on_device:
            manager.restore_device_values(chunk)
        for slot in chunk.slots:
            slot.grad_loc, slot.reduced = None, False
        if chunk.grad_shard is not None:
            chunk.grad_shard.zero_()
        if chunk.nvme is not None:
            # The image holds the values: gradient buffers are simply let go.
            manager.nvme.drop_grads(chunk)
            manager.cache.drop_acc(chunk)
            if chunk.host_state is HostState.GRADS:
                manager.cache.forget(chunk)
            return
        if chunk.acc is not None:
            chunk.acc.zero_()
        if chunk.host_state is HostState.GRADS:
            manager.restore_host(chunk)
            chunk.move_host(HostState.PARAMS)

    def _global_norm(self, chunks: list[Chunk], sources: dict[int, torch.Tensor],
                     taken: dict[int, list[torch.Tensor]] | None = None) -> float:
        """sqrt of the sum of squared per-parameter norms, as clip_grad_norm_ computes it;
        summed per device so there is one synchronisation per device, not per parameter
        (and, sharded, one sum over the ranks of their parts). `taken`: id(chunk) -> squared
        norms taken earlier (chunks updated during backward). Summed in chunk and parameter
        order whatever was taken when, so the norm is the same bits either way."""
        taken = taken or {}
        squares: dict[torch.device, list[torch.Tensor]] = {}
        by_index = {c.index: c for c in chunks}
        by_index.update({c.index: c for c in self._chunks() if id(c) in taken})
        for index in sorted(by_index):
            chunk = by_index[index]
            if id(chunk) in taken:
                for sq in taken[id(chunk)]:
                    squares.setdefault(sq.device, []).append(sq)
                continue
            source = sources.get(id(chunk))
            spilled = chunk.grad_spill.sq_norms if chunk.grad_spill is not None else {}
            for slot, sl in self.manager.grad_ranges(chunk):
                if slot.grad_loc == "nvme":  # taken when the host cache wrote it out
                    sq = torch.tensor(spilled[id(slot)], dtype=torch.float64)
                else:
                    sq = torch.linalg.vector_norm(source[sl], dtype=torch.float32).double() ** 2
                squares.setdefault(sq.device, []).append(sq)
        total = sum(torch.stack(v).sum().item() for v in squares.values())
        return math.sqrt(self.manager.sum_over_ranks(total))

    def _runs(self, chunk: Chunk) -> list[Run]:
        """The fused calls updating the slots that have a gradient (steps are counted once
        the update is committed, in `step`)."""
        runs: list[Run | None] = []
        ranges = {id(slot): sl for slot, sl in self.manager.grad_ranges(chunk)}
        for slot in chunk.slots:
            sl = ranges.get(id(slot))
            if sl is None or slot.group < 0:
                runs.append(None)  # nothing to update here: the next run starts anew
                continue
            hyper = self.kind.run_group(self.param_groups[slot.group])
            run = Run(sl.start, sl.stop, slot.step + 1, tuple(sorted(hyper.items())))
            last = runs[-1] if runs else None
            # Consecutive slots with the same hyper-parameters become one call (alignment
            # padding between them is updated too, harmlessly: its gradients and states are
            # zero and stay zero, and an 8-bit block holds one parameter only).
            if last is not None and last.joins(run):
                runs[-1] = dataclasses.replace(last, end=run.end)
            else:
                runs.append(run)
        return [r for r in runs if r is not None]

    def state_dict(self) -> dict:
        """The state in the format of the optimizer hm.wrap took over (optimizer_state.py):
        it loads into that optimizer on its own, and back. Gathered into host memory; for
        the whole training state (NVMe-sized, with loss scaler and RNG) use
        hm.save_checkpoint. Sharded: call it on every rank."""
        self._check_usable("state_dict()")
        return optimizer_state.state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads what `state_dict()` (here, or of the taken-over optimizer on its own)
        returned; another optimizer's state is refused with nothing changed."""
        self._check_usable("load_state_dict()")
        optimizer_state.load_state_dict(self, state_dict)
