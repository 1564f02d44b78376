"""Multimodal multi-token prediction: fused linear cross-entropy, placeholder-substituting
embeddings, visual-embedding merge and packed-document-aware shifting.

Checks that would need a host sync on a GPU (target or id ranges, the visual count, cu_seqlens
values) run on the host only for CPU tensors, where they are free; on a GPU an out-of-range
target gives a NaN loss for its row, an out-of-range id a NaN embedding row, and a visual count
mismatch fails a device-side assert.
"""

from __future__ import annotations

import numbers

import torch

from glm5v_kernels._backend import can_read_values, select_backend
from glm5v_kernels.ops.mtp import reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)
_REDUCTIONS = ("mean", "sum", "none")


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {x!r}")
    return int(x)


def _refuse_interpreted_bf16(backend: str, dtype: torch.dtype, name: str) -> None:
    if backend == "interpret" and dtype == torch.bfloat16:
        raise ValueError(f"{name} of dtype torch.bfloat16 cannot run under the Triton interpreter (its bf16 dots "
                         "are wrong); use float32 or float16 there")


def _linear_cross_entropy(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap):
    """Validated call of the autograd function: (per-row loss (N,) float32, lse (N,), correct (N,) bool)."""
    _check_tensor(hidden, "hidden")
    _check_tensor(weight, "weight")
    _check_tensor(targets, "targets")
    if hidden.ndim != 2:
        raise ValueError(f"hidden must have shape (N, H), got {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    n, h = hidden.shape
    if weight.ndim != 2 or weight.shape[1] != h:
        raise ValueError(f"weight must have shape (V, H) with H = {h} (hidden's), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    v = weight.shape[0]
    if v == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape (0, H)")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.shape != (v,):
            raise ValueError(f"bias must have shape (V,) = ({v},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    if targets.dtype not in _INDEX_DTYPES:
        raise TypeError(f"targets must be an int64 or int32 tensor of class indices, got {targets.dtype}")
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape (N,) = ({n},), got {tuple(targets.shape)}")
    ignore_index = _check_int(ignore_index, "ignore_index")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    backend = select_backend(hidden, weight, bias, targets)
    if can_read_values(targets):
        valid = targets[targets != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= v):
            raise ValueError(f"targets must be in [0, V) = [0, {v}) or equal ignore_index ({ignore_index}), "
                             f"got values in [{int(valid.min())}, {int(valid.max())}]")
    _refuse_interpreted_bf16(backend, hidden.dtype, "hidden")
    if n == 0:
        backend = "torch"  # nothing to launch
    from glm5v_kernels.ops.mtp.op import LinearCrossEntropy

    if backend != "torch":
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        bias = None if bias is None else bias.contiguous()
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, float(label_smoothing),
                                    float(z_loss), None if softcap is None else float(softcap), backend)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                               normalizer: float | torch.Tensor | None = None, label_smoothing: float = 0.0,
                               z_loss: float = 0.0, softcap: float | None = None, return_lse: bool = False):
    """Cross-entropy of the logits hidden·Wᵀ + b against targets, without storing the (N, V) logits.

    hidden (N, H), weight (V, H), bias (V,) or None, all of one float dtype; targets (N,) int64 or
    int32, rows equal to `ignore_index` contribute nothing and are skipped. The logits are
    accumulated in float32, soft-capped as softcap·tanh(u/softcap) when `softcap` is given, and the
    per-row loss is lse − (1 − ε)·z_target − ε·mean(z) + z_loss·lse² (ε = label_smoothing,
    matching F.cross_entropy's smoothing).

    reduction: "mean" (sum over the valid rows divided by their count, counted on the device;
    0 when every row is ignored, with zero gradients), "sum", or "none" ((N,) losses, 0 at ignored
    rows). normalizer (with reduction="mean" only): divide the sum by this count instead (a number
    or a 0-d tensor, e.g. the valid-token count of the whole global batch, so that gradient
    accumulation over micro-batches gives the full-batch mean).

    Returns the loss in float32 (a scalar, or (N,) for "none"); with return_lse, (loss, lse) where
    lse (N,) float32 holds each row's log-sum-exp (0 at ignored rows; not differentiable).
    Gradients for hidden, weight and bias are accumulated in float32 and returned in their dtype.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer divides the summed loss and needs reduction='mean', got {reduction!r}")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a number or a one-element tensor, got shape "
                                 f"{tuple(normalizer.shape)}")
        elif isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real) or not normalizer > 0:
            raise ValueError(f"normalizer must be a positive number or a tensor, got {normalizer!r}")
    loss, lse, _ = _linear_cross_entropy(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                                         softcap)
    if reduction == "mean":
        if normalizer is None:
            # max(count, 1): an all-ignored batch has loss 0 (its sum is 0), never 0/0.
            normalizer = (targets != ignore_index).sum().clamp(min=1)
        elif isinstance(normalizer, torch.Tensor):
            normalizer = normalizer.reshape(()).to(device=loss.device, dtype=torch.float32)
        loss = loss.sum() / normalizer
    elif reduction == "sum":
        loss = loss.sum()
    if return_lse:
        return loss, torch.where(targets != ignore_index, lse, 0.0)
    return loss


def linear_cross_entropy_with_accuracy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                       ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over the valid rows, number of valid rows whose target holds the largest logit,
    number of valid rows), all device tensors, from one fused pass; shapes as in
    :func:`fused_linear_cross_entropy`. Ties count as correct."""
    loss, _, correct = _linear_cross_entropy(hidden, weight, targets, None, ignore_index, 0.0, 0.0, None)
    count = (targets != ignore_index).sum()
    return loss.sum() / count.clamp(min=1), correct.sum(), count


def embed_with_placeholder(input_ids: torch.Tensor, weight: torch.Tensor, is_visual: torch.Tensor,
                           placeholder_id: int, *, norm_weight: torch.Tensor | None = None,
                           eps: float = 1e-6) -> torch.Tensor:
    """Embedding gather in which every visual position reads row `placeholder_id`.

    input_ids (...) int64/int32, weight (V, D) float, is_visual (...) bool of input_ids' shape,
    placeholder_id in [0, V) -> (..., D) in weight's dtype. With norm_weight (D,) the rows are
    RMS-normalised (x·rsqrt(mean(x²) + eps)·norm_weight, in float32) in the same pass. Ids at
    visual positions are never read. The gradient into weight sums each row's contributions
    (the placeholder row gets one per visual position) in a deterministic order, not with atomics.
    """
    _check_tensor(input_ids, "input_ids")
    _check_tensor(weight, "weight")
    _check_tensor(is_visual, "is_visual")
    if input_ids.dtype not in _INDEX_DTYPES:
        raise TypeError(f"input_ids must be an int64 or int32 tensor, got {input_ids.dtype}")
    if weight.ndim != 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be a (V, D) float32/float16/bfloat16 tensor, got shape "
                         f"{tuple(weight.shape)} and {weight.dtype}")
    if is_visual.dtype != torch.bool:
        raise TypeError(f"is_visual must be a bool tensor, got {is_visual.dtype}")
    if is_visual.shape != input_ids.shape:
        raise ValueError(f"is_visual must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(is_visual.shape)}")
    v, d = weight.shape
    placeholder_id = _check_int(placeholder_id, "placeholder_id")
    if not 0 <= placeholder_id < v:
        raise ValueError(f"placeholder_id must be in [0, V) = [0, {v}), got {placeholder_id}")
    if norm_weight is not None:
        _check_tensor(norm_weight, "norm_weight")
        if norm_weight.shape != (d,):
            raise ValueError(f"norm_weight must have shape (D,) = ({d},), got {tuple(norm_weight.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    backend = select_backend(input_ids, weight, is_visual, norm_weight)
    if can_read_values(input_ids):
        text = input_ids[~is_visual]
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= v):
            raise ValueError(f"input_ids at non-visual positions must be in [0, V) = [0, {v}), got values in "
                             f"[{int(text.min())}, {int(text.max())}]")
    if backend == "torch" or input_ids.numel() == 0:
        return reference.embed_with_placeholder(input_ids, weight, is_visual, placeholder_id, norm_weight, eps)
    from glm5v_kernels.ops.mtp.op import EmbedWithPlaceholder

    out = EmbedWithPlaceholder.apply(input_ids.reshape(-1).contiguous(), weight.contiguous(),
                                     is_visual.reshape(-1).contiguous(), placeholder_id,
                                     None if norm_weight is None else norm_weight.contiguous(), float(eps))
    return out.reshape(*input_ids.shape, d)


