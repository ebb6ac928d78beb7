"""heteromem.ops.adam8bit_step_ and the 8-bit moment formats (heteromem.ops.reference
quantize_8bit / dequantize_8bit, csrc/common/quant8_math.h): round trips and their error
bounds, the special blocks (zero, tiny, non-finite), every kernel path bit-identical to the
reference, errors naming the argument, opcheck. CUDA variants carry the `cuda` marker."""

from __future__ import annotations

import math

import pytest
import torch

import heteromem as hm
from heteromem.ops import reference
from heteromem.ops.reference import dequantize_8bit, quant8_blocks, quantize_8bit

BLOCK = 256
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOWP_DTYPES = [None, torch.bfloat16, torch.float16]
SIZES = [0, 1, 17, 255, 256, 257, 100_003]
CPU_PATHS = ["avx512", "avx2", "scalar"]
EXP_AVG_FLOOR = 2.0**-7 / 1.9296875      # F(0) / D(127): exp_avg's finer steps start here
EXP_AVG_SQ_FLOOR = 2.0**-15 / 1.9375     # F(0) / F(255): exp_avg_sq's floor


def cpu_path_supported(path: str) -> bool:
    order = {"scalar": 0, "avx2": 1, "avx512": 2}
    return order[path] <= order[hm.build_info().cpu_simd_detected]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise equality, except that any NaN equals any NaN (payloads differ between paths)."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN positions differ"
    a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    assert torch.equal(a, b), f"{what}: {(a != b).sum().item()} of {a.numel()} elements differ"


def per_element(blocks: torch.Tensor, n: int) -> torch.Tensor:
    return blocks.repeat_interleave(BLOCK)[:n]


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """Each element's block's largest magnitude (float64)."""
    padded = torch.zeros(quant8_blocks(x.numel()) * BLOCK, dtype=torch.float64)
    padded[:x.numel()] = x.double().abs()
    return per_element(padded.view(-1, BLOCK).amax(1), x.numel())


def spread_values(n: int, signed: bool, seed: int = 0) -> torch.Tensor:
    """Values over 12 decades, each block with its own magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.logspace(-6, 6, n)
    x = x * per_element(torch.logspace(-3, 3, quant8_blocks(n)), n)
    return x if signed else x * x


# ------------------------------------------------------------------------ formats and bounds


@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_round_trip_error_bounds(signed):
    """exp_avg: |error| <= (|x| + F(0) scale) / 32; exp_avg_sq: |error| <= x / 32 above its
    floor of 2^-15 of the block's largest value, and the floor below it (never less)."""
    n = 100_000
    x = spread_values(n, signed)
    codes, scale = quantize_8bit(x, signed=signed)
    back = dequantize_8bit(codes, scale, signed=signed).double()
    x, absmax = x.double(), block_absmax(x)
    slack = 1 + 2.0**-20  # the float32 roundings of the scaling and the final multiply
    if signed:
        bound = (x.abs() + EXP_AVG_FLOOR * absmax) / 32
        assert ((back - x).abs() <= bound * slack).all()
        assert torch.equal(torch.signbit(back), torch.signbit(x))
    else:
        floor = EXP_AVG_SQ_FLOOR * absmax
        above = x >= floor
        assert ((back - x).abs()[above] <= (x / 32)[above] * slack).all()
        assert (back[~above] >= x[~above]).all() and (back[~above] <= floor[~above] * slack).all()
        assert (back > 0).all()
    # The bound is tight: the worst case uses most of it (the codes have 4 significant bits).
    assert ((back - x).abs() / x.abs().clamp_min(1e-30)).max() > 0.02


@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_block_maximum_comes_back_within_an_ulp(signed):
    """A block whose values all decay together (beta2 shrinks them 0.1% a step, far below a code
    step) decays through its scale, which needs its largest value kept, not rounded to a code."""
    x = spread_values(4 * BLOCK, signed, seed=3)
    codes, scale = quantize_8bit(x, signed=signed)
    back = dequantize_8bit(codes, scale, signed=signed)
    for i in range(0, x.numel(), BLOCK):
        j = i + x[i:i + BLOCK].abs().argmax().item()
        assert math.isclose(back[j].item(), x[j].item(), rel_tol=2.0**-22)


@pytest.mark.parametrize("signed", [True, False], ids=["exp_avg", "exp_avg_sq"])
def test_every_code_survives_a_round_trip(signed):
    """Decoding then encoding returns every code (a block holding all 256 codes and a largest
    value at the top code): stored states are stable when nothing changes them."""
    codes = torch.arange(256, dtype=torch.uint8)  # exp_avg: 0x80 is -0, which stays -0
    codes[0] = 127 if signed else 255
    scale = torch.tensor([0.37], dtype=torch.float32)
    values = dequantize_8bit(codes, scale, signed=signed)
    again, again_scale = quantize_8bit(values, signed=signed)
    assert torch.equal(again, codes)
    assert math.isclose(again_scale.item(), 0.37, rel_tol=2.0**-22)


