"""Symmetric Gram kernel for Newton–Schulz: Out = alpha·X·Xᵀ + beta·C, computing only the tiles
on and above the diagonal and mirroring them, batched over a leading dimension.

Both symmetric products of a Newton–Schulz step use it: A = X·Xᵀ (alpha=1, no C) and
B = b·A + c·A·A, which is c·A·Aᵀ + b·A because A is symmetric. Of T×T output tiles only
T(T+1)/2 are computed; the product with X that follows is a general matrix product and stays
with cuBLAS.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def sym_gram_kernel(
    X, C, Out, tile_rows, tile_cols,
    M, K,
    stride_xb, stride_xm, stride_xk,
    stride_cb, stride_cm, stride_cn,
    stride_ob, stride_om, stride_on,
    alpha, beta,
    HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Program (t, b): output tile (tile_rows[t], tile_cols[t]) of matrix b, with row tile <= col tile.
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ti = tl.load(tile_rows + t)
    tj = tl.load(tile_cols + t)
    x = X + b * stride_xb
    # Row tile ti and column tile tj of X·Xᵀ: tiles of X and of Xᵀ (X read through swapped strides).
    left = tl.make_block_ptr(x, shape=(M, K), strides=(stride_xm, stride_xk), offsets=(ti * BLOCK, 0),
                             block_shape=(BLOCK, BLOCK_K), order=(1, 0))
    right = tl.make_block_ptr(x, shape=(K, M), strides=(stride_xk, stride_xm), offsets=(0, tj * BLOCK),
                              block_shape=(BLOCK_K, BLOCK), order=(0, 1))
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(left, boundary_check=(0, 1), padding_option="zero")
        bt = tl.load(right, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(a, bt, acc, input_precision=INPUT_PRECISION)
        left = tl.advance(left, (0, BLOCK_K))
        right = tl.advance(right, (BLOCK_K, 0))
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    acc = acc * alpha
    inside = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_C:
        c = tl.load(C + b * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn, mask=inside, other=0.0)
        acc += beta * c.to(tl.float32)
    out = acc.to(Out.dtype.element_ty)
    o = Out + b * stride_ob
    tl.store(o + rows[:, None] * stride_om + cols[None, :] * stride_on, out, mask=inside)
    if ti != tj:  # the mirror tile below the diagonal
        tl.store(o + cols[:, None] * stride_om + rows[None, :] * stride_on, tl.trans(out), mask=tl.trans(inside))


class Config(NamedTuple):
    block: int
    block_k: int
    num_warps: int
    num_stages: int


# Square output tiles; 128 for large Gram matrices (two warpgroups of wgmma), 64 when there are few
# tiles. Both compile for sm_90a without spills (tests/kernels/test_muon.py); 128 x 128 with
# BLOCK_K = 64 spills in the polynomial epilogue. Not yet timed on a GPU.
CONFIGS = (Config(128, 32, 8, 3), Config(64, 64, 4, 3))
# float32 (not the default on CUDA): its 4-byte tiles spill in both of the above (the 128 tile's
# polynomial epilogue as tf32, the 64 tile with 4 warps in IEEE); this one is clean in both.
FLOAT32_CONFIG = Config(64, 32, 8, 3)


def config_for(m: int, dtype: torch.dtype) -> Config:
    if dtype == torch.float32:
        return FLOAT32_CONFIG
    return CONFIGS[0] if m > 512 else CONFIGS[1]


def input_precision(dtype: torch.dtype) -> str:
    """float32 products follow torch's matmul setting, as the general product beside them does:
    IEEE unless `torch.backends.cuda.matmul.allow_tf32` is set."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@functools.lru_cache(maxsize=64)
def upper_tiles(num_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row tile, col tile) of every tile on or above the diagonal, as int32 tensors on device."""
    rows, cols = torch.triu_indices(num_tiles, num_tiles)
    return rows.to(device=device, dtype=torch.int32), cols.to(device=device, dtype=torch.int32)


def sym_gram(X: torch.Tensor, alpha: float = 1.0, C: torch.Tensor | None = None, beta: float = 0.0,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """X (batch, m, k) -> alpha·X·Xᵀ + beta·C, (batch, m, m) in X's dtype (fp32 accumulation).

    C (batch, m, m) must be symmetric (only its upper tiles are read). float32 inputs multiply in
    IEEE float32 unless torch allows tf32 matmuls (`input_precision`)."""
    batch, m, k = X.shape
    if out is None:
        out = torch.empty(batch, m, m, device=X.device, dtype=X.dtype)
    config = config_for(m, X.dtype)
    rows, cols = upper_tiles(triton.cdiv(m, config.block), X.device)
    c = C if C is not None else out  # an unused pointer when HAS_C is false
    grid = (rows.numel(), batch)
    sym_gram_kernel[grid](
        X, c, out, rows, cols, m, k,
        X.stride(0), X.stride(1), X.stride(2),
        c.stride(0), c.stride(1), c.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        float(alpha), float(beta),
        HAS_C=C is not None, BLOCK=config.block, BLOCK_K=config.block_k, INPUT_PRECISION=input_precision(X.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
