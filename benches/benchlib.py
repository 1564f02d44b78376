"""Shared bench infrastructure for ``benches/bench_<family>.py`` (pytest-benchmark).

Bench files import the helpers by module name::

    from benchlib import cuda_synchronized, matmul_flops, providers, record

and ``benches/conftest.py`` imports the pytest hooks defined at the bottom of this module, so the
results that :func:`record` collects turn into the ratio in the JSON output and the summary table
printed at the end of ``pytest benches``.

What a bench does::

    @pytest.mark.parametrize("provider", providers("glm5v", "torch-eager", gpu_only=("glm5v",)))
    def test_thing(benchmark, provider):
        fn = cuda_synchronized(make_fn(provider))   # the timed function must synchronize
        benchmark(fn)
        record(benchmark, group="thing/4096/bf16", provider=provider, ours=provider == "glm5v",
               flops=matmul_flops(4096, 4096, 4096), dtype=torch.bfloat16, target_ratio=1.2)

Targets are printed (met / not met), never asserted: a speed target lives in the recorded result.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import pytest
import torch

__all__ = [
    "DEVICE_PEAKS",
    "check_cpu_extra_memory",
    "DevicePeak",
    "Result",
    "attention_flops",
    "cuda_synchronized",
    "device_name",
    "device_peak",
    "format_time",
    "matmul_flops",
    "providers",
    "record",
    "requires_cuda",
    "results",
    "tensor_bytes",
]


# --------------------------------------------------------------------------------------------
# Device peaks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePeak:
    """Vendor peak numbers of one device: dense tensor-core FLOP/s and memory bandwidth."""

    name: str
    bf16_flops: float
    fp16_flops: float
    tf32_flops: float
    fp32_flops: float
    mem_bandwidth: float  # bytes/s
    match: tuple[str, ...] = field(default=(), repr=False)  # substrings of the CUDA device name
    exclude: tuple[str, ...] = field(default=(), repr=False)  # other parts with other peaks

    def flops_for(self, dtype: Any = None) -> tuple[float, str]:
        """The FLOP/s peak that applies to matrix products in ``dtype`` and its label.

        ``dtype`` is a ``torch.dtype`` or a string ("bf16", "fp16", "tf32", "fp32"); ``None`` means
        bf16 (the training dtype). fp32 counts as tf32 when torch allows tf32 matmuls.
        """
        key = _dtype_key(dtype)
        if key == "fp16":
            return self.fp16_flops, "fp16"
        if key == "tf32":
            return self.tf32_flops, "tf32"
        if key == "fp32":
            if torch.backends.cuda.matmul.allow_tf32:
                return self.tf32_flops, "tf32"
            return self.fp32_flops, "fp32"
        return self.bf16_flops, "bf16"


def _dtype_key(dtype: Any) -> str:
    if dtype is None:
        return "bf16"
    text = str(dtype).lower().replace("torch.", "")
    if text in ("float16", "half", "fp16"):
        return "fp16"
    if text in ("tf32", "tensorfloat32"):
        return "tf32"
    if text in ("float32", "float", "fp32"):
        return "fp32"
    return "bf16"


DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    # "NVIDIA H200" (SXM). The NVL part and GH200 have other peaks: unknown here.
    DevicePeak(
        "H200", 989.4e12, 989.4e12, 494.7e12, 66.9e12, 4.8e12, match=("H200",), exclude=("NVL", "GH200")
    ),
    # "NVIDIA H100 80GB HBM3" (SXM). PCIe and NVL parts have lower clocks: unknown here.
    DevicePeak(
        "H100 SXM", 989.4e12, 989.4e12, 494.7e12, 66.9e12, 3.35e12, match=("H100",), exclude=("PCIE", "NVL")
    ),
    # "NVIDIA A100-SXM4-80GB" / "A100-SXM4-40GB".
    DevicePeak("A100 SXM", 312e12, 312e12, 156e12, 19.5e12, 2.039e12, match=("A100",), exclude=("PCIE",)),
)


def device_name() -> str | None:
    """Name of the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def device_peak(name: str | None = None) -> DevicePeak | None:
    """Peaks of the current CUDA device (or of the device called ``name``).

    None on a CPU-only machine and for devices not in :data:`DEVICE_PEAKS`.
    """
    if name is None:
        name = device_name()
        if name is None:
            return None
    upper = name.upper()
    for peak in DEVICE_PEAKS:
        if any(m.upper() in upper for m in peak.match) and not any(x.upper() in upper for x in peak.exclude):
            return peak
    return None


