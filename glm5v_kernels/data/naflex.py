"""NaFlex preprocessing: native-resolution images resized to a patch budget and packed without
padding into one buffer, the input format of varlen attention over images.

The pixel work runs in C++ (`glm5v_kernels._host`, csrc/host/naflex.cpp) on all cores with the
GIL released, or with device="cuda" in a CUDA kernel (csrc/cuda/naflex.cu, loaded by `cuda.py`
through CuPy); both run the per-pixel arithmetic of csrc/common/naflex_math.h. `reference.py`
beside this file is the specification. `pack_video` packs videos as temporal patches (Qwen2-VL /
GLM-4V layout). With matching settings the
patches equal those of transformers' Siglip2 image processor (Pillow >= 13) exactly. The
horizontal resampling pass uses the fastest exact kernel the CPU runs (AVX-512 VBMI + VNNI,
AVX2, or portable C++); `glm5v_kernels._host.naflex_kernel(name)` selects another one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from glm5v_kernels._backend import host_module

RESAMPLE_FILTERS = ("box", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class NaFlexProcessor:
    """Settings of the NaFlex resize + normalise + patchify.

    Each image is resized, keeping its aspect ratio, to the largest size whose grid of
    `patch_size` patches fits `max_num_patches`; each side is a multiple of
    `patch_size * merge_size` (so a `merge_size`² patch merger tiles it) and at least one such
    unit. The search follows transformers' Siglip2 processor (scale in [1e-6, 100], so an image is
    upscaled at most 100×). Resampling is Pillow's antialiased filter of 8-bit images;
    normalisation is ``(value / 255 - image_mean) / image_std`` per channel in float32.
    """

    patch_size: int = 16
    max_num_patches: int = 256
    merge_size: int = 1
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bilinear"

    def __post_init__(self):
        for name in ("patch_size", "merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        budget = self.max_num_patches
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < self.merge_size**2:
            raise ValueError(
                f"max_num_patches must be an int >= merge_size ** 2 = {self.merge_size ** 2} (one merged "
                f"patch), got {budget!r}")
        for name in ("image_mean", "image_std"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or not all(np.isfinite(v) for v in value):
                raise ValueError(f"{name} must be 3 finite floats (R, G, B), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(v == 0 for v in self.image_std):
            raise ValueError(f"image_std must be non-zero, got {self.image_std!r}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample must be one of {RESAMPLE_FILTERS}, got {self.resample!r}")

    @property
    def patch_dim(self) -> int:
        """Length of one patch row: patch_size * patch_size * 3."""
        return self.patch_size * self.patch_size * 3

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) in pixels an image of this size is resized to."""
        sizes = np.array([[height, width]], dtype=np.int64)
        (out,) = self._target_sizes(sizes)
        return int(out[0]), int(out[1])

    def _target_sizes(self, sizes: np.ndarray) -> np.ndarray:
        return host_module().naflex_target_sizes(sizes, self.patch_size, self.merge_size, self.max_num_patches)

    def __call__(self, images, **kwargs) -> PackedImages:
        return pack_images(images, self, **kwargs)


@dataclass
class PackedImages:
    """Images packed without padding, one sequence of patches per image.

    patches: (total_patches, patch_size * patch_size * 3) float32, (row, col, channel) inside a
        patch, patches of an image in row-major order.
    cu_seqlens: (num_images + 1,) int32, image i owns patches[cu_seqlens[i]:cu_seqlens[i + 1]].
    spatial_shapes: (num_images, 2) int32, the (rows, cols) patch grid of every image.
    position_ids: (total_patches, 2) int32, the (row, col) of every patch in its image's grid.
    max_seqlen: the longest image in patches, a Python int (no device sync needed to plan kernels).
    """

    patches: torch.Tensor
    cu_seqlens: torch.Tensor
    spatial_shapes: torch.Tensor
    position_ids: torch.Tensor
    max_seqlen: int

    @property
    def num_images(self) -> int:
        return self.spatial_shapes.shape[0]

    def to(self, device, non_blocking: bool = False) -> PackedImages:
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return PackedImages(move(self.patches), move(self.cu_seqlens), move(self.spatial_shapes),
                            move(self.position_ids), self.max_seqlen)

    def to_padded(self, num_patches: int | None = None) -> dict[str, torch.Tensor]:
        """HF Siglip2-style batch: pixel_values (n, num_patches, patch_dim) float32 zero-padded,
        pixel_attention_mask (n, num_patches) int32, spatial_shapes (n, 2) int64.
        num_patches defaults to the longest image; pass the processor's max_num_patches to match
        transformers exactly."""
        num_patches = self.max_seqlen if num_patches is None else num_patches
        if num_patches < self.max_seqlen:
            raise ValueError(f"num_patches must be >= the longest image ({self.max_seqlen}), got {num_patches}")
        # Destination row of every patch, computed on the tensors' device without a host sync.
        total, starts = self.patches.shape[0], self.cu_seqlens.long()
        image = torch.repeat_interleave(torch.arange(self.num_images, device=starts.device), starts.diff(),
                                        output_size=total)
        slot = image * num_patches + torch.arange(total, device=starts.device) - starts[image]
        pixel_values = self.patches.new_zeros(self.num_images * num_patches, self.patches.shape[1])
        pixel_values.index_copy_(0, slot, self.patches)
        mask = torch.zeros(self.num_images * num_patches, dtype=torch.int32, device=starts.device)
        mask[slot] = 1
        return {
            "pixel_values": pixel_values.view(self.num_images, num_patches, -1),
            "pixel_attention_mask": mask.view(self.num_images, num_patches),
            "spatial_shapes": self.spatial_shapes.to(torch.int64),
        }


