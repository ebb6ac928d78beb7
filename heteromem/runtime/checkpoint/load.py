"""`hm.load_checkpoint`: everything is checked before anything of the live model changes.

Order: LATEST and the manifest (checksum, format, version), the model and optimizer it was
saved from against this one (names, shapes, dtypes, the optimizer's kind and state layout,
param groups), every file's size and xxh3 checksum. Only then are chunk files read again and copied into the chunks, parameter by
parameter, so a model wrapped with another chunk size or device budget loads the same state.
A refused load raises `CheckpointError` (a ValueError) or FileNotFoundError and leaves the
model and optimizer exactly as they were.

Sharded over ranks, every rank calls `load_checkpoint`, checks the files it will read, and the
ranks agree before any of them changes anything: all load, or all refuse with the first
rank's reason. A checkpoint saved at any rank count loads at any other (N -> M, M = 1
included): each rank reads the element ranges it owns from whichever saved parts hold them.
"""

from __future__ import annotations

import errno
import os

import torch

from heteromem.distributed.shard import owned_part
from heteromem.errors import storage_error
from heteromem.runtime.checkpoint import layout
from heteromem.runtime.checkpoint import manifest as schema
from heteromem.runtime.checkpoint.layout import CheckpointError
from heteromem.runtime.checkpoint.save import _PENDING, _PENDING_LOCK, wait_checkpoint
from heteromem.optim.layout import StateRegion
from heteromem.runtime.checkpoint.state import (check_optimizer, dtype_name, layout_entry,
                                                part_bytes, region_offsets, regions,
                                                set_rng_state, wrap_state)
from heteromem.runtime.optimizer_kind import KINDS
from heteromem.runtime.state_dict import _slot_names

_SHOW = 5


def _refuse(root: str, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"load_checkpoint: {root!r}: {why}; {fix}. Nothing was loaded.")


def _read_manifest(root: str) -> tuple[str, dict]:
    latest = layout.read_latest(root)
    if latest is None:
        raise _refuse(root, "holds no complete checkpoint (no LATEST file)",
                      "pass the directory save_checkpoint wrote")
    vdir = os.path.join(root, latest["version"])
    try:
        with open(os.path.join(vdir, layout.MANIFEST), "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _refuse(root, f"its manifest cannot be read ({exc})",
                      "the checkpoint is incomplete or was moved; use another one") from exc
    h = layout.hasher()
    h.update(data)
    if h.hexdigest() != latest["manifest_xxh3_64"]:
        raise _refuse(root, "its manifest does not match its checksum (the file was changed or "
                      "damaged)", "use another checkpoint")
    try:
        manifest = schema.parse(data)
        schema.check_header(manifest)
        if manifest["format"] != layout.FORMAT:
            raise _refuse(root, "is not a heteromem checkpoint",
                          "pass a save_checkpoint directory")
        if manifest["format_version"] == 1:
            schema.check_v1_chunks(manifest)
            _from_version_1(manifest)
        if manifest["format_version"] == 2:
            schema.check_v2_optimizer(manifest)
            _from_version_2(manifest)
        if manifest["format_version"] != layout.FORMAT_VERSION:
            raise _refuse(root, f"has format version {manifest['format_version']!r}, this "
                          f"heteromem reads version {layout.FORMAT_VERSION}",
                          "load it with the heteromem version that wrote it "
                          f"({manifest.get('heteromem_version')})")
        schema.check_body(manifest)
    except schema.BadField as exc:
        raise schema.malformed(root, exc) from None
    return vdir, manifest


def _from_version_1(manifest: dict) -> None:
    """Version 1 (one file per chunk, no ranks) as a version 2 manifest of one part each."""
    for chunk in manifest["chunks"]:
        chunk["shards"] = [dict(file=chunk["file"], lo=0, hi=chunk["used"], bytes=chunk["bytes"])]
        chunk["regions"] = [dict(name=r["name"], dtype=r["dtype"]) for r in chunk["regions"]]
    manifest["world_size"] = 1
    manifest["format_version"] = 2


def _from_version_2(manifest: dict) -> None:
    """Version 2 (Adam or AdamW, fp32 moments) as a version 3 manifest: the optimizer's kind
    and state layout written out, every region one item per element."""
    for chunk in manifest.get("chunks", []):
        for region in chunk.get("regions", []) if isinstance(chunk, dict) else []:
            if isinstance(region, dict):
                region.setdefault("elements_per_item", 1)
    optimizer = manifest.get("optimizer")
    if optimizer is not None:
        kind = KINDS["AdamW" if optimizer.pop("adamw") else "Adam"]
        optimizer.update(kind=kind.name, state_layout=layout_entry(kind))
    manifest["format_version"] = 3

