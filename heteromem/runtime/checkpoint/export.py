"""`export_safetensors`: a wrapped model's weights as one .safetensors file, streamed.

`model.state_dict()` of a wrapped model returns every tensor at once, which for a model that
only fits because of heteromem may not fit in host memory. Here the header is computed from
the parameter slots alone (names, shapes, dtypes), then the values are written parameter by
parameter in chunk order, so each fp32 master on NVMe is read once and at most one
parameter is converted at a time (plus the NVMe staging buffer, already reserved).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections import OrderedDict

import torch

from heteromem.runtime.checkpoint.layout import fsync_dir
from heteromem.runtime.state_dict import _Masters, _slot_names
from heteromem.runtime.wrapped import wrapped_state

# torch dtype -> safetensors dtype name (the spec's names; optional dtypes where torch has them).
_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, attr): name for attr, name in [
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"),
        ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("int64", "I64"),
        ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint64", "U64"),
        ("uint32", "U32"), ("uint16", "U16"), ("uint8", "U8"), ("bool", "BOOL")]
    if hasattr(torch, attr)}
_ALIGN = 8  # the data section starts 8-byte aligned, as safetensors' own writer does


def export_safetensors(path: str | os.PathLike, model: torch.nn.Module, *,
                       metadata: dict[str, str] | None = None) -> None:
    """Writes the weights of a model wrapped by `hm.wrap` to `path` in safetensors format.

    The file holds what `model.state_dict()` returns (fp32 masters of trainable parameters,
    in each parameter's dtype before wrapping; persistent buffers), except that a tied
    parameter is written once, under its first state-dict name, as safetensors and
    `transformers` expect. `metadata` (str -> str) goes into the header with
    `"format": "pt"`. Extra memory stays around one parameter: nothing is gathered. The file
    appears under `path` only complete (written next to it, fsynced, then renamed).

    Sharded over ranks, every rank must call this (each chunk is gathered from the ranks'
    parts, one chunk at a time, so no rank holds more than about one chunk extra) and rank 0
    writes the file.
    """
    state = wrapped_state(model, "export_safetensors", "for a plain model use "
                          "safetensors.torch.save_model(model, path)")
    comm = state.comm
    meta = {"format": "pt", **_check_metadata(metadata)}
    if comm is None:
        path = _check_path(path)
    else:
        # Rank 0 writes: its check of the path decides for every rank.
        error = None
        try:
            path = _check_path(path) if comm.rank == 0 else None
        except (TypeError, ValueError) as exc:
            error = exc
        reason = comm.agree(None if error is None else str(error),
                            "export_safetensors: checking the path")
        if error is not None:
            raise error
        if reason is not None:
            raise ValueError(f"export_safetensors: {reason}")
    if path is None:  # a rank other than 0: take part in the gathers, write nothing
        stream(state, _entries(model), None)
        return
    state.synchronize()  # an optimizer update in flight would change masters while we read
    write_file(path, state, _entries(model), meta, "export_safetensors")
    fsync_dir(os.path.dirname(path))


def header_for(entries: OrderedDict, meta: dict[str, str], what: str) -> tuple[bytes, int]:
    """The encoded safetensors header (length prefix excluded, padded) of `entries` in their
    order, and the data section's size."""
    header: dict[str, object] = {"__metadata__": meta}
    end = 0
    for name, (dtype, shape, _) in entries.items():
        if dtype not in _DTYPES:
            raise TypeError(f"{what}: {name!r} has dtype {dtype}, which safetensors "
                            f"cannot store; supported: {sorted(_DTYPES.values())}")
        nbytes = shape.numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [end, end + nbytes]}
        end += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
    return encoded, end


def write_file(path: str, state, entries: OrderedDict, meta: dict[str, str], what: str) -> int:
    """Writes `entries` as one safetensors file at `path`: next to it, fsynced, then renamed,
    so `path` only ever holds a complete file. Returns the data bytes."""
    encoded, end = header_for(entries, meta, what)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            written = stream(state, entries, f)
            assert written == end
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return end


def stream(state, entries: OrderedDict, f) -> int:
    """Writes every entry's bytes to `f` in order (None: only take part in the gathers);
    returns the bytes written. An entry's source is a tensor, a slot (read from its chunk) or
    a callable giving the tensor (called on every rank: it may gather)."""
    masters = _Masters(state.manager)
    written = 0
    for name, (dtype, shape, source) in entries.items():
        if isinstance(source, torch.Tensor):
            if f is None:
                continue
            value = source.detach().to("cpu", dtype)
        elif callable(source):
            value = source().to("cpu", dtype)
            if f is None:
                continue
        else:  # a slot: read from the chunk now, in order, so NVMe reads stay once each
            value = masters.get(source.chunk)[source.range].to("cpu", dtype)
            if f is None:
                continue
        data = value.contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != shape.numel() * dtype.itemsize:
            raise AssertionError(f"export: {name!r} has {data.numel()} "
                                 f"bytes, its header entry says otherwise")
        f.write(data.numpy())
        written += data.numel()
        del value, data  # the next parameter may be large: drop this one first
    return written


def _check_path(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"export_safetensors: path must be a str or os.PathLike, "
                        f"got {type(path).__name__}")
    path = os.path.abspath(os.fsdecode(os.fspath(path)))
    if os.path.isdir(path):
        raise ValueError(f"export_safetensors: {path!r} is a directory; pass a file path, "
                         f"e.g. {os.path.join(path, 'model.safetensors')!r}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"export_safetensors: directory {parent!r} does not exist; create it "
                         "first (os.makedirs)")
    return path


def _check_metadata(metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise TypeError("export_safetensors: metadata must be a dict of str to str (safetensors "
                        "stores nothing else); convert values with str() or json.dumps")
    return metadata


def _entries(model: torch.nn.Module, what: str = "export_safetensors") -> OrderedDict[str, tuple]:
    """name -> (dtype, shape, slot or tensor), in write order: parameters grouped by chunk
    (in chunk and offset order), then buffers; each tied parameter under its first name."""
    slots = _slot_names(model)
    # NOTE: the class's state_dict with keep_vars=True gives names and order without copying
    # anything; the wrapped instance's own state_dict would read every value.
    names = type(model).state_dict(model, keep_vars=True)
    params, rest, seen = [], [], set()
    for name, value in names.items():
        slot = slots.get(name)
        if slot is not None:
            if id(slot) not in seen:
                seen.add(id(slot))
                params.append((name, slot))
        elif isinstance(value, torch.Tensor):
            rest.append((name, (value.dtype, value.shape, value)))
        else:
            raise TypeError(f"{what}: state-dict entry {name!r} is a "
                            f"{type(value).__name__}, not a tensor (extra state?); safetensors "
                            "holds tensors only")
    params.sort(key=lambda kv: (kv[1].chunk.index, kv[1].offset))
    out = OrderedDict((name, (slot.orig_dtype, torch.Size(slot.shape), slot))
                      for name, slot in params)
    out.update(rest)
    return out
