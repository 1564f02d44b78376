"""Varlen attention with QK-norm and rotary (glm5v_kernels/ops/attention): the reference against
independent formulas, the Triton kernels against the float64 reference under the interpreter on
CPU (the real kernels on a GPU), plans, determinism, poisoned outputs, the flash-attn compat entry
point, torch.compile, bad input, and the sm_90a compile report of every configuration."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from glm5v_kernels import rotary_1d, rotary_2d, varlen_attention, varlen_plan
from glm5v_kernels._backend import use_backend
from glm5v_kernels.compat import flash_attn_varlen_func
from glm5v_kernels.ops.attention import reference
from glm5v_kernels.testing import (
    TARGET,
    aligned_int_values,
    assert_close,
    assert_compiles_clean,
    compile_for_sm90,
    dtype_id,
    poison_,
)

kernels = pytest.importorskip("glm5v_kernels.ops.attention.triton")

ON_GPU, DEVICE, BACKEND = TARGET.on_gpu, TARGET.device, TARGET.backend
FP32_TOL = TARGET.tolerance(torch.float32)
DTYPES = [pytest.param(dtype, id=dtype_id(dtype)) for dtype in TARGET.dtypes]
tolerance = TARGET.tolerance


def cu_seqlens_of(lengths, device=DEVICE) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


@dataclass(frozen=True)
class Case:
    lengths: tuple[int, ...]
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 64
    causal: bool = False
    norm: str | None = "rms"
    rot_dim: int | None = None  # None: no rotary; 0: rotary over the whole head dim
    interleaved: bool = False
    image_rotary: bool = False  # 2D tables from a square-ish patch grid per sequence


def make_inputs(case: Case, dtype: torch.dtype):
    """Random q, k, v, norm parameters and rotary tables for a case, on DEVICE."""
    total = sum(case.lengths)
    d = case.head_dim

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    q, k, v = rand(total, case.heads, d), rand(total, case.kv_heads, d), rand(total, case.kv_heads, d)
    params = {}
    if case.norm is not None:
        params["q_norm_weight"] = 1 + 0.3 * torch.randn(d, device=DEVICE)
        params["k_norm_weight"] = 1 + 0.3 * torch.randn(d, device=DEVICE)
        if case.norm == "layer":
            params["q_norm_bias"] = 0.3 * torch.randn(d, device=DEVICE)
            params["k_norm_bias"] = 0.3 * torch.randn(d, device=DEVICE)
    tables = {}
    if case.rot_dim is not None:
        rot_dim = case.rot_dim or d
        if case.image_rotary:
            grids = [torch.stack(torch.meshgrid(torch.arange(math.ceil(n / 7)), torch.arange(7), indexing="ij"),
                                 -1).reshape(-1, 2)[:n] for n in case.lengths]
            cos, sin = rotary_2d(torch.cat(grids).to(DEVICE), rot_dim)
        else:
            cos, sin = rotary_1d(torch.cat([torch.arange(n) for n in case.lengths]).to(DEVICE), rot_dim)
        tables = {"rotary_cos": cos, "rotary_sin": sin}
    return q, k, v, params, tables


def reference_call(case: Case, q, k, v, params, tables):
    """float64 reference of the case on CPU, differentiable wrt q, k, v and params."""
    d64 = {name: t.detach().cpu().double().requires_grad_() for name, t in params.items()}
    qkv = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference.varlen_attention(
        *qkv, cu_seqlens_of(case.lengths, "cpu"), causal=case.causal, qk_norm_kind=case.norm,
        rotary_interleaved=case.interleaved, **d64, **{n: t.cpu().double() for n, t in tables.items()})
    return out, lse, [*qkv, *d64.values()]


def kernel_call(case: Case, q, k, v, params, tables, **kwargs):
    with use_backend(BACKEND):
        return varlen_attention(q, k, v, cu_seqlens_of(case.lengths), max(case.lengths, default=0),
                                causal=case.causal, qk_norm=case.norm, rotary_interleaved=case.interleaved,
                                **params, **tables, **kwargs)


# Interpreter time grows with the tokens times the blocks they attend to: few heads, deliberate lengths.
CASES = [
    pytest.param(Case((1, 17, 63, 129, 255), head_dim=64, rot_dim=0, image_rotary=True), id="short-seqs-d64-rms-rot2d"),
    pytest.param(Case((300,), heads=1, kv_heads=1, head_dim=128, causal=True, norm=None),
                 id="one-long-d128-causal-plain"),
    pytest.param(Case((17, 129, 40), heads=4, kv_heads=1, head_dim=80, causal=True, rot_dim=64),
                 id="gqa4-d80-causal-rms-partial-rot"),
    pytest.param(Case((63, 70), heads=4, kv_heads=2, head_dim=72, norm="layer", rot_dim=0, interleaved=True),
                 id="gqa2-d72-layer-interleaved"),
    pytest.param(Case((5, 96, 33), head_dim=96, norm=None, rot_dim=32), id="d96-partial-rot-no-norm"),
    # Not LayerNorm without rotary: there the k bias adds one constant to a query's scores, so its
    # gradient is exactly zero and a relative error is meaningless.
    pytest.param(Case((65, 1, 130), head_dim=128, causal=True, norm="rms", rot_dim=None), id="d128-causal-rms-no-rot"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_forward_and_gradients(case, dtype):
    q, k, v, params, tables = make_inputs(case, dtype)
    inputs = [t.requires_grad_() for t in (q, k, v, *params.values())]
    out, lse = kernel_call(case, q, k, v, params, tables, return_lse=True)
    ref, ref_lse, ref_inputs = reference_call(case, q, k, v, params, tables)
    tol = tolerance(dtype)
    assert_close(out, ref, dtype=tol, name="out")
    assert_close(lse, ref_lse, dtype=tol, name="lse")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.cpu().double())
    names = ["dq", "dk", "dv", *(f"d {n}" for n in params)]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == (q.dtype if name in ("dq", "dk", "dv") else torch.float32), name
        assert_close(g, r, dtype=tol, name=name)


@pytest.mark.interpreter
def test_packed_call_equals_a_loop_over_sequences():
    """Each sequence is computed exactly as if it were alone: same blocks, same order, same bits."""
    case = Case((1, 40, 129, 7), heads=2, kv_heads=1, causal=True, rot_dim=32)
    q, k, v, params, tables = make_inputs(case, torch.float32)
    packed = kernel_call(case, q, k, v, params, tables)
    bounds = cu_seqlens_of(case.lengths, "cpu").tolist()
    for (start, end), length in zip(zip(bounds[:-1], bounds[1:]), case.lengths):
        alone = kernel_call(replace(case, lengths=(length,)), q[start:end], k[start:end], v[start:end], params,
                            {n: t[start:end] for n, t in tables.items()})
        assert torch.equal(packed[start:end], alone), f"sequence of length {length}"


@pytest.mark.interpreter
def test_plan_gives_the_same_bits_and_gradients_are_deterministic():
    case = Case((1, 70, 0, 129, 3), heads=2, kv_heads=2, causal=False, rot_dim=0)
    q, k, v, params, tables = make_inputs(case, torch.float16)
    inputs = [t.requires_grad_() for t in (q, k, v, *params.values())]
    plan = varlen_plan(cu_seqlens_of(case.lengths), max(case.lengths))
    grad = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    runs = []
    for use_plan in (False, True, True):
        out = kernel_call(case, q, k, v, params, tables, plan=plan if use_plan else None, deterministic=True)
        runs.append((out, *torch.autograd.grad(out, inputs, grad)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


class _PoisoningTorch:
    """Stands in for `torch` inside the kernel module: every buffer it allocates starts as NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return poison_(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return poison_(torch.empty_like(*args, **kwargs))


@pytest.mark.interpreter
def test_every_output_element_is_written(monkeypatch):
    """Outputs, lse, dq, dk, dv and every scratch buffer start as NaN; empty and one-token
    sequences and ragged heads dims included, so an unwritten element would surface."""
    monkeypatch.setattr(kernels, "torch", _PoisoningTorch())
    case = Case((0, 1, 33, 0, 65), heads=2, kv_heads=1, head_dim=80, causal=True, norm="layer", rot_dim=48)
    q, k, v, params, tables = make_inputs(case, torch.float32)
    inputs = [t.requires_grad_() for t in (q, k, v, *params.values())]
    out, lse = kernel_call(case, q, k, v, params, tables, return_lse=True)
    ref, ref_lse, ref_inputs = reference_call(case, q, k, v, params, tables)
    assert_close(out, ref, dtype=FP32_TOL, name="out")
    assert_close(lse, ref_lse, dtype=FP32_TOL, name="lse")
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, ref_inputs, grad.double())):
        assert_close(g, r, dtype=FP32_TOL, name="gradient")


