"""Data-pipeline kernels: NaFlex image preprocessing and packing (C++ host code)."""

from glm5v_kernels.data.naflex import NaFlexProcessor, PackedImages, pack_images

__all__ = ["NaFlexProcessor", "PackedImages", "pack_images"]
