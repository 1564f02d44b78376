"""End-to-end proof of the test harness (glm5v_kernels.testing).

A tiny Triton kernel runs under the interpreter on CPU tensors and is compared with a float64
reference; the same kernel, and a tiny tl.dot kernel, are compiled ahead of time for sm_90a; nvcc
compiles CUDA sources (inline and every csrc/cuda/*.cu) for sm_90a.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from glm5v_kernels._backend import select_backend, use_backend
from glm5v_kernels.testing import (
    TOLERANCES,
    CompileReport,
    CudaCompileReport,
    KernelResources,
    aligned_int_values,
    assert_close,
    assert_close_flash,
    assert_compiles_clean,
    compile_cuda_for_sm90,
    compile_for_sm90,
    empty_poisoned,
    nvcc_path,
    poison_,
    relative_error,
)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

# The kernels run on the GPU where there is one (scripts/gpu_check.sh), else in the interpreter.
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BACKEND = "triton" if ON_GPU else "interpret"

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((REPO_ROOT / "csrc" / "cuda").glob("*.cu"))
needs_nvcc = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found (PATH, /usr/local/cuda/bin)")


# --------------------------------------------------------------------------------------------------
# kernels under test


@triton.jit
def _affine(x, a, b):
    # A helper called from a kernel: compile_for_sm90 must handle helpers under the interpreter.
    return x * a + b


@triton.jit
def axpb_kernel(x_ptr, y_ptr, a, b, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = _affine(x.to(tl.float32), a, b)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + rk
        a = tl.load(
            a_ptr + rm[:, None] * K + ks[None, :], mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0
        )
        b = tl.load(
            b_ptr + ks[:, None] * N + rn[None, :], mask=(ks[:, None] < K) & (rn[None, :] < N), other=0.0
        )
        acc = tl.dot(a, b, acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16), mask=mask)


@triton.jit
def cdiv_kernel(out_ptr, n, BLOCK: tl.constexpr):
    tl.store(out_ptr, tl.cdiv(n, BLOCK))


def axpb(x: torch.Tensor, a: float, b: float, block: int = 128) -> torch.Tensor:
    assert select_backend(x) == BACKEND
    y = empty_poisoned(x.shape, x.dtype, x.device)
    axpb_kernel[(triton.cdiv(x.numel(), block),)](x, y, a, b, x.numel(), BLOCK=block)
    return y


AXPB_SIGNATURE = {"x_ptr": "*fp32", "y_ptr": "*fp32", "a": "fp32", "b": "fp32", "n": "i32"}
MATMUL_SIGNATURE = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32"}
MATMUL_TILES = {"BM": 64, "BN": 64, "BK": 32}


# --------------------------------------------------------------------------------------------------
# interpreter runs


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", [1, 17, 1000], ids=lambda n: f"n{n}")
def test_axpb_under_interpreter_matches_float64_reference(n: int, dtype: torch.dtype) -> None:
    x = torch.randn(n, dtype=dtype, device=DEVICE)
    with use_backend(BACKEND):
        y = axpb(x, 1.5, -0.25)
    assert_close(y, 1.5 * x.double() - 0.25, name=f"axpb n={n}")


@pytest.mark.interpreter
def test_matmul_under_interpreter_fp16() -> None:
    M, N, K = 70, 33, 40
    a = torch.randn(M, K, dtype=torch.float16, device=DEVICE)
    b = torch.randn(K, N, dtype=torch.float16, device=DEVICE)
    c = empty_poisoned((M, N), torch.float16, DEVICE)
    grid = (triton.cdiv(M, MATMUL_TILES["BM"]), triton.cdiv(N, MATMUL_TILES["BN"]))
    with use_backend(BACKEND):
        assert select_backend(a, b, c) == BACKEND
        matmul_kernel[grid](a, b, c, M, N, K, **MATMUL_TILES)
    assert_close(c, a.double() @ b.double(), name="matmul")


@pytest.mark.interpreter
def test_unwritten_output_fails() -> None:
    x = torch.randn(17, device=DEVICE)
    with use_backend(BACKEND):
        y = axpb(x[:16], 2.0, 0.0)  # launched on 16 elements only
    out = torch.cat([y, empty_poisoned(1, torch.float32, DEVICE)])
    with pytest.raises(AssertionError, match=r"non-finite elements in output: 1"):
        assert_close(out, 2.0 * x.double())


# --------------------------------------------------------------------------------------------------
# ahead-of-time compile for sm_90a


@pytest.mark.parametrize("elem", ["fp32", "fp16"])
def test_axpb_compiles_clean_for_sm90(elem: str) -> None:
    sig = {**AXPB_SIGNATURE, "x_ptr": f"*{elem}", "y_ptr": f"*{elem}"}
    report = compile_for_sm90(axpb_kernel, sig, {"BLOCK": 1024}, num_warps=4)
    assert_compiles_clean(report)
    assert report.name == "axpb_kernel"
    assert report.registers > 0 and report.spill_stores == 0 and report.spill_loads == 0
    assert not report.has_wgmma
    assert ".target sm_90a" in report.ptx
    assert "BLOCK=1024" in report.config


def test_dot_kernel_lowers_to_wgmma() -> None:
    report = compile_for_sm90(matmul_kernel, MATMUL_SIGNATURE, MATMUL_TILES, num_warps=4, num_stages=3)
    assert report.has_wgmma
    assert_compiles_clean(report, expect_wgmma=True)
    assert 0 < report.shared_bytes <= 227 * 1024


def test_int_values_compile_the_aligned_variant_a_launch_would() -> None:
    """Multiples of 16 mark their arguments divisible (the loads vectorise and the loop pipelines
    through cp.async into more shared memory); 1 becomes a constant, as at a real launch."""
    generic = compile_for_sm90(matmul_kernel, MATMUL_SIGNATURE, MATMUL_TILES, num_warps=4, num_stages=3)
    aligned = compile_for_sm90(matmul_kernel, MATMUL_SIGNATURE, MATMUL_TILES, num_warps=4, num_stages=3,
                               int_values={"M": 256, "N": 256, "K": 256})
    assert "cp.async" in aligned.ptx and "cp.async" not in generic.ptx
    assert aligned.shared_bytes > generic.shared_bytes
    assert aligned_int_values(MATMUL_SIGNATURE, 64, N=1) == {"M": 64, "N": 1, "K": 64}
    with pytest.raises(ValueError, match="not integer arguments"):
        aligned_int_values(MATMUL_SIGNATURE, a_ptr=16)
    unit = compile_for_sm90(matmul_kernel, MATMUL_SIGNATURE, MATMUL_TILES, int_values={"N": 1})
    assert "N=1" in unit.config
    with pytest.raises(ValueError, match="not an integer argument"):
        compile_for_sm90(matmul_kernel, MATMUL_SIGNATURE, MATMUL_TILES, int_values={"BM": 16})


@pytest.mark.interpreter
def test_interpreter_still_runs_after_compiling() -> None:
    compile_for_sm90(axpb_kernel, AXPB_SIGNATURE, {"BLOCK": 128})
    assert ON_GPU or type(axpb_kernel).__name__ == "InterpretedFunction"
    x = torch.randn(17, device=DEVICE)
    with use_backend(BACKEND):
        assert_close(axpb(x, 3.0, 1.0), 3.0 * x.double() + 1.0)


@pytest.mark.interpreter
def test_compile_after_interpreted_run_of_stdlib_helpers() -> None:
    # tl.cdiv is a @jit function of triton's standard library; calling it under the interpreter
    # leaves tl.core patched (triton 3.6), which compile_for_sm90 must undo.
    out = empty_poisoned(1, torch.int32, DEVICE)
    with use_backend(BACKEND):
        cdiv_kernel[(1,)](out, 1000, BLOCK=64)
    assert out.item() == 16
    compile_for_sm90(cdiv_kernel, {"out_ptr": "*i32", "n": "i32"}, {"BLOCK": 64})
    report = compile_for_sm90(matmul_kernel, MATMUL_SIGNATURE, MATMUL_TILES)
    assert_compiles_clean(report, expect_wgmma=True)


def test_compile_signature_must_name_every_argument() -> None:
    with pytest.raises(ValueError, match=r"missing \['n'\]"):
        compile_for_sm90(axpb_kernel, {k: v for k, v in AXPB_SIGNATURE.items() if k != "n"}, {"BLOCK": 128})


def _report(**overrides: object) -> CompileReport:
    fields = dict(
        name="k", ptx="", registers=32, spill_stores=0, spill_loads=0, stack_frame=0,
        shared_bytes=0, ptxas_log="(log)", config="BLOCK=64",
    )  # fmt: skip
    fields.update(overrides)
    return CompileReport(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "expect_wgmma", "message"),
    [
        pytest.param({"spill_stores": 8, "spill_loads": 8}, False, "register spills: 8 bytes", id="spills"),
        pytest.param({"shared_bytes": 300 * 1024}, False, "shared memory 307200 bytes > limit", id="smem"),
        pytest.param({}, True, "no wgmma", id="no-wgmma"),
    ],
)
def test_assert_compiles_clean_reports_problems(overrides: dict, expect_wgmma: bool, message: str) -> None:
    with pytest.raises(AssertionError, match=message) as info:
        assert_compiles_clean(_report(**overrides), expect_wgmma=expect_wgmma)
    assert "k[BLOCK=64]" in str(info.value)


def test_assert_compiles_clean_on_cuda_report() -> None:
    spilling = KernelResources(
        "k", registers=255, spill_stores=16, spill_loads=16, stack_frame=16, shared_bytes=0
    )
    with pytest.raises(AssertionError, match="k: register spills: 16 bytes"):
        assert_compiles_clean(CudaCompileReport(source="x.cu", arch="sm_90a", kernels={"k": spilling}))


# --------------------------------------------------------------------------------------------------
# assert_close / assert_close_flash / relative_error / poison


def test_assert_close_passes_on_correct_fp16() -> None:
    ref = torch.randn(64, 33, dtype=torch.float64)
    assert_close(ref.half(), ref)


def test_assert_close_fails_on_nan_output() -> None:
    ref = torch.randn(10, dtype=torch.float64)
    out = ref.float()
    out[3] = math.nan
    with pytest.raises(AssertionError, match=r"relative error nan") as info:
        assert_close(out, ref, name="probe")
    msg = str(info.value)
    assert "probe mismatch: shape (10,), dtype float32" in msg
    assert "max abs error inf at index (3,)" in msg
    assert "at (3,): out nan" in msg


def test_assert_close_fails_on_wrong_output_with_report() -> None:
    ref = torch.randn(8, 9, dtype=torch.float64)
    out = ref.float()
    out[2, 5] += 1.0
    with pytest.raises(AssertionError) as info:
        assert_close(out, ref)
    msg = str(info.value)
    rel = relative_error(out, ref)
    assert f"relative error {rel:.3e} vs threshold 1.0e-05 (float32" in msg
    assert "max abs error 1 at index (2, 5)" in msg
    assert "worst elements:" in msg and "at (2, 5)" in msg


def test_assert_close_shape_mismatch() -> None:
    with pytest.raises(AssertionError, match=r"output shape \(3,\) vs reference shape \(4,\)"):
        assert_close(torch.zeros(3), torch.zeros(4, dtype=torch.float64))


def test_assert_close_tolerance_choices() -> None:
    ref = torch.randn(1000, dtype=torch.float64)
    out = (ref * (1 + 1e-4)).float()  # relative error 1e-4: too much for fp32, fine for tf32
    with pytest.raises(AssertionError):
        assert_close(out, ref)
    assert_close(out, ref, dtype="tf32")
    assert_close(out, ref, tol=2e-4)
    assert TOLERANCES[torch.bfloat16] == 1e-2 and TOLERANCES[torch.float16] == 2e-3


def test_assert_close_matching_special_values_pass() -> None:
    ref = torch.tensor([1.0, -math.inf, 2.0], dtype=torch.float64)
    assert_close(ref.float(), ref)
    with pytest.raises(AssertionError, match="1 where the reference differs"):
        assert_close(torch.tensor([1.0, 0.0, 2.0]), ref)


def test_relative_error_zero_reference_uses_absolute_norm() -> None:
    assert relative_error(torch.tensor([3.0, 4.0]), torch.zeros(2)) == pytest.approx(5.0)
    assert relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1.0)


def test_assert_close_flash() -> None:
    ref = torch.randn(32, 16, dtype=torch.float64)
    baseline = ref.half()
    assert_close_flash(ref.half(), ref, baseline)
    bad = ref.half().clone()
    bad[0, 0] += 0.5
    with pytest.raises(AssertionError, match=r"max abs error .* > bound .* = 2 x baseline error"):
        assert_close_flash(bad, ref, baseline, name="attn")
    nan = ref.half().clone()
    nan[1, 1] = math.nan
    with pytest.raises(AssertionError, match="non-finite elements in output: 1"):
        assert_close_flash(nan, ref, baseline)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_poison_float(dtype: torch.dtype) -> None:
    t = torch.zeros(5, dtype=dtype)
    assert poison_(t) is t
    assert torch.isnan(t).all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8], ids=str)
def test_poison_int(dtype: torch.dtype) -> None:
    t = poison_(torch.zeros(4, dtype=dtype))
    assert (t == torch.iinfo(dtype).min).all()


def test_poison_bool_is_refused_and_empty_poisoned() -> None:
    with pytest.raises(TypeError, match="bool"):
        poison_(torch.zeros(2, dtype=torch.bool))
    t = empty_poisoned((2, 3), torch.float16)
    assert t.shape == (2, 3) and t.dtype == torch.float16 and torch.isnan(t).all()


# --------------------------------------------------------------------------------------------------
# nvcc


TINY_CUDA = r"""
extern "C" __global__ void axpb(const float* __restrict__ x, float* __restrict__ y, float a, float b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + b;
}
"""


@needs_nvcc
def test_nvcc_compiles_inline_kernel() -> None:
    report = compile_cuda_for_sm90(TINY_CUDA)
    assert set(report.kernels) == {"axpb"}
    k = report.kernels["axpb"]
    assert k.registers > 0 and k.spill_stores == 0 and k.spill_loads == 0
    assert_compiles_clean(report)


@needs_nvcc
def test_nvcc_error_carries_compiler_message() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)nvcc failed.*error") as info:
        compile_cuda_for_sm90('extern "C" __global__ void broken(float* y) { y[0] = undefined_name; }\n')
    assert "undefined_name" in str(info.value)


@needs_nvcc
@pytest.mark.parametrize("path", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_csrc_cuda_compiles_for_sm90a(path: Path) -> None:
    assert_compiles_clean(compile_cuda_for_sm90(path))


def test_kernel_target_follows_the_machine():
    from glm5v_kernels.testing import TARGET, KernelTarget, dtype_id

    assert TARGET.on_gpu == torch.cuda.is_available()
    cpu, gpu = KernelTarget(on_gpu=False), KernelTarget(on_gpu=True)
    assert (cpu.device, cpu.backend, gpu.device, gpu.backend) == ("cpu", "interpret", "cuda", "triton")
    assert torch.bfloat16 not in cpu.dtypes and torch.bfloat16 in gpu.dtypes
    assert cpu.tolerance(torch.float32) is torch.float32 and gpu.tolerance(torch.float32) == "tf32"
    assert gpu.tolerance(torch.float16) is torch.float16
    assert [dtype_id(d) for d in gpu.dtypes] == ["fp32", "fp16", "bf16"]
