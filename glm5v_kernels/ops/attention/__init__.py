"""Varlen attention over packed sequences with per-head QK-norm and rotary fused in."""

from __future__ import annotations

import torch

from glm5v_kernels._backend import can_read_values, select_backend
from glm5v_kernels.ops.attention import reference
from glm5v_kernels.ops.attention.plan import PLAN_BLOCKS, VarlenPlan, varlen_plan
from glm5v_kernels.ops.attention.rotary import rotary_1d, rotary_2d

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_inputs(q, k, v, cu_seqlens, max_seqlen) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 3)
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: all tensors must be on one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    total, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != total or k.shape[2] != d:
        raise ValueError(f"k and v must have shape (total={total}, Hkv, D={d}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the key/value heads ({k.shape[1]})")
    if d % 8 or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: it must be a multiple of 8 in "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    _check_tensor("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}: it must be on the tensors' device")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have B + 1 >= 2 entries, got {cu_seqlens.numel()}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise TypeError(f"max_seqlen must be a Python int >= 0 (no device sync to read it), got {max_seqlen!r}")


def _check_boundaries(cu_seqlens, total: int, max_seqlen: int) -> None:
    """Values of cu_seqlens, read on the host: skipped for CUDA tensors (a device sync) and under
    torch.compile (a graph break); a plan, built once per batch, checks them there."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, it decreases after entry {lengths.index(min(lengths))}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens[-1] = {bounds[-1]} must equal the number of tokens {total}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is smaller than the longest sequence ({max(lengths)})")


def _check_plan(plan, cu_seqlens, total: int) -> None:
    if not isinstance(plan, VarlenPlan):
        raise TypeError(f"plan must come from varlen_plan(), got {type(plan).__name__}")
    if plan.cu_seqlens.device != cu_seqlens.device or plan.cu_seqlens.shape != cu_seqlens.shape:
        raise ValueError("plan was built for another batch (cu_seqlens shape or device differs)")
    if sum(plan.seqlens) != total:
        raise ValueError(f"plan covers {sum(plan.seqlens)} tokens, q has {total}")


def _check_norm(qk_norm, weights: dict, biases: dict, d: int, device) -> None:
    if qk_norm not in (None, "rms", "layer"):
        raise ValueError(f"qk_norm must be None, 'rms' or 'layer', got {qk_norm!r}")
    for name, t in {**weights, **biases}.items():
        if t is None:
            continue
        if qk_norm is None:
            raise ValueError(f"{name} was given but qk_norm is None")
        _check_tensor(name, t, 1)
        if t.shape[0] != d:
            raise ValueError(f"{name} must have shape (D,) = ({d},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, q on {device}")
    if qk_norm == "rms" and any(b is not None for b in biases.values()):
        raise ValueError("norm biases need qk_norm='layer' (RMSNorm has no bias)")


def _check_rotary(cos, sin, total: int, d: int, device) -> None:
    if (cos is None) != (sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if cos is None:
        return
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        _check_tensor(name, t, 2)
        if t.shape != cos.shape or t.shape[0] != total:
            raise ValueError(f"{name} must have shape (total={total}, rot_dim // 2), got {tuple(t.shape)}")
        if not t.is_floating_point() or t.device != device:
            raise TypeError(f"{name} must be a floating tensor on {device}, got {t.dtype} on {t.device}")
    if not 1 <= 2 * cos.shape[1] <= d:
        raise ValueError(f"rot_dim = 2 * rotary_cos.shape[1] = {2 * cos.shape[1]} must be in [2, D={d}]")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=False, softmax_scale=None, qk_norm=None,
                     q_norm_weight=None, k_norm_weight=None, q_norm_bias=None, k_norm_bias=None, norm_eps=1e-6,
                     rotary_cos=None, rotary_sin=None, rotary_interleaved=False, plan=None, deterministic=False,
                     return_lse=False):
    """Attention within each packed sequence, with per-head QK-norm and rotary applied to q and k first.

    q: (total, Hq, D); k, v: (total, Hkv, D) with Hq % Hkv == 0 (grouped-query attention);
    cu_seqlens: (B + 1,) int32 on the tensors' device; max_seqlen: Python int >= every length.
    cu_seqlens' values and max_seqlen are checked on the host for CPU tensors and by `varlen_plan`;
    CUDA tensors without a plan are taken as given (checking would cost a device sync each call,
    and a too-small max_seqlen leaves rows unwritten, as in flash-attn): pass a plan.
    causal: each query sees the keys at or before its position in its sequence.
    softmax_scale: default D ** -0.5. qk_norm: None, "rms" or "layer", over the head dim with
    weights (D,) (and biases (D,) for "layer"), applied before rotary. rotary_cos / rotary_sin:
    (total, rot_dim // 2) per-token tables (`rotary_1d`, `rotary_2d`), rotate-half pairs unless
    rotary_interleaved; channels beyond rot_dim pass through. plan: `varlen_plan(cu_seqlens)`,
    built once per batch: programs then follow its work list (no program is launched for the
    empty blocks of short sequences). deterministic: accepted for flash-attn parity; the backward
    never uses atomics, so gradients are always bit-identical run to run.

    Returns out (total, Hq, D) in q's dtype, and with return_lse also lse (Hq, total) float32,
    the natural-log log-sum-exp of each query's scaled scores (not differentiated through).
    Differentiable with respect to q, k, v and the norm weights and biases.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    total, _, d = q.shape
    _check_norm(qk_norm, {"q_norm_weight": q_norm_weight, "k_norm_weight": k_norm_weight},
                {"q_norm_bias": q_norm_bias, "k_norm_bias": k_norm_bias}, d, q.device)
    _check_rotary(rotary_cos, rotary_sin, total, d, q.device)
    if plan is not None:
        _check_plan(plan, cu_seqlens, total)
        max_seqlen = max(max_seqlen, plan.max_seqlen)
    elif can_read_values(cu_seqlens):
        _check_boundaries(cu_seqlens, total, max_seqlen)
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)

    backend = select_backend(q, k, v, cu_seqlens, q_norm_weight, k_norm_weight, rotary_cos)
    if backend == "torch":
        out, lse = reference.varlen_attention(
            q, k, v, cu_seqlens, causal=causal, softmax_scale=scale, qk_norm_kind=qk_norm,
            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, q_norm_bias=q_norm_bias,
            k_norm_bias=k_norm_bias, norm_eps=norm_eps, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
            rotary_interleaved=rotary_interleaved)
        return (out, lse.detach()) if return_lse else out
    if backend == "interpret" and q.dtype == torch.bfloat16:
        raise ValueError("bfloat16 cannot run under the Triton interpreter (its bf16 dots are wrong); "
                         "use float32 or float16 there")
    from glm5v_kernels.ops.attention.op import varlen_attention_fwd

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    works = [plan.work(b) if plan is not None else None for b in PLAN_BLOCKS]
    out, lse = varlen_attention_fwd(
        q, k, v, cu_seqlens, *works, q_norm_weight, k_norm_weight, q_norm_bias, k_norm_bias,
        rotary_cos, rotary_sin, max_seqlen, bool(causal), scale, qk_norm or "", float(norm_eps),
        bool(rotary_interleaved))
    return (out, lse) if return_lse else out


__all__ = ["VarlenPlan", "rotary_1d", "rotary_2d", "varlen_attention", "varlen_plan"]
