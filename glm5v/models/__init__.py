"""Models of the recipe, single-device: CogViT (the vision encoder) and its distillation teachers."""

from glm5v.models.cogvit import CogViT, CogViTConfig, CogViTOutput, cogvit_l, cogvit_tiny
from glm5v.models.teachers import TeacherFeatures, VisionTeacher

__all__ = ["CogViT", "CogViTConfig", "CogViTOutput", "cogvit_l", "cogvit_tiny", "TeacherFeatures", "VisionTeacher"]
