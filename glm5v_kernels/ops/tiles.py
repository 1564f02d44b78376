"""Triton tile helpers shared by kernel families."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add_row_block_product(a, src, src_rows, src_row0, stride_src, out, out_rows, out_row0, stride_out, width,
                          BLOCK_W: tl.constexpr):
    """out[out_row0 + i, :width] += Σ_j a[i, j] · src[src_row0 + j, :width] for the tile a of shape
    (R, S), BLOCK_W columns at a time, rows past src_rows / out_rows left alone: the read-modify-
    write through which a program adds its share to gradient rows that it alone owns (float32 out)."""
    R: tl.constexpr = a.shape[0]
    S: tl.constexpr = a.shape[1]
    src_ptr = tl.make_block_ptr(src, shape=(src_rows, width), strides=(stride_src, 1), offsets=(src_row0, 0),
                                block_shape=(S, BLOCK_W), order=(1, 0))
    out_ptr = tl.make_block_ptr(out, shape=(out_rows, width), strides=(stride_out, 1), offsets=(out_row0, 0),
                                block_shape=(R, BLOCK_W), order=(1, 0))
    for _ in range(0, width, BLOCK_W):
        block = tl.load(src_ptr, boundary_check=(0, 1), padding_option="zero")
        previous = tl.load(out_ptr, boundary_check=(0, 1), padding_option="zero")
        tl.store(out_ptr, tl.dot(a, block, previous), boundary_check=(0, 1))
        src_ptr = tl.advance(src_ptr, (0, BLOCK_W))
        out_ptr = tl.advance(out_ptr, (0, BLOCK_W))
