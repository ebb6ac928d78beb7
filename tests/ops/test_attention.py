"""heteromem.ops.attention: semantics (bottom-right causal, GQA, rows that see no key), the SDPA
fallback, the blocked algorithm the CUDA kernels run (mirrored in PyTorch and registered as the
op's CPU kernel) against the definition in float64, the registered ops (opcheck, fakes,
autograd), errors naming the argument, and the generated kernel files. Tests marked `cuda` check
the kernels themselves: outputs, lse and dq/dk/dv within twice SDPA's own error in the same
dtype against a float32 reference, as flash-attention's tests do."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import heteromem as hm
from heteromem.ops import reference

ROOT = Path(__file__).resolve().parents[2]
# The module, not the function: heteromem.ops re-exports `attention`, which shadows the
# submodule as an attribute of the package (so `from heteromem.ops import attention` and the
# dotted path "heteromem.ops.attention._warned" both reach the function).
attention_module = importlib.import_module("heteromem.ops.attention")

# (batch, heads_q, heads_kv, len_q, len_k, head_dim)
SHAPES = [
    pytest.param((2, 4, 4, 64, 64, 32), id="square"),
    pytest.param((1, 3, 3, 37, 54, 40), id="odd-q<k"),
    pytest.param((2, 2, 2, 53, 36, 24), id="odd-q>k"),
    pytest.param((2, 6, 2, 45, 45, 16), id="gqa"),
    pytest.param((1, 4, 1, 1, 29, 8), id="decode-mqa"),
    pytest.param((1, 2, 1, 150, 20, 16), id="q>>k-blocks-skipped"),
]


def make_qkv(shape, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    batch, heads_q, heads_kv, len_q, len_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, len_q, head_dim, generator=gen)
    k = torch.randn(batch, heads_kv, len_k, head_dim, generator=gen)
    v = torch.randn(batch, heads_kv, len_k, head_dim, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def oracle(q, k, v, causal, scale, grad_out):
    """float64 output, gradients and log-sum-exp from the definition."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.attention_math(q64, k64, v64, causal=causal, scale=scale)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    group = q.shape[1] // k.shape[1]
    scores = (q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2)).detach() * scale
    if causal:
        scores = scores.masked_fill(~reference.attention_mask(q.shape[2], k.shape[2]), -math.inf)
    lse = torch.logsumexp(scores, -1)
    return out.detach(), grads, torch.where(lse == -math.inf, math.inf, lse)


# ------------------------------------------------------------------------------ semantics


def test_causal_is_aligned_bottom_right():
    q, k, v = make_qkv((1, 1, 1, 3, 5, 8))
    out = hm.ops.attention(q, k, v, causal=True)
    # Query i is the token at position i + 2: it sees keys 0..i+2.
    for i in range(3):
        alone = hm.ops.attention(q[:, :, i:i + 1], k[:, :, :i + 3], v[:, :, :i + 3])
        torch.testing.assert_close(out[:, :, i:i + 1], alone)
    # With more queries than keys the first ones see nothing: zeros, and no gradient.
    q, k, v = make_qkv((1, 2, 2, 6, 4, 8))
    out = hm.ops.attention(q, k, v, causal=True)
    out.sum().backward()
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))
    assert out[:, :, 2:].abs().sum() > 0 and q.grad[:, :, 2:].abs().sum() > 0


def test_equal_lengths_match_sdpa_is_causal():
    q, k, v = make_qkv((2, 3, 3, 33, 33, 16), dtype=torch.float32)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(hm.ops.attention(q, k, v, causal=True), sdpa)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fallback_matches_definition(shape, causal):
    """The CPU path (SDPA with bottom-right handling) against the float64 definition."""
    q, k, v = make_qkv(shape, dtype=torch.float32)
    scale = 0.3
    out = hm.ops.attention(q, k, v, causal=causal, scale=scale)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_grads, _ = oracle(q, k, v, causal, scale, grad_out)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert rel_err(out, ref_out) < 1e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-5, f"d{name}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (128, 64)], ids=lambda b: f"bm{b[0]}-bn{b[1]}")
