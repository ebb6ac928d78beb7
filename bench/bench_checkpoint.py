"""hm.save_checkpoint against the disk's sequential write speed, and how long a flash
(blocking=False) save holds up training, same run, same directory.

    .venv/bin/pytest bench/bench_checkpoint.py --benchmark-json=/tmp/ckpt.json
    .venv/bin/python bench/summarize.py /tmp/ckpt.json
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/bench_checkpoint.py --benchmark-disable -q

A stack of bias-free 1024x1024 Linear layers (HETEROMEM_BENCH_SIZES parameters; quick mode:
64x64) wrapped in bf16 on the CPU in about 8 chunks, after one training step so the optimizer
state is real. Each parameter is 14 bytes of state (bf16 + fp32 master and two moments): the
default sizes 10M and 100M give 0.14 GB and 1.4 GB checkpoints. Group "checkpoint-save
<size>", rows run back to back in this order:
  sequential write  baseline: the checkpoint's byte count as one new file, written from one
                    buffer (holding the checkpoint's own bytes) with Python FileIO + os.fsync
  dd                baseline, for reference: dd if=/dev/zero oflag=direct conv=fsync bs=64M
  blocking save     hm.save_checkpoint(dir, model, opt): files, checksums, fsyncs, publish
  flash save        the time hm.save_checkpoint(..., blocking=False) takes to return; the
                    background write is waited for outside the timed region (its time is in
                    extra_info: full_*). Its first round allocates the snapshot buffer: a warm-up.
Every round writes new files into an empty directory (the previous round's are deleted and
os.sync() settles the file system before the round starts, untimed).
Targets (issue: checkpoints), for a state of at least 1 GB: blocking save >= 0.8x the speed of
the sequential write (extra_info save_over_sequential_write), and a flash save blocks for
<= 0.2x a blocking save (flash_block_over_blocking_save).

Files go under $HETEROMEM_BENCH_DIR (default build/bench in the repository): point
it at the drive you care about; they are deleted after each round and the folder at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import pytest
import torch

import heteromem as hm
from heteromem.runtime.checkpoint import save as ckpt_save
from conftest import filesystem_of, quick_mode, run_dd, scratch_dir, size_label

MiB = 1 << 20
CASES = ["sequential-write", "dd", "blocking-save", "flash-save"]
ROUNDS = 3 if quick_mode() else 7
# numel -> case -> median seconds, filled as a size's rows run (the ratios need earlier rows).
RESULTS: dict[int, dict[str, float]] = {}


@pytest.fixture(scope="module")
def bench_dir() -> Path:
    path = scratch_dir("checkpoint")
    yield path
    hm.wait_checkpoint()
    shutil.rmtree(path, ignore_errors=True)


def remove(path: Path) -> None:
    """Deletes a round's files and lets the file system settle (untimed, before a round)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    os.sync()


def version_bytes(root: Path) -> tuple[int, int]:
    """(bytes, files) of the version directory LATEST names."""
    version = root / json.loads((root / "LATEST").read_text())["version"]
    sizes = [f.stat().st_size for f in version.iterdir()]
    return sum(sizes), len(sizes)


