"""DistributedSigLIPLoss on 2 and 3 CPU processes (gloo; with 3 the ring's two neighbours
differ): the mean of the per-rank losses and the rank-averaged gradients equal the single-process
loss and gradients on the concatenated batch, with the chunked CPU path and with the Triton
kernels under the interpreter, against a float64 loss written out on the full logits."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from glm5v.parallel import DistributedSigLIPLoss
from glm5v_kernels._backend import use_backend
from glm5v_kernels.testing import assert_close

B, D_IN, D = 5, 10, 12  # per-rank batch, encoder input and embedding widths (B fits no tile)
BACKENDS = ("torch", "interpret")


def make_problem(world):
    """Two linear 'towers' (shared by every rank, as under DDP) over the global batch of world·B
    pairs, with matched pairs correlated."""
    torch.manual_seed(0)
    images = torch.randn(world * B, D_IN)
    texts = images + 0.5 * torch.randn(world * B, D_IN)
    params = {"w_image": torch.randn(D_IN, D) / D_IN**0.5, "w_text": torch.randn(D_IN, D) / D_IN**0.5,
              "logit_scale": torch.tensor(math.log(10) + 0.2), "logit_bias": torch.tensor(-9.0)}
    return images, texts, params


def embed(images, texts, params):
    return (F.normalize(images @ params["w_image"], dim=-1), F.normalize(texts @ params["w_text"], dim=-1))


def global_loss(x, y, logit_scale, logit_bias):
    """The single-process loss written out on the full (world·B, world·B) logits, in x's dtype."""
    z = logit_scale.exp() * (x @ y.T) + logit_bias
    labels = 2 * torch.eye(*z.shape, dtype=z.dtype) - 1
    return -F.logsigmoid(labels * z).sum() / x.shape[0]


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    images, texts, params = make_problem(world)
    mine = slice(rank * B, (rank + 1) * B)
    results = {}
    for backend in BACKENDS:
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        x, y = embed(images[mine], texts[mine], leaves)
        x.retain_grad(), y.retain_grad()
        with use_backend(backend):
            loss = DistributedSigLIPLoss()(x, y, leaves["logit_scale"], leaves["logit_bias"])
        loss.backward()
        grads = {k: v.grad for k, v in leaves.items()}
        for g in grads.values():  # what DDP does to parameter gradients
            dist.all_reduce(g)
            g /= world
        results[backend] = {"loss": loss.detach(), "x_grad": x.grad, "y_grad": y.grad, **grads}
    # Every rank must pass one shape: all of them raise, none hangs.
    try:
        DistributedSigLIPLoss()(x[: B - rank].detach(), y[: B - rank].detach(), params["logit_scale"],
                                params["logit_bias"])
        results["mismatch_error"] = None
    except ValueError as exc:
        results["mismatch_error"] = str(exc)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # every rank is done communicating
    # Leave without interpreter teardown: gloo's threads occasionally abort the process while it
    # unwinds, after the results are written.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_loss_equals_one_process(tmp_path, world):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    images, texts, params = make_problem(world)
    leaves = {k: v.double().requires_grad_() for k, v in params.items()}
    x, y = embed(images.double(), texts.double(), leaves)
    x.retain_grad(), y.retain_grad()
    expected = global_loss(x, y, leaves["logit_scale"], leaves["logit_bias"])
    expected.backward()

    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    for backend in BACKENDS:
        got = [r[backend] for r in ranks]
        assert_close(torch.stack([r["loss"] for r in got]).mean(), expected.detach(), dtype=torch.float32,
                     name=f"{backend}: mean of the rank losses")
        for name, leaf in leaves.items():
            for rank, r in enumerate(got):
                assert_close(r[name], leaf.grad, dtype=torch.float32, name=f"{backend}: rank {rank} {name} grad")
        # Each rank's embedding gradients: W times its slice of the single-process ones (DDP's
        # averaging divides the parameter gradients back); the text gradients came home by the ring.
        for key, full in (("x_grad", x.grad), ("y_grad", y.grad)):
            got_full = torch.cat([r[key] for r in got]) / world
            assert_close(got_full, full, dtype=torch.float32, name=f"{backend}: {key}")
    for rank, r in enumerate(ranks):
        assert r["mismatch_error"] is not None and "one shape" in r["mismatch_error"], (rank, r["mismatch_error"])


def test_bad_input_raises():
    loss = DistributedSigLIPLoss()
    s, b = torch.tensor(2.3), torch.tensor(-10.0)
    with pytest.raises(ValueError, match=r"shape \(B, D\)"):
        loss(torch.randn(4, 8), torch.randn(3, 8), s, b)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            loss(torch.randn(4, 8), torch.randn(4, 8), s, b)
