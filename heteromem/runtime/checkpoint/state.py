"""What a checkpoint holds of a wrapped model, and where each piece lives right now.

Shared by save and load: the model's description for the manifest (parameters by name with
their chunk, offset, shape and dtype; chunks and their regions; the optimizer's kind, state
layout, groups and loss scaler), and per chunk the tensors holding each region (host buffers,
device tensors for chunks whose state lives on the device, or NVMe staging views).

A region is laid out like the chunk's elements: item `i` of a region with
`elements_per_item=k` (the 8-bit optimizers' block scales: k=256) covers elements
`[k*i, k*(i+1))`, so a part file holding elements `[lo, hi)` holds `ceil((hi-lo)/k)` items of it.
"""

from __future__ import annotations

import datetime
import numbers

import torch

from heteromem._version import __version__
from heteromem.memory.chunk import Chunk, HostState
from heteromem.optim.layout import StateRegion
from heteromem.runtime.checkpoint.layout import FORMAT, FORMAT_VERSION, CheckpointError, chunk_file
from heteromem.runtime.state_dict import _slot_names
from heteromem.runtime.wrapped import wrapped_state

FP32 = torch.float32
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16,
                                                     torch.float64, torch.int64, torch.int32,
                                                     torch.int16, torch.int8, torch.uint8, torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def wrap_state(model: object, what: str):
    return wrapped_state(model, what)


def check_optimizer(state, optimizer: object, what: str) -> None:
    if optimizer is not None and optimizer is not state.optimizer:
        raise ValueError(f"{what}: optimizer is not the one hm.wrap returned for this model; "
                         "pass the optimizer from `model, opt = hm.wrap(...)` (or None)")


def regions(chunk: Chunk) -> list[StateRegion]:
    """The regions of a chunk's file, in order: the parameters, then (trainable) the fp32
    master (none in fp32 mode: the parameters are the master) and the optimizer's regions."""
    out = [StateRegion("params", chunk.dtype)]
    if chunk.trainable:
        if chunk.dtype != FP32:
            out.append(StateRegion("master", FP32))
        out += list(chunk.layout.state_regions)
    return out


def saved_region(entry: dict) -> StateRegion:
    """A manifest's region entry (version 2 entries have no elements_per_item: 1)."""
    return StateRegion(entry["name"], DTYPES[entry["dtype"]], entry.get("elements_per_item", 1))


def part_bytes(entries: list, elements: int) -> int:
    """Bytes of a part file holding `elements` elements of every region in `entries`."""
    return sum(saved_region(r).nbytes(elements) for r in entries)


def layout_entry(kind) -> dict:
    """An optimizer kind's state layout as the manifest records it."""
    return dict(align=kind.layout.align, regions=[
        dict(name=r.name, dtype=dtype_name(r.dtype), elements_per_item=r.elements_per_item)
        for r in kind.layout.regions])


def region_offsets(entry: dict, lo: int, hi: int) -> dict[str, tuple[int, StateRegion]]:
    """Region name -> (byte offset, region) in a part file holding elements [lo, hi)."""
    out, offset = {}, 0
    for item in entry["regions"]:
        region = saved_region(item)
        out[region.name] = (offset, region)
        offset += region.nbytes(hi - lo)
    return out


def live_tensors(manager, chunk: Chunk) -> dict[str, torch.Tensor]:
    """The tensors holding each region now (as many items as this rank's elements need).
    NVMe states are read into staging slot 0: the views stay valid until that slot is used
    again."""
    image = manager.image(chunk)
    return {r.name: image[r.name][: r.items(chunk.host_len)] for r in regions(chunk)}


def check_quiet(state, what: str) -> None:
    """A checkpoint is taken between steps: refuses while gradients are pending."""
    state.synchronize()
    state.manager.grads_home()
    for chunk in state.manager.chunks:
        if chunk.host_state is not HostState.PARAMS or any(
                s.has_grad for s in chunk.slots):
            raise CheckpointError(
                f"{what}: gradients from backward() are waiting for opt.step(); a checkpoint is "
                "taken between steps: call opt.step() (or opt.zero_grad()) first")


def _jsonable(value: object, where: str) -> object:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, str, numbers.Real)):
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, where) for v in value]
    raise CheckpointError(f"save_checkpoint: {where} holds a {type(value).__name__}, which a "
                          "checkpoint cannot record; use numbers, strings or tuples there")


def describe(model: torch.nn.Module, state) -> dict:
    """The manifest of the model's current state (without the files' checksums)."""
    manager = state.manager
    names: dict[int, list[str]] = {}
    slots = {}
    for name, slot in _slot_names(model).items():
        names.setdefault(id(slot), []).append(name)
        slots[id(slot)] = slot
    params = [dict(names=names[key], chunk=slot.chunk.index, offset=slot.offset, numel=slot.numel,
                   shape=list(slot.shape), dtype=dtype_name(slot.orig_dtype),
                   trainable=slot.trainable, group=slot.group, step=slot.step)
              for key, slot in slots.items()]
    chunks = []
    for chunk in manager.chunks:
        names = [dict(name=r.name, dtype=dtype_name(r.dtype),
                      elements_per_item=r.elements_per_item) for r in regions(chunk)]
        if chunk.world == 1:
            shards = [dict(file=chunk_file(chunk.index), lo=0, hi=chunk.used,
                           bytes=part_bytes(names, chunk.used))]
        else:
            part = chunk.used // chunk.world
            shards = [dict(file=chunk_file(chunk.index, r), lo=r * part, hi=(r + 1) * part,
                           bytes=part_bytes(names, part)) for r in range(chunk.world)]
        chunks.append(dict(index=chunk.index, used=chunk.used, trainable=chunk.trainable,
                           regions=names, shards=shards))
    opt = state.optimizer
    optimizer = None
    if opt is not None:
        groups = [{k: _jsonable(v, f"optimizer param group {i} {k!r}")
                   for k, v in g.items() if k != "params"} for i, g in enumerate(opt.param_groups)]
        optimizer = dict(kind=opt.kind.name, state_layout=layout_entry(opt.kind),
                         param_groups=groups, skipped_steps=opt.skipped_steps,
                         scaler=opt.scaler.state_dict() if opt.scaler is not None else None)
    comm = state.comm
    return dict(format=FORMAT, format_version=FORMAT_VERSION, heteromem_version=__version__,
                world_size=comm.world if comm is not None else 1,
                torch_version=torch.__version__,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                dtype=dtype_name(manager.chunks[0].dtype) if manager.chunks else "float32",
                params=params, chunks=chunks, optimizer=optimizer)


def buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict entries that are not wrapped parameters (persistent buffers)."""
    wrapped = set(_slot_names(model))
    # NOTE: the original Module.state_dict, not the wrapped one: no need to gather parameters.
    out = torch.nn.Module.state_dict(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in out.items() if k not in wrapped}


def rng_state() -> dict:
    """CPU and (already initialised) CUDA generator states, for an exact resume."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return out


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)
