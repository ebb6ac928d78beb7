"""heteromem.ops.adam_step_: numerics against torch.optim.AdamW/Adam and the reference,
every dtype combination and size class, each CPU path, errors naming the argument, opcheck.
CUDA variants carry the `cuda` marker."""

from __future__ import annotations

import math

import pytest
import torch

import heteromem as hm
from heteromem.ops import reference

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOWP_DTYPES = [None, torch.bfloat16, torch.float16]
SIZES = [0, 1, 17, 1_000_003]
CPU_PATHS = ["avx512", "avx2", "scalar"]


def cpu_path_supported(path: str) -> bool:
    order = {"scalar": 0, "avx2": 1, "avx512": 2}
    return order[path] <= order[hm.build_info().cpu_simd_detected]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_state(n: int, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=gen)
    exp_avg = torch.randn(n, generator=gen) * 0.01
    exp_avg_sq = torch.rand(n, generator=gen) * 1e-4
    return [t.to(device) for t in (param, exp_avg, exp_avg_sq)]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise equality, except that any NaN equals any NaN (payloads differ between paths)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN positions differ"
    a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    assert torch.equal(a, b), f"{what}: {(a != b).sum().item()} of {a.numel()} elements differ"


def run_both(n, grad_dtype, lowp_dtype, device="cpu", steps=2, **hyper):
    """Runs the op and the reference from the same state; returns both final states."""
    hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
             "adamw": True, "grad_scale": 1.0, **hyper}
    ours = make_state(n, device)
    ref = [t.clone() for t in ours]
    lowp = [None if lowp_dtype is None else torch.empty(n, dtype=lowp_dtype, device=device)
            for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen) * hyper["grad_scale"]).to(grad_dtype).to(device)
        hm.ops.adam_step_(*ours[:1], grad, *ours[1:], step=step, param_lowp=lowp[0], **hyper)
        reference.adam_step_(ref[0], grad, ref[1], ref[2], step=step, lr=hyper["lr"],
                             beta1=hyper["betas"][0], beta2=hyper["betas"][1], eps=hyper["eps"],
                             weight_decay=hyper["weight_decay"], adamw=hyper["adamw"],
                             grad_scale=hyper["grad_scale"], param_lowp=lowp[1])
    return ours + [lowp[0]], ref + [lowp[1]]


# ---------------------------------------------------------------- exactness vs the reference


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lowp_dtype", LOWP_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_cpu_op_equals_reference_bit_for_bit(grad_dtype, lowp_dtype, n):
    ours, ref = run_both(n, grad_dtype, lowp_dtype, grad_scale=1024.0)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "param_lowp"), ours, ref):
        if a is not None:
            assert_same_bits(a, b, name)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("adamw", [True, False])
