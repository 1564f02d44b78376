"""Stage 2 of CogViT pretraining: NaFlex SigLIP, variable-size packed images against their captions.

Image tower: CogViT over the packed views; each image's embedding is the mean of its patch
features (after the final norm, before the 2×2 merger, which is the LLM adapter and trains in
later stages) through a linear projection, L2-normalised. Text tower: a small transformer over
the caption's bytes (`glm5v.data.tokenizer.ByteTokenizer`, offline), captions packed without
padding and attended per caption (the same pre-norm block as CogViT: RMSNorm, QK-norm varlen
attention with 1D rotary, SiLU-gated MLP), mean-pooled, projected, L2-normalised. Logits
exp(logit_scale)·<image, text> + logit_bias with a learnable logit_scale (the log of the
temperature) and bias, initialised to log 10 and −10; loss `glm5v_kernels.siglip_loss` (tile by
tile, logits never stored), or `glm5v.parallel.DistributedSigLIPLoss` when torch.distributed is
initialised (then every rank must draw the same number of images: set images_per_step).

A batch takes at most one view of each photo (distinct photos, so their captions are the
negatives of each other), up to batch_tokens patches. `init` starts the image tower from a
stage-1 checkpoint (glm5v/train/mim.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm5v.data.embedded import Sample
from glm5v.data.tokenizer import ByteTokenizer
from glm5v.models.cogvit import CogViT, CogViTBlock, CogViTConfig
from glm5v.parallel.siglip import DistributedSigLIPLoss
from glm5v.train.loop import step_random
from glm5v.train.stage import (
    StageConfig,
    StageResult,
    draw_batch,
    load_samples,
    rank_seed,
    run_stage,
    seeded,
    to_device,
)
from glm5v_kernels import rotary_1d, siglip_loss, varlen_plan
from glm5v_kernels.data import PackedImages


@dataclass(frozen=True)
class TextConfig:
    """The text tower: depth blocks of width channels, num_heads heads, MLP mlp_hidden; captions of
    at most max_tokens bytes; embed_dim: the shared image-text embedding width."""

    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_hidden: int = 128
    max_tokens: int = 256
    embed_dim: int = 64
    rope_theta: float = 10000.0

    def block_config(self) -> CogViTConfig:
        """The blocks' shape, in the CogViTConfig that CogViTBlock reads (its patch fields unused)."""
        return CogViTConfig(depth=self.depth, width=self.width, num_heads=self.num_heads, mlp_hidden=self.mlp_hidden,
                            merge_size=None)


TEXT_CONFIGS = {"tiny": TextConfig(), "l": TextConfig(width=768, depth=12, num_heads=12, mlp_hidden=3072,
                                                      embed_dim=1024)}