def pack_images(images: Sequence, processor: NaFlexProcessor, *, num_threads: int | None = None,
                pin_memory: bool = False, device: str | torch.device = "cpu") -> PackedImages:
    """Resize, normalise, patchify and pack images, on the CPU (parallel threads) or on a GPU.

    images: a list of images, each a uint8 numpy array (H, W, C) or (H, W), a PIL image, or a uint8
        torch tensor (C, H, W) or (H, W); C is 1 (grey, replicated to RGB), 3 (RGB) or 4 (RGBA: alpha
        is dropped, not composited). Float arrays and tensors with values in [0, 1] are accepted and
        quantised to 8 bits (round to nearest), since the resampling is defined on 8-bit values.
        Arrays are read in place, any strides. Tensors must be on the CPU, or with device="cuda" on
        that GPU (read in place there too, e.g. frames decoded on the GPU).
    num_threads: threads for the pixel work on the CPU; None uses every core.
    pin_memory: allocate the CPU outputs in pinned memory for fast asynchronous copies to the GPU.
    device: "cpu", or "cuda" / "cuda:N" to run the CUDA kernel (csrc/cuda/naflex.cu, through CuPy)
        on the current stream of that GPU, with the outputs there: the same bits as the CPU path
        (Lanczos within one 8-bit level). CPU images are copied to the GPU in one buffer first.
    """
    _check_processor(processor)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3 or _is_pil(images):
        raise TypeError("images must be a list of images; wrap a single image in a list")
    device = _check_call(num_threads, pin_memory, device)
    frames = [_as_frame(image, f"images[{i}]", device) for i, image in enumerate(images)]
    if not frames:
        raise ValueError("images is empty: pass at least one image")

    sizes = np.array([_frame_size(f) for f in frames], dtype=np.int64)
    targets = processor._target_sizes(sizes)
    grids = targets // processor.patch_size
    lengths = grids[:, 0] * grids[:, 1]
    cu_seqlens = _cu_seqlens(lengths, "images")
    slots = np.zeros((len(frames), 3), dtype=np.int64)
    slots[:, 0] = cu_seqlens[:-1]
    layout = _Layout(processor.patch_size, 1, 1, False)
    patches, position_ids = _pack_frames(frames, targets, slots, layout, int(cu_seqlens[-1]), processor,
                                         num_threads, pin_memory, device)
    return PackedImages(
        patches=patches,
        cu_seqlens=_to_tensor(cu_seqlens, pin_memory, device),
        spatial_shapes=_to_tensor(grids.astype(np.int32), pin_memory, device),
        position_ids=position_ids,
        max_seqlen=int(lengths.max()),
    )


@dataclass
class PackedVideos:
    """Videos packed without padding, one sequence of temporal patches per video (the Qwen2-VL /
    GLM-4V / GLM-OCR vision input).

    patches: (total_patches, 3 * temporal_patch_size * patch_size * patch_size) float32; a patch
        holds temporal_patch_size consecutive frames, values (channel, frame, row, col) inside it, the
        order a Conv3d patch embedding over (C, T, p, p) reads. The patches of a group of frames go
        merge_size x merge_size block by block (row-major blocks, row-major inside a block), so a
        patch merger takes runs of merge_size² consecutive patches.
    cu_seqlens: (num_videos + 1,) int32, video i owns patches[cu_seqlens[i]:cu_seqlens[i + 1]].
    grid_thw: (num_videos, 3) int32, (groups of frames, patch rows, patch cols) of every video.
    position_ids: (total_patches, 3) int32, the (t, row, col) of every patch.
    max_seqlen: the longest video in patches, a Python int.
    """

    patches: torch.Tensor
    cu_seqlens: torch.Tensor
    grid_thw: torch.Tensor
    position_ids: torch.Tensor
    max_seqlen: int

    @property
    def num_videos(self) -> int:
        return self.grid_thw.shape[0]


