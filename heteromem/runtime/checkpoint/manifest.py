"""The manifest's schema, checked field by field before a load trusts any of it.

A matching checksum only says the manifest is the one that was written, not that its writer
was right (another version, another tool, a bug). Every field a load reads is checked here for
its type and range, and the fields that must agree with each other (a parameter inside its
chunk, a part inside the chunk's elements, a file listed for every part) are checked too. A
malformed manifest is a `CheckpointError` naming the field, raised before anything changes.
"""

from __future__ import annotations

import json
import math
import re

from heteromem.errors import CheckpointError
from heteromem.runtime.optimizer_kind import KINDS

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Element dtypes a parameter or region may have (state.DTYPES names the torch dtypes).
ELEMENT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                  "uint8", "bool")
# Every region any optimizer's chunks hold.
REGIONS = ("params", *dict.fromkeys(r.name for k in KINDS.values() for r in k.layout.regions))
# A part's file is a plain name inside the version folder, never a path out of it.
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BadField(Exception):
    """A field of the manifest that a load cannot use (see `malformed`)."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field} {why}")


def _get(obj: dict, key: str, where: str) -> object:
    if key not in obj:
        raise BadField(f"{where}.{key}" if where else key, "is missing")
    return obj[key]


def _dict(value: object, field: str) -> dict:
    if not isinstance(value, dict):
        raise BadField(field, f"must be an object, got {type(value).__name__}")
    return value


def _list(value: object, field: str) -> list:
    if not isinstance(value, list):
        raise BadField(field, f"must be a list, got {type(value).__name__}")
    return value


def _int(value: object, field: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadField(field, f"must be an integer, got {value!r}")
    if value < low:
        raise BadField(field, f"must be >= {low}, got {value}")
    return value


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadField(field, f"must be true or false, got {value!r}")
    return value


def _str(value: object, field: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise BadField(field, f"must be a string, got {value!r}")
    if choices is not None and value not in choices:
        raise BadField(field, f"must be one of {list(choices)}, got {value!r}")
    return value


def _real(value: object, field: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadField(field, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise BadField(field, f"must be > 0, got {value!r}")
    return float(value)


def parse(data: bytes) -> dict:
    """The manifest's JSON, checked; raises `BadField` (see `check`)."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadField("the manifest", f"is not valid JSON ({exc})") from exc
    return _dict(manifest, "the manifest")


def check_header(manifest: dict) -> None:
    """What says which format this is: read before anything else."""
    _str(_get(manifest, "format", ""), "format")
    _int(_get(manifest, "format_version", ""), "format_version", 1)


def check_v1_chunks(manifest: dict) -> None:
    """Version 1's chunk entries (one file each), before they are rewritten as version 2."""
    for i, chunk in enumerate(_list(_get(manifest, "chunks", ""), "chunks")):
        where = f"chunks[{i}]"
        chunk = _dict(chunk, where)
        _str(_get(chunk, "file", where), f"{where}.file")
        _int(_get(chunk, "used", where), f"{where}.used")
        _int(_get(chunk, "bytes", where), f"{where}.bytes")
        for k, region in enumerate(_list(_get(chunk, "regions", where), f"{where}.regions")):
            _dict(region, f"{where}.regions[{k}]")


def check_v2_optimizer(manifest: dict) -> None:
    """Version 2's optimizer entry (Adam or AdamW: `adamw`), before it is rewritten as 3."""
    optimizer = _get(manifest, "optimizer", "")
    if optimizer is not None:
        _bool(_get(_dict(optimizer, "optimizer"), "adamw", "optimizer"), "optimizer.adamw")


def _state_regions(manifest: dict) -> set[str] | None:
    """The region names a trainable chunk must hold besides the parameters (and, not in
    fp32, the master), by the optimizer the manifest names (None: it names none)."""
    optimizer = manifest.get("optimizer")
    if not isinstance(optimizer, dict):
        return None
    kind = KINDS.get(optimizer.get("kind"))
    return None if kind is None else {r.name for r in kind.layout.state_regions}


