"""Newton–Schulz (5 steps) for Muon: `glm5v_kernels.newton_schulz` (symmetric Triton Gram kernel)
against the plain-torch reference in the same dtype, that reference under torch.compile, and
torch.optim.Muon's step on one matrix.

`glm5v` measures, on its first call per shape, one step of the symmetric kernels against plain
batched matmuls and takes the faster; `glm5v-symmetric-only` forces the kernels, and the
`path` / `step_seconds_*` fields of `glm5v`'s rows record that measurement: the crossover.

FLOPs are counted as 5·(4m²n + 2m³) for m ≤ n (the full products); the symmetric kernels skip up
to a third of them: `theoretical_symmetric_speedup` = (4m²n + 2m³) / (3m²n + m³) is recorded
beside each result, and the summary's "of ideal speedup" column gives the fraction of it reached
over the torch reference (both of our rows count as ours; the target is on `glm5v`). Targets, recorded
on a GPU: >= 1.35x over the torch reference at 4096² and 8192², never slower at any size. On a
CPU only a small case runs, on the torch path (the CPU path is the reference, so it is timed
against itself; bf16 products on these CPUs are ~60x slower than fp32).
"""

from __future__ import annotations

import pytest
import torch
from benchlib import cuda_synchronized, providers, record

from glm5v_kernels import newton_schulz
from glm5v_kernels.ops.muon import force_path, path_choices, reference
from glm5v_kernels.ops.muon.triton import sym_gram_autotuned

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
STEPS = 5

SHAPES = {
    # small sizes: where a kernel launch dominates and batched torch matmuls may win (the crossover)
    "128x128": (128, 128),
    "256x256": (256, 256),
    "512x512": (512, 512),
    "1024x1024": (1024, 1024),
    "4096x4096": (4096, 4096),
    "4096x11008": (4096, 11008),
    "8192x8192": (8192, 8192),
    "64x512x512": (64, 512, 512),
}
CPU_SHAPES = {"256x384": (256, 384)}
TARGETS = {"4096x4096": 1.35, "8192x8192": 1.35}


def ns_flops(shape) -> tuple[int, float]:
    """(FLOPs of 5 full-product steps, theoretical symmetric speedup)."""
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    count = 1
    for b in batch:
        count *= b
    full, symmetric = 4 * m * m * n + 2 * m**3, 3 * m * m * n + m**3
    return STEPS * full * count, full / symmetric


def make_fn(provider: str, G: torch.Tensor):
    if provider == "glm5v":
        return lambda: newton_schulz(G, steps=STEPS, dtype=DTYPE)
    if provider == "glm5v-symmetric-only":
        def symmetric():
            with force_path("symmetric"):
                return newton_schulz(G, steps=STEPS, dtype=DTYPE)
        return symmetric
    if provider == "torch-reference":
        return lambda: reference.newton_schulz(G, steps=STEPS, dtype=DTYPE)
    if provider == "torch-compile":
        compiled = torch.compile(reference.newton_schulz)
        return lambda: compiled(G, steps=STEPS, dtype=DTYPE)
    if provider == "torch-optim-muon":
        if G.ndim != 2:
            pytest.skip("torch.optim.Muon takes 2-D parameters only")
        param = torch.nn.Parameter(torch.zeros_like(G))
        optimizer = torch.optim.Muon([param], lr=0.02, ns_steps=STEPS)

        def step():
            param.grad = G
            optimizer.step()
        return step
    raise ValueError(provider)


@pytest.mark.parametrize("shape_name", list(SHAPES) if ON_GPU else list(CPU_SHAPES))
@pytest.mark.parametrize("provider", providers("glm5v", "glm5v-symmetric-only", "torch-reference", "torch-compile",
                                               "torch-optim-muon",
                                               gpu_only=("glm5v-symmetric-only", "torch-compile", "torch-optim-muon")))
def test_newton_schulz(benchmark, provider, shape_name):
    shape = (SHAPES if ON_GPU else CPU_SHAPES)[shape_name]
    G = torch.randn(*shape, device=DEVICE)
    fn = make_fn(provider, G)
    if provider.startswith("glm5v"):  # same function as the reference, to the iteration dtype's precision
        expected = reference.newton_schulz(G, steps=STEPS, dtype=torch.float32)
        error = torch.linalg.vector_norm(fn().float() - expected) / torch.linalg.vector_norm(expected)
        assert error < (3e-2 if DTYPE == torch.bfloat16 else 1e-4), error
    benchmark(cuda_synchronized(fn))
    flops, symmetric_speedup = ns_flops(shape)
    ours = provider.startswith("glm5v")
    record(benchmark, group=f"muon-ns/{shape_name}/{str(DTYPE).removeprefix('torch.')}", provider=provider,
           ours=ours, flops=flops, dtype=DTYPE, theoretical_symmetric_speedup=symmetric_speedup,
           ideal=("torch-reference", symmetric_speedup) if ours and ON_GPU else None,
           backend="triton" if ON_GPU else "torch (CPU: the reference path)",
           target_ratio=TARGETS.get(shape_name) if provider == "glm5v" else None,
           **(measured_choice(G) if provider == "glm5v" and ON_GPU else {}))


def measured_choice(G: torch.Tensor) -> dict:
    """The path newton_schulz measured and took for G, with one step's time on each path: the
    crossover between the symmetric kernels and plain matmuls, as measured on this GPU."""
    *batch, rows, cols = G.shape
    count = 1
    for b in batch:
        count *= b
    m, n = min(rows, cols), max(rows, cols)
    choice = path_choices()[(str(G.device), (count, m, n), DTYPE)]
    # the autotuner's cache key starts with (M, K, HAS_C): the Gram product (m, n) and the polynomial (m, m)
    tiles = {("gram" if key[1] == n and not key[2] else "polynomial"): str(config)
             for key, config in sym_gram_autotuned.cache.items() if key[0] == m and key[1] in (m, n)}
    return {"path": choice.path, **{f"step_seconds_{path}": s for path, s in choice.seconds.items()},
            "autotuned_tiles": tiles}


def cogvit_l_parameters(device) -> list[torch.nn.Parameter]:
    """The Muon-side matrices of 24 CogViT-L blocks (width 1024, MLP 4096, SiLU-gated)."""
    shapes = [(3 * 1024, 1024), (1024, 1024), (2 * 4096, 1024), (1024, 4096)] * 24
    return [torch.nn.Parameter(torch.randn(*shape, device=device) * 0.02) for shape in shapes]


@pytest.mark.parametrize("provider", providers("glm5v-muon", "torch-optim-muon", gpu_only=("glm5v-muon",
                                                                                          "torch-optim-muon")))
def test_optimizer_step_cogvit_l(benchmark, provider):
    from glm5v_kernels.optim import Muon

    params = cogvit_l_parameters(DEVICE)
    for p in params:
        p.grad = torch.randn_like(p)
    if provider == "glm5v-muon":
        optimizer = Muon([{"params": params, "use_muon": True}], lr=0.02, ns_dtype=torch.bfloat16)
    else:
        optimizer = torch.optim.Muon(params, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    benchmark(cuda_synchronized(optimizer.step))
    flops = sum(ns_flops(tuple(p.shape))[0] for p in params)
    record(benchmark, group="muon-step/cogvit-l-24-blocks/bf16", provider=provider, ours=provider == "glm5v-muon",
           flops=flops, dtype=torch.bfloat16, parameters=sum(p.numel() for p in params))
