"""The mtp family (glm5v_kernels/ops/mtp): fused linear cross-entropy, placeholder embedding,
visual merge and mtp_roll against independent float64 / loop references, the Triton kernels
under the interpreter on CPU (the real kernels on a GPU), the chunked CPU path, bad input, and
every kernel configuration's sm_90a compile report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm5v_kernels import embed_with_placeholder, fused_linear_cross_entropy, merge_visual_embeddings, mtp_roll
from glm5v_kernels._backend import use_backend
from glm5v_kernels.ops.mtp import reference
from glm5v_kernels.testing import (
    TARGET,
    aligned_int_values,
    assert_close,
    assert_compiles_clean,
    compile_for_sm90,
    dtype_id,
    empty_poisoned,
    poison_,
)

triton_ops = pytest.importorskip("glm5v_kernels.ops.mtp.triton")

ON_GPU, DEVICE, BACKEND = TARGET.on_gpu, TARGET.device, TARGET.backend
FP32_TOL = TARGET.tolerance(torch.float32)
DTYPES = [pytest.param(dtype, id=dtype_id(dtype)) for dtype in TARGET.dtypes]
tolerance = TARGET.tolerance
IGNORE = -100
# Tiles small enough that the interpreter shapes below span several row blocks and vocabulary tiles.
SMALL_TILES = triton_ops.Config(16, 64, 16, 16, 4, 1)


# -- fused linear cross-entropy -------------------------------------------------------------------


def make_problem(n, h, v, dtype, ignored, bias):
    hidden = torch.randn(n, h, device=DEVICE).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) / h**0.5 * 3).to(dtype)  # logits of a few units
    b = torch.randn(v, device=DEVICE).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), device=DEVICE)
    targets[torch.rand(n, device=DEVICE) < ignored] = IGNORE
    return hidden, weight, b, targets


def reference_loss(hidden, weight, bias, targets, *, reduction="mean", normalizer=None, label_smoothing=0.0,
                   z_loss=0.0, softcap=None):
    """Float64, from the full logits through F.cross_entropy."""
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing)
    valid = targets != IGNORE
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (normalizer if normalizer is not None else valid.sum().clamp(min=1))


def run_and_grad(fn, inputs, upstream):
    leaves = [x.detach().requires_grad_() if x is not None else None for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [x for x in leaves if x is not None], upstream)
    return out, grads


CE_CASES = [
    pytest.param(dict(), 0.0, False, id="plain"),
    pytest.param(dict(), 0.6, True, id="60pct-ignored-bias"),
    pytest.param(dict(label_smoothing=0.1, reduction="sum"), 0.3, False, id="label-smoothing-sum"),
    pytest.param(dict(z_loss=1e-3, reduction="none"), 0.3, True, id="z-loss-none"),
    pytest.param(dict(softcap=5.0, label_smoothing=0.1, z_loss=1e-3), 0.3, True, id="softcap-everything"),
    pytest.param(dict(normalizer=57.0), 0.3, False, id="normalizer"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs,ignored,bias", CE_CASES)
def test_fused_ce_matches_cross_entropy(kwargs, ignored, bias, dtype):
    """V = 200 is no multiple of any vocabulary tile: padded columns must carry no probability."""
    inputs = make_problem(37, 48, 200, dtype, ignored, bias)
    hidden, weight, b, targets = inputs
    none = kwargs.get("reduction") == "none"
    upstream = torch.randn(37, device=DEVICE) if none else torch.tensor(1.7, device=DEVICE)

    def ours(h, w, bb):
        with use_backend(BACKEND):
            return fused_linear_cross_entropy(h, w, targets, bias=bb, **kwargs)

    out, grads = run_and_grad(ours, (hidden, weight, b), upstream)
    expected, expected_grads = run_and_grad(
        lambda h, w, bb: reference_loss(h, w, bb, targets, **kwargs), (hidden.double(), weight.double(),
                                                                     None if b is None else b.double()), upstream)
    assert out.dtype == torch.float32
    assert_close(out, expected, dtype=tolerance(dtype), name="loss")
    for name, g, e in zip(("dhidden", "dweight", "dbias"), grads, expected_grads):
        assert g.dtype == dtype
        assert_close(g, e, dtype=tolerance(dtype), name=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("ignored", [0.0, 0.6], ids=["0pct-ignored", "60pct-ignored"])
def test_fused_ce_kernels_over_many_tiles(monkeypatch, ignored):
    """16-row blocks and 64-column tiles: several row blocks (forward, dhidden), a multi-step row
    loop (dweight), a partial last vocabulary tile, valid rows gathered from everywhere."""
    monkeypatch.setitem(triton_ops.CONFIGS, "forward-fp32", SMALL_TILES)
    monkeypatch.setitem(triton_ops.CONFIGS, "backward-fp32", SMALL_TILES)
    hidden, weight, b, targets = make_problem(40, 40, 150, torch.float32, ignored, True)
    kwargs = dict(softcap=4.0, label_smoothing=0.05, z_loss=1e-3)

    def ours(h, w, bb):
        with use_backend(BACKEND):
            return fused_linear_cross_entropy(h, w, targets, bias=bb, **kwargs)

    out, grads = run_and_grad(ours, (hidden, weight, b), torch.tensor(1.0))
    expected, expected_grads = run_and_grad(lambda h, w, bb: reference_loss(h, w, bb, targets, **kwargs),
                                            (hidden.double(), weight.double(), b.double()), torch.tensor(1.0))
    assert_close(out, expected, dtype=FP32_TOL, name="loss")
    for name, g, e in zip(("dhidden", "dweight", "dbias"), grads, expected_grads):
        assert_close(g, e, dtype=FP32_TOL, name=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", [BACKEND, "torch"])
def test_single_row(backend):
    hidden, weight, _, targets = make_problem(1, 48, 200, torch.float32, 0.0, False)
    out, grads = run_and_grad(
        lambda h, w: _with_backend(backend, fused_linear_cross_entropy, h, w, targets), (hidden, weight),
        torch.tensor(1.0))
    expected, expected_grads = run_and_grad(lambda h, w: reference_loss(h, w, None, targets),
                                            (hidden.double(), weight.double()), torch.tensor(1.0))
    assert_close(out, expected, dtype=FP32_TOL, name="loss")
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, dtype=FP32_TOL, name="gradient")


def _with_backend(backend, fn, *args, **kwargs):
    with use_backend(backend):
        return fn(*args, **kwargs)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", [BACKEND, "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(backend, reduction):
    hidden, weight, b, _ = make_problem(12, 48, 200, torch.float32, 0.0, True)
    targets = torch.full((12,), IGNORE, device=DEVICE)
    leaves = [x.requires_grad_() for x in (hidden, weight, b)]
    with use_backend(backend):
        loss, lse = fused_linear_cross_entropy(*leaves[:2], targets, bias=leaves[2], reduction=reduction,
                                               return_lse=True)
    (loss.sum() if reduction == "none" else loss).backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(lse, torch.zeros_like(lse))
    for x in leaves:
        assert torch.equal(x.grad, torch.zeros_like(x)), "an ignored row must not produce a gradient"


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", [BACKEND, "torch"])
def test_return_lse(backend):
    hidden, weight, b, targets = make_problem(20, 48, 200, torch.float32, 0.4, True)
    with use_backend(backend):
        _, lse = fused_linear_cross_entropy(hidden, weight, targets, bias=b, softcap=3.0, return_lse=True)
    logits = F.linear(hidden.double(), weight.double(), b.double())
    expected = torch.where(targets != IGNORE, torch.logsumexp(3.0 * torch.tanh(logits / 3.0), -1), 0.0)
    assert_close(lse, expected, dtype=FP32_TOL, name="lse")


def test_normalizer_gives_the_global_mean_over_micro_batches():
    """Two micro-batches normalised by the global valid count sum to the full batch's mean, and the
    normaliser may be a device tensor."""
    hidden, weight, _, targets = make_problem(30, 24, 50, torch.float32, 0.5, False)
    total = (targets != IGNORE).sum()
    parts = [fused_linear_cross_entropy(hidden[s], weight, targets[s], normalizer=total)
             for s in (slice(0, 11), slice(11, 30))]
    assert_close(parts[0] + parts[1], reference_loss(hidden, weight, None, targets), dtype=torch.float32)


def test_cpu_path_is_chunked_and_matches(monkeypatch):
    """The reference walks rows and vocabulary in chunks; chunk sizes that do not divide N or V
    give the same loss and gradients as the full logits."""
    monkeypatch.setattr(reference, "ROW_CHUNK", 7)
    monkeypatch.setattr(reference, "VOCAB_CHUNK", 33)
    inputs = make_problem(30, 24, 100, torch.float32, 0.3, True)
    kwargs = dict(softcap=6.0, label_smoothing=0.2, z_loss=1e-2, reduction="none")
    upstream = torch.randn(30)
    out, grads = run_and_grad(lambda h, w, b: fused_linear_cross_entropy(h, w, inputs[3], bias=b, **kwargs),
                              inputs[:3], upstream)
    expected, expected_grads = run_and_grad(lambda h, w, b: reference_loss(h, w, b, inputs[3], **kwargs),
                                            [x.double() for x in inputs[:3]], upstream)
    assert_close(out, expected, dtype=torch.float32, name="loss")
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, dtype=torch.float32, name="gradient")


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["torch", BACKEND])
def test_under_torch_compile(backend):
    """Compiled loss and gradients equal the eager ones: a tied embedding / output weight through
    embed_with_placeholder and the fused cross-entropy, with ignored rows."""
    hidden, weight, _, targets = make_problem(24, 16, 40, torch.float32, 0.5, False)
    ids = torch.randint(0, 40, (24,), device=DEVICE)
    is_visual = torch.rand(24, device=DEVICE) < 0.3

    def loss_fn(h, w):
        x = h + embed_with_placeholder(ids, w, is_visual, 3, norm_weight=torch.ones(16, device=DEVICE))
        return fused_linear_cross_entropy(x, w, targets, label_smoothing=0.1, softcap=5.0)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    with use_backend(backend):
        out, grads = run_and_grad(compiled, (hidden, weight), None)
        expected, expected_grads = run_and_grad(loss_fn, (hidden, weight), None)
    assert_close(out, expected, dtype=torch.float32, name="compiled loss")
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, dtype=torch.float32, name="compiled gradient")
    torch._dynamo.reset()


@pytest.mark.interpreter
def test_forward_kernel_writes_every_valid_row():
    """Outputs poisoned with NaN: the first `count` (valid, packed) rows are all written, the others
    never touched."""
    hidden, weight, b, targets = make_problem(37, 48, 200, torch.float32, 0.0, True)
    count = torch.tensor([29], dtype=torch.int32, device=DEVICE)
    loss, lse = (empty_poisoned(37, torch.float32, DEVICE) for _ in range(2))
    correct = poison_(torch.empty(37, dtype=torch.int8, device=DEVICE))
    with use_backend(BACKEND):
        triton_ops.lce_forward(hidden, weight, b, targets, count, loss, lse, correct, None, 0.0, 0.0)
    logits = F.linear(hidden.double(), weight.double(), b.double())[:29]
    assert_close(loss[:29], F.cross_entropy(logits, targets[:29], reduction="none"), dtype=FP32_TOL, name="loss")
    assert_close(lse[:29], torch.logsumexp(logits, -1), dtype=FP32_TOL, name="lse")
    assert torch.equal(correct[:29].bool(), logits.argmax(-1) == targets[:29])
    assert torch.isnan(loss[29:]).all() and torch.isnan(lse[29:]).all()


# -- embeddings -----------------------------------------------------------------------------------


def reference_embed(ids, weight, is_visual, placeholder_id, norm_weight=None, eps=1e-6):
    x = weight[torch.where(is_visual, placeholder_id, ids)]
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
    return x


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True], ids=["gather", "gather-rmsnorm"])
def test_embed_with_placeholder(dtype, with_norm):
    """70% visual positions: the placeholder row's segment is longer than one block of the sum."""
    v, d = 60, 40
    ids = torch.randint(0, v, (3, 25), device=DEVICE)
    is_visual = torch.rand(3, 25, device=DEVICE) < 0.7
    ids[is_visual] = -1  # never read
    weight = torch.randn(v, d, device=DEVICE).to(dtype)
    norm_weight = (torch.rand(d, device=DEVICE) + 0.5).to(dtype) if with_norm else None
    upstream = torch.randn(3, 25, d, device=DEVICE)
    inputs = (weight, norm_weight) if with_norm else (weight,)

    def ours(w, nw=None):
        with use_backend(BACKEND):
            return embed_with_placeholder(ids, w, is_visual, 7, norm_weight=nw)

    out, grads = run_and_grad(ours, inputs, upstream.to(dtype))
    again = run_and_grad(ours, inputs, upstream.to(dtype))[1]
    expected, expected_grads = run_and_grad(lambda w, nw=None: reference_embed(ids, w, is_visual, 7, nw),
                                            [x.double() for x in inputs], upstream.double())
    assert out.dtype == dtype
    assert_close(out, expected, dtype=dtype, name="embedding")
    for g, e, g2 in zip(grads, expected_grads, again):
        assert_close(g, e, dtype=dtype, name="gradient")
        assert torch.equal(g, g2), "the weight gradient must be bitwise reproducible"