def segment_mean(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """x (T, C) packed rows, cu_seqlens (n + 1,) -> (n, C): the mean of every segment's rows."""
    lengths = cu_seqlens.long().diff().to(x.device)
    segment = torch.repeat_interleave(torch.arange(lengths.shape[0], device=x.device), lengths,
                                      output_size=x.shape[0])
    sums = x.new_zeros(lengths.shape[0], x.shape[1]).index_add_(0, segment, x)
    return sums / lengths[:, None].to(x.dtype)


def encode_captions(captions: Sequence[str], tokenizer: ByteTokenizer, max_tokens: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """captions -> (ids (T,) int64, cu_seqlens (n + 1,) int32), packed without padding. An empty
    caption or one longer than max_tokens raises (nothing is truncated)."""
    ids = []
    for i, caption in enumerate(captions):
        tokens = tokenizer.encode(caption)
        if not tokens or len(tokens) > max_tokens:
            raise ValueError(f"caption {i} ({caption[:40]!r}) has {len(tokens)} tokens; captions need 1 to "
                             f"{max_tokens} (TextConfig.max_tokens)")
        ids.append(torch.tensor(tokens, dtype=torch.long))
    lengths = torch.tensor([0] + [len(t) for t in ids])
    return torch.cat(ids), lengths.cumsum(0).to(torch.int32)


class TextTower(nn.Module):
    """Token ids (T,) packed over n captions -> (T, width) features (pre-norm blocks, final RMSNorm)."""

    def __init__(self, config: TextConfig, vocab_size: int):
        super().__init__()
        self.config = config
        block = config.block_config()
        self.embed = nn.Embedding(vocab_size, config.width)
        self.blocks = nn.ModuleList(CogViTBlock(block) for _ in range(config.depth))
        self.norm = nn.RMSNorm(config.width, eps=block.norm_eps)
        nn.init.normal_(self.embed.weight, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        plan = varlen_plan(cu_seqlens, device=ids.device)
        starts = cu_seqlens.long()
        caption = torch.repeat_interleave(torch.arange(starts.shape[0] - 1), starts.diff(), output_size=ids.shape[0])
        positions = (torch.arange(ids.shape[0]) - starts[caption]).to(ids.device)
        cos, sin = rotary_1d(positions, self.config.width // self.config.num_heads, self.config.rope_theta)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, plan, cos, sin)
        return self.norm(x)


class SigLIPModel(nn.Module):
    """Everything stage 2 trains: the image tower (CogViT), the text tower, both projections, and
    logit_scale / logit_bias (0-dim, initialised to log 10 and −10)."""

    def __init__(self, vision: CogViT, text: TextConfig, tokenizer: ByteTokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.vision = vision
        self.text = TextTower(text, tokenizer.vocab_size)
        self.image_proj = nn.Linear(vision.config.width, text.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, text.embed_dim, bias=False)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images: PackedImages, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """images: n packed images; captions: n strings, caption i describing image i.
        Returns (image_emb (n, embed_dim), text_emb (n, embed_dim)), both L2-normalised."""
        if isinstance(captions, str) or len(captions) != images.num_images:
            given = "a single string" if isinstance(captions, str) else f"{len(captions)} captions"
            raise ValueError(f"captions must hold one caption per image: got {given} for {images.num_images} images")
        ids, cu_seqlens = encode_captions(captions, self.tokenizer, self.text.config.max_tokens)
        device = images.patches.device
        features = self.vision(images).features
        image_emb = self.image_proj(segment_mean(features, images.cu_seqlens))
        text_emb = self.text_proj(segment_mean(self.text(ids.to(device), cu_seqlens), cu_seqlens))
        return F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)


@dataclass(frozen=True)
class SigLIPConfig(StageConfig):
    """Stage-2 settings: StageConfig's plus text (the text tower; None: TEXT_CONFIGS[model]),
    init (a stage-1 checkpoint folder or its model.safetensors: the image tower starts from its
    student), images_per_step (None: as many distinct photos as fit batch_tokens; an int: exactly
    that many views, each with a NaFlex budget of batch_tokens // images_per_step patches, as
    the distributed loss needs on every rank)."""

    out: str = "runs/cogvit-siglip"
    text: TextConfig | None = None
    init: str | None = None
    images_per_step: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.images_per_step is not None:
            if not isinstance(self.images_per_step, int) or self.images_per_step < 1:
                raise ValueError(f"images_per_step must be an int >= 1 or None, got {self.images_per_step!r}")
            merge = self.student_config().merge_size or 1
            if self.batch_tokens // self.images_per_step < merge * merge:
                raise ValueError(f"batch_tokens={self.batch_tokens} leaves fewer than merge_size² = {merge * merge} "
                                 f"patches to each of images_per_step={self.images_per_step} images")

    def text_config(self) -> TextConfig:
        return self.text if self.text is not None else TEXT_CONFIGS[self.model]


def load_stage1_student(vision: CogViT, path: str | Path) -> None:
    """Load the student of a stage-1 checkpoint (its folder or model.safetensors) into vision."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"init: {str(path)!r} is neither a stage-1 checkpoint folder nor a .safetensors file")
    state = {k.removeprefix("student."): v for k, v in load_file(file).items() if k.startswith("student.")}
    if not state:
        raise ValueError(f"init: {file} holds no 'student.' weights (not a stage-1 checkpoint)")
    try:
        vision.load_state_dict(state)
    except RuntimeError as exc:  # missing / unexpected keys or shapes: another CogViT config
        raise ValueError(f"init: {file} does not fit a CogViT of this config: {exc}") from None


def train_siglip(config: SigLIPConfig, samples: Sequence[Sample] | None = None) -> StageResult:
    """Run stage 2 (see the module docstring) on `samples`, config.data's folder or the embedded
    photos (their captions). Writes out/siglip.jsonl (loss, logit scale and bias, lr, images and
    tokens per step), out/siglip.png and out/checkpoint-<step>/."""
    if not isinstance(config, SigLIPConfig):
        raise TypeError(f"config must be a SigLIPConfig, got {type(config).__name__}")
    samples = load_samples(config, samples)
    device, processor = config.torch_device(), config.processor()
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and config.images_per_step is None:
        raise ValueError("under torch.distributed every rank must pass the same number of images to the loss: set "
                         "images_per_step")
    if config.images_per_step is not None:
        merge = processor.merge_size
        processor = dataclasses.replace(processor, max_num_patches=max(merge * merge,
                                                                       config.batch_tokens // config.images_per_step))
    max_images = config.images_per_step or len(samples)
    vision = seeded(config.seed, lambda: CogViT(config.student_config()))
    if config.init is not None:
        load_stage1_student(vision, config.init)
    model = seeded(config.seed, lambda: SigLIPModel(vision, config.text_config(), ByteTokenizer())).to(device)
    loss_fn = DistributedSigLIPLoss() if distributed else siglip_loss
    data_seed = rank_seed(config.seed)

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        packed, views = draw_batch(samples, processor, config.batch_tokens, step_random(data_seed, step), config.views,
                                   max_images=max_images)
        image_emb, text_emb = model(to_device(packed, device), [v.caption for v in views])
        loss = loss_fn(image_emb, text_emb, model.logit_scale, model.logit_bias)
        return loss, {"logit_scale": model.logit_scale.exp().item(), "logit_bias": model.logit_bias.item(),
                      "images": packed.num_images, "tokens": packed.patches.shape[0]}

    return run_stage(config, "siglip", model, step_loss)


__all__ = ["SigLIPConfig", "SigLIPModel", "TextConfig", "TextTower", "encode_captions", "load_stage1_student",
           "segment_mean", "train_siglip"]
