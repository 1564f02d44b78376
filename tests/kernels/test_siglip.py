"""The siglip family (glm5v_kernels/ops/siglip): the Triton kernels under the interpreter on CPU
(the real kernels on a GPU) and the chunked CPU path against a float64 loss written out on the
full logit matrix with F.logsigmoid, poisoned outputs, determinism, bad input, and every kernel
configuration's sm_90a compile report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glm5v_kernels import siglip_loss
from glm5v_kernels._backend import use_backend
from glm5v_kernels.ops.siglip import reference
from glm5v_kernels.testing import (
    TARGET,
    aligned_int_values,
    assert_close,
    assert_compiles_clean,
    compile_for_sm90,
    dtype_id,
    empty_poisoned,
)

triton_ops = pytest.importorskip("glm5v_kernels.ops.siglip.triton")

ON_GPU, DEVICE, BACKEND = TARGET.on_gpu, TARGET.device, TARGET.backend
FP32_TOL = TARGET.tolerance(torch.float32)
DTYPES = [pytest.param(dtype, id=dtype_id(dtype)) for dtype in TARGET.dtypes]
tolerance = TARGET.tolerance
# Tiles small enough that the interpreter shapes below span several row and column blocks.
SMALL_TILES = triton_ops.Config(16, 16, 16, 16, 4, 1)
NAMES = ("d image_emb", "d text_emb", "d logit_scale", "d logit_bias")


def full_matrix_loss(x, y, logit_scale, logit_bias, diagonal=True):
    """The specification written out on the full (B1, B2) logits: −(1/B1)·Σ_ij log σ(l_ij·z_ij)."""
    z = logit_scale.exp() * (x @ y.T) + logit_bias
    labels = -torch.ones_like(z)
    if diagonal:
        labels = labels + 2 * torch.eye(*z.shape, dtype=z.dtype, device=z.device)
    return -F.logsigmoid(labels * z).sum() / x.shape[0]


def make_problem(b1, d, dtype, b2=None, scale_shape=()):
    """Unit-norm embeddings with matched pairs correlated, at SigLIP's initial scale and bias
    (log 10, −10) shifted a little so neither is a round number."""
    x = F.normalize(torch.randn(b1, d, device=DEVICE), dim=-1)
    y = F.normalize(torch.randn(b2 or b1, d, device=DEVICE), dim=-1)
    if b2 is None:
        y = F.normalize(y + 2 * x, dim=-1)
    scale = torch.full(scale_shape, math.log(10) + 0.3, device=DEVICE)
    bias = torch.full(scale_shape, -9.5, device=DEVICE)
    return x.to(dtype), y.to(dtype), scale, bias


def run_and_grad(fn, inputs, upstream):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, upstream)


def check(inputs, dtype, backend, positives="diagonal"):
    upstream = torch.tensor(1.7, device=DEVICE)

    def ours(*leaves):
        with use_backend(backend):
            return siglip_loss(*leaves, positives=positives)

    out, grads = run_and_grad(ours, inputs, upstream)
    expected, expected_grads = run_and_grad(
        lambda *leaves: full_matrix_loss(*leaves, diagonal=positives == "diagonal"),
        [x.double() for x in inputs], upstream.double())
    assert out.dtype == torch.float32 and out.shape == ()
    assert_close(out, expected, dtype=tolerance(dtype), name="loss")
    for name, g, e, x in zip(NAMES, grads, expected_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close(g, e, dtype=tolerance(dtype), name=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,d", [(1, 48), (37, 72), (70, 48)], ids=["B1-D48", "B37-D72", "B70-D48"])
def test_kernels_match_full_matrix_loss(b, d, dtype):
    """Default tiles; no B here is a multiple of a tile, so padded rows and columns must be masked."""
    check(make_problem(b, d, dtype), dtype, BACKEND)


@pytest.mark.interpreter
@pytest.mark.parametrize("positives,b2,scale_shape", [("diagonal", None, (1,)), ("none", 45, ())],
                         ids=["diagonal-scale-shape-1", "none-rectangular"])
def test_kernels_over_many_tiles(monkeypatch, positives, b2, scale_shape):
    """16 × 16 tiles: several row blocks (forward, dx), a multi-step row loop (dy), D = 72 in
    five 16-wide steps with a partial last one, and a rectangular block without positives."""
    for name in ("forward-fp32", "backward-fp32"):
        monkeypatch.setitem(triton_ops.CONFIGS, name, SMALL_TILES)
    check(make_problem(37, 72, torch.float32, b2=b2, scale_shape=scale_shape), torch.float32, BACKEND, positives)


@pytest.mark.parametrize("positives,b2", [("diagonal", None), ("none", 29)], ids=["diagonal", "none"])
def test_cpu_path_is_chunked_and_matches(monkeypatch, positives, b2):
    """The reference walks rows and columns in chunks that divide neither B; its diagonal crosses
    chunk boundaries at every offset."""
    monkeypatch.setattr(reference, "ROW_CHUNK", 7)
    monkeypatch.setattr(reference, "COL_CHUNK", 5)
    check(make_problem(33, 24, torch.float32, b2=b2), torch.float32, "torch", positives)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", [BACKEND, "torch"])
def test_grad_flows_only_where_asked(backend):
    """Frozen image or text tower and a fixed number as the bias: the gradients asked for are the
    same as with everything trainable (the kernels skip the products not needed)."""
    x, y, scale, bias = make_problem(20, 16, torch.float32)
    with use_backend(backend):
        _, (gx, gy, gs, _) = run_and_grad(siglip_loss, (x, y, scale, bias), None)
        xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
        siglip_loss(xs, y, ss, -9.5).backward()
        ys = y.clone().requires_grad_()
        siglip_loss(x, ys, scale, bias).backward()
    assert torch.equal(xs.grad, gx) and torch.equal(ss.grad, gs) and torch.equal(ys.grad, gy)


@pytest.mark.interpreter
def test_backward_is_deterministic():
    x, y, scale, bias = make_problem(37, 48, torch.float32)

    def ours(*leaves):
        with use_backend(BACKEND):
            return siglip_loss(*leaves)

    first, again = (run_and_grad(ours, (x, y, scale, bias), None) for _ in range(2))
    assert torch.equal(first[0], again[0])
    for g, h in zip(first[1], again[1]):
        assert torch.equal(g, h)


@pytest.mark.interpreter
def test_kernels_write_every_row():
    """Poisoned outputs: the forward writes every image's loss, dx/dy every element, and the
    partial sums every row."""
    b1, b2, d = 37, 45, 40
    x, y, scale, bias = make_problem(b1, d, torch.float32, b2=b2)
    scale1, bias1 = scale.reshape(1), bias.reshape(1)
    row_loss = empty_poisoned(b1 + 5, torch.float32, DEVICE)
    sum_c, sum_cu = empty_poisoned((2, b1), torch.float32, DEVICE)
    # The gradient kernels add into zero-initialised buffers: rows past the batch stay poisoned.
    dx, dy = empty_poisoned((b1 + 5, d), torch.float32, DEVICE), empty_poisoned((b2 + 5, d), torch.float32, DEVICE)
    dx[:b1], dy[:b2] = 0, 0
    with use_backend(BACKEND):
        triton_ops.siglip_forward(x, y, scale1, bias1, False, row_loss)
        triton_ops.siglip_backward(x, y, scale1, bias1, False, dx[:b1], dy[:b2], sum_c, sum_cu)
    z = scale.double().exp() * (x.double() @ y.double().T) + bias.double()
    assert_close(row_loss[:b1], F.softplus(z).sum(1), dtype=FP32_TOL, name="row losses")
    c = torch.sigmoid(z)
    assert_close(sum_c, c.sum(1), dtype=FP32_TOL, name="sum_c")
    assert_close(sum_cu, (c * (x.double() @ y.double().T)).sum(1), dtype=FP32_TOL, name="sum_cu")
    t = scale.double().exp()
    assert_close(dx[:b1], t * c @ y.double(), dtype=FP32_TOL, name="dx")
    assert_close(dy[:b2], t * c.T @ x.double(), dtype=FP32_TOL, name="dy")
    for name, out, n in (("row_loss", row_loss, b1), ("dx", dx, b1), ("dy", dy, b2)):
        assert torch.isnan(out[n:]).all(), f"{name} rows past the batch must stay untouched"


def test_large_logits_stay_finite():
    """|z| in the hundreds: softplus and the sigmoid saturate without overflow."""
    x, y, scale, bias = make_problem(12, 16, torch.float32)
    check((x * 6, y * 6, scale, bias), torch.float32, "torch")


# -- bad input ------------------------------------------------------------------------------------

X_, Y_, S_, B_ = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(2.3), torch.tensor(-10.0)


@pytest.mark.parametrize("args,kwargs,error,match", [
    pytest.param((X_, Y_, S_, B_), {}, None, None, id="ok"),
    pytest.param((X_, Y_, 2.3, -10.0), {}, None, None, id="ok-numbers"),
    pytest.param((X_, torch.randn(4, 9), S_, B_), {}, ValueError, "text_emb must have shape", id="mismatched-D"),
    pytest.param((X_[:0], Y_[:0], S_, B_), {}, ValueError, "empty batch", id="empty-batch"),
    pytest.param((X_, Y_[:3], S_, B_), {}, ValueError, "positives='diagonal'", id="diagonal-not-square"),
    pytest.param((X_, Y_, torch.randn(2), B_), {}, ValueError, "logit_scale must be a scalar", id="scale-shape"),
    pytest.param((X_, Y_, S_, torch.randn(1, 1)), {}, ValueError, "logit_bias must be a scalar", id="bias-2d"),
    pytest.param((X_, Y_, torch.tensor(2), B_), {}, TypeError, "logit_scale must be a floating", id="scale-int"),
    pytest.param((X_, Y_, "2.3", B_), {}, TypeError, "logit_scale", id="scale-str"),
    pytest.param((X_, Y_.half(), S_, B_), {}, TypeError, "text_emb must have image_emb's dtype", id="dtype-mismatch"),
    pytest.param((X_.long(), Y_.long(), S_, B_), {}, TypeError, "image_emb must be float32", id="int-embeddings"),
    pytest.param((X_[0], Y_, S_, B_), {}, ValueError, r"image_emb must have shape \(B, D\)", id="image-1d"),
    pytest.param((X_, Y_, S_, B_), dict(positives="all"), ValueError, "positives must be one of", id="positives"),
])
def test_bad_input_raises(args, kwargs, error, match):
    if error is None:  # the valid calls the bad ones are variations of
        assert torch.isfinite(siglip_loss(*args, **kwargs))
        return
    with pytest.raises(error, match=match):
        siglip_loss(*args, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="the interpreter runs only where there is no GPU")
def test_bf16_under_the_interpreter_is_refused():
    with use_backend("interpret"), pytest.raises(ValueError, match="interpreter"):
        siglip_loss(X_.bfloat16(), Y_.bfloat16(), S_, B_)


# -- sm_90a ---------------------------------------------------------------------------------------

_ELEM = {"16bit": "bf16", "fp32": "fp32"}
_KERNELS = {"forward": triton_ops.siglip_forward_kernel, "dx": triton_ops.siglip_dx_kernel,
            "dy": triton_ops.siglip_dy_kernel}


def _signature(kernel, elem):
    ptr = "*" + elem
    sig = {"x": ptr, "y": ptr, "scale_ptr": "*fp32", "bias_ptr": "*fp32", "B1": "i32", "B2": "i32", "D": "i32",
           "stride_x": "i32", "stride_y": "i32"}
    if kernel == "forward":
        sig.update(row_loss="*fp32")
    elif kernel == "dx":
        sig.update(dx="*fp32", sum_c="*fp32", sum_cu="*fp32", stride_dx="i32")
    else:
        sig.update(dy="*fp32", stride_dy="i32")
    return sig


COMPILES = [
    pytest.param(kernel, name, diagonal, id=f"{kernel}-{name}-{'diagonal' if diagonal else 'none'}")
    for name in triton_ops.CONFIGS
    for kernel in (("forward",) if name.startswith("forward") else ("dx", "dx-partials-only", "dy"))
    for diagonal in (True, False)
]


@pytest.mark.parametrize("aligned", [False, True], ids=["odd-shapes", "aligned-shapes"])
@pytest.mark.parametrize("kernel,config_name,diagonal", COMPILES)
def test_every_config_compiles_for_sm90(kernel, config_name, diagonal, aligned):
    """Odd shapes, and the variant aligned launches compile (every size and stride a multiple of
    16: vectorised loads pipelined through shared memory)."""
    config = triton_ops.CONFIGS[config_name]
    constexprs = {"DIAGONAL": diagonal, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "BLOCK_K": config.block_k}
    if kernel != "forward":
        constexprs["BLOCK_D"] = config.block_d
    if kernel.startswith("dx"):
        # Without an image gradient (a frozen image tower) dx only writes the scale/bias partials.
        constexprs["NEED_X"] = kernel == "dx"
        kernel = "dx"
    sig = _signature(kernel, _ELEM[config_name.split("-")[1]])
    report = compile_for_sm90(_KERNELS[kernel], sig, constexprs, num_warps=config.num_warps,
                              num_stages=config.num_stages, int_values=aligned_int_values(sig) if aligned else None)
    print(f"{report.name}[{report.config}]: {report.registers} registers, {report.shared_bytes} B shared, "
          f"{report.spill_stores} B spill stores")
    assert_compiles_clean(report, expect_wgmma=True)