@pytest.mark.interpreter
def test_embed_kernels_write_what_they_own():
    """Poisoned outputs: the gather writes every position; the segmented sum writes exactly the rows
    that are read and leaves the others untouched."""
    v, d = 30, 150  # two column blocks
    ids = torch.randint(0, 10, (45,), device=DEVICE)
    is_visual = torch.rand(45, device=DEVICE) < 0.5
    weight = torch.randn(v, d, device=DEVICE)
    out = empty_poisoned((45, d), torch.float32, DEVICE)
    with use_backend(BACKEND):
        triton_ops.embed_forward(ids, is_visual.view(torch.uint8), weight, 20, None, 1e-6, out)
    rows = torch.where(is_visual, 20, ids)
    assert torch.equal(out, weight[rows])
    grad = torch.randn(45, d, device=DEVICE)
    dweight = empty_poisoned((v, d), torch.float32, DEVICE)
    with use_backend(BACKEND):
        triton_ops.segment_sum(rows, grad, dweight)
    expected = torch.zeros(v, d, dtype=torch.float64).index_add_(0, rows.cpu(), grad.double().cpu())
    used = torch.zeros(v, dtype=torch.bool).index_fill_(0, rows.cpu(), True)
    assert_close(dweight[used], expected[used], dtype=torch.float32, name="segment sums")
    assert torch.isnan(dweight[~used]).all()


