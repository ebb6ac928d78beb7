"""The optimizer `hm.wrap` returns: Adam/AdamW over chunks, pipelined with the next forward.

`step()` first knows the global gradient norm (clipping, fp16 overflow) because every gradient
is home by then; it then queues one fused Adam update per chunk, in the order the forward
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

import heteromem.ops as hm_ops
from heteromem.errors import NotWrappedError, UpdateError, storage_error
from heteromem.memory.chunk import Chunk, DeviceState, HostState, ParamSlot
from heteromem.memory.manager import ChunkManager
from heteromem.runtime.backward_step import StepInBackward
from heteromem.runtime.hyperparams import check_param_groups
from heteromem.runtime.scaler import LossScaler
from heteromem.runtime.speculation import Snapshot, Speculation, put_back, take
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


class _RunsFailed(Exception):
    """Raised by a chunk's update (worker thread) when run `done` failed: runs before it were
    applied whole, that one and those after it not at all."""

    def __init__(self, done: int, cause: BaseException) -> None:
        super().__init__(f"{done} run(s) applied before {cause!r}")
        self.done, self.cause = done, cause


@dataclass(frozen=True)
class _Run:
    """Consecutive slots of one chunk updated by one fused call."""

    start: int
    end: int
    step: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


class HeteroAdam(torch.optim.Optimizer):
    """Adam (`adamw=False`) or AdamW whose state lives in heteromem chunks.

    Use it like the torch optimizer it replaced: `step()`, `zero_grad()`, `param_groups`, LR
    schedulers. For fp16, call `opt.backward(loss)` to apply dynamic loss scaling.
    """

    def __init__(self, param_groups: list[dict], manager: ChunkManager, slots: list[ParamSlot],
                 *, adamw: bool, max_grad_norm: float | None, scaler: LossScaler | None,
                 step_in_backward: bool = False) -> None:
        defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        super().__init__(param_groups, defaults)
        self.manager = manager
        self.slots = slots
        self.adamw = adamw
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
            check_param_groups(self.param_groups, "opt.step()")
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
            _apply_to_staging(c, sources.get(id(c)), runs[id(c)], grad_scale, self.adamw,
                              staging)

        def committed(c: Chunk, staging) -> None:
            self._count_step(c)
            _finish_nvme_chunk(c, sources.get(id(c)), staging, manager)
        try:
            manager.nvme.step(chunks, update, committed, agree=manager.agree_nvme)
        except (OSError, _RunsFailed) as err:
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

    def _launch(self, chunk: Chunk, source: torch.Tensor, runs: list[_Run], grad_scale: float,
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
            chunk.update = self._worker.submit(self._priority(chunk), _update_nvme_chunk,
                                               chunk, source, runs, grad_scale, self.adamw,
                                               landed, self.manager)
        elif chunk.states_on_device:
            # GPU Adam, queued on the current stream: nothing to wait for on the host.
            try:
                _update_chunk(chunk, source, runs, grad_scale, self.adamw)
            except _RunsFailed as exc:
                self._roll_back(launch, exc.done)
                raise self._failure(chunk, exc.cause) from exc.cause
        else:
            # NOTE: the worker gets the chunk and tensors, not the optimizer: a model dropped
            # while its updates run is freed as soon as they end.
            self._launched[id(chunk)] = launch
            if snapshot is not None:
                snapshot.launch = launch
            chunk.update = self._worker.submit(self._priority(chunk), _update_chunk, chunk,
                                               source, runs, grad_scale, self.adamw, landed,
                                               snapshot)

    def _update_failed(self, chunk: Chunk, exc: BaseException) -> None:
        """Called on the training thread by the manager when it finds that the update of
        `chunk` on the worker failed: puts back what that update did not do, and raises."""
        launch = self._launched.pop(id(chunk))
        done = exc.done if isinstance(exc, _RunsFailed) else 0
        cause = exc.cause if isinstance(exc, _RunsFailed) else exc
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
        if isinstance(err, _RunsFailed):
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

    def _runs(self, chunk: Chunk) -> list[_Run]:
        """The fused calls updating the slots that have a gradient (steps are counted once
        the update is committed, in `step`)."""
        runs: list[_Run | None] = []
        ranges = {id(slot): sl for slot, sl in self.manager.grad_ranges(chunk)}
        for slot in chunk.slots:
            sl = ranges.get(id(slot))
            if sl is None or slot.group < 0:
                runs.append(None)  # nothing to update here: the next run starts anew
                continue
            group = self.param_groups[slot.group]
            run = _Run(sl.start, sl.stop, slot.step + 1, float(group["lr"]),
                       tuple(float(b) for b in group["betas"]), float(group["eps"]),
                       float(group["weight_decay"]))
            last = runs[-1] if runs else None
            # Consecutive slots with the same hyper-parameters become one call (alignment
            # padding between them is updated too, harmlessly: nothing reads it).
            if last is not None and (last.step, last.lr, last.betas, last.eps,
                                     last.weight_decay) == (
                    run.step, run.lr, run.betas, run.eps, run.weight_decay):
                runs[-1] = dataclasses.replace(last, end=run.end)
            else:
                runs.append(run)
        return [r for r in runs if r is not None]

    def state_dict(self):
        raise NotImplementedError(
            "heteromem's optimizer state lives in chunks (host, device and NVMe), not in a "
            "state dict: save it with hm.save_checkpoint(path, model, opt)")

    def load_state_dict(self, state_dict):
        raise NotImplementedError(
            "heteromem's optimizer state lives in chunks: load it with "
            "hm.load_checkpoint(path, model, opt)")


# ---------------------------------------------------------------------- the update itself
# Module functions, not methods: the worker thread must not hold the optimizer.

def _apply_runs(chunk: Chunk, source: torch.Tensor, runs: list[_Run], grad_scale: float,
                adamw: bool, master: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, target: torch.Tensor | None = None) -> None:
    """The fused Adam calls of one chunk over the given states; the new compute-dtype values
    go to `target`, by default the device copy (state on the device) or the host buffer.
    Raises `_RunsFailed` saying how many runs were applied (each run is applied whole or not
    at all: the op checks its arguments before it writes)."""
    if target is None:
        target = chunk.device_view() if chunk.states_on_device else chunk.host
    # fp32 compute: the parameter is the master itself, unless the master lives elsewhere
    # (device copy, NVMe), in which case it is copied over after the update.
    copy_master = chunk.dtype == torch.float32 and target is not master
    for done, run in enumerate(runs):
        sl = slice(run.start, run.end)
        lowp = None if chunk.dtype == torch.float32 else target[sl]
        try:
            hm_ops.adam_step_(master[sl], source[sl], exp_avg[sl], exp_avg_sq[sl],
                              step=run.step, lr=run.lr, betas=run.betas, eps=run.eps,
                              weight_decay=run.weight_decay, adamw=adamw,
                              grad_scale=grad_scale, param_lowp=lowp)
        except Exception as exc:
            raise _RunsFailed(done, exc) from exc
        if copy_master:
            target[sl].copy_(master[sl])


def _finish_chunk(chunk: Chunk, source: torch.Tensor) -> None:
    """The chunk's update is complete: its gradient buffer is cleared and its copies say so."""
    if source is chunk.acc or source is chunk.grad_shard:
        source.zero_()
    if chunk.states_on_device:
        if chunk.device_state is DeviceState.MIXED:
            chunk.move_device(DeviceState.PARAMS)
    else:
        chunk.device_stale = True
    if chunk.host_state is not HostState.PARAMS:
        chunk.move_host(HostState.PARAMS)


