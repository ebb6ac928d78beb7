"""heteromem.ops.adam_step_ against the baselines it must beat, each measured in the same run.

Run from the repository root (bench/pytest.ini makes `pytest bench/` collect bench_*.py):

    .venv/bin/pytest bench/ --benchmark-json=/tmp/bench_adam_cpu.json
    .venv/bin/python bench/summarize.py /tmp/bench_adam_cpu.json
    HETEROMEM_BENCH_QUICK=1 .venv/bin/pytest bench/ --benchmark-disable -q   # smoke run (CI)

Sizes come from HETEROMEM_BENCH_SIZES (default 10M and 100M parameters, see conftest.py);
each case runs for about HETEROMEM_BENCH_SECONDS (default 2) seconds.
Groups, one per size (the summary gives each row as a ratio to its group's baselines):
  adam-cpu-fp32    heteromem (fp32 grad)  vs torch fused AdamW, DeepSpeedCPUAdam
  adam-cpu-bf16    heteromem (bf16 grad, bf16 param_lowp, one pass)
                   vs torch fused AdamW + casts, DeepSpeedCPUAdam + casts
  adam-cpu-simd    heteromem bf16 path forced to avx512 / avx2 / scalar (baseline: scalar)
  adam-cpu-busy    the bf16 rows again while another process keeps one core busy, as the
                   training thread does while the updates run (pipelined with the forward)
  bandwidth-cpu    STREAM-like copy, triad and in-place triad: the memory-bandwidth ceiling
  adam-cuda-*, bandwidth-cuda: the same on a GPU (marker `cuda`; no DeepSpeed there)
Bytes are counted logically, STREAM style: every element read or written once, no
write-allocate traffic, so an Adam row's GB/s compares directly with the ceiling rows.
Every case records params, bytes_per_param, GB/s and Gparam/s of its median in extra_info.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

import heteromem

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01
FP32, LOWP = 4, 2
# master, exp_avg and exp_avg_sq are each read and written once per step.
STATE_BYTES = 3 * 2 * FP32
# A separate cast reads one dtype and writes the other: bf16 grad -> fp32, fp32 master -> bf16.
CAST_BYTES = FP32 + LOWP
SIMD_ORDER = ["scalar", "avx2", "avx512"]
CASE_SECONDS = float(os.environ.get("HETEROMEM_BENCH_SECONDS", "") or 2.0)

StepFn = Callable[[], None]


def rounds_for(seconds_per_call: float) -> int:
    """Rounds filling about CASE_SECONDS: a shared 2-core VM's memory bandwidth drifts by 2x
    over seconds, so a case must span several seconds for its median to mean anything."""
    return max(5, min(2000, round(CASE_SECONDS / max(seconds_per_call, 1e-6))))


def synced(fn: StepFn, device: str) -> StepFn:
    """On CUDA the timed call waits for the kernels, so the timer sees device time."""
    if device != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize()
    return run


def measure(benchmark, fn: StepFn, *, numel: int, device: str, bytes_moved: int,
            is_adam: bool = True, **info: object) -> None:
    """Times fn and records, in extra_info, what it moved and the throughput of the median.
    numel is the Adam size the case stands for; an Adam step also records Gparam/s."""
    benchmark.extra_info.update(device=device, bytes_moved=bytes_moved, **info)
    if is_adam:
        benchmark.extra_info.update(params=numel, bytes_per_param=bytes_moved / numel)
    fn = synced(fn, device)
    rounds = 1
    if benchmark.enabled:
        fn()  # allocates lazy optimizer state, so the call timed next is a steady one
        start = time.perf_counter()
        fn()
        rounds = rounds_for(time.perf_counter() - start)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(median_s=median, gb_per_s=bytes_moved / median / 1e9)
    if is_adam:
        benchmark.extra_info["gparam_per_s"] = numel / median / 1e9


def fp32_param(numel: int, device: str) -> torch.nn.Parameter:
    """An fp32 master parameter with an fp32 .grad: what the torch and DeepSpeed baselines step."""
    param = torch.nn.Parameter(torch.randn(numel, device=device))
    param.grad = torch.randn(numel, device=device) * 1e-2
    return param


def heteromem_step(numel: int, device: str, lowp: torch.dtype | None) -> StepFn:
    """heteromem's single pass; with lowp, the grad arrives and the param leaves in that dtype."""
    param = torch.randn(numel, device=device)
    grad = (torch.randn(numel, device=device) * 1e-2).to(lowp or torch.float32)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    param_lowp = None if lowp is None else torch.empty(numel, dtype=lowp, device=device)
    steps = itertools.count(1)

    def run() -> None:
        heteromem.ops.adam_step_(param, grad, exp_avg, exp_avg_sq, step=next(steps), lr=LR,
                                 betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                 param_lowp=param_lowp)
    return run


