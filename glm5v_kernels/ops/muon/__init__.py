"""Muon's Newton–Schulz orthogonalisation, batched over leading dimensions."""

from __future__ import annotations

import torch

from glm5v_kernels._backend import select_backend
from glm5v_kernels.ops.muon import reference
from glm5v_kernels.ops.muon.op import PathChoice, force_path, newton_schulz_triton, path_choices

_NS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients="jordan", eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise G: (..., m, n) -> same shape and dtype, G untouched.

    G is divided by its Frobenius norm (per matrix, in float32) before the cast to `dtype`, then
    `steps` iterations A = X·Xᵀ, B = b·A + c·A·A, X = a·X + B·X run on the short side (tall
    matrices are transposed). coefficients: "jordan" (3.4445, -4.7750, 2.0315) every step,
    "polar_express" (per-step tuples of arXiv:2505.16932, see reference.py), or a list of
    (a, b, c) whose last tuple repeats. dtype: the iteration's dtype; default bfloat16 on CUDA,
    float32 on the CPU (the CPU path is the plain-PyTorch reference).

    On CUDA each step runs either the symmetric Gram kernels or plain batched matmuls, whichever
    was faster when the first call of this (shape, dtype) timed one step of each (small matrices,
    where launches dominate, go to cuBLAS): see `ops/muon/op.py`, `path_choices()` and
    `force_path()`.
    """
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim < 2:
        raise ValueError(f"G must have shape (..., m, n), got {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"G must be a floating-point tensor, got {G.dtype}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if dtype is not None and dtype not in _NS_DTYPES:
        raise ValueError(f"dtype must be None or one of {_NS_DTYPES}, got {dtype}")
    reference.resolve_coefficients(coefficients, steps)  # validates before any work
    if G.numel() == 0:
        return G.clone()

    backend = select_backend(G)
    if backend == "torch":
        return reference.newton_schulz(G, steps, coefficients, eps, dtype)
    if backend == "interpret" and dtype == torch.bfloat16:
        raise ValueError("dtype=torch.bfloat16 cannot run under the Triton interpreter (its bf16 dots are wrong); "
                         "use float32 or float16 there")
    default = torch.bfloat16 if backend == "triton" else torch.float32
    return newton_schulz_triton(G, steps, coefficients, eps, dtype or default, measure=backend == "triton")


__all__ = ["PathChoice", "force_path", "newton_schulz", "path_choices"]