@pytest.mark.parametrize("shape", [(2, 9), (17,)], ids=["batched", "flat"])
def test_merge_visual_embeddings(shape):
    is_visual = torch.rand(shape) < 0.4
    m = int(is_visual.sum())
    text = torch.randn(*shape, 12, dtype=torch.float64, requires_grad=True)
    visual = torch.randn(m, 12, dtype=torch.float64, requires_grad=True)
    out = merge_visual_embeddings(text, visual, is_visual)
    expected = text.detach().clone()
    expected[is_visual] = visual.detach()  # index_put in row-major order: the specification
    assert torch.equal(out, expected)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(visual.grad, upstream[is_visual])
    assert torch.equal(text.grad, upstream * ~is_visual[..., None])


def test_merge_without_visual_positions():
    text = torch.randn(5, 8)
    out = merge_visual_embeddings(text, torch.empty(0, 8), torch.zeros(5, dtype=torch.bool))
    assert torch.equal(out, text)


# -- mtp_roll ---------------------------------------------------------------------------------------


def roll_by_documents(ids, labels, k, bounds, fill, ignore):
    ids_k, labels_k = torch.full_like(ids, fill), torch.full_like(labels, ignore)
    for start, end in bounds:
        for t in range(start, end):
            if t + k < end:
                ids_k[t], labels_k[t] = ids[t + k], labels[t + k]
    return ids_k, labels_k


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("cu", [[0, 4, 4, 11, 12, 20], [0, 20], [0, 3, 20]],
                         ids=["with-empty-and-short-docs", "one-doc", "two-docs"])