def pack_video(videos: Sequence, processor: NaFlexProcessor, temporal_patch_size: int = 2, *,
               num_threads: int | None = None, pin_memory: bool = False,
               device: str | torch.device = "cpu") -> PackedVideos:
    """Resize, normalise and pack videos as temporal patches, one sequence per video.

    videos: a list of videos, each a uint8 numpy array (T, H, W, C) or (T, H, W), a uint8 tensor
        (T, C, H, W) (CPU, or on the GPU with device="cuda"), or a list of frames in any form
        pack_images accepts; all frames of a video have one size. Every frame is resized to
        processor.target_size(H, W) (the patch budget applies per frame) exactly as pack_images
        resizes an image, and normalised the same way.
    temporal_patch_size: frames per patch; frames are grouped in order, and a final incomplete group
        repeats the last frame (Qwen2-VL's padding), so a video of T frames has
        ceil(T / temporal_patch_size) groups.
    num_threads, pin_memory, device: as for pack_images.
    """
    _check_processor(processor)
    if not isinstance(temporal_patch_size, int) or isinstance(temporal_patch_size, bool) or temporal_patch_size < 1:
        raise ValueError(f"temporal_patch_size must be an int >= 1, got {temporal_patch_size!r}")
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        raise TypeError("videos must be a list of videos; wrap a single video in a list")
    device = _check_call(num_threads, pin_memory, device)
    if not videos:
        raise ValueError("videos is empty: pass at least one video")

    frames, first_frames = [], []
    for v, video in enumerate(videos):
        video_frames = _video_frames(video, f"videos[{v}]", device)
        sizes = {_frame_size(f) for f in video_frames}
        if len(sizes) != 1:
            raise ValueError(f"videos[{v}]: all frames must have one size, got {sorted(sizes)}")
        pad = -len(video_frames) % temporal_patch_size
        first_frames.append(len(frames))
        frames += video_frames + video_frames[-1:] * pad
    first_frames.append(len(frames))

    starts = np.asarray(first_frames[:-1])
    frame_counts = np.diff(first_frames)
    targets = processor._target_sizes(np.array([_frame_size(frames[i]) for i in starts], dtype=np.int64))
    grids = targets // processor.patch_size
    groups = frame_counts // temporal_patch_size
    per_group = grids[:, 0] * grids[:, 1]
    lengths = groups * per_group
    cu_seqlens = _cu_seqlens(lengths, "videos")

    # Frame k of a video: group k // T, slot k % T, writing from its group's first patch.
    video_of = np.repeat(np.arange(len(starts)), frame_counts)
    k = np.arange(len(frames)) - starts[video_of]
    slots = np.stack([cu_seqlens[:-1][video_of] + (k // temporal_patch_size) * per_group[video_of],
                      k % temporal_patch_size, k // temporal_patch_size], axis=1).astype(np.int64)
    layout = _Layout(processor.patch_size, temporal_patch_size, processor.merge_size, True)
    patches, position_ids = _pack_frames(frames, targets[video_of], slots, layout, int(cu_seqlens[-1]), processor,
                                         num_threads, pin_memory, device)
    grid_thw = np.stack([groups, grids[:, 0], grids[:, 1]], axis=1).astype(np.int32)
    return PackedVideos(
        patches=patches,
        cu_seqlens=_to_tensor(cu_seqlens, pin_memory, device),
        grid_thw=_to_tensor(grid_thw, pin_memory, device),
        position_ids=position_ids,
        max_seqlen=int(lengths.max()),
    )


@dataclass(frozen=True)
class _Layout:
    """Where values go in the packed buffer (csrc/common/naflex_math.h, PatchLayout)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    channel_major: bool

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    @property
    def id_width(self) -> int:
        return 3 if self.channel_major else 2


def _pack_frames(frames: list, targets: np.ndarray, slots: np.ndarray, layout: _Layout, total: int,
                 processor: NaFlexProcessor, num_threads: int | None, pin_memory: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames -> (patches (total, patch_dim) float32, position_ids (total, id_width) int32) on device;
    frame i is resized to targets[i] and written from slots[i] = (first patch, t slot, t group)."""
    if device.type == "cuda":
        from glm5v_kernels.data import cuda

        return cuda.pack_frames(frames, targets, slots, layout, total, processor, device)
    patches = torch.empty(total, layout.patch_dim, dtype=torch.float32, pin_memory=pin_memory)
    position_ids = torch.empty(total, layout.id_width, dtype=torch.int32, pin_memory=pin_memory)
    mean, std = (np.asarray(v, dtype=np.float32) for v in (processor.image_mean, processor.image_std))
    host = host_module()
    if layout.channel_major:
        host.naflex_pack_video(frames, targets, slots, mean, std, layout.patch_size, layout.temporal_patch_size,
                               layout.merge_size, processor.resample, patches.numpy(), position_ids.numpy(),
                               num_threads or 0)
    else:
        cu_seqlens = np.append(slots[:, 0], total).astype(np.int32)  # images: one frame per sequence
        host.naflex_pack(frames, targets, cu_seqlens, mean, std, layout.patch_size,
                         processor.resample, patches.numpy(), position_ids.numpy(), num_threads or 0)
    return patches, position_ids


def _check_processor(processor) -> None:
    if not isinstance(processor, NaFlexProcessor):
        raise TypeError(f"processor must be a NaFlexProcessor, got {type(processor).__name__}")


def _check_call(num_threads, pin_memory: bool, device) -> torch.device:
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be None or an int >= 1, got {num_threads!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device.type == "cuda" and pin_memory:
        raise ValueError("pin_memory applies to CPU outputs; with device='cuda' the outputs are on the GPU")
    return device


def _cu_seqlens(lengths: np.ndarray, what: str) -> np.ndarray:
    cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    if cu_seqlens[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{what} hold {cu_seqlens[-1]} patches in all, more than int32 cu_seqlens can index")
    return cu_seqlens.astype(np.int32)


def _as_frame(image, name: str, device: torch.device):
    """A CUDA uint8 tensor (C, H, W) or (H, W) on device stays as it is (the GPU path reads it in
    place); anything else becomes a uint8 (H, W, C) array (as_uint8_hwc)."""
    if device.type == "cuda" and isinstance(image, torch.Tensor) and image.device.type == "cuda":
        from glm5v_kernels.data import cuda

        return cuda.check_device_frame(image, name, device)
    return as_uint8_hwc(image, name)


def _frame_size(frame) -> tuple[int, int]:
    """(height, width) of a frame from _as_frame."""
    if isinstance(frame, torch.Tensor):
        return tuple(frame.shape[-2:])
    return frame.shape[:2]


def _video_frames(video, name: str, device: torch.device) -> list:
    if isinstance(video, np.ndarray):
        if video.ndim not in (3, 4):
            raise ValueError(f"{name} must be a (T, H, W, C) or (T, H, W) array, got shape {video.shape}")
        frames = list(video)
    elif isinstance(video, torch.Tensor):
        if video.ndim not in (3, 4):
            raise ValueError(f"{name} must be a (T, C, H, W) or (T, H, W) tensor, got shape {tuple(video.shape)}")
        frames = list(video.unbind(0))
    elif isinstance(video, Sequence) and not isinstance(video, (str, bytes)):
        frames = list(video)
    else:
        raise TypeError(f"{name} must be an array, a tensor or a list of frames, got {type(video).__name__}")
    if not frames:
        raise ValueError(f"{name} has no frames")
    return [_as_frame(frame, f"{name}[{t}]", device) for t, frame in enumerate(frames)]


def _to_tensor(array: np.ndarray, pin_memory: bool, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory() if pin_memory else tensor


def _is_pil(image) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(image, Image.Image)


_PIL_DIRECT_MODES = ("RGB", "RGBA", "L")
_PIL_CONVERTIBLE_MODES = ("1", "P", "PA", "LA", "La", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def as_uint8_hwc(image, name: str = "image") -> np.ndarray:
    """Any accepted image -> uint8 array (H, W, C) with C in {1, 3, 4}, a view when possible."""
    if _is_pil(image):
        if image.mode not in _PIL_DIRECT_MODES:
            if image.mode not in _PIL_CONVERTIBLE_MODES:
                raise TypeError(f"{name}: PIL mode {image.mode!r} is not 8-bit; convert it to 'RGB' first")
            image = image.convert("RGB")
        array = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        if image.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got a tensor on {image.device}")
        if image.ndim == 3:
            image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C), a view
        elif image.ndim != 2:
            raise ValueError(f"{name} must be a (C, H, W) or (H, W) tensor, got shape {tuple(image.shape)}")
        array = image.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"{name} must be a numpy array, a PIL image or a torch tensor, got {type(image).__name__}")

    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (H, W, C) or (H, W), got shape {array.shape}")
    if array.shape[2] not in (1, 3, 4):
        hint = " (numpy images are channels-last: transpose a (C, H, W) array)" if array.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"{name} must have 1, 3 or 4 channels, got shape {array.shape}{hint}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: float images must be finite, found NaN or inf")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(f"{name}: float images must lie in [0, 1], got [{array.min()}, {array.max()}]")
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise TypeError(f"{name} must be uint8 (or float in [0, 1]), got dtype {array.dtype}")
