"""`hm.wrap`: put a model's parameters, gradients and optimizer states into paged chunks."""

from __future__ import annotations

import math
import numbers
import os
from typing import Iterable

import torch

from heteromem.distributed import shard as sharding
from heteromem.distributed.comm import ShardGroup, resolve_group
from heteromem.distributed.manager import ShardedChunkManager
from heteromem.errors import OutOfMemory, format_bytes
from heteromem.memory.chunk import Chunk, ParamSlot
from heteromem.memory.layout import pack, slot_align, state_layout
from heteromem.memory.manager import ChunkManager
from heteromem.memory.host_cache import HostCache
from heteromem.memory.host_plan import plan_host
from heteromem.memory.manager import PREFETCH_CHUNKS
from heteromem.memory.nvme import (DEFAULT_STAGING_SLOTS, NvmeTier, check_nvme_dir,
                                   nvme_disk_bytes, staging_bytes)
from heteromem.memory.placement import promote_planned
from heteromem.memory.repack import can_repack, repack
from heteromem.memory.sizes import parse_size
from heteromem.memory.tiers import Tier
from heteromem.runtime.hooks import Hooks
from heteromem.runtime.hyperparams import check_adam_group
from heteromem.runtime.construct import materializer
from heteromem.runtime.materialize import Undo, fill_chunks, live_values, move_buffers
from heteromem.runtime.optimizer import WrappedOptimizer
from heteromem.runtime.optimizer_kind import KINDS, OptimizerKind, kind_of
from heteromem.runtime.report import Report, TierReport
from heteromem.runtime.scaler import LossScaler
from heteromem.runtime.state_dict import install_state_dict_methods

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ADAM_KWARGS = ("lr", "betas", "eps", "weight_decay", "adamw")
# Default chunk: 64 MiB of bf16, never smaller than the largest parameter, and small enough
# that a model is split into several chunks.
DEFAULT_CHUNK_ELEMS = 32 * 2**20


