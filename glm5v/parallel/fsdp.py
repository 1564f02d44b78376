"""FSDP2 wrapping: `fully_shard` on every transformer block, then on the root, over a 1-D DeviceMesh.

Each block's parameters are gathered just before it runs and freed after (in forward and again in
backward), its gradients reduce-scattered and averaged over the ranks; what is left outside the
blocks (embeddings, norms, heads, the patch merger) is one root group. Parameters become DTensors
sharded on dim 0, the layout `glm5v_kernels.optim.Muon` and `glm5v.train.loop`'s checkpoints expect.
Tied parameters (the MMTP head shares the LLM's embedding, head and final norm) stay tied.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard


def init_from_torchrun() -> bool:
    """Initialise the default process group when torchrun launched this process (WORLD_SIZE in the
    environment) and none is yet: NCCL with one GPU per local rank where CUDA is available, gloo
    otherwise. Returns whether torch.distributed is initialised."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.is_initialized()


def data_parallel_mesh(device: torch.device | str) -> DeviceMesh:
    """A 1-D mesh over every rank of the initialised default process group, on device's type."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("FSDP2 needs an initialised torch.distributed process group (launch with torchrun)")
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def shard_blocks(model: nn.Module, block_types: tuple[type, ...], mesh: DeviceMesh) -> int:
    """fully_shard every submodule of one of block_types (innermost first, in module order), then
    model itself; returns how many blocks were sharded. Apply memory policies before, and build
    the optimizer after: the parameters are replaced."""
    if not block_types:
        raise ValueError("block_types must name at least one block class")
    blocks = [m for m in model.modules() if isinstance(m, block_types) and m is not model]
    if not blocks:
        raise ValueError(f"model has no {', '.join(t.__name__ for t in block_types)} modules to shard")
    # DecoderBlock returns its (..., C) input shape as a view of the (T, C) result; FSDP2 warns about
    # in-place ops on such views, and nothing in the models modifies a block's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a view tensor")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)