def test_zero_tiny_and_non_finite_blocks():
    x = torch.zeros(4 * BLOCK)
    x[BLOCK:2 * BLOCK] = 1e-39                     # subnormal: below FLT_MIN
    x[2 * BLOCK + 7] = float("nan")
    x[3 * BLOCK:] = torch.randn(BLOCK)
    x[3 * BLOCK + 1] = float("-inf")
    for signed in (True, False):
        codes, scale = quantize_8bit(x, signed=signed)
        assert scale[0] == 0 and scale[1] == 0
        assert torch.isnan(scale[2]) and torch.isnan(scale[3])
        assert (codes == 0).all()
        back = dequantize_8bit(codes, scale, signed=signed)
        assert (back[:2 * BLOCK] == 0).all() and torch.isnan(back[2 * BLOCK:]).all()


def test_initial_state_decodes_to_zero():
    codes = torch.zeros(1000, dtype=torch.uint8)
    for signed in (True, False):
        assert (dequantize_8bit(codes, torch.zeros(quant8_blocks(1000)), signed=signed) == 0).all()


# ------------------------------------------------------------------------------ the kernels


def fresh_state(n: int, device: str = "cpu"):
    blocks = quant8_blocks(n)
    return [torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device),
            torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device)]


def run_both(n, grad_dtype, lowp_dtype, device="cpu", steps=4, **hyper):
    """The op and the reference from the same state over `steps` steps (gradients over 10
    decades, alternating AdamW and Adam); both final states."""
    hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
             "grad_scale": 4.0, **hyper}
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=gen).to(device)
    ours = [param] + fresh_state(n, device)
    ref = [t.clone() for t in ours]
    lowp = [None if lowp_dtype is None else torch.empty(n, dtype=lowp_dtype, device=device)
            for _ in range(2)]
    scale = torch.logspace(-5, 1, max(n, 1))[:n]
    for step in range(1, steps + 1):
        grad = (torch.randn(n, generator=gen) * scale * hyper["grad_scale"]).to(grad_dtype)
        grad = grad.to(device)
        adamw = step % 2 == 1
        hm.ops.adam8bit_step_(ours[0], grad, *ours[1:], step=step, adamw=adamw,
                              param_lowp=lowp[0], **hyper)
        reference.adam8bit_step_(ref[0], grad, *ref[1:], step=step, lr=hyper["lr"],
                                 beta1=hyper["betas"][0], beta2=hyper["betas"][1],
                                 eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                                 adamw=adamw, grad_scale=hyper["grad_scale"], param_lowp=lowp[1])
    return ours + [lowp[0]], ref + [lowp[1]]


NAMES = ("param", "exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale", "param_lowp")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lowp_dtype", LOWP_DTYPES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_cpu_op_equals_reference_bit_for_bit(grad_dtype, lowp_dtype, n):
    ours, ref = run_both(n, grad_dtype, lowp_dtype)
    for name, a, b in zip(NAMES, ours, ref):
        if a is not None:
            assert_same_bits(a, b, name)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_every_cpu_path_gives_the_same_bits(path, monkeypatch):
    if not cpu_path_supported(path):
        pytest.skip(f"CPU lacks {path}")
    monkeypatch.setenv("HETEROMEM_CPU_CAPABILITY", path)
    for grad_dtype in GRAD_DTYPES:
        for lowp_dtype in LOWP_DTYPES:
            ours, ref = run_both(5 * BLOCK + 77, grad_dtype, lowp_dtype)
            for name, a, b in zip(NAMES, ours, ref):
                if a is not None:
                    assert_same_bits(a, b, f"{path} {grad_dtype}->{lowp_dtype} {name}")


def test_many_random_steps_bit_for_bit():
    """A million elements over six steps: rare rounding boundaries of the codes are hit (a
    reference that divided differently disagreed once in about 10^5 codes)."""
    ours, ref = run_both(1_000_003, torch.float32, None, steps=6)
    for name, a, b in zip(NAMES, ours, ref):
        if a is not None:
            assert_same_bits(a, b, name)


def test_first_step_is_adams():
    """From the initial (zero) state the update is exactly adam_step_'s."""
    n = 10_000
    param, grad = torch.randn(n), torch.randn(n)
    expect = param.clone()
    hm.ops.adam_step_(expect, grad, torch.zeros(n), torch.zeros(n), step=1, lr=1e-2,
                      weight_decay=0.1)
    hm.ops.adam8bit_step_(param, grad, *fresh_state(n), step=1, lr=1e-2, weight_decay=0.1)
    assert torch.equal(param, expect)