def test_mtp_roll_never_crosses_documents(cu, k):
    ids = torch.randint(0, 100, (20,))
    labels = torch.randint(0, 100, (20,))
    out_ids, out_labels = mtp_roll(ids, labels, k, torch.tensor(cu), fill_id=3, ignore_index=-7)
    exp_ids, exp_labels = roll_by_documents(ids, labels, k, list(zip(cu, cu[1:])), 3, -7)
    assert torch.equal(out_ids, exp_ids) and torch.equal(out_labels, exp_labels)
    # (1, T) input gives the same rows
    ids2, labels2 = mtp_roll(ids[None], labels[None], k, torch.tensor(cu), fill_id=3, ignore_index=-7)
    assert torch.equal(ids2[0], exp_ids) and torch.equal(labels2[0], exp_labels)


def test_mtp_roll_batched_rows_are_documents():
    ids, labels = torch.randint(0, 100, (3, 10)), torch.randint(0, 100, (3, 10))
    out_ids, out_labels = mtp_roll(ids, labels, 3)
    for row in range(3):
        exp_ids, exp_labels = roll_by_documents(ids[row], labels[row], 3, [(0, 10)], 0, IGNORE)
        assert torch.equal(out_ids[row], exp_ids) and torch.equal(out_labels[row], exp_labels)