@pytest.mark.parametrize("shape", SHAPES)
def test_blocked_algorithm_matches_definition(shape, blocks, causal):
    """The kernels' algorithm (tiles, causal tile skipping, base-2 online softmax, lse, the
    backward from lse and rowsum(dO * O)) in float32 against float64, at tile sizes that split
    the odd lengths into several partial blocks."""
    block_m, block_n = blocks
    q, k, v = make_qkv(shape, dtype=torch.float32, requires_grad=False)
    scale = shape[-1] ** -0.5
    out, lse = reference.attention_fwd(q, k, v, causal, scale, block_m=block_m, block_n=block_n)
    grad_out = torch.randn_like(out)
    grads = reference.attention_bwd(grad_out, q, k, v, out, lse, causal, scale,
                                    block_m=block_n, block_n=block_m)
    ref_out, ref_grads, ref_lse = oracle(q, k, v, causal, scale, grad_out)
    assert rel_err(out, ref_out) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and rel_err(g, r) < 1e-5, f"d{name}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocked_algorithm_low_precision_within_twice_sdpa_error(dtype):
    """Rounding P and dS to the input dtype (as the kernels' tensor-core products do) costs no
    more accuracy than PyTorch's own low-precision attention."""
    shape = (2, 4, 2, 97, 97, 64)
    q, k, v = make_qkv(shape, dtype=torch.float32, requires_grad=False)
    ql, kl, vl = (t.to(dtype) for t in (q, k, v))
    scale = 0.125
    grad_out = torch.randn(2, 4, 97, 64)
    ref_out, ref_grads, _ = oracle(ql, kl, vl, True, scale, grad_out)
    out, lse = reference.attention_fwd(ql, kl, vl, True, scale)
    grads = reference.attention_bwd(grad_out.to(dtype), ql, kl, vl, out, lse, True, scale)
    ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))
    pt_out = reference.attention_math(ql, kl, vl, causal=True, scale=scale)
    pt_grads = torch.autograd.grad(pt_out, (ql, kl, vl), grad_out.to(dtype))
    assert (out - ref_out).abs().max() <= 2 * (pt_out - ref_out).abs().max()
    for name, g, p, r in zip("qkv", grads, pt_grads, ref_grads):
        assert (g - r).abs().max() <= 2 * (p - r).abs().max(), f"d{name}"


def test_default_scale_and_bf16_fallback():
    q, k, v = make_qkv((1, 2, 2, 20, 20, 16), dtype=torch.bfloat16, requires_grad=False)
    out = hm.ops.attention(q, k, v)
    ref = reference.attention_math(q.double(), k.double(), v.double(), causal=False, scale=0.25)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2


def test_value_head_dim_may_differ_on_the_fallback():
    q, k, _ = make_qkv((1, 2, 2, 9, 11, 16), dtype=torch.float32)
    v = torch.randn(1, 2, 11, 24)
    out = hm.ops.attention(q, k, v, causal=True)
    assert out.shape == (1, 2, 9, 24)
    ref = reference.attention_math(q.double(), k.double(), v.double(), causal=True, scale=0.25)
    assert rel_err(out, ref) < 1e-5


# -------------------------------------------------------------------------- registered ops


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 1, 5, 7, 8), (2, 2, 2, 7, 5, 16)])
def test_opcheck(shape, causal):
    """Schema, fake tensors, autograd registration and AOT dispatch of the registered ops, on
    their CPU kernels."""
    q, k, v = make_qkv(shape, dtype=torch.float32)
    torch.library.opcheck(torch.ops.heteromem.attention_fwd.default, (q, k, v, causal, 0.5))
    out, lse = torch.ops.heteromem.attention_fwd(q.detach(), k.detach(), v.detach(), causal, 0.5)
    torch.library.opcheck(torch.ops.heteromem.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                           causal, 0.5))


def test_registered_op_gradients_match_definition():
    q, k, v = make_qkv((2, 4, 2, 19, 23, 16), dtype=torch.float32)
    out, lse = torch.ops.heteromem.attention_fwd(q, k, v, True, 0.25)
    assert not lse.requires_grad, "lse is an auxiliary output"
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _, ref_grads, _ = oracle(q, k, v, True, 0.25, grad_out)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-5, f"d{name}"


