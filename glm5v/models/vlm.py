"""VLM: CogViT (with its 2×2 patch merger and MLP adapter) feeding a DecoderLM trained with
multimodal multi-token prediction (MMTP).

One packed forward: the images of a pack go through CogViT as one varlen batch; its merged tokens
(image by image, row-major over each image's merged grid) replace the `<|image|>` positions of the
pack's token sequence, in order (`merge_visual_embeddings`); the DecoderLM runs over the pack's
documents; the loss is the fused cross-entropy of the next token on trained text targets plus the
MMTP head's loss over K further depths (`glm5v_kernels.nn.MMTPHead`).

Targets: labels[t] is the token that follows t (IGNORE_INDEX = -100 where none is trained). A
target is never trained at a visual position (the input there is an image embedding) nor where
the target is the `<|image|>` token itself (image tokens are given, not predicted); the MMTP
depths apply the same rule to their shifted targets.

Loss normalisation: by default each term is the mean over its own trained targets. Under gradient
accumulation or data parallelism pass `normalizers` (K + 1,) = the global batch's target counts
(`target_counts` summed over every micro-batch and rank) divided by the number of ranks that
average their gradients: the summed (or rank-averaged) losses and gradients are then those of the
whole batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from glm5v.data.tokenizer import IMAGE, ByteTokenizer
from glm5v.models.cogvit import CogViT, CogViTConfig, cogvit_tiny
from glm5v.models.llm import IGNORE_INDEX, DecoderLM, DecoderLMConfig, llm_tiny
from glm5v_kernels import embed_with_placeholder, merge_visual_embeddings, mtp_roll
from glm5v_kernels.data import PackedImages
from glm5v_kernels.nn import MMTPHead
from glm5v_kernels.nn.mmtp import VISUAL_INPUTS


@dataclass(frozen=True)
class VLMConfig:
    """vision: the CogViT (its merger must exist and map to llm.hidden_size); llm: the decoder;
    num_mtp_depths: MMTP depths K (0: no MMTP head); mtp_visual_input: what the depths see at
    visual positions ("placeholder", the paper's design: the shared `<|image|>` embedding row;
    "mask": a learned vector; "embedding": the visual embedding); mtp_loss_weight: the head's
    loss weight (its loss is weight / K · Σ_k depth loss); image_token_id: the `<|image|>` id of
    the tokenizer (default: ByteTokenizer's)."""

    vision: CogViTConfig
    llm: DecoderLMConfig
    num_mtp_depths: int = 2
    mtp_visual_input: str = "placeholder"
    mtp_loss_weight: float = 0.1
    image_token_id: int = ByteTokenizer().token_id(IMAGE)

    def __post_init__(self):
        if not isinstance(self.vision, CogViTConfig) or not isinstance(self.llm, DecoderLMConfig):
            raise TypeError(f"vision must be a CogViTConfig and llm a DecoderLMConfig, got "
                            f"{type(self.vision).__name__} and {type(self.llm).__name__}")
        if self.vision.merge_size is None:
            raise ValueError("vision needs a patch merger (CogViTConfig(merge_size=...)): its output is the LLM input")
        if self.vision.out_hidden_size != self.llm.hidden_size:
            raise ValueError(f"vision.out_hidden_size ({self.vision.out_hidden_size}) must equal llm.hidden_size "
                             f"({self.llm.hidden_size}): merged image tokens are LLM embeddings")
        k = self.num_mtp_depths
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"num_mtp_depths must be an int >= 0, got {k!r}")
        if self.mtp_visual_input not in VISUAL_INPUTS:
            raise ValueError(f"mtp_visual_input must be one of {VISUAL_INPUTS}, got {self.mtp_visual_input!r}")
        if not self.mtp_loss_weight >= 0:
            raise ValueError(f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight!r}")
        if not 0 <= self.image_token_id < self.llm.vocab_size:
            raise ValueError(f"image_token_id must be in [0, llm.vocab_size={self.llm.vocab_size}), got "
                             f"{self.image_token_id}")


def vlm_tiny(**overrides) -> VLMConfig:
    """`cogvit_tiny` (no mask token) whose merger maps to the width of `llm_tiny` (64), 2 MMTP
    depths, the ByteTokenizer's `<|image|>`: for tests and CPU runs."""
    llm = llm_tiny()
    base = VLMConfig(vision=cogvit_tiny(mask_token=False, out_hidden_size=llm.hidden_size, merger_hidden=128), llm=llm)
    return dataclasses.replace(base, **overrides)


@dataclass
class VLMOutput:
    """loss: scalar, main_loss + the MMTP loss (differentiable; the training loss). main_loss,
    mtp_loss: the two terms (detached). depth_losses, depth_accuracies (K,) (detached): each MMTP
    depth's loss and top-1 accuracy (empty without MMTP)."""

    loss: torch.Tensor
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor
    depth_losses: torch.Tensor
    depth_accuracies: torch.Tensor