# -- bad input ------------------------------------------------------------------------------------

H_, W_, T_ = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, IGNORE, 3])
IDS, VIS = torch.tensor([[1, 2, 3]]), torch.tensor([[False, True, False]])


@pytest.mark.parametrize("fn,args,kwargs,error,match", [
    pytest.param(fused_linear_cross_entropy, (H_, W_, T_.float()), {}, TypeError, "targets", id="targets-float"),
    pytest.param(fused_linear_cross_entropy, (H_, W_, T_[:3]), {}, ValueError, "targets", id="targets-shape"),
    pytest.param(fused_linear_cross_entropy, (H_, W_, torch.tensor([1, 2, 10, 3])), {}, ValueError,
                 r"targets must be in \[0, V\)", id="target-out-of-range"),
    pytest.param(fused_linear_cross_entropy, (H_, torch.randn(10, 9), T_), {}, ValueError, "weight",
                 id="weight-width"),
    pytest.param(fused_linear_cross_entropy, (H_, W_.half(), T_), {}, TypeError, "weight", id="weight-dtype"),
    pytest.param(fused_linear_cross_entropy, (H_, W_, T_), dict(bias=torch.randn(9)), ValueError, "bias",
                 id="bias-shape"),
    pytest.param(fused_linear_cross_entropy, (H_, W_, T_), dict(reduction="avg"), ValueError, "reduction",
                 id="reduction"),
    pytest.param(fused_linear_cross_entropy, (H_, W_, T_), dict(reduction="sum", normalizer=4), ValueError,
                 "normalizer", id="normalizer-with-sum"),
    pytest.param(fused_linear_cross_entropy, (H_, W_, T_), dict(normalizer=0), ValueError, "normalizer",
                 id="normalizer-zero"),
    pytest.param(fused_linear_cross_entropy, (H_, W_, T_), dict(label_smoothing=1.5), ValueError,
                 "label_smoothing", id="label-smoothing"),
    pytest.param(fused_linear_cross_entropy, (H_, W_, T_), dict(softcap=0.0), ValueError, "softcap", id="softcap"),
    pytest.param(embed_with_placeholder, (IDS, W_, VIS, 3), {}, None, None, id="embed-ok"),
    pytest.param(embed_with_placeholder, (torch.tensor([[1, 10, 3]]), W_, torch.zeros(1, 3, dtype=torch.bool), 3),
                 {}, ValueError, "input_ids", id="ids-out-of-range"),
    pytest.param(embed_with_placeholder, (IDS.float(), W_, VIS, 3), {}, TypeError, "input_ids", id="ids-float"),
    pytest.param(embed_with_placeholder, (IDS, W_, VIS, 10), {}, ValueError, "placeholder_id",
                 id="placeholder-out-of-vocab"),
    pytest.param(embed_with_placeholder, (IDS, W_, VIS[:, :2], 3), {}, ValueError, "is_visual",
                 id="is-visual-shape"),
    pytest.param(embed_with_placeholder, (IDS, W_, VIS.long(), 3), {}, TypeError, "is_visual",
                 id="is-visual-dtype"),
    pytest.param(embed_with_placeholder, (IDS, W_, VIS, 3), dict(norm_weight=torch.ones(7)), ValueError,
                 "norm_weight", id="norm-weight-shape"),
    pytest.param(merge_visual_embeddings, (torch.randn(1, 3, 8), torch.randn(2, 8), VIS), {}, ValueError,
                 "1 visual positions but visual_embeds has 2 rows", id="merge-count"),
    pytest.param(merge_visual_embeddings, (torch.randn(1, 3, 8), torch.randn(1, 8), VIS[0]), {}, ValueError,
                 "is_visual", id="merge-mask-shape"),
    pytest.param(mtp_roll, (IDS, IDS, 0), {}, ValueError, "k must be >= 1", id="k-zero"),
    pytest.param(mtp_roll, (IDS, IDS, -2), {}, ValueError, "k must be >= 1", id="k-negative"),
    pytest.param(mtp_roll, (IDS, IDS[:, :2], 1), {}, ValueError, "labels", id="labels-shape"),
    pytest.param(mtp_roll, (IDS, IDS, 1, torch.tensor([0, 2])), {}, ValueError, "cu_seqlens", id="cu-short"),
    pytest.param(mtp_roll, (IDS, IDS, 1, torch.tensor([0, 2, 1, 3])), {}, ValueError, "cu_seqlens",
                 id="cu-not-monotonic"),
    pytest.param(mtp_roll, (IDS.expand(2, 3), IDS.expand(2, 3), 1, torch.tensor([0, 3])), {}, ValueError,
                 r"\(T,\) or \(1, T\)", id="cu-with-batch"),
])
def test_bad_input_raises(fn, args, kwargs, error, match):
    if error is None:  # the valid call the bad ones are variations of
        fn(*args, **kwargs)
        return
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="the interpreter runs only where there is no GPU")
def test_bf16_under_the_interpreter_is_refused():
    with use_backend("interpret"), pytest.raises(ValueError, match="interpreter"):
        fused_linear_cross_entropy(H_.bfloat16(), W_.bfloat16(), T_)