def test_every_cpu_path_gives_the_same_bits(path, adamw, monkeypatch):
    if not cpu_path_supported(path):
        pytest.skip(f"CPU lacks {path}")
    monkeypatch.setenv("HETEROMEM_CPU_CAPABILITY", path)
    for grad_dtype in GRAD_DTYPES:
        for lowp_dtype in LOWP_DTYPES:
            ours, ref = run_both(4099, grad_dtype, lowp_dtype, adamw=adamw, grad_scale=8.0)
            for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "param_lowp"), ours, ref):
                if a is not None:
                    assert_same_bits(a, b, f"{path} {grad_dtype}->{lowp_dtype} {name}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("lowp_dtype", [torch.bfloat16, torch.float16])
def test_param_lowp_may_alias_grad(lowp_dtype, device):
    """The runtime reads a gradient from a parameter's slot and writes the new value there."""
    n = 4099
    param, m, v = make_state(n, device)
    shared = torch.randn(n, device=device).to(lowp_dtype)
    ref = [t.clone() for t in (param, m, v)]
    ref_lowp = torch.empty_like(shared)
    reference.adam_step_(ref[0], shared.clone(), ref[1], ref[2], step=2, lr=1e-2, beta1=0.9,
                         beta2=0.999, eps=1e-8, weight_decay=0.0, adamw=True, grad_scale=1.0,
                         param_lowp=ref_lowp)
    hm.ops.adam_step_(param, shared, m, v, step=2, lr=1e-2, param_lowp=shared)
    for a, b in zip((param, m, v, shared), ref + [ref_lowp]):
        assert_same_bits(a, b, "aliased grad/param_lowp")


def test_nan_and_inf_propagate_as_in_pytorch():
    n = 64
    param, m, v = make_state(n)
    grad = torch.randn(n)
    grad[3], grad[10], grad[20] = float("nan"), float("inf"), -float("inf")
    param[30] = float("nan")
    torch_param = torch.nn.Parameter(param.clone())
    opt = torch.optim.AdamW([torch_param], lr=1e-2)
    opt.state[torch_param] = {"step": torch.tensor(0.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    torch_param.grad = grad.clone()
    opt.step()
    hm.ops.adam_step_(param, grad, m, v, step=1, lr=1e-2, weight_decay=0.01)
    expect = torch_param.detach()
    assert torch.equal(torch.isnan(param), torch.isnan(expect))
    assert torch.isnan(param[[3, 10, 20, 30]]).all()
    finite = ~torch.isnan(expect)
    torch.testing.assert_close(param[finite], expect[finite], rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------- against torch's optimizers


def train_against_torch(adamw: bool, steps: int = 100, n: int = 100_003, device: str = "cpu"):
    """Runs our op and torch.optim.AdamW/Adam for `steps` steps on the same gradients."""
    lr, wd, betas, eps = 3e-3, 0.05, (0.9, 0.95), 1e-8
    param, m, v = make_state(n, device)
    m.zero_(), v.zero_()
    torch_param = torch.nn.Parameter(param.clone())
    opt_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = opt_cls([torch_param], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, steps + 1):
        grad = torch.randn(n, generator=gen).to(device) * (1.0 + step % 7)
        torch_param.grad = grad.clone()
        opt.step()
        hm.ops.adam_step_(param, grad, m, v, step=step, lr=lr, betas=betas, eps=eps,
                          weight_decay=wd, adamw=adamw)
    state = opt.state[torch_param]
    return (param, m, v), (torch_param.detach(), state["exp_avg"], state["exp_avg_sq"])


@pytest.mark.parametrize("adamw", [True, False], ids=["AdamW", "Adam"])
def test_fp32_matches_torch_optimizer_after_100_steps(adamw):
    ours, theirs = train_against_torch(adamw)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), ours, theirs):
        assert rel_err(a, b) < 1e-6, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("lowp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_pytorch_error(grad_dtype, lowp_dtype):
    """Low-precision gradients and the rounded parameter copy: our error against a float64
    run of the same maths is at most twice that of PyTorch doing it in float32 (AdamW on the
    upcast gradient, then `.to(lowp_dtype)`)."""
    n, steps, lr, scale = 50_000, 20, 1e-3, 256.0
    param, m, v = make_state(n)
    m.zero_(), v.zero_()
    lowp = torch.empty(n, dtype=lowp_dtype)
    oracle = param.double()
    om, ov = torch.zeros_like(oracle), torch.zeros_like(oracle)
    torch_param = torch.nn.Parameter(param.clone())
    opt = torch.optim.AdamW([torch_param], lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen) * scale).to(grad_dtype)
        hm.ops.adam_step_(param, grad, m, v, step=step, lr=lr, weight_decay=0.1,
                          grad_scale=scale, param_lowp=lowp)
        torch_param.grad = grad.float() / scale
        opt.step()
        g = grad.double() / scale
        oracle.mul_(1 - lr * 0.1)
        om.mul_(0.9).add_(g, alpha=0.1)
        ov.mul_(0.999).add_(g * g, alpha=0.001)
        denom = (ov / (1 - 0.999**step)).sqrt() + 1e-8
        oracle.sub_(lr / (1 - 0.9**step) * om / denom)
    torch_lowp = torch_param.detach().to(lowp_dtype)
    ours_err, torch_err = rel_err(param, oracle), rel_err(torch_param.detach(), oracle)
    assert ours_err <= 2 * torch_err + 1e-9, (ours_err, torch_err)
    ours_err, torch_err = rel_err(lowp, oracle), rel_err(torch_lowp, oracle)
    assert ours_err <= 2 * torch_err, (ours_err, torch_err)


# ------------------------------------------------------------------------------- errors


def good_args(n: int = 8):
    return dict(param=torch.zeros(n), grad=torch.zeros(n), exp_avg=torch.zeros(n),
                exp_avg_sq=torch.zeros(n))


@pytest.mark.parametrize("name,bad,exc,fragment", [
    ("param", torch.zeros(8, dtype=torch.float64), TypeError, "param must be float32"),
    ("grad", torch.zeros(8, dtype=torch.int32), TypeError, "grad must be float32, bfloat16, float16"),
    ("exp_avg", torch.zeros(8, dtype=torch.bfloat16), TypeError, "exp_avg must be float32"),
    ("exp_avg_sq", torch.zeros(8, dtype=torch.float16), TypeError, "exp_avg_sq must be float32"),
    ("grad", torch.zeros(9), ValueError, "grad has 9 elements but param has 8"),
    ("exp_avg_sq", torch.zeros(7), ValueError, "exp_avg_sq has 7 elements"),
    ("exp_avg", torch.zeros(16)[::2], ValueError, "exp_avg must be contiguous"),
    ("grad", torch.zeros(8, device="meta"), ValueError, "grad is on meta but param is on cpu"),
    ("grad", [0.0] * 8, TypeError, "grad must be a torch.Tensor"),
])
def test_bad_tensor_is_named(name, bad, exc, fragment):
    args = good_args()
    args[name] = bad
    with pytest.raises(exc, match=fragment):
        hm.ops.adam_step_(**args, step=1, lr=0.1)


def test_bad_param_lowp_is_named():
    with pytest.raises(TypeError, match="param_lowp must be bfloat16, float16"):
        hm.ops.adam_step_(**good_args(), step=1, lr=0.1, param_lowp=torch.zeros(8))
    with pytest.raises(ValueError, match="param_lowp has 4 elements"):
        hm.ops.adam_step_(**good_args(), step=1, lr=0.1,
                          param_lowp=torch.zeros(4, dtype=torch.bfloat16))


@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(step=0), ValueError, "step must be an int >= 1"),
    (dict(step=1.5), ValueError, "step must be an int"),
    (dict(lr=-1.0), ValueError, "lr must be finite and >= 0"),
    (dict(lr=float("nan")), ValueError, "lr must be finite"),
    (dict(lr="0.1"), TypeError, "lr must be a real number"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be finite and >= 0.0 and < 1.0"),
    (dict(betas=(0.9,)), TypeError, "betas must be a pair"),
    (dict(eps=-1e-8), ValueError, "eps must be"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be"),
    (dict(grad_scale=0.0), ValueError, "grad_scale must be finite and > 0"),
])
def test_bad_hyper_parameter_is_named(kwargs, exc, fragment):
    full = {"step": 1, "lr": 0.1, **kwargs}
    with pytest.raises(exc, match=fragment):
        hm.ops.adam_step_(**good_args(), **full)


def test_registered_op_checks_its_arguments_too():
    """Calling torch.ops.heteromem.adam_step_ directly (as the runtime does) is also checked."""
    op = torch.ops.heteromem.adam_step_
    hyper = dict(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 adamw=True, grad_scale=1.0, param_lowp=None)
    z = torch.zeros(8)
    with pytest.raises(TypeError, match="grad must be float32, bfloat16 or float16"):
        op(z, torch.zeros(8, dtype=torch.int64), z.clone(), z.clone(), **hyper)
    with pytest.raises(ValueError, match="exp_avg has 4 elements"):
        op(z, z.clone(), torch.zeros(4), z.clone(), **hyper)
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous"):
        op(z, z.clone(), z.clone(), torch.zeros(16)[::2], **hyper)
    with pytest.raises(ValueError, match="step must be >= 1"):
        op(z, z.clone(), z.clone(), z.clone(), **{**hyper, "step": 0})


def test_failed_call_leaves_state_untouched():
    param, m, v = make_state(8)
    before = [t.clone() for t in (param, m, v)]
    with pytest.raises(ValueError):
        hm.ops.adam_step_(param, torch.zeros(8), m, v, step=1, lr=0.1, param_lowp=torch.zeros(
            4, dtype=torch.bfloat16))
    for a, b in zip((param, m, v), before):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("lowp_dtype", [None, torch.bfloat16])
def test_opcheck(lowp_dtype):
    param, m, v = make_state(33)
    grad = torch.randn(33).to(torch.bfloat16)
    lowp = None if lowp_dtype is None else torch.empty(33, dtype=lowp_dtype)
    torch.library.opcheck(
        torch.ops.heteromem.adam_step_.default, (param, grad, m, v),
        dict(step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, adamw=True,
             grad_scale=1.0, param_lowp=lowp))


# ---------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lowp_dtype", LOWP_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_cuda_op_equals_reference_bit_for_bit(grad_dtype, lowp_dtype, n):
    ours, ref = run_both(n, grad_dtype, lowp_dtype, device="cuda", grad_scale=1024.0)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "param_lowp"), ours, ref):
        if a is not None:
            assert_same_bits(a, b, name)


