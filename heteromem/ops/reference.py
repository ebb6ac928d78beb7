"""Pure-PyTorch versions of every heteromem op: the fallback without the extension and the
oracle the tests compare the kernels against.

The attention functions state the op's semantics (``attention_math``), give the SDPA fallback
(``attention``), and mirror the CUDA kernels' blocked algorithm (``attention_fwd`` /
``attention_bwd``, also the CPU kernels of the registered ops).

``adam_step_`` and ``agd_step_`` perform exactly the rounded float32 operations of the kernels
(csrc/common/adam_math.h, agd_math.h) in the same order, one PyTorch op per rounding, so on the
same inputs they give bit-identical results (NaN payloads aside). ``adam8bit_step_`` is
``dequantize_8bit``, ``adam_step_`` and ``quantize_8bit`` in turn, which is what the 8-bit
kernels compute in one pass (csrc/common/quant8_math.h).
"""

from __future__ import annotations

import math

import torch


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    # NOTE: torch's CPU sqrt (MKL VML) is not always correctly rounded; the float64 square
    # root rounded to float32 is, for every float32 input, so it matches the kernels' sqrt.
    return x.double().sqrt_().float()


def adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool,
    grad_scale: float,
    param_lowp: torch.Tensor | None,
) -> None:
    """In-place Adam/AdamW update; arguments as ``heteromem.ops.adam_step_`` (validated there)."""
    bias_corr1 = 1.0 - beta1**step
    bias_corr2 = 1.0 - beta2**step
    g = grad.float() * (1.0 / grad_scale)
    if not adamw and weight_decay != 0.0:
        g = g + param * weight_decay
    if adamw and weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(g * (1.0 - beta1))
    exp_avg_sq.mul_(beta2).add_((g * g).mul_(1.0 - beta2))
    denom = _sqrt_rn(exp_avg_sq).mul_(1.0 / math.sqrt(bias_corr2)).add_(eps)
    param.sub_((exp_avg / denom).mul_(lr / bias_corr1))
    if param_lowp is not None:
        param_lowp.copy_(param)


def agd_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    delta: float,
    weight_decay: float,
    grad_scale: float,
    param_lowp: torch.Tensor | None,
) -> None:
    """In-place AGD update; arguments as ``heteromem.ops.agd_step_`` (validated there)."""
    bias_corr1 = 1.0 - beta1**step
    bias_corr2 = 1.0 - beta2**step
    inv_bias_corr1_prev = 1.0 / (1.0 - beta1**(step - 1)) if step > 1 else 0.0
    g = grad.float() * (1.0 / grad_scale)
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    exp_avg_prev = exp_avg.clone()
    exp_avg.mul_(beta1).add_(g * (1.0 - beta1))
    diff = exp_avg * (1.0 / bias_corr1) - exp_avg_prev * inv_bias_corr1_prev
    exp_avg_sq.mul_(beta2).add_((diff * diff).mul_(1.0 - beta2))
    root = _sqrt_rn(exp_avg_sq)
    floor = torch.tensor(delta * math.sqrt(bias_corr2), dtype=torch.float32, device=root.device)
    denom = torch.where(floor > root, floor, root)  # a NaN root stays NaN
    param.sub_((exp_avg / denom).mul_(lr * math.sqrt(bias_corr2) / bias_corr1))
    if param_lowp is not None:
        param_lowp.copy_(param)


# 8-bit moments (csrc/common/quant8_math.h): codes F(k) = 2^(e - bias) (1 + f/16), k = 16 e + f.
QUANT_BLOCK = 256
_EXP_AVG_OFFSET = (127 - 7) << 23       # bits of F(0) = 2^-7 (exp_avg: sign + 7-bit code)
_EXP_AVG_SQ_OFFSET = (127 - 15) << 23   # bits of F(0) = 2^-15 (exp_avg_sq: 8-bit code)
_EXP_AVG_ZERO = 2.0**-7
_EXP_AVG_MAX = 1.9296875                # D(127) = F(127) - F(0)
_EXP_AVG_SQ_MAX = 1.9375                # F(255)
_HALF_STEP = 1 << 18
_INF_BITS = 0x7F800000
_MIN_NORMAL_BITS = 0x00800000


