"""`state_dict()` / `load_state_dict()` of the wrapped optimizer, in the format of the optimizer
`hm.wrap` took over, so a state moves between that optimizer on its own and the wrapped one.

- `heteromem.optim` (AGD, AdamW8bit, Adam8bit): per parameter ``step`` (an int) and one flat
  tensor per state region (``exp_avg``, ``exp_avg_sq``; the 8-bit codes and their
  ``*_scale`` block scales), exactly as the standalone optimizer keeps them: a chunk holds
  them bit for bit (parameters start on a block, memory/layout.py).
- torch's Adam/AdamW: ``step`` a float tensor, ``exp_avg`` and ``exp_avg_sq`` shaped like the
  parameter, as ``torch.optim.AdamW.state_dict()`` gives.

Parameters are numbered over the param groups in order, as torch numbers them; a parameter
that has not taken a step has no entry. The states are gathered into host memory (one chunk's
at a time on the way), so `state_dict()` refuses (OutOfMemory, host tier) when they would not
fit what `host_memory` leaves free: for a state that only fits on NVMe, `hm.save_checkpoint`
streams it to disk instead. Sharded over ranks, every rank must call these (the state is gathered
from, or scattered to, every rank's part).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from heteromem.distributed.shard import owned_part
from heteromem.errors import OutOfMemory, format_bytes
from heteromem.memory.chunk import Chunk, ParamSlot


def _numbered(opt) -> list[tuple[int, ParamSlot]]:
    """(torch's index, slot) of every parameter of the optimizer's groups."""
    params = chain.from_iterable(g["params"] for g in opt.param_groups)
    return [(i, p._heteromem_slot) for i, p in enumerate(params)]


def _by_chunk(numbered: list[tuple[int, ParamSlot]]) -> list[tuple[Chunk, list]]:
    """The slots grouped by chunk, in chunk order (a chunk on NVMe is read once, and sharded
    ranks gather the same chunks in the same order)."""
    chunks: dict[int, tuple[Chunk, list]] = {}
    for index, slot in numbered:
        chunks.setdefault(slot.chunk.index, (slot.chunk, []))[1].append((index, slot))
    return [chunks[k] for k in sorted(chunks)]


def state_dict(opt) -> dict[str, Any]:
    """The optimizer's state in the taken-over optimizer's format (see the module docstring)."""
    opt.synchronize()
    manager, kind = opt.manager, opt.kind
    numbered = _numbered(opt)
    nbytes = sum(kind.layout.nbytes(s.numel, master=False) for _, s in numbered if s.step)
    if not manager.host_tier.fits(nbytes):
        raise OutOfMemory("host", nbytes, manager.host_tier.left(), (
            f"opt.state_dict() gathers the whole optimizer state ({format_bytes(nbytes)}) into "
            "host memory; save it with hm.save_checkpoint(path, model, opt), which streams "
            "it to disk, or raise host_memory"), what="opt.state_dict()")
    state: dict[int, dict[str, Any]] = {}
    for chunk, slots in _by_chunk(numbered):
        live = manager.states(chunk)
        for region in kind.layout.state_regions:
            per = region.elements_per_item
            full = manager.full(chunk, live[region.name], per)
            for index, slot in slots:
                if slot.step == 0:
                    continue
                value = full[region.item_slice(slot.offset, slot.offset + slot.numel)]
                value = value.to("cpu", copy=True)
                if kind.standalone is None:  # torch's Adam: moments shaped like the parameter
                    value = value.view(slot.shape)
                state.setdefault(index, {})[region.name] = value
        for index, slot in slots:
            if slot.step:
                state[index]["step"] = (slot.step if kind.standalone is not None
                                        else torch.tensor(float(slot.step)))
    groups, start = [], 0
    for group in opt.param_groups:
        n = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + n))})
        start += n
    return {"state": state, "param_groups": groups}


def _step(value: object, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: step must be an int >= 0, got {value!r} (was it saved by "
                         "another optimizer?)")
    return value


def _check(opt, saved: dict, numbered: list) -> dict[int, tuple[int, dict]]:
    """Everything a load needs, checked before anything changes; returns, by the position of
    the parameter in this optimizer's groups, its saved step and state."""
    kind = opt.kind
    what = f"opt.load_state_dict ({kind.name})"
    if not isinstance(saved, dict) or not {"state", "param_groups"} <= set(saved):
        raise ValueError(f"{what}: expected a dict with 'state' and 'param_groups', as "
                         "optimizer.state_dict() returns")
    groups = saved["param_groups"]
    if len(groups) != len(opt.param_groups) or any(
            len(g["params"]) != len(own["params"]) for g, own in zip(groups, opt.param_groups)):
        raise ValueError(f"{what}: the saved param groups hold "
                         f"{[len(g['params']) for g in groups]} parameters, this optimizer's "
                         f"{[len(g['params']) for g in opt.param_groups]}; build the "
                         "optimizer's param groups as they were when it was saved")
    for i, group in enumerate(groups):
        # NOTE: AGD's state has Adam's keys (exp_avg, exp_avg_sq, step) with other meanings;
        # its param groups differ (delta, no eps), and every optimizer saves all its keys.
        missing = [k for k in kind.hyper if k not in group]
        if missing:
            raise ValueError(f"{what}: param group {i} has no {missing}, which every {kind.name} "
                             f"param group has (it holds {sorted(k for k in group if k != 'params')}"
                             "): it was saved by another optimizer; load it into that optimizer")
        merged = {**opt.param_groups[i], **{k: v for k, v in group.items() if k != "params"}}
        kind.check_group(merged, f"{what}: param group {i}")
    saved_ids = list(chain.from_iterable(g["params"] for g in groups))
    position = {sid: k for k, sid in enumerate(saved_ids)}
    expected = {"step"} | {r.name for r in kind.layout.state_regions}
    out = {}
    for key, entry in saved["state"].items():
        where = f"{what}: state of parameter {key}"
        if key not in position:
            raise ValueError(f"{where} names no parameter of the saved param groups")
        slot = numbered[position[key]][1]
        if not isinstance(entry, dict) or set(entry) != expected:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{where} has keys {got}, an {kind.name} state has "
                             f"{sorted(expected)} (was it saved by another optimizer?)")
        if kind.standalone is not None and isinstance(entry["step"], torch.Tensor):
            raise ValueError(f"{where}: step is a tensor, as torch's optimizers save it; "
                             f"{kind.name} saves an int (was it saved by another optimizer?)")
        step = _step(entry["step"], where)
        for region in kind.layout.state_regions:
            t, want = entry[region.name], region.items(slot.numel)
            # torch's Adam keeps moments in the parameter's dtype: any float is taken.
            ok_dtype = (t.dtype == region.dtype if kind.standalone is not None
                        else t.is_floating_point()) if isinstance(t, torch.Tensor) else False
            if not ok_dtype or t.numel() != want:
                got = (f"{t.dtype} with {t.numel()} elements" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"{where}: {region.name} is {got}, expected {region.dtype} "
                                 f"with {want} elements for a parameter of {slot.numel} "
                                 "(was it saved by another optimizer, or another model?)")
        out[position[key]] = (step, entry)
    return out


