"""`hm.load_checkpoint`: everything is checked before anything of the live model changes.

Order: LATEST and the manifest (checksum, format, version), the model and optimizer it was
saved from against this one (names, shapes, dtypes, param groups), every file's size and
xxh3 checksum. Only then are chunk files read again and copied into the chunks, parameter by
parameter, so a model wrapped with another chunk size or device budget loads the same state.
A refused load raises `CheckpointError` (a ValueError) or FileNotFoundError and leaves the
model and optimizer exactly as they were.
"""

from __future__ import annotations

import errno
import json
import os

import torch

from heteromem.runtime.checkpoint import layout
from heteromem.runtime.checkpoint.layout import CheckpointError
from heteromem.runtime.checkpoint.save import _PENDING, _PENDING_LOCK, wait_checkpoint
from heteromem.runtime.checkpoint.state import (DTYPES, check_optimizer, dtype_name,
                                                set_rng_state, wrap_state)
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
    manifest = json.loads(data)
    if manifest.get("format") != layout.FORMAT:
        raise _refuse(root, "is not a heteromem checkpoint", "pass a save_checkpoint directory")
    if manifest.get("format_version") != layout.FORMAT_VERSION:
        raise _refuse(root, f"has format version {manifest.get('format_version')!r}, this "
                      f"heteromem reads version {layout.FORMAT_VERSION}",
                      "load it with the heteromem version that wrote it "
                      f"({manifest.get('heteromem_version')})")
    return vdir, manifest


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
    if optimizer is not None:
        saved_opt = manifest.get("optimizer")
        if saved_opt is None:
            raise _refuse(root, "holds no optimizer state", "pass optimizer=None")
        if len(saved_opt["param_groups"]) != len(opt.param_groups) or saved_opt["adamw"] != opt.adamw:
            raise _refuse(root, f"was saved with {len(saved_opt['param_groups'])} param group(s) "
                          f"({'AdamW' if saved_opt['adamw'] else 'Adam'}), this optimizer has "
                          f"{len(opt.param_groups)} ({'AdamW' if opt.adamw else 'Adam'})",
                          "build the optimizer as it was when saving")
        for entry, slot in pairs:
            if entry["trainable"] and entry["group"] != slot.group:
                raise _refuse(root, f"{entry['names'][0]!r} was in param group {entry['group']}, "
                              f"here it is in {slot.group}", "build the param groups as they were")
        if (saved_opt["scaler"] is None) != (opt.scaler is None):
            raise _refuse(root, "has fp16 loss-scaler state where this model has none (or the "
                          "reverse)", "wrap with the dtype it was saved with")
    return pairs


def _verify_files(root: str, vdir: str, manifest: dict) -> None:
    files = manifest.get("files", {})
    expected = {c["file"]: c["bytes"] for c in manifest["chunks"]}
    for name, size in expected.items():
        if name not in files or files[name]["bytes"] != size:
            raise _refuse(root, f"its manifest is inconsistent about {name}", "use another checkpoint")
    for name, info in files.items():
        path = os.path.join(vdir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"load_checkpoint: {path} is missing; the "
                                    "checkpoint is incomplete. Nothing was loaded", path)
        size = os.path.getsize(path)
        if size != info["bytes"]:
            raise _refuse(root, f"{name} has {size} bytes, the manifest says {info['bytes']} "
                          "(truncated or replaced)", "use another checkpoint")
        if layout.file_digest(path)[1] != info["xxh3_64"]:
            raise _refuse(root, f"{name} does not match its checksum (damaged on disk)",
                          "use another checkpoint")


def _read_chunk(vdir: str, entry: dict) -> dict[str, torch.Tensor]:
    raw = torch.empty(entry["bytes"], dtype=torch.uint8)
    with open(os.path.join(vdir, entry["file"]), "rb", buffering=0) as f:
        view = memoryview(raw.numpy())
        while view:
            n = f.readinto(view)
            if not n:
                raise OSError(errno.EIO, f"{entry['file']} ended early while loading")
            view = view[n:]
    out = {}
    for region in entry["regions"]:
        dtype = DTYPES[region["dtype"]]
        start = region["offset"]
        out[region["name"]] = raw[start:start + region["numel"] * dtype.itemsize].view(dtype)
    if "master" not in out and "exp_avg" in out:
        out["master"] = out["params"]  # fp32: the parameters are the master
    return out


def _apply(vdir: str, manifest: dict, pairs: list, state) -> None:
    manager = state.manager
    saved_chunks = {c["index"]: c for c in manifest["chunks"]}
    by_chunk: dict[int, list] = {}
    for entry, slot in pairs:
        by_chunk.setdefault(slot.chunk.index, []).append((entry, slot))
    cache: dict[int, dict] = {}
    for index in sorted(by_chunk):
        chunk = manager.chunks[index]
        # Every tensor holding this chunk's values now; unlike the file's regions, a master
        # kept apart from the parameters (on the device, on NVMe) in fp32 too.
        dst = {"params": manager.values(chunk)}
        if chunk.trainable:
            dst.update(zip(("master", "exp_avg", "exp_avg_sq"), manager.states(chunk)))
            if dst["master"].data_ptr() == dst["params"].data_ptr():
                del dst["master"]  # fp32 on the host: the parameters are the master
        for entry, slot in by_chunk[index]:
            if entry["chunk"] not in cache:
                cache = {entry["chunk"]: _read_chunk(vdir, saved_chunks[entry["chunk"]])}
            src = cache[entry["chunk"]]
            have = slice(entry["offset"], entry["offset"] + entry["numel"])
            for name, tensor in dst.items():
                tensor[slot.range].copy_(src[name][have])
            slot.step = entry["step"]
        if chunk.nvme is not None:
            manager.nvme.store(chunk)
        if chunk.resident and not chunk.states_on_device:
            chunk.device_stale = True


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
    vdir, manifest = _read_manifest(root)
    pairs = _match(root, manifest, model, state, optimizer)
    _verify_files(root, vdir, manifest)
    blob = torch.load(os.path.join(vdir, layout.EXTRA), weights_only=True)
    live_buffers = {k: v for k, v in torch.nn.Module.state_dict(model).items()
                    if k not in _slot_names(model)}
    if set(blob["buffers"]) != set(live_buffers):
        raise _refuse(root, f"has buffers {sorted(blob['buffers'])[:_SHOW]}, this model "
                      f"{sorted(live_buffers)[:_SHOW]}", "load it into the model it was saved from")
    for name, value in blob["buffers"].items():
        if value.shape != live_buffers[name].shape:
            raise _refuse(root, f"buffer {name!r} has shape {tuple(value.shape)}, this model's "
                          f"{tuple(live_buffers[name].shape)}", "load it into the model it was saved from")
    # Everything checked: from here on the live state changes.
    state.synchronize()
    state.manager.settle_loads()
    if state.optimizer is not None:
        state.optimizer.zero_grad()
    with torch.no_grad():
        _apply(vdir, manifest, pairs, state)
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