# --------------------------------------------------------------------------------------------
# FLOP and byte counts
# --------------------------------------------------------------------------------------------


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an ``[m, k] @ [k, n]`` product (one multiply and one add per term)."""
    return 2 * int(m) * int(n) * int(k)


def attention_flops(
    seqlens: int | Sequence[int] | torch.Tensor,
    num_heads: int,
    head_dim: int,
    causal: bool = False,
    backward: bool = False,
) -> float:
    """FLOPs of attention over packed sequences of lengths ``seqlens``.

    Forward: ``4 · H · D · Σ Lᵢ²`` (QKᵀ and PV), halved when ``causal``. With ``backward=True``
    the count of the backward pass alone, taken as 2.5× the forward (the FlashAttention
    convention); a forward + backward bench records ``fwd + bwd``.
    Lengths, not ``cu_seqlens``: pass ``cu_seqlens.diff()``.
    """
    if isinstance(seqlens, torch.Tensor):
        lengths = [int(x) for x in seqlens.reshape(-1).tolist()]
    elif isinstance(seqlens, numbers.Integral):
        lengths = [int(seqlens)]
    else:
        lengths = [int(x) for x in seqlens]
    if any(length < 0 for length in lengths):
        raise ValueError(f"seqlens must be non-negative lengths, got {lengths}")
    flops = 4.0 * num_heads * head_dim * sum(length * length for length in lengths)
    if causal:
        flops /= 2.0
    if backward:
        flops *= 2.5
    return flops


def tensor_bytes(*tensors: Any) -> int:
    """Total storage of the given tensors in bytes (nested lists/tuples/dicts allowed, None skipped)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            total += tensor_bytes(*t.values())
        elif isinstance(t, (list, tuple)):
            total += tensor_bytes(*t)
        elif hasattr(t, "nbytes"):  # numpy arrays
            total += int(t.nbytes)
        else:
            raise TypeError(f"tensor_bytes: expected tensors (or lists of them), got {type(t).__name__}")
    return total


# --------------------------------------------------------------------------------------------
# Timing helpers and providers
# --------------------------------------------------------------------------------------------


