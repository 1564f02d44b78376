"""Muon's Newton–Schulz (glm5v_kernels/ops/muon): the symmetric Gram kernel and the iteration
against float64 references, under the Triton interpreter on CPU (the real kernels on a GPU), and
the kernel's sm_90a compile report."""

from __future__ import annotations

import time

import pytest
import torch

from glm5v_kernels import newton_schulz
from glm5v_kernels._backend import use_backend
from glm5v_kernels.ops.muon import force_path, path_choices, reference
from glm5v_kernels.ops.muon import op as muon_op
from glm5v_kernels.testing import (
    TARGET,
    aligned_int_values,
    assert_close,
    assert_compiles_clean,
    compile_for_sm90,
    dtype_id,
    poison_,
)

triton_ops = pytest.importorskip("glm5v_kernels.ops.muon.triton")

ON_GPU, DEVICE, BACKEND = TARGET.on_gpu, TARGET.device, TARGET.backend
FP32_TOL = TARGET.tolerance(torch.float32)
DTYPES = [pytest.param(dtype, id=dtype_id(dtype)) for dtype in TARGET.dtypes]
tolerance = TARGET.tolerance


# -- the symmetric Gram kernel ------------------------------------------------------------------

GRAM_SHAPES = [
    pytest.param((1, 1, 1), id="1x1"),
    pytest.param((1, 17, 33), id="17x33"),
    pytest.param((2, 70, 130), id="batch2-70x130"),
    pytest.param((1, 130, 50), id="130x50-three-tiles"),
    pytest.param((3, 64, 64), id="batch3-64x64-one-tile"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GRAM_SHAPES)
def test_sym_gram_matches_full_product(shape, dtype):
    X = torch.randn(*shape, device=DEVICE, dtype=dtype)
    out = poison_(torch.empty(shape[0], shape[1], shape[1], device=DEVICE, dtype=dtype))
    with use_backend(BACKEND):
        triton_ops.sym_gram(X, out=out)
    expected = X.double() @ X.double().mT
    # The output was poisoned: the mirrored tiles below the diagonal must all have been written.
    assert_close(out, expected, dtype=tolerance(dtype), name="X·Xᵀ")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GRAM_SHAPES[1:4])
def test_sym_gram_polynomial_step(shape, dtype):
    """B = b·A + c·A·A for symmetric A, as the second product of a Newton–Schulz step runs it."""
    X = torch.randn(*shape, device=DEVICE, dtype=torch.float32)
    A = (X @ X.mT / shape[2]).to(dtype)
    out = poison_(torch.empty_like(A))
    b, c = -4.775, 2.0315
    with use_backend(BACKEND):
        triton_ops.sym_gram(A, alpha=c, C=A, beta=b, out=out)
    A64 = A.double()
    assert_close(out, b * A64 + c * (A64 @ A64), dtype=tolerance(dtype), name="b·A + c·A·A")


# -- Newton–Schulz --------------------------------------------------------------------------------

