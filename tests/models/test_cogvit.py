"""CogViT (glm5v/models/cogvit.py): GLM-OCR equivalence against transformers' GlmOcrVisionModel
run in float64, masking, position grids, packing, recompute, gradients, parameter count, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from glm5v.models.cogvit import (
    CogViT,
    CogViTConfig,
    cogvit_l,
    cogvit_tiny,
    glm_ocr_inputs,
    merge_slots,
    packed_from_glm_ocr,
)
from glm5v_kernels.data import NaFlexProcessor, PackedImages, interpolate_pos_embed, pack_images, pack_video
from glm5v_kernels.testing import assert_close

transformers = pytest.importorskip("transformers")
GlmOcrVisionModel = getattr(transformers, "GlmOcrVisionModel", None)
needs_glm_ocr = pytest.mark.skipif(GlmOcrVisionModel is None, reason="transformers has no GlmOcrVisionModel")


def random_images(sizes) -> list[np.ndarray]:
    return [np.random.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def packed(config: CogViTConfig, sizes=((60, 90), (33, 20), (50, 50)), max_num_patches=48) -> PackedImages:
    processor = NaFlexProcessor(patch_size=config.patch_size, merge_size=config.merge_size or 1,
                                max_num_patches=max_num_patches)
    return pack_images(random_images(sizes), processor)


def glm_ocr_reference(**config_overrides):
    """A random GlmOcrVisionModel (every weight perturbed away from its init, norms included)."""
    fields = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48, patch_size=4)
    ref = GlmOcrVisionModel(transformers.GlmOcrVisionConfig(**{**fields, **config_overrides})).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return ref


def run_reference(ref, pixel_values, grid_thw):
    """GLM-OCR in float64: (merged output, post-norm patch features in its block-major order)."""
    ref = ref.double()
    seen = {}
    hook = ref.post_layernorm.register_forward_hook(lambda m, i, o: seen.setdefault("features", o))
    with torch.no_grad():
        merged = ref(pixel_values.double(), grid_thw).pooler_output
    hook.remove()
    return merged, seen["features"]


@needs_glm_ocr
def test_matches_glm_ocr_on_still_images():
    ref = glm_ocr_reference()
    model = CogViT.from_glm_ocr(ref.state_dict()).eval()
    assert model.config.temporal_patch_size == 2 and model.config.merge_size == 2
    images = packed(model.config)  # single-frame rows: each image is its own two frames
    assert images.patches.shape[1] == model.config.frame_dim
    with torch.no_grad():
        out = model(images)
    merged, features = run_reference(ref, *glm_ocr_inputs(images, model.config))
    assert_close(out.merged, merged, dtype=torch.float32, name="merged")
    slots = merge_slots(images.position_ids, images.spatial_shapes, images.cu_seqlens, 2)
    assert_close(out.features, features[slots], dtype=torch.float32, name="features")
    # the comparison can fail: the same patches with rows and columns swapped give another output
    swapped = dataclasses.replace(images, position_ids=images.position_ids.flip(1))
    with torch.no_grad():
        assert (model(swapped).features - out.features).norm() > 1e-2 * out.features.norm()


@needs_glm_ocr
def test_matches_glm_ocr_on_videos_and_inputs_round_trip():
    ref = glm_ocr_reference(rms_norm_eps=1e-3)
    model = CogViT.from_glm_ocr(ref.state_dict(), norm_eps=1e-3).eval()
    grid_thw = torch.tensor([[1, 4, 6], [3, 2, 4], [1, 6, 2]])  # an image, a 3-temporal-patch video, an image
    pixel_values = torch.randn(int(grid_thw.prod(1).sum()), model.config.patch_dim)
    images = packed_from_glm_ocr(pixel_values, grid_thw, model.config)
    assert images.spatial_shapes.tolist() == [[4, 6], [2, 4], [2, 4], [2, 4], [6, 2]]
    with torch.no_grad():
        out = model(images)
    merged, _ = run_reference(ref, pixel_values, grid_thw)
    assert_close(out.merged, merged, dtype=torch.float32, name="merged")
    again, grids = glm_ocr_inputs(images, model.config)
    assert torch.equal(again, pixel_values)
    assert grids.tolist() == [[1, 4, 6], [1, 2, 4], [1, 2, 4], [1, 2, 4], [1, 6, 2]]
    # videos packed by pack_video arrive in GLM-OCR's layout
    frames = [np.random.randint(0, 256, (5, 30, 44, 3), dtype=np.uint8), np.random.randint(0, 256, (2, 20, 20, 3),
                                                                                           dtype=np.uint8)]
    videos = pack_video(frames, NaFlexProcessor(patch_size=4, merge_size=2, max_num_patches=40))
    with torch.no_grad():
        out = model(packed_from_glm_ocr(videos.patches, videos.grid_thw, model.config))
    merged, _ = run_reference(ref, videos.patches, videos.grid_thw)
    assert_close(out.merged, merged, dtype=torch.float32, name="merged (pack_video)")


@needs_glm_ocr
def test_from_glm_ocr_reads_checkpoints(tmp_path):
    ref = glm_ocr_reference(rms_norm_eps=1e-4, rope_parameters={"rope_type": "axial", "rope_theta": 500.0})
    ref.save_pretrained(tmp_path / "tower")  # config.json + model.safetensors
    model = CogViT.from_glm_ocr(tmp_path / "tower", mask_token=True)
    assert (model.config.norm_eps, model.config.rope_theta, model.config.mask_token) == (1e-4, 500.0, True)
    images = packed(model.config, sizes=((40, 70),))
    with torch.no_grad():
        out = model(images)
    merged, _ = run_reference(ref, *glm_ocr_inputs(images, model.config))
    assert_close(out.merged, merged, dtype=torch.float32, name="merged")
    # a whole-model state dict in a torch file: the tower is found by its prefix, the rest ignored
    whole = {f"model.visual.{k}": v for k, v in ref.state_dict().items()}
    whole["model.language_model.embed_tokens.weight"] = torch.zeros(3, 3)
    torch.save(whole, tmp_path / "whole.pt")
    loaded = CogViT.from_glm_ocr(tmp_path / "whole.pt", norm_eps=1e-4, rope_theta=500.0)
    expected = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    with pytest.raises(ValueError, match="one GLM-OCR vision tower"):
        CogViT.from_glm_ocr({"blocks.0.norm1.weight": torch.ones(4)})
    with pytest.raises(ValueError, match=r"missing \['downsample.weight'\]"):
        CogViT.from_glm_ocr({k: v for k, v in ref.state_dict().items() if not k.startswith("downsample")})
    with pytest.raises(ValueError, match="neither a file nor a directory"):
        CogViT.from_glm_ocr(tmp_path / "missing")


def test_cogvit_l_has_403m_parameters_in_its_blocks():
    config = cogvit_l()
    with torch.device("meta"):
        model = CogViT(config)
    w, m, d = config.width, config.mlp_hidden, config.head_dim
    per_block = (3 * w * w + 3 * w) + (w * w + w) + 2 * d + 2 * w + (2 * (w * m + m) + m * w + w)
    counted = sum(p.numel() for p in model.blocks.parameters())
    assert counted == config.depth * per_block
    assert round(counted / 1e6) == 403


def test_packed_batch_equals_images_one_by_one():
    model = CogViT(cogvit_tiny()).eval()
    images = packed(model.config)
    with torch.no_grad():
        out = model(images)
        bounds, merged_start = images.cu_seqlens.tolist(), 0
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            one = PackedImages(images.patches[a:b], torch.tensor([0, b - a], dtype=torch.int32),
                               images.spatial_shapes[i:i + 1], images.position_ids[a:b], b - a)
            alone = model(one)
            torch.testing.assert_close(out.features[a:b], alone.features, rtol=1e-5, atol=1e-5)
            n = (b - a) // 4
            torch.testing.assert_close(out.merged[merged_start:merged_start + n], alone.merged, rtol=1e-5, atol=1e-5)
            merged_start += n


def test_mask_token_replaces_masked_patches():
    model = CogViT(cogvit_tiny()).eval()
    images = packed(model.config)
    total = images.patches.shape[0]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total)[: int(0.35 * total)]] = True
    with torch.no_grad():
        masked = model(images, mask).features
        # what masked patches held does not matter
        scrambled = dataclasses.replace(images, patches=torch.where(mask[:, None], torch.randn_like(images.patches),
                                                                    images.patches))
        torch.testing.assert_close(model(scrambled, mask).features, masked, rtol=0, atol=0)
        assert (masked - model(images).features).abs().max() > 1e-3
        # a mask token equal to a patch's embedding is the same as not masking that patch
        j = 5
        model.mask_token.copy_(model.patch_embed(images.patches[j]))
        one = torch.zeros(total, dtype=torch.bool)
        one[j] = True
        torch.testing.assert_close(model(images, one).features, model(images).features, rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_parameter_and_skip_masked_patches():
    model = CogViT(cogvit_tiny())
    images = packed(model.config)
    patches = images.patches.clone().requires_grad_(True)
    mask = torch.zeros(patches.shape[0], dtype=torch.bool)
    mask[::3] = True
    out = model(dataclasses.replace(images, patches=patches), mask)
    (out.features.square().mean() + out.merged.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.all(patches.grad[mask] == 0) and torch.all(patches.grad[~mask].abs().sum(1) > 0)


def test_position_grid_per_image_and_its_cache():
    model = CogViT(cogvit_tiny(pos_embed_grid=5))
    images = packed(model.config, sizes=((60, 90), (33, 20), (61, 89)))  # two images share a grid
    position_ids = images.position_ids
    expected = torch.cat([interpolate_pos_embed(model.pos_embed, tuple(s)) for s in images.spatial_shapes.tolist()])
    torch.testing.assert_close(model._position_embeddings(images, position_ids), expected, rtol=0, atol=0)
    with torch.no_grad():
        first = model._resized_pos_embed((4, 6))
        assert model._resized_pos_embed((4, 6)) is first  # cached while the parameter is unchanged
        model.pos_embed.mul_(2)  # an optimizer step would do the same
        torch.testing.assert_close(model._resized_pos_embed((4, 6)), 2 * first, rtol=1e-6, atol=1e-7)
    # with gradients on, the grid is resized afresh inside the graph
    out = model._position_embeddings(images, position_ids)
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.sum(), model.pos_embed)
    assert grad.abs().sum() > 0


def test_position_grid_gradient_is_deterministic_on_several_threads():
    """16 images of one shape read the same rows of the resized grid: their gradients must be
    summed in a fixed order, run after run (advanced indexing's backward gave 28 different results
    in 30 runs on two threads)."""
    model = CogViT(cogvit_tiny(pos_embed_grid=5))
    images = packed(model.config, sizes=((60, 90),) * 16)
    upstream = torch.randn(images.patches.shape[0], model.config.width)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = {torch.autograd.grad((model._position_embeddings(images, images.position_ids) * upstream).sum(),
                                     model.pos_embed)[0].numpy().tobytes() for _ in range(30)}
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1


def test_recompute_policy_keeps_gradients():
    base = CogViT(cogvit_tiny(depth=3, mask_token=False))
    wrapped = CogViT(cogvit_tiny(depth=3, mask_token=False, recompute="selective"))
    wrapped.load_state_dict(base.state_dict())
    assert sum(getattr(b, "_glm5v_memory_policy", None) is not None for b in wrapped.blocks) == 2  # last kept
    images = packed(base.config)
    grads = []
    for model in (base, wrapped):
        out = model(images)
        grads.append(torch.autograd.grad(out.merged.square().sum(), list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="already applied"):
        wrapped.apply_memory_policy("full")


def test_offload_policy_keeps_gradients(monkeypatch):
    """The blocks' inputs go to a pinned pool (the CUDA-only predicate patched so CPU tensors move
    too) and come back bit for bit."""
    from glm5v_kernels import memory
    from glm5v_kernels.memory import offload

    monkeypatch.setattr(offload, "_should_offload", lambda t: True)
    memory.reset_stats()
    base = CogViT(cogvit_tiny(depth=3, mask_token=False))
    wrapped = CogViT(cogvit_tiny(depth=3, mask_token=False))
    wrapped.load_state_dict(base.state_dict())
    pool = memory.PinnedPool(1 << 20, pin_memory=False)
    assert wrapped.apply_memory_policy("full", offload="inputs", pool=pool, keep_last=0) == 3
    images = packed(base.config)
    grads = [torch.autograd.grad(model(images).merged.square().sum(), list(model.parameters()))
             for model in (base, wrapped)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert memory.stats().bytes_offloaded > 0 and pool.used == 0


@pytest.mark.interpreter
def test_triton_kernels_under_the_interpreter_match_the_torch_path():
    from glm5v_kernels._backend import use_backend

    model = CogViT(cogvit_tiny(depth=1)).eval()
    images = packed(model.config, sizes=((30, 60), (40, 30)), max_num_patches=16)
    with torch.no_grad():
        expected = model(images)
        with use_backend("interpret"):
            got = model(images)
    torch.testing.assert_close(got.features, expected.features, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.merged, expected.merged, rtol=2e-5, atol=2e-5)


def test_bad_input():
    model = CogViT(cogvit_tiny(mask_token=False))
    images = packed(model.config)
    total = images.patches.shape[0]
    with pytest.raises(TypeError, match="PackedImages"):
        model(images.patches)
    with pytest.raises(ValueError, match="rows must have 588"):
        model(dataclasses.replace(images, patches=images.patches[:, :100]))
    with pytest.raises(ValueError, match="no mask token"):
        model(images, torch.zeros(total, dtype=torch.bool))
    masked = CogViT(cogvit_tiny())
    with pytest.raises(ValueError, match="mask must be a"):
        masked(images, torch.zeros(total))
    with pytest.raises(ValueError, match="mask must be a"):
        masked(images, torch.zeros(total + 1, dtype=torch.bool))
    odd = pack_images(random_images([(42, 70)]), NaFlexProcessor(patch_size=14, max_num_patches=15))
    with pytest.raises(ValueError, match="not a multiple of merge_size=2"):
        model(odd)
    with pytest.raises(ValueError, match="cu_seqlens gives"):
        model(dataclasses.replace(images, spatial_shapes=images.spatial_shapes.flip(0)))
    empty = PackedImages(torch.zeros(0, 588), torch.zeros(1, dtype=torch.int32), torch.zeros(0, 2, dtype=torch.int32),
                         torch.zeros(0, 2, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="empty"):
        model(empty)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CogViTConfig(width=100, num_heads=3)
    with pytest.raises(ValueError, match="head dim"):
        CogViTConfig(width=64, num_heads=8)
    with pytest.raises(ValueError, match="merge_size must be an int >= 1 or None"):
        CogViTConfig(merge_size=0)
    with pytest.raises(ValueError, match="recompute"):
        CogViTConfig(recompute="some")
    with pytest.raises(ValueError, match="grid_thw"):
        packed_from_glm_ocr(torch.zeros(6, 1176), torch.tensor([[1, 2, 3]]), cogvit_tiny(temporal_patch_size=2))