def test_a_non_finite_gradient_spreads_to_its_block_at_the_next_step():
    n = 3 * BLOCK
    param, state = torch.randn(n), fresh_state(n)
    grad = torch.randn(n)
    grad[BLOCK + 5] = float("inf")
    hm.ops.adam8bit_step_(param, grad, *state, step=1, lr=1e-3)
    assert torch.isnan(param[BLOCK + 5]) and torch.isnan(state[1][1]) and torch.isnan(state[3][1])
    hm.ops.adam8bit_step_(param, torch.randn(n), *state, step=2, lr=1e-3)
    assert torch.isnan(param[BLOCK:2 * BLOCK]).all()
    assert not torch.isnan(param[:BLOCK]).any() and not torch.isnan(param[2 * BLOCK:]).any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_param_lowp_may_alias_grad(device):
    n = 4099
    param = torch.randn(n, device=device)
    shared = torch.randn(n, device=device).to(torch.bfloat16)
    ours, ref = [param] + fresh_state(n, device), [param.clone()] + fresh_state(n, device)
    ref_lowp = torch.empty_like(shared)
    reference.adam8bit_step_(ref[0], shared.clone(), *ref[1:], step=1, lr=1e-2, beta1=0.9,
                             beta2=0.999, eps=1e-8, weight_decay=0.0, adamw=True,
                             grad_scale=1.0, param_lowp=ref_lowp)
    hm.ops.adam8bit_step_(ours[0], shared, *ours[1:], step=1, lr=1e-2, param_lowp=shared)
    for a, b in zip(ours + [shared], ref + [ref_lowp]):
        assert_same_bits(a, b, "aliased grad/param_lowp")


def good_args(n: int = 300):
    codes = torch.zeros(n, dtype=torch.uint8)
    return dict(param=torch.zeros(n), grad=torch.zeros(n), exp_avg=codes,
                exp_avg_scale=torch.zeros(2), exp_avg_sq=codes.clone(),
                exp_avg_sq_scale=torch.zeros(2))


@pytest.mark.parametrize("name,bad,exc,fragment", [
    ("exp_avg", torch.zeros(300), TypeError, "adam8bit_step_: exp_avg must be uint8, got float32"),
    ("exp_avg_sq", torch.zeros(299, dtype=torch.uint8), ValueError,
     "exp_avg_sq has 299 elements but param has 300"),
    ("exp_avg_scale", torch.zeros(1), ValueError,
     "exp_avg_scale has 1 elements but 2 are needed for param's 300"),
    ("exp_avg_sq_scale", torch.zeros(2, dtype=torch.float16), TypeError,
     "exp_avg_sq_scale must be float32"),
    ("param", torch.zeros(300, dtype=torch.bfloat16), TypeError, "param must be float32"),
])
def test_bad_tensor_is_named(name, bad, exc, fragment):
    args = good_args()
    args[name] = bad
    with pytest.raises(exc, match=fragment):
        hm.ops.adam8bit_step_(**args, step=1, lr=0.1)


def test_registered_op_checks_its_arguments_too():
    op = torch.ops.heteromem.adam8bit_step_
    args = good_args()
    hyper = dict(step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adamw=True,
                 grad_scale=1.0, param_lowp=None)
    with pytest.raises(ValueError, match="adam8bit_step_: exp_avg_scale has 3 elements but 2"):
        op(*list(args.values())[:3], torch.zeros(3), *list(args.values())[4:], **hyper)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        op(*args.values(), **{**hyper, "eps": -1.0})


def test_opcheck():
    n = 300
    args = good_args(n)
    args["param"], args["grad"] = torch.randn(n), torch.randn(n).to(torch.bfloat16)
    torch.library.opcheck(
        torch.ops.heteromem.adam8bit_step_.default, tuple(args.values()),
        dict(step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, adamw=True,
             grad_scale=1.0, param_lowp=torch.empty(n, dtype=torch.bfloat16)))


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
@pytest.mark.parametrize("offset", [0, 256 * 3])
def test_cuda_op_equals_cpu_op_on_chunk_views(offset):
    """A run starting at a multiple of 256 elements of a larger buffer (a chunk slice), with
    pointers aligned for packed loads only at offset 0 of an allocation and not for the codes
    beyond it when the scales' slice starts mid-buffer."""
    n = 100_003
    cpu_ours, _ = run_both(n, torch.bfloat16, torch.bfloat16)
    total = n + offset
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=gen)
    chunk = [torch.zeros(total), torch.zeros(total, dtype=torch.uint8),
             torch.zeros(quant8_blocks(total)), torch.zeros(total, dtype=torch.uint8),
             torch.zeros(quant8_blocks(total))]
    chunk = [t.cuda() for t in chunk]
    first = offset // BLOCK
    views = [chunk[0][offset:], chunk[1][offset:], chunk[2][first:first + quant8_blocks(n)],
             chunk[3][offset:], chunk[4][first:first + quant8_blocks(n)]]
    views[0].copy_(param)
    lowp = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    scale = torch.logspace(-5, 1, n)
    for step in range(1, 5):
        grad = (torch.randn(n, generator=gen) * scale * 4.0).to(torch.bfloat16).cuda()
        hm.ops.adam8bit_step_(views[0], grad, *views[1:], step=step, lr=1e-3, weight_decay=0.1,
                              adamw=step % 2 == 1, grad_scale=4.0, param_lowp=lowp)
    for name, a, b in zip(NAMES, views + [lowp], cpu_ours):
        assert_same_bits(a.cpu(), b, name)