def test_meta_tensors_give_shapes_without_compute():
    q = torch.empty(2, 8, 100, 64, device="meta", dtype=torch.bfloat16)
    k = v = torch.empty(2, 2, 300, 64, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.heteromem.attention_fwd(q, k, v, True, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 8, 100) and lse.dtype == torch.float32
    dq, dk, dv = torch.ops.heteromem.attention_bwd(out, q, k, v, out, lse, True, 0.125)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert hm.ops.attention(q, k, v, causal=True).shape == q.shape


def test_cuda_tests_patch_the_module_not_the_function():
    """The CUDA tests monkeypatch the wrapper's module state; `heteromem.ops.attention` as an
    attribute of the package is the function, which has none of it."""
    assert callable(hm.ops.attention) and attention_module is not hm.ops.attention
    assert isinstance(attention_module._warned, set)
    assert set(attention_module.BWD_SMEM_BYTES) == {64, 128}


def test_generated_kernel_files_are_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "csrc/attention/generate_kernels.py"),
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------- errors


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD_INPUTS = [
    ((_t(2, 4, 8), _t(2, 4, 8, 1), _t(2, 4, 8, 1)), {}, ValueError, "q must be 4-D"),
    ((_t(1, 2, 4, 8), [1.0], _t(1, 2, 4, 8)), {}, TypeError, "k must be a torch.Tensor"),
    ((_t(1, 2, 4, 8), _t(1, 2, 4, 8, dtype=torch.float16), _t(1, 2, 4, 8)), {}, TypeError,
     "k is torch.float16 but q is torch.float32"),
    ((_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8, dtype=torch.int64)), {}, TypeError,
     "v must be a floating-point tensor"),
    ((_t(1, 2, 4, 8), _t(1, 2, 4, 8, device="meta"), _t(1, 2, 4, 8)), {}, ValueError,
     "k is on meta but q is on cpu"),
    ((_t(1, 2, 4, 8), _t(2, 2, 4, 8), _t(2, 2, 4, 8)), {}, ValueError, "k has batch 2"),
    ((_t(1, 6, 4, 8), _t(1, 4, 4, 8), _t(1, 4, 4, 8)), {}, ValueError,
     "4 heads, which does not divide q's 6"),
    ((_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 1, 4, 8)), {}, ValueError, "same heads and sequence"),
    ((_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 4, 8)), {}, ValueError, "same heads and sequence"),
    ((_t(1, 2, 4, 8), _t(1, 2, 4, 16), _t(1, 2, 4, 16)), {}, ValueError, "k has head_dim 16"),
    ((_t(1, 2, 4, 8), _t(1, 2, 0, 8), _t(1, 2, 0, 8)), {}, ValueError, "sequence length 0"),
    ((_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)), {"causal": 1}, TypeError,
     "causal must be a bool"),
    ((_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)), {"scale": -1.0}, ValueError,
     "scale must be finite and positive"),
    ((_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)), {"scale": "0.1"}, TypeError,
     "scale must be a real number"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "message"), BAD_INPUTS,
                         ids=[case[3] for case in BAD_INPUTS])
