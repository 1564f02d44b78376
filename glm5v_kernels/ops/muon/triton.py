"""Symmetric Gram kernel for Newton–Schulz: Out = alpha·X·Xᵀ + beta·C, computing only the tiles
on and above the diagonal and mirroring them, batched over a leading dimension.

Both symmetric products of a Newton–Schulz step use it: A = X·Xᵀ (alpha=1, no C) and
B = b·A + c·A·A, which is c·A·Aᵀ + b·A because A is symmetric. Of T×T output tiles only
T(T+1)/2 are computed; the product with X that follows is a general matrix product and stays
with cuBLAS. The tile shape is autotuned per (m, k, dtype) on the GPU among configurations that
all compile for sm_90a without spills (tests/kernels/test_muon.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def sym_gram_kernel(
    X, C, Out,
    M, K,
    stride_xb, stride_xm, stride_xk,
    stride_cb, stride_cm, stride_cn,
    stride_ob, stride_om, stride_on,
    alpha, beta,
    HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Program (t, b): tile (ti, tj), ti <= tj, of matrix b. The tiles are numbered column by column,
    # t = tj·(tj + 1)/2 + ti, so neighbouring programs share the column tile's rows of X (in L2).
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)  # the float root may land one off either way
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
    ti = t - tj * (tj + 1) // 2
    x = X + b * stride_xb
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    inside = (rows[:, None] < M) & (cols[None, :] < M)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    # Row tile ti and column tile tj of X·Xᵀ: tiles of X and of Xᵀ (X read through swapped strides).
    left = tl.make_block_ptr(x, shape=(M, K), strides=(stride_xm, stride_xk), offsets=(ti * BLOCK, 0),
                             block_shape=(BLOCK, BLOCK_K), order=(1, 0))
    right = tl.make_block_ptr(x, shape=(K, M), strides=(stride_xk, stride_xm), offsets=(0, tj * BLOCK),
                              block_shape=(BLOCK_K, BLOCK), order=(0, 1))
    for _ in range(0, K, BLOCK_K):
        a = tl.load(left, boundary_check=(0, 1), padding_option="zero")
        bt = tl.load(right, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(a, bt, acc, input_precision=INPUT_PRECISION)
        left = tl.advance(left, (0, BLOCK_K))
        right = tl.advance(right, (BLOCK_K, 0))
    acc = acc * alpha
    if HAS_C:
        c = tl.load(C + b * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn, mask=inside, other=0.0)
        acc += beta * c.to(tl.float32)
    out = acc.to(Out.dtype.element_ty)
    o = Out + b * stride_ob
    tl.store(o + rows[:, None] * stride_om + cols[None, :] * stride_on, out, mask=inside)
    if ti != tj:  # the mirror tile below the diagonal
        mirror = (cols[:, None] < M) & (rows[None, :] < M)
        tl.store(o + cols[:, None] * stride_om + rows[None, :] * stride_on, tl.trans(out), mask=mirror)


class Config(NamedTuple):
    block: int
    block_k: int
    num_warps: int
    num_stages: int
    # only for launches the runtime specialises as aligned (every size and stride a multiple of 16
    # or 1, pointers 16-byte aligned): the generic variant of the kernel spills in this config
    aligned_only: bool = False


# Square output tiles for 16-bit inputs, on wgmma: the autotuner picks one per (m, k, dtype).
CONFIGS = (
    Config(64, 64, 4, 3),
    Config(64, 64, 4, 4),
    Config(128, 32, 8, 3),
    Config(128, 32, 8, 4),
    Config(128, 64, 8, 3, aligned_only=True),
    Config(128, 64, 8, 4, aligned_only=True),
)
# float32 inputs (not the default on CUDA): 4-byte tiles spill in the 16-bit configurations.
FLOAT32_CONFIGS = (Config(64, 32, 8, 3), Config(64, 16, 4, 3))


def input_precision(dtype: torch.dtype) -> str:
    """float32 products follow torch's matmul setting, as the general product beside them does:
    IEEE unless `torch.backends.cuda.matmul.allow_tf32` is set."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launchable(configs, named_args, **kwargs):
    """The autotuner's candidates for this launch: the dtype's configurations, those marked
    aligned_only when the launch is aligned."""
    wanted = FLOAT32_CONFIGS if named_args["X"].dtype == torch.float32 else CONFIGS
    aligned = _aligned(named_args)
    return [c for c in configs if c.glm5v_config in wanted and (aligned or not c.glm5v_config.aligned_only)]


def _aligned(named_args) -> bool:
    pointers = [named_args[name].data_ptr() for name in ("X", "C", "Out")]
    ints = [value for name, value in named_args.items() if name == "M" or name == "K" or name.startswith("stride")]
    return all(p % 16 == 0 for p in pointers) and all(v == 1 or v % 16 == 0 for v in ints)


def _triton_config(config: Config) -> triton.Config:
    tc = triton.Config({"BLOCK": config.block, "BLOCK_K": config.block_k}, num_warps=config.num_warps,
                       num_stages=config.num_stages)
    tc.glm5v_config = config
    return tc


sym_gram_autotuned = triton.autotune(
    configs=[_triton_config(c) for c in (*CONFIGS, *FLOAT32_CONFIGS)], key=["M", "K", "HAS_C"],
    prune_configs_by={"early_config_prune": _launchable},
)(sym_gram_kernel)


def upper_tile_count(m: int, block: int) -> int:
    tiles = triton.cdiv(m, block)
    return tiles * (tiles + 1) // 2


def sym_gram(X: torch.Tensor, alpha: float = 1.0, C: torch.Tensor | None = None, beta: float = 0.0,
             out: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """X (batch, m, k) -> alpha·X·Xᵀ + beta·C, (batch, m, m) in X's dtype (fp32 accumulation).

    C (batch, m, m) must be symmetric (only its upper tiles are read). float32 inputs multiply in
    IEEE float32 unless torch allows tf32 matmuls (`input_precision`). config: a fixed tile
    configuration; None autotunes on the GPU and takes the first of the dtype's list (64 x 64
    tiles) under the interpreter, where timings mean nothing."""
    batch, m, k = X.shape
    if out is None:
        out = torch.empty(batch, m, m, device=X.device, dtype=X.dtype)
    c = C if C is not None else out  # an unused pointer when HAS_C is false
    args = (X, c, out, m, k, X.stride(0), X.stride(1), X.stride(2), c.stride(0), c.stride(1), c.stride(2),
            out.stride(0), out.stride(1), out.stride(2), float(alpha), float(beta))
    flags = dict(HAS_C=C is not None, INPUT_PRECISION=input_precision(X.dtype))
    if config is None and X.is_cuda:
        sym_gram_autotuned[lambda meta: (upper_tile_count(m, meta["BLOCK"]), batch)](*args, **flags)
        return out
    config = config or (FLOAT32_CONFIGS if X.dtype == torch.float32 else CONFIGS)[0]
    sym_gram_kernel[(upper_tile_count(m, config.block), batch)](
        *args, **flags, BLOCK=config.block, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out
