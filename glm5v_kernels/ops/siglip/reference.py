"""The siglip family in plain PyTorch: the specification and the CPU path.

Sigmoid contrastive loss (SigLIP, arXiv:2303.15343). For images x (B1, D) and texts y (B2, D),
the learnable log-temperature s = logit_scale and bias b = logit_bias (scalars; SigLIP
initialises them to s = log 10, b = −10):

    u_ij = <x_i, y_j>,   t = exp(s),   z_ij = t·u_ij + b
    ℓ_ij = −log σ(l_ij·z_ij) = softplus(w_ij),   w_ij = −l_ij·z_ij
    loss = (1 / B1) · Σ_i Σ_j ℓ_ij

with l_ij = +1 for a positive pair and −1 otherwise: positives "diagonal" (B1 = B2, pair i with
text i) or "none" (every pair negative: a block of texts from another rank). The sum runs over
the texts and the mean over the images, as in the paper. logit_scale is the log of the
temperature, exponentiated here, so an optimiser step on it can never flip the temperature's
sign.

Backward, with c_ij = ∂ℓ_ij/∂z_ij = −l_ij·σ(w_ij) and g = (upstream gradient) / B1:

    dx_i = g·t·Σ_j c_ij·y_j,   dy_j = g·t·Σ_i c_ij·x_i,
    d logit_scale = g·t·Σ_ij c_ij·u_ij,   d logit_bias = g·Σ_ij c_ij

The functions here walk rows and columns in chunks, so the (B1, B2) logits never exist at once:
peak extra memory is a few (ROW_CHUNK × COL_CHUNK) float32 buffers plus the float32 gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Chunk sizes of the CPU path: a 256 × 2048 float32 chunk is 2 MiB.
ROW_CHUNK = 256
COL_CHUNK = 2048


def _chunks(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, diagonal: bool):
    """Yield (r0, r1, c0, c1, xf, yf, t, u, w) per chunk: float32 rows of x and y, t = exp(s), the
    products u and w = −l·z (a fresh buffer the caller may overwrite)."""
    t = logit_scale.float().exp().reshape(())
    b = logit_bias.float().reshape(())
    for r0 in range(0, x.shape[0], ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, x.shape[0])
        xf = x[r0:r1].float()
        for c0 in range(0, y.shape[0], COL_CHUNK):
            c1 = min(c0 + COL_CHUNK, y.shape[0])
            yf = y[c0:c1].float()
            u = xf @ yf.T
            w = torch.addcmul(b, u, t)  # z; negatives keep w = z
            if diagonal:
                # Chunk element (k, k + r0 − c0) is the global pair (r0 + k, r0 + k): a positive.
                w.diagonal(r0 - c0).neg_()
            yield r0, r1, c0, c1, xf, yf, t, u, w


def siglip_forward(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                   diagonal: bool) -> torch.Tensor:
    """x (B1, D), y (B2, D), logit_scale and logit_bias one element each -> per-image losses (B1,)
    float32: Σ_j ℓ_ij (not yet divided by B1)."""
    rows = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for r0, r1, _, _, _, _, _, u, w in _chunks(x, y, logit_scale, logit_bias, diagonal):
        rows[r0:r1] += F.softplus(w).sum(1)
        del u, w
    return rows


def siglip_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor,
                    logit_bias: torch.Tensor, diagonal: bool, need_x: bool, need_y: bool
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """grad: a one-element tensor, the gradient g of the loss Σ_ij ℓ_ij (the caller folds 1/B1 in).

    Returns (dx (B1, D) in x's dtype or None, dy (B2, D) in y's dtype or None, d logit_scale,
    d logit_bias (float32, logit_scale's / logit_bias's shape)); sums accumulated in float32."""
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
    dy = torch.zeros(y.shape, dtype=torch.float32, device=y.device) if need_y else None
    sum_c = torch.zeros((), dtype=torch.float32, device=x.device)
    sum_cu = torch.zeros((), dtype=torch.float32, device=x.device)
    t = logit_scale.float().exp().reshape(())
    for r0, r1, c0, c1, xf, yf, _, u, w in _chunks(x, y, logit_scale, logit_bias, diagonal):
        # In place: w becomes c = ∂ℓ/∂z = σ(w) at negatives, −σ(w) at positives.
        c = w.sigmoid_()
        if diagonal:
            c.diagonal(r0 - c0).neg_()
        sum_c += c.sum()
        sum_cu += torch.dot(c.view(-1), u.view(-1))
        c.mul_(t)
        if dx is not None:
            dx[r0:r1].addmm_(c, yf)
        if dy is not None:
            dy[c0:c1].addmm_(c.T, xf)
        del u, w, c
    g = grad.float().reshape(())
    return (None if dx is None else (dx * g).to(x.dtype), None if dy is None else (dy * g).to(y.dtype),
            (g * t * sum_cu).reshape(logit_scale.shape), (g * sum_c).reshape(logit_bias.shape))
