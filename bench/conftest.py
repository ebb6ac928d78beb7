"""Shared benchmark setup: the sizes every bench file runs at, the `cuda` skip, freeing memory
between cases, and the machine description written into the benchmark JSON.

Environment:
    HETEROMEM_BENCH_SIZES  comma-separated parameter counts (default "10000000,100000000");
                           underscores are allowed ("100_000_000").
    HETEROMEM_BENCH_QUICK  "1": one tiny size (100_000) so CI can smoke-run every bench file
                           with `--benchmark-disable` in seconds; timings from it mean nothing.
    HETEROMEM_BENCH_SECONDS about how long each timed case runs (bench_adam.py; default 2).
    HETEROMEM_BENCH_DIR    where the disk benches write (default build/bench; see scratch_dir).
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import heteromem

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = "10000000,100000000"
QUICK_SIZE = 100_000


def quick_mode() -> bool:
    """Whether HETEROMEM_BENCH_QUICK asks for the tiny smoke-run size."""
    return os.environ.get("HETEROMEM_BENCH_QUICK", "") not in ("", "0")


def bench_sizes() -> list[int]:
    """Parameter counts to benchmark, from HETEROMEM_BENCH_SIZES / HETEROMEM_BENCH_QUICK."""
    if quick_mode():
        return [QUICK_SIZE]
    raw = os.environ.get("HETEROMEM_BENCH_SIZES", "") or DEFAULT_SIZES
    sizes = []
    for item in raw.split(","):
        try:
            size = int(item.strip().replace("_", ""))
        except ValueError:
            size = 0
        if size <= 0:
            raise pytest.UsageError(f"HETEROMEM_BENCH_SIZES: {item.strip()!r} is not a positive "
                                    "integer; give parameter counts like 10000000,100000000")
        sizes.append(size)
    return sizes


def scratch_dir(name: str) -> Path:
    """A fresh folder for a bench file's files: $HETEROMEM_BENCH_DIR (default build/bench in
    the repository; point it at the drive you want measured) / <name>-<pid>."""
    base = Path(os.environ.get("HETEROMEM_BENCH_DIR", "") or ROOT / "build" / "bench")
    path = base / f"{name}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def run_dd(args: list[str]) -> float:
    """Runs dd; returns the seconds it reports for the copy itself."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"dd {' '.join(args)} failed: {out.stderr.strip()}")
    match = re.search(r"copied, ([0-9.e+-]+) s", out.stderr)
    return float(match.group(1)) if match else float("nan")


def filesystem_of(path: Path) -> str:
    """'ext4 on /dev/vda (mounted at /)': the /proc/mounts entry holding `path`."""
    best = ("", "unknown", "unknown")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[0]):
                best = (mount, fstype, device)
    except OSError:
        pass
    return f"{best[1]} on {best[2]} (mounted at {best[0] or '?'})"


def size_label(numel: int) -> str:
    """10_000_000 -> '10M': short ids for test names and group names."""
    for unit, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if numel >= scale and numel % scale == 0:
            return f"{numel // scale}{unit}"
    return str(numel)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Any bench function taking `numel` runs once per configured size.
    if "numel" in metafunc.fixturenames:
        sizes = bench_sizes()
        metafunc.parametrize("numel", sizes, ids=[size_label(n) for n in sizes])


@pytest.fixture
def size_tag(numel: int) -> str:
    """The size as benchmark group names show it ('10M')."""
    return size_label(numel)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # NOTE: mirrors tests/conftest.py; is_available() creates no CUDA context.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `make gpu-test` on a CUDA machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def free_memory() -> Iterator[None]:
    """Releases each case's buffers before the next one allocates: two 100M-parameter working
    sets (~3 GB each) alive at once would crowd a 24 GiB machine and skew timings."""
    yield
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.check_output(cmd, cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Adds what a result needs to be reproduced and compared: CPU, cores, torch, heteromem
    build, commit and date, and the GPU when there is one."""
    info = heteromem.build_info()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    git_commit = _run(["git", "rev-parse", "HEAD"])
    machine_info["heteromem"] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(affinity) if affinity is not None else None,
        "torch_threads": torch.get_num_threads(),
        "mem_total_gib": _mem_total_gib(),
        "torch_version": torch.__version__,
        "build_info": {k: v for k, v in vars(info).items()},
        # NOTE: a copied tree (the GPU machine) has no .git; gpu_run.py passes HETEROMEM_COMMIT.
        "commit": os.environ.get("HETEROMEM_COMMIT") or git_commit or "unknown",
        "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
        if git_commit else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "bench_sizes": bench_sizes(),
        "quick": quick_mode(),
    }
