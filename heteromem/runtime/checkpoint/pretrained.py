"""`hm.export_pretrained`: a wrapped model as a folder transformers' `from_pretrained` loads.

`config.json` (when the model has a config) and the weights as safetensors shards of at most
`max_shard_size` with transformers' `model.safetensors.index.json` (one `model.safetensors`
when they fit one shard), written as `save_pretrained` writes them. Values stream from the
chunks tensor by tensor (`export.stream`), so no shard is ever held whole.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
from collections import OrderedDict

import torch

from heteromem.integrations import lora
from heteromem.memory.sizes import parse_size
from heteromem.runtime.checkpoint import export
from heteromem.runtime.checkpoint.layout import fsync_dir
from heteromem.runtime.weights import INDEX_NAME, SINGLE_NAME
from heteromem.runtime.wrapped import wrapped_state

_WHAT = "hm.export_pretrained"
_SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def export_pretrained(model: torch.nn.Module, path: str | os.PathLike, *,
                      max_shard_size: object = "5GB", merged: bool = False,
                      dtype: torch.dtype | None = None) -> None:
    """Writes a model wrapped by `hm.wrap` into the folder `path` (created if needed) so that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it.

    The weights are what `model.state_dict()` holds (fp32 masters of trainable parameters, in
    each parameter's dtype before wrapping, or in `dtype` when given; persistent buffers;
    tied weights once), in shards of at most `max_shard_size` (bytes or a string, "5GB" as
    transformers counts it) named and indexed as `save_pretrained` names them; shards of an
    earlier export in the folder are removed. `config.json` (its `dtype` set to the weights')
    and `generation_config.json` are written when the model has them. A PEFT model needs
    `merged=True`: its base model is written with the active adapters merged, as
    `merge_and_unload()` would give it. Memory stays around one tensor (one LoRA layer
    when merging). Each file appears complete or not at all (written next to its name,
    fsynced, renamed); the index is written last.

    Sharded over ranks, every rank must call it; rank 0 writes.
    """
    state = wrapped_state(model, _WHAT, "for a plain model use model.save_pretrained(path)")
    limit = parse_size(max_shard_size, "hm.export_pretrained: max_shard_size")
    if not isinstance(merged, bool):
        raise TypeError(f"{_WHAT}: merged must be True or False, got {type(merged).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"{_WHAT}: dtype={dtype!r} is not a floating-point torch dtype; use e.g. "
                         "torch.bfloat16, or None to keep each tensor's own")
    if lora.is_peft_model(model):
        if not merged:
            raise ValueError(f"{_WHAT}: this is a PEFT model: pass merged=True to write its base "
                             "model with the adapters merged in, or save only the adapters with "
                             "model.save_pretrained(path)")
        entries = lora.merged_entries(model, state, _WHAT)
        owner = model.get_base_model()
    else:
        if merged:
            raise ValueError(f"{_WHAT}: merged=True merges PEFT adapters, and this "
                             f"{type(model).__name__} is not a PEFT model; leave it False")
        entries = export._entries(model, _WHAT)
        owner = model
    if dtype is not None:
        entries = OrderedDict((n, (dtype if d.is_floating_point else d, s, src))
                              for n, (d, s, src) in entries.items())
    shards = _shards(entries, limit)
    comm = state.comm
    if comm is None:
        path = _check_folder(path)
    else:
        # Rank 0 writes: its check of the folder decides for every rank.
        error = None
        try:
            path = _check_folder(path) if comm.rank == 0 else None
        except (TypeError, ValueError, OSError) as exc:
            error = exc
        reason = comm.agree(None if error is None else str(error),
                            "hm.export_pretrained: checking the folder")
        if error is not None:
            raise error
        if reason is not None:
            raise ValueError(f"{_WHAT}: {reason}")
    state.synchronize()  # an optimizer update in flight would change masters while we read
    if path is None:  # a rank other than 0: take part in the gathers, write nothing
        for shard in shards:
            export.stream(state, shard, None)
        return
    names = _shard_names(len(shards))
    total, weight_map = 0, {}
    for name, shard in zip(names, shards):
        total += export.write_file(os.path.join(path, name), state, shard, {"format": "pt"}, _WHAT)
        weight_map.update(dict.fromkeys(shard, name))
    index = os.path.join(path, INDEX_NAME)
    if len(shards) > 1:
        _write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif os.path.exists(index):
        os.remove(index)
    for stale in os.listdir(path):
        if _SHARD.match(stale) and stale not in names:
            os.remove(os.path.join(path, stale))
    _write_configs(owner, path, entries)
    fsync_dir(path)


def _shards(entries: OrderedDict, limit: int) -> list[OrderedDict]:
    """Consecutive entries into shards of at most `limit` bytes (a larger tensor alone)."""
    shards, size = [OrderedDict()], 0
    for name, entry in entries.items():
        nbytes = entry[1].numel() * entry[0].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append(OrderedDict())
            size = 0
        shards[-1][name] = entry
        size += nbytes
    return shards


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _check_folder(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{_WHAT}: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.path.abspath(os.fsdecode(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{_WHAT}: {path!r} is a file; give a folder (it is created if needed)")
    os.makedirs(path, exist_ok=True)
    return path


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_configs(owner: torch.nn.Module, path: str, entries: OrderedDict) -> None:
    """config.json with the written weights' dtype (the one most bytes have), as
    save_pretrained records the model's; generation_config.json when there is one."""
    config = getattr(owner, "config", None)
    if config is not None and callable(getattr(config, "save_pretrained", None)):
        config = copy.deepcopy(config)
        by_dtype: dict[torch.dtype, int] = {}
        for dtype, shape, _ in entries.values():
            if dtype.is_floating_point:
                by_dtype[dtype] = by_dtype.get(dtype, 0) + shape.numel() * dtype.itemsize
        if by_dtype:
            config.dtype = max(by_dtype, key=by_dtype.get)
        config.save_pretrained(path)
    generation = getattr(owner, "generation_config", None)
    if generation is not None and callable(getattr(generation, "save_pretrained", None)):
        generation.save_pretrained(path)
