"""The optimizer `hm.wrap` returns: Adam/AdamW over chunks, pipelined with the next forward.

`step()` first knows the global gradient norm (clipping, fp16 overflow) because every gradient
is home by then; it then queues one fused Adam update per chunk, in the order the forward
uses the chunks, on a worker thread, and returns. The next forward's hooks wait only for the
chunks they need, so the first layers compute while later chunks are still being updated.
Hyper-parameters are read from `param_groups` when `step()` is called, so LR schedulers work.
With `step_in_backward` (see backward_step.py) a chunk's update is queued as soon as its
gradients are complete during backward, and `step()` queues only the chunks left.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import heteromem.ops as hm_ops
from heteromem.memory.chunk import Chunk, DeviceState, HostState, ParamSlot
from heteromem.memory.manager import ChunkManager
from heteromem.runtime.backward_step import StepInBackward
from heteromem.runtime.scaler import LossScaler
from heteromem.runtime.update_queue import UpdateQueue


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
        # Set when every backward pass is a step: updates then start during backward.
        self.in_backward = StepInBackward(self) if step_in_backward else None
        self._order: dict[int, int] = {}  # chunk index -> place in the forward order
        # The global gradient norm of the last step (before clipping), when clipping or fp16
        # loss scaling needed it; None otherwise.
        self.last_grad_norm: float | None = None
        self.skipped_steps = 0

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
        if self.in_backward is not None:
            self.in_backward.before_zero_grad()
        self.manager.grads_home()
        for chunk in self._chunks():
            self._discard(chunk)
        self._grads_scaled_by = 1.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        manager = self.manager
        manager.timeline.mark("step")
        manager.end_backward()
        manager.grads_home()
        # id(chunk) -> the buffer holding its gradients (taken once: it may gather them).
        sources = {id(c): src for c in self._chunks()
                   if (src := manager.grad_source(c)) is not None}
        chunks = [c for c in self._chunks() if id(c) in sources]
        loss_scale, self._grads_scaled_by = self._grads_scaled_by, 1.0
        # The global norm is one more pass over every gradient, on the critical path before
        # the first update: taken only when clipping or loss scaling needs it.
        norm = None
        # Sharded models sum gradients over ranks; the update uses their mean.
        divisor = loss_scale * manager.grad_divisor
        if self.max_grad_norm is not None or self.scaler is not None:
            norm = self._global_norm(chunks, sources) / divisor
        self.last_grad_norm = norm
        found_inf = self.scaler is not None and not math.isfinite(norm)
        if found_inf:
            self.scaler.update(True)
            self.skipped_steps += 1
            for chunk in chunks:
                self._discard(chunk)
            self._step_done()
            return loss
        grad_scale = divisor
        if self.max_grad_norm is not None and math.isfinite(norm):
            # As torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).
            # (A non-finite norm is not clipped: the update propagates inf/nan as torch would.)
            grad_scale = divisor / min(1.0, self.max_grad_norm / (norm + 1e-6))
        self._order = {index: k for k, index in enumerate(manager.trace.first_use_order())}
        chunks.sort(key=self._priority)
        runs = {id(c): self._runs(c) for c in chunks}
        # States on NVMe first, synchronously and all or nothing: if a read or write fails,
        # nothing of the model or optimizer has changed yet (see `_nvme_failed`).
        on_nvme = [c for c in chunks if c.nvme is not None]
        if manager.nvme is not None and (on_nvme or manager.agree_nvme is not None):
            # Sharded, every rank takes part (its NVMe chunks may have no gradient this step).
            try:
                manager.nvme.step(on_nvme, lambda c, master, exp_avg, exp_avg_sq: self._apply(
                    c, sources[id(c)], runs[id(c)], grad_scale, master, exp_avg, exp_avg_sq),
                    agree=manager.agree_nvme)
            except OSError as err:
                self._nvme_failed(chunks, on_nvme, err)
        if self.scaler is not None:
            self.scaler.update(False)
        for chunk in chunks:
            self._count_step(chunk)
        for chunk in on_nvme:
            self._finish(chunk, sources[id(chunk)])
        for chunk in chunks:
            if chunk.nvme is None:
                self._launch(chunk, sources[id(chunk)], runs[id(chunk)], grad_scale)
        self._step_done()
        return loss

    @torch.no_grad()
    def update_during_backward(self, chunk: Chunk) -> None:
        """Queues the update of a chunk whose gradients of this step are complete
        (step_in_backward): gradients still on the device are copied home first, and the
        worker waits for that copy, not the training thread."""
        manager = self.manager
        manager.send_home(chunk)
        landed, chunk.d2h_event = chunk.d2h_event, None
        source = manager.grad_source(chunk)
        runs = self._runs(chunk)
        self._count_step(chunk)
        self._launch(chunk, source, runs, float(manager.grad_divisor), landed)

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
                landed: object = None) -> None:
        """Starts the update of a host- or device-state chunk (not NVMe). `landed`: the CUDA
        event of the copy that brought its gradients home, if not yet waited for."""
        chunk.move_host(HostState.UPDATING)
        if chunk.states_on_device:
            # GPU Adam, queued on the current stream: nothing to wait for on the host.
            self._update(chunk, source, runs, grad_scale)
        else:
            chunk.update = self._worker.submit(self._priority(chunk), self._update, chunk,
                                               source, runs, grad_scale, landed)

    def _nvme_failed(self, chunks: list[Chunk], on_nvme: list[Chunk], err: OSError) -> None:
        """Puts everything back as it was before the step (the files still hold the old
        states; host buffers the update overwrote get their values back from them), drops
        this step's gradients, and raises."""
        try:
            for chunk in on_nvme:
                # The update wrote new parameters into the host buffer (never in GRADS state:
                # gradients of NVMe chunks gather in their accumulation buffer).
                self.manager.restore_host(chunk)
                chunk.device_stale = True
            for chunk in chunks:
                self._discard(chunk)
        except OSError as again:
            raise OSError(again.errno, (
                f"heteromem: an optimizer step failed on the NVMe tier ({err}) and restoring "
                f"the parameters from it failed too ({again}); the optimizer states on disk are "
                "those from before the step, but this process cannot read them: restart from "
                "your last checkpoint")) from err
        raise OSError(err.errno, (
            f"heteromem: optimizer step failed on the NVMe tier: {err}. Nothing was updated: "
            "parameters and optimizer states are those from before this step, and this step's "
            "gradients were dropped; fix the cause (e.g. free disk space under nvme_dir) and "
            "continue training")) from err

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
        self.manager._wait_update(chunk)
        if chunk.states_on_device:
            self.manager.restore_device_values(chunk)
        for slot in chunk.slots:
            slot.grad_loc, slot.reduced = None, False
        if chunk.acc is not None:
            chunk.acc.zero_()
        if chunk.grad_shard is not None:
            chunk.grad_shard.zero_()
        if chunk.host_state is HostState.GRADS:
            self.manager.restore_host(chunk)
            chunk.move_host(HostState.PARAMS)

    def _global_norm(self, chunks: list[Chunk], sources: dict[int, torch.Tensor]) -> float:
        """sqrt of the sum of squared per-parameter norms, as clip_grad_norm_ computes it;
        summed per device so there is one synchronisation per device, not per parameter
        (and, sharded, one sum over the ranks of their parts)."""
        squares: dict[torch.device, list[torch.Tensor]] = {}
        for chunk in chunks:
            source = sources[id(chunk)]
            for _, sl in self.manager.grad_ranges(chunk):
                norm = torch.linalg.vector_norm(source[sl], dtype=torch.float32)
                squares.setdefault(norm.device, []).append(norm.double() ** 2)
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

    def _apply(self, chunk: Chunk, source: torch.Tensor, runs: list[_Run], grad_scale: float,
               master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        """The fused Adam calls of one chunk over the given states; the new compute-dtype
        values go to the device copy (state on the device) or the host buffer."""
        on_device = chunk.states_on_device
        target = chunk.device_view() if on_device else chunk.host
        # fp32 compute: the parameter is the master itself, unless the master lives elsewhere
        # (device copy, NVMe), in which case it is copied over after the update.
        copy_master = chunk.dtype == torch.float32 and target is not master
        for run in runs:
            sl = slice(run.start, run.end)
            lowp = None if chunk.dtype == torch.float32 else target[sl]
            hm_ops.adam_step_(master[sl], source[sl], exp_avg[sl], exp_avg_sq[sl],
                              step=run.step, lr=run.lr, betas=run.betas, eps=run.eps,
                              weight_decay=run.weight_decay, adamw=self.adamw,
                              grad_scale=grad_scale, param_lowp=lowp)
            if copy_master:
                target[sl].copy_(master[sl])

    def _finish(self, chunk: Chunk, source: torch.Tensor) -> None:
        if source is chunk.acc or source is chunk.grad_shard:
            source.zero_()
        if chunk.states_on_device:
            if chunk.device_state is DeviceState.MIXED:
                chunk.move_device(DeviceState.PARAMS)
        else:
            chunk.device_stale = True
        if chunk.host_state is not HostState.PARAMS:
            chunk.move_host(HostState.PARAMS)

    def _update(self, chunk: Chunk, source: torch.Tensor, runs: list[_Run],
                grad_scale: float, landed: object = None) -> None:
        if landed is not None:
            landed.synchronize()
        self._apply(chunk, source, runs, grad_scale, chunk.master, chunk.exp_avg, chunk.exp_avg_sq)
        self._finish(chunk, source)

    def state_dict(self):
        raise NotImplementedError(
            "heteromem's optimizer state lives in chunks (host, device and NVMe), not in a "
            "state dict: save it with hm.save_checkpoint(path, model, opt)")

    def load_state_dict(self, state_dict):
        raise NotImplementedError(
            "heteromem's optimizer state lives in chunks: load it with "
            "hm.load_checkpoint(path, model, opt)")
