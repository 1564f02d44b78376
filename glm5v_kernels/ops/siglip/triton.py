"""Triton kernels of the siglip family: the sigmoid contrastive loss tile by tile (the math is in
reference.py). The (B1, B2) logits are never stored; every tile is recomputed from the
embeddings with float32 accumulation, as in flash attention.

- forward: one program per block of BLOCK_M images walks the texts in BLOCK_N tiles, computing
  each (BLOCK_M × BLOCK_N) score tile over D in BLOCK_K steps and adding softplus(w) into its
  rows' sums; it writes only the (B1,) per-image losses, which torch sums in a fixed order.
- dx: one program per block of images walks the text tiles, recomputes each score tile, turns
  it into c = ∂ℓ/∂z and adds (t·c) · y_tile into its own float32 rows of dx, BLOCK_D columns at
  a time (dx does not fit in registers at D = 1152). It also writes per-image partial sums
  Σ_j c_ij and Σ_j c_ij·u_ij, from which torch forms the bias and scale gradients.
- dy: one program per block of texts walks the image tiles the same way and adds (t·c)ᵀ · x_tile
  into its own float32 rows of dy.

Each output element has one owning program that adds to it in a fixed order: deterministic, no
atomics, at the price of one recomputation of the scores per gradient kernel. The upstream
gradient (a scalar: the loss is a mean) multiplies the float32 results at the end, so c keeps
its O(1) range when cast to the inputs' dtype for the second product; in float16, c values below
~6e-8 / t (pairs with w < −19, whose gradient is negligible next to the positives') flush to zero.

The temperature t = exp(logit_scale) and the bias are read from (1,) float32 device tensors: no
host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from glm5v_kernels.ops.tiles import add_row_block_product


@triton.jit
def _scores_tile(x, y, r0, c0, B1, B2, D, stride_x, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Float32 u = x[r0:r0+BLOCK_M] · y[c0:c0+BLOCK_N]ᵀ; padded rows and columns hold 0."""
    a_ptr = tl.make_block_ptr(x, shape=(B1, D), strides=(stride_x, 1), offsets=(r0, 0),
                              block_shape=(BLOCK_M, BLOCK_K), order=(1, 0))
    # yᵀ tiles (BLOCK_K, BLOCK_N): y read through swapped strides.
    b_ptr = tl.make_block_ptr(y, shape=(D, B2), strides=(1, stride_y), offsets=(0, c0),
                              block_shape=(BLOCK_K, BLOCK_N), order=(0, 1))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, D, BLOCK_K):
        a = tl.load(a_ptr, boundary_check=(0, 1), padding_option="zero")
        b = tl.load(b_ptr, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(a, b, acc)
        a_ptr = tl.advance(a_ptr, (0, BLOCK_K))
        b_ptr = tl.advance(b_ptr, (BLOCK_K, 0))
    return acc


@triton.jit
def _signed_logits(u, rows, cols, scale, bias, DIAGONAL: tl.constexpr):
    """w = −l·z with z = t·u + b: z at negatives, −z at positives (row == column with DIAGONAL)."""
    z = scale * u + bias
    if DIAGONAL:
        z = tl.where(rows[:, None] == cols[None, :], -z, z)
    return z


@triton.jit
def _dz(w, rows, cols, valid, DIAGONAL: tl.constexpr):
    """c = ∂softplus(w)/∂z = σ(w) at negatives, −σ(w) at positives; 0 outside the valid pairs."""
    s = 1.0 / (1.0 + tl.exp(-w))
    if DIAGONAL:
        s = tl.where(rows[:, None] == cols[None, :], -s, s)
    return tl.where(valid, s, 0.0)


@triton.jit
def siglip_forward_kernel(
    x, y, scale_ptr, bias_ptr, row_loss,
    B1, B2, D, stride_x, stride_y,
    DIAGONAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    r0 = tl.program_id(0) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < B1
    scale = tl.exp(tl.load(scale_ptr))
    bias = tl.load(bias_ptr)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, B2, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        u = _scores_tile(x, y, r0, c0, B1, B2, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K)
        w = _signed_logits(u, rows, cols, scale, bias, DIAGONAL)
        # softplus(w) = max(w, 0) + log1p(e^−|w|); log1p through Kahan's log(1+e)·e/((1+e)−1), which
        # keeps full relative accuracy for the tiny terms that dominate the negatives' sum.
        e = tl.exp(-tl.abs(w))
        one_e = 1.0 + e
        rounded = one_e - 1.0
        log1p = tl.where(rounded == 0.0, e, tl.log(one_e) * (e / tl.where(rounded == 0.0, 1.0, rounded)))
        loss = tl.maximum(w, 0.0) + log1p
        acc += tl.sum(tl.where(row_ok[:, None] & (cols < B2)[None, :], loss, 0.0), 1)
    tl.store(row_loss + rows, acc, mask=row_ok)


@triton.jit
def siglip_dx_kernel(
    x, y, scale_ptr, bias_ptr, dx, sum_c, sum_cu,
    B1, B2, D, stride_x, stride_y, stride_dx,
    DIAGONAL: tl.constexpr, NEED_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r0 = tl.program_id(0) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < B1
    scale = tl.exp(tl.load(scale_ptr))
    bias = tl.load(bias_ptr)
    acc_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_cu = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, B2, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        u = _scores_tile(x, y, r0, c0, B1, B2, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K)
        w = _signed_logits(u, rows, cols, scale, bias, DIAGONAL)
        c = _dz(w, rows, cols, row_ok[:, None] & (cols < B2)[None, :], DIAGONAL)
        acc_c += tl.sum(c, 1)
        acc_cu += tl.sum(c * u, 1)
        if NEED_X:
            ct = (c * scale).to(y.dtype.element_ty)
            add_row_block_product(ct, y, B2, c0, stride_y, dx, B1, r0, stride_dx, D, BLOCK_D)
    tl.store(sum_c + rows, acc_c, mask=row_ok)
    tl.store(sum_cu + rows, acc_cu, mask=row_ok)


@triton.jit
def siglip_dy_kernel(
    x, y, scale_ptr, bias_ptr, dy,
    B1, B2, D, stride_x, stride_y, stride_dy,
    DIAGONAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c0 = tl.program_id(0) * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < B2
    scale = tl.exp(tl.load(scale_ptr))
    bias = tl.load(bias_ptr)
    for r0 in range(0, B1, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        u = _scores_tile(x, y, r0, c0, B1, B2, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_K)
        w = _signed_logits(u, rows, cols, scale, bias, DIAGONAL)
        c = _dz(w, rows, cols, (rows < B1)[:, None] & col_ok[None, :], DIAGONAL)
        ct = tl.trans((c * scale).to(x.dtype.element_ty))
        add_row_block_product(ct, x, B1, r0, stride_x, dy, B2, c0, stride_dy, D, BLOCK_D)


class Config(NamedTuple):
    block_m: int  # images per program (forward, dx) or per step of the image loop (dy)
    block_n: int  # texts per step of the text loop (forward, dx) or per program (dy)
    block_k: int  # reduction tile of the score product (over D)
    block_d: int  # D tile of the gradient products (backward only)
    num_warps: int
    num_stages: int


# Chosen by what compiles for sm_90a without spills (tests/kernels/test_siglip.py checks each and
# prints registers / shared memory): the forward keeps a 128 × 128 float32 score tile over 8 warps
# (a 64-wide reduction tile, or a third pipeline stage with 64 rows, pushes it to 255 registers);
# the backward also holds c and a D tile of the second product, so its tiles are 64 × 64 (128
# texts per tile spill in dy). float32 inputs take half the backward's reduction tile (twice the
# bytes per element). Not yet timed on a GPU.
CONFIGS = {
    "forward-16bit": Config(128, 128, 32, 0, 8, 3),
    "forward-fp32": Config(128, 128, 32, 0, 8, 2),
    "backward-16bit": Config(64, 64, 64, 64, 8, 2),
    "backward-fp32": Config(64, 64, 32, 32, 8, 2),
}


def config_for(kind: str, dtype: torch.dtype) -> Config:
    return CONFIGS[f"{kind}-{'fp32' if dtype == torch.float32 else '16bit'}"]


def siglip_forward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, diagonal: bool,
                   row_loss: torch.Tensor, config: Config | None = None) -> None:
    """x (B1, D), y (B2, D) row-major, scale = logit_scale and bias (1,) float32 -> writes
    row_loss (B1,) float32: Σ_j softplus(w_ij) per image."""
    config = config or config_for("forward", x.dtype)
    b1, d = x.shape
    siglip_forward_kernel[(triton.cdiv(b1, config.block_m),)](
        x, y, scale, bias, row_loss, b1, y.shape[0], d, x.stride(0), y.stride(0),
        DIAGONAL=diagonal, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def siglip_backward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, diagonal: bool,
                    dx: torch.Tensor | None, dy: torch.Tensor | None, sum_c: torch.Tensor, sum_cu: torch.Tensor,
                    config: Config | None = None) -> None:
    """Add t·Σ_j c_ij·y_j into the zero-initialised float32 dx (B1, D) and t·Σ_i c_ij·x_i into dy
    (B2, D) (either may be None: not computed), and write the per-image partial sums Σ_j c_ij and
    Σ_j c_ij·u_ij into sum_c, sum_cu (B1,) float32."""
    config = config or config_for("backward", x.dtype)
    b1, d = x.shape
    b2 = y.shape[0]
    common = dict(DIAGONAL=diagonal, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  BLOCK_D=config.block_d, num_warps=config.num_warps, num_stages=config.num_stages)
    out = dx if dx is not None else sum_c  # an unused pointer when NEED_X is false
    siglip_dx_kernel[(triton.cdiv(b1, config.block_m),)](
        x, y, scale, bias, out, sum_c, sum_cu, b1, b2, d, x.stride(0), y.stride(0), out.stride(0),
        NEED_X=dx is not None, **common)
    if dy is not None:
        siglip_dy_kernel[(triton.cdiv(b2, config.block_n),)](
            x, y, scale, bias, dy, b1, b2, d, x.stride(0), y.stride(0), dy.stride(0), **common)