def _match(root: str, manifest: dict, model, state, optimizer) -> list[tuple[dict, object]]:
    """(saved parameter, live slot) pairs; raises when this is not the model that was saved."""
    live = _slot_names(model)
    saved = {name: entry for entry in manifest["params"] for name in entry["names"]}
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise _refuse(root, "was saved from another model: parameters "
                      f"{missing[:_SHOW]} are not in it and it has {unexpected[:_SHOW]} that this "
                      f"model lacks ({len(missing)} and {len(unexpected)} in all)",
                      "load it into the model it was saved from")
    chunks = state.manager.chunks
    compute = dtype_name(chunks[0].dtype) if chunks else "float32"
    if manifest["dtype"] != compute:
        raise _refuse(root, f"was saved from a model wrapped with dtype={manifest['dtype']}, this "
                      f"one uses {compute}", f"wrap with dtype=torch.{manifest['dtype']}")
    pairs = []
    for entry in manifest["params"]:
        slot = live[entry["names"][0]]
        name = entry["names"][0]
        if any(live[n] is not slot for n in entry["names"]):
            raise _refuse(root, f"ties {entry['names']} to one tensor, this model does not",
                          "load it into the model it was saved from")
        if tuple(entry["shape"]) != tuple(slot.shape) or entry["dtype"] != dtype_name(slot.orig_dtype):
            raise _refuse(root, f"{name!r} was saved as {entry['dtype']}{tuple(entry['shape'])}, "
                          f"this model has {dtype_name(slot.orig_dtype)}{tuple(slot.shape)}",
                          "load it into the model it was saved from")
        if entry["trainable"] != slot.trainable:
            raise _refuse(root, f"{name!r} was {'trainable' if entry['trainable'] else 'frozen'} "
                          "when saved", "set requires_grad as it was before wrapping")
        pairs.append((entry, slot))
    opt = state.optimizer
    saved_opt = manifest.get("optimizer")
    if opt is not None and saved_opt is not None:
        # The chunks' optimizer state is loaded with the parameters, optimizer or not.
        _match_optimizer(root, saved_opt, opt.kind)
        _check_alignment(root, manifest, opt.kind)
    if optimizer is not None:
        if saved_opt is None:
            raise _refuse(root, "holds no optimizer state", "pass optimizer=None")
        if len(saved_opt["param_groups"]) != len(opt.param_groups):
            raise _refuse(root, f"was saved with {len(saved_opt['param_groups'])} param group(s), "
                          f"this {opt.kind.name} has {len(opt.param_groups)}",
                          "build the optimizer as it was when saving")
        for entry, slot in pairs:
            if entry["trainable"] and entry["group"] != slot.group:
                raise _refuse(root, f"{entry['names'][0]!r} was in param group {entry['group']}, "
                              f"here it is in {slot.group}", "build the param groups as they were")
        if (saved_opt["scaler"] is None) != (opt.scaler is None):
            raise _refuse(root, "has fp16 loss-scaler state where this model has none (or the "
                          "reverse)", "wrap with the dtype it was saved with")
    return pairs


def _match_optimizer(root: str, saved: dict, kind) -> None:
    """The saved optimizer is this one: same kind, same state layout."""
    if saved["kind"] != kind.name:
        saved_kind = KINDS[saved["kind"]]
        raise _refuse(root, f"holds the state of an {saved['kind']} optimizer "
                      f"({_describe(saved_kind)}), but this model was wrapped with "
                      f"{kind.name} ({_describe(kind)}); one optimizer's state cannot continue "
                      "as another's",
                      f"wrap the model with {_constructor(saved_kind)} to load it (or export "
                      "the weights with hm.export_pretrained and start a new optimizer)")
    if saved["state_layout"] != layout_entry(kind):
        raise _refuse(root, f"records an {kind.name} state layout {saved['state_layout']} that "
                      f"differs from this heteromem's {layout_entry(kind)}",
                      "load it with the heteromem version that wrote it "
                      "(its manifest names it)")


def _describe(kind) -> str:
    regions = ", ".join(f"{r.name} {dtype_name(r.dtype)}" + (
        f" per {r.elements_per_item}" if r.elements_per_item > 1 else "")
        for r in kind.layout.state_regions)
    return f"state {regions}"


def _constructor(kind) -> str:
    if kind.standalone is None:
        return f"torch.optim.{kind.name}"
    return f"heteromem.optim.{kind.name}"


def _check_alignment(root: str, manifest: dict, kind) -> None:
    """Block-scaled regions are read whole blocks at a time: every trainable parameter and
    every part of a chunk starts on a block (as every heteromem that writes them packs)."""
    align = kind.layout.align
    if align == 1:
        return
    bad = [e["names"][0] for e in manifest["params"] if e["trainable"] and e["offset"] % align]
    bad += [s["file"] for c in manifest["chunks"] for s in c["shards"] if s["lo"] % align]
    if bad:
        raise _refuse(root, f"places {bad[:_SHOW]} at offsets that are not multiples of "
                      f"{align} elements, which {kind.name}'s block-scaled state needs",
                      "use a checkpoint that heteromem's save_checkpoint wrote")