def trained_labels(input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """labels with IGNORE_INDEX at visual positions and where the target is the image token."""
    return labels.masked_fill((input_ids == image_token_id) | (labels == image_token_id), IGNORE_INDEX)


def target_counts(input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, image_token_id: int,
                  num_mtp_depths: int) -> torch.Tensor:
    """(K + 1,) int64: how many targets the main loss (entry 0) and each MMTP depth k (entry k)
    train on in this pack: input_ids, labels (T,), cu_seqlens (D + 1,) as for `VLM.forward`."""
    labels = trained_labels(input_ids, labels, image_token_id)
    counts = [(labels != IGNORE_INDEX).sum()]
    for k in range(1, num_mtp_depths + 1):
        # trained_labels already ignores visual inputs and image targets, so after the shift the
        # depth's own rule (no visual shifted input, no image target) removes nothing more.
        counts.append((mtp_roll(input_ids, labels, k, cu_seqlens)[1] != IGNORE_INDEX).sum())
    return torch.stack(counts)


class VLM(nn.Module):
    """The vision-language model; see the module docstring and `VLMConfig`.

    Submodules: `vision` (CogViT with its merger), `llm` (DecoderLM), `mtp` (MMTPHead sharing the
    LLM's embedding, output head and final norm; None when num_mtp_depths = 0)."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        if not isinstance(config, VLMConfig):
            raise TypeError(f"config must be a VLMConfig, got {type(config).__name__}")
        self.config = config
        self.vision = CogViT(config.vision)
        self.llm = DecoderLM(config.llm)
        self.mtp = None
        if config.num_mtp_depths:
            self.mtp = MMTPHead(config.llm.hidden_size, config.num_mtp_depths, self.llm.block_factory,
                                self.llm.embed_tokens, self.llm.output_weight, self.llm.norm, config.image_token_id,
                                loss_weight=config.mtp_loss_weight, visual_input=config.mtp_visual_input,
                                ignore_index=IGNORE_INDEX, eps=config.llm.norm_eps)

    def target_counts(self, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """(K + 1,) trained-target counts of one pack (see `target_counts`)."""
        return target_counts(input_ids, labels, cu_seqlens, self.config.image_token_id, self.config.num_mtp_depths)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                images: PackedImages | None, *, normalizers: torch.Tensor | None = None) -> VLMOutput:
        """input_ids, labels (T,) int64 (labels[t]: the token following t, or -100); cu_seqlens
        (D + 1,) int32 document boundaries (on the CPU); images: the pack's images, T_v patches
        (their cu_seqlens and spatial_shapes on the CPU), whose T_v / merge_size² merged tokens
        fill the `<|image|>` positions in order (None: a text-only pack); normalizers (K + 1,)
        optional divisors of the summed main and per-depth losses (module docstring)."""
        config = self.config
        for name, t in (("input_ids", input_ids), ("labels", labels)):
            if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"{name} must be a (T,) int64/int32 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        k = config.num_mtp_depths
        if normalizers is not None and (not isinstance(normalizers, torch.Tensor) or normalizers.shape != (k + 1,)):
            raise ValueError(f"normalizers must be a (K + 1,) = ({k + 1},) tensor, got "
                             f"{tuple(getattr(normalizers, 'shape', ())) or type(normalizers).__name__}")
        is_visual = input_ids == config.image_token_id
        positions = int(is_visual.sum())
        merge = config.vision.merge_size**2
        patches = 0 if images is None else images.patches.shape[0]
        if positions != patches // merge or patches % merge:
            raise ValueError(f"the pack has {positions} {IMAGE} positions but its images give {patches} patches = "
                             f"{patches / merge:g} merged tokens (merge_size² = {merge}): each image's "
                             f"{IMAGE} run must hold exactly its merged token count")
        weight = self.llm.embed_tokens.weight
        embeds = embed_with_placeholder(input_ids, weight, is_visual, config.image_token_id)
        visual = embeds.new_zeros((0, embeds.shape[1]))
        if images is not None:
            visual = self.vision(images).merged.to(embeds.dtype)
            embeds = merge_visual_embeddings(embeds, visual, is_visual)
        out = self.llm(cu_seqlens=cu_seqlens, inputs_embeds=embeds)
        labels = trained_labels(input_ids, labels, config.image_token_id)
        main = self.llm.loss(out.hidden, labels, normalizer=None if normalizers is None else normalizers[0])
        if self.mtp is None:
            empty = main.new_zeros(0)
            return VLMOutput(loss=main, main_loss=main.detach(), mtp_loss=main.new_zeros(()), depth_losses=empty,
                             depth_accuracies=empty)
        mtp = self.mtp(out.prenorm[None], input_ids[None], labels[None], is_visual[None], visual_embeds=visual,
                       cu_seqlens=cu_seqlens, normalizers=None if normalizers is None else normalizers[1:],
                       **out.block_kwargs)
        return VLMOutput(loss=main + mtp.loss, main_loss=main.detach(), mtp_loss=mtp.loss.detach(),
                         depth_losses=mtp.depth_losses, depth_accuracies=mtp.depth_accuracies)