def merge_visual_embeddings(text_embeds: torch.Tensor, visual_embeds: torch.Tensor,
                            is_visual: torch.Tensor) -> torch.Tensor:
    """Scatter visual embeddings into their positions: the backbone's input embeddings.

    text_embeds (..., D), visual_embeds (M, D), is_visual (...) bool with text_embeds' leading
    shape and exactly M True entries -> (..., D) in text_embeds' dtype; the k-th visual position
    in row-major order takes visual_embeds[k]. No host sync on a GPU (the count is checked by a
    device-side assert there; on CPU a mismatch raises ValueError). Differentiable in both inputs.
    """
    _check_tensor(text_embeds, "text_embeds")
    _check_tensor(visual_embeds, "visual_embeds")
    _check_tensor(is_visual, "is_visual")
    if text_embeds.ndim < 1 or not text_embeds.is_floating_point():
        raise ValueError(f"text_embeds must be a floating-point (..., D) tensor, got shape "
                         f"{tuple(text_embeds.shape)} and {text_embeds.dtype}")
    d = text_embeds.shape[-1]
    if visual_embeds.ndim != 2 or visual_embeds.shape[1] != d or not visual_embeds.is_floating_point():
        raise ValueError(f"visual_embeds must be a floating-point (M, D) tensor with D = {d}, got shape "
                         f"{tuple(visual_embeds.shape)} and {visual_embeds.dtype}")
    if is_visual.dtype != torch.bool:
        raise TypeError(f"is_visual must be a bool tensor, got {is_visual.dtype}")
    if is_visual.shape != text_embeds.shape[:-1]:
        raise ValueError(f"is_visual must have shape {tuple(text_embeds.shape[:-1])} (text_embeds without D), "
                         f"got {tuple(is_visual.shape)}")
    select_backend(text_embeds, visual_embeds, is_visual)  # one device
    m = visual_embeds.shape[0]
    count = is_visual.sum()
    if can_read_values(is_visual):
        if int(count) != m:
            raise ValueError(f"is_visual has {int(count)} visual positions but visual_embeds has {m} rows")
    else:
        torch._assert_async(count == m, "merge_visual_embeddings: visual position count != visual_embeds rows")
    return reference.merge_visual_embeddings(text_embeds, visual_embeds, is_visual)


