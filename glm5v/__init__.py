"""glm5v: the model and trainer layer of the GLM-5V-Turbo recipe, built on `glm5v_kernels`.

It imports only the public `glm5v_kernels` API. The `glm5v` command (glm5v/cli.py) is its entry
point.
"""

__version__ = "0.1.0"
