"""NaFlex on the GPU (csrc/cuda/naflex.cu through glm5v_kernels/data/cuda.py).

On the CPU machines: the kernel compiles with nvcc for sm_90a without spills (with the --fmad=false
the loader uses), NVRTC compiles it (through its C API: no driver needed), and device="cuda" fails with an
error naming what is missing. On a GPU: the kernel's output equals the host path's, which the
other NaFlex tests check against the specification, bit for bit (Lanczos within one 8-bit level:
its weights go through sin(), whose device and host results may differ in the last ulp)."""

from __future__ import annotations

import ctypes
import site
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from glm5v_kernels.data import NaFlexProcessor, pack_images, pack_video
from glm5v_kernels.data import cuda as naflex_cuda
from glm5v_kernels.testing import assert_compiles_clean, compile_cuda_for_sm90, nvcc_path

GPU = pytest.mark.gpu


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found (PATH, /usr/local/cuda/bin)")
def test_kernel_compiles_for_sm90a_without_spills():
    report = compile_cuda_for_sm90(naflex_cuda.SOURCE, extra_flags=["--fmad=false"])
    kernel = report.kernels[naflex_cuda.KERNEL]
    assert kernel.spill_stores == 0 and kernel.spill_loads == 0, report.log
    # 576 threads (patch_size 24) must fit the register file: 65536 registers per block.
    assert kernel.registers * naflex_cuda.MAX_PATCH_SIZE**2 <= 65536, report.log
    assert_compiles_clean(report)
    print(f"\n{naflex_cuda.KERNEL}: {kernel.registers} registers, {kernel.spill_stores} B spill stores, "
          f"{kernel.stack_frame} B stack frame")


def nvrtc_library() -> str | None:
    """libnvrtc of the nvidia-cuda-nvrtc wheel (site-packages/nvidia/*/lib) or of a CUDA toolkit."""
    roots = [Path(p) / "nvidia" for p in site.getsitepackages()] + [Path("/usr/local/cuda/lib64")]
    found = [str(lib) for root in roots for lib in sorted(root.glob("**/libnvrtc.so*")) if "builtins" not in lib.name]
    return found[0] if found else None


def nvrtc_ptx(library: str, source: str, options: tuple[str, ...]) -> str:
    """Compile source to PTX with NVRTC's C API (no CUDA driver needed); AssertionError with the
    compiler's log on failure."""
    nvrtc = ctypes.CDLL(library)
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"naflex.cu", 0, None, None) == 0
    encoded = [o.encode() for o in options]
    status = nvrtc.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
    size = ctypes.c_size_t()
    if status != 0:
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        raise AssertionError(f"NVRTC failed ({status}):\n{log.value.decode()}")
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(program, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return ptx.value.decode()


def test_nvrtc_compiles_the_source():
    """The source and options the loader gives CuPy's NVRTC, compiled by NVRTC itself."""
    library = nvrtc_library()
    if library is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, part of the dev extra on Linux x86-64)")
    ptx = nvrtc_ptx(library, naflex_cuda.kernel_source(), (*naflex_cuda.NVRTC_OPTIONS, "-arch=compute_90"))
    assert f".entry {naflex_cuda.KERNEL}" in ptx
    assert "ld.global.nc.v4" in ptx  # the 16-byte staging loads


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU is present")
def test_device_cuda_without_gpu_says_so():
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        pack_images([image], NaFlexProcessor(), device="cuda")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        pack_video([image[None]], NaFlexProcessor(), device="cuda:0")


def test_missing_cupy_explains_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(ImportError, match=r"glm5v\[cuda\]"):
        naflex_cuda.import_cupy()


def test_bad_device_arguments():
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="device"):
        pack_images([image], NaFlexProcessor(), device="mps")
    with pytest.raises(ValueError, match="pin_memory"):
        pack_images([image], NaFlexProcessor(), device="cuda", pin_memory=True)


# -- on a GPU ------------------------------------------------------------------------------------


def random_image(rng, height, width, channels=3):
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def assert_same_as_host(gpu, host, processor: NaFlexProcessor, fields):
    for name in fields:
        assert torch.equal(getattr(gpu, name).cpu(), getattr(host, name)), name
    diff = (gpu.patches.cpu() - host.patches).abs()
    if processor.resample == "lanczos":  # one 8-bit level, in normalised units
        assert diff.max().item() <= 1.0001 / 255 / min(processor.image_std)
    else:
        assert diff.max().item() == 0.0


def poison_cuda_cache():
    """Fill freed allocator blocks with NaN so an element the kernel misses shows."""
    torch.empty(64 << 20, device="cuda").fill_(float("nan"))


IMAGE_CASES = {
    "downscale": dict(sizes=[(300, 451), (64, 64)], channels=3, processor=dict()),
    "grey-upscale": dict(sizes=[(3, 5), (129, 63)], channels=1, processor=dict(max_num_patches=64)),
    "rgba-wide": dict(sizes=[(17, 700)], channels=4, processor=dict(max_num_patches=100)),
    "vertical-first": dict(sizes=[(400, 30), (2000, 900)], channels=3, processor=dict(max_num_patches=16)),
    "patch-14": dict(sizes=[(1080, 1920), (97, 61)], channels=3, processor=dict(patch_size=14, max_num_patches=256)),
    "custom-norm-4k": dict(sizes=[(2160, 3840)], channels=3,
                           processor=dict(max_num_patches=1024, image_mean=(0.48, 0.46, 0.41),
                                          image_std=(0.27, 0.26, 0.28))),
}


