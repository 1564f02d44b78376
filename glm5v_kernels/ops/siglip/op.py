"""Autograd for the siglip family: what runs on which backend, and what is saved for backward.

The loss saves only its inputs: the backward recomputes the scores tile by tile (Triton) or chunk
by chunk (the reference). The Triton launches are torch.library custom ops with fake
implementations, so torch.compile treats them as opaque calls.
"""

import torch
from torch import Tensor

from glm5v_kernels.ops.siglip import reference


def _as_f32_scalar(t: Tensor) -> Tensor:
    return t.detach().float().reshape(1).contiguous()


@torch.library.custom_op("glm5v_siglip::siglip_fwd", mutates_args=())
def _triton_forward(x: Tensor, y: Tensor, logit_scale: Tensor, logit_bias: Tensor, diagonal: bool) -> Tensor:
    from glm5v_kernels.ops.siglip.triton import siglip_forward

    row_loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    siglip_forward(x, y, _as_f32_scalar(logit_scale), _as_f32_scalar(logit_bias), diagonal, row_loss)
    return row_loss


@_triton_forward.register_fake
def _(x, y, logit_scale, logit_bias, diagonal):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("glm5v_siglip::siglip_bwd", mutates_args=())
def _triton_backward(grad: Tensor, x: Tensor, y: Tensor, logit_scale: Tensor, logit_bias: Tensor, diagonal: bool,
                     need_x: bool, need_y: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dy, d logit_scale, d logit_bias); dx / dy are empty tensors when not asked for."""
    from glm5v_kernels.ops.siglip.triton import siglip_backward

    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.zeros(x.shape, **f32) if need_x else None
    dy = torch.zeros(y.shape, **f32) if need_y else None
    sum_c, sum_cu = torch.empty(2, x.shape[0], **f32)
    scale = _as_f32_scalar(logit_scale)
    siglip_backward(x, y, scale, _as_f32_scalar(logit_bias), diagonal, dx, dy, sum_c, sum_cu)
    g = grad.float().reshape(())
    empty = x.new_empty(0)
    return (empty if dx is None else (dx * g).to(x.dtype), empty if dy is None else (dy * g).to(y.dtype),
            (g * scale.exp() * sum_cu.sum()).reshape(logit_scale.shape),
            (g * sum_c.sum()).reshape(logit_bias.shape))


@_triton_backward.register_fake
def _(grad, x, y, logit_scale, logit_bias, diagonal, need_x, need_y):
    empty = x.new_empty(0)
    return (torch.empty_like(x) if need_x else empty, torch.empty_like(y) if need_y else empty,
            logit_scale.new_empty(logit_scale.shape, dtype=torch.float32),
            logit_bias.new_empty(logit_bias.shape, dtype=torch.float32))


class SigLIPLoss(torch.autograd.Function):
    """(x (B1, D), y (B2, D), logit_scale, logit_bias) -> the scalar float32 loss
    (1/B1)·Σ_ij softplus(−l_ij·z_ij); positives on the diagonal when `diagonal`, else none."""

    @staticmethod
    def forward(ctx, x, y, logit_scale, logit_bias, diagonal, backend):
        if backend == "torch":
            rows = reference.siglip_forward(x, y, logit_scale, logit_bias, diagonal)
        else:
            rows = _triton_forward(x, y, logit_scale, logit_bias, diagonal)
        ctx.save_for_backward(x, y, logit_scale, logit_bias)
        ctx.options = (diagonal, backend)
        return rows.sum() / x.shape[0]

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, logit_scale, logit_bias = ctx.saved_tensors
        diagonal, backend = ctx.options
        need_x, need_y, need_scale, need_bias = ctx.needs_input_grad[:4]
        if not (need_x or need_y or need_scale or need_bias):
            return (None,) * 6
        grad = grad_loss / x.shape[0]
        if backend == "torch":
            grads = reference.siglip_backward(grad, x, y, logit_scale, logit_bias, diagonal, need_x, need_y)
        else:
            grads = _triton_backward(grad, x, y, logit_scale, logit_bias, diagonal, need_x, need_y)
        dx, dy, dscale, dbias = grads
        return (dx if need_x else None, dy if need_y else None,
                dscale.to(logit_scale.dtype) if need_scale else None,
                dbias.to(logit_bias.dtype) if need_bias else None, None, None)