def optimizer_step(make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                   numel: int, device: str, lowp: torch.dtype | None) -> StepFn:
    """A torch.optim-style optimizer on one fp32 master; with lowp, plus the two casts it needs
    to consume a low-precision gradient and produce a low-precision parameter."""
    master = fp32_param(numel, device)
    optimizer = make_optimizer([master])
    if lowp is None:
        return optimizer.step
    grad_lowp = master.grad.to(lowp)
    param_lowp = torch.empty(numel, dtype=lowp, device=device)

    @torch.no_grad()
    def run() -> None:
        master.grad.copy_(grad_lowp)
        optimizer.step()
        param_lowp.copy_(master)
    return run


@pytest.fixture(scope="session")
def deepspeed_cpu_adam() -> type[torch.optim.Optimizer]:
    """DeepSpeedCPUAdam with its op built (a ~50 s JIT build on first use, then cached)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load()
    except Exception as exc:  # noqa: BLE001  (import, JIT build and load fail in many ways)
        pytest.skip(f"DeepSpeedCPUAdam unavailable: {type(exc).__name__}: {exc}")
    return DeepSpeedCPUAdam


def require_heteromem_kernel(device: str) -> None:
    # NOTE: without its kernel the op falls back to the reference; timing that would mislead.
    info = heteromem.build_info()
    if not info.extension_loaded:
        pytest.skip(f"heteromem extension not loaded: {info.extension_error}")
    if device == "cuda" and not info.cuda_kernels:
        pytest.skip("this heteromem build has no CUDA kernels; rebuild with nvcc present")


CUDA = pytest.mark.cuda
ADAM_CASES = [
    pytest.param("cpu", "heteromem", id="cpu-heteromem"),
    pytest.param("cpu", "torch-fused-adamw", id="cpu-torch"),
    pytest.param("cpu", "deepspeed-cpu-adam", id="cpu-deepspeed"),
    pytest.param("cuda", "heteromem", id="cuda-heteromem", marks=CUDA),
    pytest.param("cuda", "torch-fused-adamw", id="cuda-torch", marks=CUDA),
]
VARIANTS = {"fp32": None, "bf16": torch.bfloat16}


def adam_case(request: pytest.FixtureRequest, impl: str, numel: int, device: str,
              lowp: torch.dtype | None) -> tuple[StepFn, int, str, str]:
    """(step function, bytes per parameter, case label, role) of one implementation."""
    if impl == "heteromem":
        require_heteromem_kernel(device)
        # One pass: the states, plus the grad read and the lowp write in their own dtypes.
        per_param = STATE_BYTES + (FP32 if lowp is None else 2 * LOWP)
        return heteromem_step(numel, device, lowp), per_param, "heteromem", "subject"
    if impl == "deepspeed-cpu-adam":
        cls = request.getfixturevalue("deepspeed_cpu_adam")

        def make(params):
            return cls(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                       adamw_mode=True)
        case = "DeepSpeedCPUAdam"
    else:
        def make(params):
            return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=WEIGHT_DECAY, fused=True)
        case = "torch fused AdamW"
    # The fp32 step (states + fp32 grad), plus a cast on each side for the bf16 variant.
    per_param = STATE_BYTES + FP32 + (0 if lowp is None else 2 * CAST_BYTES)
    fn = optimizer_step(make, numel, device, lowp)
    return fn, per_param, case + ("" if lowp is None else " + casts"), "baseline"


# NOTE: the implementation varies fastest, so a group's rows run back to back and see the
# same machine state as far as possible.
@pytest.mark.parametrize(("device", "impl"), ADAM_CASES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adam(benchmark, request: pytest.FixtureRequest, numel: int, size_tag: str, device: str,
              impl: str, variant: str) -> None:
    """One optimizer step over `numel` parameters; in the bf16 variant every implementation
    starts from a bf16 gradient and ends with a bf16 parameter, as a training step needs."""
    lowp = VARIANTS[variant]
    benchmark.group = f"adam-{device}-{variant} {size_tag}"
    fn, per_param, case, role = adam_case(request, impl, numel, device, lowp)
    # The CPU path heteromem ran (HETEROMEM_CPU_CAPABILITY may force a lower one).
    on_cpu = device == "cpu" and impl == "heteromem"
    extra = {"cpu_simd": heteromem.build_info().cpu_simd} if on_cpu else {}
    measure(benchmark, fn, numel=numel, device=device, bytes_moved=per_param * numel,
            case=case, impl=impl, role=role, grad_dtype=variant,
            lowp_dtype=None if lowp is None else variant,
            threads=torch.get_num_threads(), **extra)


@pytest.mark.parametrize("path", ["avx512", "avx2", "scalar"])
def test_adam_cpu_simd(benchmark, monkeypatch: pytest.MonkeyPatch, numel: int, size_tag: str,
                       path: str) -> None:
    """The bf16 production path on each CPU code path, so each SIMD level's gain is visible."""
    require_heteromem_kernel("cpu")
    detected = heteromem.build_info().cpu_simd_detected
    if SIMD_ORDER.index(path) > SIMD_ORDER.index(detected):
        pytest.skip(f"this CPU does not support {path} (best: {detected})")
    benchmark.group = f"adam-cpu-simd {size_tag}"
    # The kernel reads HETEROMEM_CPU_CAPABILITY on every call.
    monkeypatch.setenv("HETEROMEM_CPU_CAPABILITY", path)
    fn = heteromem_step(numel, "cpu", torch.bfloat16)
    measure(benchmark, fn, numel=numel, device="cpu", bytes_moved=(STATE_BYTES + 2 * LOWP) * numel,
            case=f"heteromem {path}", impl="heteromem", cpu_simd=path,
            role="baseline" if path == "scalar" else "subject", grad_dtype="bf16",
            lowp_dtype="bf16", threads=torch.get_num_threads())


