"""Data-pipeline kernels (C++ host code): NaFlex image preprocessing and packing, multi-key
balancing of samples over ranks and micro-batches; resizing of learned position grids."""

from glm5v_kernels.data.naflex import NaFlexProcessor, PackedImages, PackedVideos, pack_images, pack_video
from glm5v_kernels.data.partition import (
    Partition,
    TransformerDims,
    balanced_partition,
    partition_frames,
    plan_microbatches,
    vlm_sample_costs,
)
from glm5v_kernels.data.pos_embed import interpolate_pos_embed

__all__ = ["NaFlexProcessor", "PackedImages", "PackedVideos", "pack_images", "pack_video", "interpolate_pos_embed",
           "Partition", "TransformerDims",
           "balanced_partition", "partition_frames", "plan_microbatches", "vlm_sample_costs"]
