"""Weights from safetensors files, read tensor by tensor: `hm.wrap(model, weights=path)`.

`path` is one `.safetensors` file or a folder as transformers writes it (`model.safetensors`,
or shards listed by `model.safetensors.index.json`). Every file is opened with the safetensors
library, which checks its header (a truncated or corrupt file is refused, naming it), and its
tensors are matched against the model before anything is allocated (`WeightsPlan`). Parameter
values are then read one tensor at a time at the offsets of those checked headers, on a
thread about one chunk ahead (`Prefetch`); buffers with the library's `get_tensor`. Neither a
file nor the state dict is ever held whole (a memory map would also keep every page it
touched resident until the file is closed).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import deque
from dataclasses import dataclass

import torch

from heteromem.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors' dtype names -> torch dtypes (those this torch has).
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("I64", "int64"),
        ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U64", "uint64"), ("U32", "uint32"),
        ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool")]
    if hasattr(torch, attr)}
_LISTED = 8  # problems of one kind named in an error before "and N more"


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (None: this torch has none)."""
    return _DTYPES.get(name)


@dataclass(frozen=True)
class FileTensor:
    """Where one tensor is: its file, what its header says, and its bytes' place in the file."""

    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "BF16"
    begin: int = 0
    end: int = 0


def weight_files(path: object, what: str = "hm.wrap: weights") -> tuple[list[str], str | None]:
    """The safetensors files `path` names: the file itself, or a folder's shards (from its
    index, returned too) or its single `model.safetensors`. Raises naming what is missing."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike) to a .safetensors file or a "
                        f"folder of them, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        return [path], None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}={path!r} does not exist; give a .safetensors file or a "
                                "folder holding model.safetensors or model.safetensors.index.json")
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        files = sorted(set(_read_index(index).values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if absent:
            raise CheckpointError(f"{what}: {index} lists {len(absent)} file(s) that are not in "
                                  f"the folder: {absent[:_LISTED]}; copy the missing shards")
        return [os.path.join(path, f) for f in files], index
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        return [single], None
    present = sorted(os.listdir(path))
    hint = ""
    if any(f.endswith(".bin") or f.endswith(".pt") or f.endswith(".pth") for f in present):
        hint = (" It holds PyTorch pickles (.bin/.pt), which cannot be read tensor by tensor; "
                "convert them to safetensors first (transformers: load once and "
                "save_pretrained(..., safe_serialization=True)).")
    elif "adapter_model.safetensors" in present:
        hint = (" It holds a PEFT adapter only; pass the base model's folder, and add the "
                "adapter before wrapping.")
    raise CheckpointError(f"{what}: folder {path!r} holds no weights: neither {SINGLE_NAME} nor "
                          f"{INDEX_NAME} (it has {present[:_LISTED]}).{hint}")


def _read_index(index: str) -> dict[str, str]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map is not a mapping of tensor names to file names")
        if any(os.path.basename(v) != v for v in weight_map.values()):
            raise ValueError("weight_map names a file outside the folder")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"hm.wrap: weights index {index} cannot be read ({exc}); it should "
                              "be transformers' JSON with a \"weight_map\" of tensor name -> "
                              "file name") from None
    return weight_map


def read_headers(files: list[str], index: str | None = None) -> dict[str, FileTensor]:
    """Every tensor's name -> where it is and its header entry, from every file's header
    (checked by safetensors: a truncated or corrupt file is refused here, naming it), and
    checked against `index` (transformers' shard index) when given."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, FileTensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", backend="pread") as f:
                offsets = _data_offsets(file)
                for name in f.keys():
                    s = f.get_slice(name)
                    if name in tensors:
                        raise CheckpointError(f"hm.wrap: weights: tensor {name!r} is in both "
                                              f"{tensors[name].file} and {file}; remove one")
                    tensors[name] = FileTensor(file, tuple(s.get_shape()), s.get_dtype(),
                                               *offsets[name])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"hm.wrap: weights file {file} cannot be read as safetensors "
                                  f"({exc}); it is truncated, corrupt or not a safetensors file: "
                                  "copy or export it again") from None
    if index is not None:
        for name, file in _read_index(index).items():
            have = tensors.get(name)
            if have is None or os.path.basename(have.file) != file:
                where = "no file holds it" if have is None else f"it is in {have.file}"
                raise CheckpointError(f"hm.wrap: weights: {index} says tensor {name!r} is in "
                                      f"{file}, but {where}; the index does not match the shards")
    return tensors