class State:
    """One size's wrapped model after a training step, its checkpoint's byte count, and a
    buffer holding the checkpoint's bytes (for the sequential-write baseline)."""

    def __init__(self, folder: Path, numel: int) -> None:
        self.numel = numel
        width = 64 if quick_mode() else 1024
        layers = max(2, round(numel / (width * width)))
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False)
                                      for _ in range(layers)))
        self.params = sum(p.numel() for p in model.parameters())
        # About 8 chunks, as hm.wrap's default would pick; 3 slabs of device budget.
        slab = width * width * max(1, layers // 8) * 2
        self.model, self.opt = hm.wrap(model, lr=1e-4, device="cpu", dtype=torch.bfloat16,
                                       chunk_mb=slab / MiB, device_memory=3 * slab)
        x = torch.randn(4, width, dtype=torch.bfloat16)
        self.model(x).float().pow(2).mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.chunks = len(self.model._heteromem.manager.chunks)
        free = shutil.disk_usage(folder).free
        if free < 3 * 14 * self.params + 2**30:
            pytest.skip(f"{folder}: {free / 1e9:.1f} GB free, a {size_label(numel)} checkpoint "
                        f"needs about {3 * 14 * self.params / 1e9:.1f} GB; set HETEROMEM_BENCH_DIR")
        probe = folder / "probe"
        hm.save_checkpoint(probe, self.model, self.opt)
        self.nbytes, self.files = version_bytes(probe)
        self.data = torch.empty(self.nbytes, dtype=torch.uint8)
        view, done = memoryview(self.data.numpy()), 0
        version = next(p for p in probe.iterdir() if p.name.startswith("v"))
        for f in sorted(version.iterdir()):
            with open(f, "rb", buffering=0) as fh:
                while got := fh.readinto(view[done:]):
                    done += got
        assert done == self.nbytes, f"read {done} of {self.nbytes} checkpoint bytes"
        remove(probe)


_state: State | None = None


@pytest.fixture
def state(bench_dir: Path, numel: int) -> State:
    """The state of this size; the previous size's is dropped first (two 100M at once would
    crowd the host)."""
    global _state
    if _state is None or _state.numel != numel:
        _state = None
        hm.wait_checkpoint()
        _state = State(bench_dir, numel)
    return _state


def teardown_module() -> None:
    global _state
    _state = None


def make_case(case: str, st: State, folder: Path) -> tuple:
    """(timed function, the path each round writes, bytes written, info) for one row."""
    target = folder / ("write.bin" if case in ("sequential-write", "dd") else "ckpt")
    if case == "sequential-write":
        view = memoryview(st.data.numpy())

        def write() -> None:
            with open(target, "wb", buffering=0) as fh:
                done = 0
                while done < st.nbytes:
                    done += fh.write(view[done:])
                os.fsync(fh.fileno())

        return write, target, st.nbytes, {"case": "sequential write (FileIO + fsync)",
                                          "role": "baseline"}
    if case == "dd":
        if not shutil.which("dd"):
            pytest.skip("dd is not installed")
        # Whole 4 KiB blocks so O_DIRECT takes the last one; under 4 KiB fewer than the others.
        n = st.nbytes // 4096 * 4096
        bs = min(64 * MiB, n)
        args = ["if=/dev/zero", f"of={target}", f"bs={bs}", f"count={n}", "iflag=count_bytes",
                "oflag=direct", "conv=fsync"]
        bs_label = f"{bs // MiB}M" if bs % MiB == 0 else f"{bs // 1024}K"
        reported: list[float] = []
        try:
            run_dd(args)
        except RuntimeError as exc:
            pytest.skip(f"dd with O_DIRECT does not run in {folder}: {exc}")
        return (lambda: reported.append(run_dd(args))), target, n, {
            "case": f"dd zeros oflag=direct conv=fsync bs={bs_label}", "role": "baseline",
            "dd_bs": bs, "_reported": reported}
    blocking = case == "blocking-save"

    def save() -> None:
        hm.save_checkpoint(target, st.model, st.opt, blocking=blocking)

    label = "blocking save" if blocking else "flash save, blocking part"
    return save, target, st.nbytes, {"case": label, "role": "subject",
                                     "writer_threads": ckpt_save.WRITERS}


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_save(benchmark, state: State, bench_dir: Path, numel: int, size_tag: str,
                         case: str) -> None:
    """One row of the size's group; see the module docstring."""
    benchmark.group = f"checkpoint-save {size_tag}"
    fn, target, nbytes, info = make_case(case, state, bench_dir)
    reported = info.pop("_reported", None)
    flash = case == "flash-save"
    started: list[float] = []
    timed: list[float] = []   # every round's own perf_counter time, the warm-up round first
    full: list[float] = []    # flash: from the call until its background write is done

    def round_() -> None:
        t0 = time.perf_counter()
        fn()
        timed.append(time.perf_counter() - t0)
        started.append(t0)

    def finish(*_: object) -> None:
        if flash:
            hm.wait_checkpoint(state.model)
            full.append(time.perf_counter() - started[-1])

    try:
        benchmark.pedantic(round_, setup=lambda: remove(target), teardown=finish,
                           rounds=ROUNDS, warmup_rounds=1 if benchmark.enabled else 0,
                           iterations=1)
        if not benchmark.enabled:  # --benchmark-disable runs once and skips the teardown
            finish()
        if case in ("blocking-save", "flash-save"):
            # What was timed is a checkpoint: the size it should have, and it loads.
            hm.wait_checkpoint()
            assert version_bytes(target) == (state.nbytes, state.files)
            hm.load_checkpoint(target, state.model, state.opt)
    finally:
        hm.wait_checkpoint()
        remove(target)
    benchmark.extra_info.update(
        impl=case, loadavg_1m=os.getloadavg()[0], params=state.params,
        state_bytes=14 * state.params, bytes=nbytes,
        chunks=state.chunks, files=state.files, filesystem=filesystem_of(bench_dir),
        path=str(target), warmup_s=timed[0] if benchmark.enabled else None,
        round_s=timed[1:] if benchmark.enabled else timed, **info)
    if benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    benchmark.extra_info.update(median_s=stats.median, spread_s=[stats.min, stats.max],
                                gb_per_s=nbytes / stats.median / 1e9,
                                gb_s_min=nbytes / stats.max / 1e9,
                                gb_s_max=nbytes / stats.min / 1e9)
    if reported:
        benchmark.extra_info["dd_reported_gb_s"] = nbytes / statistics.median(reported) / 1e9
    done = RESULTS.setdefault(numel, {})
    done[case] = stats.median
    seq = done.get("sequential-write")
    if case == "blocking-save" and seq:
        # Same bytes, so the speed ratio is the inverse time ratio.
        benchmark.extra_info.update(save_over_sequential_write=seq / stats.median,
                                    target_save_over_sequential_write=0.8)
    if flash:
        background = full[1:] if len(full) > ROUNDS else full
        median_full = statistics.median(background)
        benchmark.extra_info.update(
            warmup_full_s=full[0] if len(full) > ROUNDS else None,
            full_median_s=median_full, full_spread_s=[min(background), max(background)],
            full_round_s=background, full_gb_s=nbytes / median_full / 1e9)
        if seq:
            benchmark.extra_info["full_over_sequential_write"] = seq / median_full
        if done.get("blocking-save"):
            benchmark.extra_info.update(
                flash_block_over_blocking_save=stats.median / done["blocking-save"],
                target_flash_block_over_blocking_save=0.2)
    benchmark.extra_info["meets_1gb_state"] = nbytes >= 1e9
