"""Distributed Muon on 2 CPU processes (gloo): FSDP2-sharded parameters and replicated ones with
round-robin ownership give the same parameters as one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from glm5v_kernels.optim import Muon, muon_param_groups

WORLD = 2
STEPS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # Rows 20 and 7 (7 splits 4 + 3 over two ranks), a 3-D stacked weight and a fused QKV weight.
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 7))
    model.experts = nn.Parameter(torch.randn(3, 6, 10))
    model.qkv = nn.Parameter(torch.randn(18, 12))
    return model


def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = model(x)
    return h.pow(2).sum() + (model.experts.sum(0) @ torch.ones(10)).pow(2).sum() + (model.qkv @ x.T).pow(2).mean()


def optimizer_for(model: nn.Module, **kwargs) -> Muon:
    groups = muon_param_groups(model)
    muon_group = groups[0]
    qkv = [(n, p) for n, p in muon_group["params"] if n == "qkv"]
    muon_group["params"] = [(n, p) for n, p in muon_group["params"] if n != "qkv"]
    groups.append({"params": qkv, "use_muon": True, "split_sizes": (6, 6, 6)})
    return Muon(groups, lr=0.02, weight_decay=0.01, **kwargs)


def train(model: nn.Module, optimizer: Muon) -> None:
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        loss_fn(model, torch.randn(5, 12)).backward()
        optimizer.step()
        optimizer.zero_grad()


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Replicated: every rank has the full model and the same gradients (as after DDP's all-reduce).
    model = make_model()
    train(model, optimizer_for(model, replicated_group=dist.group.WORLD))
    replicated = {n: p.detach().clone() for n, p in model.named_parameters()}

    # FSDP2: parameters sharded on dim 0; the same batch on both ranks, so the averaged gradients
    # equal the single-process ones.
    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model, mesh=mesh)
    train(model, optimizer_for(model))
    sharded = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    torch.save({"replicated": replicated, "sharded": sharded}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # both ranks are done communicating
    # Leave without interpreter teardown: gloo's threads occasionally abort the process while it
    # unwinds ("terminate called without an active exception"), after the results are written.
    os._exit(0)


@pytest.mark.slow
def test_distributed_muon_equals_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    reference = make_model()
    train(reference, optimizer_for(reference))
    expected = {n: p.detach() for n, p in reference.named_parameters()}

    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in ("replicated", "sharded"):
            for name, value in expected.items():
                got = results[mode][name]
                assert torch.allclose(got, value, atol=1e-6, rtol=0), (rank, mode, name, (got - value).abs().max())
