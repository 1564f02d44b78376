"""NaFlex on the GPU: csrc/cuda/naflex.cu loaded through CuPy (NVRTC), launched once per batch.

The source is compiled once per device (``cupy.RawModule``, cached here and on disk by CuPy) with
``--fmad=false``, so the device rounds exactly as the host path does (both run
csrc/common/naflex_math.h). The kernel runs on the current torch stream of the target device
(``cupy.cuda.ExternalStream``); outputs are torch tensors handed to CuPy through DLPack, no copies.
Frames already on the GPU (uint8 (C, H, W) or (H, W) tensors, any strides) are read in place; CPU
frames are gathered into one pinned buffer and copied to the GPU in one transfer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glm5v_kernels._backend import host_module
from glm5v_kernels.data.naflex import RESAMPLE_FILTERS

PACKAGED_CSRC = Path(__file__).resolve().parents[1] / "_csrc"  # a built package's copy (setup.py)
REPOSITORY_CSRC = Path(__file__).resolve().parents[2] / "csrc"  # an editable install's sources
CSRC = PACKAGED_CSRC if (PACKAGED_CSRC / "cuda").is_dir() else REPOSITORY_CSRC
SOURCE = CSRC / "cuda" / "naflex.cu"
KERNEL = "naflex_pack_frames"
# Compile options: the include root of "../common/naflex_math.h" and exact IEEE rounding.
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", f"-I{CSRC / 'cuda'}")
MAX_PATCH_SIZE = 24  # one thread per pixel; kMaxThreads = 576 in naflex.cu
SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90
# Preferred most per block: three blocks per SM (228 KiB per SM, 1 KiB of it reserved per block).
SHARED_TARGET = 75 * 1024
DEFAULT_SHARED = 48 * 1024  # more than this needs an opt-in attribute
CHUNK = 128  # the most input rows (or columns) of the first pass per shared-memory chunk
VECTOR_BYTES = 16  # naflex_math::kVectorBytes: the kernel's vector loads
FRAME_FIELDS = 12  # kFrameFields in naflex.cu


@dataclass(frozen=True)
class SharedPlan:
    """Launch parameters that size the kernel's dynamic shared memory (see shared_memory_plan)."""

    ksize: int  # taps of the widest resampling window of the batch
    chunk: int  # input positions along B staged and resampled per step
    tile_offset: int  # bytes before the staged tile
    shared: int  # dynamic shared memory bytes per block


def import_cupy():
    """The cupy module, or an ImportError that says how to install it."""
    try:
        import cupy
    except ImportError as error:
        raise ImportError("device='cuda' runs the NaFlex CUDA kernel through CuPy, which is not installed: "
                          "pip install 'glm5v[cuda]' (cupy-cuda13x)") from error
    return cupy


def kernel_source() -> str:
    if not SOURCE.is_file():
        raise FileNotFoundError(f"the NaFlex CUDA source {SOURCE} is missing: reinstall glm5v (a built package carries "
                                "it in glm5v_kernels/_csrc/, an editable install reads csrc/)")
    return SOURCE.read_text()


@functools.cache
def _kernel(device_index: int):
    cupy = import_cupy()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(), options=NVRTC_OPTIONS, backend="nvrtc")
        return module.get_function(KERNEL)


def _check_gpu(device: torch.device) -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is "
                           "False); use device='cpu'")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return index


def check_device_frame(frame: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """A uint8 (C, H, W) or (H, W) CUDA tensor on device, checked; returned as (C, H, W)."""
    index = _check_gpu(device)
    if frame.device.index != index:
        raise ValueError(f"{name} is on {frame.device}, not on cuda:{index} where the packing runs")
    if frame.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 on the GPU (decoded pixels), got {frame.dtype}")
    if frame.ndim == 2:
        frame = frame.unsqueeze(0)
    if frame.ndim != 3 or frame.shape[0] not in (1, 3, 4):
        raise ValueError(f"{name} must be a (C, H, W) tensor with C in 1, 3, 4, or (H, W); got {tuple(frame.shape)}")
    if frame.shape[1] == 0 or frame.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(frame.shape)}")
    return frame


def _frame_layouts(frames: list) -> np.ndarray:
    """(n, 5) int64 (height, width, stride_h, stride_w, stride_c) of every frame as the kernel reads it:
    GPU frames in place, CPU frames as the contiguous HWC copies _frame_addresses makes."""
    layouts = np.zeros((len(frames), 5), dtype=np.int64)
    for i, f in enumerate(frames):
        if isinstance(f, torch.Tensor):  # (C, H, W): element strides are byte strides for uint8
            channel_stride = f.stride(0) if f.shape[0] > 1 else 0
            layouts[i] = (f.shape[1], f.shape[2], f.stride(1), f.stride(2), channel_stride)
        else:
            height, width, channels = f.shape
            layouts[i] = (height, width, width * channels, channels, 1 if channels > 1 else 0)
    return layouts