def check_body(manifest: dict) -> None:
    """Every field a version 3 load reads, and how they must agree."""
    _str(_get(manifest, "dtype", ""), "dtype", COMPUTE_DTYPES)
    world = _int(_get(manifest, "world_size", ""), "world_size", 1)
    files = _dict(_get(manifest, "files", ""), "files")
    for name, info in files.items():
        where = f"files[{name!r}]"
        if not _FILE_RE.match(name):
            raise BadField(where, "is not a plain file name")
        info = _dict(info, where)
        _int(_get(info, "bytes", where), f"{where}.bytes")
        _str(_get(info, "xxh3_64", where), f"{where}.xxh3_64")
    chunks = {}
    state_names = _state_regions(manifest)
    if state_names is None:
        state_names = {r.name for r in KINDS["AdamW"].layout.state_regions}
    for i, chunk in enumerate(_list(_get(manifest, "chunks", ""), "chunks")):
        where = f"chunks[{i}]"
        chunk = _dict(chunk, where)
        index = _int(_get(chunk, "index", where), f"{where}.index")
        if index in chunks:
            raise BadField(f"{where}.index", f"repeats chunk {index}")
        used = _int(_get(chunk, "used", where), f"{where}.used")
        trainable = _bool(_get(chunk, "trainable", where), f"{where}.trainable")
        names = []
        for k, region in enumerate(_list(_get(chunk, "regions", where), f"{where}.regions")):
            rw = f"{where}.regions[{k}]"
            region = _dict(region, rw)
            names.append(_str(_get(region, "name", rw), f"{rw}.name", REGIONS))
            _str(_get(region, "dtype", rw), f"{rw}.dtype", ELEMENT_DTYPES)
            _int(_get(region, "elements_per_item", rw), f"{rw}.elements_per_item", 1)
        want = {"params"} | (state_names if trainable else set())
        if len(set(names)) != len(names) or not want <= set(names) or (
                not trainable and len(names) != 1):
            raise BadField(f"{where}.regions", f"{names} are not the regions of a "
                       f"{'trainable' if trainable else 'frozen'} chunk")
        shards = _list(_get(chunk, "shards", where), f"{where}.shards")
        if not shards:
            raise BadField(f"{where}.shards", "is empty")
        covered = 0
        for k, shard in enumerate(shards):
            sw = f"{where}.shards[{k}]"
            shard = _dict(shard, sw)
            file = _str(_get(shard, "file", sw), f"{sw}.file")
            if file not in files:
                raise BadField(f"{sw}.file", f"names {file!r}, which the files list lacks")
            lo = _int(_get(shard, "lo", sw), f"{sw}.lo")
            hi = _int(_get(shard, "hi", sw), f"{sw}.hi")
            if lo != covered or hi < lo or hi > used:
                raise BadField(sw, f"covers elements [{lo}, {hi}), which do not continue the parts "
                           f"before it within the chunk's {used}")
            covered = hi
            _int(_get(shard, "bytes", sw), f"{sw}.bytes")
        if world == 1 and covered != used:
            raise BadField(f"{where}.shards", f"cover {covered} of the chunk's {used} elements")
        chunks[index] = (covered, trainable)
    params = _list(_get(manifest, "params", ""), "params")
    seen: set[str] = set()
    for i, param in enumerate(params):
        where = f"params[{i}]"
        param = _dict(param, where)
        names = _list(_get(param, "names", where), f"{where}.names")
        if not names:
            raise BadField(f"{where}.names", "is empty")
        for k, name in enumerate(names):
            _str(name, f"{where}.names[{k}]")
            if name in seen:
                raise BadField(f"{where}.names[{k}]", f"repeats {name!r}")
            seen.add(name)
        chunk = _int(_get(param, "chunk", where), f"{where}.chunk")
        if chunk not in chunks:
            raise BadField(f"{where}.chunk", f"names chunk {chunk}, which the chunks list lacks")
        offset = _int(_get(param, "offset", where), f"{where}.offset")
        numel = _int(_get(param, "numel", where), f"{where}.numel")
        shape = [_int(d, f"{where}.shape[{k}]")
                 for k, d in enumerate(_list(_get(param, "shape", where), f"{where}.shape"))]
        if math.prod(shape) != numel:
            raise BadField(f"{where}.shape", f"{shape} does not hold numel={numel} elements")
        if offset + numel > chunks[chunk][0]:
            raise BadField(where, f"[{offset}, {offset + numel}) lies outside the "
                           f"{chunks[chunk][0]} elements chunk {chunk}'s parts hold")
        _str(_get(param, "dtype", where), f"{where}.dtype", ELEMENT_DTYPES)
        trainable = _bool(_get(param, "trainable", where), f"{where}.trainable")
        if trainable and not chunks[chunk][1]:
            raise BadField(f"{where}.trainable", f"is true but chunk {chunk} is frozen")
        _int(_get(param, "group", where), f"{where}.group", -1)
        _int(_get(param, "step", where), f"{where}.step")
    optimizer = _get(manifest, "optimizer", "")
    if optimizer is not None:
        _check_optimizer(_dict(optimizer, "optimizer"), params)


