"""Optimizers: Muon (with its AdamW companion groups) and QK-clip."""

from glm5v_kernels.optim.muon import Muon, muon_param_groups
from glm5v_kernels.optim.qk_clip import qk_clip

__all__ = ["Muon", "muon_param_groups", "qk_clip"]
