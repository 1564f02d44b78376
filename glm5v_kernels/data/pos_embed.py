"""Learned position grids resized to an image's patch grid (NaFlex: one fixed grid, any image size)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a learned position grid to an image's (rows, cols) patch grid.

    pos_embed: (gh, gw, C), or (gh * gw, C) for a square gh = gw grid, in row-major order.
    grid: (h, w) patch rows and columns of the image.
    Returns (h * w, C) in pos_embed's dtype, row-major: bilinear interpolation with antialiasing
    (so shrinking averages over the covered cells instead of skipping them) and
    align_corners=False, the resize of SigLIP2's NaFlex position grid. Computed in float32 (the
    antialiased kernels lack low-precision CPU paths) and differentiable in pos_embed.

    The function is pure: callers that resize the same grid to the same (h, w) repeatedly cache
    the result themselves (`glm5v.models.cogvit.CogViT` does, keyed by (h, w)).
    """
    if not isinstance(pos_embed, torch.Tensor):
        raise TypeError(f"pos_embed must be a torch.Tensor, got {type(pos_embed).__name__}")
    if not pos_embed.is_floating_point():
        raise TypeError(f"pos_embed must be a floating tensor, got {pos_embed.dtype}")
    if pos_embed.ndim == 2:
        side = math.isqrt(pos_embed.shape[0])
        if side * side != pos_embed.shape[0] or side == 0:
            raise ValueError(f"pos_embed of shape (N, C) must hold a square grid (N a positive square), got N = "
                             f"{pos_embed.shape[0]}; pass (gh, gw, C) for a rectangular grid")
        pos_embed = pos_embed.view(side, side, -1)
    elif pos_embed.ndim != 3 or 0 in pos_embed.shape:
        raise ValueError(f"pos_embed must have shape (gh, gw, C) or (gh * gw, C), got {tuple(pos_embed.shape)}")
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)):
        raise ValueError(f"grid must be (h, w), two ints >= 1, got {grid!r}")
    h, w = grid
    channels = pos_embed.shape[-1]
    if tuple(pos_embed.shape[:2]) == (h, w):
        return pos_embed.reshape(h * w, channels)  # the identity resize, without a float32 round trip
    table = pos_embed.permute(2, 0, 1).unsqueeze(0).float()  # (1, C, gh, gw)
    resized = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0).reshape(h * w, channels).to(pos_embed.dtype)
