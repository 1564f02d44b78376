"""varlen attention on the Triton backend as torch.library custom ops (forward and backward), with
fake implementations, so `torch.compile(fullgraph=True)` treats the fused kernel as one node.

Forward: one transform pass normalises and rotates k (every key tile is read by many query
blocks), the attention kernel does the same to q as it loads each query tile. What backward keeps:
q, k, v (the raw inputs), out and lse, as flash-attn does; it recomputes the transformed q and k
with one pass each, runs the atomic-free attention backward, then one transform-backward pass each
for dq, dk and the norm-parameter gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from glm5v_kernels.ops.attention import triton as kernels
from glm5v_kernels.ops.attention.plan import PLAN_BLOCKS


def _transforms(norm: str, q_weight, k_weight, q_bias, k_bias, eps, cos, sin, interleaved):
    """The q and k transforms; custom ops take a str, so "" stands for no norm."""
    shared = dict(norm=norm or None, eps=eps, cos=cos, sin=sin, interleaved=interleaved)
    return (kernels.Transform(weight=q_weight, bias=q_bias, **shared),
            kernels.Transform(weight=k_weight, bias=k_bias, **shared))


def _transformed(x, transform: kernels.Transform):
    """(x normalised then rotated, its (2, H, T) stats) or (x, None) when there is nothing to apply."""
    return (x, None) if transform.is_identity else kernels.transform_qk(x, transform)


def _works(work_small, work_large) -> dict[int, Tensor]:
    """The plan's work lists by block size (PLAN_BLOCKS order), absent ones left out."""
    return {b: w for b, w in zip(PLAN_BLOCKS, (work_small, work_large)) if w is not None}


@torch.library.custom_op("glm5v::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, work_small: Tensor | None, work_large: Tensor | None,
    q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, q_norm_bias: Tensor | None,
    k_norm_bias: Tensor | None, rotary_cos: Tensor | None, rotary_sin: Tensor | None,
    max_seqlen: int, causal: bool, softmax_scale: float, norm: str, norm_eps: float, interleaved: bool,
) -> tuple[Tensor, Tensor]:
    q_transform, k_transform = _transforms(norm, q_norm_weight, k_norm_weight, q_norm_bias, k_norm_bias, norm_eps,
                                           rotary_cos, rotary_sin, interleaved)
    kt, _ = _transformed(k, k_transform)
    works = _works(work_small, work_large)
    return kernels.attention_forward(q, kt, v, cu_seqlens, max_seqlen, causal, softmax_scale, works.get, q_transform)


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, work_small, work_large, q_norm_weight, k_norm_weight, q_norm_bias, k_norm_bias,
      rotary_cos, rotary_sin, max_seqlen, causal, softmax_scale, norm, norm_eps, interleaved):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("glm5v::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
    work_small: Tensor | None, work_large: Tensor | None,
    q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, q_norm_bias: Tensor | None,
    k_norm_bias: Tensor | None, rotary_cos: Tensor | None, rotary_sin: Tensor | None,
    max_seqlen: int, causal: bool, softmax_scale: float, norm: str, norm_eps: float, interleaved: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv, d q_norm_weight, d k_norm_weight, d q_norm_bias, d k_norm_bias (empty when absent)."""
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    q_transform, k_transform = _transforms(norm, q_norm_weight, k_norm_weight, q_norm_bias, k_norm_bias, norm_eps,
                                           rotary_cos, rotary_sin, interleaved)
    qt, q_stats = _transformed(q, q_transform)
    kt, k_stats = _transformed(k, k_transform)
    works = _works(work_small, work_large)
    dq, dk, dv = kernels.attention_backward(dout, qt, kt, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale,
                                            works.get, grad_dtype=torch.float32 if q_stats is not None else None)
    grads = [None] * 4
    if q_stats is not None:
        dq, grads[0], grads[2] = kernels.transform_qk_backward(dq, q, q_stats, q_transform)
        dk, grads[1], grads[3] = kernels.transform_qk_backward(dk, k, k_stats, k_transform)
    params = (q_norm_weight, k_norm_weight, q_norm_bias, k_norm_bias)
    # An empty tensor stands for an absent gradient in the op's fixed-arity output.
    grads = [g.to(p.dtype) if g is not None else q.new_empty(0) for g, p in zip(grads, params)]
    return (dq, dk, dv, *grads)


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, work_small, work_large, q_norm_weight, k_norm_weight, q_norm_bias,
      k_norm_bias, rotary_cos, rotary_sin, max_seqlen, causal, softmax_scale, norm, norm_eps, interleaved):
    params = (q_norm_weight, k_norm_weight, q_norm_bias, k_norm_bias)
    has_norm = bool(norm)
    grads = [torch.empty_like(p) if (p is not None and has_norm) else q.new_empty(0) for p in params]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *grads)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens, work_small, work_large, qw, kw, qb, kb, cos, sin,
     max_seqlen, causal, softmax_scale, norm, norm_eps, interleaved) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, work_small, work_large, qw, kw, qb, kb, cos, sin)
    ctx.options = (max_seqlen, causal, softmax_scale, norm, norm_eps, interleaved)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, work_small, work_large, qw, kw, qb, kb, cos, sin = ctx.saved_tensors
    dq, dk, dv, dqw, dkw, dqb, dkb = varlen_attention_bwd(
        dout, q, k, v, out, lse, cu_seqlens, work_small, work_large, qw, kw, qb, kb, cos, sin, *ctx.options)
    param_grads = [g if p is not None and p.requires_grad else None for g, p in zip((dqw, dkw, dqb, dkb),
                                                                                     (qw, kw, qb, kb))]
    return (dq, dk, dv, None, None, None, *param_grads, None, None, None, None, None, None, None, None)


varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
