"""CogViT: a vision transformer over native-resolution images packed without padding.

Patch embedding (a linear map of flattened patches) → optional mask token (masked image
modelling) → optional learned position grid resized per image → pre-norm blocks (RMSNorm,
`QKNormAttention` with RMS QK-norm before 2D rotary, SiLU-gated MLP) → final RMSNorm → optional
2×2 patch merger whose MLP adapter maps to the LLM's embedding width.

The architecture is that of the vision tower of GLM-OCR (transformers' `GlmOcrVisionModel`), and
`CogViT.from_glm_ocr` loads its weights. Conventions, each one GLM-OCR's:

- Patches: a row of `PackedImages.patches` is one patch, flattened (row, col, channel); with
  `temporal_patch_size = t > 1` a row holds t frames, flattened (frame, row, col, channel). A
  still image may pass single-frame rows: it is its own t frames, so the embedding applies the
  sum of the t frame slices of the weight (what GLM-OCR's Conv3d computes on a repeated frame).
- Rotary: over the whole head dim, rotate-half pairs, frequencies theta^(-2i / (D / 2)); the
  first D/4 pairs turn with the patch row, the last D/4 with the column (`rotary_2d`).
- Norms: RMSNorm everywhere in the trunk (blocks, QK-norm per head, final norm) with one eps
  (GLM-OCR: 1e-5); the merger has a LayerNorm (eps 1e-5, with bias).
- Biases: qkv, attention output and MLP projections of the blocks (`bias`), the patch embedding
  and the merger's 2×2 downsampling have them; the merger's other projections do not.
- Merger: the m×m tokens of each block, in (row, col) order, concatenated → linear (GLM-OCR's
  Conv2d with kernel = stride = m) → linear → LayerNorm → GELU (exact) → SiLU-gated MLP.
  Merged tokens come out image by image, row-major over each image's merged grid.
- Attention: one sequence per image; a video is one sequence per temporal patch (per pair of
  frames), as in GLM-OCR (transformers passes `merge_temporal=False`), so a video is packed as
  consecutive single-frame "images" (see `packed_from_glm_ocr`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glm5v._checks import check_ints
from glm5v_kernels import VarlenPlan, rotary_2d, varlen_plan
from glm5v_kernels.data import PackedImages, interpolate_pos_embed
from glm5v_kernels.memory import PinnedPool, apply_memory_policy
from glm5v_kernels.nn import QKNormAttention

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class CogViTConfig:
    """Shape of a CogViT.

    depth blocks of `width` channels and `num_heads` heads (head dim width / num_heads: a multiple
    of 8 in [16, 128], the attention kernel's range), SiLU-gated MLP of `mlp_hidden`; patches of
    `patch_size`² pixels × `in_channels` × `temporal_patch_size` frames. `bias`: biases of the
    blocks' projections. `norm_eps`: every RMSNorm. `rope_theta`: base of the 2D rotary.
    `pos_embed_grid`: side of a learned square position grid resized to each image (None: rotary
    positions only). `mask_token`: a learned token that replaces masked patches (stage-1 MIM).
    `merge_size`: side of the patch merger's blocks (None: no merger), which maps to
    `out_hidden_size` through an MLP of `merger_hidden`. `recompute`: activation recompute of the
    blocks ("none", "selective", "full"; see `CogViT.apply_memory_policy`).
    """

    depth: int = 24
    width: int = 1024
    num_heads: int = 16
    mlp_hidden: int = 4096
    patch_size: int = 14
    temporal_patch_size: int = 1
    in_channels: int = 3
    bias: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    pos_embed_grid: int | None = None
    mask_token: bool = False
    merge_size: int | None = 2
    out_hidden_size: int = 1536
    merger_hidden: int = 4608
    recompute: str = "none"

    def __post_init__(self):
        check_ints(self, ("depth", "width", "num_heads", "mlp_hidden", "patch_size", "temporal_patch_size",
                          "in_channels", "out_hidden_size", "merger_hidden"), optional=("pos_embed_grid", "merge_size"))
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be a multiple of num_heads ({self.num_heads})")
        if self.head_dim % 8 or not 16 <= self.head_dim <= 128:
            raise ValueError(f"head dim width / num_heads = {self.head_dim} must be a multiple of 8 in [16, 128]")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"norm_eps and rope_theta must be > 0, got {self.norm_eps!r} and {self.rope_theta!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def frame_dim(self) -> int:
        """Length of a single-frame patch row: patch_size² · in_channels."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def patch_dim(self) -> int:
        """Length of a full patch row: temporal_patch_size · frame_dim."""
        return self.temporal_patch_size * self.frame_dim


def cogvit_tiny(**overrides) -> CogViTConfig:
    """2 blocks of width 64 (4 heads of 16), patch 14, a 4×4 learned position grid, mask token and
    a 2×2 merger to 32 channels: for tests and CPU runs."""
    base = CogViTConfig(depth=2, width=64, num_heads=4, mlp_hidden=128, pos_embed_grid=4, mask_token=True,
                        out_hidden_size=32, merger_hidden=96)
    return dataclasses.replace(base, **overrides)


def cogvit_l(**overrides) -> CogViTConfig:
    """CogViT-L: 24 blocks of width 1024, 16 heads, MLP 4096, patch 14 (403M parameters in the
    blocks), GLM-OCR's 2×2 merger to 1536 channels."""
    return dataclasses.replace(CogViTConfig(), **overrides)


@dataclass
class CogViTOutput:
    """features: (T, width) patch features after the final norm, in the input's token order.
    merged: (T / merge_size², out_hidden_size) LLM embeddings (None without a merger), image by
    image, row-major over each image's merged grid."""

    features: torch.Tensor
    merged: torch.Tensor | None = None


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)): (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CogViTBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); x (T, width)."""

    def __init__(self, config: CogViTConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.attn = QKNormAttention(config.width, config.num_heads, qk_norm="rms", bias=config.bias, causal=False,
                                    norm_eps=config.norm_eps)
        self.norm2 = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.mlp = SwiGLU(config.width, config.mlp_hidden, config.bias)

    def forward(self, x: torch.Tensor, plan: VarlenPlan, rotary_cos: torch.Tensor,
                rotary_sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), plan=plan, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """(N, merge_size² · width) concatenated blocks of tokens -> (N, out_hidden_size)."""

    def __init__(self, config: CogViTConfig):
        super().__init__()
        out = config.out_hidden_size
        self.downsample = nn.Linear(config.merge_size**2 * config.width, out)
        self.proj = nn.Linear(out, out, bias=False)
        self.norm = nn.LayerNorm(out)
        self.mlp = SwiGLU(out, config.merger_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.gelu(self.norm(self.proj(self.downsample(x)))))


def merge_slots(position_ids: torch.Tensor, spatial_shapes: torch.Tensor, cu_seqlens: torch.Tensor,
                merge_size: int) -> torch.Tensor:
    """(T,) int64: where each token goes when the tokens are laid out block-major, i.e. merged
    token j owns rows j·m² … (j + 1)·m² − 1 in (row, col) order within its m×m block, merged
    tokens image by image and row-major over each image's merged grid (GLM-OCR's token order).

    position_ids (T, 2) (row, col) within the image; spatial_shapes (n, 2) (rows, cols), each a
    multiple of merge_size; cu_seqlens (n + 1,). Runs on the tensors' device without a host sync,
    for tokens in any order within their image."""
    device, total = position_ids.device, position_ids.shape[0]
    starts = cu_seqlens.to(device=device, dtype=torch.long)
    image = torch.repeat_interleave(torch.arange(starts.shape[0] - 1, device=device), starts.diff(),
                                    output_size=total)
    m = merge_size
    row, col = position_ids.long().unbind(1)
    merged_cols = spatial_shapes.to(device=device, dtype=torch.long)[image, 1] // m
    merged = starts[image] // (m * m) + (row // m) * merged_cols + col // m
    return merged * (m * m) + (row % m) * m + col % m


def _check_images(images, config: CogViTConfig) -> None:
    if not isinstance(images, PackedImages):
        raise TypeError(f"images must be a glm5v_kernels.data.PackedImages, got {type(images).__name__}")
    patches = images.patches
    if patches.ndim != 2 or not patches.is_floating_point():
        raise ValueError(f"images.patches must be a 2-D floating tensor, got {patches.dtype} {tuple(patches.shape)}")
    if patches.shape[0] == 0 or images.num_images == 0:
        raise ValueError("images is empty: pass at least one image with at least one patch")
    if patches.shape[1] not in (config.patch_dim, config.frame_dim):
        frames = f" or {config.frame_dim} (one frame)" if config.temporal_patch_size > 1 else ""
        raise ValueError(f"images.patches rows must have {config.patch_dim} values{frames} (patch_size="
                         f"{config.patch_size}, temporal_patch_size={config.temporal_patch_size}, in_channels="
                         f"{config.in_channels}), got {patches.shape[1]}")
    if images.position_ids.shape != (patches.shape[0], 2):
        raise ValueError(f"images.position_ids must have shape (T={patches.shape[0]}, 2), got "
                         f"{tuple(images.position_ids.shape)}")
    if images.spatial_shapes.shape != (images.num_images, 2) or images.cu_seqlens.shape != (images.num_images + 1,):
        raise ValueError(f"images.spatial_shapes (n, 2) and images.cu_seqlens (n + 1,) disagree: "
                         f"{tuple(images.spatial_shapes.shape)} and {tuple(images.cu_seqlens.shape)}")
    if images.spatial_shapes.device.type != "cpu" or images.cu_seqlens.device.type != "cpu":
        return  # their values are checked where they are on the host (no device sync)
    shapes, bounds = images.spatial_shapes.tolist(), images.cu_seqlens.tolist()
    for i, ((h, w), a, b) in enumerate(zip(shapes, bounds[:-1], bounds[1:])):
        if h * w != b - a:
            raise ValueError(f"image {i}: spatial_shapes {h}x{w} = {h * w} patches but cu_seqlens gives {b - a}")
        if config.merge_size is not None and (h % config.merge_size or w % config.merge_size):
            raise ValueError(f"image {i}: its {h}x{w} patch grid is not a multiple of merge_size={config.merge_size} "
                             "(pack with NaFlexProcessor(merge_size=...))")


class CogViT(nn.Module):
    """The vision encoder; see the module docstring for the layout and `CogViTConfig`."""

    def __init__(self, config: CogViTConfig):
        super().__init__()
        if not isinstance(config, CogViTConfig):
            raise TypeError(f"config must be a CogViTConfig, got {type(config).__name__}")
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.width)
        self.mask_token = nn.Parameter(torch.empty(config.width)) if config.mask_token else None
        grid = config.pos_embed_grid
        self.pos_embed = nn.Parameter(torch.empty(grid, grid, config.width)) if grid is not None else None
        self.blocks = nn.ModuleList(CogViTBlock(config) for _ in range(config.depth))
        self.norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.merger = PatchMerger(config) if config.merge_size is not None else None
        # (h, w) -> resized position grid, valid for the pos_embed version stored beside it
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._pos_cache_key: tuple | None = None
        self.reset_parameters()
        if config.recompute != "none":
            self.apply_memory_policy(config.recompute)

    def reset_parameters(self) -> None:
        """Linear weights, mask token and position grid ~ N(0, 0.02²); biases 0; norms 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for param in (self.mask_token, self.pos_embed):
            if param is not None:
                nn.init.normal_(param, std=0.02)

    def apply_memory_policy(self, recompute: str = "selective", *, offload: str | None = None,
                            pool: PinnedPool | None = None, every: int = 1, keep_last: int = 1) -> int:
        """Recompute the activations of the blocks in backward and optionally offload what they
        keep to pinned host memory (`glm5v_kernels.memory`: offload "inputs" or "saved", into
        `pool`; CUDA tensors only): every `every`-th block but the last `keep_last`. Returns how
        many blocks were wrapped."""
        return apply_memory_policy(self, CogViTBlock, recompute=recompute, offload=offload, pool=pool, every=every,
                                   keep_last=keep_last)

    def forward(self, images: PackedImages, mask: torch.Tensor | None = None, *,
                plan: VarlenPlan | None = None) -> CogViTOutput:
        """images: PackedImages with T patches over n images (rows of patch_dim, or of frame_dim for
        still images; see the module docstring). Its cu_seqlens and spatial_shapes are best left
        on the CPU while patches and position_ids go to the device: they are read on the host.
        mask: optional (T,) bool, True where a patch is replaced by the learned mask token.
        plan: `varlen_plan(images.cu_seqlens)` if the caller already has one; else built here,
        once, and shared by every block.
        Returns CogViTOutput(features (T, width), merged (T / merge_size², out_hidden_size) or None).
        """
        config = self.config
        _check_images(images, config)
        patches = images.patches
        total = patches.shape[0]
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("mask was given but this CogViT has no mask token (CogViTConfig(mask_token=True))")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (total,):
                raise ValueError(f"mask must be a (T={total},) bool tensor, got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
            if mask.device != patches.device:
                raise ValueError(f"mask is on {mask.device}, images.patches on {patches.device}")
        if plan is None:
            plan = varlen_plan(images.cu_seqlens, images.max_seqlen, device=patches.device)

        x = self._embed(patches)
        if mask is not None:
            x = torch.where(mask[:, None], self.mask_token.to(x.dtype), x)
        position_ids = images.position_ids.to(patches.device)
        if self.pos_embed is not None:
            x = x + self._position_embeddings(images, position_ids).to(x.dtype)
        cos, sin = rotary_2d(position_ids, config.head_dim, config.rope_theta)
        for block in self.blocks:
            x = block(x, plan, cos, sin)
        x = self.norm(x)
        if self.merger is None:
            return CogViTOutput(features=x)
        slots = merge_slots(position_ids, images.spatial_shapes, images.cu_seqlens, config.merge_size)
        grouped = x.new_empty(x.shape).index_copy(0, slots, x)
        return CogViTOutput(features=x, merged=self.merger(grouped.view(total // config.merge_size**2, -1)))

    def _embed(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embed.weight
        if patches.shape[1] != weight.shape[1]:  # single-frame rows of still images: the frames are equal
            weight = weight.view(weight.shape[0], self.config.temporal_patch_size, -1).sum(1)
        return F.linear(patches.to(weight.dtype), weight, self.patch_embed.bias)

    def _resized_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position grid resized to grid (h, w): (h·w, width). Kept across calls only where
        no gradient flows to it (a cached tensor cannot carry a graph from one step to the next),
        and dropped whenever the parameter changes (its version counter moves on every in-place
        update: optimizer steps, load_state_dict)."""
        param = self.pos_embed
        if torch.is_grad_enabled() and param.requires_grad:
            return interpolate_pos_embed(param, grid)
        key = (param._version, param.data_ptr(), param.dtype, param.device)
        if key != self._pos_cache_key:
            self._pos_cache, self._pos_cache_key = {}, key
        if grid not in self._pos_cache:
            self._pos_cache[grid] = interpolate_pos_embed(param.detach(), grid)
        return self._pos_cache[grid]

    def _position_embeddings(self, images: PackedImages, position_ids: torch.Tensor) -> torch.Tensor:
        """(T, width): every token's row of its image's resized position grid, each distinct (h, w)
        resized once per call."""
        shapes = [tuple(s) for s in images.spatial_shapes.tolist()]
        distinct = list(dict.fromkeys(shapes))
        offsets, start = {}, 0
        for h, w in distinct:
            offsets[(h, w)], start = start, start + h * w
        table = torch.cat([self._resized_pos_embed(grid) for grid in distinct])
        meta = torch.tensor([(offsets[s], s[1]) for s in shapes], dtype=torch.long).to(position_ids.device)
        starts = images.cu_seqlens.to(device=position_ids.device, dtype=torch.long)
        image = torch.repeat_interleave(torch.arange(len(shapes), device=position_ids.device), starts.diff(),
                                        output_size=position_ids.shape[0])
        row, col = position_ids.long().unbind(1)
        # Images of one shape read the same rows. An embedding lookup's backward sums their
        # gradients in a fixed order on the CPU and on CUDA (sorted); advanced indexing's does not
        # on several CPU threads (index_put with accumulate), nor index_select's on CUDA (atomics).
        return F.embedding(meta[image, 0] + row * meta[image, 1] + col, table)

    @classmethod
    def from_glm_ocr(cls, source, **overrides) -> CogViT:
        """A CogViT holding the vision tower of a GLM-OCR checkpoint (transformers' GlmOcrVisionModel).

        source: a state dict (of GlmOcrVisionModel, or of a whole GLM-OCR model: the vision keys are
        found by their prefix), a .safetensors or torch file, or a checkpoint directory (its
        *.safetensors files, else its *.bin / *.pt files; its config.json supplies the norm eps and
        rotary base, which the weights do not carry). The shape of the tower comes from the
        weights; overrides set other CogViTConfig fields (e.g. mask_token=True or a
        pos_embed_grid: the parameters they add start fresh).
        """
        state, vision_json = _read_glm_ocr(source)
        config = _glm_ocr_config(state, vision_json, overrides)
        model = cls(config)
        converted = _convert_glm_ocr(state, config)
        fresh = {name for name in ("mask_token", "pos_embed") if getattr(model, name) is not None}
        result = model.load_state_dict(converted, strict=False)
        missing = set(result.missing_keys) - fresh
        if missing or result.unexpected_keys:
            raise ValueError(f"GLM-OCR weights do not fit: missing {sorted(missing)[:6]}, unexpected "
                             f"{sorted(result.unexpected_keys)[:6]}")
        return model


_GLM_PATCH_KEY = "patch_embed.proj.weight"
# GLM-OCR vision-tower parameter names -> CogViT's; patch embedding and downsampling are reshaped.
_GLM_RENAMES = [
    (r"patch_embed\.proj\.", "patch_embed."),
    (r"blocks\.(\d+)\.attn\.([qk])_norm\.weight", r"blocks.\1.attn.\2_norm_weight"),
    (r"post_layernorm\.", "norm."),
    (r"downsample\.", "merger.downsample."),
    (r"merger\.post_projection_norm\.", "merger.norm."),
    (r"merger\.(gate|up|down)_proj\.", r"merger.mlp.\1_proj."),
]


def _vision_prefix(keys) -> str:
    prefixes = {k[: -len(_GLM_PATCH_KEY)] for k in keys if k.endswith(_GLM_PATCH_KEY)}
    if len(prefixes) != 1:
        raise ValueError(f"expected the weights of one GLM-OCR vision tower (a key ending in {_GLM_PATCH_KEY!r}), "
                         f"found {len(prefixes)}")
    return prefixes.pop()


def _read_glm_ocr(source) -> tuple[dict[str, torch.Tensor], dict]:
    """(vision-tower state dict with its prefix removed, the vision_config of config.json or {})."""
    if isinstance(source, Mapping):
        prefix = _vision_prefix(source.keys())
        return {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}, {}
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a state dict, a file or a directory, got {type(source).__name__}")
    path = Path(source)
    vision_json = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            full = json.loads((path / "config.json").read_text())
            vision_json = full.get("vision_config", full)
        files = sorted(path.glob("*.safetensors")) or sorted([*path.glob("*.bin"), *path.glob("*.pt")])
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"source {str(path)!r} is neither a file nor a directory")
    if not files:
        raise ValueError(f"no .safetensors, .bin or .pt files in {str(path)!r}")
    state = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                # only the vision tower's tensors are read from a whole-model shard
                state.update({k: handle.get_tensor(k) for k in handle.keys() if _looks_visual(k)})
        else:
            state.update({k: v for k, v in torch.load(file, map_location="cpu", weights_only=True).items()
                          if _looks_visual(k)})
    prefix = _vision_prefix(state.keys())
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, vision_json


def _looks_visual(key: str) -> bool:
    return "language_model" not in key and "lm_head" not in key and "embed_tokens" not in key


def _glm_ocr_config(state: dict[str, torch.Tensor], vision_json: dict, overrides: dict) -> CogViTConfig:
    required = [_GLM_PATCH_KEY, "blocks.0.attn.q_norm.weight", "blocks.0.mlp.gate_proj.weight", "downsample.weight",
                "merger.gate_proj.weight"]
    if any(key not in state for key in required):
        raise ValueError(f"not a GLM-OCR vision tower: missing {[k for k in required if k not in state]}")
    patch = state[_GLM_PATCH_KEY]  # (width, in_channels, t, p, p)
    width, in_channels, temporal, patch_size, _ = patch.shape
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    downsample = state["downsample.weight"]  # (out, width, m, m)
    rope = vision_json.get("rope_parameters") or {}
    fields = dict(
        depth=depth, width=width, num_heads=width // head_dim,
        mlp_hidden=state["blocks.0.mlp.gate_proj.weight"].shape[0], patch_size=patch_size,
        temporal_patch_size=temporal, in_channels=in_channels,
        bias="blocks.0.attn.qkv.bias" in state, norm_eps=float(vision_json.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", 10000.0)), pos_embed_grid=None, mask_token=False,
        merge_size=downsample.shape[-1], out_hidden_size=downsample.shape[0],
        merger_hidden=state["merger.gate_proj.weight"].shape[0])
    return CogViTConfig(**{**fields, **overrides})


def _convert_glm_ocr(state: dict[str, torch.Tensor], config: CogViTConfig) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state.items():
        for pattern, replacement in _GLM_RENAMES:
            key = re.sub(rf"^{pattern}", replacement, key)
        if key == "patch_embed.weight":  # Conv3d (o, c, t, p, p) -> linear over (t, p, p, c) rows
            value = value.permute(0, 2, 3, 4, 1).reshape(value.shape[0], -1)
        elif key == "merger.downsample.weight":  # Conv2d (o, c, m, m) -> linear over (m, m, c) blocks
            value = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
        converted[key] = value
    if config.merge_size is None:
        converted = {k: v for k, v in converted.items() if not k.startswith("merger.")}
    return converted


def _glm_ocr_merge_size(config: CogViTConfig) -> int:
    if not isinstance(config, CogViTConfig) or config.merge_size is None:
        raise ValueError("config must be a CogViTConfig with a merge_size (GLM-OCR orders tokens by merged blocks)")
    return config.merge_size


def glm_ocr_inputs(images: PackedImages, config: CogViTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PackedImages -> GlmOcrVisionModel's input: pixel_values (T, c·t·p·p) and grid_thw (n, 3).

    Each packed sequence becomes one grid_thw entry (1, h, w) (GLM-OCR attends within each
    temporal patch, so a video packed frame by frame stays equivalent); tokens are reordered
    block-major (`merge_slots`) and each row laid out (channel, frame, row, col), single-frame
    rows repeated over the temporal_patch_size frames."""
    merge_size = _glm_ocr_merge_size(config)
    _check_images(images, config)
    patches, total, t = images.patches, images.patches.shape[0], config.temporal_patch_size
    frames = patches.view(total, -1, config.frame_dim)
    if frames.shape[1] != t:
        frames = frames.expand(total, t, config.frame_dim)
    rows = frames.reshape(total, t, -1, config.in_channels).permute(0, 3, 1, 2).reshape(total, -1)
    slots = merge_slots(images.position_ids, images.spatial_shapes, images.cu_seqlens, merge_size)
    pixel_values = rows.new_empty(rows.shape).index_copy(0, slots.to(rows.device), rows)
    ones = torch.ones(images.num_images, 1, dtype=torch.long)
    return pixel_values, torch.cat([ones, images.spatial_shapes.long().cpu()], dim=1)


def packed_from_glm_ocr(pixel_values: torch.Tensor, grid_thw: torch.Tensor, config: CogViTConfig) -> PackedImages:
    """GlmOcrVisionModel's input (pixel_values (N, c·t·p·p) block-major, grid_thw (n, 3)) ->
    PackedImages with one sequence per temporal patch (an entry with t > 1, a video, becomes t
    consecutive sequences of h·w patches), rows (frame, row, col, channel), tokens row-major.
    `glm5v_kernels.data.pack_video`'s PackedVideos holds this layout: pass its patches and
    grid_thw."""
    merge_size = _glm_ocr_merge_size(config)
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or not len(grid_thw):
        raise ValueError(f"grid_thw must be a non-empty (n, 3) tensor, got {getattr(grid_thw, 'shape', grid_thw)}")
    grids = [tuple(g) for g in grid_thw.tolist()]
    if any(t < 1 or h < 1 or w < 1 or h % merge_size or w % merge_size for t, h, w in grids):
        raise ValueError(f"grid_thw entries must be >= 1 with h and w multiples of merge_size={merge_size}, got "
                         f"{grids}")
    frames = [(h, w) for t, h, w in grids for _ in range(t)]
    total = sum(h * w for h, w in frames)
    if pixel_values.ndim != 2 or pixel_values.shape != (total, config.patch_dim):
        raise ValueError(f"pixel_values must have shape (N={total}, {config.patch_dim}) for grid_thw {grids}, got "
                         f"{tuple(pixel_values.shape)}")
    lengths = torch.tensor([h * w for h, w in frames])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    position_ids = torch.cat([torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
                              .reshape(-1, 2) for h, w in frames]).to(torch.int32)
    spatial_shapes = torch.tensor(frames, dtype=torch.int32)
    slots = merge_slots(position_ids, spatial_shapes, cu_seqlens, merge_size).to(pixel_values.device)
    rows = pixel_values.view(total, config.in_channels, config.temporal_patch_size, -1).permute(0, 2, 3, 1)
    patches = rows.reshape(total, -1)[slots]
    return PackedImages(patches, cu_seqlens, spatial_shapes, position_ids.to(pixel_values.device),
                        int(lengths.max()))
