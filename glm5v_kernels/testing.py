"""Shared test helpers for every kernel family.

- Accuracy: :data:`TOLERANCES`, :func:`relative_error`, :func:`assert_close` (relative error
  against a float64 reference) and :func:`assert_close_flash` (the flash-attention rule).
- Poisoning: :func:`poison_` and :func:`empty_poisoned` fill outputs with NaN (or an integer
  sentinel) before a kernel runs, so an element the kernel never writes fails the comparison.
- Where kernel tests run: :data:`TARGET` (the Triton kernels on a CUDA GPU, the Triton
  interpreter on CPU tensors elsewhere), with the dtypes to test there and their tolerances.
- Compile checks without a GPU: :func:`compile_for_sm90` compiles a ``@triton.jit`` kernel for an
  H100 and runs ptxas on it (``int_values`` / :func:`aligned_int_values`: the variant a launch
  with aligned sizes and unit strides specialises to), :func:`compile_cuda_for_sm90` compiles a
  ``.cu`` file with nvcc, and :func:`assert_compiles_clean` checks either report for spills,
  shared memory and wgmma.

Importable without triton; triton is imported only inside the compile functions.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TOLERANCES",
    "CompileReport",
    "CudaCompileReport",
    "KernelResources",
    "KernelTarget",
    "TARGET",
    "assert_close",
    "assert_close_flash",
    "dtype_id",
    "assert_compiles_clean",
    "compile_cuda_for_sm90",
    "compile_for_sm90",
    "empty_poisoned",
    "nvcc_path",
    "poison_",
    "ptxas_path",
    "relative_error",
]

# Relative error ‖out − ref‖/‖ref‖ allowed against a float64 reference. "tf32" is for fp32 inputs
# whose dots run on tf32 tensor cores. float64 is there so a float64 output has a default too.
TOLERANCES: dict[torch.dtype | str, float] = {
    torch.float32: 1e-5,
    "tf32": 5e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
    torch.float64: 1e-12,
}

_WORST_SHOWN = 5


@dataclass(frozen=True)
class KernelTarget:
    """Where kernel tests run: the compiled kernels on a CUDA GPU, the Triton interpreter on CPU
    tensors elsewhere (bf16 only on the GPU: the interpreter's bf16 dots are wrong)."""

    on_gpu: bool

    @property
    def device(self) -> str:
        return "cuda" if self.on_gpu else "cpu"

    @property
    def backend(self) -> str:
        return "triton" if self.on_gpu else "interpret"

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        base = (torch.float32, torch.float16)
        return base + (torch.bfloat16,) if self.on_gpu else base

    def tolerance(self, dtype: torch.dtype) -> torch.dtype | str:
        """The :data:`TOLERANCES` key for outputs of `dtype` (fp32 dots run as tf32 on a GPU)."""
        return "tf32" if self.on_gpu and dtype == torch.float32 else dtype


TARGET = KernelTarget(on_gpu=torch.cuda.is_available())


def dtype_id(dtype: torch.dtype) -> str:
    """Short test id of a dtype: fp32, fp16, bf16."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


# --------------------------------------------------------------------------------------------------
# accuracy


def _as_cpu_f64(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    t = t.detach()
    if t.is_complex():
        raise TypeError("complex tensors are not supported by the comparison helpers")
    return t.to(device="cpu", dtype=torch.float64)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖₂ / ‖ref‖₂ computed in float64; the absolute norm ‖out − ref‖₂ when ‖ref‖ is 0.

    NaN when ``out`` has non-finite values where ``ref`` is finite.
    """
    o, r = _as_cpu_f64(out), _as_cpu_f64(ref)
    if o.shape != r.shape:
        raise ValueError(f"shape mismatch: out {tuple(o.shape)} vs ref {tuple(r.shape)}")
    if o.numel() == 0:
        return 0.0
    diff = torch.linalg.vector_norm(o - r).item()
    denom = torch.linalg.vector_norm(r).item()
    return diff / denom if denom > 0 else diff


def _resolve_tol(dtype: torch.dtype | str | None, tol: float | None, out: torch.Tensor) -> tuple[float, str]:
    key = out.dtype if dtype is None else dtype
    label = key if isinstance(key, str) else str(key).replace("torch.", "")
    if tol is not None:
        return float(tol), label
    if key not in TOLERANCES:
        known = ", ".join(k if isinstance(k, str) else str(k).replace("torch.", "") for k in TOLERANCES)
        raise ValueError(f"no default tolerance for dtype {label!r} (known: {known}); pass tol=")
    return TOLERANCES[key], label


def _fmt_index(flat: int, shape: Sequence[int]) -> str:
    if len(shape) == 0:
        return "()"
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return "(" + ", ".join(str(i) for i in reversed(idx)) + ("," if len(shape) == 1 else "") + ")"


@dataclass
class _Comparison:
    shape: tuple[int, ...]
    abs_err: torch.Tensor  # flat, float64; inf where out is wrong in a non-finite way
    out: torch.Tensor  # flat float64
    ref: torch.Tensor  # flat float64
    bad_nonfinite: int  # non-finite out where ref is finite, or special values that differ
    out_nonfinite: int  # all non-finite elements of out

    def relative_error(self) -> float:
        """Over the elements where the reference is finite; NaN if anything non-finite is wrong."""
        if self.bad_nonfinite:
            return math.nan
        finite = torch.isfinite(self.ref)
        return relative_error(self.out[finite], self.ref[finite])

    @property
    def max_abs(self) -> float:
        return self.abs_err.max().item() if self.abs_err.numel() else 0.0

    def worst_lines(self, n: int = _WORST_SHOWN) -> list[str]:
        if self.abs_err.numel() == 0:
            return []
        k = min(n, self.abs_err.numel())
        vals, idxs = torch.topk(self.abs_err, k)
        lines = []
        for v, i in zip(vals.tolist(), idxs.tolist(), strict=True):
            if v == 0.0:
                break
            lines.append(
                f"    at {_fmt_index(i, self.shape)}: out {self.out[i].item():.8g} vs ref "
                f"{self.ref[i].item():.8g} (abs err {v:.3g})"
            )
        return lines

    def max_line(self) -> str:
        if self.abs_err.numel() == 0:
            return "  max abs error 0 (empty tensor)"
        i = int(torch.argmax(self.abs_err).item())
        return f"  max abs error {self.max_abs:.3g} at index {_fmt_index(i, self.shape)}"


def _compare(out: torch.Tensor, ref: torch.Tensor) -> _Comparison:
    o = _as_cpu_f64(out).reshape(-1)
    r = _as_cpu_f64(ref).reshape(-1)
    ref_finite = torch.isfinite(r)
    out_finite = torch.isfinite(o)
    # Where the reference itself is ±inf or NaN (e.g. the LSE of a fully masked row), the output
    # must hold the same special value; everywhere else a non-finite output is always wrong.
    same_special = ~ref_finite & ((torch.isnan(o) & torch.isnan(r)) | (o == r))
    wrong_special = (~ref_finite & ~same_special) | (ref_finite & ~out_finite)
    abs_err = torch.where(ref_finite & out_finite, (o - r).abs(), torch.zeros_like(o))
    abs_err = torch.where(wrong_special, torch.full_like(o, math.inf), abs_err)
    return _Comparison(
        shape=tuple(out.shape),
        abs_err=abs_err,
        out=o,
        ref=r,
        bad_nonfinite=int(wrong_special.sum().item()),
        out_nonfinite=int((~out_finite).sum().item()),
    )


def _header(name: str, out: torch.Tensor) -> str:
    return f"{name} mismatch: shape {tuple(out.shape)}, dtype {str(out.dtype).replace('torch.', '')}"


def _check_shapes(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(
            f"{name} shape mismatch: output shape {tuple(out.shape)} vs reference shape {tuple(ref.shape)}"
        )


def _nonfinite_line(cmp: _Comparison) -> str:
    return (
        f"  non-finite elements in output: {cmp.out_nonfinite} "
        f"({cmp.bad_nonfinite} where the reference differs; NaN/Inf never passes)"
    )


def _fail(lines: list[str], cmp: _Comparison) -> None:
    """Raise the mismatch report: the given lines, then the largest error and the worst elements."""
    lines += [cmp.max_line(), _nonfinite_line(cmp)]
    worst = cmp.worst_lines()
    if worst:
        lines.append("  worst elements:")
        lines.extend(worst)
    raise AssertionError("\n".join(lines))


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    *,
    dtype: torch.dtype | str | None = None,
    tol: float | None = None,
    name: str = "output",
) -> None:
    """Assert ‖out − ref‖/‖ref‖ ≤ tol, with ``ref`` ideally computed in float64.

    ``dtype`` picks the threshold from :data:`TOLERANCES` (default ``out.dtype``; pass ``"tf32"``
    for tf32 dots); ``tol`` overrides it. NaN/Inf in ``out`` where ``ref`` is finite always fails.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: out must be a torch.Tensor, got {type(out).__name__}")
    ref = ref if isinstance(ref, torch.Tensor) else torch.as_tensor(ref)
    _check_shapes(out, ref, name)
    threshold, label = _resolve_tol(dtype, tol, out)
    cmp = _compare(out, ref)
    rel = cmp.relative_error()
    if cmp.bad_nonfinite == 0 and rel <= threshold:
        return
    lines = [
        _header(name, out),
        f"  relative error {rel:.3e} vs threshold {threshold:.1e} ({label}, against a float64 reference)",
    ]
    _fail(lines, cmp)


def assert_close_flash(
    out: torch.Tensor,
    ref: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 1e-5,
    name: str = "output",
) -> None:
    """The flash-attention rule: maxabs(out − ref) ≤ factor · maxabs(baseline − ref) + atol.

    ``ref`` is the float64 reference, ``baseline`` the same computation in plain PyTorch in the
    kernel's dtype. NaN/Inf in ``out`` where ``ref`` is finite always fails.
    """
    ref = ref if isinstance(ref, torch.Tensor) else torch.as_tensor(ref)
    _check_shapes(out, ref, name)
    _check_shapes(baseline, ref, f"{name} baseline")
    base_cmp = _compare(baseline, ref)
    if base_cmp.bad_nonfinite:
        raise AssertionError(
            f"{name}: the baseline has {base_cmp.bad_nonfinite} non-finite elements where the reference is "
            "finite, so it cannot bound the error (fix the baseline computation)"
        )
    cmp = _compare(out, ref)
    err, base_err = cmp.max_abs, base_cmp.max_abs
    bound = factor * base_err + atol
    if cmp.bad_nonfinite == 0 and err <= bound:
        return
    rel = cmp.relative_error()
    lines = [
        _header(name, out),
        f"  max abs error {err:.3e} > bound {bound:.3e} = {factor:g} x baseline error {base_err:.3e} "
        f"+ atol {atol:.1e}",
        f"  relative error {rel:.3e} (baseline {base_cmp.relative_error():.3e})",
    ]
    _fail(lines, cmp)


# --------------------------------------------------------------------------------------------------
# poisoning


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` in place with NaN (floating/complex) or its dtype's minimum (integers)."""
    with torch.no_grad():
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.fill_(math.nan)
        elif tensor.dtype == torch.bool:
            raise TypeError("poison_: bool tensors have no sentinel value")
        else:
            tensor.fill_(torch.iinfo(tensor.dtype).min)
    return tensor


def empty_poisoned(
    shape: int | Sequence[int], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)`` filled by :func:`poison_`."""
    return poison_(torch.empty(shape, dtype=dtype, device=device))


# --------------------------------------------------------------------------------------------------
# ptxas report parsing (shared by the Triton and the nvcc paths)


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one function."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int  # static shared memory


_FN_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")


def _parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Parse ``ptxas -v`` output into one record per entry function (and non-inlined callee)."""
    found: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            found.setdefault(current, {})
        elif m := _FN_PROPS.search(line):
            current = m.group(1)
            found.setdefault(current, {})
        if current is None:
            continue
        rec = found[current]
        if m := _STACK.search(line):
            rec["stack_frame"], rec["spill_stores"], rec["spill_loads"] = (int(g) for g in m.groups())
        if m := _USED.search(line):
            rec["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                rec["shared_bytes"] = int(s.group(1))
    return {
        name: KernelResources(
            name=name,
            registers=rec.get("registers", 0),
            spill_stores=rec.get("spill_stores", 0),
            spill_loads=rec.get("spill_loads", 0),
            stack_frame=rec.get("stack_frame", 0),
            shared_bytes=rec.get("shared_bytes", 0),
        )
        for name, rec in found.items()
    }


# --------------------------------------------------------------------------------------------------
# Triton ahead-of-time compile for sm_90a


@dataclass(frozen=True)
class CompileReport:
    """A Triton kernel compiled for sm_90a plus what ptxas says about it."""

    name: str
    ptx: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int  # Triton's dynamic shared memory + static shared memory reported by ptxas
    ptxas_log: str
    config: str = ""  # constexprs and launch options, for failure messages

    @property
    def has_wgmma(self) -> bool:
        return "wgmma" in self.ptx


def ptxas_path() -> str:
    """The ptxas shipped in the triton wheel."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.is_file():
        raise FileNotFoundError(f"ptxas not found at {path}; the installed triton wheel should ship it")
    return str(path)


_compile_lock = threading.Lock()


def _unwrap_python_function(kernel: Any) -> types.FunctionType:
    # Peel InterpretedFunction / JITFunction / Autotuner / Heuristics wrappers down to the def.
    obj = kernel
    for _ in range(16):
        if isinstance(obj, types.FunctionType):
            return obj
        obj = getattr(obj, "fn", None)
    raise TypeError(f"compile_for_sm90: {kernel!r} is not a @triton.jit kernel or a Python function")


@contextmanager
def _compiled_mode_functions(root: Any) -> Iterator[Any]:
    """Yield a JITFunction for ``root`` with interpreted helpers temporarily replaced.

    Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` function, including triton's own standard
    library (``tl.sum``, ``tl.cdiv``, ...) and the kernel's helpers, is an InterpretedFunction, which
    the compiler's code generator rejects. While compiling, those names are swapped for
    JITFunctions in the namespaces the kernel can reach: triton.language's modules, the kernel's
    module globals (recursively through helpers) and the modules those globals name.
    """
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every triton >= 3.0 has it
        InterpretedFunction = ()  # type: ignore[assignment]  # noqa: N806

    inner = root
    while not isinstance(inner, (JITFunction, InterpretedFunction, types.FunctionType)):
        inner = getattr(inner, "fn", None)
        if inner is None:
            raise TypeError(f"compile_for_sm90: {root!r} is not a @triton.jit kernel or a Python function")
    if isinstance(inner, JITFunction):
        yield inner
        return

    converted: dict[int, Any] = {}
    undo: list[tuple[dict[str, Any], str, Any]] = []
    scanned: dict[int, bool] = {}  # namespace id -> whether its modules were followed

    def convert(interp: Any) -> Any:
        jf = converted.get(id(interp))
        if jf is None:
            jf = JITFunction(interp.fn, **getattr(interp, "kwargs", {}))
            converted[id(interp)] = jf
            scan(interp.fn.__globals__, follow_modules=True)
        return jf

    def scan(namespace: dict[str, Any], follow_modules: bool) -> None:
        if scanned.get(id(namespace), False) or (id(namespace) in scanned and not follow_modules):
            return
        scanned[id(namespace)] = follow_modules
        for key, val in list(namespace.items()):
            if isinstance(val, InterpretedFunction):
                undo.append((namespace, key, val))
                namespace[key] = convert(val)
            elif follow_modules and isinstance(val, types.ModuleType):
                scan(vars(val), follow_modules=False)

    try:
        for mod_name, mod in list(sys.modules.items()):
            if mod is not None and (mod_name == "triton.language" or mod_name.startswith("triton.language.")):
                scan(vars(mod), follow_modules=False)
        if isinstance(inner, InterpretedFunction):
            fn, jit_fn = inner.fn, JITFunction(inner.fn, **inner.kwargs)
        else:
            fn, jit_fn = inner, JITFunction(inner)
        scan(fn.__globals__, follow_modules=True)
        yield jit_fn
    finally:
        for namespace, key, val in reversed(undo):
            namespace[key] = val


def _made_by_interpreter(val: Any) -> bool:
    func = val.func if isinstance(val, functools.partial) else val
    return (isinstance(func, types.FunctionType) and func.__module__ == "triton.runtime.interpreter") or (
        val is print
    )


def _repair_interpreter_leaks() -> None:
    """Undo interpreter patches that triton 3.6 leaves behind on ``triton.language.core``.

    ``InterpretedFunction.__call__`` (a jit helper called from an interpreted kernel, including
    triton's own ``tl.cdiv``/``tl.sum``/``tl.zeros``...) patches the language modules visible from
    the helper and never restores them; the kernel-level launch only restores the modules visible
    from the kernel (``tl``), so ``tl.core`` keeps interpreter builtins and later compiles fail
    with "'ir.value' object has no attribute ...". The interpreter re-patches at every launch,
    so putting the pristine objects back is safe.
    """
    import triton.language as tl

    def pristine(name: str, val: Any) -> Any:
        while isinstance(val, types.FunctionType) and "_patch_attr" in val.__qualname__:
            val = (val.__kwdefaults__ or {}).get("member")
        if val is not None and not _made_by_interpreter(val):
            return val
        for other in (tl, tl.core, tl.math):
            cand = vars(other).get(name)
            if cand is not None and not _made_by_interpreter(cand):
                return cand
        return None

    for owner in (tl.core, tl, tl.math, tl.core.tensor, tl.core.dtype, tl.core.tensor_descriptor_base):
        for name, val in list(vars(owner).items()):
            if name.startswith("__") and not isinstance(owner, type):
                continue
            if isinstance(val, property) and _made_by_interpreter(val.fget):
                val = val.fget
            if not _made_by_interpreter(val):
                continue
            orig = pristine(name, val)
            if orig is None:
                where = f"{getattr(owner, '__name__', owner)}.{name}"
                raise RuntimeError(
                    f"cannot undo the Triton interpreter's patch of {where}; "
                    "run compile checks in a fresh process"
                )
            setattr(owner, name, orig)


def _run_ptxas(ptx: str, arch: str) -> str:
    with tempfile.TemporaryDirectory(prefix="glm5v_ptxas_") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [ptxas_path(), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed (exit {proc.returncode}): {' '.join(cmd)}\n{log}")
    return log


def aligned_int_values(signature: dict[str, str], value: int = 4096, **overrides: int) -> dict[str, int]:
    """Example integer arguments of an aligned launch, for ``compile_for_sm90(int_values=...)``:
    every ``i32`` / ``i64`` of ``signature`` set to ``value`` (a multiple of 16), except
    ``overrides`` (e.g. a unit stride, 1, or a head-group size)."""
    values = {name: value for name, kind in signature.items() if kind in ("i32", "i64")}
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"aligned_int_values: {sorted(unknown)} are not integer arguments of the signature")
    return {**values, **overrides}


def compile_for_sm90(
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any] | None = None,
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    arch: str = "sm_90a",
    aligned_pointers: bool = True,
    int_values: dict[str, int] | None = None,
) -> CompileReport:
    """Compile a ``@triton.jit`` kernel for an H100 (``GPUTarget("cuda", 90, 32)``) without a GPU.

    ``signature`` maps every argument name to its Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); names in ``constexprs`` missing from it are added as ``"constexpr"``.
    ``aligned_pointers`` marks pointer arguments 16-byte aligned, as the runtime does for the
    usual torch allocations, so the generated code matches what a launch would compile.
    ``int_values``: example values of integer arguments, specialised as a launch with them would
    be: 1 becomes the constant 1, a multiple of 16 is marked divisible by 16. A launch with
    contiguous, 16-aligned shapes compiles that variant (vectorised, pipelined loads); without
    int_values the integers are generic (the variant odd shapes compile).

    Works with the interpreter on (the test suite) and off: under the interpreter, the kernel's
    ``@triton.jit`` helpers and triton's standard library are swapped for compiled-mode
    JITFunctions for the duration of the compile. The kernel must be defined in a file.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    constexprs = dict(constexprs or {})
    sig = dict(signature)
    int_values = dict(int_values or {})
    for name, value in int_values.items():
        if sig.get(name) not in ("i32", "i64"):
            raise ValueError(f"int_values: {name!r} is not an integer argument of the signature")
        if value == 1:
            sig[name] = "constexpr"
            constexprs[name] = 1
    for key in constexprs:
        sig.setdefault(key, "constexpr")
    fn = _unwrap_python_function(kernel)
    arg_names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    missing = [a for a in arg_names if a not in sig]
    unknown = [a for a in sig if a not in arg_names]
    if missing or unknown:
        raise ValueError(
            f"compile_for_sm90({fn.__name__}): signature must name every argument {arg_names}; "
            f"missing {missing}, unknown {unknown}"
        )
    divisible = {a for a, value in int_values.items() if value % 16 == 0}
    if aligned_pointers:
        divisible |= {a for a in arg_names if sig[a].startswith("*")}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(arg_names) if a in divisible}
    options = {"num_warps": num_warps, "num_stages": num_stages}
    config = ", ".join([f"{k}={v}" for k, v in constexprs.items()] + [f"{k}={v}" for k, v in options.items()])

    with _compile_lock, triton.knobs.runtime.scope():
        # Compiling with the interpreter on fails deep in codegen ("'ir.value' object has no
        # attribute 'data'"); switch it off for this scope only.
        triton.knobs.runtime.interpret = False
        _repair_interpreter_leaks()
        with _compiled_mode_functions(kernel) as jit_fn:
            src = triton.compiler.ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

    ptx = compiled.asm["ptx"]
    log = _run_ptxas(ptx, arch)
    resources = _parse_ptxas_log(log)
    kernel_name = compiled.metadata.name if hasattr(compiled.metadata, "name") else fn.__name__
    res = resources.get(kernel_name) or next(iter(resources.values()), None)
    if res is None:
        raise RuntimeError(f"could not parse the ptxas report for {fn.__name__}:\n{log}")
    return CompileReport(
        name=fn.__name__,
        ptx=ptx,
        registers=res.registers,
        spill_stores=res.spill_stores,
        spill_loads=res.spill_loads,
        stack_frame=res.stack_frame,
        shared_bytes=int(compiled.metadata.shared) + res.shared_bytes,
        ptxas_log=log,
        config=config,
    )


# --------------------------------------------------------------------------------------------------
# nvcc compile for sm_90a


@dataclass(frozen=True)
class CudaCompileReport:
    """A ``.cu`` file compiled by nvcc to a cubin, with ptxas's per-function resources."""

    source: str  # the file path, or "<string>"
    arch: str
    kernels: dict[str, KernelResources] = field(default_factory=dict)
    log: str = ""

    @property
    def spill_stores(self) -> int:
        return sum(k.spill_stores for k in self.kernels.values())

    @property
    def spill_loads(self) -> int:
        return sum(k.spill_loads for k in self.kernels.values())


def nvcc_path() -> str | None:
    """Path of nvcc, or None when it is not installed."""
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = [
        Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)
    ]
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


class CudaCompileError(RuntimeError):
    """nvcc rejected a source; the message holds nvcc's output."""


def compile_cuda_for_sm90(
    path_or_source: str | os.PathLike[str],
    *,
    arch: str = "sm_90a",
    extra_flags: Sequence[str] = (),
) -> CudaCompileReport:
    """Compile a ``.cu`` file (or CUDA source text) to a cubin for ``arch`` with ``-Xptxas -v``.

    A ``str`` naming an existing file, or any ``os.PathLike``, is a path; other strings are source.
    Raises :class:`CudaCompileError` carrying nvcc's output when compilation fails.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH or in /usr/local/cuda/bin")
    text = os.fspath(path_or_source)
    is_path = isinstance(path_or_source, os.PathLike) or (
        "\n" not in text and len(text) < 4096 and (text.endswith((".cu", ".cuh")) or Path(text).is_file())
    )
    with tempfile.TemporaryDirectory(prefix="glm5v_nvcc_") as tmp:
        if is_path:
            src = Path(path_or_source).resolve()
            if not src.is_file():
                raise FileNotFoundError(f"no such CUDA source file: {src}")
            label = str(path_or_source)
        else:
            src = Path(tmp) / "source.cu"
            src.write_text(str(path_or_source))
            label = "<string>"
        cmd = [
            nvcc, f"-arch={arch}", "-cubin", "-std=c++17", "-Xptxas", "-v",
            "-I", str(src.parent), *extra_flags, "-o", str(Path(tmp) / "out.cubin"), str(src),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise CudaCompileError(f"nvcc failed to compile {label} for {arch} (exit {proc.returncode}):\n{log}")
    return CudaCompileReport(source=label, arch=arch, kernels=_parse_ptxas_log(log), log=log)


# --------------------------------------------------------------------------------------------------
# checks


def _resource_problems(prefix: str, resources, max_shared: int) -> list[str]:
    """Spills and shared memory over the limit, for a kernel's ptxas resources."""
    problems = []
    if resources.spill_stores or resources.spill_loads:
        problems.append(f"{prefix}register spills: {resources.spill_stores} bytes stores / {resources.spill_loads} "
                        f"bytes loads ({resources.registers} registers, {resources.stack_frame} bytes stack frame)")
    if resources.shared_bytes > max_shared:
        problems.append(f"{prefix}shared memory {resources.shared_bytes} bytes > limit {max_shared} bytes")
    return problems


def assert_compiles_clean(
    report: CompileReport | CudaCompileReport,
    *,
    max_shared: int = 227 * 1024,
    expect_wgmma: bool = False,
) -> None:
    """Fail with a readable message on register spills, shared memory over ``max_shared`` or
    (Triton reports only) missing wgmma instructions when ``expect_wgmma``."""
    problems: list[str] = []
    if isinstance(report, CudaCompileReport):
        if expect_wgmma:
            raise TypeError("expect_wgmma needs PTX; it is only checked for Triton CompileReports")
        title = f"{report.source} ({report.arch})"
        if not report.kernels:
            problems.append("ptxas reported no functions (is anything __global__ defined?)")
        for k in report.kernels.values():
            problems += _resource_problems(f"{k.name}: ", k, max_shared)
        log = report.log
    else:
        title = f"{report.name}[{report.config}]" if report.config else report.name
        problems += _resource_problems("", report, max_shared)
        if expect_wgmma and not report.has_wgmma:
            problems.append(
                "no wgmma instruction in the PTX (the dots did not lower to Hopper tensor-core MMA)"
            )
        log = report.ptxas_log
    if problems:
        raise AssertionError(
            f"{title} does not compile clean for sm_90:\n  - "
            + "\n  - ".join(problems)
            + f"\nptxas log:\n{log}"
        )
