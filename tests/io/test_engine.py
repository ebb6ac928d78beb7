"""heteromem.io.IoEngine, both backends (native csrc/io and the pure-Python fallback): data
survives round trips across block splits and concurrent tickets, failures raise OSError naming
the file and offset and leave the file untouched, O_DIRECT is used where the filesystem has it
and refused buffers are reported as ValueError, and waiting does not hold the GIL.

Files go to pytest's tmp_path; on our machines (/tmp on ext4) that exercises O_DIRECT, which
test_tmp_path_files_are_direct checks against a probe of the filesystem."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

from heteromem import HeteromemWarning
from heteromem.io import IoEngine, IoFile, aligned_empty
from heteromem.io.engine import native_unavailable_reason

ALIGN = IoEngine.ALIGN
BACKENDS = [
    pytest.param("native", marks=pytest.mark.skipif(
        bool(native_unavailable_reason()), reason=f"native engine: {native_unavailable_reason()}")),
    "python",
]


def supports_o_direct(folder) -> bool:
    """Whether files in `folder` can be opened with O_DIRECT (what the engine should get)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = os.path.join(folder, ".o_direct_probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def engine(backend):
    # Small blocks, so even modest requests split over several blocks and threads.
    with IoEngine(threads=3, block_bytes=3 * ALIGN, backend=backend) as eng:
        yield eng


def pattern(nbytes: int, seed: int = 0) -> torch.Tensor:
    buf = aligned_empty(nbytes)
    gen = torch.Generator().manual_seed(seed)
    buf.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))
    return buf