def cuda_synchronized(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so it waits for the GPU to finish before returning (a no-op wrapper on CPU).

    pytest-benchmark times the host call; without the synchronize a CUDA bench times the launch.
    """
    if not torch.cuda.is_available():
        return fn

    @functools.wraps(fn)
    def synchronized(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return synchronized


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none is present on this machine)"
)


def providers(*names: str, gpu_only: Iterable[str] = ()) -> list[Any]:
    """``pytest.param`` list for ``@pytest.mark.parametrize("provider", providers(...))``.

    Each provider's id is its name. Providers in ``gpu_only`` carry the ``gpu`` marker and skip
    with a reason on machines without CUDA, so the CPU providers of the same bench still run.
    """
    if not names:
        raise ValueError("providers: give at least one provider name")
    if len(set(names)) != len(names):
        raise ValueError(f"providers: duplicate provider names in {names}")
    gpu = set(gpu_only)
    unknown = gpu - set(names)
    if unknown:
        raise ValueError(f"providers: gpu_only names {sorted(unknown)} are not among the providers {names}")
    params = []
    for name in names:
        marks = (requires_cuda, pytest.mark.gpu) if name in gpu else ()
        params.append(pytest.param(name, id=name, marks=marks))
    return params


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


class Result(NamedTuple):
    """One recorded bench: what the summary table and the JSON ratio are computed from."""

    group: str
    provider: str
    ours: bool
    median: float | None  # seconds; None when timing was disabled
    items_per_s: float | None
    target_ratio: float | None
    fullname: str | None = None
    ideal: tuple[str, float] | None = None  # (baseline provider, the speedup over it in theory)


# Session-level list of results, filled by record() and reset at the start of each session.
results: list[Result] = []


def _median_seconds(benchmark: Any) -> float | None:
    meta = getattr(benchmark, "stats", None)
    if meta is None:  # --benchmark-disable, or benchmark() was not called
        return None
    stats = getattr(meta, "stats", meta)
    try:
        median = float(stats.median)
    except Exception:  # no rounds recorded
        return None
    if not math.isfinite(median) or median <= 0:
        return None
    return median


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Size):
        return list(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def record(
    benchmark: Any,
    *,
    group: str,
    provider: str,
    ours: bool,
    flops: float | None = None,
    bytes_moved: float | None = None,
    items: float | None = None,
    item_name: str = "items",
    peak_memory: int | None = None,
    target_ratio: float | None = None,
    ideal: tuple[str, float] | None = None,
    **extra: Any,
) -> Result:
    """Record one provider's run; call right after ``benchmark(fn)``.

    Fills ``benchmark.extra_info`` with the provider, FLOPs, bytes, achieved TFLOP/s and GB/s,
    % of the device peak (when the device is known; pass ``dtype=`` to pick the FLOP/s peak,
    default bf16), ``<item_name>_per_s``, peak memory (``torch.cuda.max_memory_allocated()`` on
    CUDA when ``peak_memory`` is not given; conftest resets the peak before each bench), the
    target and any ``extra`` keys, and appends a :class:`Result` to :data:`results`. ``ideal``:
    (baseline provider of the same group, the speedup over it that the method allows in theory);
    the summary then reports the fraction of that speedup reached. Under ``--benchmark-disable``
    nothing timing-related is recorded.
    """
    if target_ratio is not None and not target_ratio > 0:
        raise ValueError(f"record: target_ratio must be positive, got {target_ratio}")
    provider = str(provider)
    benchmark.group = group
    meta = getattr(benchmark, "stats", None)
    if meta is not None:  # the stats were created with the group the fixture had then
        meta.group = group

    info = benchmark.extra_info
    info["group"] = group
    info["provider"] = provider
    info["ours"] = bool(ours)
    if flops is not None:
        info["flops"] = float(flops)
    if bytes_moved is not None:
        info["bytes"] = float(bytes_moved)
    if items is not None:
        info[item_name] = _jsonable(items)
    if target_ratio is not None and ours:
        info["target_ratio"] = float(target_ratio)

    if peak_memory is None and torch.cuda.is_available():
        peak_memory = torch.cuda.max_memory_allocated()
    if peak_memory is not None:
        info["peak_memory_bytes"] = int(peak_memory)
        info["peak_memory_mib"] = round(peak_memory / 2**20, 2)

    dtype = extra.get("dtype")
    for key, value in extra.items():
        info[key] = _jsonable(value)

    median = _median_seconds(benchmark)
    items_per_s = None
    if median is not None:
        info["median_s"] = median
        peak = device_peak()
        if peak is not None:
            info["device_peak"] = peak.name
        if flops is not None:
            achieved = flops / median
            info["tflops"] = round(achieved / 1e12, 4)
            if peak is not None:
                peak_flops, basis = peak.flops_for(dtype)
                info["pct_peak_flops"] = round(100.0 * achieved / peak_flops, 2)
                info["peak_flops_basis"] = basis
        if bytes_moved is not None:
            achieved_bw = bytes_moved / median
            info["gbps"] = round(achieved_bw / 1e9, 3)
            if peak is not None:
                info["pct_peak_bandwidth"] = round(100.0 * achieved_bw / peak.mem_bandwidth, 2)
        if items is not None:
            items_per_s = float(items) / median
            info[f"{item_name}_per_s"] = round(items_per_s, 3)

    result = Result(
        group=group,
        provider=provider,
        ours=bool(ours),
        median=median,
        items_per_s=items_per_s,
        target_ratio=None if target_ratio is None else float(target_ratio),
        fullname=getattr(benchmark, "fullname", None),
        ideal=None if ideal is None else (str(ideal[0]), float(ideal[1])),
    )
    results.append(result)
    return result


# --------------------------------------------------------------------------------------------
# Ratios and the summary
# --------------------------------------------------------------------------------------------


class Comparison(NamedTuple):
    group: str
    ours: Result
    best_peer: Result | None
    ratio: float | None  # best peer median / our median: > 1 means ours is faster
    target_met: bool | None
    ideal_fraction: float | None = None  # speedup over ours.ideal's baseline / the ideal speedup


def compare(rows: Iterable[Result] | None = None) -> list[Comparison]:
    """One comparison per timed "ours" result, in the order the groups were first recorded."""
    rows = list(results if rows is None else rows)
    groups: dict[str, list[Result]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    out = []
    for group, members in groups.items():
        peers = [r for r in members if not r.ours and r.median is not None]
        best = min(peers, key=lambda r: r.median) if peers else None
        for r in members:
            if not r.ours or r.median is None:
                continue
            ratio = best.median / r.median if best is not None else None
            met = None
            if r.target_ratio is not None and ratio is not None:
                met = ratio >= r.target_ratio
            out.append(Comparison(group, r, best, ratio, met, _ideal_fraction(r, members)))
    return out


def _ideal_fraction(ours: Result, members: list[Result]) -> float | None:
    if ours.ideal is None:
        return None
    baseline, ideal = ours.ideal
    timed = [r.median for r in members if r.provider == baseline and r.median is not None]
    return timed[0] / ours.median / ideal if timed else None


def format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return [line.rstrip() for line in lines]


def summary_lines(rows: Iterable[Result] | None = None) -> list[str]:
    rows = list(results if rows is None else rows)
    if not rows:
        return []
    if all(r.median is None for r in rows):
        return [f"{len(rows)} benches recorded without timings (benchmarking disabled)"]
    table = []
    for c in compare(rows):
        if c.ours.target_ratio is None:
            target = "-"
        elif c.target_met is None:
            target = f">= {c.ours.target_ratio:g}x (no peer timed)"
        else:
            target = f">= {c.ours.target_ratio:g}x {'met' if c.target_met else 'NOT MET'}"
        table.append(
            [
                c.group,
                c.ours.provider,
                format_time(c.ours.median),
                c.best_peer.provider if c.best_peer else "-",
                format_time(c.best_peer.median) if c.best_peer else "-",
                f"{c.ratio:.2f}x" if c.ratio is not None else "-",
                target,
                "-" if c.ideal_fraction is None else f"{100 * c.ideal_fraction:.0f}% vs {c.ours.ideal[0]}",
            ]
        )
    if not table:
        return ["no timed 'ours' provider to compare (peers only, or ours skipped)"]
    header = ["group", "ours", "median", "best peer", "peer median", "speedup", "target", "of ideal speedup"]
    return _table(header, table)


# --------------------------------------------------------------------------------------------
# pytest hooks (imported by benches/conftest.py)
# --------------------------------------------------------------------------------------------


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, time
    import torch

    exec(sys.argv[1])  # defines make(*sizes) -> inputs and fn(*inputs) -> scalar loss

    def status_bytes(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    inputs = make(*json.loads(sys.argv[3]))  # first use of every operator (thread pools, kernels), small
    fn(*inputs).backward()
    inputs = make(*json.loads(sys.argv[2]))
    # VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across fork + exec);
    # writing 5 to clear_refs resets it to the current RSS, the baseline.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = status_bytes("VmRSS")
    start = time.perf_counter()
    loss = fn(*inputs)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    grads = [float(t.grad.norm()) for t in inputs if isinstance(t, torch.Tensor) and t.grad is not None]
    print(json.dumps({"extra_bytes": peak - baseline, "seconds": seconds, "loss": loss.item(), "grads": grads}))
""")


