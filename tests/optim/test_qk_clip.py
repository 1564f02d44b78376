"""glm5v_kernels.optim.qk_clip: after clipping, every head's largest logit is at most the threshold;
heads under it are untouched."""

from __future__ import annotations

import pytest
import torch

from glm5v_kernels.optim import qk_clip


def max_logits(x, q_weight, k_weight, num_heads, num_kv_heads, head_dim):
    q = (x @ q_weight.T).view(-1, num_heads, head_dim)
    k = (x @ k_weight.T).view(-1, num_kv_heads, head_dim).repeat_interleave(num_heads // num_kv_heads, dim=1)
    logits = torch.einsum("thd,shd->hts", q, k) / head_dim**0.5
    return logits.amax(dim=(1, 2))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_clipped_heads_come_back_to_the_threshold(num_heads, num_kv_heads):
    torch.manual_seed(0)
    head_dim, width = 8, 32
    x = torch.randn(20, width, dtype=torch.float64)
    q_weight = torch.randn(num_heads * head_dim, width, dtype=torch.float64)
    k_weight = torch.randn(num_kv_heads * head_dim, width, dtype=torch.float64)
    q_weight[:head_dim] *= 6  # head 0 grows far past the threshold
    before = max_logits(x, q_weight, k_weight, num_heads, num_kv_heads, head_dim)
    threshold = float(before.sort().values[num_heads // 2])  # about half the heads exceed it
    q_original = q_weight.clone()
    gamma = qk_clip(q_weight, k_weight, before, num_heads, num_kv_heads, threshold=threshold)
    after = max_logits(x, q_weight, k_weight, num_heads, num_kv_heads, head_dim)
    assert torch.all(after <= threshold * (1 + 1e-9)), (after, threshold)
    over = before > threshold
    if num_heads == num_kv_heads:  # each head shrinks exactly to the threshold
        assert torch.allclose(after[over], torch.full_like(after[over], threshold))
    untouched = (gamma == 1).repeat_interleave(head_dim)
    assert torch.equal(q_weight[untouched], q_original[untouched])


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads", id="heads-not-divisible"),
    pytest.param(dict(num_heads=4, max_logits=torch.ones(3)), "max_logits", id="logits-shape"),
    pytest.param(dict(num_heads=4, threshold=0.0), "threshold", id="zero-threshold"),
    pytest.param(dict(num_heads=4, max_logits=torch.tensor([1.0, float("nan"), 1.0, 1.0])), "finite", id="nan"),
    pytest.param(dict(num_heads=3, max_logits=torch.ones(3)), "multiple of its 3 heads", id="rows-not-divisible"),
])
def test_bad_arguments_raise(kwargs, match):
    arguments = dict(q_weight=torch.randn(16, 8), k_weight=torch.randn(16, 8), max_logits=torch.ones(4))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        qk_clip(**arguments)
