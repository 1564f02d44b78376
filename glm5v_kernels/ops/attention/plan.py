"""Work lists for varlen attention, built once per batch and reused by every layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Every block size the attention kernels' configurations use (ops/attention/triton.py).
PLAN_BLOCKS = (64, 128)


@dataclass(frozen=True)
class VarlenPlan:
    """A batch's packed-sequence layout and, per kernel block size, its work list.

    cu_seqlens: (B + 1,) int32 on the device of the tensors; max_seqlen: the longest sequence;
    seqlens: the lengths on the host. `work(block)` is an int32 (n, 2) tensor on the device with
    one (sequence index, block start) row per block of `block` queries (or keys), heaviest
    sequences first so the longest programs start early.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    seqlens: tuple[int, ...]
    works: dict[int, torch.Tensor] = field(repr=False)

    def work(self, block: int) -> torch.Tensor | None:
        return self.works.get(block)


def _host_bounds(cu_seqlens) -> list[int]:
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} of shape "
                             f"{tuple(cu_seqlens.shape)}")
        return cu_seqlens.tolist()
    if isinstance(cu_seqlens, Sequence) and all(isinstance(b, int) and not isinstance(b, bool) for b in cu_seqlens):
        return list(cu_seqlens)
    raise TypeError(f"cu_seqlens must be an int32 tensor or a sequence of ints, got {type(cu_seqlens).__name__}")


def varlen_plan(cu_seqlens, max_seqlen: int | None = None, *, device: torch.device | str | None = None) -> VarlenPlan:
    """Plan the attention programs of one packed batch.

    cu_seqlens: (B + 1,) int32 tensor (its values are read once on the host: pass a CPU copy, e.g.
    `PackedImages.cu_seqlens` before it moves to the GPU, to avoid a device sync) or a list of
    ints. max_seqlen: checked against the lengths when given. device: where the plan's tensors
    live (default: cu_seqlens' device).
    """
    bounds = _host_bounds(cu_seqlens)
    if len(bounds) < 2 or bounds[0] != 0:
        raise ValueError(f"cu_seqlens must have at least 2 entries and start at 0, got {bounds[:4]}...")
    seqlens = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if min(seqlens) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing; sequence {seqlens.index(min(seqlens))} has negative "
                         "length")
    longest = max(seqlens)
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or max_seqlen < longest):
        raise ValueError(f"max_seqlen={max_seqlen!r} is smaller than the longest sequence ({longest})")
    if device is None:
        device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else "cpu"
    order = sorted(range(len(seqlens)), key=lambda i: -seqlens[i])
    works = {}
    for block in PLAN_BLOCKS:
        rows = [(i, start) for i in order for start in range(0, seqlens[i], block)]
        works[block] = torch.tensor(rows, dtype=torch.int32).reshape(-1, 2).to(device)
    device_bounds = torch.tensor(bounds, dtype=torch.int32, device=device)
    return VarlenPlan(device_bounds, longest if max_seqlen is None else max_seqlen, seqlens, works)
