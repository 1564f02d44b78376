"""CogViT-L forward + backward throughput: glm5v's CogViT (fused QK-norm + 2D rotary varlen attention,
one plan per forward, packed without padding) against the same weights in transformers'
`GlmOcrVisionModel` with SDPA attention (what people run today for this tower).

Shape: CogViT-L (24 blocks, width 1024, 16 heads, MLP 4096, patch 14, GLM-OCR's 2×2 merger to
1536), 8 images of 32×32 patches (8192 tokens) in bf16, on a GPU. A step is the forward through
the merger and the backward of mean(merged²) into every weight; throughput is tokens per second.
Both models hold the same weights (`CogViT.from_glm_ocr`), and their merged outputs are compared
(bf16 tolerance) before timing. Target, printed never asserted: ours >= 1.3x transformers SDPA.

GPU only: on the CPU both providers skip with a reason (the CPU path of `varlen_attention` is the
torch reference, whose timing says nothing about the kernel).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from benchlib import cuda_synchronized, providers, record

from glm5v.models.cogvit import CogViT, glm_ocr_inputs
from glm5v_kernels.data import NaFlexProcessor, pack_images

transformers = pytest.importorskip("transformers")

PROVIDERS = ("glm5v", "transformers-sdpa")
NUM_IMAGES, GRID = 8, 32
TARGET = 1.3
TARGET_TEXT = "forward + backward >= 1.3x the tokens/s of transformers' GlmOcrVisionModel (SDPA)"


@functools.lru_cache(maxsize=1)
def models_and_inputs():
    """(ours, reference, packed images, reference inputs) on the GPU in bf16, same weights."""
    torch.manual_seed(0)
    config = transformers.GlmOcrVisionConfig()  # the CogViT-L shape
    config._attn_implementation = "sdpa"
    reference = transformers.GlmOcrVisionModel(config)
    ours = CogViT.from_glm_ocr(reference.state_dict())
    reference = reference.to("cuda", torch.bfloat16).train()
    ours = ours.to("cuda", torch.bfloat16).train()
    side = GRID * ours.config.patch_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(NUM_IMAGES)]
    processor = NaFlexProcessor(patch_size=ours.config.patch_size, merge_size=2, max_num_patches=GRID * GRID)
    packed = pack_images(images, processor)
    pixel_values, grid_thw = glm_ocr_inputs(packed, ours.config)
    packed = packed.to("cuda")
    packed.cu_seqlens, packed.spatial_shapes = packed.cu_seqlens.cpu(), packed.spatial_shapes.cpu()
    packed.patches = packed.patches.to(torch.bfloat16)
    return ours, reference, packed, (pixel_values.to("cuda", torch.bfloat16), grid_thw.to("cuda"))


def step_fn(provider: str):
    ours, reference, packed, (pixel_values, grid_thw) = models_and_inputs()
    if provider == "glm5v":
        def step():
            ours(packed).merged.float().square().mean().backward()
    else:
        def step():
            reference(pixel_values, grid_thw).pooler_output.float().square().mean().backward()
    return step


@pytest.mark.parametrize("provider", providers(*PROVIDERS, gpu_only=PROVIDERS))
def test_cogvit_l_forward_backward(benchmark, provider):
    ours, reference, packed, (pixel_values, grid_thw) = models_and_inputs()
    with torch.no_grad():  # same weights, same pictures: the same embeddings up to bf16 rounding
        mine, theirs = ours(packed).merged.float(), reference(pixel_values, grid_thw).pooler_output.float()
    error = ((mine - theirs).norm() / theirs.norm()).item()
    assert error < 5e-2, f"CogViT and GlmOcrVisionModel disagree: relative error {error:.3g}"
    step = step_fn(provider)
    step()  # warm-up: Triton compiles, the allocator settles
    torch.cuda.synchronize()
    benchmark(cuda_synchronized(step))
    record(benchmark, group=f"cogvit-l/fwd+bwd/{NUM_IMAGES}x{GRID}x{GRID}/bf16", provider=provider,
           ours=provider == "glm5v", items=packed.patches.shape[0], item_name="tokens", dtype=torch.bfloat16,
           target_ratio=TARGET, target=TARGET_TEXT, merged_relative_error=error)