def chunk_capacity(total: int, largest: int, chunk_mb: float | None, elem: int) -> int:
    """Elements per chunk: `chunk_mb` as given, else the default above."""
    if chunk_mb is None:
        return max(largest, min(DEFAULT_CHUNK_ELEMS, -(-total // 8)))
    return max(1, int(chunk_mb * 2**20) // elem)


def _check_device(device: object) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"hm.wrap: device={device!r} is not a device; use 'cuda', 'cuda:1' or 'cpu'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"hm.wrap: device={device!r} but no CUDA GPU is visible; use device='cpu'")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != "cpu":
        raise ValueError(f"hm.wrap: device={device!r} is not supported; use a CUDA device or 'cpu'")
    return dev


def _check_positive(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"hm.wrap: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"hm.wrap: {name} must be a positive finite number, got {value!r}")
    return float(value)


def _param_groups(model: torch.nn.Module, optimizer: object, adam_kwargs: dict
                  ) -> tuple[list[dict], OptimizerKind, dict]:
    """The param groups (with hyper-parameters), the optimizer's kind, and its defaults."""
    unknown = sorted(set(adam_kwargs) - set(_ADAM_KWARGS))
    if unknown:
        raise TypeError(f"hm.wrap: unexpected keyword argument(s) {unknown}; Adam options are {list(_ADAM_KWARGS)}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        adamw = bool(adam_kwargs.pop("adamw", True))
        # Defaults are torch's: AdamW decays by 0.01, Adam (adamw=False) not at all.
        group = dict(params=trainable, lr=adam_kwargs.get("lr", 1e-3),
                     betas=tuple(adam_kwargs.get("betas", (0.9, 0.999))),
                     eps=adam_kwargs.get("eps", 1e-8),
                     weight_decay=adam_kwargs.get("weight_decay", 0.01 if adamw else 0.0))
        check_adam_group(group, "hm.wrap")
        kind = KINDS["AdamW" if adamw else "Adam"]
        return [group], kind, dict(kind.defaults)
    if adam_kwargs:
        raise ValueError(f"hm.wrap: pass Adam options either through the optimizer or as keywords, "
                         f"not both (got optimizer and {sorted(adam_kwargs)})")
    kind = kind_of(optimizer)
    groups = []
    model_params = {id(p) for p in model.parameters()}
    for i, g in enumerate(optimizer.param_groups):
        for key in ("amsgrad", "maximize"):
            if g.get(key):
                raise ValueError(f"hm.wrap: optimizer param group {i} has {key}=True, which heteromem "
                                 "does not implement; use the default (False)")
        for p in g["params"]:
            if id(p) not in model_params:
                raise ValueError(f"hm.wrap: optimizer param group {i} holds a tensor of shape "
                                 f"{tuple(p.shape)} that is not a parameter of the model")
        groups.append({k: v for k, v in g.items() if k == "params" or k in kind.hyper})
        kind.check_group(groups[-1], f"hm.wrap: optimizer param group {i}")
    if any(optimizer.state.values()):
        raise ValueError("hm.wrap: the optimizer has already taken steps; wrap the model before "
                         "training (its state would be lost)")
    defaults = {k: v for k, v in optimizer.defaults.items() if k in kind.hyper}
    return groups, kind, defaults


class WrapState:
    """What `hm.wrap` attaches to the model (as `model._heteromem`)."""

    def __init__(self, manager: ChunkManager, hooks: Hooks, optimizer: WrappedOptimizer | None,
                 slots: list[ParamSlot], buffer_bytes: int, comm: ShardGroup | None = None,
                 buffer_dtypes: list | None = None) -> None:
        self.manager, self.hooks, self.optimizer, self.slots = manager, hooks, optimizer, slots
        self.buffer_bytes = buffer_bytes
        # (module, buffer name, dtype before wrapping): `hm.unwrap` gives the dtypes back.
        self.buffer_dtypes = buffer_dtypes or []
        self.comm = comm  # sharded over ranks when set

    def synchronize(self) -> None:
        self.manager.wait_updates()

    def first_iteration_done(self, order: list[ParamSlot]) -> bool:
        """Called when the first iteration ends: re-pack the chunks in the order of first use,
        then move as many chunks' optimizer state to the device as the budget allows. Returns
        False to be asked again at the next boundary (gradients were pending: gradient
        accumulation across the boundary)."""
        if self.comm is not None:
            # NOTE: sharded, a re-pack would move values between ranks' parts and a chunk's
            # state onto the device would be one rank's part only: both are left out; the
            # chunks keep the order wrap packed them in and their states stay on the host.
            return True
        if not can_repack(self.manager):
            return False
        # NOTE: with optimizer states on NVMe the chunks keep the order wrap packed them in:
        # re-packing would rewrite every state file once, for a layout that is usually the
        # same (models mostly register modules in the order they use them).
        if self.manager.nvme is None:
            self.repack_in_first_use_order(order)
        # Paging must keep room for as many chunks as the first iteration pinned at once.
        promote_planned(self.manager, self.manager.peak_pinned, self.buffer_bytes)
        return True

    def repack_in_first_use_order(self, order: list[ParamSlot]) -> None:
        m = self.manager
        current = {id(s.param): (s.chunk.index, s.offset) for c in m.chunks for s in c.slots}
        seen = {id(s) for s in order}
        rest = [s for c in m.chunks for s in c.slots if id(s) not in seen]
        planned = pack([(s.name, s.param, s.shape) for s in order + rest], m.chunks[0].capacity,
                       m.chunks[0].dtype, {}, state_layout(m.chunks))
        if all(current[id(s.param)] == (c.index, s.offset) for c in planned for s in c.slots):
            return
        mapping = repack(m, order, pin=m.copies.cuda)
        if mapping is None:  # no room to re-pack within the host budget: keep the layout
            return
        self.slots = [mapping[id(s)] for s in self.slots]
        for slot in self.slots:
            slot.param._heteromem_slot = slot
        self.hooks.slot_of = {id(s.param): s for s in self.slots}
        self.hooks.slots_by_module = {mod: [mapping[id(s)] for s in slots]
                                      for mod, slots in self.hooks.slots_by_module.items()}
        if self.optimizer is not None:
            self.optimizer.slots = [s for s in self.slots if s.trainable]
            if self.optimizer.in_backward is not None:
                self.optimizer.in_backward.forget()

    def report(self) -> Report:
        m = self.manager
        tiers = {
            "device": TierReport(m.device_tier.budget, m.device_tier.current, m.device_tier.peak),
            "host": TierReport(m.host_tier.budget, m.host_tier.current, m.host_tier.peak),
            "nvme": TierReport(None, 0, 0),
        }
        details = {"device buffers (not paged)": self.buffer_bytes}
        stall = m.copies.stall_seconds + m.update_stall_seconds
        nvme = {}
        if m.nvme is not None:
            t = m.nvme.tier
            tiers["nvme"] = TierReport(t.budget, t.current, t.peak)
            details.update({"nvme staging pool (host)": m.nvme.staging_bytes if m.nvme.slots else 0,
                            "nvme read": m.nvme.bytes_read, "nvme written": m.nvme.bytes_written})
            if m.cache is not None:
                details.update({"host cache of NVMe chunks": m.cache.budget,
                                "gradients spilled to nvme": m.cache.bytes_spilled})
            stall += m.nvme.wait_seconds
            nvme = dict(nvme_chunks=sum(1 for c in m.chunks if c.nvme is not None),
                        host_cache_hit_rate=m.cache.hit_rate if m.cache is not None else None,
                        nvme_bytes_per_step=m.last_iteration_io)
        opt = self.optimizer
        if opt is not None and opt._speculation is not None:
            stats = opt._speculation.stats
            nvme.update(speculative_updates=stats.speculated, updates_redone=stats.redone,
                        updates_undone=stats.undone, redo_seconds=stats.redo_seconds)
        comm = self.comm
        return Report(tiers=tiers, bytes_h2d=m.copies.bytes_h2d, bytes_d2h=m.copies.bytes_d2h,
                      stall_seconds=stall,
                      rank=comm.rank if comm else 0, world_size=comm.world if comm else 1,
                      bytes_sent=comm.bytes_sent if comm else 0,
                      bytes_received=comm.bytes_received if comm else 0,
                      chunks=len(m.chunks), chunk_bytes=m.memory.slab_bytes,
                      resident_chunks=sum(1 for c in m.chunks if c.resident),
                      details=details,
                      state_chunks_on_device=sum(1 for c in m.chunks if c.states_on_device),
                      timeline=m.timeline.snapshot(), **nvme)


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
         device: object = None, dtype: torch.dtype = torch.bfloat16, device_memory: object = None,
         host_memory: object = None, nvme_dir: object = None, chunk_mb: float | None = None,
         keep_on_device: Iterable[str] = (), max_grad_norm: float | None = None,
         nvme_staging: object = None, process_group: object = None,
         step_in_backward: bool = False, init: object = None, weights: object = None,
         **adam_kwargs) -> tuple[torch.nn.Module, WrappedOptimizer | None]:
    """Wraps `model` so its training state lives in chunks paged between device and host.

    Returns the same module (hooks installed, parameters now views into chunks while in use)
    and a `torch.optim.Optimizer` (Adam/AdamW) that updates the chunks; None when the model has
    no trainable parameters. See DESIGN.md section 1 for every argument; `nvme_staging`
    (bytes or a size string) bounds the host buffers that stream states to and from
    `nvme_dir` (default: room for 4 chunks' states; at least 2).

    `step_in_backward=True` declares that every step has the same number of backward passes
    (micro-batches) before `opt.step()`, so each chunk's update starts during the last one as
    soon as its gradients are complete, instead of after the whole backward (docs/wrap.md).
    With clipping or fp16 loss scaling those updates are speculative: checked against the
    global norm when the backward ends and redone, clipped, when clipping fires (undone on an
    fp16 overflow). Not with sharding over ranks.

    When torch.distributed is initialised with more than one rank (or `process_group` is
    given), every chunk is sharded over the ranks (ZeRO-3 style, see docs/distributed.md):
    call `hm.wrap` on every rank with the same model and arguments; budgets are per rank.

    A model built on the meta device (`with torch.device("meta"):`) is materialised chunk by
    chunk, never whole: by `init(module)` (called per module in `model.apply` order; default:
    each module's `reset_parameters()`, or a transformers model's own init), or from
    `weights`, a `.safetensors` file or a folder of them with transformers'
    `model.safetensors.index.json` (docs/wrap.md, "Models built on the meta device").
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"hm.wrap: model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_heteromem", None) is not None:
        raise ValueError("hm.wrap: this model is already wrapped; wrap a model once")
    if dtype not in _DTYPES:
        raise ValueError(f"hm.wrap: dtype={dtype!r} is not supported; use torch.bfloat16, torch.float16 "
                         "or torch.float32")
    dev = _check_device(device)
    group = resolve_group(process_group)
    device_budget = parse_size(device_memory, "device_memory")
    host_budget = parse_size(host_memory, "host_memory")
    staging_budget = parse_size(nvme_staging, "nvme_staging")
    if nvme_dir is not None:
        check_nvme_dir(nvme_dir, 0)
    elif nvme_staging is not None:
        raise ValueError("hm.wrap: nvme_staging is given but nvme_dir is not; set nvme_dir too")
    chunk_mb = _check_positive("chunk_mb", chunk_mb)
    max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
    _check_step_in_backward(step_in_backward)
    if isinstance(keep_on_device, str):
        keep_on_device = (keep_on_device,)
    modules = dict(model.named_modules())
    unknown = [n for n in keep_on_device if n not in modules]
    if unknown:
        raise ValueError(f"hm.wrap: keep_on_device names unknown module(s) {unknown}; use names "
                         f"from model.named_modules(), e.g. {list(modules)[1:4]}")

    named = list(model.named_parameters())
    for name, p in named:
        if getattr(p, "_heteromem_slot", None) is not None:
            raise ValueError(f"hm.wrap: parameter {name!r} belongs to another wrapped model; "
                             "parameters cannot be shared between wrapped models")
        if not p.is_floating_point():
            raise ValueError(f"hm.wrap: parameter {name!r} has dtype {p.dtype}; only floating-point "
                             "parameters can be wrapped")
    groups, kind, defaults = _param_groups(model, optimizer, dict(adam_kwargs))
    # Checks init/weights (every file header against the model) before anything changes.
    source = materializer(model, init, weights)
    if source is not None:
        named = source.pack_order(named)
    group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}

    elem = torch.empty((), dtype=dtype).element_size()
    largest = max((p.numel() for _, p in named), default=1)
    total = sum(p.numel() for _, p in named)
    capacity = chunk_capacity(total, largest, chunk_mb, elem)
    comm = None
    # Ranks' parts of a chunk start where a parameter may (8-bit blocks stay whole).
    align = slot_align(kind.layout)
    if group is not None:
        comm = ShardGroup(group, dev)
        capacity = sharding.shardable_capacity(capacity, comm.world, align)
    chunks = pack([(n, p, p.shape) for n, p in named], capacity, dtype, group_of, kind.layout)
    if comm is not None:
        if step_in_backward:
            raise ValueError("hm.wrap: step_in_backward=True is not supported when the model is "
                             f"sharded over {comm.world} ranks; leave it False")
        sharding.shard_chunks(chunks, comm.rank, comm.world, align)
        sharding.check_same_model(comm, chunks, dict(
            dtype=str(dtype), device=dev.type, device_memory=device_budget,
            host_memory=host_budget, nvme=nvme_dir is not None, chunk_mb=chunk_mb,
            max_grad_norm=max_grad_norm, keep_on_device=sorted(keep_on_device),
            optimizer=kind.name,
            groups=[{k: v for k, v in g.items() if k != "params"} for g in groups]))
        if nvme_dir is not None:
            nvme_dir = sharding.rank_dir(nvme_dir, comm.rank)
    slab_bytes = capacity * elem

    device_tier = Tier("device", device_budget)
    host_tier = Tier("host", host_budget)
    slots = [s for c in chunks for s in c.slots]
    slot_of = {id(s.param): s for s in slots}
    slots_by_module: dict[torch.nn.Module, list[ParamSlot]] = {}
    for module in model.modules():
        own = [slot_of[id(p)] for p in module._parameters.values() if p is not None]
        if own:
            slots_by_module[module] = own
    kept = {id(slot_of[id(p)].chunk) for n in keep_on_device for p in modules[n].parameters()}
    # Sharded, reducing a chunk's gradients needs its fp32 sum and this rank's part on the
    # device for a moment.
    reduce_bytes = 0 if comm is None else sharding.reduce_buffer_bytes(capacity, comm.world)
    working_set = _check_working_set(model, slots_by_module, len(kept), slab_bytes,
                                     device_budget, reduce_bytes)

    host_capacity = capacity // (comm.world if comm else 1)
    staging_slots = _staging_slots(staging_budget, host_capacity, dtype, kind)
    # Chunks a module call can pin on the device at once, and those copied ahead of it: the
    # host cache of NVMe chunks must hold their values at the same time.
    at_once = working_set + len(kept) + (PREFETCH_CHUNKS if dev.type == "cuda" else 0)
    plan = plan_host(chunks, dtype, host_budget, nvme_dir is not None, staging_slots, at_once,
                     sharded=comm is not None, staging_budget=staging_budget)
    # Chunks on NVMe whose values the weights files hold in the compute dtype are read from
    # those files when needed instead of copied: a frozen chunk always (its image is the
    # files: no disk room), a trainable one until its first update writes a whole image
    # (`memory/file_image.py`).
    from_files = {}
    if source is not None and nvme_dir is not None:
        for c in chunks:
            if id(c) in plan.on_nvme:
                spans = source.file_spans(c, dtype)
                if spans is not None:
                    from_files[id(c)] = spans
    if plan.on_nvme:
        trainable_images = sum(1 for c in chunks if id(c) in plan.on_nvme and c.trainable)
        frozen_images = sum(1 for c in chunks if id(c) in plan.on_nvme and not c.trainable
                            and id(c) not in from_files)
        spares = None if comm is not None else plan.staging_slots
        # Image slots as large as the fullest chunk on NVMe, not the chunk capacity: a chunk
        # a large parameter did not fit into the rest of is mostly not full.
        image_capacity = max(c.host_len for c in chunks if id(c) in plan.on_nvme)
        # (A chunk read from the files gets a frozen image only if a checkpoint is loaded
        # into it: that slot is taken then, and the disk checked then.)
        check_nvme_dir(nvme_dir, nvme_disk_bytes(image_capacity, dtype, trainable_images,
                                                 frozen_images, spares, kind.layout))

    # NOTE: from here on the model changes; a failure puts it back as it was (parameters,
    # buffers) and removes the NVMe folder, so a refused wrap leaves nothing behind.
    undo = Undo(model, slots)
    nvme = None
    try:
        if source is not None:
            source.prepare(chunks, set(from_files))
        if plan.on_nvme:
            # Sharded steps commit only once every rank has written: a spare per chunk.
            nvme = NvmeTier(os.fspath(nvme_dir), image_capacity, dtype, plan.staging_slots,
                            host_tier, pin=dev.type == "cuda", owner=model,
                            spares=spares, states=kind.layout,
                            trainable_staging=plan.staging_trainable)
            undo.nvme = nvme
            nvme.plan(trainable_images, frozen_images)
        fill_chunks(chunks, dtype, pin=dev.type == "cuda", host_tier=host_tier, nvme=nvme,
                    plan=plan, source=live_values if source is None else source.values,
                    from_files=from_files, skip=None if source is None else source.skip)
        if source is not None:
            source.finish()  # buffers: they are made after the parameters
        buffer_dtypes = [(m, n, b.dtype) for m in model.modules() for n, b in m._buffers.items()
                         if b is not None]
        buffer_bytes = move_buffers(model, dev, dtype, device_tier)
        if comm is None:
            manager = ChunkManager(chunks, dev, device_tier, host_tier, slab_bytes)
        else:
            manager = ShardedChunkManager(chunks, dev, device_tier, host_tier, slab_bytes,
                                          comm=comm)
        if nvme is not None:
            manager.nvme = nvme
            manager.use_cache(HostCache(nvme, host_tier, plan.cache_bytes, host_capacity,
                                        dtype, pin=dev.type == "cuda"))
        for slot in slots:
            slot.param.data = manager.placeholder(dtype)
            slot.param._heteromem_slot = slot
        for chunk in chunks:
            if id(chunk) in kept:
                chunk.keep_on_device = True
                manager.release(manager.acquire(chunk.slots))
    except BaseException:
        undo()
        raise
    finally:
        if source is not None:
            source.close()
    hooks = Hooks(manager, model, slots_by_module, slot_of)
    trainable = [s for s in slots if s.trainable]
    opt = None
    if trainable:
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        opt = WrappedOptimizer([g for g in groups if g["params"]], manager, trainable,
                               kind=kind, max_grad_norm=max_grad_norm,
                               scaler=LossScaler() if dtype == torch.float16 else None,
                               step_in_backward=step_in_backward, defaults=defaults)
        hooks.in_backward = opt.in_backward
        # Param group indices may have shifted after dropping empty groups.
        index_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        for s in trainable:
            s.group = index_of.get(id(s.param), -1)
    state = WrapState(manager, hooks, opt, slots, buffer_bytes, comm, buffer_dtypes)
    hooks.on_first_use_order = state.first_iteration_done
    model._heteromem = state
    install_state_dict_methods(model, state)
    return model, opt


def _check_step_in_backward(step_in_backward: object) -> None:
    if not isinstance(step_in_backward, bool):
        raise TypeError(f"hm.wrap: step_in_backward must be True or False, got "
                        f"{type(step_in_backward).__name__}")


def _check_working_set(model: torch.nn.Module, slots_by_module: dict, kept_chunks: int,
                       slab_bytes: int, budget: int | None, reduce_bytes: int = 0) -> int:
    """The chunks any module uses at once (its own and those of the ancestors whose forward is
    still running around it), plus the chunks kept resident, must fit the device budget.
    Returns that largest number of chunks one module call uses."""
    if not slots_by_module:
        return 0
    worst, worst_chunks = None, set()

    def visit(module: torch.nn.Module, outer: frozenset) -> None:
        nonlocal worst, worst_chunks
        chunks = outer | {id(s.chunk) for s in slots_by_module.get(module, ())}
        if len(chunks) > len(worst_chunks):
            worst, worst_chunks = module, chunks
        for child in module.children():
            visit(child, chunks)

    visit(model, frozenset())
    needed = (len(worst_chunks) + kept_chunks) * slab_bytes + reduce_bytes
    if budget is not None and needed > budget:
        raise OutOfMemory(
            "device", needed, budget,
            f"module {type(worst).__name__} needs {len(worst_chunks)} chunk(s) of "
            f"{format_bytes(slab_bytes)} at once (its own and its enclosing modules')"
            + (f" plus {kept_chunks} kept on the device" if kept_chunks else "")
            + (f" plus {format_bytes(reduce_bytes)} to reduce a chunk's gradients over the "
               "ranks" if reduce_bytes else "")
            + "; raise device_memory, lower chunk_mb, or keep fewer modules on the device",
            what="the largest module's working set")
    return len(worst_chunks)


def _staging_slots(staging_budget: int | None, capacity: int, dtype: torch.dtype,
                   kind: OptimizerKind) -> int:
    """Trainable-image staging slots in `staging_budget` (nvme_staging; the default count
    without one). The host plan refuses fewer than MIN_STAGING_SLOTS if trainable chunks go to
    NVMe; frozen ones alone need smaller slots."""
    if staging_budget is None:
        return DEFAULT_STAGING_SLOTS
    return staging_budget // staging_bytes(capacity, 1, dtype, kind.layout)
