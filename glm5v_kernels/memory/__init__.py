"""Activation memory policies for transformer blocks: selective or full recompute, and offload.

`offloaded_checkpoint(fn, *args, recompute=..., offload=..., pool=...)` runs one block so that
backward recomputes what the policy does not keep and finds what it offloaded back on the device;
`apply_memory_policy(model, block_cls, ...)` wraps every chosen block of a model.

recompute: "selective" keeps the outputs of matrix products and attention (with its
log-sum-exp) and recomputes the cheap elementwise work around them (norms, activations, rotary),
and, where attention runs as plain batched products (the CPU reference), its score matrices:
a non-reentrant checkpoint whose contexts keep the outputs `selective_policy` marks MUST_SAVE
(as torch's selective-checkpoint contexts do, but through the offloader, so "saved" can move
them too; an in-place write into a kept output, or a recompute that runs other operations than
its forward, is an error; under torch.compile, which traces only torch's own contexts, those are
used and the kept outputs stay on the device). "full" keeps only the block's input. "none"
keeps what autograd keeps.

offload: "inputs" sends the tensors the block saves that share storage with its inputs (with
recompute, its input: all "full" keeps) to pinned host memory; "saved" sends every tensor the
block keeps for backward of at least 1 MiB (with "selective", its kept outputs too). Copies run
on a side CUDA stream into `pool` (a `PinnedPool`, or fresh pinned memory when None) and come
back one block ahead in backward (see `offload.py`). `no_offload()` and `mark_not_offload(tensor)` keep tensors
on the device; `stats()` reports bytes moved and kept and copy time exposed. Offload moves CUDA
tensors only: for CPU tensors it is a no-op. `saved_bytes(fn, *args, by_op=...)` measures what a
forward leaves alive for backward, in total or by the op that made each tensor.

What selective saves depends on the attention: where it runs as plain products, "none" keeps
(heads, L, L) scores and probabilities per block and selective drops them; the fused kernel keeps
only out and lse, so there selective saves the norms' and activations' outputs alone (about 43%
on a CogViT block: tests/memory/test_memory.py).
"""

from __future__ import annotations

import functools
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from glm5v_kernels.memory.offload import (
    OFFLOADER,
    OffloadStats,
    PinnedPool,
    mark_not_offload,
    no_offload,
    reset_stats,
    stats,
)

RECOMPUTE = ("none", "selective", "full")
OFFLOAD = (None, "inputs", "saved")

_aten = torch.ops.aten
# Outputs kept by "selective": the matrix products and attention kernels (their outputs include
# the log-sum-exp that attention backward needs). Kernel families add their own ops here.
SAVE_OPS: set = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
for _name in ("_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward"):
    if hasattr(_aten, _name):
        SAVE_OPS.add(getattr(_aten, _name).default)


# glm5v's own custom ops kept by "selective", by name (so this module needs no kernel imports):
# the fused attention forward returns the output and its log-sum-exp, all its backward needs.
SAVE_OP_NAMES = {"glm5v::varlen_attention_fwd"}


_BATCHED_PRODUCTS = {_aten.bmm.default, _aten.baddbmm.default}


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """MUST_SAVE for the ops in SAVE_OPS / SAVE_OP_NAMES, PREFER_RECOMPUTE for the rest.

    A batched product whose output is larger than each of its operands is recomputed: that is
    attention's (heads, L, L) score matrix when attention runs as plain products, the memory that
    selective recompute exists to drop; keeping its operands costs less than keeping it."""
    if op in _BATCHED_PRODUCTS and _outgrows_operands(*args[-2:]):
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in SAVE_OPS or op.name() in SAVE_OP_NAMES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _outgrows_operands(left: torch.Tensor, right: torch.Tensor) -> bool:
    """(b, m, k) @ (b, k, n): m·n exceeds both m·k and k·n."""
    m, k, n = left.shape[-2], left.shape[-1], right.shape[-1]
    return m * n > max(m * k, k * n)


def _check(recompute: str, offload) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")


def offloaded_checkpoint(fn, *args, recompute: str = "selective", offload: str | None = "inputs",
                         pool: PinnedPool | None = None, **kwargs):
    """fn(*args, **kwargs) with the given recompute and offload policy for its backward.

    Gradients equal those of fn run plainly (bit-identical in fp32): recompute replays the same
    operations and offload moves exact bytes. See the module docstring for the policies."""
    _check(recompute, offload)
    if pool is not None and not isinstance(pool, PinnedPool):
        raise TypeError(f"pool must be a PinnedPool or None, got {type(pool).__name__}")
    if offload is None:
        return _with_recompute(fn, recompute, args, kwargs)
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    with OFFLOADER.block(offload, inputs, pool):
        return _with_recompute(fn, recompute, args, kwargs)


def _with_recompute(fn, recompute: str, args, kwargs):
    if recompute == "none":
        return fn(*args, **kwargs)
    if recompute == "full":
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)


def _selective_contexts() -> tuple[TorchDispatchMode, TorchDispatchMode]:
    """torch's selective-checkpoint contexts, except that the kept outputs go through the
    offloading block's pack / unpack like any saved tensor (torch's keep them on the device).
    torch.compile traces torch's own contexts only: there they are used, and kept outputs stay
    on the device."""
    if torch.compiler.is_compiling():
        return create_selective_checkpoint_contexts(selective_policy)
    kept: list = []
    return _KeepSelected(kept), _ReuseKept(kept)