def _update_chunk(chunk: Chunk, source: torch.Tensor, runs: list[_Run], grad_scale: float,
                  adamw: bool, landed: object = None, snapshot: Snapshot | None = None) -> None:
    """A host- or device-state chunk's whole update (on the worker for host states); a
    speculative one keeps its snapshot first."""
    try:
        if landed is not None:
            landed.synchronize()
        if snapshot is not None:
            take(snapshot, chunk, source)
    except Exception as exc:
        raise _RunsFailed(0, exc) from exc
    _apply_runs(chunk, source, runs, grad_scale, adamw, chunk.master, chunk.exp_avg,
                chunk.exp_avg_sq)
    _finish_chunk(chunk, source)


def _apply_to_staging(chunk: Chunk, source: torch.Tensor | None, runs: list[_Run],
                      grad_scale: float, adamw: bool, staging) -> None:
    """An NVMe chunk's update inside its staging slot (its states were read there; the new
    parameters are written there too, so nothing else changes before the image commits).
    Gradients come from `source`, or from the staging slot when the host cache spilled them."""
    layout, n = chunk.nvme.layout, chunk.host_len
    if chunk.grad_spill is not None:
        source = staging.grads(chunk.grad_spill.dtype, chunk.grad_spill.used)
    params = staging.view("params", n, layout)
    master = staging.view("master", n, layout) if "master" in layout.regions else params
    _apply_runs(chunk, source, runs, grad_scale, adamw, master,
                staging.view("exp_avg", n, layout), staging.view("exp_avg_sq", n, layout),
                target=params)


def _finish_nvme_chunk(chunk: Chunk, source: torch.Tensor | None, staging, manager) -> None:
    """An NVMe chunk's new image is committed: its gradient buffers go, and a host buffer it
    still has gets the new values (from the staging slot; None when the commit came later,
    for a sharded step: then the buffer is dropped and read again when needed)."""
    manager.nvme.drop_grads(chunk)
    cache = manager.cache
    cache.drop_acc(chunk)
    if chunk.grad_shard is not None and source is chunk.grad_shard:
        source.zero_()
    if chunk.host is not None:
        if staging is None:
            if chunk.host_state is not HostState.PARAMS:
                chunk.move_host(HostState.PARAMS)
            cache.forget(chunk)
        else:
            chunk.host[: chunk.host_len].copy_(staging.view("params", chunk.host_len,
                                                            chunk.nvme.layout))
    chunk.device_stale = True
    if chunk.host_state is not HostState.PARAMS:
        chunk.move_host(HostState.PARAMS)


def _update_nvme_chunk(chunk: Chunk, source: torch.Tensor | None, runs: list[_Run],
                       grad_scale: float, adamw: bool, landed: object, manager) -> None:
    """An NVMe chunk's whole update on the worker (updates during backward): read its
    states, update them in a staging slot, write and commit the image."""
    try:
        if landed is not None:
            landed.synchronize()
        manager.nvme.step(
            [chunk],
            lambda c, staging: _apply_to_staging(c, source, runs, grad_scale, adamw, staging),
            lambda c, staging: _finish_nvme_chunk(c, source, staging, manager))
    except _RunsFailed as exc:  # in the staging slot only: nothing of it was committed
        raise _RunsFailed(0, exc.cause) from exc.cause
    except Exception as exc:
        raise _RunsFailed(0, exc) from exc
