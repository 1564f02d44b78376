"""QK-clip (MuonClip, Kimi K2): after an optimizer step, shrink the query and key projections of
every attention head whose largest attention logit exceeded a threshold, so that logit comes back
to the threshold. Muon's updates can grow q·k without bound; this caps it per head.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def qk_clip(q_weight: torch.Tensor, k_weight: torch.Tensor, max_logits: torch.Tensor, num_heads: int,
            num_kv_heads: int | None = None, threshold: float = 100.0, alpha: float = 0.5,
            q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Rescale q_weight / k_weight (and biases) in place; returns the per-head factor gamma (float64).

    q_weight: (num_heads * head_dim, ...) rows of the query projection, head-major.
    k_weight: (num_kv_heads * head_dim, ...) rows of the key projection.
    max_logits: (num_heads,) the largest pre-softmax logit each head produced (scale included).

    gamma_h = min(1, threshold / max_logits[h]); query head h is scaled by gamma_h ** alpha and
    key head g by (min of gamma over the query heads sharing it) ** (1 - alpha), so every head's
    logits shrink by at least gamma_h (grouped-query heads sharing a key may shrink a little
    more). With QK-norm after the projections, pass the tensors that set the logit scale (the
    norm weights, per head) instead of the projections.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if max_logits.shape != (num_heads,):
        raise ValueError(f"max_logits must have shape ({num_heads},), got {tuple(max_logits.shape)}")
    for name, tensor, heads in (("q_weight", q_weight, num_heads), ("k_weight", k_weight, num_kv_heads)):
        if tensor.shape[0] % heads:
            raise ValueError(f"{name} dim 0 ({tensor.shape[0]}) must be a multiple of its {heads} heads")
    if not threshold > 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"threshold must be > 0 and alpha in [0, 1], got {threshold}, {alpha}")
    if not torch.isfinite(max_logits).all():
        raise ValueError("max_logits must be finite")

    gamma = (threshold / max_logits.double()).clamp(max=1.0)
    kv_gamma = gamma.view(num_kv_heads, num_heads // num_kv_heads).amin(dim=1)
    for tensor, factor in ((q_weight, gamma ** alpha), (q_bias, gamma ** alpha),
                           (k_weight, kv_gamma ** (1 - alpha)), (k_bias, kv_gamma ** (1 - alpha))):
        if tensor is not None:
            heads = tensor.view(factor.numel(), -1)
            heads.mul_(factor.to(tensor.dtype)[:, None])
    return gamma