# -- the reference against independent formulas ------------------------------------------------------


def test_reference_attention_matches_sdpa_per_sequence():
    lengths = (3, 1, 20)
    q, k, v = (torch.randn(sum(lengths), 4, 16, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    for causal in (False, True):
        out, _ = reference.attention(q, k, v, cu_seqlens_of(lengths, "cpu"), causal, 0.3)
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            expected = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                      v[sl].transpose(0, 1), is_causal=causal, scale=0.3,
                                                      enable_gqa=True).transpose(0, 1)
            assert torch.allclose(out[sl], expected, atol=1e-12), (causal, n)
            start += n


def test_reference_norms_match_torch():
    x = torch.randn(5, 3, 24, dtype=torch.float64)
    w, b = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    assert torch.allclose(reference.qk_norm(x, "rms", w, None, 1e-6), F.rms_norm(x, (24,), w, 1e-6))
    assert torch.allclose(reference.qk_norm(x, "layer", w, b, 1e-6), F.layer_norm(x, (24,), w, b, 1e-6))


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
def test_reference_rotary_is_a_complex_rotation(interleaved):
    T, H, D, rot_dim = 6, 2, 20, 12
    x = torch.randn(T, H, D, dtype=torch.float64)
    angles = torch.randn(T, rot_dim // 2, dtype=torch.float64)
    out = reference.apply_rotary(x, angles.cos(), angles.sin(), interleaved)
    if interleaved:
        pairs = torch.view_as_complex(x[..., :rot_dim].reshape(T, H, -1, 2).contiguous())
    else:
        pairs = torch.complex(x[..., : rot_dim // 2], x[..., rot_dim // 2: rot_dim])
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    expected = (torch.view_as_real(turned).flatten(-2) if interleaved
                else torch.cat((turned.real, turned.imag), dim=-1))
    assert torch.allclose(out[..., :rot_dim], expected)
    assert torch.equal(out[..., rot_dim:], x[..., rot_dim:])


def test_rotary_2d_scores_depend_only_on_relative_positions():
    """Shifting every patch by the same (row, col) offset leaves q·k unchanged, and rows and
    columns both matter (the tables' two halves follow them)."""
    rot_dim = 32
    q, k = torch.randn(1, 1, rot_dim, dtype=torch.float64), torch.randn(1, 1, rot_dim, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rotary_2d(torch.tensor([pq]), rot_dim)
        ck, sk = rotary_2d(torch.tensor([pk]), rot_dim)
        qr = reference.apply_rotary(q, cq.double(), sq.double())
        kr = reference.apply_rotary(k, ck.double(), sk.double())
        return (qr * kr).sum().item()

    base = score((2, 5), (7, 1))
    assert score((12, 8), (17, 4)) == pytest.approx(base, abs=1e-5)  # float32 tables
    assert abs(score((3, 5), (7, 1)) - base) > 1e-3 and abs(score((2, 6), (7, 1)) - base) > 1e-3


def test_rotary_1d_frequencies():
    cos, sin = rotary_1d(torch.arange(5), 8, theta=100.0)
    angles = torch.arange(5, dtype=torch.float64)[:, None] * 100.0 ** (-torch.arange(4) / 4)
    assert torch.allclose(cos.double(), angles.cos(), atol=1e-7)
    assert torch.allclose(sin.double(), angles.sin(), atol=1e-7)


def test_cpu_default_is_the_reference_and_differentiable():
    case = Case((3, 9), heads=2, kv_heads=1, rot_dim=0)
    q, k, v, params, tables = make_inputs(case, torch.float32)
    q, k, v = (t.cpu().requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu_seqlens_of(case.lengths, "cpu"), 9, qk_norm="rms",
                           **{n: t.cpu() for n, t in {**params, **tables}.items()})
    expected, _ = reference.varlen_attention(q, k, v, cu_seqlens_of(case.lengths, "cpu"), qk_norm_kind="rms",
                                             **{n: t.cpu() for n, t in {**params, **tables}.items()})
    assert torch.equal(out, expected)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


# -- drop-in entry points ------------------------------------------------------------------------------


@pytest.mark.interpreter
def test_flash_attn_compat_positional_call():
    case = Case((10, 30), heads=2, kv_heads=1, norm=None, causal=True)
    q, k, v, _, _ = make_inputs(case, torch.float16)
    cu = cu_seqlens_of(case.lengths)
    with use_backend(BACKEND):
        out, lse, probs = flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, 0.0, 0.2, True, (-1, -1), 0.0, None,
                                                 False, True)
        expected, expected_lse = varlen_attention(q, k, v, cu, 30, causal=True, softmax_scale=0.2, return_lse=True)
    assert probs is None and torch.equal(out, expected) and torch.equal(lse, expected_lse)


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(dropout_p=0.1), "dropout_p", id="dropout"),
    pytest.param(dict(window_size=(8, 0)), "window_size", id="window"),
    pytest.param(dict(softcap=30.0), "softcap", id="softcap"),
    pytest.param(dict(alibi_slopes=torch.ones(2)), "alibi_slopes", id="alibi"),
    pytest.param(dict(cu_seqlens_k=torch.tensor([0, 5, 40], dtype=torch.int32)), "cu_seqlens_k", id="cross-attention"),
])
def test_flash_attn_compat_rejects_what_it_does_not_do(kwargs, match):
    q = torch.randn(40, 2, 16)
    args = dict(q=q, k=q, v=q, cu_seqlens_q=torch.tensor([0, 10, 40], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 10, 40], dtype=torch.int32), max_seqlen_q=30, max_seqlen_k=30)
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(**{**args, **kwargs})


