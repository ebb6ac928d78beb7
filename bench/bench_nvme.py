"""heteromem.io.IoEngine read and write throughput against plain file I/O of the same bytes, in
the same run, on the same file.

    .venv/bin/pytest bench/bench_nvme.py --benchmark-json=/tmp/bench_nvme.json
    .venv/bin/python bench/summarize.py /tmp/bench_nvme.json
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_nvme.py --benchmark-disable -q   # smoke

Files go under $HETEROMEM_BENCH_DIR (default build/bench in the repository): point it at the
drive you care about. Chunks of 64 MiB, 256 MiB and 1 GiB (quick mode: 4 MiB); groups
"nvme-write <size>" and "nvme-read <size>", rows run back to back in this order:
  dd             baseline: coreutils dd, bs = the engine's block, oflag=direct conv=fsync
                 (source: the same bytes in a /dev/shm file) / iflag=direct
  buffered       baseline: Python FileIO write(memoryview) + os.fsync / readinto
  engine-python  heteromem's pure-Python backend (the fallback without the extension)
  engine         heteromem's native engine (threads, block_bytes as IoEngine defaults)
Writes overwrite the file in place (no block allocation in the timed rounds) and end with an
fsync in every row. Reads: the engine and dd use O_DIRECT, and the buffered row's pages are
dropped with posix_fadvise(DONTNEED) before each round, so no row reads from the page cache
(a virtual disk's host may still cache; extra_info says what the file system is).
extra_info: gb_per_s of the median, o_direct, filesystem, and in the engine rows the ratios
to every other row of its group (vs_dd, vs_buffered, vs_engine_python).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import filesystem_of, quick_mode, run_dd, scratch_dir
from heteromem.io import IoEngine, aligned_empty
from heteromem.io.engine import native_unavailable_reason

MiB = 1 << 20
SIZES = [4 * MiB] if quick_mode() else [64 * MiB, 256 * MiB, 1024 * MiB]
IMPLS = ["dd", "buffered", "engine-python", "engine"]
CASE_SECONDS = float(os.environ.get("HETEROMEM_BENCH_SECONDS", "") or 2.0)
BLOCK = 8 * MiB
# (direction, size) -> impl -> GB/s of its median, filled as a group's rows run.
RESULTS: dict[tuple[str, int], dict[str, float]] = {}


def size_label(nbytes: int) -> str:
    return f"{nbytes // 1024 // MiB}G" if nbytes % (1024 * MiB) == 0 else f"{nbytes // MiB}M"


@pytest.fixture(scope="module")
def bench_dir() -> Path:
    path = scratch_dir("nvme")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def engines() -> dict[str, IoEngine]:
    made = {"engine-python": IoEngine(backend="python")}
    if not native_unavailable_reason():
        made["engine"] = IoEngine(backend="native")
    yield made
    for eng in made.values():
        eng.shutdown()


class Chunk:
    """One size's data: an aligned host buffer, a copy of its bytes in /dev/shm for dd to
    read from, and the file every row of that size overwrites and reads."""

    def __init__(self, folder: Path, nbytes: int, engine: IoEngine) -> None:
        self.nbytes = nbytes
        self.data = aligned_empty(nbytes)
        self.data.view(torch.int32).copy_(torch.randint(-2**31, 2**31 - 1, (nbytes // 4,),
                                                        dtype=torch.int32))
        self.back = aligned_empty(nbytes)
        self.path = folder / f"chunk-{size_label(nbytes)}.bin"
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else folder
        self.source = shm / f"heteromem-bench-{os.getpid()}-{size_label(nbytes)}.bin"
        self.source.write_bytes(memoryview(self.data.numpy()))
        f = engine.open(self.path, create=True)
        engine.set_size(f, nbytes)
        engine.write(f, 0, self.data)
        engine.fsync(f)
        self.direct = f.direct
        engine.close(f)

    def drop(self) -> None:
        self.source.unlink(missing_ok=True)


_chunk: Chunk | None = None


@pytest.fixture
def chunk(bench_dir, engines, nbytes) -> Chunk:
    """The chunk of this size; the previous size's is dropped (1 GiB twice would be wasteful)."""
    global _chunk
    if _chunk is None or _chunk.nbytes != nbytes:
        if _chunk is not None:
            _chunk.drop()
        _chunk = None
        _chunk = Chunk(bench_dir, nbytes, engines["engine-python"])
    yield _chunk


def teardown_module() -> None:
    global _chunk
    if _chunk is not None:
        _chunk.drop()
        _chunk = None