# -- sm_90a ---------------------------------------------------------------------------------------

_ELEM = {"16bit": "bf16", "fp32": "fp32"}


def _lce_signature(kernel, elem):
    ptr = "*" + elem
    sig = {"hidden": ptr, "weight": ptr, "bias": ptr, "targets": "*i64", "count": "*i32", "V": "i32", "H": "i32",
           "stride_h": "i32", "stride_w": "i32", "softcap": "fp32", "label_smoothing": "fp32", "z_loss": "fp32"}
    if kernel == "forward":
        sig.update(loss="*fp32", lse="*fp32", correct="*i8")
    elif kernel == "dhidden":
        sig.update(lse="*fp32", row_grad="*fp32", dhidden="*fp32", stride_dh="i32")
    else:
        sig.update(lse="*fp32", row_grad="*fp32", dweight="*fp32", dbias="*fp32", stride_dw="i32")
    return sig


LCE_COMPILES = [
    pytest.param(kernel, name, features, id=f"{kernel}-{name}-{'bias-softcap' if features else 'plain'}")
    for name in triton_ops.CONFIGS
    for kernel in (("forward",) if name.startswith("forward") else ("dhidden", "dweight"))
    for features in (True, False)
]


@pytest.mark.parametrize("aligned", [False, True], ids=["odd-shapes", "aligned-shapes"])
@pytest.mark.parametrize("kernel,config_name,features", LCE_COMPILES)
def test_every_cross_entropy_config_compiles_for_sm90(kernel, config_name, features, aligned):
    """Odd shapes, and the variant aligned launches compile (every size and stride a multiple of
    16: vectorised loads pipelined through shared memory)."""
    config = triton_ops.CONFIGS[config_name]
    fn = {"forward": triton_ops.lce_forward_kernel, "dhidden": triton_ops.lce_dhidden_kernel,
          "dweight": triton_ops.lce_dweight_kernel}[kernel]
    constexprs = {"HAS_BIAS": features, "HAS_SOFTCAP": features, "BLOCK_M": config.block_m,
                  "BLOCK_V": config.block_v, "BLOCK_K": config.block_k}
    if kernel != "forward":
        constexprs["BLOCK_H"] = config.block_h
    if kernel == "dweight":
        constexprs.update(NEED_WEIGHT=True, NEED_BIAS=features)
    sig = _lce_signature(kernel, _ELEM[config_name.split("-")[1]])
    report = compile_for_sm90(fn, sig, constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
                              int_values=aligned_int_values(sig) if aligned else None)
    assert_compiles_clean(report, expect_wgmma=True)