@pytest.fixture
def busy_core():
    """Another process spinning on one core for the duration of the case."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("impl", ["heteromem", "torch-fused-adamw"])
def test_adam_cpu_busy(benchmark, request: pytest.FixtureRequest, busy_core, numel: int,
                       size_tag: str, impl: str) -> None:
    """The bf16 step while one core is taken: heteromem's threads share the blocks out as
    they go, so the thread on the busy core holds up nothing (torch splits equally)."""
    benchmark.group = f"adam-cpu-busy {size_tag}"
    fn, per_param, case, role = adam_case(request, impl, numel, "cpu", torch.bfloat16)
    case += ", one core busy"
    measure(benchmark, fn, numel=numel, device="cpu", bytes_moved=per_param * numel, case=case,
            impl=impl, role=role, grad_dtype="bf16", lowp_dtype="bf16",
            threads=torch.get_num_threads())


# kernel -> (fp32 arrays, element accesses per index, label). Bytes count each access once.
BANDWIDTH_KERNELS = {
    "copy": (2, 2, "copy c = a"),
    "triad": (3, 3, "triad c = a + s*b"),
    # NOTE: Adam updates its states in place, so it never pays the write-allocate read that a
    # separate destination costs copy and triad (uncounted, as in STREAM): this is its ceiling.
    "inplace": (2, 3, "in-place a += s*b"),
}


@pytest.mark.parametrize("kernel", list(BANDWIDTH_KERNELS))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bandwidth(benchmark, numel: int, size_tag: str, device: str, kernel: str) -> None:
    """STREAM-like kernels over fp32 arrays whose total size equals the Adam working set at
    `numel` parameters (28 B each), far beyond any cache: the memory bandwidth an Adam step can
    at best reach on this machine, measured in the same run."""
    benchmark.group = f"bandwidth-{device} {size_tag}"
    arrays, accesses, label = BANDWIDTH_KERNELS[kernel]
    length = -(-28 * numel // (arrays * FP32))
    a = torch.rand(length, device=device)
    b = torch.rand(length, device=device)
    if kernel == "copy":
        def fn() -> None:
            b.copy_(a)
    elif kernel == "triad":
        c = torch.empty_like(a)

        def fn() -> None:
            torch.add(a, b, alpha=3.0, out=c)
    else:
        def fn() -> None:
            a.add_(b, alpha=0.5)
    measure(benchmark, fn, numel=numel, device=device, bytes_moved=accesses * FP32 * length,
            is_adam=False, case=label, impl=kernel, role="ceiling", adam_params=numel,
            array_elements=length, threads=torch.get_num_threads())