def make_case(impl: str, direction: str, chunk: Chunk, engines: dict[str, IoEngine]):
    """(timed function, setup run before each round or None, info) for one row."""
    n = chunk.nbytes
    if impl == "dd":
        if not shutil.which("dd"):
            pytest.skip("dd is not installed")
        if not chunk.direct:
            pytest.skip(f"{chunk.path.parent} has no O_DIRECT, which the dd rows use")
        bs = min(BLOCK, n)
        if direction == "write":
            args = [f"if={chunk.source}", f"of={chunk.path}", f"bs={bs}", f"count={n // bs}",
                    "oflag=direct", "conv=fsync,notrunc"]
        else:
            args = [f"if={chunk.path}", "of=/dev/null", f"bs={bs}", f"count={n // bs}",
                    "iflag=direct"]
        reported: list[float] = []
        return (lambda: reported.append(run_dd(args))), None, {
            "case": f"dd {'oflag=direct conv=fsync' if direction == 'write' else 'iflag=direct'}",
            "role": "baseline", "dd_bs": bs, "dd_reported_s": reported, "o_direct": True}
    if impl == "buffered":
        view = memoryview((chunk.data if direction == "write" else chunk.back).numpy())

        def write() -> None:
            with open(chunk.path, "r+b", buffering=0) as fh:
                done = 0
                while done < n:
                    done += fh.write(view[done:])
                os.fsync(fh.fileno())

        def read() -> None:
            with open(chunk.path, "rb", buffering=0) as fh:
                done = 0
                while done < n:
                    got = fh.readinto(view[done:])
                    if not got:
                        raise RuntimeError(f"{chunk.path}: short read at {done} of {n} bytes")
                    done += got

        def drop_cache() -> None:
            fd = os.open(chunk.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

        if direction == "write":
            return write, None, {"case": "Python FileIO write + fsync", "role": "baseline",
                                 "o_direct": False}
        return read, drop_cache, {"case": "Python FileIO readinto, cold", "role": "baseline",
                                  "o_direct": False}
    if impl not in engines:
        pytest.skip(f"native engine unavailable: {native_unavailable_reason()}")
    eng = engines[impl]
    f = eng.open(chunk.path, create=False)

    def engine_write() -> None:
        eng.write(f, 0, chunk.data)
        eng.fsync(f)

    def engine_read() -> None:
        eng.read(f, 0, chunk.back)

    label = "heteromem IoEngine" + (" (pure Python)" if impl == "engine-python" else "")
    return (engine_write if direction == "write" else engine_read), None, {
        "case": label + (" write + fsync" if direction == "write" else " read"),
        "role": "subject" if impl == "engine" else "baseline", "o_direct": f.direct,
        "engine_threads": eng.threads, "engine_block_bytes": eng.block_bytes,
        "_close": lambda: eng.close(f)}


@pytest.mark.parametrize("nbytes", SIZES, ids=[size_label(s) for s in SIZES])
@pytest.mark.parametrize("direction", ["write", "read"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nvme_io(benchmark, chunk: Chunk, engines, nbytes: int, direction: str, impl: str) -> None:
    """One chunk written (then fsynced) or read in full, by one implementation."""
    benchmark.group = f"nvme-{direction} {size_label(nbytes)}"
    fn, setup, info = make_case(impl, direction, chunk, engines)
    close = info.pop("_close", None)
    reported = info.pop("dd_reported_s", None)
    benchmark.extra_info.update(impl=impl, direction=direction, bytes_moved=nbytes,
                                filesystem=filesystem_of(chunk.path), path=str(chunk.path),
                                **info)
    try:
        rounds = 1
        if benchmark.enabled:
            fn()  # warm-up outside the stats: first-touch of buffers, dd's binary, the engine
            rounds = max(5, min(50, round(CASE_SECONDS * 2.5e9 / nbytes)))
        if setup is None:
            benchmark.pedantic(fn, rounds=rounds, iterations=1)
        else:
            benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1)
    finally:
        if close is not None:
            close()
    if direction == "read" and impl != "dd":
        assert torch.equal(chunk.back, chunk.data), f"{impl} read back other bytes"
        chunk.back.zero_()
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    stats = benchmark.stats.stats
    gb_s = nbytes / stats.median / 1e9
    benchmark.extra_info.update(median_s=stats.median, gb_per_s=gb_s,
                                gb_s_min=nbytes / stats.max / 1e9,
                                gb_s_max=nbytes / stats.min / 1e9)
    if reported:
        median_dd = sorted(reported)[len(reported) // 2]
        benchmark.extra_info["dd_reported_gb_s"] = nbytes / median_dd / 1e9
    group = RESULTS.setdefault((direction, nbytes), {})
    group[impl] = gb_s
    if impl == "engine":
        for other, rate in group.items():
            if other != "engine":
                benchmark.extra_info[f"vs_{other.replace('-', '_')}"] = gb_s / rate