def mtp_roll(input_ids: torch.Tensor, labels: torch.Tensor, k: int, cu_seqlens: torch.Tensor | None = None,
             fill_id: int = 0, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift input_ids and labels left by k within each document: depth k's inputs and targets.

    input_ids, labels: (B, T) (each row one document) or (T,); with cu_seqlens (D + 1,) int
    (0 = cu[0] <= ... <= cu[D] = T) the tokens hold packed documents [cu[j], cu[j+1]) and
    input_ids must be (T,) or (1, T). Returns (ids_k, labels_k) of the same shapes with
    ids_k[t] = input_ids[t + k] and labels_k[t] = labels[t + k] when t + k is in t's document,
    fill_id and ignore_index where it is not. Never shifts across documents; no host sync.
    """
    _check_tensor(input_ids, "input_ids")
    _check_tensor(labels, "labels")
    k = _check_int(k, "k")
    if k <= 0:
        raise ValueError(f"k must be >= 1 (the prediction depth), got {k}")
    if input_ids.dtype not in _INDEX_DTYPES or labels.dtype not in _INDEX_DTYPES:
        raise TypeError(f"input_ids and labels must be int64 or int32, got {input_ids.dtype} and {labels.dtype}")
    if input_ids.ndim not in (1, 2):
        raise ValueError(f"input_ids must have shape (B, T) or (T,), got {tuple(input_ids.shape)}")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    fill_id = _check_int(fill_id, "fill_id")
    ignore_index = _check_int(ignore_index, "ignore_index")
    length = input_ids.shape[-1]
    if cu_seqlens is not None:
        _check_tensor(cu_seqlens, "cu_seqlens")
        if input_ids.ndim == 2 and input_ids.shape[0] != 1:
            raise ValueError(f"with cu_seqlens, input_ids must be (T,) or (1, T), got {tuple(input_ids.shape)}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in _INDEX_DTYPES:
            raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor of at least 2 offsets, got shape "
                             f"{tuple(cu_seqlens.shape)} and {cu_seqlens.dtype}")
        if can_read_values(cu_seqlens):
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != length or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"cu_seqlens must rise monotonically from 0 to T = {length}, got {cu}")
    select_backend(input_ids, labels)  # one device
    ids2, labels2 = input_ids.reshape(-1, length), labels.reshape(-1, length)
    ids_k = reference.shift_within_documents(ids2, k, cu_seqlens, fill_id)
    labels_k = reference.shift_within_documents(labels2, k, cu_seqlens, ignore_index)
    return ids_k.reshape(input_ids.shape), labels_k.reshape(labels.shape)


__all__ = ["embed_with_placeholder", "fused_linear_cross_entropy", "merge_visual_embeddings", "mtp_roll"]