def measure_cpu_extra_memory(setup: str, sizes: Sequence[int], warmup_sizes: Sequence[int]) -> dict:
    """Peak RSS (VmHWM) above the RSS once the inputs exist, for one forward + backward, in a fresh Python
    on the CPU path (no backend or interpreter overrides). `setup` defines make(*sizes) -> inputs
    and fn(*inputs) -> scalar loss. Returns extra_bytes, seconds, loss and the inputs' grad norms."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLM5V_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, setup, json.dumps(list(sizes)),
                           json.dumps(list(warmup_sizes))], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_cpu_extra_memory(benchmark: Any, *, group: str, make: str, ours: str, naive: str, sizes: Sequence[int],
                           warmup_sizes: Sequence[int], target: float, flops: float) -> None:
    """Extra peak memory of our CPU path vs the naive one, each in its own subprocess (see
    `measure_cpu_extra_memory`; `make` defines make(), `ours` / `naive` define fn()): records both,
    asserts they agree on the loss and gradients and that ours uses at most `target` x naive's."""
    naive_run = measure_cpu_extra_memory(make + "\n" + naive, sizes, warmup_sizes)
    ours_run = benchmark.pedantic(measure_cpu_extra_memory, args=(make + "\n" + ours, sizes, warmup_sizes), rounds=1,
                                  iterations=1)
    ratio = ours_run["extra_bytes"] / naive_run["extra_bytes"]
    record(benchmark, group=group, provider="glm5v", ours=True, peak_memory=ours_run["extra_bytes"], flops=flops,
           dtype=torch.float32, extra_peak_memory_mib=round(ours_run["extra_bytes"] / 2**20, 1),
           naive_extra_peak_memory_mib=round(naive_run["extra_bytes"] / 2**20, 1),
           memory_ratio_to_naive=round(ratio, 4), memory_target=target,
           fwd_bwd_seconds=round(ours_run["seconds"], 2), naive_fwd_bwd_seconds=round(naive_run["seconds"], 2),
           backend="torch (CPU: the chunked reference path)")
    assert abs(ours_run["loss"] - naive_run["loss"]) <= 1e-5 * abs(naive_run["loss"]), (ours_run, naive_run)
    for got, expected in zip(ours_run["grads"], naive_run["grads"], strict=True):
        assert abs(got - expected) <= 1e-4 * abs(expected), (ours_run, naive_run)
    assert ratio <= target, (
        f"extra peak memory {ours_run['extra_bytes'] / 2**20:.0f} MiB is {ratio:.1%} of naive's "
        f"{naive_run['extra_bytes'] / 2**20:.0f} MiB (target <= {target:.0%})")


