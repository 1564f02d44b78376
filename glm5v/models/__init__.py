"""Models of the recipe, single-device: CogViT (the vision encoder) and its distillation teachers."""

from glm5v.models.cogvit import CogViT, CogViTConfig, CogViTOutput, cogvit_l, cogvit_tiny

__all__ = ["CogViT", "CogViTConfig", "CogViTOutput", "cogvit_l", "cogvit_tiny"]
