"""Offload of saved activations (glm5v_kernels/memory/offload.py). On CPU machines the CUDA-only
predicate is patched so the whole machinery runs on CPU tensors (synchronous copies instead of a
side stream); a GPU test checks the real path."""

from __future__ import annotations

import gc

import pytest
import torch

from glm5v_kernels import memory
from glm5v_kernels.memory import PinnedPool, apply_memory_policy, mark_not_offload, no_offload, offloaded_checkpoint
from glm5v_kernels.memory import offload as offload_module

from .test_memory import Block, stack

TOKENS, WIDTH = 96, 256


@pytest.fixture
def offload_cpu(monkeypatch):
    """Offload CPU tensors too, and start from fresh stats."""
    monkeypatch.setattr(offload_module, "_should_offload", lambda t: True)
    memory.reset_stats()


def gradients(model, x, upstream):
    inp = x.clone().requires_grad_()
    model(inp).backward(upstream)
    return [inp.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("recompute,offload", [("full", "inputs"), ("selective", "inputs"), ("none", "saved"),
                                               ("selective", "saved")])
def test_gradients_are_bit_identical_and_the_pool_empties(offload_cpu, recompute, offload):
    tokens = 1024 if offload == "saved" else TOKENS  # "saved" moves tensors of at least 1 MiB
    x, upstream = torch.randn(tokens, WIDTH), torch.randn(tokens, WIDTH)
    pool = PinnedPool(256 << 20)  # holds everything: the fallback has its own test
    wrapped = stack()
    apply_memory_policy(wrapped, Block, recompute=recompute, offload=offload, keep_last=0, pool=pool)
    for a, b in zip(gradients(stack(), x, upstream), gradients(wrapped, x, upstream)):
        assert torch.equal(a, b)
    assert memory.stats().bytes_offloaded > 0
    assert pool.used == 0


def test_inputs_mode_moves_each_blocks_input_once(offload_cpu):
    model = stack(blocks=4)
    apply_memory_policy(model, Block, recompute="full", offload="inputs", keep_last=0, pool=PinnedPool(16 << 20))
    model(torch.randn(TOKENS, WIDTH, requires_grad=True)).sum().backward()
    assert memory.stats().bytes_offloaded == 4 * TOKENS * WIDTH * 4
    # backward prefetched blocks 0..2 while it ran blocks 1..3
    assert memory.stats().prefetched == 3


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_saved_mode_leaves_almost_nothing_alive(offload_cpu, recompute):
    """With every saved tensor of >= 1 MiB in the pool (selective's kept outputs included), what
    a forward leaves alive outside the preallocated pool shrinks to under 10% of what the same
    recompute policy keeps without offload (the small tensors, and with "none" a few 1-2 MiB
    storages that stay referenced on this CPU SDPA path)."""
    x = torch.randn(2048, WIDTH, requires_grad=True)
    kept = stack()
    apply_memory_policy(kept, Block, recompute=recompute, offload=None, keep_last=0)
    plain = memory.saved_bytes(kept, x)
    model = stack()
    apply_memory_policy(model, Block, recompute=recompute, offload="saved", keep_last=0, pool=PinnedPool(256 << 20))
    offloaded = memory.saved_bytes(model, x)
    assert offloaded < 0.1 * plain
    assert memory.stats().bytes_offloaded > 0.9 * plain


class InPlaceAfterLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.linear(x).relu_()


def test_selective_refuses_in_place_writes_into_kept_outputs():
    """relu_ on a kept matrix-product output would hand the recompute changed values."""
    with pytest.raises(RuntimeError, match="in place"):
        offloaded_checkpoint(InPlaceAfterLinear(), torch.randn(8, WIDTH, requires_grad=True), offload=None)


@pytest.mark.parametrize("offload", [None, "saved"])
def test_selective_backward_twice_with_retain_graph(offload_cpu, offload):
    """Each recompute reads the kept outputs from the first (the first one stopped before the
    last matrix product, whose output no backward needs)."""
    block, x = Block(), torch.randn(1024, WIDTH, requires_grad=True)
    out = offloaded_checkpoint(block, x, offload=offload).square().sum()
    first = torch.autograd.grad(out, [x, *block.parameters()], retain_graph=True)
    second = torch.autograd.grad(out, [x, *block.parameters()])
    expected = torch.autograd.grad(block(x).square().sum(), [x, *block.parameters()])
    for a, b, c in zip(first, second, expected):
        assert torch.equal(a, c) and torch.equal(b, c)


class Branching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(WIDTH, WIDTH)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.a(x).sin() if self.calls == 1 else (x @ self.a.weight.T).sin()  # mm where addmm ran


def test_a_recompute_that_diverges_is_an_error():
    out = offloaded_checkpoint(Branching(), torch.randn(8, WIDTH, requires_grad=True), offload=None)
    with pytest.raises(RuntimeError, match="same operations"):
        out.sum().backward()


def test_a_full_pool_falls_back_to_a_synchronous_copy(offload_cpu):
    x, upstream = torch.randn(TOKENS, WIDTH), torch.randn(TOKENS, WIDTH)
    pool = PinnedPool(TOKENS * WIDTH * 4 + 1)  # room for one block input
    model = stack()
    apply_memory_policy(model, Block, recompute="full", offload="inputs", keep_last=0, pool=pool)
    with pytest.warns(RuntimeWarning, match="PinnedPool is full"):
        got = gradients(model, x, upstream)
    for a, b in zip(gradients(stack(), x, upstream), got):
        assert torch.equal(a, b)
    assert memory.stats().sync_fallbacks == 3 and pool.used == 0


def test_a_graph_dropped_without_backward_gives_its_slices_back(offload_cpu):
    pool = PinnedPool(16 << 20)
    model = stack()
    apply_memory_policy(model, Block, recompute="full", offload="inputs", keep_last=0, pool=pool)
    out = model(torch.randn(TOKENS, WIDTH, requires_grad=True))
    assert pool.used > 0
    del out
    gc.collect()
    assert pool.used == 0


def test_no_offload_and_marked_tensors_stay(offload_cpu):
    block = Block()
    x = torch.randn(TOKENS, WIDTH, requires_grad=True)
    with no_offload():
        offloaded_checkpoint(block, x, recompute="full", offload="inputs").sum().backward()
    offloaded_checkpoint(block, mark_not_offload(x), recompute="full", offload="inputs").sum().backward()
    assert memory.stats().bytes_offloaded == 0
    assert memory.stats().bytes_kept == 2 * x.nbytes


def test_cpu_tensors_are_not_moved_without_the_patch():
    memory.reset_stats()
    block = Block()
    x = torch.randn(TOKENS, WIDTH, requires_grad=True)
    offloaded_checkpoint(block, x, recompute="full", offload="saved").sum().backward()
    assert memory.stats().bytes_offloaded == 0


def test_pool_is_a_stack_with_out_of_order_release():
    pool = PinnedPool(4096, pin_memory=False)
    _, a = pool.allocate(100)
    _, b = pool.allocate(100)
    assert pool.used == offload_module.ALIGNMENT + 100
    pool.release(a)
    assert pool.used == offload_module.ALIGNMENT + 100  # b is still above a
    pool.release(b)
    assert pool.used == 0
    assert pool.allocate(4097) is None


def test_bad_pool_arguments():
    with pytest.raises(ValueError, match="capacity_bytes"):
        PinnedPool(0)
    with pytest.raises(TypeError, match="PinnedPool"):
        offloaded_checkpoint(Block(), torch.randn(2, WIDTH), pool=bytearray(10))


@pytest.mark.gpu
def test_cuda_offload_frees_device_memory_and_keeps_gradients():
    x, upstream = torch.randn(4096, WIDTH, device="cuda"), torch.randn(4096, WIDTH, device="cuda")
    plain, wrapped = stack().cuda(), stack().cuda()
    apply_memory_policy(wrapped, Block, recompute="none", offload="saved", keep_last=0, pool=PinnedPool(512 << 20))
    kept = []
    for model in (plain, wrapped):
        inp = x.clone().requires_grad_()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(inp)
        torch.cuda.synchronize()
        kept.append(torch.cuda.memory_allocated() - before)
        out.backward(upstream)
    assert kept[1] < 0.3 * kept[0]
    for a, b in zip(gradients(plain, x, upstream), gradients(wrapped, x, upstream)):
        assert torch.equal(a, b)


def test_parameters_and_their_views_stay(offload_cpu):
    """A matrix product saves weight.t(), a view of the parameter: never worth offloading."""
    layer = torch.nn.Linear(512, 512, bias=False)  # a 1 MiB weight, at the "saved" threshold
    x = torch.randn(8, 512, requires_grad=True)
    offloaded_checkpoint(layer, x, recompute="none", offload="saved").sum().backward()
    assert memory.stats().bytes_offloaded == 0
    assert memory.stats().bytes_kept >= layer.weight.nbytes
