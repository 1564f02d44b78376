"""Activation memory policies for transformer blocks: selective or full recompute.

`offloaded_checkpoint(fn, *args, recompute=...)` runs one block so that backward recomputes what
the policy does not keep; `apply_memory_policy(model, block_cls, ...)` wraps every chosen block
of a model. "selective" keeps the outputs of matrix products and attention (with its
log-sum-exp) and recomputes the cheap elementwise work around them (norms, activations, rotary):
torch's selective-checkpoint contexts with the policy in `selective_policy`. "full" keeps only
the block's input. `saved_bytes(fn, *args)` measures what a forward leaves alive for backward.

Offloading saved tensors to pinned host memory is a no-op for CPU tensors (there is no device
memory to save); for CUDA tensors it is not available yet and asking for it raises.
"""

from __future__ import annotations

import functools
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

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


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _check(recompute: str, offload) -> None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")


def offloaded_checkpoint(fn, *args, recompute: str = "selective", offload: str | None = "inputs", pool=None,
                         **kwargs):
    """fn(*args, **kwargs) with the given recompute policy for its backward.

    Gradients equal those of fn run plainly (bit-identical in fp32): recompute replays the same
    operations. offload: see the module docstring (a no-op for CPU tensors)."""
    _check(recompute, offload)
    if offload is not None and any(isinstance(a, torch.Tensor) and a.is_cuda for a in tree_flatten((args, kwargs))[0]):
        raise NotImplementedError(f"offload={offload!r} for CUDA tensors is not available yet; pass offload=None")
    if recompute == "none":
        return fn(*args, **kwargs)
    context_fn = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    if recompute == "full":
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def apply_memory_policy(model: torch.nn.Module, block_cls, recompute: str = "selective",
                        offload: str | None = "inputs", every: int = 1, keep_last: int = 1) -> int:
    """Wrap the forward of every `every`-th instance of block_cls in `model` (in module order),
    except the last `keep_last` ones (their activations are needed first in backward), with
    `offloaded_checkpoint`. Returns how many blocks were wrapped; wrapping twice is an error."""
    _check(recompute, offload)
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
        block.forward = functools.partial(offloaded_checkpoint, block.forward, recompute=recompute, offload=offload)
    return len(chosen)


def _storage_ptrs(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class _StorageTracker(TorchDispatchMode):
    """Remembers, weakly, every storage an operation allocates (views and in-place results share
    an input's storage and are not new)."""

    def __init__(self):
        super().__init__()
        # not keyed by address: a freed storage's address is soon reused by a new one
        self.storages: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = _storage_ptrs((args, kwargs))
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self.storages.append(weakref.ref(storage))
        return out

    def alive(self) -> dict[int, int]:
        """data_ptr -> bytes of the recorded storages still alive."""
        gc.collect()
        return {s.data_ptr(): s.nbytes() for s in (ref() for ref in self.storages) if s is not None}


def saved_bytes(fn, *args, **kwargs) -> int:
    """Bytes that running fn(*args, **kwargs) leaves alive for backward: storages created during
    the forward that are still held when it returns, not counting the returned tensors."""
    before = _storage_ptrs((args, kwargs))
    tracker = _StorageTracker()
    with tracker:
        out = fn(*args, **kwargs)
    returned = _storage_ptrs(out)
    total = sum(nbytes for ptr, nbytes in tracker.alive().items() if ptr not in before and ptr not in returned)
    del out
    return total
