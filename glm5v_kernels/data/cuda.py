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
DEFAULT_SHARED = 48 * 1024  # more than this needs an opt-in attribute
CHUNK = 128  # input rows (or columns) of the first pass per shared-memory chunk
FRAME_FIELDS = 12  # kFrameFields in naflex.cu


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


def _frames_on_gpu(frames: list, index: int) -> tuple[np.ndarray, torch.Tensor | None]:
    """(n, 6) int64 (address, height, width, stride_h, stride_w, stride_c) of every frame on the GPU,
    and the buffer the CPU frames were copied to (None when all are on the GPU already). The caller
    holds the buffer until the kernel is queued: freed after that on the same stream, its memory is
    only handed out again to work queued behind the kernel."""
    rows = np.zeros((len(frames), 6), dtype=np.int64)
    host = [i for i, f in enumerate(frames) if not isinstance(f, torch.Tensor)]
    buffer = None
    if host:
        arrays = [np.ascontiguousarray(frames[i]) for i in host]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays])
        staging = torch.empty(int(offsets[-1]), dtype=torch.uint8, pin_memory=True)
        for a, start in zip(arrays, offsets):
            staging.numpy()[start:start + a.nbytes] = a.reshape(-1)
        buffer = staging.to(f"cuda:{index}", non_blocking=True)
        for i, a, start in zip(host, arrays, offsets):
            height, width, channels = a.shape
            rows[i] = (buffer.data_ptr() + start, height, width, width * channels, channels, 1 if channels > 1 else 0)
    for i, f in enumerate(frames):
        if isinstance(f, torch.Tensor):  # (C, H, W): element strides are byte strides for uint8
            channel_stride = f.stride(0) if f.shape[0] > 1 else 0
            rows[i] = (f.data_ptr(), f.shape[1], f.shape[2], f.stride(1), f.stride(2), channel_stride)
    return rows, buffer


def pack_frames(frames: list, targets: np.ndarray, slots: np.ndarray, layout, total: int, processor,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU side of naflex._pack_frames: same arguments and results, outputs on device."""
    index = _check_gpu(device)
    cupy = import_cupy()
    p = layout.patch_size
    if p > MAX_PATCH_SIZE:
        raise ValueError(f"patch_size must be <= {MAX_PATCH_SIZE} on the GPU (one thread per pixel), got {p}; "
                         "use device='cpu'")

    sizes = np.array([f.shape[1:] if isinstance(f, torch.Tensor) else f.shape[:2] for f in frames], dtype=np.int64)
    axes = np.concatenate([np.stack([sizes[:, 0], targets[:, 0]], 1), np.stack([sizes[:, 1], targets[:, 1]], 1)])
    ksize = int(host_module().naflex_kernel_sizes(np.ascontiguousarray(axes), processor.resample).max())
    shared = 3072 + 16 * p + 8 * p * ksize + 3 * p * CHUNK
    if shared > SHARED_LIMIT:
        raise ValueError(f"a frame is downscaled too strongly for the GPU kernel ({ksize}-tap windows need {shared} "
                         f"bytes of shared memory, more than {SHARED_LIMIT}); use device='cpu'")

    rows, staged = _frames_on_gpu(frames, index)
    blocks = (targets[:, 0] // p) * (targets[:, 1] // p)
    table = np.zeros((len(frames), FRAME_FIELDS), dtype=np.int64)
    table[:, :6] = rows
    table[:, 6:8] = targets
    table[:, 8:11] = slots
    table[1:, 11] = np.cumsum(blocks)[:-1]

    target = torch.device("cuda", index)
    patches = torch.empty(total, layout.patch_dim, dtype=torch.float32, device=target)
    position_ids = torch.empty(total, layout.id_width, dtype=torch.int32, device=target)
    frame_table = torch.from_numpy(table).pin_memory().to(target, non_blocking=True)
    kernel = _kernel(index)
    if shared > DEFAULT_SHARED:
        kernel.max_dynamic_shared_size_bytes = shared
    mean, std = (np.asarray(v, dtype=np.float32) for v in (processor.image_mean, processor.image_std))
    args = (cupy.from_dlpack(frame_table), np.int32(len(frames)), np.int32(p), np.int32(layout.temporal_patch_size),
            np.int32(layout.merge_size), np.int32(layout.channel_major), np.int32(layout.id_width),
            np.int32(RESAMPLE_FILTERS.index(processor.resample)), np.int32(ksize), np.int32(CHUNK), *mean, *std,
            cupy.from_dlpack(patches), cupy.from_dlpack(position_ids))
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(target).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        kernel((int(blocks.sum()),), (p * p,), args, shared_mem=shared)
    del staged, frame_table  # released only now that the kernel reading them is queued
    return patches, position_ids
