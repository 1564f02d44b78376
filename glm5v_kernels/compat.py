"""Drop-in replacements for other libraries' entry points, backed by glm5v_kernels.

`flash_attn_varlen_func` has flash-attn 2's positional signature, so
`from glm5v_kernels.compat import flash_attn_varlen_func` replaces
`from flash_attn import flash_attn_varlen_func` in existing code; QK-norm, rotary and the plan are
extra keyword-only arguments (see `glm5v_kernels.varlen_attention`).
"""

from __future__ import annotations

import torch

from glm5v_kernels.ops.attention import varlen_attention


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, **fused):
    """flash-attn 2's `flash_attn_varlen_func` for self-attention over packed sequences.

    q: (total, Hq, D), k and v: (total, Hkv, D); cu_seqlens_q must equal cu_seqlens_k (self-attention
    within each sequence: the common case of packed training; a tensor compare, so pass the same
    object to skip it). Supported: softmax_scale, causal, deterministic (always true here). Not
    supported, rejected with a ValueError: dropout_p > 0, a sliding window, softcap, alibi_slopes.
    With return_attn_probs, returns (out, softmax_lse (Hq, total) float32, None): flash-attn's third
    value, the dropout mask, does not exist here. Keyword-only extras: qk_norm, q_norm_weight,
    k_norm_weight, q_norm_bias, k_norm_bias, norm_eps, rotary_cos, rotary_sin,
    rotary_interleaved, plan.
    """
    if dropout_p:
        raise ValueError(f"dropout_p must be 0.0 (attention dropout is not supported), got {dropout_p!r}")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size must be (-1, -1) (no sliding window), got {window_size!r}")
    if softcap:
        raise ValueError(f"softcap must be 0.0 (score softcapping is not supported), got {softcap!r}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None (ALiBi is not supported)")
    unknown = set(fused) - {"qk_norm", "q_norm_weight", "k_norm_weight", "q_norm_bias", "k_norm_bias", "norm_eps",
                            "rotary_cos", "rotary_sin", "rotary_interleaved", "plan"}
    if unknown:
        raise TypeError(f"flash_attn_varlen_func() got unexpected keyword arguments {sorted(unknown)}")
    if cu_seqlens_k is not cu_seqlens_q and not (
            isinstance(cu_seqlens_k, torch.Tensor) and isinstance(cu_seqlens_q, torch.Tensor)
            and cu_seqlens_k.shape == cu_seqlens_q.shape and torch.equal(cu_seqlens_k, cu_seqlens_q)):
        raise ValueError("cu_seqlens_k must equal cu_seqlens_q: only self-attention within each packed sequence is "
                         "supported")
    out = varlen_attention(q, k, v, cu_seqlens_q, max(max_seqlen_q, max_seqlen_k), causal=causal,
                           softmax_scale=softmax_scale, deterministic=deterministic, return_lse=return_attn_probs,
                           **fused)
    return (*out, None) if return_attn_probs else out
