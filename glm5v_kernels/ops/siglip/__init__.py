"""Sigmoid contrastive (SigLIP) loss computed tile by tile: the (B1, B2) logits are never stored."""

from __future__ import annotations

import numbers

import torch

from glm5v_kernels._backend import select_backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POSITIVES = ("diagonal", "none")


def _scalar_param(value, name: str, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim or (1,) floating tensor (kept as is, so its gradient reaches the caller), or a Python
    number turned into a 0-dim float32 tensor on like's device."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a scalar tensor (0-dim or shape (1,)) or a number, got {type(value).__name__}")
    if value.ndim > 1 or value.numel() != 1:
        raise ValueError(f"{name} must be a scalar tensor: 0-dim or shape (1,), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float, *, positives: str = "diagonal") -> torch.Tensor:
    """SigLIP's sigmoid contrastive loss, without storing the (B1, B2) logits.

    image_emb (B1, D), text_emb (B2, D): one float dtype (float32, float16, bfloat16; normalise
    them beforehand if the model wants cosine similarities). logit_scale, logit_bias: 0-dim or (1,)
    tensors (or numbers); logit_scale is the LOG of the temperature (SigLIP initialises
    logit_scale = log 10 and logit_bias = −10), so the logits are

        z_ij = exp(logit_scale)·<image_emb[i], text_emb[j]> + logit_bias

    and the loss is −(1/B1)·Σ_i Σ_j log σ(l_ij·z_ij): summed over the texts, averaged over the
    images. l_ij = +1 for positive pairs and −1 otherwise. positives: "diagonal" (B1 = B2, image i
    goes with text i) or "none" (every pair negative: another rank's text block in the distributed
    loss, whose per-rank loss is the sum of these terms).

    Returns a 0-dim float32 tensor. Products are accumulated in float32; gradients flow to both
    embeddings (in their dtype), logit_scale and logit_bias (in theirs). Deterministic.
    """
    for value, name in ((image_emb, "image_emb"), (text_emb, "text_emb")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim != 2:
            raise ValueError(f"{name} must have shape (B, D), got {tuple(value.shape)}")
    if image_emb.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"image_emb must be float32, float16 or bfloat16, got {image_emb.dtype}")
    if text_emb.dtype != image_emb.dtype:
        raise TypeError(f"text_emb must have image_emb's dtype {image_emb.dtype}, got {text_emb.dtype}")
    (b1, d), b2 = image_emb.shape, text_emb.shape[0]
    if text_emb.shape[1] != d:
        raise ValueError(f"text_emb must have shape (B, D) with D = {d} (image_emb's), got {tuple(text_emb.shape)}")
    if b1 == 0 or b2 == 0 or d == 0:
        raise ValueError(f"empty batch: image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} "
                         "must have at least one row and one column")
    if positives not in _POSITIVES:
        raise ValueError(f"positives must be one of {_POSITIVES}, got {positives!r}")
    if positives == "diagonal" and b1 != b2:
        raise ValueError(f"positives='diagonal' pairs image i with text i and needs as many texts as images, got "
                         f"{b1} images and {b2} texts (use positives='none' for a block without positives)")
    logit_scale = _scalar_param(logit_scale, "logit_scale", image_emb)
    logit_bias = _scalar_param(logit_bias, "logit_bias", image_emb)
    backend = select_backend(image_emb, text_emb, logit_scale, logit_bias)
    if backend == "interpret" and image_emb.dtype == torch.bfloat16:
        raise ValueError("image_emb of dtype torch.bfloat16 cannot run under the Triton interpreter (its bf16 dots "
                         "are wrong); use float32 or float16 there")
    from glm5v_kernels.ops.siglip.op import SigLIPLoss

    if backend != "torch":
        image_emb, text_emb = image_emb.contiguous(), text_emb.contiguous()
    return SigLIPLoss.apply(image_emb, text_emb, logit_scale, logit_bias, positives == "diagonal", backend)


__all__ = ["siglip_loss"]