def pytest_sessionstart(session: Any) -> None:
    results.clear()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: Any, machine_info: dict) -> None:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    name = device_name()
    if name is not None:
        info["gpu"] = name
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
        peak = device_peak(name)
        info["device_peak"] = (
            None if peak is None else {k: v for k, v in asdict(peak).items() if k not in ("match", "exclude")}
        )
    machine_info["glm5v"] = info


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config: Any, benchmarks: Any, output_json: dict) -> None:
    by_fullname = {c.ours.fullname: c for c in compare() if c.ours.fullname}
    for bench in output_json.get("benchmarks", []):
        comparison = by_fullname.get(bench.get("fullname"))
        if comparison is None:
            continue
        extra = bench.setdefault("extra_info", {})
        if comparison.best_peer is not None:
            extra["best_peer"] = comparison.best_peer.provider
            extra["best_peer_median_s"] = comparison.best_peer.median
        if comparison.ratio is not None:
            extra["ratio_to_best_peer"] = round(comparison.ratio, 4)
        if comparison.target_met is not None:
            extra["target_met"] = comparison.target_met
        if comparison.ideal_fraction is not None:
            extra["fraction_of_ideal_speedup"] = round(comparison.ideal_fraction, 4)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    lines = summary_lines()
    if not lines:
        return
    terminalreporter.write_sep("=", "glm5v bench summary (speedup = best peer median / ours)")
    for line in lines:
        terminalreporter.write_line(line)
