"""NaFlex preprocessing: native-resolution images resized to a patch budget and packed without
padding into one buffer, the input format of varlen attention over images.

The pixel work runs in C++ (`glm5v_kernels._host`, csrc/host/naflex.cpp) on all cores with the
GIL released; `reference.py` beside this file is its specification. With matching settings the
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
                pin_memory: bool = False) -> PackedImages:
    """Resize, normalise, patchify and pack images (on the CPU, in parallel threads).

    images: a list of images, each a uint8 numpy array (H, W, C) or (H, W), a PIL image, or a uint8
        torch tensor (C, H, W) or (H, W) on the CPU; C is 1 (grey, replicated to RGB), 3 (RGB) or 4
        (RGBA: alpha is dropped, not composited). Float arrays and tensors with values in [0, 1]
        are accepted and quantised to 8 bits (round to nearest), since the resampling is defined on
        8-bit values. Arrays are read in place, any strides.
    num_threads: threads for the pixel work; None uses every core.
    pin_memory: allocate the outputs in pinned memory for fast asynchronous copies to the GPU.
    """
    if not isinstance(processor, NaFlexProcessor):
        raise TypeError(f"processor must be a NaFlexProcessor, got {type(processor).__name__}")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3 or _is_pil(images):
        raise TypeError("images must be a list of images; wrap a single image in a list")
    arrays = [as_uint8_hwc(image, f"images[{i}]") for i, image in enumerate(images)]
    if not arrays:
        raise ValueError("images is empty: pass at least one image")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be None or an int >= 1, got {num_threads!r}")

    host = host_module()
    sizes = np.array([a.shape[:2] for a in arrays], dtype=np.int64)
    targets = processor._target_sizes(sizes)
    grids = targets // processor.patch_size
    lengths = grids[:, 0] * grids[:, 1]
    cu_seqlens = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    if cu_seqlens[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"images hold {cu_seqlens[-1]} patches in all, more than int32 cu_seqlens can index")
    cu_seqlens = cu_seqlens.astype(np.int32)

    total = int(cu_seqlens[-1])
    patches = torch.empty(total, processor.patch_dim, dtype=torch.float32, pin_memory=pin_memory)
    position_ids = torch.empty(total, 2, dtype=torch.int32, pin_memory=pin_memory)
    host.naflex_pack(arrays, targets, cu_seqlens, np.asarray(processor.image_mean, dtype=np.float32),
                     np.asarray(processor.image_std, dtype=np.float32), processor.patch_size, processor.resample,
                     patches.numpy(), position_ids.numpy(), num_threads or 0)
    return PackedImages(
        patches=patches,
        cu_seqlens=_to_tensor(cu_seqlens, pin_memory),
        spatial_shapes=_to_tensor(grids.astype(np.int32), pin_memory),
        position_ids=position_ids,
        max_seqlen=int(lengths.max()),
    )


def _to_tensor(array: np.ndarray, pin_memory: bool) -> torch.Tensor:
    tensor = torch.from_numpy(array)
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
