"""glm5v_kernels.optim.Muon against torch.optim.Muon / AdamW and a plain-torch reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from glm5v_kernels.ops.muon import reference
from glm5v_kernels.optim import Muon, muon_param_groups
from glm5v_kernels.optim.muon import adjusted_lr


def reference_muon_steps(param: torch.Tensor, grads, lr, momentum=0.95, weight_decay=0.0, adjust_lr="original"):
    """Plain-torch Muon in float64: Nesterov momentum, reference Newton–Schulz, scaled update."""
    p = param.detach().double().clone()
    buf = torch.zeros_like(p)
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        update = g + momentum * (buf - g)
        ortho = reference.newton_schulz(update, dtype=torch.float64)
        p = p * (1 - lr * weight_decay) - adjusted_lr(lr, p.shape[-2], p.shape[-1], adjust_lr) * ortho
    return p


def run(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)], ids=["wide", "tall"])
def test_matches_torch_muon_in_bf16(shape):
    torch.manual_seed(0)
    ours_param = nn.Parameter(torch.randn(*shape))
    torch_param = nn.Parameter(ours_param.detach().clone())
    grads = [[torch.randn(*shape)] for _ in range(3)]
    run(Muon([{"params": [ours_param], "use_muon": True}], lr=0.02, ns_dtype=torch.bfloat16), [ours_param], grads)
    run(torch.optim.Muon([torch_param], lr=0.02, weight_decay=0.0, adjust_lr_fn="original"), [torch_param], grads)
    moved = (torch_param.detach() - ours_param.detach()).abs().max()
    step_size = 0.02 * 3
    # Both run Newton–Schulz in bf16 (torch also normalises in bf16): they agree to a few % of a step.
    assert moved < 0.05 * step_size, moved


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw", None])
def test_fp32_matches_reference(adjust):
    torch.manual_seed(1)
    param = nn.Parameter(torch.randn(40, 24))
    start = param.detach().clone()
    grads = [torch.randn(40, 24) for _ in range(4)]
    run(Muon([{"params": [param], "use_muon": True}], lr=0.01, weight_decay=0.1, adjust_lr=adjust,
             ns_dtype=torch.float32), [param], [[g] for g in grads])
    expected = reference_muon_steps(start, grads, lr=0.01, weight_decay=0.1, adjust_lr=adjust)
    assert torch.allclose(param.double(), expected, atol=1e-5, rtol=0)


def test_stacked_3d_weights_are_orthogonalised_per_slice():
    torch.manual_seed(2)
    experts = nn.Parameter(torch.randn(3, 16, 24))
    singles = [nn.Parameter(experts.detach()[i].clone()) for i in range(3)]
    grads = [torch.randn(3, 16, 24) for _ in range(2)]
    run(Muon([{"params": [experts], "use_muon": True}]), [experts], [[g] for g in grads])
    run(Muon([{"params": singles, "use_muon": True}]), singles, [list(g.unbind(0)) for g in grads])
    assert torch.allclose(experts.detach(), torch.stack([s.detach() for s in singles]), atol=1e-6)


def test_conv_weights_are_flattened():
    torch.manual_seed(3)
    conv = nn.Parameter(torch.randn(8, 3, 3, 3))
    flat = nn.Parameter(conv.detach().reshape(8, -1).clone())
    grads = [torch.randn(8, 3, 3, 3) for _ in range(2)]
    run(Muon([{"params": [conv], "use_muon": True}]), [conv], [[g] for g in grads])
    run(Muon([{"params": [flat], "use_muon": True}]), [flat], [[g.reshape(8, -1)] for g in grads])
    assert torch.allclose(conv.detach().reshape(8, -1), flat.detach(), atol=1e-6)


def test_split_sizes_orthogonalise_qkv_blocks_separately():
    torch.manual_seed(4)
    qkv = nn.Parameter(torch.randn(48, 32))
    blocks = [nn.Parameter(b.clone()) for b in qkv.detach().split([16, 16, 16])]
    grads = [torch.randn(48, 32) for _ in range(2)]
    run(Muon([{"params": [qkv], "use_muon": True, "split_sizes": (16, 16, 16)}]), [qkv], [[g] for g in grads])
    run(Muon([{"params": blocks, "use_muon": True}]), blocks, [list(g.split([16, 16, 16])) for g in grads])
    assert torch.allclose(qkv.detach(), torch.cat([b.detach() for b in blocks]), atol=1e-6)


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(5)
    ours = [nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(4, 6))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    muon_param = nn.Parameter(torch.randn(8, 8))
    grads = [[torch.randn(10), torch.randn(4, 6)] for _ in range(4)]
    optimizer = Muon([{"params": [muon_param], "use_muon": True}, {"params": ours, "lr": 3e-3, "weight_decay": 0.1}],
                     adamw_betas=(0.9, 0.95), adamw_eps=1e-8)
    for g in grads:
        muon_param.grad = torch.randn(8, 8)
        for p, gi in zip(ours, g):
            p.grad = gi.clone()
        optimizer.step()
    run(torch.optim.AdamW(theirs, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), theirs, grads)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6)


def test_zero_gradient_gives_no_nan_and_no_update():
    param = nn.Parameter(torch.randn(16, 16))
    before = param.detach().clone()
    optimizer = Muon([{"params": [param], "use_muon": True}])
    param.grad = torch.zeros(16, 16)
    optimizer.step()
    assert torch.equal(param.detach(), before)


def test_gradient_is_not_modified():
    param = nn.Parameter(torch.randn(16, 24))
    grad = torch.randn(16, 24)
    param.grad = grad.clone()
    Muon([{"params": [param], "use_muon": True}]).step()
    assert torch.equal(param.grad, grad)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = Muon(muon_param_groups(model))
    for _ in range(2):
        model(torch.randn(5, 12)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert "momentum_buffer" in optimizer.state[model[0].weight]
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(optimizer.state[model[0].bias])
    clone = copy.deepcopy(model)
    resumed = Muon(muon_param_groups(clone))
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if saved and loaded
    x = torch.randn(5, 12)
    for m, opt in ((model, optimizer), (clone, resumed)):
        m(x).sum().backward()
        opt.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_param_groups_split_matrices_from_the_rest():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)
            self.lm_head = nn.Linear(16, 50, bias=False)
            self.patch_embed = nn.Linear(48, 16)

    model = Tiny()
    muon_group, adamw_group = muon_param_groups(model, lr=0.01)
    assert muon_group["use_muon"] and muon_group["lr"] == 0.01
    assert [name for name, _ in muon_group["params"]] == ["proj.weight"]
    assert len(adamw_group["params"]) == len(list(model.parameters())) - 1


def test_errors_name_the_parameter():
    model = nn.Linear(8, 4)
    muon_group, _ = muon_param_groups(model)
    muon_group["params"].append(("bias", model.bias))
    with pytest.raises(ValueError, match="'bias' has shape"):
        Muon([muon_group])


@pytest.mark.parametrize("groups,match", [
    pytest.param(lambda p, b: [{"params": [p, b], "use_muon": True}], "group 0 param 1 has shape", id="bias-in-muon"),
    pytest.param(lambda p, b: [{"params": [p]}], "no parameter group has use_muon", id="no-muon-group"),
    pytest.param(lambda p, b: [{"params": [p], "use_muon": True, "split_sizes": (5, 5)}], "split_sizes",
                 id="bad-split"),
])
def test_bad_groups_raise(groups, match):
    weight, bias = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match=match):
        Muon(groups(weight, bias))


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(lr=-1.0), "lr", id="negative-lr"),
    pytest.param(dict(momentum=1.0), "momentum", id="momentum-1"),
    pytest.param(dict(adjust_lr="sqrt"), "adjust_lr", id="unknown-adjust"),
    pytest.param(dict(adamw_betas=(0.9, 1.0)), "adamw_betas", id="beta-1"),
])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon([{"params": [nn.Parameter(torch.randn(4, 4))], "use_muon": True}], **kwargs)
