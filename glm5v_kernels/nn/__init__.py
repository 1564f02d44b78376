"""nn.Modules that hold parameters and call the functional API of `glm5v_kernels`."""

from glm5v_kernels.nn.attention import QKNormAttention
from glm5v_kernels.nn.mmtp import MMTPHead, MMTPOutput

__all__: list[str] = ["MMTPHead", "MMTPOutput", "QKNormAttention"]
