"""NaFlex packing (glm5v_kernels/data/naflex.py, csrc/host/naflex.cpp) against its numpy
specification (reference.py), against Pillow and against transformers' Siglip2 image processor."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from glm5v_kernels.data import NaFlexProcessor, PackedImages, pack_images
from glm5v_kernels.data import reference as R
from glm5v_kernels.testing import poison_

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13
PIL_FILTERS = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def random_image(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def pack_reference(images, processor: NaFlexProcessor):
    return R.pack_images([np.asarray(i) for i in images], processor.patch_size, processor.max_num_patches,
                         processor.merge_size, processor.image_mean, processor.image_std, processor.resample)


def assert_packed_equal(packed: PackedImages, expected) -> None:
    patches, cu_seqlens, spatial_shapes, position_ids = expected
    assert packed.patches.dtype == torch.float32 and packed.cu_seqlens.dtype == torch.int32
    assert packed.spatial_shapes.dtype == torch.int32 and packed.position_ids.dtype == torch.int32
    np.testing.assert_array_equal(packed.cu_seqlens.numpy(), cu_seqlens)
    np.testing.assert_array_equal(packed.spatial_shapes.numpy(), spatial_shapes)
    np.testing.assert_array_equal(packed.position_ids.numpy(), position_ids)
    # Bit-identical: the host kernel and the specification do the same integer arithmetic.
    np.testing.assert_array_equal(packed.patches.numpy(), patches)
    assert packed.max_seqlen == int(np.diff(cu_seqlens).max())


# -- the specification against Pillow ---------------------------------------------------------


@pytest.mark.skipif(not PILLOW_13, reason="the specification follows Pillow >= 13's pass order")
@pytest.mark.parametrize("resample", list(PIL_FILTERS))
def test_reference_resize_is_pillow(resample):
    rng = np.random.default_rng(0)
    for _ in range(25):
        height, width, out_height, out_width = (int(v) for v in rng.integers(1, 160, 4))
        image = random_image(rng, height, width)
        expected = np.asarray(Image.fromarray(image).resize((out_width, out_height), PIL_FILTERS[resample]))
        np.testing.assert_array_equal(R.resize_uint8(image, out_height, out_width, resample), expected,
                                      err_msg=f"{(height, width)} -> {(out_height, out_width)}")


def test_vertical_pass_order_matters():
    """The case Pillow 13 reorders really changes pixels, so the order is tested, not assumed."""
    rng = np.random.default_rng(1)
    image = random_image(rng, 213, 259)
    assert R.vertical_pass_first(213, 259, 47, 288)
    vertical_first = R.resize_uint8(image, 47, 288)
    horizontal_first = R._resample_axis0(
        R._resample_axis0(image.transpose(1, 0, 2), R.resample_matrix(259, 288, "bilinear")).transpose(1, 0, 2),
        R.resample_matrix(213, 47, "bilinear"))
    assert not np.array_equal(vertical_first, horizontal_first)


# -- the host kernel against the specification ------------------------------------------------

PACK_CASES = {
    "rgb-downscale": dict(sizes=[(300, 451), (64, 64)], channels=3, processor=dict()),
    "grey": dict(sizes=[(129, 63)], channels=1, processor=dict(max_num_patches=64)),
    "rgba": dict(sizes=[(17, 200)], channels=4, processor=dict(max_num_patches=100)),
    "upscale-tiny": dict(sizes=[(1, 1), (3, 5), (2, 31)], channels=3, processor=dict()),
    "tall-vertical-first": dict(sizes=[(400, 30)], channels=3, processor=dict(max_num_patches=16)),
    "wide": dict(sizes=[(20, 700)], channels=3, processor=dict(max_num_patches=50)),
    "odd-patch-7": dict(sizes=[(97, 61), (33, 33)], channels=3, processor=dict(patch_size=7, max_num_patches=70)),
    "merge-2": dict(sizes=[(250, 190)], channels=3,
                    processor=dict(patch_size=14, merge_size=2, max_num_patches=120)),
    "one-patch": dict(sizes=[(40, 3000)], channels=3, processor=dict(max_num_patches=1)),
    "custom-norm": dict(sizes=[(90, 120)], channels=3,
                        processor=dict(image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28))),
}


@pytest.mark.parametrize("resample", list(PIL_FILTERS))
@pytest.mark.parametrize("case", list(PACK_CASES))
def test_pack_matches_reference(case, resample, seed):
    spec = PACK_CASES[case]
    rng = np.random.default_rng(seed)
    images = [random_image(rng, h, w, spec["channels"]) for h, w in spec["sizes"]]
    processor = NaFlexProcessor(resample=resample, **spec["processor"])
    for num_threads in (1, 3):
        packed = pack_images(images, processor, num_threads=num_threads)
        assert_packed_equal(packed, pack_reference(images, processor))


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def horizontal_kernel(request):
    """Each exact horizontal-resampling kernel in turn (skipped where the CPU lacks it)."""
    from glm5v_kernels._backend import host_module

    host = host_module()
    if request.param not in host.naflex_supported_kernels():
        pytest.skip(f"this CPU does not run the {request.param} kernel")
    previous = host.naflex_kernel()
    host.naflex_kernel(request.param)
    yield request.param
    host.naflex_kernel(previous)


@pytest.mark.parametrize("resample", ["bilinear", "lanczos"])
@pytest.mark.parametrize("case", ["rgb-downscale", "grey", "upscale-tiny", "tall-vertical-first", "odd-patch-7"])
def test_every_horizontal_kernel_matches_reference(horizontal_kernel, case, resample, seed):
    spec = PACK_CASES[case]
    rng = np.random.default_rng(seed)
    images = [random_image(rng, h, w, spec["channels"]) for h, w in spec["sizes"]]
    # A strong downscale too: windows of many taps take several steps of the vector loops.
    images.append(random_image(rng, 911, 1301))
    processor = NaFlexProcessor(resample=resample, **spec["processor"])
    assert_packed_equal(pack_images(images, processor, num_threads=2), pack_reference(images, processor))


def test_unknown_horizontal_kernel_is_refused():
    from glm5v_kernels._backend import host_module

    with pytest.raises(ValueError, match="not one this CPU runs"):
        host_module().naflex_kernel("avx1024")
    assert host_module().naflex_kernel() in host_module().naflex_supported_kernels()


def test_pack_many_images_many_threads():
    rng = np.random.default_rng(7)
    images = [random_image(rng, int(h), int(w), int(c))
              for h, w, c in zip(rng.integers(1, 300, 40), rng.integers(1, 300, 40), rng.choice([1, 3, 4], 40))]
    processor = NaFlexProcessor(patch_size=14, max_num_patches=196)
    assert_packed_equal(pack_images(images, processor), pack_reference(images, processor))


def test_host_kernel_writes_every_element():
    """Outputs poisoned with NaN (patches) and INT32_MIN (position ids) are fully overwritten."""
    from glm5v_kernels._backend import host_module

    rng = np.random.default_rng(3)
    images = [random_image(rng, 77, 131), random_image(rng, 250, 19)]
    processor = NaFlexProcessor(patch_size=16, max_num_patches=40)
    expected = pack_reference(images, processor)
    targets = np.array([processor.target_size(*i.shape[:2]) for i in images], dtype=np.int64)
    total = int(expected[1][-1])
    patches = poison_(torch.empty(total, processor.patch_dim))
    position_ids = poison_(torch.empty(total, 2, dtype=torch.int32))
    mean, std = (np.asarray(v, dtype=np.float32) for v in (processor.image_mean, processor.image_std))
    host_module().naflex_pack(images, targets, expected[1], mean, std, 16, "bilinear", patches.numpy(),
                              position_ids.numpy(), 2)
    np.testing.assert_array_equal(patches.numpy(), expected[0])
    np.testing.assert_array_equal(position_ids.numpy(), expected[3])


# -- input forms --------------------------------------------------------------------------------


def test_input_forms_agree():
    rng = np.random.default_rng(4)
    hwc = random_image(rng, 123, 77)
    processor = NaFlexProcessor(max_num_patches=48)
    expected = pack_images([hwc], processor)
    forms = {
        "chw-tensor": torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),
        "pil": Image.fromarray(hwc),
        "float-array": hwc.astype(np.float32) / 255.0,
        "float-tensor": torch.from_numpy(hwc).permute(2, 0, 1).double() / 255.0,
        "fortran-order": np.asfortranarray(hwc),
    }
    for name, image in forms.items():
        packed = pack_images([image], processor)
        assert torch.equal(packed.patches, expected.patches), name


def test_strided_and_flipped_views_are_read_in_place():
    rng = np.random.default_rng(5)
    base = random_image(rng, 201, 333, 4)
    processor = NaFlexProcessor(max_num_patches=64)
    views = [base[::2, ::3, :3], base[::-1, :, :3], base[10:150, 40:41], base[:, ::-1, 2:3]]
    packed = pack_images(views, processor)
    assert_packed_equal(packed, pack_reference([np.ascontiguousarray(v) for v in views], processor))


def test_grey_pil_and_2d_inputs_replicate_channels():
    rng = np.random.default_rng(6)
    grey = rng.integers(0, 256, (45, 71), dtype=np.uint8)
    processor = NaFlexProcessor(max_num_patches=20)
    expected = pack_images([np.repeat(grey[:, :, None], 3, axis=2)], processor).patches
    for image in (grey, Image.fromarray(grey), torch.from_numpy(grey)):
        assert torch.equal(pack_images([image], processor).patches, expected)


# -- transformers' Siglip2 image processor on real photos ---------------------------------------

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "page", "text", "camera", "hubble_deep_field", "coins")


@pytest.fixture(scope="module")
def photos():
    skimage_data = pytest.importorskip("skimage.data")
    images = []
    for name in SKIMAGE_PHOTOS:
        image = getattr(skimage_data, name)()
        images.append(np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image)
    return images


@pytest.mark.skipif(not PILLOW_13, reason="exact agreement holds with Pillow >= 13 (its resize pass order)")
@pytest.mark.parametrize("patch_size,budget", [(16, 256), (16, 1024), (14, 64)], ids=["p16-256", "p16-1024", "p14-64"])
def test_matches_transformers_siglip2(photos, patch_size, budget):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=budget)
        expected = hf(photos, return_tensors="pt")
    padded = pack_images(photos, NaFlexProcessor(patch_size=patch_size, max_num_patches=budget)).to_padded(budget)
    assert torch.equal(padded["spatial_shapes"], expected["spatial_shapes"].to(torch.int64))
    assert torch.equal(padded["pixel_attention_mask"], expected["pixel_attention_mask"].to(torch.int32))
    # Measured: identical pixel values (max abs difference 0.0), since both resample with Pillow's
    # integer arithmetic and normalise in the same float32 steps.
    max_abs = (padded["pixel_values"] - expected["pixel_values"]).abs().max().item()
    assert max_abs == 0.0


def test_to_padded_layout():
    rng = np.random.default_rng(8)
    images = [random_image(rng, 50, 90), random_image(rng, 200, 20)]
    packed = pack_images(images, NaFlexProcessor(max_num_patches=30))
    padded = packed.to_padded()
    lengths = np.diff(packed.cu_seqlens.numpy())
    assert padded["pixel_values"].shape == (2, packed.max_seqlen, 768)
    for i, length in enumerate(lengths):
        start = packed.cu_seqlens[i]
        assert torch.equal(padded["pixel_values"][i, :length], packed.patches[start:start + length])
        assert torch.all(padded["pixel_values"][i, length:] == 0)
        assert padded["pixel_attention_mask"][i].sum() == length
    with pytest.raises(ValueError, match="num_patches"):
        packed.to_padded(packed.max_seqlen - 1)


# -- bad input ----------------------------------------------------------------------------------

GOOD = np.zeros((8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("images,error,match", [
    pytest.param([], ValueError, "images is empty", id="empty-list"),
    pytest.param(GOOD, TypeError, "list of images", id="single-array"),
    pytest.param([np.zeros((0, 5, 3), np.uint8)], ValueError, r"images\[0\] is empty", id="zero-height"),
    pytest.param([GOOD, np.zeros((4, 0), np.uint8)], ValueError, r"images\[1\] is empty", id="zero-width"),
    pytest.param([GOOD.astype(np.int16)], TypeError, r"images\[0\] must be uint8", id="int16"),
    pytest.param([GOOD.astype(bool)], TypeError, r"images\[0\] must be uint8", id="bool"),
    pytest.param([np.full((4, 4, 3), 1.5, np.float32)], ValueError, r"\[0, 1\]", id="float-above-1"),
    pytest.param([np.full((4, 4, 3), -0.1)], ValueError, r"\[0, 1\]", id="float-negative"),
    pytest.param([np.full((4, 4, 3), np.nan, np.float32)], ValueError, "NaN", id="float-nan"),
    pytest.param([np.zeros((4, 4, 2), np.uint8)], ValueError, "1, 3 or 4 channels", id="two-channels"),
    pytest.param([np.zeros((3, 9, 9), np.uint8)], ValueError, "channels-last", id="chw-numpy"),
    pytest.param([np.zeros((2, 4, 4, 3), np.uint8)], ValueError, r"\(H, W, C\)", id="4d-array"),
    pytest.param([torch.zeros(3, 4, 4, dtype=torch.uint8, device="meta")], ValueError, "on the CPU", id="meta-tensor"),
    pytest.param(["astronaut.png"], TypeError, "numpy array, a PIL image or a torch tensor", id="path-string"),
])
def test_bad_images_raise_clear_errors(images, error, match):
    with pytest.raises(error, match=match):
        pack_images(images, NaFlexProcessor())


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(patch_size=0), "patch_size", id="patch-size-0"),
    pytest.param(dict(patch_size=16.0), "patch_size", id="patch-size-float"),
    pytest.param(dict(max_num_patches=0), "max_num_patches", id="budget-0"),
    pytest.param(dict(max_num_patches=3, merge_size=2), "max_num_patches", id="budget-below-merge"),
    pytest.param(dict(image_mean=(0.5, 0.5)), "image_mean", id="mean-2-values"),
    pytest.param(dict(image_std=(0.5, 0.0, 0.5)), "image_std", id="std-zero"),
    pytest.param(dict(image_std=(0.5, math.nan, 0.5)), "image_std", id="std-nan"),
    pytest.param(dict(resample="nearest"), "resample", id="unknown-filter"),
])
def test_bad_processor_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NaFlexProcessor(**kwargs)


def test_bad_call_arguments():
    with pytest.raises(TypeError, match="NaFlexProcessor"):
        pack_images([GOOD], {"patch_size": 16})
    with pytest.raises(ValueError, match="num_threads"):
        pack_images([GOOD], NaFlexProcessor(), num_threads=0)


def test_missing_host_extension_explains_how_to_build(monkeypatch):
    import glm5v_kernels._backend as backend

    def fail(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(backend.importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"pip install -e \."):
        pack_images([GOOD], NaFlexProcessor())


def test_packing_releases_the_gil():
    """While a long pack runs in another thread, this thread keeps running Python: the largest
    pause it sees is a small part of the pack's duration (with the GIL held it would span it)."""
    import threading
    import time

    image = random_image(np.random.default_rng(9), 2000, 2000)
    done = threading.Event()
    duration = []

    def work():
        start = time.perf_counter()
        pack_images([image] * 60, NaFlexProcessor(), num_threads=1)
        duration.append(time.perf_counter() - start)
        done.set()

    worker = threading.Thread(target=work)
    last = time.perf_counter()
    largest_pause = 0.0
    worker.start()
    while not done.is_set():
        now = time.perf_counter()
        largest_pause, last = max(largest_pause, now - last), now
    worker.join()
    assert duration[0] > 0.02, "the pack must run long enough to tell"
    assert largest_pause < 0.5 * duration[0], (largest_pause, duration[0])
