"""nn.QKNormAttention (glm5v_kernels/nn/attention.py): the module against the same layer written
out with plain torch ops, on the CPU path and on the Triton kernels (interpreter on CPU)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from glm5v_kernels import rotary_1d, varlen_plan
from glm5v_kernels._backend import use_backend
from glm5v_kernels.nn import QKNormAttention

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BACKEND = "triton" if ON_GPU else "interpret"


def written_out(layer: QKNormAttention, x, lengths, cos, sin):
    """The layer in plain torch: projections, F.rms_norm / F.layer_norm, rotate-half, SDPA per sequence."""
    total, d = x.shape[0], layer.head_dim
    q, k, v = F.linear(x, layer.qkv.weight, layer.qkv.bias).view(total, -1, d).split(
        [layer.num_heads, layer.num_kv_heads, layer.num_kv_heads], dim=1)
    norm = {"rms": lambda t, w, b: F.rms_norm(t, (d,), w, layer.norm_eps),
            "layer": lambda t, w, b: F.layer_norm(t, (d,), w, b, layer.norm_eps)}[layer.qk_norm]
    q, k = norm(q, layer.q_norm_weight, layer.q_norm_bias), norm(k, layer.k_norm_weight, layer.k_norm_bias)
    half = cos.shape[1]

    def rotate(t):
        a, b, rest = t[..., :half], t[..., half: 2 * half], t[..., 2 * half:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat((a * c - b * s, b * c + a * s, rest), dim=-1)

    q, k = rotate(q), rotate(k)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                                                   is_causal=layer.causal, enable_gqa=True).transpose(0, 1))
        start += n
    return F.linear(torch.cat(outs).reshape(total, -1), layer.proj.weight, layer.proj.bias)


def randomise(layer: QKNormAttention) -> QKNormAttention:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("backend", ["torch", pytest.param(BACKEND, marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("qk_norm,causal,kv_heads", [("rms", False, 4), ("layer", True, 2)],
                         ids=["vit-rms", "llm-layer-causal-gqa"])
def test_matches_the_layer_written_out(backend, qk_norm, causal, kv_heads):
    lengths = (5, 1, 30)
    dim, heads = 64, 4
    layer = randomise(QKNormAttention(dim, heads, kv_heads, qk_norm=qk_norm, causal=causal, device=DEVICE))
    x = torch.randn(sum(lengths), dim, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)
    cos, sin = rotary_1d(torch.cat([torch.arange(n) for n in lengths]).to(DEVICE), 12)
    with use_backend(backend):
        out = layer(x, plan=varlen_plan(cu), rotary_cos=cos, rotary_sin=sin)
    expected = written_out(layer, x, lengths, cos, sin)
    tol = 1e-2 if ON_GPU else 2e-5  # tf32 projections and dots on a GPU
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for name, g, w in zip(["x", *(n for n, _ in layer.named_parameters())], got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        QKNormAttention(100, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        QKNormAttention(64, 4, 3)
    with pytest.raises(ValueError, match="qk_norm"):
        QKNormAttention(64, 4, qk_norm="batch")
    with pytest.raises(ValueError, match="cu_seqlens and max_seqlen"):
        QKNormAttention(64, 4)(torch.randn(3, 64))


def test_parameters_follow_the_norm_kind():
    assert {n for n, _ in QKNormAttention(64, 4, qk_norm=None).named_parameters()} == {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert {n for n, _ in QKNormAttention(64, 4, qk_norm="layer", bias=False).named_parameters()} == {
        "qkv.weight", "proj.weight", "q_norm_weight", "k_norm_weight", "q_norm_bias", "k_norm_bias"}
