"""The specification of the attention family in plain PyTorch, and its CPU path.

Packed layout (flash-attn's varlen layout): the sequences of a batch are concatenated along the
token axis and ``cu_seqlens`` (int32, ``(B + 1,)``, starting at 0) holds their boundaries; each
query attends only to the keys of its own sequence.

Order of operations on q and k: per-head normalisation (RMSNorm or LayerNorm over the head
dimension, weights of shape ``(D,)``), then rotary embedding on the first ``rot_dim`` channels,
then attention. Everything is computed in float32 (float64 for float64 inputs) and cast back.
"""

from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def qk_norm(x: torch.Tensor, kind: str | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
            eps: float) -> torch.Tensor:
    """x: (T, H, D) -> normalised over D in the compute dtype; kind None returns x upcast."""
    x = x.to(compute_dtype(x.dtype))
    if kind is None:
        return x
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        x = x * weight.to(x.dtype)
    if bias is not None:
        x = x + bias.to(x.dtype)
    return x


def apply_rotary(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 interleaved: bool = False) -> torch.Tensor:
    """x: (T, H, D); cos, sin: (T, rot_dim // 2). Rotates channel pairs of the first rot_dim channels.

    Rotate-half pairs channel i with i + rot_dim/2 (GPT-NeoX, Llama, Qwen2-VL); interleaved pairs
    2i with 2i + 1 (GPT-J). Pair i turns by the angle whose cosine is cos[:, i]."""
    if cos is None:
        return x
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    c = cos.to(x.dtype)[:, None, :]
    s = sin.to(x.dtype)[:, None, :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :half], rot[..., half:]
        rot = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((rot, rest), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
              softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal softmax attention.

    q: (T, Hq, D), k and v: (T, Hkv, D) with Hq % Hkv == 0 (query head h reads key head
    h // (Hq // Hkv)). Returns out (T, Hq, D) in the compute dtype and the natural-log
    log-sum-exp of the scaled scores, lse (Hq, T) (flash-attn's varlen layout).
    """
    dtype = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape, dtype=dtype)
    lse = q.new_zeros((q.shape[1], q.shape[0]), dtype=dtype)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].to(dtype).transpose(0, 1)                          # (Hq, L, D)
        ks = k[start:end].to(dtype).repeat_interleave(group, 1).transpose(0, 1)
        vs = v[start:end].to(dtype).repeat_interleave(group, 1).transpose(0, 1)
        scores = softmax_scale * (qs @ ks.transpose(1, 2))                    # (Hq, L, L)
        if causal:
            length = end - start
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)                              # (Hq, L)
        out[start:end] = (torch.exp(scores - row_lse[..., None]) @ vs).transpose(0, 1)
        lse[:, start:end] = row_lse
    return out, lse


def varlen_attention(q, k, v, cu_seqlens, *, causal=False, softmax_scale=None, qk_norm_kind=None,
                     q_norm_weight=None, k_norm_weight=None, q_norm_bias=None, k_norm_bias=None, norm_eps=1e-6,
                     rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    """Norm, rotary and attention composed; returns (out in q's dtype, lse (Hq, T) float32).

    Differentiable with respect to q, k, v and the norm parameters through plain autograd."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qn = apply_rotary(qk_norm(q, qk_norm_kind, q_norm_weight, q_norm_bias, norm_eps), rotary_cos, rotary_sin,
                      rotary_interleaved)
    kn = apply_rotary(qk_norm(k, qk_norm_kind, k_norm_weight, k_norm_bias, norm_eps), rotary_cos, rotary_sin,
                      rotary_interleaved)
    out, lse = attention(qn, kn, v, cu_seqlens, causal, scale)
    return out.to(q.dtype), lse.float()
