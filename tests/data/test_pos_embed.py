"""interpolate_pos_embed (glm5v_kernels/data/pos_embed.py) against the antialiased bilinear resize
written out as float64 weight matrices, and against transformers' SigLIP2 position resize."""

from __future__ import annotations

import pytest
import torch

from glm5v_kernels.data import interpolate_pos_embed
from glm5v_kernels.testing import assert_close


def axis_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64: the triangle filter widened by the shrink factor (so each output
    averages every source cell it covers), taps beyond the edges dropped, rows normalised."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    taps = torch.arange(n_in, dtype=torch.float64) + 0.5
    weights = (1 - (taps[None, :] - centers[:, None]).abs() / support).clamp(min=0)
    return weights / weights.sum(1, keepdim=True)


def reference(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    gh, gw, c = grid.shape
    out = torch.einsum("ia,jb,abc->ijc", axis_weights(gh, h), axis_weights(gw, w), grid.double())
    return out.reshape(h * w, c)


@pytest.mark.parametrize("source,target", [((16, 16), (7, 23)), ((16, 16), (31, 5)), ((6, 9), (6, 4)),
                                           ((5, 3), (12, 12)), ((16, 16), (1, 1))],
                         ids=["shrink-and-grow", "tall", "rect-shrink-cols", "rect-grow", "one-patch"])
def test_matches_the_float64_weight_matrices(source, target):
    grid = torch.randn(*source, 24)
    out = interpolate_pos_embed(grid, target)
    assert out.shape == (target[0] * target[1], 24) and out.dtype == torch.float32
    assert_close(out, reference(grid, *target), dtype=torch.float32)


def test_matches_transformers_siglip2_resize():
    siglip2 = pytest.importorskip("transformers.models.siglip2.modeling_siglip2")
    grid = torch.randn(16, 16, 32)
    shapes = torch.tensor([[9, 14], [16, 16], [3, 40]])
    theirs = siglip2.Siglip2VisionEmbeddings.resize_positional_embeddings(grid, shapes, max_length=256)
    for i, (h, w) in enumerate(shapes.tolist()):
        torch.testing.assert_close(interpolate_pos_embed(grid, (h, w)), theirs[i, : h * w], rtol=1e-5, atol=1e-5)


def test_flat_square_grid_same_size_and_dtypes():
    grid = torch.randn(8, 8, 16, dtype=torch.float64)
    assert torch.equal(interpolate_pos_embed(grid.reshape(64, 16), (5, 11)), interpolate_pos_embed(grid, (5, 11)))
    assert torch.equal(interpolate_pos_embed(grid, (8, 8)), grid.reshape(64, 16))  # identity resize is exact
    half = interpolate_pos_embed(grid.half(), (3, 12))
    assert half.dtype == torch.float16
    assert_close(half, reference(grid.half(), 3, 12), dtype=torch.float16)


def test_gradient_is_the_transposed_resize():
    grid = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4 * 9, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(interpolate_pos_embed(grid, (4, 9)), grid, upstream)
    expected = torch.einsum("ia,jb,ijc->abc", axis_weights(6, 4), axis_weights(5, 9), upstream.view(4, 9, 3))
    assert_close(grad, expected, dtype=torch.float32)


def test_bad_input():
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embed(torch.randn(10, 4), (2, 2))
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(gh, gw, C\)"):
        interpolate_pos_embed(torch.randn(2, 2, 2, 4), (2, 2))
    with pytest.raises(TypeError, match="floating"):
        interpolate_pos_embed(torch.ones(4, 4, 2, dtype=torch.int64), (2, 2))
    for grid in [(0, 3), (2,), (2.0, 3), "23"]:
        with pytest.raises(ValueError, match="grid must be"):
            interpolate_pos_embed(torch.randn(4, 4, 2), grid)