NS_SHAPES = [
    pytest.param((40, 90), id="wide-40x90"),
    pytest.param((90, 40), id="tall-90x40"),
    pytest.param((33, 33), id="square-33"),
    pytest.param((3, 2, 24, 70), id="batched-3x2-24x70"),
    pytest.param((1, 130), id="one-row"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("coefficients", ["jordan", "polar_express", [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]],
                         ids=["jordan", "polar-express", "custom-list"])
@pytest.mark.parametrize("shape", NS_SHAPES)
def test_newton_schulz_kernel_path_matches_reference(shape, coefficients):
    G = torch.randn(*shape, device=DEVICE)
    before = G.clone()
    with use_backend(BACKEND):
        out = newton_schulz(G, coefficients=coefficients, dtype=torch.float32)
    expected = reference.newton_schulz(G.cpu().double(), coefficients=coefficients, dtype=torch.float64)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert_close(out, expected, tol=2e-4 if ON_GPU else 1e-5, name="newton_schulz")
    assert torch.equal(G, before), "the input must not be modified"


@pytest.mark.interpreter
def test_newton_schulz_fp16_iteration():
    G = torch.randn(2, 48, 80, device=DEVICE)
    with use_backend(BACKEND):
        out = newton_schulz(G, dtype=torch.float16)
    expected = reference.newton_schulz(G.cpu().double(), dtype=torch.float64)
    assert_close(out, expected, tol=1e-2, name="newton_schulz fp16")


def test_reference_orthogonalises():
    """Five Jordan steps leave every singular value near 1 (the quintic maps them into about
    [0.7, 1.2]), so the result is close to the polar factor U·Vᵀ."""
    G = torch.randn(64, 160, dtype=torch.float64)
    out = reference.newton_schulz(G, dtype=torch.float64)
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.6 and singular.max() < 1.25
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.linalg.matrix_norm(out - U @ Vh) / torch.linalg.matrix_norm(U @ Vh) < 0.3


def test_zero_gradient_gives_zero_update():
    G = torch.zeros(2, 16, 24)
    for backend in ("torch", BACKEND):
        with use_backend(backend):
            out = newton_schulz(G.to(DEVICE))
        assert torch.isfinite(out).all() and torch.count_nonzero(out) == 0, backend


def test_cpu_default_is_the_reference():
    G = torch.randn(20, 30)
    assert torch.equal(newton_schulz(G), reference.newton_schulz(G))


@pytest.mark.parametrize("kwargs,error,match", [
    pytest.param(dict(G=torch.randn(5)), ValueError, r"\(\.\.\., m, n\)", id="1d"),
    pytest.param(dict(G=torch.ones(4, 4, dtype=torch.int32)), TypeError, "floating-point", id="int"),
    pytest.param(dict(G=[[1.0]]), TypeError, "torch.Tensor", id="list"),
    pytest.param(dict(G=torch.randn(4, 4), steps=0), ValueError, "steps", id="steps-0"),
    pytest.param(dict(G=torch.randn(4, 4), coefficients="newton"), ValueError, "coefficients", id="bad-name"),
    pytest.param(dict(G=torch.randn(4, 4), coefficients=[(1.0, 2.0)]), ValueError, "coefficients", id="pair"),
    pytest.param(dict(G=torch.randn(4, 4), dtype=torch.float64), ValueError, "dtype", id="float64-iteration"),
    pytest.param(dict(G=torch.randn(4, 4), eps=-1.0), ValueError, "eps", id="negative-eps"),
])
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        newton_schulz(**kwargs)


@pytest.mark.skipif(ON_GPU, reason="the interpreter runs only where there is no GPU")
def test_bf16_under_the_interpreter_is_refused():
    with use_backend("interpret"), pytest.raises(ValueError, match="interpreter"):
        newton_schulz(torch.randn(8, 8), dtype=torch.bfloat16)


# -- the choice between the symmetric kernels and plain matmuls ----------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(2, 30, 50), (50, 30)], ids=["batched-wide", "tall"])
def test_forced_matmul_path_is_the_reference_iteration(shape):
    """The fallback runs the reference's own steps: the same bits as reference.newton_schulz on
    the CPU (cuBLAS may pick other kernels for the reference's transposed views)."""
    G = torch.randn(*shape, device=DEVICE)
    with use_backend(BACKEND), force_path("matmul"):
        out = newton_schulz(G, dtype=torch.float32)
    expected = reference.newton_schulz(G, dtype=torch.float32)
    if ON_GPU:
        assert_close(out, expected, dtype=FP32_TOL, name="matmul path")
    else:
        assert torch.equal(out, expected)


def test_measured_choice_takes_the_faster_path_once_per_shape(monkeypatch):
    """Each path is timed once per (device, shape, dtype) on one step; the faster one is kept."""
    calls = {"symmetric": 0, "matmul": 0}

    def fake(path, delay):
        def steps(X, table):
            calls[path] += 1
            time.sleep(delay(X))
            return X
        return steps

    # the kernel loses on small matrices and wins on large ones
    monkeypatch.setattr(muon_op, "STEPS", {"symmetric": fake("symmetric", lambda X: 0.004 if X.shape[1] < 64 else 0),
                                           "matmul": fake("matmul", lambda X: 0 if X.shape[1] < 64 else 0.004)})
    monkeypatch.setattr(muon_op, "_choices", {})
    step = reference.JORDAN
    small, large = torch.zeros(1, 16, 32), torch.zeros(2, 96, 128)
    assert muon_op.choose_path(small, step, measure=True) == "matmul"
    assert muon_op.choose_path(large, step, measure=True) == "symmetric"
    runs = 1 + muon_op.TIMED_RUNS
    assert calls == {"symmetric": 2 * runs, "matmul": 2 * runs}
    assert muon_op.choose_path(small, step, measure=True) == "matmul" and calls["matmul"] == 2 * runs
    choices = path_choices()
    assert [c.path for c in choices.values()] == ["matmul", "symmetric"]
    assert ("cpu", (2, 96, 128), torch.float32) in choices
    with force_path("matmul"):
        assert muon_op.choose_path(large, step, measure=True) == "matmul"
    assert muon_op.choose_path(large, step, measure=False) == "symmetric"  # the interpreter: the kernel


def test_no_timing_while_compiling(monkeypatch):
    """Inside torch.compile's tracing nothing is timed: an earlier choice, else the kernel path."""
    monkeypatch.setattr(muon_op, "_choices", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    step = reference.JORDAN
    X = torch.zeros(1, 8, 16)
    assert muon_op.choose_path(X, step, measure=True) == "symmetric" and not path_choices()
    muon_op._choices[("cpu", (1, 8, 16), torch.float32)] = muon_op.PathChoice("matmul", {})
    assert muon_op.choose_path(X, step, measure=True) == "matmul"


def test_force_path_rejects_unknown_paths():
    with pytest.raises(ValueError, match="path must be one of"), force_path("cublas"):
        pass


@pytest.mark.skipif(not ON_GPU, reason="the measured choice runs on the compiled backend only")
def test_gpu_choice_is_measured_and_both_paths_agree():
    G = torch.randn(3, 100, 300, device=DEVICE)
    out = newton_schulz(G, dtype=torch.float32)
    assert (str(out.device), (3, 100, 300), torch.float32) in path_choices()
    for path in muon_op.PATHS:
        with force_path(path):
            assert_close(newton_schulz(G, dtype=torch.float32), out, tol=2e-4, name=path)


def test_polar_express_repeats_its_last_tuple():
    table, scale = reference.resolve_coefficients("polar_express", 7)
    assert table[:5] == list(reference.POLAR_EXPRESS) and table[5] == table[6] == reference.POLAR_EXPRESS[-1]
    assert scale == 1.0 + reference.POLAR_EXPRESS_SAFETY


# -- sm_90a ---------------------------------------------------------------------------------------

def signature(dtype: str) -> dict[str, str]:
    pointer = f"*{dtype}"
    return {
        "X": pointer, "C": pointer, "Out": pointer, "M": "i32", "K": "i32",
        "stride_xb": "i64", "stride_xm": "i32", "stride_xk": "i32",
        "stride_cb": "i64", "stride_cm": "i32", "stride_cn": "i32",
        "stride_ob": "i64", "stride_om": "i32", "stride_on": "i32",
        "alpha": "fp32", "beta": "fp32",
    }


# A contiguous (batch, 4096, 4096) launch: what the runtime specialises for aligned shapes
# (unit strides constant, the rest divisible by 16: vectorised loads, pipelined through cp.async).
ALIGNED = aligned_int_values(signature("bf16"), stride_xk=1, stride_cn=1, stride_on=1)


def config_id(c) -> str:
    return f"{c.block}x{c.block_k}-w{c.num_warps}-s{c.num_stages}"


# (pointer dtype, config, input precision, launch shapes) of every variant sym_gram can compile:
# 16-bit iterations on wgmma; float32 in IEEE (torch's default for fp32 matmuls) on CUDA cores or
# as tf32 on wgmma; generic (odd shapes) and aligned, except configurations offered to aligned
# launches only.
LAUNCHES = [
    pytest.param((dtype, c, precision, shapes), id=f"{dtype}-{precision}-{config_id(c)}-{shapes_id}")
    for dtype, configs, precisions in (("bf16", triton_ops.CONFIGS, ("ieee",)),
                                       ("fp32", triton_ops.FLOAT32_CONFIGS, ("ieee", "tf32")))
    for c in configs for precision in precisions
    for shapes, shapes_id in ((None, "odd-shapes"), (ALIGNED, "aligned-shapes"))
    if shapes is not None or not c.aligned_only
]


@pytest.mark.parametrize("has_c", [False, True], ids=["gram", "polynomial"])
@pytest.mark.parametrize("launch", LAUNCHES)
def test_every_config_compiles_for_sm90(launch, has_c):
    dtype, config, input_precision, shapes = launch
    report = compile_for_sm90(
        triton_ops.sym_gram_kernel, signature(dtype),
        {"HAS_C": has_c, "BLOCK": config.block, "BLOCK_K": config.block_k, "INPUT_PRECISION": input_precision},
        num_warps=config.num_warps, num_stages=config.num_stages, int_values=shapes)
    assert_compiles_clean(report, expect_wgmma=not (dtype == "fp32" and input_precision == "ieee"))


@pytest.mark.interpreter
@pytest.mark.parametrize("config", [pytest.param(c, id=config_id(c)) for c in triton_ops.CONFIGS])
def test_every_autotuner_config_computes_the_product(config):
    """The autotuner may pick any configuration on a GPU: each one gives X·Xᵀ and b·A + c·A·A
    over several (for 128 tiles, two) row and column tiles."""
    X = torch.randn(2, 200, 70, device=DEVICE, dtype=torch.float16)
    A = poison_(torch.empty(2, 200, 200, device=DEVICE, dtype=torch.float16))
    B = poison_(torch.empty_like(A))
    with use_backend(BACKEND):
        triton_ops.sym_gram(X, out=A, config=config)
        triton_ops.sym_gram(A, alpha=0.5, C=A, beta=-1.5, out=B, config=config)
    expected_A = X.double() @ X.double().mT
    assert_close(A, expected_A, dtype=tolerance(torch.float16), name="X·Xᵀ")
    A64 = A.double()
    assert_close(B, -1.5 * A64 + 0.5 * (A64 @ A64), dtype=tolerance(torch.float16), name="b·A + c·A·A")


def test_autotuner_candidates_follow_dtype_and_alignment():
    """The pruning the autotuner applies: the dtype's list, aligned-only entries for aligned
    launches (16-byte aligned pointers, sizes and strides multiples of 16 or 1)."""
    def candidates(X, m, k):
        out = torch.empty(X.shape[0], m, m, dtype=X.dtype)
        args = dict(X=X, C=out, Out=out, M=m, K=k, stride_xb=X.stride(0), stride_xm=X.stride(1),
                    stride_xk=X.stride(2), stride_cb=out.stride(0), stride_cm=out.stride(1), stride_cn=out.stride(2),
                    stride_ob=out.stride(0), stride_om=out.stride(1), stride_on=out.stride(2))
        pruned = triton_ops._launchable(triton_ops.sym_gram_autotuned.configs, args)
        return [c.glm5v_config for c in pruned]

    aligned16 = torch.empty(1, 64, 128, dtype=torch.bfloat16)
    assert candidates(aligned16, 64, 128) == list(triton_ops.CONFIGS)
    odd = torch.empty(1, 60, 130, dtype=torch.bfloat16)
    assert candidates(odd, 60, 130) == [c for c in triton_ops.CONFIGS if not c.aligned_only]
    assert candidates(torch.empty(1, 64, 128), 64, 128) == list(triton_ops.FLOAT32_CONFIGS)


def test_float32_products_follow_torchs_tf32_setting():
    matmul = torch.backends.cuda.matmul  # its attributes are properties of torch's C state
    previous = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert triton_ops.input_precision(torch.float32) == "ieee"
        assert triton_ops.input_precision(torch.bfloat16) == "ieee"  # no effect on 16-bit dots
        matmul.allow_tf32 = True
        assert triton_ops.input_precision(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = previous
