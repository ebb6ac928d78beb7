"""``attn_implementation="heteromem"`` for transformers models: their attention through
``heteromem.ops.attention``.

    import heteromem.integrations.transformers as hm_transformers
    hm_transformers.register()
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="heteromem")

``register()`` adds the attention function to transformers' ``AttentionInterface`` and SDPA's
mask builder to its ``AttentionMaskInterface`` under the same name, so models build exactly the
masks they build for ``"sdpa"``: none for plain causal or unmasked attention (the fused kernel
runs, causal or not, grouped-query heads included), a 4-D boolean mask when there is padding or
another pattern. A mask, dropout, a position bias, soft-capping, sinks or a paged cache are
things the kernel does not express: those calls go to transformers' own SDPA function, so the
results are SDPA's (a ``HeteromemWarning`` says so once per reason).
"""

from __future__ import annotations

from typing import Any

import torch

from heteromem import _ext
from heteromem.ops.attention import attention

NAME = "heteromem"
# Keyword arguments whose presence (not None / not 0) changes the attention's maths.
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "cache")
_warned: set[str] = set()


def register(name: str = NAME) -> str:
    """Registers the heteromem attention under `name` (default "heteromem") with transformers'
    AttentionInterface and AttentionMaskInterface; returns the name to pass as
    ``attn_implementation``. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _warn_once(reason: str) -> None:
    _ext.warn_once(_warned, reason, f"heteromem attention: {reason}; that call uses "
                   "transformers' SDPA attention", stacklevel=3)


def _sdpa_fallback_reason(attention_mask: torch.Tensor | None, dropout: float,
                          kwargs: dict[str, Any]) -> str | None:
    if attention_mask is not None:
        return "an attention mask (padding, sliding window, ...) is given"
    if dropout:
        return f"attention dropout {dropout} is not implemented by the kernel"
    for key in _UNSUPPORTED_KWARGS:
        if kwargs.get(key) is not None:
            return f"{key} is not implemented by the kernel"
    return None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (as ``sdpa_attention_forward``): query
    (batch, heads, q_len, head_dim), key/value (batch, kv_heads, kv_len, head_dim). Returns
    (output (batch, q_len, heads, head_dim), None): attention weights are never materialised."""
    reason = _sdpa_fallback_reason(attention_mask, dropout, kwargs)
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _warn_once(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    # As transformers' SDPA function: one new token attends to everything cached.
    causal = bool(is_causal) and q_len > 1
    if causal and kv_len > q_len:
        # No mask with more keys than queries only happens when prefilling an empty static
        # cache (masking_utils relies on SDPA's top-left causal alignment there): the keys past
        # q_len are empty slots, so drop them, as transformers' SDPA function does.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = attention(query, key, value, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None
