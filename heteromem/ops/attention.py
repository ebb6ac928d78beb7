"""``heteromem.ops.attention``: fused scaled-dot-product attention, forward and backward.

On a CUDA device (compute capability 8.0+) with bfloat16/float16 inputs and a head dim that is a
multiple of 8 up to 128, one kernel computes the forward and one the backward
(``torch.ops.heteromem.attention_fwd`` / ``attention_bwd``, csrc/attention/), FlashAttention-2
style: the (seq_q x seq_k) score matrix is never stored, the forward saves only the output and
one float32 log-sum-exp per query row, and the backward recomputes the scores from them. Anything
else falls back to ``torch.nn.functional.scaled_dot_product_attention`` with the same semantics
(``heteromem.ops.reference.attention``): silently on CPU, where it is the implementation, and
with one ``HeteromemWarning`` per reason on CUDA.
"""

from __future__ import annotations

import math
import numbers

import torch

from heteromem import _ext
from heteromem.ops import reference

_OP = "attention_fwd"
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MAX_KERNEL_HEAD_DIM = 128
_GRID_LIMIT = 65535  # CUDA grid y/z: heads and batch
# The kernels index sequence positions in int32, up to a tile past either length
# (kMaxSeqLen in csrc/attention/attention_cuda.cu).
MAX_KERNEL_SEQ_LEN = 2**31 - 1 - 256
# Shared memory per CTA of the backward kernel, by head-dim bucket (bwd_smem_bytes in
# csrc/attention/kernel_traits.h, which static_asserts these values).
BWD_SMEM_BYTES = {64: 133120, 128: 148480}
_warned: set[str] = set()


def _check_inputs(q: object, k: object, v: object, causal: object, scale: object) -> float:
    """Validates the arguments of ``attention``; returns the softmax scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (batch, heads, seq, head_dim), got "
                             f"shape {tuple(t.shape)}; a (batch, seq, heads, head_dim) tensor "
                             f"becomes one with {name}.transpose(1, 2)")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} is {t.dtype} but q is {q.dtype}; q, k and v must "
                            f"have one dtype (e.g. {name}.to(q.dtype))")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}; move "
                             "q, k and v to one device")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"attention: {name} has batch {t.shape[0]} but q has {q.shape[0]}")
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the "
                         "same heads and sequence length")
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"attention: k and v have {heads_kv} heads, which does not divide q's "
                         f"{heads_q}; grouped-query attention needs q's heads to be a multiple "
                         "of k's (or repeat k and v to q's heads)")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: k has head_dim {k.shape[3]} but q has {q.shape[3]}; the "
                         "scores q @ k^T need equal head dims")
    if k.shape[2] == 0:
        raise ValueError("attention: k and v have sequence length 0; a query needs at least one "
                         "key to attend to")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        if q.shape[3] == 0:
            raise ValueError("attention: head_dim is 0; pass tensors with a positive head_dim")
        return 1.0 / math.sqrt(q.shape[3])
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"attention: scale must be a real number or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: scale must be finite and positive, got {scale}")
    return float(scale)


def kernel_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the fused kernel cannot run these (validated) inputs, or None when it can."""
    if q.device.type != "cuda":
        return f"{q.device.type} tensors (the kernel is CUDA only)"
    if not _ext.has_kernel(_OP, "cuda"):
        return _ext.LOAD_ERROR if not _ext.LOADED else (
            "this build of heteromem has no CUDA kernels (reinstall with the CUDA toolkit present)")
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {str(q.dtype).replace('torch.', '')} (the kernel takes bfloat16 and float16)"
    head_dim = q.shape[3]
    if v.shape[3] != head_dim:
        return f"v's head_dim {v.shape[3]} differs from q's {head_dim}"
    if head_dim % 8 != 0 or head_dim > MAX_KERNEL_HEAD_DIM:
        return (f"head_dim {head_dim} (the kernel takes multiples of 8 up to "
                f"{MAX_KERNEL_HEAD_DIM})")
    if q.shape[0] > _GRID_LIMIT or q.shape[1] > _GRID_LIMIT:
        return f"batch {q.shape[0]} or heads {q.shape[1]} above {_GRID_LIMIT}"
    if max(q.shape[2], k.shape[2]) > MAX_KERNEL_SEQ_LEN:
        return f"sequence length {max(q.shape[2], k.shape[2])} above {MAX_KERNEL_SEQ_LEN}"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "a GPU older than compute capability 8.0"
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_backward:
        smem = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        needed = BWD_SMEM_BYTES[64 if head_dim <= 64 else 128]
        if smem < needed:
            return (f"training on this GPU ({smem} bytes of shared memory per block; the "
                    f"backward kernel needs {needed})")
    return None


def _warn_once(reason: str) -> None:
    _ext.warn_once(_warned, reason, "heteromem.ops.attention: using "
                   f"scaled_dot_product_attention instead of the fused kernel for {reason}",
                   stacklevel=3)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q @ k^T) @ v over (batch, heads, seq, head_dim) tensors.

    Args:
        q: (batch, heads, seq_q, head_dim).
        k, v: (batch, heads_kv, seq_k, head_dim); ``heads_kv`` must divide ``heads``
            (grouped-query attention: q head h attends with k/v head h // (heads // heads_kv)).
            ``v`` may have another head dim on the fallback path.
        causal: mask keys after each query's position, aligned bottom-right: query i sees keys
            j <= i + seq_k - seq_q (as with a KV cache; equal to SDPA's ``is_causal`` when
            seq_q == seq_k). A query that sees no key (seq_q > seq_k) gets zeros.
        scale: the softmax scale; default 1/sqrt(head_dim).

    Returns:
        (batch, heads, seq_q, head_dim_v) in q's dtype; differentiable w.r.t. q, k and v.

    Raises:
        TypeError: a non-tensor, non-float or mismatched dtype, non-bool causal.
        ValueError: wrong rank, mismatched batch/heads/lengths/head dims, k heads not dividing
            q heads, different devices, no keys, a non-positive scale.
    """
    scale = _check_inputs(q, k, v, causal, scale)
    reason = kernel_unsupported(q, k, v)
    if reason is None:
        return torch.ops.heteromem.attention_fwd(q, k, v, causal, scale)[0]
    if q.device.type == "cuda":
        _warn_once(reason)
    return reference.attention(q, k, v, causal=causal, scale=scale)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    # The log-sum-exp is an auxiliary output for the backward, not a differentiable result.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.heteromem.attention_bwd(
        grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return grad_q, grad_k, grad_v, None, None


if _ext.LOADED:

    @torch.library.register_fake("heteromem::attention_fwd")
    def _attention_fwd_fake(q, k, v, causal, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("heteromem::attention_bwd")
    def _attention_bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_kernel("heteromem::attention_fwd", "cpu")
    def _attention_fwd_cpu(q, k, v, causal, scale):
        # The kernel's algorithm in PyTorch: lets the op itself (not only hm.ops.attention) run,
        # be opchecked and be compiled on a CPU-only machine.
        _check_inputs(q, k, v, causal, scale)
        return reference.attention_fwd(q, k, v, causal, scale)

    @torch.library.register_kernel("heteromem::attention_bwd", "cpu")
    def _attention_bwd_cpu(grad_out, q, k, v, out, lse, causal, scale):
        _check_inputs(q, k, v, causal, scale)
        return reference.attention_bwd(grad_out, q, k, v, out, lse, causal, scale)

    torch.library.register_autograd("heteromem::attention_fwd", _backward,
                                    setup_context=_setup_context)
