"""Newton–Schulz orthogonalisation in plain PyTorch: the specification of the muon family and
the CPU path.

Muon replaces an update G by an approximation of its orthogonal polar factor U·Vᵀ (G = U·S·Vᵀ),
computed by a few steps of the odd polynomial iteration

    A = X·Xᵀ;  B = b·A + c·A·A;  X ← a·X + B·X

on X = G / ‖G‖_F, on the short side of the matrix (transposed when rows > cols, so A is the
smaller Gram matrix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Keller Jordan's quintic (github.com/KellerJordan/Muon): the same (a, b, c) every step.
JORDAN = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower, arXiv:2505.16932): a different (a, b, c) per step,
# optimised for num_iters=5, l = 1e-3, safety factor 2e-2 and cushion 2; the input is divided by
# (1 + 2e-2)·‖G‖_F, the safety factor the tuples were derived for.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 2e-2


def resolve_coefficients(coefficients, steps: int) -> tuple[list[tuple[float, float, float]], float]:
    """(one (a, b, c) per step, norm scale): a preset name or a list of (a, b, c), whose last
    tuple repeats when the list is shorter than `steps`."""
    if isinstance(coefficients, str):
        if coefficients == "jordan":
            return [JORDAN] * steps, 1.0
        if coefficients == "polar_express":
            return _repeat_last(POLAR_EXPRESS, steps), 1.0 + POLAR_EXPRESS_SAFETY
        raise ValueError(f"coefficients must be 'jordan', 'polar_express' or a list of (a, b, c), "
                         f"got {coefficients!r}")
    if not isinstance(coefficients, Sequence) or not coefficients or not all(
            isinstance(t, Sequence) and len(t) == 3 and all(isinstance(v, (int, float)) for v in t)
            for t in coefficients):
        raise ValueError(f"coefficients must be 'jordan', 'polar_express' or a non-empty list of (a, b, c) "
                         f"float triples, got {coefficients!r}")
    return _repeat_last([tuple(map(float, t)) for t in coefficients], steps), 1.0


def _repeat_last(table, steps: int) -> list[tuple[float, float, float]]:
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def normalize(G: torch.Tensor, eps: float, scale: float = 1.0) -> torch.Tensor:
    """G / (scale·‖G‖_F + eps) per matrix, in float32 (before any cast to a narrower dtype)."""
    X = G.float()
    return X / (scale * torch.linalg.matrix_norm(X, keepdim=True) + eps)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="jordan", eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """G (..., m, n) -> the orthogonalised update, same shape, in G's dtype.

    The iteration runs in `dtype` (float32 by default here)."""
    table, scale = resolve_coefficients(coefficients, steps)
    X = normalize(G, eps, scale).to(dtype or torch.float32)
    tall = G.shape[-2] > G.shape[-1]
    X = polynomial_steps(X.mT if tall else X, table)
    return (X.mT if tall else X).to(G.dtype)


def polynomial_steps(X: torch.Tensor, table) -> torch.Tensor:
    """The iteration on a normalised X (..., m, n) with m <= n, one step per (a, b, c) of table,
    in X's dtype with plain (batched) matrix products."""
    for a, b, c in table:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X


def sym_gram(X: torch.Tensor, alpha: float = 1.0, C: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """alpha·X·Xᵀ (+ beta·C): X (..., m, k), C (..., m, m); the specification of the symmetric kernel."""
    out = alpha * (X.float() @ X.float().mT)
    if C is not None:
        out = out + beta * C.float()
    return out.to(X.dtype)
