"""Distillation teachers (glm5v/models/teachers.py) over tiny random transformers models built
from configs, offline: CLS and register tokens stripped, grids, resizing, freezing, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm5v.models.teachers import VisionTeacher, grids_align
from glm5v_kernels.data import NaFlexProcessor, interpolate_pos_embed, pack_images

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
CONFIGS = {
    "siglip": lambda: transformers.SiglipVisionConfig(**TINY, intermediate_size=64, image_size=32),
    "siglip2": lambda: transformers.Siglip2VisionConfig(**TINY, intermediate_size=64, num_patches=16),
    "dinov2": lambda: transformers.Dinov2Config(**TINY, mlp_ratio=2, image_size=32),
    "dinov2-registers": lambda: transformers.Dinov2WithRegistersConfig(**TINY, mlp_ratio=2, image_size=32,
                                                                      num_register_tokens=3),
    "dinov3": lambda: transformers.DINOv3ViTConfig(**TINY, intermediate_size=64, num_register_tokens=4),
}
PREFIX = {"siglip": 0, "siglip2": 0, "dinov2": 1, "dinov2-registers": 4, "dinov3": 5}  # CLS + registers


def images_of(sizes) -> list[torch.Tensor]:
    return [torch.randn(3, h, w) for h, w in sizes]


@pytest.mark.parametrize("name", ["siglip", "dinov2", "dinov2-registers", "dinov3"])
def test_patch_features_strip_cls_and_registers(name):
    teacher = VisionTeacher.from_config(CONFIGS[name]())
    assert teacher.num_prefix_tokens == PREFIX[name]
    images = images_of([(32, 48), (16, 40), (32, 48)])  # two sizes: two batched calls
    out = teacher(images)
    assert out.grids == [(4, 6), (2, 5), (4, 6)] and out.cu_seqlens.tolist() == [0, 24, 34, 58]
    kwargs = {"interpolate_pos_encoding": True} if name == "siglip" else {}
    for i, im in enumerate(images):
        with torch.no_grad():
            hidden = teacher.model(pixel_values=im[None], **kwargs).last_hidden_state[0]
        a, b = out.cu_seqlens[i], out.cu_seqlens[i + 1]
        assert hidden.shape[0] == PREFIX[name] + (b - a)
        torch.testing.assert_close(out.features[a:b], hidden[PREFIX[name]:], rtol=1e-5, atol=1e-5)


def test_siglip2_features_match_its_padded_naflex_batch():
    teacher = VisionTeacher.from_config(CONFIGS["siglip2"]())
    raw = [np.random.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(50, 80), (64, 30)]]
    packed = pack_images(raw, NaFlexProcessor(patch_size=8, max_num_patches=40))
    # the same pixels as (3, H, W) images, unpatchified from the packed rows
    images = []
    for (h, w), a, b in zip(packed.spatial_shapes.tolist(), packed.cu_seqlens[:-1], packed.cu_seqlens[1:]):
        images.append(packed.patches[a:b].view(h, w, 8, 8, 3).permute(4, 0, 2, 1, 3).reshape(3, 8 * h, 8 * w))
    out = teacher(images)
    with torch.no_grad():
        hidden = teacher.model(**packed.to_padded()).last_hidden_state
    for i, (a, b) in enumerate(zip(packed.cu_seqlens[:-1], packed.cu_seqlens[1:])):
        torch.testing.assert_close(out.features[a:b], hidden[i, : b - a], rtol=1e-5, atol=1e-5)


def test_features_resized_to_the_student_grid():
    teacher = VisionTeacher.from_config(CONFIGS["dinov3"]())
    images = images_of([(64, 96), (32, 32)])
    own = teacher(images)
    out = teacher(images, grids=[(4, 6), (4, 4)])  # the first differs, the second is the teacher's own
    assert out.grids == [(4, 6), (4, 4)] and out.cu_seqlens.tolist() == [0, 24, 40]
    expected = interpolate_pos_embed(own.features[:96].view(8, 12, -1), (4, 6))
    torch.testing.assert_close(out.features[:24], expected, rtol=0, atol=0)
    torch.testing.assert_close(out.features[24:], own.features[96:], rtol=0, atol=0)


def test_frozen_and_reloaded_from_a_checkpoint(tmp_path):
    teacher = VisionTeacher.from_config(CONFIGS["dinov2-registers"]())
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    images = images_of([(24, 40)])
    out = teacher(images)
    assert not out.features.requires_grad
    teacher.model.save_pretrained(tmp_path)
    reloaded = VisionTeacher.from_pretrained(tmp_path)
    assert reloaded.num_prefix_tokens == 4
    torch.testing.assert_close(reloaded(images).features, out.features, rtol=0, atol=0)


def test_grids_align_allows_rounding_only():
    assert grids_align((16, 24), (4, 6), slack=2)
    assert grids_align((13, 8), (2, 2), slack=2)  # a 33x20 picture: the 2x2 grid is coarse rounding
    assert not grids_align((16, 16), (2, 8), slack=2)
    assert not grids_align((16, 24), (6, 4), slack=1)


def test_bad_input():
    teacher = VisionTeacher.from_config(CONFIGS["dinov2"]())
    with pytest.raises(ValueError, match="cannot show the same picture"):
        teacher(images_of([(64, 64)]), grids=[(2, 12)])
    with pytest.raises(ValueError, match="grids has 2 entries for 1 images"):
        teacher(images_of([(32, 32)]), grids=[(4, 4), (4, 4)])
    with pytest.raises(ValueError, match="multiple of the teacher's patch size 8"):
        teacher(images_of([(30, 32)]))
    with pytest.raises(ValueError, match=r"images\[0\] must be a float \(3, H, W\)"):
        teacher([torch.zeros(1, 32, 32)])
    with pytest.raises(ValueError, match="non-empty"):
        teacher([])
    with pytest.raises(TypeError, match="model must be one of"):
        VisionTeacher(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="config.json"):
        VisionTeacher.from_pretrained("/nonexistent")
