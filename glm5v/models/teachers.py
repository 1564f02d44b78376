"""Frozen teachers for stage-1 masked distillation: transformers' SigLIP, SigLIP2, DINOv2 (with or
without registers) and DINOv3 vision models behind one interface returning patch features on a
grid, CLS and register tokens stripped, resized to the student's grid when the grids differ."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glm5v_kernels.data import interpolate_pos_embed

# transformers model class -> the config attribute counting register tokens (None: no registers)
# and whether a CLS token leads the sequence.
_FAMILIES = {
    "SiglipVisionModel": (None, False),
    "Siglip2VisionModel": (None, False),
    "Dinov2Model": (None, True),
    "Dinov2WithRegistersModel": ("num_register_tokens", True),
    "DINOv3ViTModel": ("num_register_tokens", True),
}
# config.json model_type -> model class (whole SigLIP checkpoints load their vision tower)
_MODEL_TYPES = {
    "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel", "siglip2_vision_model": "Siglip2VisionModel",
    "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel", "dinov3_vit": "DINOv3ViTModel",
}


@dataclass
class TeacherFeatures:
    """features: (T, C) patch features, image by image, row-major over each image's grid.
    grids: the (rows, cols) grid of every image (the student's grids when they were given).
    cu_seqlens: (n + 1,) int32 on the CPU, image i owns features[cu_seqlens[i]:cu_seqlens[i + 1]]."""

    features: torch.Tensor
    grids: list[tuple[int, int]]
    cu_seqlens: torch.Tensor


def grids_align(teacher: tuple[int, int], student: tuple[int, int], slack: int) -> bool:
    """Whether two grids can show the same picture: each side of each grid may be off by up to
    `slack` cells from rounding the picture to whole patches (or merge units), so their aspect
    ratios must admit a common value within those bounds."""
    def bounds(grid):
        h, w = grid
        return (h - slack) / (w + slack), (h + slack) / (w - slack) if w > slack else float("inf")

    (lo_t, hi_t), (lo_s, hi_s) = bounds(teacher), bounds(student)
    return lo_t <= hi_s and lo_s <= hi_t


class VisionTeacher(nn.Module):
    """A frozen vision model (eval mode, no gradients) as a distillation teacher.

    model: a transformers SiglipVisionModel, Siglip2VisionModel, Dinov2Model,
    Dinov2WithRegistersModel or DINOv3ViTModel. grid_slack: cells of rounding allowed per side
    when checking that the teacher's grid and the student's show the same picture
    (`grids_align`; NaFlex grids round sides to merge units, 2 cells for a 2×2 merger).
    """

    def __init__(self, model: nn.Module, grid_slack: int = 2):
        super().__init__()
        family = type(model).__name__
        if family not in _FAMILIES:
            raise TypeError(f"model must be one of {sorted(_FAMILIES)}, got {family}")
        if not isinstance(grid_slack, int) or grid_slack < 0:
            raise ValueError(f"grid_slack must be an int >= 0, got {grid_slack!r}")
        registers, cls_token = _FAMILIES[family]
        config = model.config
        self.model = model.eval().requires_grad_(False)
        self.family, self.grid_slack = family, grid_slack
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.num_prefix_tokens = int(cls_token) + (int(getattr(config, registers)) if registers else 0)

    @classmethod
    def from_config(cls, config, grid_slack: int = 2) -> VisionTeacher:
        """A teacher with random weights built from a transformers config (SiglipVisionConfig,
        Siglip2VisionConfig, Dinov2Config, Dinov2WithRegistersConfig, DINOv3ViTConfig)."""
        import transformers

        name = _MODEL_TYPES.get(getattr(config, "model_type", None))
        if name is None:
            raise TypeError(f"config must be the config of one of {sorted(_FAMILIES)}, got {type(config).__name__}")
        return cls(getattr(transformers, name)(config), grid_slack)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, grid_slack: int = 2) -> VisionTeacher:
        """A teacher loaded from a local checkpoint directory (never downloads); whole SigLIP /
        SigLIP2 checkpoints load their vision tower."""
        import transformers

        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{str(path)!r} is not a checkpoint directory with a config.json")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"{str(path)!r} holds a {model_type!r} model; teachers are {sorted(_MODEL_TYPES)}")
        model_cls = getattr(transformers, _MODEL_TYPES[model_type])
        return cls(model_cls.from_pretrained(str(path), local_files_only=True, dtype=dtype), grid_slack)

    def train(self, mode: bool = True) -> VisionTeacher:
        return self  # frozen: stays in eval mode whatever the trainer sets

    @torch.no_grad()
    def forward(self, images, grids: Sequence[tuple[int, int]] | None = None) -> TeacherFeatures:
        """images: (B, 3, H, W) or a list of (3, H_i, W_i) float tensors, resized and normalised as
        the teacher expects, each side a multiple of its patch size. grids: optional (rows, cols)
        of the student for every image: features are then resized to those grids (bilinear,
        antialiased, align_corners=False over the grid) where they differ.
        Returns TeacherFeatures with (T, hidden_size) features."""
        images = self._check_images(images)
        own = [(im.shape[1] // self.patch_size, im.shape[2] // self.patch_size) for im in images]
        if grids is not None:
            grids = [tuple(int(n) for n in g) for g in grids]
            if len(grids) != len(images):
                raise ValueError(f"grids has {len(grids)} entries for {len(images)} images")
            for i, (teacher, student) in enumerate(zip(own, grids)):
                if len(student) != 2 or min(student) < 1:
                    raise ValueError(f"grids[{i}] must be (rows, cols) >= 1, got {student}")
                if not grids_align(teacher, student, self.grid_slack):
                    raise ValueError(
                        f"image {i}: the teacher's {teacher[0]}x{teacher[1]} grid and the student's "
                        f"{student[0]}x{student[1]} grid cannot show the same picture (aspect ratios differ by more "
                        f"than {self.grid_slack} cells of rounding per side): feed the teacher the student's crop")
        per_image = self._encode(images, own)
        out_grids = own if grids is None else grids
        features = [f if g == t else interpolate_pos_embed(f.view(*t, -1), g)
                    for f, t, g in zip(per_image, own, out_grids)]
        lengths = torch.tensor([0] + [h * w for h, w in out_grids])
        return TeacherFeatures(torch.cat(features), out_grids, lengths.cumsum(0).to(torch.int32))

    def _check_images(self, images) -> list[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"images must be (B, 3, H, W) or a list of (3, H, W) tensors, got shape "
                                 f"{tuple(images.shape)}")
            images = list(images)
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty batch or list of image tensors")
        p = self.patch_size
        for i, im in enumerate(images):
            if not isinstance(im, torch.Tensor) or im.ndim != 3 or im.shape[0] != 3 or not im.is_floating_point():
                raise ValueError(f"images[{i}] must be a float (3, H, W) tensor, got "
                                 f"{getattr(im, 'dtype', type(im).__name__)} {tuple(getattr(im, 'shape', ()))}")
            if im.shape[1] % p or im.shape[2] % p or min(im.shape[1:]) < p:
                raise ValueError(f"images[{i}] is {im.shape[1]}x{im.shape[2]}: each side must be a positive multiple "
                                 f"of the teacher's patch size {p} (the model would drop the remainder and misplace "
                                 "features)")
        return list(images)

    def _encode(self, images: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Every image's (h·w, C) patch features at the teacher's own grid."""
        dtype = next(self.model.parameters()).dtype
        if self.family == "Siglip2VisionModel":
            return self._encode_naflex(images, grids, dtype)
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(tuple(im.shape), []).append(i)
        for size, index in by_size.items():  # one batched call per image size
            batch = torch.stack([images[i] for i in index]).to(dtype)
            kwargs = {"interpolate_pos_encoding": True} if self.family == "SiglipVisionModel" else {}
            hidden = self.model(pixel_values=batch, **kwargs).last_hidden_state
            h, w = size[1] // self.patch_size, size[2] // self.patch_size
            if hidden.shape[1] != self.num_prefix_tokens + h * w:
                raise RuntimeError(f"{self.family} returned {hidden.shape[1]} tokens for a {h}x{w} grid with "
                                   f"{self.num_prefix_tokens} CLS/register tokens")
            for j, i in enumerate(index):
                out[i] = hidden[j, self.num_prefix_tokens:]
        return out

    def _encode_naflex(self, images, grids, dtype) -> list[torch.Tensor]:
        """SigLIP2 takes padded rows of patches, each flattened (row, col, channel)."""
        p, longest = self.patch_size, max(h * w for h, w in grids)
        rows = [im.reshape(3, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
                for im, (h, w) in zip(images, grids)]
        pixel_values = torch.stack([F.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows]).to(dtype)
        mask = torch.stack([torch.arange(longest) < r.shape[0] for r in rows]).to(torch.int32)
        spatial_shapes = torch.tensor(grids, dtype=torch.long)
        hidden = self.model(pixel_values=pixel_values, pixel_attention_mask=mask.to(pixel_values.device),
                            spatial_shapes=spatial_shapes.to(pixel_values.device)).last_hidden_state
        return [hidden[i, : r.shape[0]] for i, r in enumerate(rows)]
