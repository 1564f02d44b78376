"""glm5v_kernels: fused kernels for training native multimodal models, usable from any trainer.

The functional API of every kernel family is exported here; `glm5v_kernels.data` holds the
data-pipeline kernels (NaFlex packing, balancing), `glm5v_kernels.optim` Muon, and
`glm5v_kernels.memory` the recompute policies. Nothing here imports the `glm5v` trainer layer.
"""

from glm5v_kernels import compat, data, memory, nn, optim
from glm5v_kernels.ops.attention import VarlenPlan, rotary_1d, rotary_2d, varlen_attention, varlen_plan
from glm5v_kernels.ops.mtp import embed_with_placeholder, fused_linear_cross_entropy, merge_visual_embeddings, mtp_roll
from glm5v_kernels.ops.muon import newton_schulz
from glm5v_kernels.ops.siglip import siglip_loss

__version__ = "0.1.0"
__all__ = ["compat", "data", "memory", "nn", "optim", "newton_schulz",
           "varlen_attention", "varlen_plan", "VarlenPlan", "rotary_1d", "rotary_2d",
           "fused_linear_cross_entropy", "embed_with_placeholder", "merge_visual_embeddings", "mtp_roll",
           "siglip_loss"]
