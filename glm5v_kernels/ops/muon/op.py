"""Newton–Schulz on the Triton backend: the symmetric products in the Triton kernel, the general
product a·X + B·X in one batched GEMM."""

from __future__ import annotations

import torch

from glm5v_kernels.ops.muon import reference


def newton_schulz_triton(G: torch.Tensor, steps: int, coefficients, eps: float, dtype: torch.dtype) -> torch.Tensor:
    from glm5v_kernels.ops.muon.triton import sym_gram

    table, scale = reference.resolve_coefficients(coefficients, steps)
    m, n = G.shape[-2:]
    X = reference.normalize(G.reshape(-1, m, n), eps, scale).to(dtype)
    tall = m > n
    X = (X.mT if tall else X).contiguous()
    A = torch.empty(X.shape[0], X.shape[1], X.shape[1], device=X.device, dtype=dtype)
    B = torch.empty_like(A)
    for a, b, c in table:
        sym_gram(X, out=A)
        sym_gram(A, alpha=c, C=A, beta=b, out=B)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if tall:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)