@GPU
@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "box", "lanczos"])
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_gpu_images_equal_host(case, resample, seed):
    spec = IMAGE_CASES[case]
    rng = np.random.default_rng(seed)
    images = [random_image(rng, h, w, spec["channels"]) for h, w in spec["sizes"]]
    processor = NaFlexProcessor(resample=resample, **spec["processor"])
    poison_cuda_cache()
    gpu = pack_images(images, processor, device="cuda")
    assert gpu.patches.device.type == "cuda" and gpu.max_seqlen == pack_images(images, processor).max_seqlen
    assert_same_as_host(gpu, pack_images(images, processor), processor,
                        ("cu_seqlens", "spatial_shapes", "position_ids"))


@GPU
def test_gpu_reads_frames_in_place_any_strides():
    rng = np.random.default_rng(21)
    base = random_image(rng, 301, 433, 4)
    processor = NaFlexProcessor(max_num_patches=64)
    chw = torch.from_numpy(base).cuda().permute(2, 0, 1)  # (4, H, W) view of an HWC buffer
    frames = [chw, chw[:3, ::2, ::3], chw[0], torch.from_numpy(base[..., :3]).permute(2, 0, 1).contiguous().cuda()]
    host_frames = [base, base[::2, ::3, :3], base[..., 0], base[..., :3]]
    gpu = pack_images(frames, processor, device="cuda")
    assert_same_as_host(gpu, pack_images(host_frames, processor), processor, ("cu_seqlens", "position_ids"))


@GPU
@pytest.mark.parametrize("height", [90, 400])  # horizontal pass first; vertical pass first
def test_gpu_frames_at_every_alignment(height):
    """Frames starting at every address mod 16 (RGB column offsets 0..15), with row strides that allow
    the staging's 16-byte loads (64 pixels: 192 bytes) and that do not (65: 195)."""
    rng = np.random.default_rng(24)
    processor = NaFlexProcessor(max_num_patches=16)
    for width in (64, 65):
        base = random_image(rng, height, width)
        chw = torch.from_numpy(base).cuda().permute(2, 0, 1)
        gpu = pack_images([chw[:, :, k:k + 40] for k in range(16)], processor, device="cuda")
        host = pack_images([base[:, k:k + 40] for k in range(16)], processor)
        assert_same_as_host(gpu, host, processor, ("cu_seqlens", "position_ids"))


@GPU
@pytest.mark.parametrize("temporal,merge", [(2, 2), (3, 1)])
def test_gpu_video_equals_host(temporal, merge):
    rng = np.random.default_rng(22)
    videos = [rng.integers(0, 256, (5, 180, 320, 3), dtype=np.uint8), rng.integers(0, 256, (2, 77, 50, 3),
                                                                                   dtype=np.uint8)]
    processor = NaFlexProcessor(patch_size=14, merge_size=merge, max_num_patches=120)
    poison_cuda_cache()
    gpu = pack_video(videos, processor, temporal, device="cuda")
    on_gpu = pack_video([torch.from_numpy(v).cuda().permute(0, 3, 1, 2) for v in videos], processor, temporal,
                        device="cuda")
    host = pack_video(videos, processor, temporal)
    for packed in (gpu, on_gpu):
        assert_same_as_host(packed, host, processor, ("cu_seqlens", "grid_thw", "position_ids"))


@GPU
def test_gpu_runs_on_the_current_stream():
    rng = np.random.default_rng(23)
    images = [random_image(rng, 500, 700)]
    processor = NaFlexProcessor()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu = pack_images(images, processor, device="cuda")
    stream.synchronize()
    assert torch.equal(gpu.patches.cpu(), pack_images(images, processor).patches)


@GPU
def test_gpu_refuses_what_it_cannot_run():
    image = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="patch_size must be <= 24"):
        pack_images([image], NaFlexProcessor(patch_size=32, max_num_patches=4), device="cuda")
    with pytest.raises(ValueError, match="downscaled too strongly"):
        pack_images([np.zeros((20000, 16, 3), np.uint8)], NaFlexProcessor(max_num_patches=1), device="cuda")
    with pytest.raises(TypeError, match="uint8"):
        pack_images([torch.zeros(3, 8, 8, device="cuda")], NaFlexProcessor(), device="cuda")


def test_runtime_sources_are_self_contained():
    """A built package ships csrc/cuda/*.cu and csrc/common/*.h (setup.py's RUNTIME_SOURCES) for
    NVRTC: every quoted include of the kernel must resolve inside those two folders."""
    import re

    from glm5v_kernels.data import cuda

    shipped = {cuda.CSRC / "cuda", cuda.CSRC / "common"}
    pending, seen = [cuda.SOURCE], set()
    while pending:
        source = pending.pop().resolve()
        if source in seen:
            continue
        seen.add(source)
        assert source.is_file() and source.parent in shipped, source
        for name in re.findall(r'#include\s+"([^"]+)"', source.read_text()):
            pending.append(source.parent / name)
    assert len(seen) >= 2  # the kernel and the shared per-pixel header