def _reads(manifest: dict, pairs: list) -> list[tuple]:
    """What this rank reads: (saved chunk entry, saved part, element range in the saved
    chunk, live slot, range in this rank's live buffers), for every part of every parameter
    this rank owns."""
    saved_chunks = {c["index"]: c for c in manifest["chunks"]}
    out = []
    for entry, slot in pairs:
        part = owned_part(slot.chunk, slot)
        if part is None:
            continue
        mine, theirs = part
        saved = saved_chunks[entry["chunk"]]
        start, stop = entry["offset"] + theirs.start, entry["offset"] + theirs.stop
        for shard in saved["shards"]:
            lo, hi = max(start, shard["lo"]), min(stop, shard["hi"])
            if lo < hi:
                at = mine.start + (lo - start)
                out.append((saved, shard, lo, hi, slot, slice(at, at + hi - lo)))
    return out


def _verify_files(root: str, vdir: str, manifest: dict, names: set[str]) -> None:
    """The manifest's parts are consistent with its files list; the files in `names` exist
    with their recorded sizes and checksums."""
    files = manifest.get("files", {})
    for chunk in manifest["chunks"]:
        for shard in chunk["shards"]:
            info = files.get(shard["file"])
            if info is None or info["bytes"] != shard["bytes"] or \
                    shard["bytes"] != part_bytes(chunk["regions"], shard["hi"] - shard["lo"]):
                raise _refuse(root, f"its manifest is inconsistent about {shard['file']}",
                              "use another checkpoint")
    for name in sorted(names):
        info = files.get(name)
        path = os.path.join(vdir, name)
        if info is None or not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"load_checkpoint: {path} is missing; the "
                                    "checkpoint is incomplete. Nothing was loaded", path)
        size = os.path.getsize(path)
        if size != info["bytes"]:
            raise _refuse(root, f"{name} has {size} bytes, the manifest says {info['bytes']} "
                          "(truncated or replaced)", "use another checkpoint")
        if layout.file_digest(path)[1] != info["xxh3_64"]:
            raise _refuse(root, f"{name} does not match its checksum (damaged on disk)",
                          "use another checkpoint")


class _Parts:
    """Reads element ranges of one region out of the saved parts (files kept open)."""

    def __init__(self, vdir: str) -> None:
        self.vdir, self.fds = vdir, {}

    def read(self, saved: dict, shard: dict, region: str, lo: int, hi: int) -> torch.Tensor:
        """The items of `region` holding elements [lo, hi) of the saved chunk."""
        offset, info = region_offsets(saved, shard["lo"], shard["hi"])[region]
        items = info.item_slice(lo - shard["lo"], hi - shard["lo"])
        dtype = info.dtype
        fd = self.fds.get(shard["file"])
        if fd is None:
            fd = self.fds[shard["file"]] = os.open(os.path.join(self.vdir, shard["file"]),
                                                   os.O_RDONLY)
        out = torch.empty((items.stop - items.start) * dtype.itemsize, dtype=torch.uint8)
        view, at = memoryview(out.numpy()), offset + items.start * dtype.itemsize
        while view:
            n = os.preadv(fd, [view], at)
            if not n:
                raise storage_error(errno.EIO, f"{shard['file']} ended early while loading")
            view, at = view[n:], at + n
        return out.view(dtype)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _apply(vdir: str, reads: list, pairs: list, state) -> None:
    manager = state.manager
    by_chunk: dict[int, list] = {}
    for item in reads:
        by_chunk.setdefault(item[4].chunk.index, []).append(item)
    parts = _Parts(vdir)
    try:
        for index in sorted(by_chunk):
            chunk = manager.chunks[index]
            # Every tensor holding this chunk's values now; unlike the file's regions, a
            # master kept apart from the parameters (on the device) in fp32 too.
            dst = manager.image(chunk)
            live = {r.name: r for r in regions(chunk)}
            for saved, shard, lo, hi, slot, into in by_chunk[index]:
                stored = {r["name"] for r in saved["regions"]}
                for name, tensor in dst.items():
                    # fp32 files hold no separate master: the parameters are the master
                    source = name if name in stored else "params"
                    # Block-scaled regions: the parameter's blocks, scales with their codes.
                    items = live.get(name, StateRegion(name, tensor.dtype)).item_slice(
                        into.start, into.stop)
                    tensor[items].copy_(parts.read(saved, shard, source, lo, hi))
            manager.store_image(chunk)
    finally:
        parts.close()
    for entry, slot in pairs:
        slot.step = entry["step"]


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> object:
    """Loads the checkpoint `save_checkpoint` wrote at `path` into a wrapped model (and its
    optimizer); returns the `extra` saved with it. The model may be wrapped with another chunk
    size or budget than when saved, but must be the same model (names, shapes, dtypes)."""
    what = "load_checkpoint"
    state = wrap_state(model, what)
    check_optimizer(state, optimizer, what)
    root = layout.check_root(path, what)
    if not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, f"load_checkpoint: no checkpoint at {root!r}", root)
    with _PENDING_LOCK:
        writing_here = any(s.root == root for s in _PENDING.values())
    wait_checkpoint(None if writing_here else model)
    comm = state.comm
    error, loaded = None, None
    try:
        loaded = _check(root, model, state, optimizer, comm)
    except (CheckpointError, OSError) as exc:
        if comm is None:
            raise
        error = exc
    if comm is not None:
        # Every rank loads, or every rank refuses: a rank alone with old state would train
        # on a model its peers no longer have.
        reason = comm.agree(None if error is None else str(error), "load_checkpoint: checking")
        if error is not None:
            raise error
        if reason is not None:
            raise CheckpointError(f"load_checkpoint: {root!r}: refused on {reason}")
    vdir, manifest, pairs, reads, blob, live_buffers = loaded
    # Everything checked: from here on the live state changes.
    state.synchronize()
    state.manager.settle_loads()
    if state.optimizer is not None:
        state.optimizer.zero_grad()
    with torch.no_grad():
        _apply(vdir, reads, pairs, state)
        for name, value in blob["buffers"].items():
            live_buffers[name].copy_(value)
    opt = state.optimizer
    if optimizer is not None and opt is not None:
        saved = manifest["optimizer"]
        for group, values in zip(opt.param_groups, saved["param_groups"]):
            group.update({k: tuple(v) if k == "betas" else v for k, v in values.items()})
        opt.skipped_steps = saved["skipped_steps"]
        if opt.scaler is not None:
            for key, value in saved["scaler"].items():
                setattr(opt.scaler, key, value)
    set_rng_state(blob["rng"])
    return blob["extra"]


