"""Optimizers: Muon (with its AdamW companion groups)."""

from glm5v_kernels.optim.muon import Muon, muon_param_groups

__all__ = ["Muon", "muon_param_groups"]