def _keeps(func, args, kwargs) -> bool:
    return selective_policy(None, func, *args, **kwargs) == CheckpointPolicy.MUST_SAVE


class _KeepSelected(TorchDispatchMode):
    """The forward of a selective block: (op, packed outputs) of the ops the policy keeps, in call
    order. An op that writes into a kept output afterwards is an error: the recompute would read
    the changed values."""

    def __init__(self, kept: list):
        super().__init__()
        self.kept = kept
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable and self.storages & _storage_ptrs(_written(func, args, kwargs)):
            raise RuntimeError(f"{func} writes in place into a tensor that selective recompute keeps for backward; "
                               "make the operation out of place or use recompute='full'")
        out = func(*args, **kwargs)
        if _keeps(func, args, kwargs):
            self.storages |= _storage_ptrs(out)
            self.kept.append((func, tree_map_only(torch.Tensor, lambda t: OFFLOADER.pack(t.detach()), out)))
        return out


def _written(func, args, kwargs) -> list:
    """The arguments func's schema says it writes to."""
    schema_args = func._schema.arguments
    values = [*args, *(kwargs.get(a.name) for a in schema_args[len(args):])]
    return [v for a, v in zip(schema_args, values) if a.alias_info is not None and a.alias_info.is_write]


class _ReuseKept(TorchDispatchMode):
    """A recompute of a selective block: the kept ops return their forward outputs instead of
    running again. Each recompute starts from the first (backward may run twice with
    retain_graph, and a recompute stops once backward has what it needs)."""

    def __init__(self, kept: list):
        super().__init__()
        self.kept = kept
        self.position = 0

    def __enter__(self):
        self.position = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _keeps(func, args, kwargs):
            return func(*args, **kwargs)
        kept_func, packed = self.kept[self.position] if self.position < len(self.kept) else (None, None)
        if kept_func is not func:
            raise RuntimeError(f"the recompute of a selective block ran {func} where its forward ran {kept_func}: "
                               "the block must run the same operations every time (no data-dependent branches)")
        self.position += 1
        return tree_map_only(object, OFFLOADER.unpack, packed)


def apply_memory_policy(model: torch.nn.Module, block_cls, recompute: str = "selective",
                        offload: str | None = "inputs", every: int = 1, keep_last: int = 1,
                        pool: PinnedPool | None = None) -> int:
    """Wrap the forward of every `every`-th instance of block_cls in `model` (in module order),
    except the last `keep_last` ones (their activations are needed first in backward), with
    `offloaded_checkpoint`. Returns how many blocks were wrapped; wrapping twice is an error."""
    _check(recompute, offload)
    if pool is not None and not isinstance(pool, PinnedPool):
        raise TypeError(f"pool must be a PinnedPool or None, got {type(pool).__name__}")
    if not isinstance(every, int) or every < 1 or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"every must be >= 1 and keep_last >= 0, got every={every!r}, keep_last={keep_last!r}")
    blocks = [m for m in model.modules() if isinstance(m, block_cls)]
    if not blocks:
        raise ValueError(f"model has no {getattr(block_cls, '__name__', block_cls)} modules")
    chosen = [b for i, b in enumerate(blocks[: len(blocks) - keep_last]) if i % every == 0]
    for block in chosen:
        if getattr(block, "_glm5v_memory_policy", None) is not None:
            raise ValueError("a memory policy is already applied to this model's blocks")
        block._glm5v_memory_policy = (recompute, offload)
        block.forward = functools.partial(offloaded_checkpoint, block.forward, recompute=recompute, offload=offload,
                                          pool=pool)
    return len(chosen)


def _storage_ptrs(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class _StorageTracker(TorchDispatchMode):
    """Remembers, weakly, every storage an operation allocates and the operation's name (views
    and in-place results share an input's storage and are not new)."""

    def __init__(self):
        super().__init__()
        # not keyed by address: a freed storage's address is soon reused by a new one
        self.storages: list[tuple[weakref.ref, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = _storage_ptrs((args, kwargs))
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self.storages.append((weakref.ref(storage), func.name()))
        return out

    def alive(self) -> dict[int, tuple[int, str]]:
        """data_ptr -> (bytes, creating op) of the recorded storages still alive."""
        gc.collect()
        alive = ((ref(), name) for ref, name in self.storages)
        return {s.data_ptr(): (s.nbytes(), name) for s, name in alive if s is not None}


def saved_bytes(fn, *args, by_op: bool = False, **kwargs):
    """Bytes that running fn(*args, **kwargs) leaves alive for backward: storages created during
    the forward that are still held when it returns, not counting the returned tensors. by_op:
    a dict from the name of the op that created each storage ("aten::addmm") to its bytes."""
    before = _storage_ptrs((args, kwargs))
    tracker = _StorageTracker()
    with tracker:
        out = fn(*args, **kwargs)
    returned = _storage_ptrs(out)
    totals: dict[str, int] = {}
    for ptr, (nbytes, name) in tracker.alive().items():
        if ptr not in before and ptr not in returned:
            totals[name] = totals.get(name, 0) + nbytes
    del out
    return totals if by_op else sum(totals.values())


__all__ = ["OffloadStats", "PinnedPool", "apply_memory_policy", "mark_not_offload", "no_offload",
           "offloaded_checkpoint", "reset_stats", "saved_bytes", "selective_policy", "stats"]