@pytest.mark.cuda
@pytest.mark.parametrize("lowp_dtype", LOWP_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_cuda_op_equals_cpu_op(grad_dtype, lowp_dtype):
    on_cpu, _ = run_both(100_003, grad_dtype, lowp_dtype, device="cpu")
    on_gpu, _ = run_both(100_003, grad_dtype, lowp_dtype, device="cuda")
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "param_lowp"), on_gpu, on_cpu):
        if a is not None:
            assert_same_bits(a.cpu(), b, name)


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_cuda_unaligned_views(offset):
    """Chunk views at odd offsets take the 1-wide kernel and still match the reference."""
    n = 10_001
    base = [t.cuda() for t in make_state(n + offset)]
    ours = [t[offset:] for t in base]
    ref = [t.clone() for t in ours]
    grad = torch.randn(n + offset, device="cuda").to(torch.bfloat16)[offset:]
    lowp = torch.empty(n + offset, dtype=torch.bfloat16, device="cuda")[offset:]
    lowp_ref = torch.empty_like(lowp)
    hm.ops.adam_step_(ours[0], grad, ours[1], ours[2], step=1, lr=1e-3, param_lowp=lowp)
    reference.adam_step_(ref[0], grad, ref[1], ref[2], step=1, lr=1e-3, beta1=0.9,
                         beta2=0.999, eps=1e-8, weight_decay=0.0, adamw=True, grad_scale=1.0,
                         param_lowp=lowp_ref)
    for a, b in zip(ours + [lowp], ref + [lowp_ref]):
        assert_same_bits(a, b, "unaligned")


