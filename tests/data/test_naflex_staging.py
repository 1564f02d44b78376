"""The GPU NaFlex kernel's input staging (naflex_math.h: window_span, staged_tile, split_for_vectors,
stage_step, tile_offset), run on the CPU through glm5v_kernels._host, against Python references.

The kernel copies the input rectangle a chunk reads into shared memory, as raw bytes for packed
pixels (16-byte words between a scalar head and tail when the row stride is a multiple of 16),
gathered byte by byte otherwise; the first resampling pass then reads the tile at tile_offset.
These tests check the split, the tile's layout and that every value read back through tile_offset
is the frame's, for odd alignments, lengths and strides; and the shared-memory sizing of cuda.py."""

from __future__ import annotations

import numpy as np
import pytest

from glm5v_kernels._backend import host_module
from glm5v_kernels.data import cuda as naflex_cuda
from glm5v_kernels.data import reference

VECTOR = 16


def reference_split(address: int, length: int) -> tuple[int, int, int]:
    """(head, words, tail): bytes before the first 16-byte boundary, whole words, bytes after."""
    head = min(length, -address % VECTOR)
    words = (length - head) // VECTOR
    return head, words, length - head - VECTOR * words


def buffer_at(rng, size: int, misalignment: int) -> tuple[np.ndarray, int]:
    """Random bytes and the offset into them whose address is misalignment mod 16."""
    buffer = rng.integers(0, 256, size + VECTOR, dtype=np.uint8)
    return buffer, (misalignment - buffer.ctypes.data) % VECTOR


def stage(buffer, offset, strides, rows, cols):
    """The staged tile's layout and values, both poison fills giving the same values (every value
    read back was written by the staging)."""
    host = host_module()
    layout, values = host.naflex_stage_tile(buffer, offset, *strides, rows, cols, 0)
    _, again = host.naflex_stage_tile(buffer, offset, *strides, rows, cols, 255)
    np.testing.assert_array_equal(values, again)
    return layout, values


@pytest.mark.parametrize("stride_h", [48, 53])  # a multiple of 16 (16-byte words) and not (scalar)
def test_split_of_odd_offsets_and_lengths(stride_h):
    rng = np.random.default_rng(0)
    for misalignment in range(VECTOR):
        buffer, offset = buffer_at(rng, 3 * stride_h, misalignment)
        for length in range(41):
            # Grey pixels, one byte each: a row of the tile is `length` consecutive bytes.
            layout, values = stage(buffer, offset, (stride_h, 1, 0), 3, length)
            vectorised = stride_h % VECTOR == 0
            head, words, tail = reference_split(misalignment, length) if vectorised else (length, 0, 0)
            assert (layout["head"], layout["words"], layout["tail"]) == (head, words, tail), (misalignment, length)
            assert layout["raw"] and layout["vectorised"] == vectorised
            assert layout["row_bytes"] == length and layout["steps"] == 3 * (head + words + tail)
            assert layout["lead"] == (misalignment if vectorised else 0)
            assert layout["pitch"] % VECTOR == 0 and layout["lead"] + length <= layout["pitch"]
            if words:  # the words land on 16-byte boundaries of the tile too
                assert (layout["tile_address"] + layout["lead"] + head) % VECTOR == 0
            rows = np.stack([buffer[offset + r * stride_h:offset + r * stride_h + length] for r in range(3)])
            np.testing.assert_array_equal(values, np.repeat(rows[..., None], 3, axis=2))


# (height, width, channels) of a frame in memory, and how to view it: "hwc" packed pixels, "chw"
# channel-major, "every3" every third column of an HWC frame, "grey-of-rgb" channel 0 of an RGB frame.
LAYOUTS = {
    "rgb-aligned-rows": ((9, 32, 3), "hwc", True),    # row stride 96
    "rgb-odd-rows": ((9, 37, 3), "hwc", False),       # row stride 111
    "rgba": ((7, 20, 4), "hwc", True),                # row stride 80, pixel stride 4
    "grey": ((6, 45, 1), "hwc", False),
    "grey-of-rgb": ((6, 16, 3), "grey-of-rgb", True),  # pixel stride 3, channel stride 0
    "channel-major": ((5, 19, 3), "chw", False),      # gathered
    "every-third-column": ((6, 40, 3), "every3", False),  # pixel stride 9: gathered
}


def frame_view(buffer, offset, shape, kind):
    """(view (H', W', C') of buffer at offset, byte strides (h, w, c) the kernel would get)."""
    height, width, channels = shape
    if kind == "chw":
        strides = (width, 1, height * width)
        view = np.lib.stride_tricks.as_strided(buffer[offset:], (height, width, channels), (width, 1, height * width))
        return view, strides
    hwc = np.lib.stride_tricks.as_strided(buffer[offset:], shape, (width * channels, channels, 1))
    if kind == "every3":
        return hwc[:, ::3], (width * channels, 3 * channels, 1)
    if kind == "grey-of-rgb":
        return hwc[..., :1], (width * channels, channels, 0)
    return hwc[..., :3], (width * channels, channels, 1 if channels > 1 else 0)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_staged_values_equal_the_frame(name):
    shape, kind, vectorised = LAYOUTS[name]
    rng = np.random.default_rng(1)
    for misalignment in (0, 1, 7, 15):
        buffer, offset = buffer_at(rng, int(np.prod(shape)), misalignment)
        view, strides = frame_view(buffer, offset, shape, kind)
        height, width = view.shape[:2]
        for row0, col0, rows, cols in [(0, 0, height, width), (1, 3, height - 2, width - 5), (2, 1, 1, 1),
                                       (0, width - 1, height, 1), (1, 2, 0, 4), (3, 0, 2, 0)]:
            start = offset + row0 * strides[0] + col0 * strides[1]
            layout, values = stage(buffer, start, strides, rows, cols)
            expected = view[row0:row0 + rows, col0:col0 + cols]
            np.testing.assert_array_equal(values, np.broadcast_to(expected, (rows, cols, 3)), err_msg=str(
                (misalignment, row0, col0, rows, cols)))
            assert layout["vectorised"] == vectorised
            assert layout["raw"] == (kind not in ("chw", "every3"))
            if vectorised and cols:
                assert (layout["head"], layout["words"], layout["tail"]) == reference_split(start + buffer.ctypes.data,
                                                                                            layout["row_bytes"])


