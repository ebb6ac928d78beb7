"""heteromem.ops.agd_step_: every path (the CPU op on each SIMD path, CUDA) bit-identical to the
pure-PyTorch reference over dtype combinations and size classes, with the floor both active and
not; NaN behaviour; errors naming the argument; opcheck. CUDA variants carry the `cuda` marker.
(The optimizer against the paper's rule: tests/optim/test_agd.py.)"""

from __future__ import annotations

import pytest
import torch

import heteromem as hm
from heteromem.ops import reference

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOWP_DTYPES = [None, torch.bfloat16, torch.float16]
SIZES = [0, 1, 17, 100_003]
CPU_PATHS = ["avx512", "avx2", "scalar"]


def cpu_path_supported(path: str) -> bool:
    order = {"scalar": 0, "avx2": 1, "avx512": 2}
    return order[path] <= order[hm.build_info().cpu_simd_detected]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise equality, except that any NaN equals any NaN (payloads differ between paths)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN positions differ"
    a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    assert torch.equal(a, b), f"{what}: {(a != b).sum().item()} of {a.numel()} elements differ"


def make_state(n: int, device: str = "cpu", seed: int = 0):
    """Moments spread over decades (as the gradients in run_both), so that the floor binds
    for part of the elements."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-6, 0, max(n, 1))[:n]
    param = torch.randn(n, generator=gen)
    exp_avg = torch.randn(n, generator=gen) * 0.01 * spread
    exp_avg_sq = torch.rand(n, generator=gen) * 1e-4 * spread**2
    return [t.to(device) for t in (param, exp_avg, exp_avg_sq)]


HYPER = dict(lr=1e-3, betas=(0.9, 0.999), delta=1e-3, weight_decay=0.1, grad_scale=8.0)


def run_both(n, grad_dtype, lowp_dtype, device="cpu", steps=3, **hyper):
    """The op and the reference from the same state over `steps` steps; both final states.
    Gradient magnitudes span 1e-5..1e1, so with delta=1e-3 the floor is active for some
    elements and not for others."""
    hyper = {**HYPER, **hyper}
    ours = make_state(n, device)
    ref = [t.clone() for t in ours]
    lowp = [None if lowp_dtype is None else torch.empty(n, dtype=lowp_dtype, device=device)
            for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    scale = torch.logspace(-5, 1, max(n, 1))[:n]
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen) * scale * hyper["grad_scale"]).to(grad_dtype)
        grad = grad.to(device)
        hm.ops.agd_step_(ours[0], grad, ours[1], ours[2], step=step, param_lowp=lowp[0], **hyper)
        reference.agd_step_(ref[0], grad, ref[1], ref[2], step=step, lr=hyper["lr"],
                            beta1=hyper["betas"][0], beta2=hyper["betas"][1],
                            delta=hyper["delta"], weight_decay=hyper["weight_decay"],
                            grad_scale=hyper["grad_scale"], param_lowp=lowp[1])
    return ours + [lowp[0]], ref + [lowp[1]]


NAMES = ("param", "exp_avg", "exp_avg_sq", "param_lowp")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lowp_dtype", LOWP_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_cpu_op_equals_reference_bit_for_bit(grad_dtype, lowp_dtype, n):
    ours, ref = run_both(n, grad_dtype, lowp_dtype)
    for name, a, b in zip(NAMES, ours, ref):
        if a is not None:
            assert_same_bits(a, b, name)


def test_the_floor_is_both_active_and_not_in_these_cases():
    """The bit-identity cases above exercise both branches of max(sqrt(b), floor)."""
    n, step = 100_003, 3
    ours, _ = run_both(n, torch.float32, None, steps=step)
    floor = HYPER["delta"] * (1 - HYPER["betas"][1] ** step) ** 0.5
    root = ours[2].sqrt()
    below = (root < floor).float().mean().item()
    assert 0.1 < below < 0.9, below


@pytest.mark.parametrize("path", CPU_PATHS)
def test_every_cpu_path_gives_the_same_bits(path, monkeypatch):
    if not cpu_path_supported(path):
        pytest.skip(f"CPU lacks {path}")
    monkeypatch.setenv("HETEROMEM_CPU_CAPABILITY", path)
    for grad_dtype in GRAD_DTYPES:
        for lowp_dtype in LOWP_DTYPES:
            for weight_decay in (0.0, 0.1):
                ours, ref = run_both(4099, grad_dtype, lowp_dtype, weight_decay=weight_decay,
                                     grad_scale=1.0 if grad_dtype == torch.float32 else 8.0)
                for name, a, b in zip(NAMES, ours, ref):
                    if a is not None:
                        assert_same_bits(a, b, f"{path} {grad_dtype}->{lowp_dtype} {name}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_param_lowp_may_alias_grad(device):
    """The runtime reads a gradient from a parameter's slot and writes the new value there."""
    n = 4099
    param, m, v = make_state(n, device)
    shared = torch.randn(n, device=device).to(torch.bfloat16)
    ref = [t.clone() for t in (param, m, v)]
    ref_lowp = torch.empty_like(shared)
    reference.agd_step_(ref[0], shared.clone(), ref[1], ref[2], step=2, lr=1e-2, beta1=0.9,
                        beta2=0.999, delta=1e-5, weight_decay=0.0, grad_scale=1.0,
                        param_lowp=ref_lowp)
    hm.ops.agd_step_(param, shared, m, v, step=2, lr=1e-2, param_lowp=shared)
    for a, b in zip((param, m, v, shared), ref + [ref_lowp]):
        assert_same_bits(a, b, "aliased grad/param_lowp")


