"""QKNormAttention: a self-attention layer over packed sequences on the fused varlen kernel."""

from __future__ import annotations

import torch
from torch import nn

from glm5v_kernels.ops.attention import VarlenPlan, varlen_attention


class QKNormAttention(nn.Module):
    """qkv projection, per-head QK-norm and rotary fused into varlen attention, output projection.

    dim: model width; num_heads query heads of head_dim = dim // num_heads; num_kv_heads key/value
    heads (default num_heads; fewer for grouped-query attention); qk_norm: "rms", "layer" or None
    (weights start at 1, biases at 0); bias: biases of the two projections; causal: causal within
    each sequence (LLM) or not (ViT).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, qk_norm: str | None = "rms",
                 bias: bool = True, causal: bool = False, norm_eps: float = 1e-6,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if qk_norm not in (None, "rms", "layer"):
            raise ValueError(f"qk_norm must be None, 'rms' or 'layer', got {qk_norm!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.qk_norm, self.causal, self.norm_eps = qk_norm, causal, norm_eps
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias, **factory)
        self.proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias, **factory)
        self.q_norm_weight = self.k_norm_weight = self.q_norm_bias = self.k_norm_bias = None
        if qk_norm is not None:
            self.q_norm_weight = nn.Parameter(torch.ones(self.head_dim, **factory))
            self.k_norm_weight = nn.Parameter(torch.ones(self.head_dim, **factory))
        if qk_norm == "layer":
            self.q_norm_bias = nn.Parameter(torch.zeros(self.head_dim, **factory))
            self.k_norm_bias = nn.Parameter(torch.zeros(self.head_dim, **factory))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, *,
                rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                plan: VarlenPlan | None = None) -> torch.Tensor:
        """x: (total, dim) packed tokens -> (total, dim). Give cu_seqlens (B + 1,) int32 and
        max_seqlen, or a plan (which carries both); rotary tables (total, rot_dim // 2) optional."""
        if plan is not None:
            cu_seqlens = plan.cu_seqlens if cu_seqlens is None else cu_seqlens
            max_seqlen = plan.max_seqlen if max_seqlen is None else max_seqlen
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("QKNormAttention needs cu_seqlens and max_seqlen, or a plan")
        if x.ndim != 2:
            raise ValueError(f"x must have shape (total, dim), got {tuple(x.shape)}")
        total = x.shape[0]
        q, k, v = self.qkv(x).view(total, -1, self.head_dim).split(
            [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        out = varlen_attention(
            q, k, v, cu_seqlens, max_seqlen, causal=self.causal, qk_norm=self.qk_norm,
            q_norm_weight=self.q_norm_weight, k_norm_weight=self.k_norm_weight, q_norm_bias=self.q_norm_bias,
            k_norm_bias=self.k_norm_bias, norm_eps=self.norm_eps, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
            plan=plan)
        return self.proj(out.reshape(total, -1))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"qk_norm={self.qk_norm}, causal={self.causal}")
