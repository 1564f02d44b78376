"""The NaFlex specification in plain numpy: what `glm5v_kernels._host` must compute, bit for bit.

Written for clarity, not speed; tests compare the C++ kernel with it exactly and compare it with
transformers' Siglip2 image processor on real photos.

Per image (uint8, (height, width, channels)):
1. `target_size`: the largest aspect-preserving size whose patch grid fits `max_num_patches`,
   found by binary search on the scale; each side a multiple of `patch_size * merge_size`.
2. `resize_uint8`: Pillow's resampling (libImaging/Resample.c) of 8-bit images: separable
   filters whose support widens with the downscale factor (antialiasing), 22-bit fixed-point
   weights, each pass rounded and clipped to 8 bits, the passes in Pillow 13's order
   (`vertical_pass_first`).
3. `normalization_table`: value v of channel c becomes ``(float32(v / 255) - mean[c]) / std[c]``
   in float32, as the HF processor's rescale-then-normalize does.
4. `patchify`: rows of ``patch_size * patch_size * 3`` values laid out (row, col, channel) within
   a patch, patches in row-major order.
"""

from __future__ import annotations

import math

import numpy as np

PRECISION_BITS = 22  # Pillow: 32 bits - 8 (value) - 2 (headroom)


def target_size(height: int, width: int, patch_size: int, max_num_patches: int,
                merge_size: int = 1) -> tuple[int, int]:
    unit = patch_size * merge_size

    def side(scale: float, size: int) -> int:
        return max(unit, math.ceil(size * scale / unit) * unit)

    eps = 1e-5
    scale_min, scale_max = eps / 10, 100.0
    while scale_max - scale_min >= eps:
        scale = (scale_min + scale_max) / 2
        num_patches = (side(scale, height) / patch_size) * (side(scale, width) / patch_size)
        if num_patches <= max_num_patches:
            scale_min = scale
        else:
            scale_max = scale
    return side(scale_min, height), side(scale_min, width)


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


FILTERS = {
    "box": (lambda x: 1.0 if -0.5 < x <= 0.5 else 0.0, 0.5),
    "bilinear": (lambda x: max(0.0, 1.0 - abs(x)), 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (lambda x: _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0, 3.0),
}


def resample_matrix(in_size: int, out_size: int, resample: str) -> np.ndarray:
    """(out_size, in_size) float64 matrix of Pillow's integer fixed-point weights."""
    fn, base_support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    matrix = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        weights = [fn((x - center + 0.5) * (1.0 / filterscale)) for x in range(xmin, xmax)]
        total = sum(weights)
        for x, w in zip(range(xmin, xmax), weights):
            w = w / total if total != 0.0 else w
            fixed = w * (1 << PRECISION_BITS)
            matrix[xx, x] = int(-0.5 + fixed) if w < 0 else int(0.5 + fixed)
    return matrix


def _resample_axis0(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    # Products of 8-bit values and 22-bit weights summed over a few hundred taps stay far below
    # 2**53, so float64 arithmetic is exact here, in any summation order.
    acc = np.tensordot(matrix, image.astype(np.float64), axes=(1, 0)) + (1 << (PRECISION_BITS - 1))
    return np.clip(np.floor(acc / (1 << PRECISION_BITS)), 0, 255).astype(np.uint8)


def vertical_pass_first(in_height: int, in_width: int, height: int, width: int) -> bool:
    """Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as
    many pixels as the width does (fewer rows for the horizontal pass); earlier Pillow always
    ran the horizontal pass first. The order matters: each pass rounds to 8 bits."""
    return in_height - height > 0 and in_height - height > (in_width - width) * 2


def resize_uint8(image: np.ndarray, height: int, width: int, resample: str = "bilinear") -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, as Pillow 13's PIL.Image.resize((width, height))."""
    in_height, in_width = image.shape[:2]

    def horizontal(img):
        if width == in_width:
            return img
        resized = _resample_axis0(img.transpose(1, 0, 2), resample_matrix(in_width, width, resample))
        return resized.transpose(1, 0, 2)

    def vertical(img):
        return img if height == in_height else _resample_axis0(img, resample_matrix(in_height, height, resample))

    if vertical_pass_first(in_height, in_width, height, width):
        return horizontal(vertical(image))
    return vertical(horizontal(image))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 1|3|4) -> (H, W, 3): grey replicated, alpha dropped."""
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]


def normalization_table(image_mean, image_std) -> np.ndarray:
    """(3, 256) float32: the normalised value of every 8-bit value of every channel."""
    values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(image_mean, dtype=np.float32)[:, None]
    std = np.asarray(image_std, dtype=np.float32)[:, None]
    return ((values[None, :] - mean) / std).astype(np.float32)


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p, p * p * C), patches row-major, (row, col, channel) inside."""
    height, width, channels = image.shape
    grid = image.reshape(height // patch_size, patch_size, width // patch_size, patch_size, channels)
    return grid.transpose(0, 2, 1, 3, 4).reshape(-1, patch_size * patch_size * channels)


def pack_images(images: list[np.ndarray], patch_size: int = 16, max_num_patches: int = 256,
                merge_size: int = 1, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                resample: str = "bilinear"):
    """uint8 (H, W, 1|3|4) images -> (patches, cu_seqlens, spatial_shapes, position_ids) numpy arrays."""
    table = normalization_table(image_mean, image_std)
    patches, shapes, positions = [], [], []
    for image in images:
        height, width = target_size(image.shape[0], image.shape[1], patch_size, max_num_patches, merge_size)
        resized = resize_uint8(to_rgb(image), height, width, resample)
        normalised = table[np.arange(3)[None, None, :], resized]
        patches.append(patchify(normalised, patch_size))
        rows, cols = height // patch_size, width // patch_size
        shapes.append((rows, cols))
        grid_rows, grid_cols = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        positions.append(np.stack([grid_rows.ravel(), grid_cols.ravel()], axis=1))
    lengths = [rows * cols for rows, cols in shapes]
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return (np.concatenate(patches).astype(np.float32), cu_seqlens, np.asarray(shapes, dtype=np.int32),
            np.concatenate(positions).astype(np.int32))
