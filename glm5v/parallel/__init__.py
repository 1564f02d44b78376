"""torch.distributed pieces of the trainer: distributed losses (and, later, FSDP2 / DeviceMesh wrapping)."""

from glm5v.parallel.siglip import DistributedSigLIPLoss

__all__ = ["DistributedSigLIPLoss"]
