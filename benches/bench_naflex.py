"""NaFlex preprocessing: `glm5v_kernels.data.pack_images` against transformers' Siglip2 image
processor (its PIL backend, the one that runs without torchvision) on real photos from
scikit-image, same settings, same pixels (checked before timing). Each provider is timed to the
input its model consumes: HF's padded batch, our packed patches (for varlen attention).

Target: >= 10x the HF processor per core, i.e. our single-thread provider against HF (which runs
on one thread). The all-threads provider shows the scaling on the machine at hand.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import PIL
import pytest
from benchlib import providers, record

from glm5v_kernels.data import NaFlexProcessor, pack_images

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
