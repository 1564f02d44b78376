"""Triton kernels of the attention family and their launchers (no autograd here).

Two kernel groups:

- the q/k transform: per-head RMSNorm or LayerNorm, then rotary, in one pass over a (T, H, D)
  tensor (forward), and its backward with the norm-weight gradients reduced per block (no
  atomics, so deterministic);
- block-diagonal flash attention over packed sequences: forward (online softmax in base 2,
  natural-log lse out), and an atomic-free backward (one kernel owns a key block and loops over
  the query blocks and the query heads of its group for dk and dv, one owns a query block for dq),
  so gradients are bit-identical run to run.

Head dims are split into two power-of-two chunks (64 + 16 for 80, 64 + 32 for 96, 64 + 16 masked
for 72): every dot is issued per chunk, so a head dim is padded to the next multiple of 16 rather
than to the next power of two.

Programs are scheduled from a work list of (sequence, block start) pairs (`varlen_plan`), or,
without one, on a (max_seqlen blocks, heads, sequences) grid whose empty programs exit at once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
NORM_KINDS = {None: 0, "rms": 1, "layer": 2}


# -- the q/k transform: norm then rotary --------------------------------------------------------------


@triton.jit
def _rotary_columns(cols, rot_half, INTERLEAVED: tl.constexpr):
    """Per channel: its rotary partner, the table column of its pair, the sign of the partner term
    (y = x·cos + sign·x_partner·sin) and whether it is rotated at all."""
    rotated = cols < 2 * rot_half
    if INTERLEAVED:
        partner = cols ^ 1
        table_col = cols // 2
        sign = tl.where(cols % 2 == 0, -1.0, 1.0)
    else:
        first = cols < rot_half
        partner = tl.where(first, cols + rot_half, cols - rot_half)
        table_col = tl.where(first, cols, cols - rot_half)
        sign = tl.where(first, -1.0, 1.0)
    return tl.where(rotated, partner, cols), tl.where(rotated, table_col, 0), sign, rotated


@triton.jit
def _normalize(x, cols, col_ok, mean, rstd, W, B, NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """(x − mean)·rstd·W[cols] + B[cols] for a tile whose channels are `cols`; x itself when NORM == 0."""
    if NORM == 0:
        return x
    u = (x - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        u = u * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        u = u + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return u


@triton.jit
def _row_stats(x_a, ok_a, x_b, ok_b, D, eps, NORM: tl.constexpr, HAS_B: tl.constexpr):
    """Mean (zero for RMSNorm) and 1/sqrt(var + eps) of each row over the head dim, from one or two
    float32 channel chunks that hold zeros outside the head dim; two-pass for accuracy."""
    mean = tl.sum(x_a, axis=1) * 0.0
    if NORM == 2:
        total = tl.sum(x_a, axis=1)
        if HAS_B:
            total += tl.sum(x_b, axis=1)
        mean = total / D
    centred = tl.where(ok_a[None, :], x_a - mean[:, None], 0.0)
    squares = tl.sum(centred * centred, axis=1)
    if HAS_B:
        centred = tl.where(ok_b[None, :], x_b - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    return mean, 1.0 / tl.sqrt(squares / D + eps)


@triton.jit
def _normed_rotated(x, x_rows, cos_rows, sin_rows, cols, col_ok, row_ok, mean, rstd, W, B, rot_half,
                    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Norm then rotary of the float32 tile x = x_rows[:, cols]. The rotary partners of `cols` are
    re-read from x_rows (pointers to each row's first channel), so a tile may hold any channel
    subset; cos_rows / sin_rows point at each row's table entries."""
    y = _normalize(x, cols, col_ok, mean, rstd, W, B, NORM, HAS_WEIGHT, HAS_BIAS)
    if ROTARY:
        partner, table_col, sign, rotated = _rotary_columns(cols, rot_half, INTERLEAVED)
        xp = tl.load(x_rows + partner[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        yp = _normalize(xp, partner, col_ok, mean, rstd, W, B, NORM, HAS_WEIGHT, HAS_BIAS)
        table_mask = row_ok[:, None] & rotated[None, :]
        c = tl.load(cos_rows + table_col[None, :], mask=table_mask, other=1.0).to(tl.float32)
        s = tl.load(sin_rows + table_col[None, :], mask=table_mask, other=0.0).to(tl.float32)
        y = y * c + sign[None, :] * yp * s
    return y


@triton.jit
def qk_transform_fwd_kernel(
    X, Y, Stats, W, B, Cos, Sin,
    T, D, rot_half,
    stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, stride_st,
    eps,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (t, h): tokens [t·BLOCK_T, (t+1)·BLOCK_T) of head h. Stats (2, H, T): mean, rstd.
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # head offsets times T can pass 2**31
    num_heads = tl.num_programs(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tokens = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    x_rows = X + tokens[:, None] * stride_xt + h * stride_xh
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.zeros((BLOCK_T,), dtype=tl.float32)
    rstd = mean
    if NORM != 0:
        mean, rstd = _row_stats(x, col_ok, x, col_ok, D, eps, NORM, False)
        tl.store(Stats + h * T + rows, mean, mask=row_ok)
        tl.store(Stats + (num_heads + h) * T + rows, rstd, mask=row_ok)
    y = _normed_rotated(x, x_rows, Cos + tokens[:, None] * stride_ct, Sin + tokens[:, None] * stride_st, cols, col_ok,
                        row_ok, mean, rstd, W, B, rot_half, NORM, HAS_WEIGHT, HAS_BIAS, ROTARY, INTERLEAVED)
    y_rows = Y + tokens[:, None] * stride_yt + h * stride_yh
    tl.store(y_rows + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def qk_transform_bwd_kernel(
    DY, X, DX, Stats, W, Cos, Sin, DW, DB,
    T, D, rot_half,
    stride_dyt, stride_dyh, stride_xt, stride_xh, stride_dxt, stride_dxh, stride_ct, stride_st,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (t, h) writes dx for its tokens and its partial sums of dweight / dbias into row
    # (t, h) of DW / DB (num_t_blocks, H, BLOCK_D); the launcher sums the rows in a fixed order.
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    dy_rows = DY + rows.to(tl.int64)[:, None] * stride_dyt + h * stride_dyh
    du = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROTARY:
        # y_j = u_j·c_j + sign_j·u_p(j)·s_j, and p is an involution sharing the table column with j,
        # so du_j = dy_j·c_j + sign_p(j)·dy_p(j)·s_j = dy_j·c_j − sign_j·dy_p(j)·s_j.
        partner, table_col, sign, rotated = _rotary_columns(cols, rot_half, INTERLEAVED)
        dyp = tl.load(dy_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        table_mask = row_ok[:, None] & rotated[None, :]
        c = tl.load(Cos + rows.to(tl.int64)[:, None] * stride_ct + table_col[None, :], mask=table_mask, other=1.0)
        s = tl.load(Sin + rows.to(tl.int64)[:, None] * stride_st + table_col[None, :], mask=table_mask, other=0.0)
        du = du * c.to(tl.float32) - sign[None, :] * dyp * s.to(tl.float32)
    dx = du
    if NORM != 0:
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xt + h * stride_xh + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        mean = tl.load(Stats + h * T + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Stats + (num_heads + h) * T + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        partial = (pid_t * num_heads + h) * BLOCK_D + cols
        g = du
        if HAS_WEIGHT:
            tl.store(DW + partial, tl.sum(du * xhat, axis=0))
            g = du * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            tl.store(DB + partial, tl.sum(du, axis=0))
        dx = g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None]
        if NORM == 2:
            dx = dx - (tl.sum(g, axis=1) / D)[:, None]
        dx = dx * rstd[:, None]
    dx_rows = DX + rows.to(tl.int64)[:, None] * stride_dxt + h * stride_dxh
    tl.store(dx_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# -- attention ------------------------------------------------------------------------------------


@triton.jit
def _block_of(cu_seqlens, work, USE_WORK: tl.constexpr, BLOCK: tl.constexpr):
    """(first token of the sequence, its length, block start within it) of this program."""
    if USE_WORK:
        seq = tl.load(work + 2 * tl.program_id(0))
        block_start = tl.load(work + 2 * tl.program_id(0) + 1)
    else:
        seq = tl.program_id(2)
        block_start = tl.program_id(0) * BLOCK
    start = tl.load(cu_seqlens + seq)
    length = tl.load(cu_seqlens + seq + 1) - start
    return start.to(tl.int64), length, block_start


@triton.jit
def _chunk_pointers(base, row0, length, stride_t, col0, head_dim, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """Pointers to rows [row0, row0 + ROWS) and channels [col0, col0 + WIDTH) of one sequence, and
    the mask of those inside its (length, head_dim) slice."""
    rows = row0 + tl.arange(0, ROWS)
    cols = col0 + tl.arange(0, WIDTH)
    mask = (rows < length)[:, None] & (cols < head_dim)[None, :]
    return base + rows[:, None] * stride_t + cols[None, :], mask


@triton.jit
def _load_chunk(base, row0, length, stride_t, col0, head_dim, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """(ROWS, WIDTH) tile, zero outside the sequence and the head dim."""
    ptrs, mask = _chunk_pointers(base, row0, length, stride_t, col0, head_dim, ROWS, WIDTH)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_chunk(base, tile, row0, length, stride_t, col0, head_dim, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    ptrs, mask = _chunk_pointers(base, row0, length, stride_t, col0, head_dim, ROWS, WIDTH)
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


# A (ROWS, head_dim) tile is held as two chunks: channels [0, DA) and [DA, DA + DB). With DB == 0
# the second chunk is a (ROWS, 16) zero placeholder that no instruction reads.


@triton.jit
def _load_rows(base, row0, length, stride_t, head_dim, ROWS: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    a = _load_chunk(base, row0, length, stride_t, 0, head_dim, ROWS, DA)
    if DB > 0:
        b = _load_chunk(base, row0, length, stride_t, DA, head_dim, ROWS, DB)
    else:
        b = tl.zeros((ROWS, 16), dtype=base.dtype.element_ty)
    return a, b


@triton.jit
def _zero_rows(ROWS: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr):
    """float32 accumulators for a two-chunk tile."""
    return tl.zeros((ROWS, DA), dtype=tl.float32), tl.zeros((ROWS, DB if DB > 0 else 16), dtype=tl.float32)


@triton.jit
def _store_rows(base, a, b, row0, length, stride_t, head_dim, ROWS: tl.constexpr, DA: tl.constexpr,
                DB: tl.constexpr):
    _store_chunk(base, a, row0, length, stride_t, 0, head_dim, ROWS, DA)
    if DB > 0:
        _store_chunk(base, b, row0, length, stride_t, DA, head_dim, ROWS, DB)


@triton.jit
def _dot_t(x_a, x_b, y_a, y_b, DB: tl.constexpr):
    """x · yᵀ over both channel chunks: (R, D) · (S, D)ᵀ -> (R, S) float32."""
    out = tl.dot(x_a, tl.trans(y_a))
    if DB > 0:
        out = tl.dot(x_b, tl.trans(y_b), out)
    return out


@triton.jit
def _dot_acc(p, y_a, y_b, acc_a, acc_b, DB: tl.constexpr):
    """(acc_a + p · y_a, acc_b + p · y_b): (R, S) · (S, D) into two-chunk accumulators."""
    acc_a = tl.dot(p, y_a, acc_a)
    if DB > 0:
        acc_b = tl.dot(p, y_b, acc_b)
    return acc_a, acc_b


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, LSE, cu_seqlens, work, W, B, Cos, Sin,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_ct, stride_st,
    total_tokens, head_dim, group, qk_scale, rot_half, eps,
    CAUSAL: tl.constexpr, USE_WORK: tl.constexpr,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
):
    # qk_scale = softmax_scale·log2(e): scores live in base 2; lse (H, T) is stored in natural log.
    # Q is raw: its norm (weights W, B) and rotary (tables Cos, Sin) are applied here, once per
    # program as the tile is loaded. K arrives already transformed: each key tile is read by every
    # query block of its sequence, so transforming it here would repeat the work that many times.
    start, length, m_start = _block_of(cu_seqlens, work, USE_WORK, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    if m_start < length:
        kv_h = h // group
        rows = m_start + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        q_base = Q + (start * stride_qt + h * stride_qh)
        k_base = K + (start * stride_kt + kv_h * stride_kh)
        v_base = V + (start * stride_vt + kv_h * stride_vh)
        q_a, q_b = _load_rows(q_base, m_start, length, stride_qt, head_dim, BLOCK_M, DA, DB)
        acc_a, acc_b = _zero_rows(BLOCK_M, DA, DB)
        if NORM != 0 or ROTARY:
            tokens = start + rows
            q_rows = Q + tokens[:, None] * stride_qt + h * stride_qh
            cos_rows = Cos + tokens[:, None] * stride_ct
            sin_rows = Sin + tokens[:, None] * stride_st
            cols_a = tl.arange(0, DA)
            ok_a = cols_a < head_dim
            x_a = q_a.to(tl.float32)
            x_b, ok_b = x_a, ok_a
            if DB > 0:
                cols_b = DA + tl.arange(0, DB)
                ok_b = cols_b < head_dim
                x_b = q_b.to(tl.float32)
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            rstd = mean
            if NORM != 0:
                mean, rstd = _row_stats(x_a, ok_a, x_b, ok_b, head_dim, eps, NORM, DB > 0)
            q_a = _normed_rotated(x_a, q_rows, cos_rows, sin_rows, cols_a, ok_a, row_ok, mean, rstd, W, B, rot_half,
                                  NORM, HAS_WEIGHT, HAS_BIAS, ROTARY, INTERLEAVED).to(Q.dtype.element_ty)
            if DB > 0:
                q_b = _normed_rotated(x_b, q_rows, cos_rows, sin_rows, cols_b, ok_b, row_ok, mean, rstd, W, B,
                                      rot_half, NORM, HAS_WEIGHT, HAS_BIAS, ROTARY, INTERLEAVED).to(Q.dtype.element_ty)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        n_end = length
        if CAUSAL:
            n_end = tl.minimum(length, m_start + BLOCK_M)
        for n_start in range(0, n_end, BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < length
            k_a, k_b = _load_rows(k_base, n_start, length, stride_kt, head_dim, BLOCK_N, DA, DB)
            s = _dot_t(q_a, q_b, k_a, k_b, DB)
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None])
            s = tl.where(valid, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(V.dtype.element_ty)
            v_a, v_b = _load_rows(v_base, n_start, length, stride_vt, head_dim, BLOCK_N, DA, DB)
            acc_a, acc_b = _dot_acc(p, v_a, v_b, acc_a * alpha[:, None], acc_b * alpha[:, None], DB)
            m_i = m_new
        o_base = Out + (start * stride_ot + h * stride_oh)
        _store_rows(o_base, acc_a / l_i[:, None], acc_b / l_i[:, None], m_start, length, stride_ot, head_dim,
                    BLOCK_M, DA, DB)
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
        tl.store(LSE + h * total_tokens + start + rows, lse, mask=row_ok)


@triton.jit
def attn_bwd_delta_kernel(
    Out, DO, Delta, T, head_dim,
    stride_ot, stride_oh, stride_dot, stride_doh,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Delta (H, T) = rowsum(dO ∘ O), the softmax-backward correction term.
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < head_dim)[None, :]
    o = tl.load(Out + rows.to(tl.int64)[:, None] * stride_ot + h * stride_oh + cols[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows.to(tl.int64)[:, None] * stride_dot + h * stride_doh + cols[None, :], mask=mask,
                 other=0.0)
    tl.store(Delta + h * T + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=row_ok)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, cu_seqlens, work,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_tokens, head_dim, group, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, USE_WORK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
):
    # Program (key block, kv head): sums over the query blocks of its sequence and over the `group`
    # query heads that share the kv head, in a fixed order. Tiles are kept transposed (keys × queries).
    start, length, n_start = _block_of(cu_seqlens, work, USE_WORK, BLOCK_N)
    kv_h = tl.program_id(1).to(tl.int64)
    if n_start < length:
        cols = n_start + tl.arange(0, BLOCK_N)
        col_ok = cols < length
        k_base = K + (start * stride_kt + kv_h * stride_kh)
        v_base = V + (start * stride_vt + kv_h * stride_vh)
        k_a, k_b = _load_rows(k_base, n_start, length, stride_kt, head_dim, BLOCK_N, DA, DB)
        v_a, v_b = _load_rows(v_base, n_start, length, stride_vt, head_dim, BLOCK_N, DA, DB)
        dk_a, dk_b = _zero_rows(BLOCK_N, DA, DB)
        dv_a, dv_b = _zero_rows(BLOCK_N, DA, DB)
        m_lo = 0
        if CAUSAL:
            m_lo = (n_start // BLOCK_M) * BLOCK_M
        for g in range(0, group):
            h = kv_h * group + g
            q_base = Q + (start * stride_qt + h * stride_qh)
            do_base = DO + (start * stride_dot + h * stride_doh)
            stats = h * total_tokens + start
            for m_start in range(m_lo, length, BLOCK_M):
                rows = m_start + tl.arange(0, BLOCK_M)
                row_ok = rows < length
                q_a, q_b = _load_rows(q_base, m_start, length, stride_qt, head_dim, BLOCK_M, DA, DB)
                do_a, do_b = _load_rows(do_base, m_start, length, stride_dot, head_dim, BLOCK_M, DA, DB)
                s_t = _dot_t(k_a, k_b, q_a, q_b, DB)
                dp_t = _dot_t(v_a, v_b, do_a, do_b, DB)
                lse2 = tl.load(LSE + stats + rows, mask=row_ok, other=0.0) * 1.4426950408889634
                delta = tl.load(Delta + stats + rows, mask=row_ok, other=0.0)
                valid = col_ok[:, None] & row_ok[None, :]
                if CAUSAL:
                    valid = valid & (cols[:, None] <= rows[None, :])
                p_t = tl.where(valid, tl.math.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
                ds_t = (p_t * (dp_t - delta[None, :])).to(Q.dtype.element_ty)
                p_t = p_t.to(DO.dtype.element_ty)
                dv_a, dv_b = _dot_acc(p_t, do_a, do_b, dv_a, dv_b, DB)
                dk_a, dk_b = _dot_acc(ds_t, q_a, q_b, dk_a, dk_b, DB)
        dk_base = DK + (start * stride_dkt + kv_h * stride_dkh)
        dv_base = DV + (start * stride_dvt + kv_h * stride_dvh)
        _store_rows(dk_base, dk_a * softmax_scale, dk_b * softmax_scale, n_start, length, stride_dkt, head_dim,
                    BLOCK_N, DA, DB)
        _store_rows(dv_base, dv_a, dv_b, n_start, length, stride_dvt, head_dim, BLOCK_N, DA, DB)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, cu_seqlens, work,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total_tokens, head_dim, group, qk_scale, softmax_scale,
    CAUSAL: tl.constexpr, USE_WORK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
):
    # Program (query block, query head): dq = scale · Σ_keys dS·K over its sequence's key blocks.
    start, length, m_start = _block_of(cu_seqlens, work, USE_WORK, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    if m_start < length:
        kv_h = h // group
        rows = m_start + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        q_base = Q + (start * stride_qt + h * stride_qh)
        do_base = DO + (start * stride_dot + h * stride_doh)
        k_base = K + (start * stride_kt + kv_h * stride_kh)
        v_base = V + (start * stride_vt + kv_h * stride_vh)
        q_a, q_b = _load_rows(q_base, m_start, length, stride_qt, head_dim, BLOCK_M, DA, DB)
        do_a, do_b = _load_rows(do_base, m_start, length, stride_dot, head_dim, BLOCK_M, DA, DB)
        dq_a, dq_b = _zero_rows(BLOCK_M, DA, DB)
        stats = h * total_tokens + start
        lse2 = tl.load(LSE + stats + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + stats + rows, mask=row_ok, other=0.0)
        n_end = length
        if CAUSAL:
            n_end = tl.minimum(length, m_start + BLOCK_M)
        for n_start in range(0, n_end, BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < length
            k_a, k_b = _load_rows(k_base, n_start, length, stride_kt, head_dim, BLOCK_N, DA, DB)
            v_a, v_b = _load_rows(v_base, n_start, length, stride_vt, head_dim, BLOCK_N, DA, DB)
            s = _dot_t(q_a, q_b, k_a, k_b, DB)
            dp = _dot_t(do_a, do_b, v_a, v_b, DB)
            valid = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None])
            p = tl.where(valid, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
            ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
            dq_a, dq_b = _dot_acc(ds, k_a, k_b, dq_a, dq_b, DB)
        dq_base = DQ + (start * stride_dqt + h * stride_dqh)
        _store_rows(dq_base, dq_a * softmax_scale, dq_b * softmax_scale, m_start, length, stride_dqt, head_dim,
                    BLOCK_M, DA, DB)


# -- launchers ------------------------------------------------------------------------------------


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def fwd_config(head_dim: int, fused_q: bool) -> Config:
    """The forward's configuration: `fused_q` when q's norm or rotary runs in its prologue."""
    if fused_q:
        return FWD_TRANSFORM_CONFIG
    return FWD_CONFIG if head_dim <= 96 else FWD_CONFIG_D128


def dkdv_config(head_dim: int) -> Config:
    """The dK/dV kernel's configuration: unpipelined above D = 96 (see DKDV_CONFIG_D128)."""
    return DKDV_CONFIG if head_dim <= 96 else DKDV_CONFIG_D128


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(DA, DB): the largest power of two <= head_dim, and the rest rounded up to a power of two
    (0 when none): 64 -> (64, 0), 72 -> (64, 16), 80 -> (64, 16), 96 -> (64, 32), 128 -> (128, 0)."""
    da = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - da
    return da, (max(16, triton.next_power_of_2(rest)) if rest else 0)


# Configurations: each compiles for sm_90a without spills at head dims 64 to 128, with and without
# a plan, for odd shapes and for the aligned launches the runtime specialises (pipelined loads;
# tests/kernels/test_attention.py). 4 warps spill at D >= 96; 128-key backward blocks spill at
# D = 128; the plain forward spills (4 bytes) with 64-key tiles at D = 128 (causal, no plan), so it
# takes 32 there; a forward that normalises and rotates q in its prologue holds more live
# registers: 128-query blocks spill there from D = 80, so it takes 64. The dK/dV kernel with
# grouped queries spills 28-52 bytes at D = 128 once aligned loads are pipelined in two stages (and
# with 32- or 16-query steps): one stage there. Not yet timed on a GPU.
FWD_CONFIG = Config(128, 64, 8, 3)
FWD_CONFIG_D128 = Config(128, 32, 8, 3)
FWD_TRANSFORM_CONFIG = Config(64, 64, 8, 3)
DKDV_CONFIG = Config(64, 64, 8, 2)
DKDV_CONFIG_D128 = Config(64, 64, 8, 1)
DQ_CONFIG = Config(64, 64, 8, 2)
# The memory-bound passes (transform, its backward, delta): 16 tokens over 8 warps keep them near
# 80 registers at D = 128 for occupancy; 32 tokens over 4 warps reached 255.
TRANSFORM_BLOCK_T = 16
TRANSFORM_WARPS = 8


class Transform(NamedTuple):
    """What happens to q or k before attention: norm ("rms", "layer" or None) with optional (D,)
    weight and bias, then rotary with (T, rot_dim // 2) tables (None for none)."""

    norm: str | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 1e-6
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    interleaved: bool = False

    @property
    def is_identity(self) -> bool:
        return self.norm is None and self.cos is None

    def kernel_args(self, fallback: torch.Tensor) -> tuple:
        """Pointer and scalar arguments shared by the kernels (W, B, Cos, Sin, the table strides,
        rot_half), with `fallback` for absent tensors, and the matching constexpr switches."""
        has_weight = self.norm is not None and self.weight is not None
        has_bias = self.norm is not None and self.bias is not None
        rotary = self.cos is not None
        tensors = (self.weight if has_weight else fallback, self.bias if has_bias else fallback,
                   self.cos if rotary else fallback, self.sin if rotary else fallback)
        scalars = (self.cos.stride(0) if rotary else 0, self.sin.stride(0) if rotary else 0,
                   self.cos.shape[1] if rotary else 0)
        switches = dict(NORM=NORM_KINDS[self.norm], HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, ROTARY=rotary,
                        INTERLEAVED=bool(self.interleaved))
        return tensors, scalars, switches


def transform_qk(x: torch.Tensor, transform: Transform):
    """x: (T, H, D) -> (y (T, H, D) in x's dtype, stats (2, H, T) float32: mean and rstd)."""
    T, H, D = x.shape
    y = torch.empty(T, H, D, device=x.device, dtype=x.dtype)
    stats = torch.zeros(2, H, T, device=x.device, dtype=torch.float32)
    (w, b, cos, sin), (stride_ct, stride_st, rot_half), switches = transform.kernel_args(stats)
    qk_transform_fwd_kernel[(triton.cdiv(T, TRANSFORM_BLOCK_T), H)](
        x, y, stats, w, b, cos, sin, T, D, rot_half,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), stride_ct, stride_st, float(transform.eps),
        **switches, BLOCK_T=TRANSFORM_BLOCK_T, BLOCK_D=triton.next_power_of_2(D), num_warps=TRANSFORM_WARPS,
    )
    return y, stats


def transform_qk_backward(dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, transform: Transform):
    """dy, x: (T, H, D) -> (dx in x's dtype, dweight or None, dbias or None), the parameter
    gradients in float32 summed over tokens and heads in a fixed order."""
    T, H, D = x.shape
    block_d = triton.next_power_of_2(D)
    num_blocks = triton.cdiv(T, TRANSFORM_BLOCK_T)
    dx = torch.empty_like(x)
    (w, _, cos, sin), (stride_ct, stride_st, rot_half), switches = transform.kernel_args(stats)
    partials = {name: torch.empty(num_blocks, H, block_d, device=x.device, dtype=torch.float32)
                for name in ("HAS_WEIGHT", "HAS_BIAS") if switches[name]}
    qk_transform_bwd_kernel[(num_blocks, H)](
        dy, x, dx, stats, w, cos, sin, partials.get("HAS_WEIGHT", stats), partials.get("HAS_BIAS", stats),
        T, D, rot_half,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dx.stride(0), dx.stride(1), stride_ct, stride_st,
        **switches, BLOCK_T=TRANSFORM_BLOCK_T, BLOCK_D=block_d, num_warps=TRANSFORM_WARPS,
    )
    reduced = {name: p.sum(dim=(0, 1))[:D] for name, p in partials.items()}
    return dx, reduced.get("HAS_WEIGHT"), reduced.get("HAS_BIAS")


def _grid(work: torch.Tensor | None, heads: int, max_seqlen: int, num_seqs: int, block: int):
    if work is not None:
        return (work.shape[0], heads), True
    return (triton.cdiv(max_seqlen, block), heads, num_seqs), False


def attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, work_for, q_transform=None):
    """q: (T, Hq, D), k, v: (T, Hkv, D), last dim contiguous -> (out (T, Hq, D), lse (Hq, T) float32).

    q_transform is applied to q inside the kernel; k must already be transformed. work_for(block)
    returns the plan's int32 (n, 2) work list for that block size, or None."""
    T, Hq, D = q.shape
    da, db = head_dim_chunks(D)
    q_transform = q_transform or Transform()
    config = fwd_config(D, fused_q=not q_transform.is_identity)
    out = torch.empty_like(q)
    lse = torch.empty(Hq, T, device=q.device, dtype=torch.float32)
    work = work_for(config.block_m)
    grid, use_work = _grid(work, Hq, max_seqlen, cu_seqlens.numel() - 1, config.block_m)
    (w, b, cos, sin), (stride_ct, stride_st, rot_half), switches = q_transform.kernel_args(lse)
    attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, work if use_work else cu_seqlens, w, b, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        stride_ct, stride_st, T, D, Hq // k.shape[1], softmax_scale * LOG2E, rot_half, float(q_transform.eps),
        CAUSAL=causal, USE_WORK=use_work, **switches,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, DA=da, DB=db,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, work_for,
                       grad_dtype=None):
    """Gradients (dq, dk, dv) of the attention alone; dq and dk in grad_dtype (default: q's dtype;
    float32 when a transform backward follows, so its input is not rounded twice), dv in v's."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    da, db = head_dim_chunks(D)
    num_seqs = cu_seqlens.numel() - 1
    delta = torch.empty(Hq, T, device=q.device, dtype=torch.float32)
    attn_bwd_delta_kernel[(triton.cdiv(T, TRANSFORM_BLOCK_T), Hq)](
        out, do, delta, T, D, out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        BLOCK_T=TRANSFORM_BLOCK_T, BLOCK_D=triton.next_power_of_2(D), num_warps=TRANSFORM_WARPS,
    )
    dq, dk, dv = torch.empty_like(q, dtype=grad_dtype), torch.empty_like(k, dtype=grad_dtype), torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))

    config = dkdv_config(D)
    work = work_for(config.block_n)
    grid, use_work = _grid(work, Hkv, max_seqlen, num_seqs, config.block_n)
    attn_bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, work if use_work else cu_seqlens,
        *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        T, D, Hq // Hkv, softmax_scale * LOG2E, softmax_scale,
        CAUSAL=causal, USE_WORK=use_work, BLOCK_M=config.block_m, BLOCK_N=config.block_n, DA=da, DB=db,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )

    config = DQ_CONFIG
    work = work_for(config.block_m)
    grid, use_work = _grid(work, Hq, max_seqlen, num_seqs, config.block_m)
    attn_bwd_dq_kernel[grid](
        q, k, v, do, lse, delta, dq, cu_seqlens, work if use_work else cu_seqlens,
        *strides, dq.stride(0), dq.stride(1),
        T, D, Hq // Hkv, softmax_scale * LOG2E, softmax_scale,
        CAUSAL=causal, USE_WORK=use_work, BLOCK_M=config.block_m, BLOCK_N=config.block_n, DA=da, DB=db,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dq, dk, dv
