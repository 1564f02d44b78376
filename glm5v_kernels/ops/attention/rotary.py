"""Rotary tables: per-token cos and sin of shape (T, rot_dim // 2), the layout `varlen_attention`
takes, for text (1D positions) and images (2D patch positions)."""

from __future__ import annotations

import torch


def _inverse_frequencies(num: int, dim: int, theta: float, device) -> torch.Tensor:
    return theta ** (-torch.arange(0, num, device=device, dtype=torch.float64) * 2.0 / dim)


def _check(rot_dim: int, multiple: int, theta: float) -> None:
    if not isinstance(rot_dim, int) or isinstance(rot_dim, bool) or rot_dim <= 0 or rot_dim % multiple:
        raise ValueError(f"rot_dim must be a positive multiple of {multiple}, got {rot_dim!r}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")


def rotary_1d(positions: torch.Tensor, rot_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (T,) integer or float token positions -> (cos, sin), each (T, rot_dim // 2) float32.

    Pair i turns by positions · theta^(-2i / rot_dim) (the Llama / GPT-NeoX frequencies)."""
    _check(rot_dim, 2, theta)
    if positions.ndim != 1:
        raise ValueError(f"positions must have shape (T,), got {tuple(positions.shape)}")
    freqs = _inverse_frequencies(rot_dim // 2, rot_dim, theta, positions.device)
    angles = positions.to(torch.float64)[:, None] * freqs
    return angles.cos().float(), angles.sin().float()


def rotary_2d(position_ids: torch.Tensor, rot_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: (T, 2) (row, col) patch positions -> (cos, sin), each (T, rot_dim // 2) float32.

    The first rot_dim/4 pairs follow the row and the last rot_dim/4 the column, with the
    frequencies theta^(-2i / (rot_dim / 2)) of a 1D rotary over rot_dim / 2 channels: the
    convention of Qwen2-VL's and GLM-4V's vision towers (`PackedImages.position_ids` fits as is)."""
    _check(rot_dim, 4, theta)
    if position_ids.ndim != 2 or position_ids.shape[1] != 2:
        raise ValueError(f"position_ids must have shape (T, 2), got {tuple(position_ids.shape)}")
    freqs = _inverse_frequencies(rot_dim // 4, rot_dim // 2, theta, position_ids.device)
    pos = position_ids.to(torch.float64)
    angles = torch.cat((pos[:, :1] * freqs, pos[:, 1:] * freqs), dim=-1)
    return angles.cos().float(), angles.sin().float()