def _frame_addresses(frames: list, index: int) -> tuple[np.ndarray, torch.Tensor | None]:
    """(n,) int64 address of pixel (0, 0) of every frame on the GPU, and the buffer the CPU frames were
    copied to (None when all are on the GPU already), each frame at a 16-byte boundary so the kernel's
    16-byte loads start at the first byte of rows whose stride allows them. The caller holds the buffer
    until the kernel is queued: freed after that on the same stream, its memory is only handed out
    again to work queued behind the kernel."""
    addresses = np.array([f.data_ptr() if isinstance(f, torch.Tensor) else 0 for f in frames], dtype=np.int64)
    host = [i for i, f in enumerate(frames) if not isinstance(f, torch.Tensor)]
    if not host:
        return addresses, None
    arrays = [np.ascontiguousarray(frames[i]) for i in host]
    offsets = np.cumsum([0] + [-(-a.nbytes // VECTOR_BYTES) * VECTOR_BYTES for a in arrays])
    staging = torch.empty(int(offsets[-1]), dtype=torch.uint8, pin_memory=True)
    for a, start in zip(arrays, offsets):
        staging.numpy()[start:start + a.nbytes] = a.reshape(-1)
    buffer = staging.to(f"cuda:{index}", non_blocking=True)
    addresses[host] = buffer.data_ptr() + offsets[:-1]
    return addresses, buffer


def shared_memory_plan(layouts: np.ndarray, targets: np.ndarray, patch_size: int, resample: str,
                       limit: int = SHARED_LIMIT) -> SharedPlan:
    """The kernel's ksize, chunk and dynamic shared memory for frames of the given (n, 5) layouts
    resized to targets (n, 2). Shared memory is

        tile_offset = round_up(3072 + 16 p + 8 p ksize + 3 p chunk, 16)   # tables, weights, intermediate
        shared = tile_offset + max over frames of tile_bytes(chunk)       # staged input tile

    with tile_bytes from naflex_math::staged_tile for the frame's strides and its widest patch span
    along A times at most chunk positions along B. The chunk is the largest up to CHUNK whose block
    fits SHARED_TARGET (several blocks per SM), else the largest that fits limit (the device's most
    per block); a ValueError, before anything is launched, when not even chunk 1 fits."""
    p = patch_size
    sizes = layouts[:, :2]
    axes = np.concatenate([np.stack([sizes[:, 0], targets[:, 0]], 1), np.stack([sizes[:, 1], targets[:, 1]], 1)])
    ksize = int(host_module().naflex_kernel_sizes(np.ascontiguousarray(axes), resample).max())
    chunks = np.arange(1, CHUNK + 1, dtype=np.int64)
    frames = np.ascontiguousarray(np.concatenate([sizes, targets, layouts[:, 2:]], 1), dtype=np.int64)
    tiles = host_module().naflex_staged_tile_bytes(frames, p, resample, chunks).max(axis=0)
    tile_offsets = -(-(3072 + 16 * p + 8 * p * ksize + 3 * p * chunks) // VECTOR_BYTES) * VECTOR_BYTES
    shared = tile_offsets + tiles
    for budget in (min(SHARED_TARGET, limit), limit):
        fits = np.flatnonzero(shared <= budget)
        if fits.size:
            best = fits[-1]
            return SharedPlan(ksize, int(chunks[best]), int(tile_offsets[best]), int(shared[best]))
    raise ValueError(f"a frame is downscaled too strongly for the GPU kernel: {ksize}-tap windows and its input "
                     f"tile need {int(shared[0])} bytes of shared memory even one position at a time, more than "
                     f"{limit} the device allows per block; use device='cpu'")


def pack_frames(frames: list, targets: np.ndarray, slots: np.ndarray, layout, total: int, processor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU side of naflex._pack_frames: same arguments and results, outputs on device."""
    index = _check_gpu(device)
    cupy = import_cupy()
    p = layout.patch_size
    if p > MAX_PATCH_SIZE:
        raise ValueError(f"patch_size must be <= {MAX_PATCH_SIZE} on the GPU (one thread per pixel), got {p}; "
                         "use device='cpu'")

    layouts = _frame_layouts(frames)
    limit = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    plan = shared_memory_plan(layouts, targets, p, processor.resample, limit)

    addresses, staged = _frame_addresses(frames, index)
    blocks = (targets[:, 0] // p) * (targets[:, 1] // p)
    table = np.zeros((len(frames), FRAME_FIELDS), dtype=np.int64)
    table[:, 0] = addresses
    table[:, 1:6] = layouts
    table[:, 6:8] = targets
    table[:, 8:11] = slots
    table[1:, 11] = np.cumsum(blocks)[:-1]

    target = torch.device("cuda", index)
    patches = torch.empty(total, layout.patch_dim, dtype=torch.float32, device=target)
    position_ids = torch.empty(total, layout.id_width, dtype=torch.int32, device=target)
    frame_table = torch.from_numpy(table).pin_memory().to(target, non_blocking=True)
    kernel = _kernel(index)
    if plan.shared > DEFAULT_SHARED:
        kernel.max_dynamic_shared_size_bytes = plan.shared
    mean, std = (np.asarray(v, dtype=np.float32) for v in (processor.image_mean, processor.image_std))
    args = (cupy.from_dlpack(frame_table), np.int32(len(frames)), np.int32(p), np.int32(layout.temporal_patch_size),
            np.int32(layout.merge_size), np.int32(layout.channel_major), np.int32(layout.id_width),
            np.int32(RESAMPLE_FILTERS.index(processor.resample)), np.int32(plan.ksize), np.int32(plan.chunk),
            np.int32(plan.tile_offset), *mean, *std,
            cupy.from_dlpack(patches), cupy.from_dlpack(position_ids))
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(target).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        kernel((int(blocks.sum()),), (p * p,), args, shared_mem=plan.shared)
    del staged, frame_table  # released only now that the kernel reading them is queued
    return patches, position_ids
