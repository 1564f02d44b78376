"""nn.Modules that hold parameters and call the functional API of `glm5v_kernels`."""

__all__: list[str] = []
