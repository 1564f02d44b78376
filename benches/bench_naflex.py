"""NaFlex preprocessing: `glm5v_kernels.data.pack_images` against transformers' Siglip2 image
processor (its PIL backend, the one that runs without torchvision) on real photos from
scikit-image, same settings, same pixels (checked before timing). Each provider is timed to the
input its model consumes: HF's padded batch, our packed patches (for varlen attention).

Target: >= 10x the HF processor per core, i.e. our single-thread provider against HF (which runs
on one thread). The all-threads provider shows the scaling on the machine at hand.

High-resolution images (1K, 4K) and video frames compare the host path with the CUDA kernel
(device="cuda", frames already on the GPU as decoded uint8 tensors). There the all-threads host
path is the baseline (recorded as the peer) and the GPU target is >= 20x it; the GPU providers skip
on machines without CUDA.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import PIL
import pytest
import torch
from benchlib import cuda_synchronized, providers, record

from glm5v_kernels.data import NaFlexProcessor, pack_images, pack_video

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "page", "text", "camera", "hubble_deep_field", "retina",
          "horse", "coins", "moon")
SETTINGS = {"p16-256": (16, 256), "p16-1024": (16, 1024), "p14-64": (14, 64)}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    images = []
    for name in PHOTOS:
        image = getattr(skimage_data, name)()
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        images.append(np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image)
    return images


def hf_processor(patch_size: int, budget: int):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = getattr(transformers, "Siglip2ImageProcessorPil", None) or transformers.Siglip2ImageProcessor
        return cls(patch_size=patch_size, max_num_patches=budget)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("provider", providers("glm5v-1-thread", "glm5v-all-threads", "hf-siglip2-pil"))
def test_naflex_pack(benchmark, provider, setting, photos):
    patch_size, budget = SETTINGS[setting]
    processor = NaFlexProcessor(patch_size=patch_size, max_num_patches=budget)
    threads = os.cpu_count() or 1
    if provider == "hf-siglip2-pil":
        hf = hf_processor(patch_size, budget)
        fn = lambda: hf(photos, return_tensors="pt")
        padded = lambda out: out["pixel_values"]
    else:
        num_threads = 1 if provider == "glm5v-1-thread" else threads
        fn = lambda: pack_images(photos, processor, num_threads=num_threads)
        padded = lambda out: out.to_padded(budget)["pixel_values"]

    # Same work, same answer: every provider's pixel values equal ours, exactly with Pillow >= 13
    # (older Pillow orders the resize passes differently: a level or two apart).
    expected = pack_images(photos, processor).to_padded(budget)["pixel_values"]
    tolerance = 0.0 if int(PIL.__version__.split(".")[0]) >= 13 else 0.02
    assert (padded(fn()) - expected).abs().max().item() <= tolerance

    benchmark(fn)
    megapixels = sum(image.shape[0] * image.shape[1] for image in photos) / 1e6
    record(benchmark, group=f"naflex/skimage-{len(photos)}/{setting}", provider=provider,
           ours=provider.startswith("glm5v"), items=len(photos), item_name="images",
           input_megapixels=round(megapixels, 3), threads=1 if provider != "glm5v-all-threads" else threads,
           target_ratio=10.0 if provider == "glm5v-1-thread" else None)


# name: (count, height, width) of random uint8 RGB images
LARGE = {"1k": (8, 1024, 1024), "4k": (2, 2160, 3840)}
HOST_AND_GPU = providers("glm5v-1-thread", "glm5v-all-threads", "glm5v-gpu", gpu_only=("glm5v-gpu",))


def host_or_gpu(provider: str, pack, inputs: list, processor: NaFlexProcessor):
    """The timed call of a provider; the GPU one reads copies of the inputs already on the GPU."""
    if provider == "glm5v-gpu":
        on_gpu = [torch.from_numpy(x).cuda().movedim(-1, -3) for x in inputs]
        return cuda_synchronized(lambda: pack(on_gpu, processor, device="cuda"))
    num_threads = 1 if provider == "glm5v-1-thread" else os.cpu_count() or 1
    return lambda: pack(inputs, processor, num_threads=num_threads)


@pytest.mark.parametrize("size", list(LARGE))
@pytest.mark.parametrize("provider", HOST_AND_GPU)
def test_naflex_large_images(benchmark, provider, size):
    count, height, width = LARGE[size]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    processor = NaFlexProcessor(patch_size=16, max_num_patches=1024)
    fn = host_or_gpu(provider, pack_images, images, processor)
    assert torch.equal(fn().patches.cpu(), pack_images(images, processor).patches)  # same answer first
    benchmark(fn)
    # The all-threads host path is what the GPU path is measured against: the peer of this group.
    record(benchmark, group=f"naflex/random-{count}x{size}/p16-1024", provider=provider,
           ours=provider != "glm5v-all-threads", items=count, item_name="images",
           threads=os.cpu_count() if provider == "glm5v-all-threads" else 1,
           target_ratio=20.0 if provider == "glm5v-gpu" else None)


@pytest.mark.parametrize("provider", HOST_AND_GPU)
def test_naflex_video(benchmark, provider):
    frames, height, width = 16, 720, 1280
    video = np.random.default_rng(1).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    processor = NaFlexProcessor(patch_size=14, merge_size=2, max_num_patches=576)
    fn = host_or_gpu(provider, pack_video, [video], processor)
    assert torch.equal(fn().patches.cpu(), pack_video([video], processor).patches)
    benchmark(fn)
    record(benchmark, group=f"naflex-video/{frames}x720p/p14-m2-576", provider=provider,
           ours=provider != "glm5v-all-threads", items=frames, item_name="frames",
           threads=os.cpu_count() if provider == "glm5v-all-threads" else 1,
           target_ratio=20.0 if provider == "glm5v-gpu" else None)