@pytest.mark.interpreter
def test_torch_compile_fullgraph_forward_and_backward():
    case = Case((9, 20), heads=2, kv_heads=1, head_dim=32, rot_dim=0)
    q, k, v, params, tables = make_inputs(case, torch.float32)
    cu = cu_seqlens_of(case.lengths)
    plan = varlen_plan(cu, 20)

    def step(q, k, v, wq, wk):
        out = varlen_attention(q, k, v, cu, 20, qk_norm="rms", q_norm_weight=wq, k_norm_weight=wk, plan=plan,
                               **tables)
        return (out.float() ** 2).sum()

    inputs = [t.clone().requires_grad_() for t in (q, k, v, params["q_norm_weight"], params["k_norm_weight"])]
    with use_backend(BACKEND):
        eager = step(*inputs)
        eager_grads = torch.autograd.grad(eager, inputs)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs)
        compiled_grads = torch.autograd.grad(compiled, inputs)
    assert torch.equal(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.equal(a, b)


# -- bad input --------------------------------------------------------------------------------------------


def _bad_call(**overrides):
    total, d = 12, 32
    args = dict(q=torch.randn(total, 4, d), k=torch.randn(total, 2, d), v=torch.randn(total, 2, d),
                cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32), max_seqlen=7)
    args.update(overrides)
    return varlen_attention(**args)