def load_state_dict(opt, saved: dict) -> None:
    """Loads a state `state_dict` (this optimizer's, or the taken-over optimizer's own)
    returned; refused with nothing changed when it does not fit (another optimizer's state,
    other param groups or parameter sizes). Parameters without an entry start afresh (zero
    state, step 0), as torch's optimizers do."""
    numbered = _numbered(opt)
    loaded = _check(opt, saved, numbered)
    opt.zero_grad()  # pending gradients belong to the state being replaced
    manager, kind = opt.manager, opt.kind
    manager.settle_loads()
    with torch.no_grad():
        for chunk, slots in _by_chunk(numbered):
            live = manager.states(chunk)
            for index, slot in slots:
                part = owned_part(chunk, slot)
                step, entry = loaded.get(index, (0, None))
                if part is not None:
                    mine, theirs = part
                    for region in kind.layout.state_regions:
                        into = live[region.name][region.item_slice(mine.start, mine.stop)]
                        if entry is None:
                            into.zero_()
                            continue
                        value = entry[region.name].reshape(-1)
                        into.copy_(value[region.item_slice(theirs.start, theirs.stop)])
                slot.step = step
            manager.store_image(chunk)
    for group, values in zip(opt.param_groups, saved["param_groups"]):
        group.update({k: tuple(v) if k == "betas" else v for k, v in values.items()
                      if k != "params"})
