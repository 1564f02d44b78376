"""pack_video (glm5v_kernels/data/naflex.py, the host kernel's channel-major temporal layout) against
an independent numpy construction from the specification (reference.py), and its patch layout
against transformers' GLM-4V video processor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from glm5v_kernels.data import NaFlexProcessor, pack_video
from glm5v_kernels.data import reference as R


def random_video(rng: np.random.Generator, frames: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (frames, height, width, channels), dtype=np.uint8)


def normalised_frames(video: np.ndarray, processor: NaFlexProcessor) -> np.ndarray:
    """(T, H, W, C) uint8 -> (T, h, w, 3) float32 resized and normalised by the specification."""
    height, width = R.target_size(video.shape[1], video.shape[2], processor.patch_size, processor.max_num_patches,
                                  processor.merge_size)
    table = R.normalization_table(processor.image_mean, processor.image_std)
    resized = [R.resize_uint8(R.to_rgb(frame), height, width, processor.resample) for frame in video]
    return np.stack([table[np.arange(3)[None, None, :], r] for r in resized])


def video_reference(video: np.ndarray, processor: NaFlexProcessor, temporal: int):
    """(patches, grid_thw, position_ids) of one video, built with reshapes: frames padded with the last
    one, then (group, frame, channel, block row, merge row, row, block col, merge col, col) ->
    (group, block row, block col, merge row, merge col) patches of (channel, frame, row, col)."""
    frames = normalised_frames(video, processor)
    frames = np.concatenate([frames, np.repeat(frames[-1:], -len(frames) % temporal, axis=0)])
    p, m = processor.patch_size, processor.merge_size
    groups, height, width = len(frames) // temporal, frames.shape[1], frames.shape[2]
    rows, cols = height // p, width // p
    grid = frames.transpose(0, 3, 1, 2).reshape(groups, temporal, 3, rows // m, m, p, cols // m, m, p)
    patches = grid.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(groups * rows * cols, 3 * temporal * p * p)
    t, block_row, block_col, merge_row, merge_col = np.meshgrid(
        np.arange(groups), np.arange(rows // m), np.arange(cols // m), np.arange(m), np.arange(m), indexing="ij")
    ids = np.stack([t, block_row * m + merge_row, block_col * m + merge_col], axis=-1).reshape(-1, 3)
    return patches, (groups, rows, cols), ids


def assert_videos_equal(packed, videos, processor, temporal):
    expected = [video_reference(v, processor, temporal) for v in videos]
    lengths = [len(e[0]) for e in expected]
    np.testing.assert_array_equal(packed.cu_seqlens.numpy(), np.concatenate([[0], np.cumsum(lengths)]))
    np.testing.assert_array_equal(packed.grid_thw.numpy(), [e[1] for e in expected])
    np.testing.assert_array_equal(packed.position_ids.numpy(), np.concatenate([e[2] for e in expected]))
    np.testing.assert_array_equal(packed.patches.numpy(), np.concatenate([e[0] for e in expected]))
    assert packed.max_seqlen == max(lengths)
    assert packed.patches.dtype == torch.float32 and packed.position_ids.dtype == torch.int32


VIDEO_CASES = {
    "odd-frames-merge-2": dict(shapes=[(5, 90, 130)], temporal=2, processor=dict(patch_size=14, merge_size=2,
                                                                                  max_num_patches=64)),
    "two-videos-bicubic": dict(shapes=[(4, 61, 47), (1, 300, 200)], temporal=2,
                               processor=dict(max_num_patches=40, resample="bicubic")),
    "temporal-3-vertical-first": dict(shapes=[(7, 400, 30)], temporal=3, processor=dict(max_num_patches=16)),
    "temporal-1-upscale": dict(shapes=[(2, 9, 13)], temporal=1, processor=dict(patch_size=7, merge_size=2,
                                                                               max_num_patches=36)),
}


@pytest.mark.parametrize("case", list(VIDEO_CASES))
def test_pack_video_matches_numpy_construction(case, seed):
    spec = VIDEO_CASES[case]
    rng = np.random.default_rng(seed)
    videos = [random_video(rng, *shape) for shape in spec["shapes"]]
    processor = NaFlexProcessor(**spec["processor"])
    for num_threads in (1, 2):
        packed = pack_video(videos, processor, spec["temporal"], num_threads=num_threads)
        assert_videos_equal(packed, videos, processor, spec["temporal"])


def test_video_input_forms_agree():
    rng = np.random.default_rng(11)
    video = random_video(rng, 3, 50, 70)
    processor = NaFlexProcessor(max_num_patches=24)
    expected = pack_video([video], processor)
    forms = {
        "list-of-frames": list(video),
        "tchw-tensor": torch.from_numpy(video).permute(0, 3, 1, 2),
        "float-frames": [f.astype(np.float32) / 255.0 for f in video],
    }
    for name, form in forms.items():
        assert torch.equal(pack_video([form], processor).patches, expected.patches), name
    grey = video[..., 0]
    assert_videos_equal(pack_video([grey], processor), [np.repeat(grey[..., None], 3, axis=3)], processor, 2)


def test_last_frame_repeats_into_its_group():
    """A single frame with T = 2 fills both temporal slots with the same values."""
    processor = NaFlexProcessor(patch_size=8, max_num_patches=9)
    packed = pack_video([random_video(np.random.default_rng(12), 1, 30, 30)], processor)
    per_frame = packed.patches.view(-1, 3, 2, 64)
    assert torch.equal(per_frame[:, :, 0], per_frame[:, :, 1])


def test_layout_is_what_glm4v_patchify_builds():
    """transformers' GLM-4V video processor flattens (already resized and normalised) frames into the
    patches its vision tower embeds: pack_video lays values out the same way."""
    video_processing = pytest.importorskip("transformers.models.glm4v.video_processing_glm4v")
    rng = np.random.default_rng(13)
    video = random_video(rng, 3, 120, 170)
    processor = NaFlexProcessor(patch_size=14, merge_size=2, max_num_patches=80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = video_processing.Glm4vVideoProcessor()
    frames = torch.from_numpy(normalised_frames(video, processor)).permute(0, 3, 1, 2)[None]
    expected, grid_t, grid_h, grid_w = hf.patchify(frames, patch_size=14, merge_size=2, temporal_patch_size=2)
    packed = pack_video([video], processor, 2)
    assert packed.grid_thw.tolist() == [[grid_t, grid_h, grid_w]]
    assert torch.equal(packed.patches, expected[0])


@pytest.mark.parametrize("videos,kwargs,error,match", [
    pytest.param([], {}, ValueError, "videos is empty", id="no-videos"),
    pytest.param(np.zeros((2, 8, 8, 3), np.uint8), {}, TypeError, "list of videos", id="bare-array"),
    pytest.param([np.zeros((0, 8, 8, 3), np.uint8)], {}, ValueError, r"videos\[0\] has no frames", id="no-frames"),
    pytest.param([[np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)]], {}, ValueError, "one size",
                 id="mixed-sizes"),
    pytest.param([np.zeros((8, 8, 3), np.uint8)[None, None]], {}, ValueError, r"\(T, H, W, C\)", id="5d"),
    pytest.param([np.zeros((2, 8, 8, 3), np.uint8)], dict(temporal_patch_size=0), ValueError,
                 "temporal_patch_size", id="temporal-0"),
    pytest.param([np.zeros((2, 8, 8, 3), np.uint8)], dict(device="tpu"), ValueError, "device", id="bad-device"),
])
def test_bad_video_input_raises(videos, kwargs, error, match):
    with pytest.raises(error, match=match):
        pack_video(videos, NaFlexProcessor(), **kwargs)
