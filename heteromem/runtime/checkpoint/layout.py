"""On-disk layout of a heteromem checkpoint, and how it is published atomically.

    <path>/                     the checkpoint: a directory that keeps the last complete save
      LATEST                    {"version": "v000007", "manifest_xxh3_64": "..."}: what to load
      v000007/
        manifest.json           format, model and optimizer description, every file's checksum
        chunk-00000.bin ...     one file per chunk: its regions (parameters in the compute
                                dtype, then the fp32 master and the optimizer's state regions:
                                exp_avg, exp_avg_sq for Adam and AGD; codes and block scales
                                for the 8-bit optimizers) back to back
        extra.pt                module buffers, RNG states, the caller's `extra`

Sharded over N ranks, each rank writes its part of every chunk, `chunk-00000.rank00.bin`
(the same regions, each over the rank's elements only), and its own `extra.rank00.pt`; rank 0
writes the one manifest, which lists every chunk's parts (element range and file), after
every rank's files are written. Any rank count can load it: each rank reads the element
ranges it owns from whichever parts hold them.

A save writes a hidden `.tmp-*` directory, fsyncs every file and the directory, renames it to
its version name and only then replaces LATEST (write LATEST.tmp, fsync, rename, fsync the
parent). A process killed at any moment leaves LATEST naming either the old or the new
complete version; anything else in <path> is a leftover that loads ignore and the next save
removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil

from heteromem.errors import CheckpointError, StorageError, storage_error

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency; this names the fix
    xxhash = None

FORMAT = "heteromem-checkpoint"
# 2: chunks list their parts ("shards"). 3: the optimizer's kind and state layout are
# recorded, and regions say how many elements an item covers (block scales). Versions 1 and 2
# (Adam/AdamW only) are read too.
FORMAT_VERSION = 3
LATEST = "LATEST"
MANIFEST = "manifest.json"
EXTRA = "extra.pt"
_VERSION_RE = re.compile(r"^v(\d{6})$")
_READ_BLOCK = 64 << 20


def hasher():
    """A streaming xxh3-64 hasher: fast enough (~10 GB/s a core) to check every byte."""
    if xxhash is None:
        raise ImportError("heteromem checkpoints need the 'xxhash' package for checksums; "
                          "pip install xxhash")
    return xxhash.xxh3_64()


def chunk_file(index: int, rank: int | None = None) -> str:
    return f"chunk-{index:05d}.bin" if rank is None else f"chunk-{index:05d}.rank{rank:02d}.bin"


def extra_file(rank: int | None = None) -> str:
    return EXTRA if rank is None else f"extra.rank{rank:02d}.pt"


def check_root(path: str | os.PathLike, what: str) -> str:
    """The checkpoint directory as a string; refuses a path that is a file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: path must be a str or os.PathLike, got {type(path).__name__}")
    root = os.fspath(path)
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(f"{what}: {root!r} is a file; a heteromem checkpoint is a "
                              "directory: pass a directory path (it is created if missing)")
    return root


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def versions(root: str) -> list[int]:
    out = []
    for name in os.listdir(root):
        match = _VERSION_RE.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            out.append(int(match.group(1)))
    return sorted(out)


def read_latest(root: str) -> dict | None:
    """LATEST's content, or None when no save was ever published at root."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            latest = json.load(f)
        if not (isinstance(latest, dict) and _VERSION_RE.match(str(latest.get("version")))
                and isinstance(latest.get("manifest_xxh3_64"), str)):
            raise ValueError("unexpected content")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"load_checkpoint: {path} is damaged ({exc}); this is not a "
                              "checkpoint heteromem wrote, or it was modified") from exc
    return latest


def new_tmp_dir(root: str) -> str:
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    return tmp


def publish(root: str, tmp: str, manifest_digest: str) -> str:
    """Makes the fully written and fsynced `tmp` the checkpoint at root; returns its name."""
    fsync_dir(tmp)
    existing = versions(root)
    name = f"v{(existing[-1] + 1 if existing else 1):06d}"
    os.rename(tmp, os.path.join(root, name))
    fsync_dir(root)
    latest_tmp = os.path.join(root, LATEST + ".tmp")
    with naming(latest_tmp), open(latest_tmp, "w", encoding="utf-8") as f:
        json.dump({"version": name, "manifest_xxh3_64": manifest_digest}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, os.path.join(root, LATEST))
    fsync_dir(root)
    return name


def remove_leftovers(root: str) -> None:
    """Removes what no load would read: older versions and interrupted saves."""
    if not os.path.isdir(root):
        return
    latest = read_latest(root)
    keep = latest["version"] if latest else None
    for name in os.listdir(root):
        full = os.path.join(root, name)
        if name == keep or name == LATEST:
            continue
        if name.startswith(".tmp-") or _VERSION_RE.match(name) or name == LATEST + ".tmp":
            if os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                try:
                    os.remove(full)
                except OSError:
                    pass


@contextlib.contextmanager
def naming(path: str):
    """An OSError inside becomes a `StorageError` naming `path` (a failed write() says only
    what went wrong, not where)."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(exc.errno, exc.strerror or str(exc), exc.filename or path) from exc


def write_manifest(tmp: str, manifest: dict) -> str:
    """Writes manifest.json (fsynced); returns its checksum for LATEST."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    path = os.path.join(tmp, MANIFEST)
    with naming(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    h = hasher()
    h.update(data)
    return h.hexdigest()


def file_digest(path: str) -> tuple[int, str]:
    """(size, xxh3-64) of a file, read in large blocks."""
    h = hasher()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(max(1, min(_READ_BLOCK, os.fstat(f.fileno()).st_size)))
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()