@pytest.mark.parametrize("overrides,error,match", [
    pytest.param(dict(cu_seqlens=torch.tensor([0, 5, 12])), TypeError, "int32", id="cu-seqlens-int64"),
    pytest.param(dict(cu_seqlens=torch.tensor([1, 5, 12], dtype=torch.int32)), ValueError, "start at 0",
                 id="cu-seqlens-not-from-0"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 8, 5, 12], dtype=torch.int32)), ValueError, "non-decreasing",
                 id="cu-seqlens-decreasing"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 5, 11], dtype=torch.int32)), ValueError, "number of tokens",
                 id="cu-seqlens-wrong-total"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32, device="meta")), ValueError,
                 "tensors' device", id="cu-seqlens-other-device"),
    pytest.param(dict(max_seqlen=6), ValueError, "max_seqlen", id="max-seqlen-too-small"),
    pytest.param(dict(max_seqlen=torch.tensor(7)), TypeError, "Python int", id="max-seqlen-tensor"),
    pytest.param(dict(q=torch.randn(12, 4, 36), k=torch.randn(12, 2, 36), v=torch.randn(12, 2, 36)), ValueError,
                 "head dim 36", id="head-dim-36"),
    pytest.param(dict(q=torch.randn(12, 4, 256), k=torch.randn(12, 2, 256), v=torch.randn(12, 2, 256)), ValueError,
                 "head dim 256", id="head-dim-256"),
    pytest.param(dict(k=torch.randn(12, 3, 32), v=torch.randn(12, 3, 32)), ValueError, "multiple",
                 id="heads-not-multiple"),
    pytest.param(dict(v=torch.randn(12, 2, 16)), ValueError, "k and v", id="v-shape"),
    pytest.param(dict(k=torch.randn(12, 2, 32, dtype=torch.float64)), TypeError, "float16", id="k-float64"),
    pytest.param(dict(k=torch.randn(12, 2, 32).half()), TypeError, "share a dtype", id="mixed-dtypes"),
    pytest.param(dict(qk_norm="batch"), ValueError, "qk_norm", id="unknown-norm"),
    pytest.param(dict(qk_norm="rms", q_norm_weight=torch.ones(16)), ValueError, r"q_norm_weight must have shape",
                 id="norm-weight-shape"),
    pytest.param(dict(q_norm_weight=torch.ones(32)), ValueError, "qk_norm is None", id="weight-without-norm"),
    pytest.param(dict(qk_norm="rms", q_norm_bias=torch.ones(32)), ValueError, "layer", id="bias-with-rms"),
    pytest.param(dict(rotary_cos=torch.ones(12, 8)), ValueError, "together", id="cos-without-sin"),
    pytest.param(dict(rotary_cos=torch.ones(11, 8), rotary_sin=torch.ones(11, 8)), ValueError, "rotary_cos",
                 id="rotary-rows"),
    pytest.param(dict(rotary_cos=torch.ones(12, 17), rotary_sin=torch.ones(12, 17)), ValueError, "rot_dim",
                 id="rot-dim-above-head-dim"),
    pytest.param(dict(plan="plan"), TypeError, "varlen_plan", id="plan-not-a-plan"),
])
def test_bad_input_raises_before_launch(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


def test_plan_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="start at 0"):
        varlen_plan([2, 5])
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_plan(torch.tensor([0, 6, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_plan([0, 6, 9], max_seqlen=4)
    with pytest.raises(ValueError, match="another batch"):
        _bad_call(plan=varlen_plan([0, 12]))


def test_plan_work_lists_cover_every_block_once():
    lengths = [0, 1, 64, 65, 300]
    plan = varlen_plan(cu_seqlens_of(lengths, "cpu"))
    for block in (64, 128):
        work = plan.work(block).tolist()
        expected = {(i, s) for i, n in enumerate(lengths) for s in range(0, n, block)}
        assert len(work) == len(expected) and set(map(tuple, work)) == expected
        assert [lengths[i] for i, _ in work] == sorted((lengths[i] for i, _ in work), reverse=True)


@pytest.mark.skipif(ON_GPU, reason="the interpreter runs only where there is no GPU")
def test_bf16_under_the_interpreter_is_refused():
    x = torch.randn(8, 2, 16, dtype=torch.bfloat16)
    with use_backend("interpret"), pytest.raises(ValueError, match="interpreter"):
        varlen_attention(x, x, x, cu_seqlens_of([8], "cpu"), 8)


# -- sm_90a ---------------------------------------------------------------------------------------------

ATTN_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "DO": "*bf16", "LSE": "*fp32",
                 "Delta": "*fp32", "DK": "*fp32", "DV": "*bf16", "DQ": "*fp32", "cu_seqlens": "*i32", "work": "*i32",
                 "W": "*fp32", "B": "*fp32", "Cos": "*fp32", "Sin": "*fp32"}
TRANSFORM_POINTERS = {"X": "*bf16", "Y": "*bf16", "DY": "*fp32", "DX": "*bf16", "Stats": "*fp32", "W": "*fp32",
                      "B": "*fp32", "Cos": "*fp32", "Sin": "*fp32", "DW": "*fp32", "DB": "*fp32"}


def signature(kernel, pointers) -> dict[str, str]:
    fn = kernel.fn
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    floats = {"qk_scale", "softmax_scale", "eps"}  # every other lower-case argument is an int
    return {n: pointers.get(n) or ("fp32" if n in floats else "i32") for n in names
            if n in pointers or not (n.isupper() and len(n) > 2)}


def q_transform(norm: int, rotary: bool) -> dict:
    return {"NORM": norm, "HAS_WEIGHT": norm > 0, "HAS_BIAS": norm == 2, "ROTARY": rotary, "INTERLEAVED": False}


# (kernel, the dispatcher's configuration for a head dim, constexpr switches)
ATTENTION_KERNELS = [
    pytest.param(kernels.attn_fwd_kernel, lambda d: kernels.fwd_config(d, fused_q=False), q_transform(0, False),
                 id="fwd"),
    pytest.param(kernels.attn_fwd_kernel, lambda d: kernels.fwd_config(d, fused_q=True), q_transform(1, True),
                 id="fwd-rms-rotary"),
    pytest.param(kernels.attn_fwd_kernel, lambda d: kernels.fwd_config(d, fused_q=True), q_transform(2, True),
                 id="fwd-layer-rotary"),
    pytest.param(kernels.attn_bwd_dkdv_kernel, kernels.dkdv_config, {}, id="bwd-dkdv"),
    pytest.param(kernels.attn_bwd_dq_kernel, lambda d: kernels.DQ_CONFIG, {}, id="bwd-dq"),
]


def compile_attention(kernel, config_for, switches, head_dim, causal, use_work, group=None):
    """group None: generic integer arguments (odd shapes); else an aligned launch of 16 query heads
    of head_dim over 16k tokens, `group` query heads per key head (1 specialises to a constant)."""
    config = config_for(head_dim)
    da, db = kernels.head_dim_chunks(head_dim)
    sig = signature(kernel, ATTN_POINTERS)
    int_values = None
    if group is not None:
        launch = {"head_dim": head_dim, "group": group, "rot_half": head_dim // 2, "stride_ct": head_dim // 2,
                  "stride_st": head_dim // 2}
        launch |= {n: (16 * head_dim if n.endswith("t") else head_dim) for n in sig
                   if n.startswith("stride_") and n not in launch}
        int_values = aligned_int_values(sig, 16384, **{n: v for n, v in launch.items() if n in sig})
    return compile_for_sm90(
        kernel, sig,
        {"CAUSAL": causal, "USE_WORK": use_work, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "DA": da,
         "DB": db, **switches},
        num_warps=config.num_warps, num_stages=config.num_stages, int_values=int_values)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("kernel,config_for,switches", ATTENTION_KERNELS)
def test_attention_kernels_compile_for_sm90(kernel, config_for, switches, head_dim, causal):
    assert_compiles_clean(compile_attention(kernel, config_for, switches, head_dim, causal, use_work=True),
                          expect_wgmma=True)


@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
@pytest.mark.parametrize("head_dim", [64, 96, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("kernel,config_for,switches", ATTENTION_KERNELS)
def test_attention_kernels_compile_for_aligned_launches(kernel, config_for, switches, head_dim, group):
    """The variant contiguous, 16-aligned batches compile (vectorised loads pipelined through
    shared memory), causal."""
    assert_compiles_clean(compile_attention(kernel, config_for, switches, head_dim, True, True, group=group),
                          expect_wgmma=True)


@pytest.mark.parametrize("kernel,config_for,switches", ATTENTION_KERNELS)
def test_attention_kernels_without_a_plan_compile_for_sm90(kernel, config_for, switches):
    """The grid-scheduled variant (no work list), at the largest head dim."""
    assert_compiles_clean(compile_attention(kernel, config_for, switches, 128, True, use_work=False),
                          expect_wgmma=True)


@pytest.mark.parametrize("norm", [0, 1, 2], ids=["no-norm", "rms", "layer"])
@pytest.mark.parametrize("kernel", [kernels.qk_transform_fwd_kernel, kernels.qk_transform_bwd_kernel],
                         ids=["transform-fwd", "transform-bwd"])
def test_transform_kernels_compile_for_sm90(kernel, norm):
    for block_d in (64, 128):
        report = compile_for_sm90(
            kernel, signature(kernel, TRANSFORM_POINTERS),
            {**q_transform(norm, True), "BLOCK_T": kernels.TRANSFORM_BLOCK_T, "BLOCK_D": block_d},
            num_warps=kernels.TRANSFORM_WARPS)
        assert_compiles_clean(report)


def test_delta_kernel_compiles_for_sm90():
    pointers = {"Out": "*bf16", "DO": "*bf16", "Delta": "*fp32"}
    report = compile_for_sm90(kernels.attn_bwd_delta_kernel, signature(kernels.attn_bwd_delta_kernel, pointers),
                              {"BLOCK_T": kernels.TRANSFORM_BLOCK_T, "BLOCK_D": 128}, num_warps=kernels.TRANSFORM_WARPS)
    assert_compiles_clean(report)


@pytest.mark.parametrize("head_dim,chunks", [(16, (16, 0)), (64, (64, 0)), (72, (64, 16)), (80, (64, 16)),
                                             (96, (64, 32)), (112, (64, 64)), (128, (128, 0))])
def test_head_dims_pad_to_a_multiple_of_16(head_dim, chunks):
    assert kernels.head_dim_chunks(head_dim) == chunks
