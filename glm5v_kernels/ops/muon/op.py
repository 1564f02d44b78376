"""Newton–Schulz on the Triton backend, and the choice between its two paths.

"symmetric": per step, the symmetric Gram kernel for A = X·Xᵀ and B = b·A + c·A·A (upper tiles
only, mirrored), then the general product a·X + B·X in one batched GEMM. "matmul": the same step
as three plain batched matrix products (`reference.polynomial_steps`). For small matrices the
kernel's two launches per step and its fixed tiles lose to cuBLAS; where the crossover lies
depends on the GPU, the shape and the dtype, so it is measured rather than set: the first call
for a (device, shape, dtype) times one step of each path and that call and every later one take
the faster (`path_choices()` lists what was measured). Under the Triton interpreter the kernel
path always runs (its timings say nothing about a GPU). Each measured choice is fixed for the
process; `force_path` pins a path, e.g. for bitwise reproducibility across runs and machines.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from glm5v_kernels.ops.muon import reference

PATHS = ("symmetric", "matmul")
# Runs of each path timed per measurement, after one warm-up run (which compiles the kernel).
TIMED_RUNS = 3


@dataclass(frozen=True)
class PathChoice:
    """The path taken for one (device, shape, dtype) and the best time of one step on each path."""

    path: str
    seconds: dict[str, float]


_choices: dict[tuple, PathChoice] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("glm5v_ns_path", default=None)


@contextlib.contextmanager
def force_path(path: str) -> Iterator[None]:
    """Within the context, the Triton backend's Newton–Schulz takes `path` ("symmetric" or
    "matmul") without measuring."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    token = _forced.set(path)
    try:
        yield
    finally:
        _forced.reset(token)


def path_choices() -> dict[tuple, PathChoice]:
    """(device, (batch, m, n) on the short side, dtype) -> the measured PathChoice, so far."""
    return dict(_choices)


def symmetric_steps(X: torch.Tensor, table) -> torch.Tensor:
    """reference.polynomial_steps with the symmetric kernels; X (batch, m, n) contiguous, m <= n."""
    from glm5v_kernels.ops.muon.triton import sym_gram

    A = torch.empty(X.shape[0], X.shape[1], X.shape[1], device=X.device, dtype=X.dtype)
    B = torch.empty_like(A)
    for a, b, c in table:
        sym_gram(X, out=A)
        sym_gram(A, alpha=c, C=A, beta=b, out=B)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


STEPS: dict[str, Callable[[torch.Tensor, list], torch.Tensor]] = {
    "symmetric": symmetric_steps, "matmul": reference.polynomial_steps}


def choose_path(X: torch.Tensor, step: tuple[float, float, float], measure: bool) -> str:
    """The path for X (batch, m, n): the forced one, the kernel when not measuring, else the
    faster one measured on one `step`, once per (device, shape, dtype). Where nothing can be timed
    (while torch.compile traces, or a CUDA graph captures) an earlier measurement is used, else the
    kernel path, and the measurement waits for the next eager call."""
    forced = _forced.get()
    if forced is not None:
        return forced
    if not measure:
        return "symmetric"
    key = (str(X.device), tuple(X.shape), X.dtype)
    if key not in _choices:
        if torch.compiler.is_compiling() or (X.is_cuda and torch.cuda.is_current_stream_capturing()):
            return "symmetric"
        seconds = {path: _best_seconds(lambda path=path: STEPS[path](X, [step]), X.device) for path in PATHS}
        _choices[key] = PathChoice(min(PATHS, key=seconds.__getitem__), seconds)
    return _choices[key].path


def _best_seconds(fn: Callable[[], object], device: torch.device) -> float:
    fn()
    best = math.inf
    for _ in range(TIMED_RUNS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            fn()
            seconds = time.perf_counter() - begin
        best = min(best, seconds)
    return best


def newton_schulz_triton(G: torch.Tensor, steps: int, coefficients, eps: float, dtype: torch.dtype,
                         measure: bool) -> torch.Tensor:
    """G (..., m, n) -> orthogonalised, same shape and dtype; measure: choose the path by timing
    (the compiled backend) rather than always taking the kernel (the interpreter)."""
    table, scale = reference.resolve_coefficients(coefficients, steps)
    m, n = G.shape[-2:]
    X = reference.normalize(G.reshape(-1, m, n), eps, scale).to(dtype)
    tall = m > n
    X = (X.mT if tall else X).contiguous()
    X = STEPS[choose_path(X, table[0], measure)](X, table)
    if tall:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)
