"""Which implementation runs a kernel call.

Three backends exist:

- ``"triton"``: the Triton/CUDA kernels, for CUDA tensors (the default there).
- ``"interpret"``: the same Triton kernels run by the Triton interpreter on CPU tensors; the test
  suite uses it to check kernels without a GPU.
- ``"torch"``: the plain PyTorch reference (``ops/<family>/reference.py``), the default for CPU
  tensors, so every model and trainer also runs on a laptop.

The choice can be forced with the ``GLM5V_BACKEND`` environment variable or, taking precedence over
it, with the :func:`use_backend` context manager.

This module also gives access to the compiled C++ host extension through :func:`host_module`, so
``glm5v_kernels`` imports fine where the extension has not been built.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "can_read_values",
    "forced_backend",
    "host_module",
    "interpreter_enabled",
    "select_backend",
    "use_backend",
]

BACKENDS: tuple[str, ...] = ("torch", "triton", "interpret")
ENV_VAR = "GLM5V_BACKEND"

# Triton fixes interpreter-vs-compiled for a kernel when `@triton.jit` decorates it, i.e. when the
# kernel module is imported; this module is imported before any kernel module, so setting the
# variable here is early enough for `GLM5V_BACKEND=interpret python ...` to just work.
if os.environ.get(ENV_VAR, "").strip().lower() == "interpret":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Same spellings as triton's own boolean environment parsing.
_TRUTHY = frozenset({"1", "true", "on", "yes", "y"})

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("glm5v_backend", default=None)


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {source}; valid backends are: {', '.join(BACKENDS)}")
    return name.strip().lower()


def interpreter_enabled() -> bool:
    """Whether the Triton interpreter is switched on (``TRITON_INTERPRET`` is truthy)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def _current_override() -> str | None:
    return _override.get()


def _constant_under_compile(fn):
    """torch.compile cannot trace a ContextVar read: compiled code reads the override once, when it
    is traced (a `use_backend` switch after that needs `torch._dynamo.reset()`)."""
    try:
        import torch
    except ImportError:
        return fn
    return torch.compiler.assume_constant_result(fn)


_current_override = _constant_under_compile(_current_override)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``GLM5V_BACKEND``, or None when not forced."""
    name = _current_override()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return None
    return _check_name(env, f"the {ENV_VAR} environment variable")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Force ``name`` for calls made inside the ``with`` block (wins over ``GLM5V_BACKEND``)."""
    checked = _check_name(name, "use_backend()")
    token = _override.set(checked)
    try:
        yield checked
    finally:
        _override.reset(token)


def _require_triton(backend: str) -> None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the {backend!r} backend needs triton, which could not be imported ({exc}). "
            "triton is a Linux-only dependency: install it with `pip install 'triton>=3.4'` on Linux, "
            f"or run the PyTorch reference with {ENV_VAR}=torch / use_backend('torch')."
        ) from exc


def _device_of(tensors: tuple[torch.Tensor | None, ...]) -> torch.device | None:
    import torch

    devices: list[torch.device] = []
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"select_backend() argument {i} must be a torch.Tensor or None, got {type(t).__name__}"
            )
        if t.device not in devices:
            devices.append(t.device)
    if len(devices) > 1:
        raise ValueError(
            "all tensors must be on one device, got tensors on " + ", ".join(str(d) for d in devices)
        )
    return devices[0] if devices else None


def select_backend(*tensors: torch.Tensor | None) -> str:
    """Return ``"triton"``, ``"interpret"`` or ``"torch"`` for a call on ``tensors``.

    ``None`` arguments (absent optional tensors) are ignored. Raises ValueError when the tensors
    are on different devices or when a forced backend cannot run on their device, RuntimeError
    when ``"interpret"`` is forced without the interpreter switched on, and ImportError when a
    Triton backend is needed but triton is not installed.
    """
    device = _device_of(tensors)
    forced = forced_backend()
    is_cuda = device is not None and device.type == "cuda"

    if forced is None:
        if is_cuda:
            _require_triton("triton")
            return "triton"
        return "torch"

    if forced == "torch":
        return "torch"

    if forced == "triton":
        if device is not None and not is_cuda:
            raise ValueError(
                f"the 'triton' backend needs CUDA tensors, got tensors on {device}; "
                "use 'interpret' to run the Triton kernels on CPU tensors, or 'torch'"
            )
        _require_triton("triton")
        return "triton"

    # forced == "interpret"
    if device is not None and device.type != "cpu":
        raise ValueError(
            f"the 'interpret' backend runs the Triton interpreter on CPU tensors, got tensors on {device}; "
            "use 'triton' for CUDA tensors"
        )
    _require_triton("interpret")
    if not interpreter_enabled():
        raise RuntimeError(
            "the 'interpret' backend needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is imported (or set GLM5V_BACKEND=interpret before importing "
            "glm5v_kernels)"
        )
    return "interpret"


def can_read_values(tensor: torch.Tensor) -> bool:
    """Whether input checks may read `tensor`'s values: on the CPU outside torch.compile, where it
    costs neither a device sync nor a graph break."""
    import torch

    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def host_module() -> ModuleType:
    """Return the compiled C++ host extension ``glm5v_kernels._host``.

    Raises ImportError explaining how to build it when it cannot be imported.
    """
    try:
        return importlib.import_module("glm5v_kernels._host")
    except ImportError as exc:
        raise ImportError(
            "the C++ host extension glm5v_kernels._host is not built or could not be loaded "
            f"({exc}). Build it by running `pip install -e .` from the repository root; this needs a "
            "C++17 compiler (pybind11 and ninja come from the build requirements)."
        ) from exc
