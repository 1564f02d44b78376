"""torch.distributed pieces of the trainer: distributed losses and FSDP2 / DeviceMesh wrapping."""

from glm5v.parallel.fsdp import data_parallel_mesh, init_from_torchrun, shard_blocks
from glm5v.parallel.siglip import DistributedSigLIPLoss

__all__ = ["DistributedSigLIPLoss", "data_parallel_mesh", "init_from_torchrun", "shard_blocks"]
