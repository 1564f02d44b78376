"""Multimodal multi-token prediction head (GLM-5V-Turbo's MMTP over DeepSeek-V3's MTP chain)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from glm5v_kernels.ops.mtp import (
    embed_with_placeholder,
    linear_cross_entropy_with_accuracy,
    merge_visual_embeddings,
    mtp_roll,
)
from glm5v_kernels.ops.mtp.reference import shift_within_documents

VISUAL_INPUTS = ("embedding", "mask", "placeholder")


@dataclass
class MMTPOutput:
    """loss: scalar, loss_weight / K · Σ_k depth_losses[k] (differentiable); depth_losses (K,) and
    depth_accuracies (K,) (detached, float32): depth k's mean loss (its summed loss over the
    forward's `normalizers[k]` when given) and top-1 accuracy over its own valid tokens (0 for a
    depth without any)."""

    loss: torch.Tensor
    depth_losses: torch.Tensor
    depth_accuracies: torch.Tensor


class MMTPHead(nn.Module):
    """K extra depths, depth k predicting the token k + 1 steps ahead of each position.

    Depth k (k = 1..K) follows DeepSeek-V3's chain: x = proj_k(cat(RMSNorm(e_k), RMSNorm(h_{k-1})))
    with the embedding first, h_k = block_k(x), logits = final_norm(h_k) · output_weightᵀ (the
    shared head, through the fused linear cross-entropy), h_0 = the backbone's last hidden state.
    e_k embeds the input ids shifted left by k within each document (mtp_roll); at positions
    whose shifted token is visual, `visual_input` selects what the depth sees (the paper's
    Figure 2): "embedding" the visual embedding itself, "mask" a learned mask vector,
    "placeholder" the shared `<|image|>` embedding row `image_token_id` (the adopted design).
    Labels are shifted the same way; a label is ignored at positions whose shifted input token
    is visual and where it is the image token itself.

    embedding: the backbone's nn.Embedding (V, H) and output_weight its output head (V, H),
    final_norm its final norm module, all shared (not copied). block_factory(k) builds depth k's
    transformer block: a module mapping (B, T, H) to (B, T, H), called as block(x, **block_kwargs).
    """

    def __init__(self, hidden_size: int, num_depths: int, block_factory: Callable[[int], nn.Module],
                 embedding: nn.Embedding, output_weight: nn.Parameter, final_norm: nn.Module, image_token_id: int,
                 loss_weight: float = 0.1, visual_input: str = "placeholder", ignore_index: int = -100,
                 eps: float = 1e-6):
        super().__init__()
        if not isinstance(num_depths, int) or num_depths < 1:
            raise ValueError(f"num_depths must be an int >= 1, got {num_depths!r}")
        if visual_input not in VISUAL_INPUTS:
            raise ValueError(f"visual_input must be one of {VISUAL_INPUTS}, got {visual_input!r}")
        if not isinstance(embedding, nn.Embedding) or embedding.embedding_dim != hidden_size:
            raise ValueError(f"embedding must be an nn.Embedding of dimension hidden_size = {hidden_size}")
        vocab = embedding.num_embeddings
        if not isinstance(output_weight, torch.Tensor) or output_weight.shape != (vocab, hidden_size):
            raise ValueError(f"output_weight must be a (V, H) = ({vocab}, {hidden_size}) tensor, got "
                             f"{getattr(output_weight, 'shape', type(output_weight).__name__)}")
        if not 0 <= image_token_id < vocab:
            raise ValueError(f"image_token_id must be in [0, V) = [0, {vocab}), got {image_token_id}")
        self.hidden_size = hidden_size
        self.num_depths = num_depths
        self.image_token_id = image_token_id
        self.loss_weight = loss_weight
        self.visual_input = visual_input
        self.ignore_index = ignore_index
        self.embedding = embedding
        self.output_weight = output_weight
        self.final_norm = final_norm
        self.embed_norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=eps) for _ in range(num_depths))
        self.hidden_norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=eps) for _ in range(num_depths))
        self.projections = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size, bias=False)
                                         for _ in range(num_depths))
        self.blocks = nn.ModuleList(block_factory(k) for k in range(1, num_depths + 1))
        if visual_input == "mask":
            self.mask_embedding = nn.Parameter(torch.randn(hidden_size) * embedding.weight.detach().std())

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, is_visual: torch.Tensor,
                *, visual_embeds: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                normalizers: torch.Tensor | None = None, **block_kwargs) -> MMTPOutput:
        """hidden (B, T, H): the backbone's last hidden state (before its final norm); input_ids,
        labels (B, T) with labels[t] the token following t (ignore_index where there is none);
        is_visual (B, T) bool; visual_embeds (M, H), M = is_visual.sum(), needed by
        visual_input="embedding"; cu_seqlens (D + 1,) when B = 1 holds packed documents.
        normalizers (K,): divide depth k's summed loss by normalizers[k] instead of its own
        valid-token count, e.g. the global batch's count under gradient accumulation or data
        parallelism, so that summing (or averaging) the parts gives the whole batch's loss."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must have shape (B, T, {self.hidden_size}), got {tuple(hidden.shape)}")
        if input_ids.shape != hidden.shape[:2] or is_visual.shape != hidden.shape[:2]:
            raise ValueError(f"input_ids and is_visual must have shape (B, T) = {tuple(hidden.shape[:2])}, got "
                             f"{tuple(input_ids.shape)} and {tuple(is_visual.shape)}")
        if normalizers is not None and (not isinstance(normalizers, torch.Tensor)
                                        or normalizers.shape != (self.num_depths,)):
            raise ValueError(f"normalizers must be a ({self.num_depths},) tensor (one per depth), got "
                             f"{tuple(getattr(normalizers, 'shape', ())) or type(normalizers).__name__}")
        weight = self.embedding.weight
        if self.visual_input == "embedding":
            if visual_embeds is None:
                raise ValueError('visual_input="embedding" needs visual_embeds (M, H)')
            # The backbone's own input embeddings, shifted per depth below.
            full = merge_visual_embeddings(
                embed_with_placeholder(input_ids, weight, is_visual, self.image_token_id), visual_embeds, is_visual)
        losses, accuracies, h_prev = [], [], hidden
        for k in range(1, self.num_depths + 1):
            ids_k, labels_k = mtp_roll(input_ids, labels, k, cu_seqlens, ignore_index=self.ignore_index)
            visual_k = shift_within_documents(is_visual, k, cu_seqlens, False)
            if self.visual_input == "embedding":
                e_k = shift_within_documents(full, k, cu_seqlens, 0.0)
            else:
                e_k = embed_with_placeholder(ids_k, weight, visual_k, self.image_token_id)
                if self.visual_input == "mask":
                    e_k = torch.where(visual_k[..., None], self.mask_embedding.to(e_k.dtype), e_k)
            labels_k = torch.where(visual_k | (labels_k == self.image_token_id), self.ignore_index, labels_k)
            x = torch.cat([self.embed_norms[k - 1](e_k), self.hidden_norms[k - 1](h_prev)], dim=-1)
            h_prev = self.blocks[k - 1](self.projections[k - 1](x), **block_kwargs)
            normed = self.final_norm(h_prev).reshape(-1, self.hidden_size).to(self.output_weight.dtype)
            loss_k, correct_k, count_k = linear_cross_entropy_with_accuracy(
                normed, self.output_weight, labels_k.reshape(-1), ignore_index=self.ignore_index)
            if normalizers is not None:  # loss_k · count_k is the summed loss (0 when count_k is 0)
                loss_k = loss_k * count_k / normalizers[k - 1].to(loss_k.dtype)
            losses.append(loss_k)
            accuracies.append(correct_k.float() / count_k.clamp(min=1))
        depth_losses = torch.stack(losses)
        return MMTPOutput(loss=self.loss_weight / self.num_depths * depth_losses.sum(),
                          depth_losses=depth_losses.detach(), depth_accuracies=torch.stack(accuracies).detach())
