"""Autograd for the mtp family: what runs on which backend, and what is saved for backward.

Both functions run the chunked reference (backend "torch") or the Triton kernels ("triton",
"interpret") in forward and in backward. The linear cross-entropy saves only its inputs and the
(N,) log-sum-exp: the backward recomputes the logits. The Triton launches are torch.library
custom ops with fake implementations, so torch.compile treats them as opaque calls instead of
tracing into the launcher.
"""


import torch
from torch import Tensor

from glm5v_kernels.ops.mtp import reference


def _valid_order(targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(order (N,) int64 listing the valid rows first, count (1,) int32), on the device: no host sync."""
    valid = targets != ignore_index
    order = torch.argsort((~valid).to(torch.int8), stable=True)
    return order, valid.sum(dtype=torch.int32).reshape(1)


@torch.library.custom_op("glm5v_mtp::linear_cross_entropy_fwd", mutates_args=())
def _triton_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                    label_smoothing: float, z_loss: float, softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    from glm5v_kernels.ops.mtp.triton import lce_forward

    # The kernels read the valid rows packed first; results go back to their rows by `order`.
    order, count = _valid_order(targets, ignore_index)
    packed = torch.zeros(3, hidden.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.zeros(hidden.shape[0], dtype=torch.int8, device=hidden.device)
    lce_forward(hidden.index_select(0, order), weight, bias, targets.index_select(0, order), count,
                packed[0], packed[1], correct, softcap, label_smoothing, z_loss)
    packed[2] = correct
    loss, lse, correct = (torch.zeros_like(row).index_copy_(0, order, row) for row in packed)
    return loss, lse, correct.bool()


@_triton_forward.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(n, dtype=torch.bool))


@torch.library.custom_op("glm5v_mtp::linear_cross_entropy_bwd", mutates_args=())
def _triton_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                     lse: Tensor, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
                     need_hidden: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias) in the inputs' dtypes; a gradient not asked for is an empty tensor."""
    from glm5v_kernels.ops.mtp.triton import lce_backward

    order, count = _valid_order(targets, ignore_index)
    # Float32 accumulators: every program adds its tiles into rows only it owns.
    row_grad = torch.where(targets != ignore_index, grad_loss.float(), 0.0).index_select(0, order)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dhidden = torch.zeros(hidden.shape, **f32) if need_hidden else None
    dweight = torch.zeros(weight.shape, **f32) if need_weight else None
    dbias = torch.zeros(weight.shape[0], **f32) if need_bias else None
    lce_backward(hidden.index_select(0, order), weight, bias, targets.index_select(0, order), count,
                 lse.index_select(0, order), row_grad, dhidden, dweight, dbias, softcap, label_smoothing, z_loss)
    empty = hidden.new_empty(0)
    return (empty if dhidden is None else torch.zeros_like(hidden).index_copy_(0, order, dhidden.to(hidden.dtype)),
            empty if dweight is None else dweight.to(weight.dtype),
            empty if dbias is None else dbias.to(bias.dtype))


@_triton_backward.register_fake
def _(grad_loss, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss, softcap,
      need_hidden, need_weight, need_bias):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty, torch.empty_like(weight) if need_weight else empty,
            torch.empty_like(bias) if need_bias else empty)


class LinearCrossEntropy(torch.autograd.Function):
    """(hidden, weight, bias, targets) -> per-row loss (N,) float32, lse (N,), correct (N,) bool.

    The reduction happens outside, in plain torch on the (N,) losses, so autograd hands this
    function the gradient of every row's loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, backend):
        if backend == "torch":
            loss, lse, correct = reference.linear_cross_entropy_forward(
                hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap)
        else:
            loss, lse, correct = _triton_forward(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss,
                                                 softcap)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, backend)
        ctx.mark_non_differentiable(lse, correct)
        return loss, lse, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_correct):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, softcap, backend = ctx.options
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_loss is None or not (need_hidden or need_weight or need_bias):
            return (None,) * 9
        if backend == "torch":
            dhidden, dweight, dbias = reference.linear_cross_entropy_backward(
                grad_loss, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss, softcap,
                need_hidden, need_weight, need_bias)
            return dhidden, dweight, dbias, *(None,) * 6
        grads = _triton_backward(grad_loss, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss,
                                 softcap, need_hidden, need_weight, need_bias)
        return *(g if need else None for g, need in zip(grads, (need_hidden, need_weight, need_bias))), *(None,) * 6


@torch.library.custom_op("glm5v_mtp::embed_with_placeholder_fwd", mutates_args=())
def _triton_embed(ids: Tensor, weight: Tensor, is_visual: Tensor, placeholder_id: int, norm_weight: Tensor | None,
                  eps: float) -> Tensor:
    from glm5v_kernels.ops.mtp.triton import embed_forward

    out = torch.empty(ids.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
    embed_forward(ids, is_visual.view(torch.uint8), weight, placeholder_id, norm_weight, eps, out)
    return out


@_triton_embed.register_fake
def _(ids, weight, is_visual, placeholder_id, norm_weight, eps):
    return weight.new_empty(ids.shape[0], weight.shape[1])


@torch.library.custom_op("glm5v_mtp::embedding_weight_grad", mutates_args=())
def _triton_weight_grad(rows: Tensor, grad_rows: Tensor, weight: Tensor) -> Tensor:
    """(V, D) in weight's dtype: Σ grad_rows[i] over the positions reading each row (0 for rows never read)."""
    from glm5v_kernels.ops.mtp.triton import segment_sum

    dweight = torch.zeros_like(weight)
    segment_sum(rows, grad_rows.contiguous(), dweight)
    return dweight


@_triton_weight_grad.register_fake
def _(rows, grad_rows, weight):
    return torch.empty_like(weight)


class EmbedWithPlaceholder(torch.autograd.Function):
    """Triton path of embed_with_placeholder on flat inputs: ids (T,), is_visual (T,) -> (T, D)."""

    @staticmethod
    def forward(ctx, ids, weight, is_visual, placeholder_id, norm_weight, eps):
        out = _triton_embed(ids, weight, is_visual, placeholder_id, norm_weight, eps)
        rows = torch.where(is_visual, placeholder_id, ids.long())
        ctx.save_for_backward(rows, weight, norm_weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, norm_weight = ctx.saved_tensors
        grad_rows, grad_norm = grad_out, None
        if norm_weight is not None:
            # RMSNorm backward per position, in float32, before the rows are reduced per embedding row.
            x = weight[rows].float()
            inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
            x_hat = x * inv_rms
            g = grad_out.float()
            if ctx.needs_input_grad[4]:
                grad_norm = (g * x_hat).sum(0).to(norm_weight.dtype)
            gy = g * norm_weight.float()
            grad_rows = inv_rms * (gy - x_hat * (gy * x_hat).mean(-1, keepdim=True))
        dweight = _triton_weight_grad(rows, grad_rows, weight) if ctx.needs_input_grad[1] else None
        return None, dweight, None, None, grad_norm, None