def quant8_blocks(numel: int) -> int:
    """Number of block scales of an 8-bit state of `numel` elements."""
    return -(-numel // QUANT_BLOCK)


def _per_element(blocks: torch.Tensor, numel: int) -> torch.Tensor:
    return blocks.repeat_interleave(QUANT_BLOCK)[:numel]


def dequantize_8bit(codes: torch.Tensor, scale: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """The float32 values of a flat 8-bit state: codes (uint8, n) and one scale per block of
    256 (float32). ``signed=True`` is the exp_avg format, ``False`` exp_avg_sq's."""
    c = codes.reshape(-1).to(torch.int32)
    if signed:
        value = (((c & 0x7F) << 19) + _EXP_AVG_OFFSET).view(torch.float32) - _EXP_AVG_ZERO
        value = torch.where((c & 0x80) != 0, -value, value)
    else:
        value = ((c << 19) + _EXP_AVG_SQ_OFFSET).view(torch.float32)
    return value * _per_element(scale, c.numel())


def quantize_8bit(x: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, scales float32) of a flat float32 state, one scale per block of 256:
    the block's largest magnitude over the format's largest code value (NaN when the block
    holds a non-finite value, 0 when all its magnitudes are below FLT_MIN; codes 0 then)."""
    x = x.reshape(-1).contiguous()
    n = x.numel()
    bits = x.view(torch.int32) & 0x7FFFFFFF
    padded = torch.zeros(quant8_blocks(n) * QUANT_BLOCK, dtype=torch.int32, device=x.device)
    padded[:n] = bits
    absmax_bits = padded.view(-1, QUANT_BLOCK).amax(dim=1)
    absmax = absmax_bits.view(torch.float32)
    normal = (absmax_bits >= _MIN_NORMAL_BITS) & (absmax_bits < _INF_BITS)
    top = _EXP_AVG_MAX if signed else _EXP_AVG_SQ_MAX
    scale = torch.where(normal, absmax / top, torch.zeros_like(absmax))
    scale = scale.masked_fill(absmax_bits >= _INF_BITS, float("nan"))
    # NOTE: not `top / absmax`: torch computes a Python number over a tensor as a reciprocal
    # times the number, two roundings, where the kernels divide once.
    inv = torch.full_like(absmax, top) / absmax
    inv = _per_element(torch.where(normal, inv, torch.zeros_like(absmax)), n)
    if signed:
        z = bits.view(torch.float32) * inv + _EXP_AVG_ZERO
        k = (z.view(torch.int32) + (_HALF_STEP - _EXP_AVG_OFFSET)) >> 19
        k = k | ((x.view(torch.int32) >> 24) & 0x80)
    else:
        t = (x * inv).view(torch.int32) + (_HALF_STEP - _EXP_AVG_SQ_OFFSET)
        k = t.clamp_min(0) >> 19
    k = torch.where(_per_element(normal, n), k, torch.zeros_like(k))
    return k.to(torch.uint8), scale


def adam8bit_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_scale: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_scale: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw: bool,
    grad_scale: float,
    param_lowp: torch.Tensor | None,
) -> None:
    """In-place 8-bit Adam/AdamW update; arguments as ``heteromem.ops.adam8bit_step_``."""
    m = dequantize_8bit(exp_avg, exp_avg_scale, signed=True)
    v = dequantize_8bit(exp_avg_sq, exp_avg_sq_scale, signed=False)
    adam_step_(param, grad, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
               weight_decay=weight_decay, adamw=adamw, grad_scale=grad_scale,
               param_lowp=param_lowp)
    for codes, scale, value, signed in ((exp_avg, exp_avg_scale, m, True),
                                        (exp_avg_sq, exp_avg_sq_scale, v, False)):
        new_codes, new_scale = quantize_8bit(value, signed=signed)
        codes.copy_(new_codes.view_as(codes))
        scale.copy_(new_scale)


# ------------------------------------------------------------------------------------ attention
#
# Semantics shared by every attention path: (batch, heads, seq, head_dim) tensors; k and v may
# have fewer heads than q (grouped-query attention: q head h reads k/v head h // (Hq // Hk));
# causal attention is aligned bottom-right, so with len_q queries and len_k keys query i sees keys
# j <= i + (len_k - len_q) (a KV cache's new tokens see every cached one), and a query that sees
# no key (len_q > len_k) outputs zeros.

LOG2E = 1.4426950408889634


def attention_mask(len_q: int, len_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bottom-right causal mask, (len_q, len_k) bool, True where a query may see a key."""
    rows = torch.arange(len_q, device=device)[:, None]
    cols = torch.arange(len_k, device=device)[None, :]
    return cols <= rows + (len_k - len_q)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   scale: float) -> torch.Tensor:
    """The definition, with the (len_q x len_k) score matrix materialised, in q's dtype (pass
    float64 tensors for an oracle). Differentiable by autograd."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        visible = attention_mask(q.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              scale: float) -> torch.Tensor:
    """``heteromem.ops.attention`` through ``scaled_dot_product_attention`` (the fallback on CPU
    and for inputs the kernel does not take). SDPA's own ``is_causal`` is aligned top-left, which
    differs when len_q != len_k, so those cases are reduced to ones where both alignments agree
    or given an explicit bottom-right mask."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = q.shape[1] != k.shape[1]
    len_q, len_k = q.shape[2], k.shape[2]
    if not causal or len_q == len_k:
        return sdpa(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    if len_q > len_k:
        # The first len_q - len_k queries see nothing; the last len_k form a square causal block.
        seen = sdpa(q[:, :, len_q - len_k:], k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        blind = seen.new_zeros(*seen.shape[:2], len_q - len_k, seen.shape[3])
        return torch.cat([blind, seen], dim=2)
    return sdpa(q, k, v, attn_mask=attention_mask(len_q, len_k, q.device), scale=scale,
                enable_gqa=gqa)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  *, block_m: int = 128, block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA forward's algorithm step for step (csrc/attention/attention_fwd_kernel.h), in
    float32: query blocks of block_m rows walk key blocks of block_n from the last down, stop at
    the causal diagonal, mask only the blocks that need it, keep a running max and sum in base 2
    and round P to the input dtype before P V. Returns (out in q's dtype, lse float32 with +inf
    for rows that see no key). Registered as the CPU kernel of ``heteromem::attention_fwd``."""
    batch, heads_q, len_q, head_dim = q.shape
    len_k = k.shape[2]
    group = heads_q // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    out = torch.zeros(batch, heads_q, len_q, head_dim, device=q.device)
    lse = torch.full((batch, heads_q, len_q), float("inf"), device=q.device)
    scale_log2 = scale * LOG2E
    diag = len_k - len_q
    for m0 in range(0, len_q, block_m):
        rows = torch.arange(m0, min(m0 + block_m, len_q), device=q.device)
        n_blocks = _ceil_div(len_k, block_n)
        if causal:
            keys_seen = m0 + block_m + diag
            n_blocks = 0 if keys_seen <= 0 else min(n_blocks, _ceil_div(keys_seen, block_n))
        if n_blocks == 0:
            continue  # out stays 0, lse +inf
        qb = q[:, :, m0:m0 + block_m].float()
        row_max = torch.full((batch, heads_q, len(rows)), float("-inf"), device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(batch, heads_q, len(rows), head_dim, device=q.device)
        for n0 in range((n_blocks - 1) * block_n, -1, -block_n):
            kb, vb = kf[:, :, n0:n0 + block_n], vf[:, :, n0:n0 + block_n]
            s = qb @ kb.transpose(-1, -2)
            # Keys past len_k are not in kb at all; the kernel masks its zero-filled ones.
            if causal and n0 + block_n - 1 > m0 + diag:
                cols = torch.arange(n0, n0 + kb.shape[2], device=q.device)
                s = s.masked_fill(cols[None, :] > rows[:, None] + diag, float("-inf"))
            m_new = torch.maximum(row_max, s.amax(-1))
            ref = torch.where(m_new == float("-inf"), 0.0, m_new * scale_log2)
            correction = torch.exp2(row_max * scale_log2 - ref)
            p = torch.exp2(s * scale_log2 - ref[..., None])
            row_sum = row_sum * correction + p.sum(-1)
            acc = acc * correction[..., None] + p.to(q.dtype).float() @ vb
            row_max = m_new
        empty = row_sum == 0
        inv = torch.where(empty, 0.0, 1.0 / row_sum)
        out[:, :, m0:m0 + block_m] = acc * inv[..., None]
        lse[:, :, m0:m0 + block_m] = torch.where(empty, float("inf"),
                                                 row_max * scale + torch.log(row_sum))
    return out.to(q.dtype), lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, *,
                  block_m: int = 64, block_n: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA backward's algorithm step for step (csrc/attention/attention_bwd_kernel.h), in
    float32: dsum = rowsum(dO * O); key blocks of block_n walk the query blocks from the first
    that can see them; P^T = exp2(S^T scale log2 e - lse log2 e); dV += P^T dO, dS^T = P^T
    (V dO^T - dsum), dK += dS^T Q, dQ += dS K, with P and dS rounded to the input dtype before
    their products, and the scale applied to dK and dQ at the end. Grouped-query dK/dV are summed
    over the q heads of a group in float32. Registered as the CPU kernel of
    ``heteromem::attention_bwd``."""
    dtype = q.dtype
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    qf, dof = q.float(), grad_out.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    dsum = (dof * out.float()).sum(-1)
    dq = torch.zeros(batch, heads_q, len_q, head_dim, device=q.device)
    dk = torch.zeros(batch, heads_q, len_k, head_dim, device=q.device)
    dv = torch.zeros_like(dk)
    scale_log2 = scale * LOG2E
    diag = len_k - len_q
    for k0 in range(0, len_k, block_n):
        kb, vb = kf[:, :, k0:k0 + block_n], vf[:, :, k0:k0 + block_n]
        keys = torch.arange(k0, k0 + kb.shape[2], device=q.device)
        first_row = k0 - diag
        m_begin = 0 if not causal or first_row <= 0 else first_row // block_m
        for m0 in range(m_begin * block_m, len_q, block_m):
            qb, dob = qf[:, :, m0:m0 + block_m], dof[:, :, m0:m0 + block_m]
            queries = torch.arange(m0, m0 + qb.shape[2], device=q.device)
            st = kb @ qb.transpose(-1, -2)
            pt = torch.exp2(st * scale_log2 - lse[:, :, None, m0:m0 + block_m] * LOG2E)
            if causal and k0 + block_n - 1 > m0 + diag:
                pt = pt.masked_fill(keys[:, None] > queries[None, :] + diag, 0.0)
            dv[:, :, k0:k0 + block_n] += pt.to(dtype).float() @ dob
            dst = pt * (vb @ dob.transpose(-1, -2) - dsum[:, :, None, m0:m0 + block_m])
            dst = dst.to(dtype).float()
            dk[:, :, k0:k0 + block_n] += dst @ qb
            dq[:, :, m0:m0 + block_m] += dst.transpose(-1, -2) @ kb
    dk = dk.view(batch, heads_kv, group, len_k, head_dim).sum(2) * scale
    dv = dv.view(batch, heads_kv, group, len_k, head_dim).sum(2)
    return (dq * scale).to(dtype), dk.to(dtype), dv.to(dtype)
