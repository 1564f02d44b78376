"""Triton kernels of the mtp family: fused linear cross-entropy and the placeholder embedding.

Linear cross-entropy (the math is in reference.py). Rows whose target is ``ignore_index`` are
skipped without a host sync: the caller packs the valid rows first (an index_select by a stable
sort of the validity mask, on the device) and passes ``count``, a device scalar holding how many
rows are valid. Programs past ``count`` exit at once and the row loops stop there, so the work
follows the number of valid rows while the grid keeps its host-known size; every tile is then a
block-pointer load.

- forward: one program per block of valid rows walks the vocabulary in BLOCK_V tiles, computing
  each logits tile (BLOCK_M × BLOCK_V, float32 accumulation over H) and folding it into an online
  log-sum-exp; only (N,) values are written: loss, lse, and whether the target holds the row max.
- dhidden: one program per block of valid rows recomputes the logits tile by tile, turns each
  tile into its logit gradient and adds du · W_tile into its own float32 rows of dhidden.
- dweight (and dbias): one program per vocabulary tile walks the valid rows in blocks, recomputes
  the same tiles and adds duᵀ · hidden into its own float32 rows of dweight.

Each output element has exactly one owning program that adds to it in a fixed order, so the
backward is deterministic with no atomics; the price is one recomputation of the logits per
gradient kernel.

Embedding: a gather kernel (placeholder substitution, optional fused RMSNorm), and a segmented
sum for the weight gradient: positions sorted by the embedding row they read, one program per
segment start (and column block) summing its segment in order, so the placeholder row's many
contributions are reduced deterministically.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from glm5v_kernels.ops.tiles import add_row_block_product


@triton.jit
def _tanh(x):
    # tanh through exp (no tanh in triton.language): exact limits ±1, absolute error ~1e-7 near 0.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logits_tile(hidden, weight, bias, start, v0, n_valid, V, H, stride_h, stride_w, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Float32 (softcapped) logits of rows [start, start + BLOCK_M) against vocabulary rows
    [v0, v0 + BLOCK_V); rows past n_valid read zeros; padded columns are NOT masked."""
    a_ptr = tl.make_block_ptr(hidden, shape=(n_valid, H), strides=(stride_h, 1), offsets=(start, 0),
                              block_shape=(BLOCK_M, BLOCK_K), order=(1, 0))
    # Wᵀ tiles (BLOCK_K, BLOCK_V): the weight read through swapped strides.
    b_ptr = tl.make_block_ptr(weight, shape=(H, V), strides=(1, stride_w), offsets=(0, v0),
                              block_shape=(BLOCK_K, BLOCK_V), order=(0, 1))
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for _ in range(0, H, BLOCK_K):
        a = tl.load(a_ptr, boundary_check=(0, 1), padding_option="zero")
        b = tl.load(b_ptr, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(a, b, acc)
        a_ptr = tl.advance(a_ptr, (0, BLOCK_K))
        b_ptr = tl.advance(b_ptr, (BLOCK_K, 0))
    if HAS_BIAS:
        cols = v0 + tl.arange(0, BLOCK_V)
        acc += tl.load(bias + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _dlogits(z, cols, col_ok, row_ok, tgt, row_lse, grad, V, softcap, label_smoothing, z_loss,
             HAS_SOFTCAP: tl.constexpr):
    """Gradient of the rows' losses with respect to the pre-softcap logits, zero outside the tile."""
    p = tl.where(col_ok[None, :], tl.exp(z - row_lse[:, None]), 0.0)
    p_scale = 1.0 + 2.0 * z_loss * row_lse
    du = p_scale[:, None] * p - label_smoothing / V
    du -= tl.where(cols[None, :] == tgt[:, None], 1.0 - label_smoothing, 0.0)
    if HAS_SOFTCAP:
        capped = z / softcap
        du = du * (1.0 - capped * capped)
    du = du * grad[:, None]
    return tl.where(col_ok[None, :] & row_ok[:, None], du, 0.0)


@triton.jit
def lce_forward_kernel(
    hidden, weight, bias, targets, count,
    loss, lse, correct,
    V, H, stride_h, stride_w,
    softcap, label_smoothing, z_loss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    start = tl.program_id(0) * BLOCK_M
    n_valid = tl.load(count)
    if start < n_valid:
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_valid
        tgt = tl.load(targets + rows, mask=row_ok, other=0).to(tl.int32)
        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        sum_exp = tl.zeros((BLOCK_M,), dtype=tl.float32)
        z_target = tl.zeros((BLOCK_M,), dtype=tl.float32)
        z_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logits_tile(hidden, weight, bias, start, v0, n_valid, V, H, stride_h, stride_w, softcap,
                             HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K)
            z_target += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
            # Padded columns are masked after the softcap: softcap(0) would otherwise be a real logit.
            z_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(z, 1))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
            row_max = new_max
        row_lse = row_max + tl.log(sum_exp)
        row_loss = row_lse - (1.0 - label_smoothing) * z_target - (label_smoothing / V) * z_sum
        row_loss += z_loss * row_lse * row_lse
        # No host check of the targets on the GPU (it would sync): an out-of-range target shows as NaN.
        row_loss = tl.where((tgt < 0) | (tgt >= V), float("nan"), row_loss)
        tl.store(loss + rows, row_loss, mask=row_ok)
        tl.store(lse + rows, row_lse, mask=row_ok)
        tl.store(correct + rows, (z_target >= row_max).to(tl.int8), mask=row_ok)


@triton.jit
def lce_dhidden_kernel(
    hidden, weight, bias, targets, count, lse, row_grad,
    dhidden,
    V, H, stride_h, stride_w, stride_dh,
    softcap, label_smoothing, z_loss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    start = tl.program_id(0) * BLOCK_M
    n_valid = tl.load(count)
    if start < n_valid:
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_valid
        tgt = tl.load(targets + rows, mask=row_ok, other=0).to(tl.int32)
        row_lse = tl.load(lse + rows, mask=row_ok, other=0.0)
        grad = tl.load(row_grad + rows, mask=row_ok, other=0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = _logits_tile(hidden, weight, bias, start, v0, n_valid, V, H, stride_h, stride_w, softcap,
                             HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K)
            du = _dlogits(z, cols, cols < V, row_ok, tgt, row_lse, grad, V, softcap, label_smoothing, z_loss,
                          HAS_SOFTCAP).to(weight.dtype.element_ty)
            add_row_block_product(du, weight, V, v0, stride_w, dhidden, n_valid, start, stride_dh, H, BLOCK_H)


@triton.jit
def lce_dweight_kernel(
    hidden, weight, bias, targets, count, lse, row_grad,
    dweight, dbias,
    V, H, stride_h, stride_w, stride_dw,
    softcap, label_smoothing, z_loss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    v0 = tl.program_id(0) * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    n_valid = tl.load(count)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, n_valid, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_valid
        tgt = tl.load(targets + rows, mask=row_ok, other=0).to(tl.int32)
        row_lse = tl.load(lse + rows, mask=row_ok, other=0.0)
        grad = tl.load(row_grad + rows, mask=row_ok, other=0.0)
        z = _logits_tile(hidden, weight, bias, start, v0, n_valid, V, H, stride_h, stride_w, softcap,
                         HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_V, BLOCK_K)
        du = _dlogits(z, cols, col_ok, row_ok, tgt, row_lse, grad, V, softcap, label_smoothing, z_loss, HAS_SOFTCAP)
        if NEED_BIAS:
            db += tl.sum(du, 0)
        if NEED_WEIGHT:
            du_t = tl.trans(du.to(hidden.dtype.element_ty))
            add_row_block_product(du_t, hidden, n_valid, start, stride_h, dweight, V, v0, stride_dw, H, BLOCK_H)
    if NEED_BIAS:
        tl.store(dbias + cols, db, mask=col_ok)


class Config(NamedTuple):
    block_m: int  # rows per program (forward, dhidden) or per step of the row loop (dweight)
    block_v: int  # vocabulary tile
    block_k: int  # reduction tile of the logits product (over H)
    block_h: int  # H tile of the gradient products (backward only)
    num_warps: int
    num_stages: int


# Chosen by what compiles for sm_90a without spills (tests/kernels/test_mtp.py checks each): the
# forward keeps a 64 × 128 float32 logits tile over 8 warps; the backward also holds the tile's
# gradient and an H tile of the second product, so its vocabulary tile is 64 (16-bit inputs:
# 226 / 255 registers for dhidden / dweight at 8 warps; 128 columns spill). float32 inputs take
# half the reduction tile (twice the bytes per element). Not yet timed on a GPU.
CONFIGS = {
    "forward-16bit": Config(64, 128, 64, 0, 8, 3),
    "forward-fp32": Config(64, 128, 32, 0, 8, 2),
    "backward-16bit": Config(64, 64, 64, 64, 8, 2),
    "backward-fp32": Config(64, 64, 32, 32, 8, 2),
}


def config_for(kind: str, dtype: torch.dtype) -> Config:
    return CONFIGS[f"{kind}-{'fp32' if dtype == torch.float32 else '16bit'}"]


def lce_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                count: torch.Tensor, loss: torch.Tensor, lse: torch.Tensor, correct: torch.Tensor,
                softcap: float | None, label_smoothing: float, z_loss: float, config: Config | None = None) -> None:
    """Rows compacted: the first `count` (a (1,) int32 device tensor) rows of hidden (N, H) and
    targets (N,) are the valid ones. Writes loss (N,) float32, lse (N,) float32 and correct (N,)
    int8 at those rows and leaves the others untouched. hidden and weight (V, H) row-major."""
    config = config or config_for("forward", hidden.dtype)
    n, h = hidden.shape
    lce_forward_kernel[(triton.cdiv(n, config.block_m),)](
        hidden, weight, bias if bias is not None else weight, targets, count,
        loss, lse, correct,
        weight.shape[0], h, hidden.stride(0), weight.stride(0),
        float(softcap or 1.0), float(label_smoothing), float(z_loss),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        BLOCK_M=config.block_m, BLOCK_V=config.block_v, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def lce_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 count: torch.Tensor, lse: torch.Tensor, row_grad: torch.Tensor,
                 dhidden: torch.Tensor | None, dweight: torch.Tensor | None, dbias: torch.Tensor | None,
                 softcap: float | None, label_smoothing: float, z_loss: float, config: Config | None = None) -> None:
    """Add the gradients of Σ row_grad[i]·loss[i] over the first `count` (compacted) rows into the
    zero-initialised float32 buffers dhidden (N, H) (compacted rows), dweight (V, H) and dbias (V,);
    any may be None (not computed)."""
    config = config or config_for("backward", hidden.dtype)
    n, h = hidden.shape
    v = weight.shape[0]
    common = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_M=config.block_m,
                  BLOCK_V=config.block_v, BLOCK_K=config.block_k, BLOCK_H=config.block_h,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    scalars = (float(softcap or 1.0), float(label_smoothing), float(z_loss))
    b = bias if bias is not None else weight
    if dhidden is not None:
        lce_dhidden_kernel[(triton.cdiv(n, config.block_m),)](
            hidden, weight, b, targets, count, lse, row_grad, dhidden,
            v, h, hidden.stride(0), weight.stride(0), dhidden.stride(0), *scalars, **common)
    if dweight is not None or dbias is not None:
        dw = dweight if dweight is not None else weight  # an unused pointer when NEED_WEIGHT is false
        lce_dweight_kernel[(triton.cdiv(v, config.block_v),)](
            hidden, weight, b, targets, count, lse, row_grad, dw, dbias if dbias is not None else lse,
            v, h, hidden.stride(0), weight.stride(0), dw.stride(0), *scalars,
            NEED_WEIGHT=dweight is not None, NEED_BIAS=dbias is not None, **common)


# -- embedding ---------------------------------------------------------------------------------------


@triton.jit
def embed_forward_kernel(
    ids, is_visual, weight, norm_weight, out,
    n_tokens, V, D, placeholder_id, stride_w, stride_o, eps,
    HAS_NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n_tokens
    visual = tl.load(is_visual + t, mask=t_ok, other=0) != 0
    row = tl.where(visual, placeholder_id, tl.load(ids + t, mask=t_ok, other=0)).to(tl.int64)
    # Ids are not checked on the host for GPU tensors (a sync): an out-of-range id gives a NaN row.
    bad = (row < 0) | (row >= V)
    row = tl.where(bad, 0, row)
    if HAS_NORM:
        sum_sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(weight + row[:, None] * stride_w + ds[None, :], mask=t_ok[:, None] & (ds < D)[None, :],
                        other=0.0).to(tl.float32)
            sum_sq += tl.sum(x * x, 1)
        inv_rms = 1.0 / tl.sqrt(sum_sq / D + eps)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        ok = t_ok[:, None] & (ds < D)[None, :]
        x = tl.load(weight + row[:, None] * stride_w + ds[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_NORM:
            x = x * inv_rms[:, None] * tl.load(norm_weight + ds, mask=ds < D, other=0.0).to(tl.float32)[None, :]
        x = tl.where(bad[:, None], float("nan"), x)
        tl.store(out + t[:, None] * stride_o + ds[None, :], x.to(out.dtype.element_ty), mask=ok)


@triton.jit
def segment_sum_kernel(
    sorted_rows, perm, segment_end, grad, dweight,
    D, stride_g, stride_dw,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (p, d): if sorted position p starts a segment of equal rows, sum the gradient rows of
    # the segment's positions (in sorted order) for columns block d into dweight[row].
    p = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    row = tl.load(sorted_rows + p)
    previous = tl.load(sorted_rows + p - 1, mask=p > 0, other=-1)
    if row != previous:
        end = tl.load(segment_end + p)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for q0 in range(p, end, BLOCK_R):
            q = q0 + tl.arange(0, BLOCK_R)
            q_ok = q < end
            src = tl.load(perm + q, mask=q_ok, other=0).to(tl.int64)
            g = tl.load(grad + src[:, None] * stride_g + ds[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(g.to(tl.float32), 0)
        tl.store(dweight + row.to(tl.int64) * stride_dw + ds, acc.to(dweight.dtype.element_ty), mask=d_ok)


EMBED_BLOCK_T = 16
EMBED_BLOCK_D = 128
SEGMENT_BLOCK_R = 32
SEGMENT_BLOCK_D = 128
EMBED_NUM_WARPS = 4


def embed_forward(ids: torch.Tensor, is_visual: torch.Tensor, weight: torch.Tensor, placeholder_id: int,
                  norm_weight: torch.Tensor | None, eps: float, out: torch.Tensor) -> None:
    """ids (T,) int, is_visual (T,) uint8, weight (V, D) -> out (T, D): the gathered (normalised) rows."""
    n_tokens, d = out.shape
    grid = (triton.cdiv(n_tokens, EMBED_BLOCK_T),)
    embed_forward_kernel[grid](
        ids, is_visual, weight, norm_weight if norm_weight is not None else weight, out,
        n_tokens, weight.shape[0], d, int(placeholder_id), weight.stride(0), out.stride(0), float(eps),
        HAS_NORM=norm_weight is not None, BLOCK_T=EMBED_BLOCK_T, BLOCK_D=EMBED_BLOCK_D, num_warps=EMBED_NUM_WARPS,
    )


def segment_sum(rows: torch.Tensor, grad: torch.Tensor, dweight: torch.Tensor) -> None:
    """dweight[r] = Σ grad[i] over the positions i with rows[i] == r, for every r in rows, summed in
    float32 in position order (deterministic); rows never read are left untouched.

    rows (T,) int64, grad (T, D), dweight (V, D)."""
    n_tokens, d = grad.shape
    if n_tokens == 0:
        return
    sorted_rows, perm = torch.sort(rows, stable=True)
    segment_end = torch.searchsorted(sorted_rows, sorted_rows, right=True)
    grid = (n_tokens, triton.cdiv(d, SEGMENT_BLOCK_D))
    segment_sum_kernel[grid](
        sorted_rows, perm, segment_end, grad, dweight, d, grad.stride(0), dweight.stride(0),
        BLOCK_R=SEGMENT_BLOCK_R, BLOCK_D=SEGMENT_BLOCK_D, num_warps=EMBED_NUM_WARPS,
    )
