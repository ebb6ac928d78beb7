"""The optimizer `hm.wrap` returns: Adam/AdamW over chunks, pipelined with the next forward.

`step()` first knows the global gradient norm (clipping, fp16 overflow) because every gradient
is home by then; it then queues one fused Adam update per chunk, in the order the forward
uses the chunks, on a worker thread, and returns. The next forward's hooks wait only for the
chunks they need, so the first layers compute while later chunks are still being updated.
Hyper-parameters are read from `param_groups` when `step()` is called, so LR schedulers work.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import heteromem.ops as hm_ops
from heteromem.memory.chunk import Chunk, DeviceState, HostState, ParamSlot
from heteromem.memory.manager import ChunkManager
from heteromem.runtime.scaler import LossScaler


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
                 *, adamw: bool, max_grad_norm: float | None, scaler: LossScaler | None) -> None:
        defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        super().__init__(param_groups, defaults)
        self.manager = manager
        self.slots = slots
        self.adamw = adamw
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler
        self._grads_scaled_by = 1.0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heteromem-adam")
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
        manager.end_backward()
        manager.grads_home()
        chunks = [c for c in self._chunks() if manager.grad_source(c) is not None]
        loss_scale, self._grads_scaled_by = self._grads_scaled_by, 1.0
        norm = self._global_norm(chunks) / loss_scale if chunks else 0.0
        self.last_grad_norm = norm
        if self.scaler is not None:
            found_inf = not math.isfinite(norm)
            self.scaler.update(found_inf)
            if found_inf:
                self.skipped_steps += 1
                for chunk in chunks:
                    self._discard(chunk)
                return loss
        grad_scale = loss_scale
        if self.max_grad_norm is not None and math.isfinite(norm):
            # As torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).
            # (A non-finite norm is not clipped: the update propagates inf/nan as torch would.)
            grad_scale = loss_scale / min(1.0, self.max_grad_norm / (norm + 1e-6))
        order = {index: k for k, index in enumerate(manager.trace.first_use_order())}
        chunks.sort(key=lambda c: order.get(c.index, len(order) + c.index))
        for chunk in chunks:
            runs = self._runs(chunk)
            source = manager.grad_source(chunk)
            for slot in chunk.slots:
                slot.grad_loc = None
            chunk.move_host(HostState.UPDATING)
            if chunk.states_on_device:
                # GPU Adam, queued on the current stream: nothing to wait for on the host.
                self._update(chunk, source, runs, grad_scale)
            else:
                chunk.update = self._worker.submit(self._update, chunk, source, runs, grad_scale)
        return loss

    def synchronize(self) -> None:
        """Waits for every queued update (state_dict, checkpoints, reports call this)."""
        self.manager.wait_updates()

    # ------------------------------------------------------------------ internals

    def _chunks(self) -> list[Chunk]:
        return [c for c in self.manager.chunks if c.trainable]

    def _discard(self, chunk: Chunk) -> None:
        self.manager._wait_update(chunk)
        if chunk.states_on_device:
            self.manager.restore_device_values(chunk)
        for slot in chunk.slots:
            slot.grad_loc = None
        if chunk.acc is not None:
            chunk.acc.zero_()
        if chunk.host_state is HostState.GRADS:
            chunk.host[: chunk.used].copy_(chunk.master)
            chunk.move_host(HostState.PARAMS)

    def _global_norm(self, chunks: list[Chunk]) -> float:
        """sqrt of the sum of squared per-parameter norms, as clip_grad_norm_ computes it;
        summed per device so there is one synchronisation per device, not per parameter."""
        squares: dict[torch.device, list[torch.Tensor]] = {}
        for chunk in chunks:
            source = self.manager.grad_source(chunk)
            for slot in chunk.slots:
                if slot.grad_loc in ("host", "acc", "device"):
                    norm = torch.linalg.vector_norm(source[slot.range], dtype=torch.float32)
                    squares.setdefault(norm.device, []).append(norm.double() ** 2)
        return math.sqrt(sum(torch.stack(v).sum().item() for v in squares.values()))

    def _runs(self, chunk: Chunk) -> list[_Run]:
        runs: list[_Run] = []
        current: _Run | None = None
        for slot in chunk.slots:
            if slot.grad_loc not in ("host", "acc", "device") or slot.group < 0:
                current = None
                continue
            group = self.param_groups[slot.group]
            slot.step += 1
            run = _Run(slot.offset, slot.offset + slot.numel, slot.step, float(group["lr"]),
                       tuple(float(b) for b in group["betas"]), float(group["eps"]),
                       float(group["weight_decay"]))
            if current is not None and (current.step, current.lr, current.betas, current.eps,
                                        current.weight_decay) == (
                    run.step, run.lr, run.betas, run.eps, run.weight_decay):
                current = _Run(current.start, run.end, *[getattr(current, f) for f in
                                                          ("step", "lr", "betas", "eps",
                                                           "weight_decay")])
                runs[-1] = current
            else:
                runs.append(run)
                current = run
        return runs

    def _update(self, chunk: Chunk, source: torch.Tensor, runs: list[_Run],
                grad_scale: float) -> None:
        on_device = chunk.states_on_device
        # Where the updated compute-dtype values go: the host buffer, or (state on the device)
        # straight into the resident device copy, over the gradients read from it.
        target = chunk.device_view() if on_device else chunk.host
        fp32 = chunk.dtype == torch.float32
        for run in runs:
            sl = slice(run.start, run.end)
            lowp = None if fp32 or (not on_device and chunk.master is chunk.host) else target[sl]
            hm_ops.adam_step_(chunk.master[sl], source[sl], chunk.exp_avg[sl], chunk.exp_avg_sq[sl],
                              step=run.step, lr=run.lr, betas=run.betas, eps=run.eps,
                              weight_decay=run.weight_decay, adamw=self.adamw,
                              grad_scale=grad_scale, param_lowp=lowp)
            if fp32 and on_device:
                target[sl].copy_(chunk.master[sl])
        if source is chunk.acc:
            chunk.acc.zero_()
        if on_device:
            if chunk.device_state is DeviceState.MIXED:
                chunk.move_device(DeviceState.PARAMS)
        else:
            chunk.device_stale = True
        chunk.move_host(HostState.PARAMS)

    def state_dict(self):
        raise NotImplementedError(
            "heteromem's optimizer state lives in chunks; save it with hm.save_checkpoint once "
            "the checkpoint capability lands (not built yet)")

    def load_state_dict(self, state_dict):
        raise NotImplementedError(
            "heteromem's optimizer state lives in chunks; load it with hm.load_checkpoint once "
            "the checkpoint capability lands (not built yet)")
