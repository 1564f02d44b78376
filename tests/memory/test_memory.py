"""Recompute policies (glm5v_kernels/memory): gradients bit-identical to running the blocks
plainly, and the bytes a forward leaves for backward, on a CogViT-shaped block stack."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glm5v_kernels.memory import apply_memory_policy, offloaded_checkpoint, saved_bytes


class Block(nn.Module):
    """Pre-norm ViT block as in CogViT: RMSNorm, per-head RMS QK-norm, attention, SiLU-gated MLP."""

    def __init__(self, width: int = 256, heads: int = 4, mlp: int = 1024):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.q_norm, self.k_norm = nn.RMSNorm(width // heads), nn.RMSNorm(width // heads)
        self.gate_up, self.down = nn.Linear(width, 2 * mlp), nn.Linear(mlp, width)

    def forward(self, x):
        tokens, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(tokens, 3, self.heads, width // self.heads).unbind(1)
        q, k, v = (t.transpose(0, 1)[None] for t in (self.q_norm(q), self.k_norm(k), v))
        attended = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(tokens, width)
        x = x + self.proj(attended)
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def stack(seed: int = 0, blocks: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block() for _ in range(blocks)])


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_gradients_are_bit_identical(recompute):
    plain, wrapped = stack(), stack()
    apply_memory_policy(wrapped, Block, recompute=recompute, offload=None)
    x = torch.randn(96, 256)
    upstream = torch.randn(96, 256)
    grads = []
    for model in (plain, wrapped):
        inp = x.clone().requires_grad_()
        model(inp).backward(upstream)
        grads.append([inp.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_saved_bytes_table():
    """Selective keeps the matmul and attention outputs only; full keeps each block's input."""
    x = torch.randn(512, 256, requires_grad=True)
    kept = {}
    for recompute in ("none", "selective", "full"):
        model = stack()
        if recompute != "none":
            apply_memory_policy(model, Block, recompute=recompute, offload=None, keep_last=0)
        kept[recompute] = saved_bytes(model, x)
    # full: at most the blocks' inputs
    assert 0 < kept["full"] <= 4 * 512 * 256 * 4
    assert kept["full"] < 0.05 * kept["none"]
    # selective: the qkv, proj, gate_up and down outputs and the attention output with its
    # log-sum-exp, about half of "none" at this shape (CogViT-L's in proportion: gated MLP 4x)
    matmul_outputs = 4 * 512 * (3 * 256 + 256 + 2 * 1024 + 256) * 4
    assert matmul_outputs < kept["selective"] < 0.55 * kept["none"]


def test_every_and_keep_last():
    model = stack(blocks=6)
    assert apply_memory_policy(model, Block, every=2, keep_last=1, offload=None) == 3  # blocks 0, 2, 4
    with pytest.raises(ValueError, match="already applied"):
        apply_memory_policy(model, Block, offload=None)


def test_offload_is_a_no_op_on_cpu():
    block = Block()
    x = torch.randn(32, 256)
    assert torch.equal(offloaded_checkpoint(block, x, recompute="full", offload="inputs"), block(x))


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(recompute="half"), "recompute", id="recompute"),
    pytest.param(dict(offload="disk"), "offload", id="offload"),
    pytest.param(dict(every=0), "every", id="every-0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_memory_policy(stack(blocks=2), Block, **kwargs)


def test_no_blocks_is_an_error():
    with pytest.raises(ValueError, match="no Block modules"):
        apply_memory_policy(nn.Linear(2, 2), Block)


@pytest.mark.interpreter
def test_selective_keeps_the_fused_attention_output(monkeypatch):
    """Under "selective", backward reuses the fused attention's saved output and log-sum-exp
    instead of running the attention forward again; gradients stay bit-identical."""
    from glm5v_kernels import varlen_plan
    from glm5v_kernels._backend import use_backend
    from glm5v_kernels.nn import QKNormAttention
    from glm5v_kernels.ops.attention import op

    forwards = []
    original = op.kernels.attention_forward
    monkeypatch.setattr(op.kernels, "attention_forward", lambda *a, **k: forwards.append(1) or original(*a, **k))
    layer = QKNormAttention(64, 4)
    x = torch.randn(40, 64, requires_grad=True)
    plan = varlen_plan(torch.tensor([0, 15, 40], dtype=torch.int32))
    with use_backend("interpret"):
        wrapped = torch.autograd.grad(offloaded_checkpoint(layer, x, plan=plan, offload=None).sum(),
                                      [x, *layer.parameters()])
        assert len(forwards) == 1
        plain = torch.autograd.grad(layer(x, plan=plan).sum(), [x, *layer.parameters()])
    for a, b in zip(wrapped, plain):
        assert torch.equal(a, b)
