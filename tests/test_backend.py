"""select_backend / use_backend / GLM5V_BACKEND / host_module."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from glm5v_kernels import _backend
from glm5v_kernels._backend import (
    BACKENDS,
    host_module,
    interpreter_enabled,
    select_backend,
    use_backend,
)

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLM5V_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the tensors are CUDA tensors (no GPU on the CPU machines)."""
    monkeypatch.setattr(_backend, "_device_of", lambda tensors: CUDA)


def test_cpu_tensors_default_to_torch() -> None:
    assert select_backend(torch.randn(3), torch.randn(2, 2)) == "torch"


def test_no_tensors_and_none_arguments() -> None:
    assert select_backend() == "torch"
    assert select_backend(None, torch.randn(1), None) == "torch"


def test_cuda_tensors_default_to_triton(on_cuda: None) -> None:
    assert select_backend(torch.randn(1)) == "triton"


def test_mixed_devices_raise_naming_them() -> None:
    with pytest.raises(ValueError, match=r"one device.*cpu.*meta"):
        select_backend(torch.randn(2), torch.empty(2, device="meta"))


def test_non_tensor_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="argument 1 must be a torch.Tensor"):
        select_backend(torch.randn(1), [1.0])


@pytest.mark.parametrize("value", ["torch", "TORCH", " torch "])
def test_env_var_forces_torch(monkeypatch: pytest.MonkeyPatch, on_cuda: None, value: str) -> None:
    monkeypatch.setenv("GLM5V_BACKEND", value)
    assert select_backend(torch.randn(1)) == "torch"


def test_env_var_forces_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLM5V_BACKEND", "interpret")
    assert select_backend(torch.randn(1)) == "interpret"


def test_empty_env_var_means_no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLM5V_BACKEND", "")
    assert select_backend(torch.randn(1)) == "torch"


def test_unknown_env_var_lists_valid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLM5V_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"'cuda'.*GLM5V_BACKEND.*torch, triton, interpret"):
        select_backend(torch.randn(1))


def test_context_manager_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLM5V_BACKEND", "triton")
    with use_backend("interpret"):
        assert select_backend(torch.randn(1)) == "interpret"
        with use_backend("torch"):
            assert select_backend(torch.randn(1)) == "torch"
        assert select_backend(torch.randn(1)) == "interpret"
    with pytest.raises(ValueError, match="CUDA tensors"):
        select_backend(torch.randn(1))


def test_context_manager_restores_after_exception() -> None:
    with pytest.raises(KeyError), use_backend("interpret"):
        raise KeyError("boom")
    assert _backend.forced_backend() is None
    assert select_backend(torch.randn(1)) == "torch"


def test_unknown_context_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid backends are: torch, triton, interpret"):
        with use_backend("cupy"):
            pass
    assert BACKENDS == ("torch", "triton", "interpret")


def test_triton_forced_on_cpu_tensors_needs_cuda() -> None:
    with use_backend("triton"), pytest.raises(ValueError, match="needs CUDA tensors.*cpu"):
        select_backend(torch.randn(1))


def test_interpret_forced_on_cuda_tensors(on_cuda: None) -> None:
    with use_backend("interpret"), pytest.raises(ValueError, match="CPU tensors.*cuda:0"):
        select_backend(torch.randn(1))


def test_interpret_on_meta_tensors_is_refused() -> None:
    with use_backend("interpret"), pytest.raises(ValueError, match="CPU tensors.*meta"):
        select_backend(torch.empty(1, device="meta"))


def test_torch_forced_on_cuda_tensors(on_cuda: None) -> None:
    with use_backend("torch"):
        assert select_backend(torch.randn(1)) == "torch"


def test_interpret_without_interpreter_is_a_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("interpret"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*before triton"):
        select_backend(torch.randn(1))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False), ("", False), ("off", False)],
)
def test_interpreter_enabled(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_enabled() is expected


def test_missing_triton_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    assert select_backend(torch.randn(1)) == "torch"
    with use_backend("interpret"), pytest.raises(ImportError, match="needs triton.*Linux-only"):
        select_backend(torch.randn(1))


def test_missing_triton_on_cuda_tensors(monkeypatch: pytest.MonkeyPatch, on_cuda: None) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError, match="GLM5V_BACKEND=torch"):
        select_backend(torch.randn(1))


def test_import_sets_triton_interpret_for_interpret_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("GLM5V_BACKEND", "interpret")
    # Load a fresh copy of the module under another name so the real one stays untouched.
    spec = importlib.util.spec_from_file_location("_glm5v_backend_copy", Path(_backend.__file__))
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_host_module_missing_names_the_build_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "glm5v_kernels._host", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install -e \.") as info:
        host_module()
    message = str(info.value)
    assert "C++17" in message and "repository root" in message
    assert isinstance(info.value.__cause__, ImportError)


def test_host_module_when_built() -> None:
    try:
        mod = host_module()
    except ImportError as exc:
        pytest.skip(f"host extension not built: {exc}")
    assert mod.__name__ == "glm5v_kernels._host"


@pytest.mark.gpu
def test_real_cuda_tensors_select_triton() -> None:
    assert select_backend(torch.randn(2, device="cuda")) == "triton"
    with pytest.raises(ValueError, match="one device"):
        select_backend(torch.randn(2, device="cuda"), torch.randn(2))