def test_bad_inputs_raise_a_clear_error(args, kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        hm.ops.attention(*args, **kwargs)


# ----------------------------------------------------------------------- the CUDA kernels

CUDA_SHAPES = [
    pytest.param((2, 4, 4, 128, 128), id="square"),
    pytest.param((1, 3, 3, 113, 257), id="odd-q<k"),
    pytest.param((1, 2, 2, 300, 77), id="odd-q>k"),
    pytest.param((2, 8, 2, 200, 200), id="gqa"),
    pytest.param((1, 4, 1, 1, 513), id="decode-mqa"),
    pytest.param((1, 2, 2, 1030, 1030), id="long"),
]


def within_twice_sdpa(kernel: torch.Tensor, sdpa: torch.Tensor, ref: torch.Tensor, what: str):
    """Max error at most twice SDPA's; the floor (1e-4 of the largest value, an eighth of a bf16
    ulp there) keeps a case where SDPA happens to be almost exact from failing on rounding."""
    err, bound = (kernel.float() - ref).abs().max().item(), (sdpa.float() - ref).abs().max().item()
    floor = 1e-4 * ref.abs().max().item() + 1e-6
    assert err <= 2 * bound + floor, f"{what}: max error {err:.3g} > 2 x SDPA's {bound:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 40, 96, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_kernel_within_twice_sdpa_error(shape, dtype, head_dim, causal):
    q, k, v = make_qkv((*shape, head_dim), dtype=torch.float32, device="cuda", seed=head_dim)
    grad_out = torch.randn(*q.shape[:3], head_dim, device="cuda")
    scale = head_dim ** -0.5
    ref_out = reference.attention_math(q, k, v, causal=causal, scale=scale)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad_out)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", hm.HeteromemWarning)  # the kernel, not the fallback
        out = hm.ops.attention(*low, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    grads = torch.autograd.grad(out, low, grad_out.to(dtype))
    pt = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    pt_out = reference.attention(*pt, causal=causal, scale=scale)
    pt_grads = torch.autograd.grad(pt_out, pt, grad_out.to(dtype))
    within_twice_sdpa(out, pt_out, ref_out, "out")
    for name, g, p, r in zip("qkv", grads, pt_grads, ref_grads):
        within_twice_sdpa(g, p, r, f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_lse_and_blind_rows(causal):
    q, k, v = make_qkv((2, 4, 2, 150, 70, 64), dtype=torch.bfloat16, device="cuda",
                       requires_grad=False)
    out, lse = torch.ops.heteromem.attention_fwd(q, k, v, causal, 0.125)
    _, _, ref_lse = oracle(q.cpu(), k.cpu(), v.cpu(), causal, 0.125, torch.zeros(q.shape))
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.cpu()[finite].double(), ref_lse[finite], rtol=0, atol=2e-2)
    if causal:  # the first 80 queries see no key
        assert torch.equal(out[:, :, :80], torch.zeros_like(out[:, :, :80]))


@pytest.mark.cuda
def test_cuda_strided_inputs_and_expanded_grad():
    """(batch, seq, heads, head_dim) views as transformers passes them, an odd storage offset
    (copied before the kernel), and the stride-0 gradient that .sum().backward() produces."""
    base = torch.randn(2, 100, 3 * 4 * 64 + 8, device="cuda", dtype=torch.bfloat16)
    q, k, v = (base[..., 8 + i * 256: 8 + (i + 1) * 256].view(2, 100, 4, 64).transpose(1, 2)
               for i in range(3))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = hm.ops.attention(q, k, v, causal=True)
    out.float().sum().backward()
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    ref = hm.ops.attention(qc, kc, vc, causal=True)
    ref.float().sum().backward()
    assert torch.equal(out, ref)
    for a, b in ((q, qc), (k, kc), (v, vc)):
        torch.testing.assert_close(a.grad, b.grad)
    odd = torch.randn(2 * 4 * 100 * 64 + 1, device="cuda", dtype=torch.bfloat16)[1:]
    qo = odd.view(2, 4, 100, 64)
    torch.testing.assert_close(hm.ops.attention(qo, k, v), hm.ops.attention(qo.clone(), k, v))


@pytest.mark.cuda
def test_cuda_unsupported_inputs_fall_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(attention_module, "_warned", set())
    q, k, v = make_qkv((1, 2, 2, 16, 16, 32), dtype=torch.float32, device="cuda")
    with pytest.warns(hm.HeteromemWarning, match="dtype float32"):
        out = hm.ops.attention(q, k, v, causal=True)
    ref = reference.attention_math(q, k, v, causal=True, scale=32 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hm.HeteromemWarning)
        hm.ops.attention(q, k, v)  # the same reason again: no second warning
    big = make_qkv((1, 2, 2, 16, 16, 160), dtype=torch.bfloat16, device="cuda", requires_grad=False)
    with pytest.warns(hm.HeteromemWarning, match="head_dim 160"):
        hm.ops.attention(*big)


@pytest.mark.cuda
def test_cuda_training_falls_back_where_the_backward_does_not_fit(monkeypatch):
    """GPUs whose blocks cannot hold the backward's shared memory (sm_86/89) still run the
    forward kernel for inference and train through SDPA, saying so."""
    monkeypatch.setattr(attention_module, "BWD_SMEM_BYTES", {64: 1 << 30, 128: 1 << 30})
    monkeypatch.setattr(attention_module, "_warned", set())
    q, k, v = make_qkv((1, 2, 2, 64, 64, 64), dtype=torch.bfloat16, device="cuda")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", hm.HeteromemWarning)
        hm.ops.attention(q, k, v, causal=True)  # forward only: the kernel
    with pytest.warns(hm.HeteromemWarning, match="training on this GPU"):
        out = hm.ops.attention(q, k, v, causal=True)
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


class _FakeCuda:
    """Stands in for a CUDA tensor where only metadata is read (kernel_unsupported is pure
    Python: its every branch runs here, without a GPU)."""

    def __init__(self, shape, dtype=torch.bfloat16, requires_grad=False) -> None:
        self.shape, self.dtype, self.requires_grad = tuple(shape), dtype, requires_grad
        self.device = torch.device("cuda", 0)


@pytest.mark.parametrize("q,k,v,capability,smem,grad,reason", [
    ((1, 2, 64, 64), None, None, (9, 0), 232448, True, None),
    ((1, 2, 64, 64), None, None, (9, 0), 232448, False, None),
    ((1, 2, 64, 64, "float32"), None, None, (9, 0), 232448, False, "dtype float32"),
    ((1, 2, 64, 64), None, (1, 2, 64, 32), (9, 0), 232448, False, "v's head_dim 32"),
    ((1, 2, 64, 60), None, (1, 2, 64, 60), (9, 0), 232448, False, "head_dim 60"),
    ((1, 2, 64, 256), None, (1, 2, 64, 256), (9, 0), 232448, False, "head_dim 256"),
    ((70000, 2, 64, 64), None, None, (9, 0), 232448, False, "batch 70000"),
    ((1, 2, 64, 64), (1, 2, 2**31, 64), None, (9, 0), 232448, False, "sequence length"),
    ((1, 2, 64, 64), None, None, (7, 5), 232448, False, "compute capability 8.0"),
    ((1, 2, 64, 128), None, (1, 2, 64, 128), (8, 6), 101376, True, "training on this GPU"),
    ((1, 2, 64, 64), None, None, (8, 6), 101376, False, None),  # inference fits
], ids=["trains", "infers", "fp32", "v-dim", "dim-60", "dim-256", "batch", "seq", "sm75",
        "small-smem", "small-smem-inference"])
def test_kernel_unsupported_names_why_for_each_limit(monkeypatch, q, k, v, capability, smem,
                                                     grad, reason):
    from heteromem import _ext
    attention_module = importlib.import_module("heteromem.ops.attention")

    def fake(shape):
        if shape is None:
            return None
        dtype = getattr(torch, shape[4]) if len(shape) > 4 else torch.bfloat16
        return _FakeCuda(shape[:4], dtype, requires_grad=grad)
    fq = fake(q)
    fk = fake(k) or _FakeCuda(q[:4], fq.dtype, grad)
    fv = fake(v) or _FakeCuda(q[:4], fq.dtype, grad)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("P", (), {"shared_memory_per_block_optin": smem}))
    got = attention_module.kernel_unsupported(fq, fk, fv)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


def test_kernel_unsupported_without_cuda_kernels_or_on_the_cpu(monkeypatch):
    from heteromem import _ext
    attention_module = importlib.import_module("heteromem.ops.attention")

    q = torch.zeros(1, 2, 8, 64)
    assert "cpu tensors" in attention_module.kernel_unsupported(q, q, q)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, device: False)
    fake = _FakeCuda((1, 2, 8, 64))
    assert "CUDA" in attention_module.kernel_unsupported(fake, fake, fake)