def test_nan_gradient_poisons_only_its_element():
    param, m, v = make_state(64)
    grad = torch.randn(64)
    grad[5] = float("nan")
    hm.ops.agd_step_(param, grad, m, v, step=4, lr=1e-2, delta=1e-3)
    assert torch.isnan(param[5]) and torch.isnan(m[5]) and torch.isnan(v[5])
    assert not torch.isnan(param[torch.arange(64) != 5]).any()


def test_first_step_is_a_sign_step_of_size_lr_above_the_floor():
    """At t = 1, s_1 = g so b_1 = (1 - beta2) g^2 and the step is lr * g / |g|."""
    param, m, v = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    hm.ops.agd_step_(param, torch.tensor([1.0, -2.0, 3.0, -4.0]), m, v, step=1, lr=0.1, delta=0.0)
    torch.testing.assert_close(param, torch.tensor([-0.1, 0.1, -0.1, 0.1]))


def good_args(n: int = 8):
    return dict(param=torch.zeros(n), grad=torch.zeros(n), exp_avg=torch.zeros(n),
                exp_avg_sq=torch.zeros(n))


@pytest.mark.parametrize("name,bad,exc,fragment", [
    ("param", torch.zeros(8, dtype=torch.float64), TypeError, "agd_step_: param must be float32"),
    ("grad", torch.zeros(8, dtype=torch.int32), TypeError, "grad must be float32, bfloat16"),
    ("exp_avg", torch.zeros(8, dtype=torch.bfloat16), TypeError, "exp_avg must be float32"),
    ("exp_avg_sq", torch.zeros(7), ValueError, "exp_avg_sq has 7 elements but param has 8"),
    ("exp_avg", torch.zeros(16)[::2], ValueError, "exp_avg must be contiguous"),
    ("grad", torch.zeros(8, device="meta"), ValueError, "grad is on meta but param is on cpu"),
])
def test_bad_tensor_is_named(name, bad, exc, fragment):
    args = good_args()
    args[name] = bad
    with pytest.raises(exc, match=fragment):
        hm.ops.agd_step_(**args, step=1, lr=0.1)


@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(step=0), ValueError, "step must be an int >= 1"),
    (dict(lr=float("inf")), ValueError, "lr must be finite"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be finite and >= 0.0 and < 1.0"),
    (dict(delta=-1e-5), ValueError, "delta must be finite and >= 0"),
    (dict(delta="1e-5"), TypeError, "delta must be a real number"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be"),
    (dict(grad_scale=0.0), ValueError, "grad_scale must be finite and > 0"),
])
def test_bad_hyper_parameter_is_named(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        hm.ops.agd_step_(**good_args(), **{"step": 1, "lr": 0.1, **kwargs})


def test_registered_op_checks_its_arguments_too():
    """torch.ops.heteromem.agd_step_ called directly (as the runtime does) is also checked, and
    a failed call writes nothing."""
    op = torch.ops.heteromem.agd_step_
    hyper = dict(step=1, lr=0.1, beta1=0.9, beta2=0.999, delta=1e-5, weight_decay=0.0,
                 grad_scale=1.0, param_lowp=None)
    z = torch.zeros(8)
    with pytest.raises(ValueError, match="agd_step_: exp_avg has 4 elements"):
        op(z, z.clone(), torch.zeros(4), z.clone(), **hyper)
    with pytest.raises(ValueError, match="agd_step_: delta must be finite and >= 0"):
        op(z, z.clone(), z.clone(), z.clone(), **{**hyper, "delta": -1.0})
    param, m, v = make_state(8)
    before = [t.clone() for t in (param, m, v)]
    with pytest.raises(TypeError, match="param_lowp must be bfloat16 or float16"):
        op(param, torch.ones(8), m, v, **{**hyper, "param_lowp": torch.zeros(8)})
    for a, b in zip((param, m, v), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lowp_dtype", [None, torch.bfloat16])
def test_opcheck(lowp_dtype):
    param, m, v = make_state(33)
    lowp = None if lowp_dtype is None else torch.empty(33, dtype=lowp_dtype)
    torch.library.opcheck(
        torch.ops.heteromem.agd_step_.default, (param, torch.randn(33).to(torch.bfloat16), m, v),
        dict(step=3, lr=1e-3, beta1=0.9, beta2=0.999, delta=1e-5, weight_decay=0.01,
             grad_scale=1.0, param_lowp=lowp))


@pytest.mark.cuda
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lowp_dtype", LOWP_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_cuda_op_equals_reference_bit_for_bit(grad_dtype, lowp_dtype, n):
    ours, ref = run_both(n, grad_dtype, lowp_dtype, device="cuda")
    for name, a, b in zip(NAMES, ours, ref):
        if a is not None:
            assert_same_bits(a, b, name)


@pytest.mark.cuda
def test_cuda_op_equals_cpu_op_and_unaligned_views():
    on_cpu, _ = run_both(100_003, torch.bfloat16, torch.bfloat16, device="cpu")
    on_gpu, _ = run_both(100_003, torch.bfloat16, torch.bfloat16, device="cuda")
    for name, a, b in zip(NAMES, on_gpu, on_cpu):
        assert_same_bits(a.cpu(), b, name)
    base = [t.cuda() for t in make_state(10_003)]
    ours = [t[3:] for t in base]
    ref = [t.clone() for t in ours]
    grad = torch.randn(10_003, device="cuda")[3:]
    hm.ops.agd_step_(ours[0], grad, ours[1], ours[2], step=2, lr=1e-3)
    reference.agd_step_(ref[0], grad, ref[1], ref[2], step=2, lr=1e-3, beta1=0.9, beta2=0.999,
                        delta=1e-5, weight_decay=0.0, grad_scale=1.0, param_lowp=None)
    for a, b in zip(ours, ref):
        assert_same_bits(a, b, "unaligned")