def _check_optimizer(optimizer: dict, params: list) -> None:
    kind = KINDS[_str(_get(optimizer, "kind", "optimizer"), "optimizer.kind", tuple(KINDS))]
    layout = _dict(_get(optimizer, "state_layout", "optimizer"), "optimizer.state_layout")
    _int(_get(layout, "align", "optimizer.state_layout"), "optimizer.state_layout.align", 1)
    for k, region in enumerate(_list(_get(layout, "regions", "optimizer.state_layout"),
                                     "optimizer.state_layout.regions")):
        rw = f"optimizer.state_layout.regions[{k}]"
        region = _dict(region, rw)
        _str(_get(region, "name", rw), f"{rw}.name", REGIONS)
        _str(_get(region, "dtype", rw), f"{rw}.dtype", ELEMENT_DTYPES)
        _int(_get(region, "elements_per_item", rw), f"{rw}.elements_per_item", 1)
    groups = _list(_get(optimizer, "param_groups", "optimizer"), "optimizer.param_groups")
    for i, group in enumerate(groups):
        where = f"optimizer.param_groups[{i}]"
        group = _dict(group, where)
        for key in kind.hyper:
            _get(group, key, where)
        try:
            kind.check_group(group, where)
        except (TypeError, ValueError) as exc:
            raise BadField(where, f"is not a usable {kind.name} group ({exc})") from exc
    for i, param in enumerate(params):
        if param["trainable"] and not -1 <= param["group"] < len(groups):
            raise BadField(f"params[{i}].group", f"is {param['group']}, but there are "
                       f"{len(groups)} param groups")
    _int(_get(optimizer, "skipped_steps", "optimizer"), "optimizer.skipped_steps")
    scaler = _get(optimizer, "scaler", "optimizer")
    if scaler is not None:
        scaler = _dict(scaler, "optimizer.scaler")
        for key in ("scale", "growth_factor", "backoff_factor"):
            _real(_get(scaler, key, "optimizer.scaler"), f"optimizer.scaler.{key}", positive=True)
        _int(_get(scaler, "growth_interval", "optimizer.scaler"), "optimizer.scaler.growth_interval", 1)
        _int(_get(scaler, "good_steps", "optimizer.scaler"), "optimizer.scaler.good_steps")


def malformed(root: str, exc: BadField) -> CheckpointError:
    return CheckpointError(f"load_checkpoint: {root!r}: its manifest is malformed: {exc}; it "
                           "was not written by this heteromem's save_checkpoint, or was changed "
                           "since. Use another checkpoint. Nothing was loaded.")