@pytest.mark.cuda
@pytest.mark.parametrize("adamw", [True, False], ids=["AdamW", "Adam"])
def test_cuda_fp32_matches_torch_optimizer_after_100_steps(adamw):
    ours, theirs = train_against_torch(adamw, device="cuda")
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), ours, theirs):
        assert rel_err(a, b) < 1e-6, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    param, m, v = [t.cuda() for t in make_state(1 << 20)]
    grad = torch.randn(1 << 20, device="cuda")
    expect = [t.clone() for t in (param, m, v)]
    reference.adam_step_(expect[0], grad, expect[1], expect[2], step=1, lr=1e-3, beta1=0.9,
                         beta2=0.999, eps=1e-8, weight_decay=0.0, adamw=True, grad_scale=1.0,
                         param_lowp=None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        hm.ops.adam_step_(param, grad, m, v, step=1, lr=1e-3)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip((param, m, v), expect):
        assert_same_bits(a, b, "side stream")


@pytest.mark.cuda
def test_cuda_opcheck():
    param, m, v = [t.cuda() for t in make_state(33)]
    torch.library.opcheck(
        torch.ops.heteromem.adam_step_.default,
        (param, torch.randn(33, device="cuda").half(), m, v),
        dict(step=2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adamw=False,
             grad_scale=2.0, param_lowp=torch.empty(33, device="cuda", dtype=torch.float16)))


def test_bias_correction_uses_step():
    """Step 1 from zero moments moves every parameter by lr (sign of the gradient)."""
    param, m, v = torch.ones(5), torch.zeros(5), torch.zeros(5)
    hm.ops.adam_step_(param, torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0]), m, v, step=1, lr=0.1,
                      eps=0.0)
    torch.testing.assert_close(param, torch.tensor([0.9, 1.1, 0.9, 1.1, 0.9]))
    assert math.isclose(m[0].item(), 0.1, rel_tol=1e-6)