def _data_offsets(file: str) -> dict[str, tuple[int, int]]:
    """name -> (first byte, end) of each tensor's data in `file`, from the header safetensors
    has just checked (its library does not expose them): an 8-byte little-endian length,
    that many bytes of JSON, then the data, which `data_offsets` count from."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    start = 8 + length
    return {name: (start + e["data_offsets"][0], start + e["data_offsets"][1])
            for name, e in header.items() if name != "__metadata__"}


@dataclass
class Target:
    """A model tensor to fill from the files: every state-dict name it has (tied parameters
    have several) and the file name each of them would have."""

    names: list[str]
    file_names: list[str]
    tensor: torch.Tensor  # the parameter or buffer itself
    persistent: bool      # in the state dict (non-persistent buffers are not)


class WeightsPlan:
    """The match between a model's tensors and the tensors in the files, checked whole.

    `rename(model_name)` gives the name a model tensor has in the files (None: never in the
    files, e.g. PEFT adapter weights). Raises `CheckpointError` listing every missing,
    unexpected, mis-shaped and unconvertible tensor together.
    """

    def __init__(self, files: list[str], index: str | None, targets: list[Target],
                 ignore_unexpected: list[str] = ()) -> None:
        self.files = files
        self.headers = read_headers(files, index)
        self.source: dict[int, tuple[str, FileTensor]] = {}  # id(tensor) -> (name, entry)
        missing, shapes, dtypes, claimed = [], [], [], set()
        for t in targets:
            if all(n is None for n in t.file_names):
                continue  # never in the files (PEFT adapters: made by PEFT)
            claimed.update(n for n in t.file_names if n is not None)
            found = [(n, self.headers[n]) for n in t.file_names if n in self.headers]
            if not found:
                # Meta tensors must come from the files; a materialised one keeps its value,
                # and a non-persistent buffer is computed by the model's own code.
                if t.tensor.is_meta and t.persistent:
                    missing.append(t.names[0])
                continue
            name, entry = found[0]
            if not t.persistent and not t.tensor.is_meta:
                continue
            if entry.shape != tuple(t.tensor.shape):
                shapes.append(f"{name!r} is {list(entry.shape)} in {entry.file} but "
                              f"{list(t.tensor.shape)} in the model ({t.names[0]})")
                continue
            problem = _conversion_problem(entry.dtype, t.tensor.dtype)
            if problem:
                dtypes.append(f"{name!r} in {entry.file} is {entry.dtype}: {problem} "
                              f"{t.tensor.dtype} ({t.names[0]})")
                continue
            self.source[id(t.tensor)] = (name, entry)
        unexpected = [n for n in self.headers if n not in claimed
                      and not any(re.search(p, n) for p in ignore_unexpected)]
        problems = []
        for title, items in [("missing from the files", missing),
                             ("in the files but not in the model", unexpected),
                             ("of the wrong shape", shapes),
                             ("of a dtype the model cannot take", dtypes)]:
            if items:
                more = f", and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
                problems.append(f"{len(items)} tensor(s) {title}: "
                                + "; ".join(str(i) for i in items[:_LISTED]) + more)
        if problems:
            where = (files[0] if len(files) == 1
                     else f"{os.path.dirname(files[0])} ({len(files)} files)")
            raise CheckpointError(f"hm.wrap: weights {where} do not fit the model:\n  "
                                  + "\n  ".join(problems) + "\nNothing was changed. Build the "
                                  "model from the same config as the checkpoint (the names are "
                                  "the model's state_dict names).")

    def has(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.source

    def name_of(self, tensor: torch.Tensor) -> str:
        return self.source[id(tensor)][0]


def _conversion_problem(file_dtype: str, model_dtype: torch.dtype) -> str | None:
    dtype = _DTYPES.get(file_dtype)
    if dtype is None:
        return "torch has no such dtype, so it cannot become"
    if model_dtype.is_floating_point != dtype.is_floating_point or dtype.is_complex:
        return "its values would not survive conversion to"
    return None


class TensorReader:
    """Reads tensors by name, one at a time, keeping each file open (pread: nothing stays
    mapped). `close()` closes them."""

    def __init__(self) -> None:
        self._open: dict[str, object] = {}

    def read(self, name: str, entry: FileTensor) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            handle = self._open.get(entry.file)
            if handle is None:
                handle = self._open[entry.file] = safe_open(entry.file, framework="pt",
                                                            backend="pread")
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"hm.wrap: reading tensor {name!r} from {entry.file} failed "
                                  f"({exc}); the file changed or is damaged since it was "
                                  "checked. The model was put back as it was.") from None

    def close(self) -> None:
        self._open.clear()


class Prefetch:
    """Reads the tensors `order` names on a thread of its own, ahead of `get`, at most
    `budget` bytes ahead (one tensor at least), so reading the files overlaps writing the
    chunks. `get` must ask for them in `order`'s order; the tensor it returns is valid until
    the next `get`. Memory: what is read ahead, the tensor lent, and up to `budget` bytes
    of buffers kept for reuse (a tensor larger than `budget` gets a buffer of its own, freed
    after use).

    NOTE: the bytes are read with `os.preadv` (which releases the GIL) at the offsets of the
    headers safetensors checked, into buffers this object reuses: a fresh tensor per read
    would page-fault every byte in again and, freed, fragment the heap (see
    `construct.release_freed_memory`); reused buffers fault once."""

    def __init__(self, order: list[tuple[str, FileTensor]], budget: int) -> None:
        self.budget = budget
        self.pending = deque(order)  # what `get` will ask for, in order
        self.ready: deque[tuple[str, torch.Tensor | BaseException]] = deque()
        self.free: list[torch.Tensor] = []  # uint8 buffers to reuse
        self.lent: torch.Tensor | None = None  # the buffer behind get's last value
        self.ahead = 0  # bytes read and not yet taken
        self.cond = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._run, args=(list(order),),
                                       name="heteromem-weights", daemon=True)
        self.thread.start()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        with self.cond:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
            if fits:
                return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def _run(self, order: list[tuple[str, FileTensor]]) -> None:
        files: dict[str, int] = {}
        try:
            for name, entry in order:
                nbytes = entry.end - entry.begin
                with self.cond:
                    self.cond.wait_for(lambda: self.stop or self.ahead == 0
                                       or self.ahead + nbytes <= self.budget)
                    if self.stop:
                        return
                try:
                    fd = files.get(entry.file)
                    if fd is None:
                        fd = files[entry.file] = os.open(entry.file, os.O_RDONLY)
                    buf = self._buffer(nbytes)
                    _pread_into(fd, buf[:nbytes], entry.begin, name, entry)
                    value: torch.Tensor | BaseException = buf
                except BaseException as exc:  # handed to `get`, which raises it
                    value = exc
                with self.cond:
                    self.ready.append((name, value))
                    self.ahead += nbytes
                    self.cond.notify_all()
                if isinstance(value, BaseException):
                    return
        finally:
            for fd in files.values():
                os.close(fd)

    def get(self, name: str) -> torch.Tensor:
        with self.cond:
            if self.lent is not None:  # the caller is done with the last value
                self.free.append(self.lent)
                self.lent = None
                # Keep at most `budget` bytes for reuse: the largest go first.
                self.free.sort(key=torch.Tensor.numel)
                while sum(b.numel() for b in self.free) > self.budget:
                    self.free.pop()
            self.cond.wait_for(lambda: self.ready)
            got, value = self.ready.popleft()
            _, entry = self.pending.popleft()
            self.ahead -= entry.end - entry.begin
            self.cond.notify_all()
        if isinstance(value, BaseException):
            raise value
        assert got == name, f"weights read out of order: {got!r} before {name!r}"
        self.lent = value
        data = value[:entry.end - entry.begin]
        return data.view(_DTYPES[entry.dtype]).view(entry.shape)

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()
        self.ready.clear()
        self.free.clear()
        self.lent = None


def _pread_into(fd: int, out: torch.Tensor, offset: int, name: str, entry: FileTensor) -> None:
    view = memoryview(out.numpy()).cast("B")
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(f"hm.wrap: reading tensor {name!r} from {entry.file} failed "
                                  f"({exc}). The model was put back as it was.") from None
        if n == 0:
            raise CheckpointError(f"hm.wrap: {entry.file} ended inside tensor {name!r}: it was "
                                  "truncated since it was checked. The model was put back as "
                                  "it was; copy or export the file again")
        done += n