def _check(root: str, model, state, optimizer, comm) -> tuple:
    """Everything a load checks, on this rank; returns what `_apply` needs."""
    vdir, manifest = _read_manifest(root)
    pairs = _match(root, manifest, model, state, optimizer)
    reads = _reads(manifest, pairs)
    saved_world = manifest.get("world_size", 1)
    rank = comm.rank if comm is not None else 0
    # This rank's RNG and buffers come from the saved rank of the same number (wrapping
    # around when loading at more ranks than saved).
    extra = layout.extra_file(None if saved_world == 1 else rank % saved_world)
    _verify_files(root, vdir, manifest, {r[1]["file"] for r in reads} | {extra})
    blob = _load_blob(root, os.path.join(vdir, extra))
    live_buffers = {k: v for k, v in torch.nn.Module.state_dict(model).items()
                    if k not in _slot_names(model)}
    if set(blob["buffers"]) != set(live_buffers):
        raise _refuse(root, f"has buffers {sorted(blob['buffers'])[:_SHOW]}, this model "
                      f"{sorted(live_buffers)[:_SHOW]}", "load it into the model it was saved from")
    for name, value in blob["buffers"].items():
        if value.shape != live_buffers[name].shape:
            raise _refuse(root, f"buffer {name!r} has shape {tuple(value.shape)}, this model's "
                          f"{tuple(live_buffers[name].shape)}", "load it into the model it was saved from")
    return vdir, manifest, pairs, reads, blob, live_buffers


def _load_blob(root: str, path: str) -> dict:
    """extra.pt (buffers, RNG states, the caller's extra), checked for what a load uses."""
    name = os.path.basename(path)
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (unpickling raises many kinds)
        raise _refuse(root, f"{name} cannot be read ({type(exc).__name__}: {exc})",
                      "use another checkpoint") from exc
    why = None
    if not isinstance(blob, dict) or not {"buffers", "rng", "extra"} <= set(blob):
        why = "is not a dict with buffers, rng and extra"
    elif not isinstance(blob["buffers"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob["buffers"].items()):
        why = "has buffers that are not tensors by name"
    else:
        rng = blob["rng"]
        cpu = rng.get("cpu") if isinstance(rng, dict) else None
        if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8
                and cpu.shape == torch.get_rng_state().shape):
            why = "has no CPU random generator state of the right size"
        elif not isinstance(rng.get("cuda", []), list) or not all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rng.get("cuda", [])):
            why = "has CUDA random generator states that are not byte tensors"
    if why is not None:
        raise _refuse(root, f"{name} {why} (not written by this heteromem's save_checkpoint)",
                      "use another checkpoint")
    return blob