def file_bytes(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def test_tmp_path_files_are_direct(engine, tmp_path):
    f = engine.open(tmp_path / "a.bin", create=True)
    assert isinstance(f, IoFile) and f.path == str(tmp_path / "a.bin")
    assert f.direct == supports_o_direct(tmp_path)


@pytest.mark.parametrize("nbytes,block_bytes", [
    (0, 3 * ALIGN),
    (ALIGN, 3 * ALIGN),
    ((1 << 20) + ALIGN, 3 * ALIGN),  # 86 blocks, the last one short
    (20 << 20, 8 << 20),             # the default block size: 8 + 8 + 4 MiB
])
def test_round_trip(backend, tmp_path, nbytes, block_bytes):
    with IoEngine(threads=4, block_bytes=block_bytes, backend=backend) as eng:
        f = eng.open(tmp_path / "data.bin", create=True)
        out = pattern(nbytes)
        eng.write(f, ALIGN, out)
        eng.fsync(f)
        back = aligned_empty(nbytes).zero_()
        eng.read(f, ALIGN, back)
        eng.close(f)
    assert torch.equal(back, out)
    assert file_bytes(tmp_path / "data.bin")[ALIGN:] == out.numpy().tobytes()


def test_any_dtype_moves_its_bytes(engine, tmp_path):
    f = engine.open(tmp_path / "bf16.bin", create=True)
    out = aligned_empty(3 * ALIGN).view(torch.bfloat16).copy_(torch.randn(3 * ALIGN // 2))
    engine.write(f, 0, out)
    back = aligned_empty(3 * ALIGN).view(torch.bfloat16)
    engine.read(f, 0, back)
    assert torch.equal(back, out)


def test_many_concurrent_tickets(engine, tmp_path):
    f = engine.open(tmp_path / "many.bin", create=True)
    piece, count = 5 * ALIGN, 48
    outs = [pattern(piece, seed=i) for i in range(count)]
    tickets = [engine.submit_write(f, i * piece, buf) for i, buf in enumerate(outs)]
    for ticket in reversed(tickets):  # waiting order does not matter
        engine.wait(ticket)
    backs = [aligned_empty(piece) for _ in range(count)]
    tickets = [engine.submit_read(f, i * piece, buf) for i, buf in enumerate(backs)]
    for ticket in tickets:
        engine.wait(ticket)
    for i in range(count):
        assert torch.equal(backs[i], outs[i]), f"piece {i}"


def test_writes_at_an_offset_change_only_their_bytes(engine, tmp_path):
    f = engine.open(tmp_path / "offsets.bin", create=True)
    base, patch = pattern(4 * ALIGN, seed=1), pattern(ALIGN, seed=2)
    engine.write(f, 0, base)
    engine.write(f, 2 * ALIGN, patch)
    expected = base.clone()
    expected[2 * ALIGN:3 * ALIGN] = patch
    back = aligned_empty(4 * ALIGN)
    engine.read(f, 0, back)
    assert torch.equal(back, expected)


@pytest.mark.parametrize("offset", [0, 2 * ALIGN])
def test_a_read_past_the_end_is_a_short_read(engine, tmp_path, offset):
    path = tmp_path / "short.bin"
    f = engine.open(path, create=True)
    engine.write(f, 0, pattern(ALIGN))
    with pytest.raises(OSError) as info:
        engine.read(f, offset, aligned_empty(2 * ALIGN))
    assert info.value.errno == errno.EIO
    message = str(info.value)
    assert str(path) in message and "short read: got" in message, message


def test_open_in_a_missing_folder_names_the_path(engine, tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "f.bin"
    with pytest.raises(OSError) as info:
        engine.open(path, create=True)
    assert info.value.errno == errno.ENOENT and str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        engine.open(tmp_path / "missing.bin", create=False)


def test_misaligned_requests_on_a_direct_file_are_refused(engine, tmp_path):
    f = engine.open(tmp_path / "align.bin", create=True)
    if not f.direct:
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    buf = aligned_empty(3 * ALIGN)
    with pytest.raises(ValueError, match="address"):
        engine.submit_write(f, 0, buf[512:512 + ALIGN])
    with pytest.raises(ValueError, match="offset"):
        engine.submit_write(f, 512, buf[:ALIGN])
    with pytest.raises(ValueError, match="length"):
        engine.submit_read(f, 0, buf[:1000])
    assert os.path.getsize(f.path) == 0


def test_bad_buffers_are_refused(engine, tmp_path):
    f = engine.open(tmp_path / "bad.bin", create=True)
    with pytest.raises(ValueError, match="buf must be contiguous"):
        engine.submit_write(f, 0, aligned_empty(2 * ALIGN).view(2, ALIGN).t())
    with pytest.raises(ValueError, match="buf must be a torch.Tensor"):
        engine.submit_write(f, 0, bytearray(ALIGN))
    with pytest.raises(ValueError, match="offset"):
        engine.submit_write(f, -ALIGN, aligned_empty(ALIGN))


@pytest.mark.parametrize("op,code", [("write", errno.ENOSPC), ("read", errno.EIO)])
def test_an_injected_fault_fails_that_request_and_leaves_the_file(engine, tmp_path, op, code):
    path = tmp_path / "fault.bin"
    f = engine.open(path, create=True)
    before = pattern(8 * ALIGN, seed=3)
    engine.write(f, 0, before)
    engine.inject_fault(op, code, after=1)
    submit = engine.submit_write if op == "write" else engine.submit_read
    engine.wait(submit(f, 0, before))  # the request before the failpoint runs
    buf = pattern(8 * ALIGN, seed=4)
    sent = buf.clone()
    with pytest.raises(OSError) as info:
        engine.wait(submit(f, 4 * ALIGN, buf))
    assert info.value.errno == code
    message = str(info.value)
    assert str(path) in message and f"offset {4 * ALIGN}" in message, message
    assert os.strerror(code) in message, message
    assert file_bytes(path) == before.numpy().tobytes()
    assert torch.equal(buf, sent), "a failed read must not have touched the buffer"
    engine.wait(submit(f, 0, buf))  # a fault fires once


def test_clear_faults_disarms(engine, tmp_path):
    f = engine.open(tmp_path / "clear.bin", create=True)
    engine.inject_fault("write", errno.EIO)
    engine.clear_faults()
    engine.write(f, 0, pattern(ALIGN))
    with pytest.raises(ValueError, match="op must be"):
        engine.inject_fault("fsync", errno.EIO)


def test_a_filesystem_without_o_direct_falls_back_to_buffered_with_one_warning(engine, tmp_path):
    # Linux >= 6.6 gives tmpfs O_DIRECT, so the refusal is injected (EINVAL, as tmpfs gave).
    (tmp_path / "other").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = []
        for name in ("a.bin", "b.bin", "other/c.bin"):
            engine.inject_fault("open_direct", errno.EINVAL)
            files.append(engine.open(tmp_path / name, create=True))
    messages = [str(w.message) for w in caught if issubclass(w.category, HeteromemWarning)]
    assert messages == [
        f"heteromem: {tmp_path} does not support O_DIRECT (tmpfs?); using buffered I/O",
        f"heteromem: {tmp_path / 'other'} does not support O_DIRECT (tmpfs?); using buffered I/O",
    ]
    assert not any(f.direct for f in files)
    # Buffered files take any buffer, offset and length.
    out = torch.arange(1000, dtype=torch.int16)
    engine.write(files[0], 3, out)
    back = torch.empty_like(out)
    engine.read(files[0], 3, back)
    assert torch.equal(back, out)


def test_a_read_only_file_is_buffered_reads_anywhere_and_refuses_writes(engine, tmp_path):
    """What the NVMe tier opens checkpoint files with: no O_DIRECT (their offsets are not
    aligned), no warning about it, an armed open_direct fault left for the next file."""
    path = tmp_path / "weights.bin"
    data = pattern(10_000)
    path.write_bytes(data.numpy().tobytes())
    engine.inject_fault("open_direct", errno.EINVAL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = engine.open(path, create=False, readonly=True)
    assert not f.direct
    assert not [w for w in caught if issubclass(w.category, HeteromemWarning)]
    back = torch.empty(777, dtype=torch.uint8)
    engine.read(f, 1234, back)
    assert torch.equal(back, data[1234:1234 + 777])
    with pytest.raises(OSError) as info:
        engine.write(f, 0, back)
    assert info.value.errno == errno.EBADF and str(path) in str(info.value)
    assert file_bytes(path) == data.numpy().tobytes()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert not engine.open(tmp_path / "next.bin", create=True).direct  # the fault fired
    with pytest.raises(ValueError, match="read-only file cannot be created"):
        engine.open(tmp_path / "new.bin", create=True, readonly=True)


def test_dev_shm_is_direct_exactly_when_the_kernel_allows(engine):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/heteromem-io-test-{os.getpid()}-{engine.backend}.bin"
    expected = supports_o_direct("/dev/shm")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f = engine.open(path, create=True)
        assert f.direct == expected
        assert any("does not support O_DIRECT" in str(w.message) for w in caught) == (not expected)
        engine.write(f, 0, pattern(2 * ALIGN))
        engine.close(f)
    finally:
        os.unlink(path)


def test_set_size(engine, tmp_path):
    path = tmp_path / "sized.bin"
    f = engine.open(path, create=True)
    engine.set_size(f, 5 * ALIGN)
    assert os.path.getsize(path) == 5 * ALIGN
    back = pattern(5 * ALIGN)
    engine.read(f, 0, back)
    assert not back.any(), "a sized file reads as zeros"
    engine.set_size(f, ALIGN)
    assert os.path.getsize(path) == ALIGN
    # Far beyond any filesystem's limit: fallocate refuses before allocating (EFBIG here;
    # ENOSPC on a full disk surfaces the same way).
    with pytest.raises(OSError) as info:
        engine.set_size(f, 1 << 62)
    assert info.value.errno in (errno.EFBIG, errno.ENOSPC, errno.EINVAL)
    assert str(path) in str(info.value)
    assert os.path.getsize(path) == ALIGN


def test_tickets_are_waited_once_and_shutdown_stops_submits(backend, tmp_path):
    eng = IoEngine(threads=1, block_bytes=ALIGN, backend=backend)
    f = eng.open(tmp_path / "t.bin", create=True)
    ticket = eng.submit_write(f, 0, pattern(ALIGN))
    eng.wait(ticket)
    with pytest.raises(ValueError, match="unknown ticket"):
        eng.wait(ticket)
    eng.close(f)
    with pytest.raises(ValueError, match="unknown file handle"):
        eng.submit_write(f, 0, pattern(ALIGN))
    eng.shutdown()
    g = eng.open(tmp_path / "u.bin", create=True)
    with pytest.raises(RuntimeError, match="shutdown"):
        eng.submit_write(g, 0, pattern(ALIGN))


def test_the_engine_keeps_a_dropped_buffer_alive_until_wait(engine, tmp_path):
    f = engine.open(tmp_path / "alive.bin", create=True)
    expected = pattern(64 * ALIGN, seed=5)
    # The engine holds the only reference to the buffer it writes.
    ticket = engine.submit_write(f, 0, aligned_empty(64 * ALIGN).copy_(expected))
    engine.wait(ticket)
    assert file_bytes(f.path) == expected.numpy().tobytes()


def test_wait_does_not_hold_the_gil(backend, tmp_path):
    """While the main thread waits on a slow request (64 MiB in 4 KiB blocks on one worker),
    another Python thread keeps running: it records progress inside the wait."""
    eng = IoEngine(threads=1, block_bytes=ALIGN, backend=backend)
    f = eng.open(tmp_path / "slow.bin", create=True)
    buf = aligned_empty(64 << 20).fill_(7)
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.001)

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        ticket = eng.submit_write(f, 0, buf)
        start = time.perf_counter()
        eng.wait(ticket)
        end = time.perf_counter()
    finally:
        stop.set()
        spinner.join()
        eng.shutdown()
    if end - start < 0.05:
        pytest.skip(f"the request took {end - start:.3f}s: too fast to tell on this disk")
    # Holding the GIL through wait would leave no stamp strictly inside it.
    inside = [s for s in stamps if start + 0.01 < s < end - 0.01]
    assert len(inside) > 5, f"{len(inside)} stamps inside a {end - start:.3f}s wait"


def test_without_the_extension_the_python_backend_runs_and_says_so_once(tmp_path):
    script = f"""
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from heteromem.io import IoEngine, aligned_empty
    engines = [IoEngine(), IoEngine()]
assert all(e.backend == "python" for e in engines), [e.backend for e in engines]
notes = [str(w.message) for w in caught if "pure-Python backend" in str(w.message)]
assert len(notes) == 1 and "HETEROMEM_DISABLE_EXT" in notes[0], notes
f = engines[0].open({str(tmp_path / 'x.bin')!r}, create=True)
engines[0].write(f, 0, aligned_empty(4096).fill_(1))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HETEROMEM_DISABLE_EXT": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
