"""Models of the recipe, single-device: CogViT (the vision encoder), its distillation teachers, the
GLM-style decoder LLM and the VLM assembling them."""

from glm5v.models.cogvit import CogViT, CogViTConfig, CogViTOutput, cogvit_l, cogvit_tiny
from glm5v.models.llm import DecoderLM, DecoderLMConfig, DecoderLMOutput, llm_1b, llm_tiny
from glm5v.models.teachers import TeacherFeatures, VisionTeacher
from glm5v.models.vlm import VLM, VLMConfig, VLMOutput, vlm_tiny

__all__ = ["CogViT", "CogViTConfig", "CogViTOutput", "cogvit_l", "cogvit_tiny", "TeacherFeatures", "VisionTeacher",
           "DecoderLM", "DecoderLMConfig", "DecoderLMOutput", "llm_1b", "llm_tiny", "VLM", "VLMConfig", "VLMOutput",
           "vlm_tiny"]
