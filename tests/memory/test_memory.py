"""Recompute policies (glm5v_kernels/memory): gradients bit-identical to running the blocks
plainly (a small pre-norm block), and the bytes a forward leaves for backward on a stack of
CogViT's own blocks, on the CPU path and on the fused attention kernel's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glm5v.models.cogvit import CogViTBlock, CogViTConfig
from glm5v_kernels import rotary_2d, varlen_plan
from glm5v_kernels._backend import use_backend
from glm5v_kernels.memory import RECOMPUTE, apply_memory_policy, offloaded_checkpoint, saved_bytes


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


class CogViTStack(nn.Module):
    """`blocks` CogViT blocks (RMSNorm, RMS QK-norm attention with 2D rotary, SiLU-gated MLP 4x)
    over one packed image of side x side patches: x (side², width)."""

    def __init__(self, blocks: int, width: int, heads: int, side: int):
        super().__init__()
        torch.manual_seed(0)
        config = CogViTConfig(depth=blocks, width=width, num_heads=heads, mlp_hidden=4 * width)
        self.config = config
        self.blocks = nn.ModuleList(CogViTBlock(config) for _ in range(blocks))
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        self.rotary = rotary_2d(grid, config.head_dim, config.rope_theta)
        self.plan = varlen_plan(torch.tensor([0, side * side], dtype=torch.int32))

    def forward(self, x):
        for block in self.blocks:
            x = block(x, self.plan, *self.rotary)
        return x


def kept_by_policy(blocks: int, width: int, heads: int, side: int) -> dict[str, dict[str, int]]:
    x = torch.randn(side * side, width, requires_grad=True)
    kept = {}
    for recompute in RECOMPUTE:
        model = CogViTStack(blocks, width, heads, side)
        if recompute != "none":
            apply_memory_policy(model, CogViTBlock, recompute=recompute, offload=None, keep_last=0)
        kept[recompute] = saved_bytes(model, x, by_op=True)
    return kept


def test_saved_bytes_cpu_path():
    """On the CPU path (attention as plain products), CogViT blocks over a 32 x 32-patch image:
    selective keeps <= 40% of what "none" keeps (it drops the L x L scores and probabilities and
    the norms' and activations' outputs), full <= 10%."""
    blocks, width, side = 2, 256, 32
    kept = kept_by_policy(blocks, width, 4, side)
    total = {policy: sum(by_op.values()) for policy, by_op in kept.items()}
    assert total["selective"] <= 0.40 * total["none"]
    assert total["full"] <= 0.10 * total["none"]
    # no (heads, L, L) tensor survives: the batched products kept are the attention outputs
    assert "aten::exp" in kept["none"] and "aten::exp" not in kept["selective"]
    assert kept["selective"]["aten::bmm"] == blocks * side * side * width * 4


@pytest.mark.interpreter
def test_saved_bytes_fused_attention_path():
    """With the fused attention kernel (what runs on a GPU) "none" keeps no L x L tensor, so
    selective saves less in proportion: exactly the matrix-product outputs, the attention output
    with its log-sum-exp, and the later blocks' inputs (the checkpoint's); 57% of "none" here."""
    blocks, width, heads, side = 2, 128, 2, 8
    with use_backend("interpret"):
        kept = kept_by_policy(blocks, width, heads, side)
    tokens, mlp = side * side, 4 * width
    assert kept["selective"] == {
        "aten::addmm": blocks * tokens * (3 * width + width + 2 * mlp + width) * 4,  # qkv, proj, gate, up, down
        "glm5v::varlen_attention_fwd": blocks * (tokens * width + heads * tokens) * 4,  # out, lse
        "aten::add.Tensor": (blocks - 1) * tokens * width * 4,
    }
    assert kept["full"] == {"aten::add.Tensor": (blocks - 1) * tokens * width * 4}
    assert 0.5 < sum(kept["selective"].values()) / sum(kept["none"].values()) < 0.6


def test_selective_under_torch_compile():
    """torch.compile traces torch's selective-checkpoint contexts (used while compiling); the
    gradients match eager up to the compiled kernels' rounding."""
    torch._dynamo.reset()
    plain, wrapped = stack(blocks=2), stack(blocks=2)
    apply_memory_policy(wrapped, Block, recompute="selective", offload=None, keep_last=0)
    x = torch.randn(64, 256)
    grads = []
    for model in (plain, torch.compile(wrapped)):
        inp = x.clone().requires_grad_()
        model(inp).square().sum().backward()
        grads.append([inp.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


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