@pytest.mark.parametrize("elem", ["bf16", "fp32"])
@pytest.mark.parametrize("has_norm", [False, True], ids=["gather", "rmsnorm"])
def test_embedding_kernels_compile_for_sm90(elem, has_norm):
    ptr = "*" + elem
    report = compile_for_sm90(
        triton_ops.embed_forward_kernel,
        {"ids": "*i64", "is_visual": "*u8", "weight": ptr, "norm_weight": ptr, "out": ptr, "n_tokens": "i32",
         "V": "i32", "D": "i32", "placeholder_id": "i32", "stride_w": "i32", "stride_o": "i32", "eps": "fp32"},
        {"HAS_NORM": has_norm, "BLOCK_T": triton_ops.EMBED_BLOCK_T, "BLOCK_D": triton_ops.EMBED_BLOCK_D},
        num_warps=triton_ops.EMBED_NUM_WARPS)
    assert_compiles_clean(report)
    report = compile_for_sm90(
        triton_ops.segment_sum_kernel,
        {"sorted_rows": "*i64", "perm": "*i64", "segment_end": "*i64", "grad": "*fp32" if has_norm else ptr,
         "dweight": ptr, "D": "i32", "stride_g": "i32", "stride_dw": "i32"},
        {"BLOCK_R": triton_ops.SEGMENT_BLOCK_R, "BLOCK_D": triton_ops.SEGMENT_BLOCK_D},
        num_warps=triton_ops.EMBED_NUM_WARPS)
    assert_compiles_clean(report)