def test_stage_tile_refuses_a_rectangle_past_the_buffer():
    with pytest.raises(ValueError, match="past the end of buffer"):
        host_module().naflex_stage_tile(np.zeros(100, np.uint8), 10, 30, 3, 1, 4, 5, 0)


# -- shared-memory sizing -------------------------------------------------------------------------


def widest_patch_span(in_size: int, out_size: int, patch_size: int, resample: str) -> int:
    """Python version of Pillow's window bounds, the most inputs one patch's windows read."""
    if in_size == out_size:
        return patch_size
    _, base_support = reference.FILTERS[resample]
    scale = in_size / out_size
    support = base_support * max(scale, 1.0)
    first = [max(int((i + 0.5) * scale - support + 0.5), 0) for i in range(out_size)]
    end = [min(int((i + 0.5) * scale + support + 0.5), in_size) for i in range(out_size)]
    return max(max(end[q:q + patch_size]) - min(first[q:q + patch_size]) for q in range(0, out_size, patch_size))


def tile_bytes(strides, rows: int, cols: int) -> int:
    stride_h, stride_w, stride_c = strides
    channels = 3 if stride_c else 1
    raw = 1 <= stride_w <= 4 and stride_c <= 1
    row_bytes = ((cols - 1) * stride_w + (channels - 1) * stride_c + 1 if cols else 0) if raw else cols * channels
    padding = VECTOR - 1 if raw and stride_h % VECTOR == 0 else 0
    return rows * -(-(row_bytes + padding) // VECTOR) * VECTOR


FRAMES = [  # (height, width, out_height, out_width, stride_h, stride_w, stride_c)
    (300, 451, 160, 240, 451 * 3, 3, 1),      # downscale, horizontal pass first, odd row stride
    (2000, 900, 64, 32, 900 * 4, 4, 1),       # vertical pass first, RGBA
    (40, 64, 48, 80, 64, 1, 0),               # upscale, grey
    (96, 500, 96, 112, 500, 1, 96 * 500),     # height kept (identity axis), channel-major
]


@pytest.mark.parametrize("resample", ["bilinear", "lanczos"])
def test_staged_tile_bytes_match_reference(resample):
    p, chunks = 16, np.array([1, 7, 128], dtype=np.int64)
    got = host_module().naflex_staged_tile_bytes(np.array(FRAMES, dtype=np.int64), p, resample, chunks)
    for frame, row in zip(FRAMES, got):
        height, width, out_height, out_width, *strides = frame
        span_rows = widest_patch_span(height, out_height, p, resample)
        span_cols = widest_patch_span(width, out_width, p, resample)
        vertical_first = reference.vertical_pass_first(height, width, out_height, out_width)
        for chunk, value in zip(chunks, row):
            rows, cols = (span_rows, min(chunk, span_cols)) if vertical_first else (min(chunk, span_rows), span_cols)
            assert value == tile_bytes(strides, rows, cols), (frame, chunk)


def plan_for(frames):
    frames = np.array(frames, dtype=np.int64)
    layouts = np.concatenate([frames[:, :2], frames[:, 4:]], 1)
    return naflex_cuda.shared_memory_plan(layouts, frames[:, 2:4], 16, "bilinear"), layouts, frames[:, 2:4]


def test_shared_memory_plan_takes_the_largest_chunk_that_fits():
    for frames in ([FRAMES[0], FRAMES[2]], [FRAMES[1]], [(3000, 20, 16, 16, 60, 3, 1)]):
        plan, layouts, targets = plan_for(frames)
        assert plan.shared <= naflex_cuda.SHARED_LIMIT and plan.tile_offset % VECTOR == 0
        chunks = np.array([plan.chunk, plan.chunk + 1], dtype=np.int64)
        sizes = np.concatenate([layouts[:, :2], targets, layouts[:, 2:]], 1)
        tiles = host_module().naflex_staged_tile_bytes(sizes, 16, "bilinear", chunks).max(axis=0)
        intermediate = 3072 + 16 * 16 + 8 * 16 * plan.ksize + 3 * 16 * chunks
        shared = -(-intermediate // VECTOR) * VECTOR + tiles
        assert plan.shared == shared[0]
        budget = naflex_cuda.SHARED_TARGET if shared[0] <= naflex_cuda.SHARED_TARGET else naflex_cuda.SHARED_LIMIT
        assert plan.chunk == naflex_cuda.CHUNK or shared[1] > budget
    # The strong vertical downscale stages ~560 RGBA rows per column: a chunk below CHUNK.
    assert plan_for([FRAMES[1]])[0].chunk < naflex_cuda.CHUNK


def test_shared_memory_plan_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="downscaled too strongly"):
        plan_for([(20000, 16, 16, 16, 48, 3, 1)])
    with pytest.raises(ValueError, match="the device allows"):  # a device with less shared memory per block
        naflex_cuda.shared_memory_plan(*[np.array(v, dtype=np.int64) for v in ([[2000, 900, 3600, 4, 1]], [[64, 32]])],
                                       16, "bilinear", limit=16 * 1024)
