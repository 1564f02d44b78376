"""Varlen attention with per-head RMS QK-norm and rotary: `glm5v_kernels.varlen_attention` (norm and
rotary fused into the attention kernel, plan built once per batch) against the pipelines people
run instead, each of them doing the norm and rotary in torch first:

- "unfused":     F.rms_norm over the head dim + rotary in torch + SDPA called per sequence in a loop;
- "sdpa_padded": the same norm + rotary, then a padded batch through SDPA with a padding mask;
- "flex":        the same norm + rotary, then compiled FlexAttention with a document mask;
- "flash_attn":  the same norm + rotary, then flash-attn 2's `flash_attn_varlen_func` (where installed).

Shapes: NaFlex packs (64 images of 256–1024 tokens, fixed seed; 8 images of 4096 tokens) at
H=16, D=64 (CogViT-L) and H=16, D=80, non-causal, 2D rotary over each image's (row, col) patch
grid (rot_dim = D); an LLM pack (causal, documents of 512–8192 tokens, fixed seed, ~32k tokens) at
Hq=32, Hkv=8, D=128 with 1D rotary. Modes: forward, and forward + backward (gradients of q, k, v
and both norm weights). A raw-attention group (no norm, no rotary) sets ours against
flash-attn 2 varlen alone.

FLOPs count attention only: 4·H·D·Σ Lᵢ² for the forward (halved when causal), backward 2.5× the
forward (norm and rotary FLOPs are not counted). Every provider's forward output is checked
against the float reference (`glm5v_kernels.ops.attention.reference`) before it is timed.

Targets (from the attention issue), recorded on a GPU, printed never asserted: forward + backward
>= 1.3x faster than the best unfused pipeline; raw attention >= 0.9x of flash-attn 2 varlen.

On a machine without CUDA only a small case runs (8 images of 64–196 tokens, H=4, D=64, fp32), and
`varlen_attention` on CPU tensors runs the torch reference (forced, never the Triton interpreter):
the numbers there compare the reference path with the torch pipelines, not the kernel. A small
fp32 check on CPU (`test_peer_pipelines_match_reference_on_cpu`, every machine) keeps the peers'
padding, document masks, GQA and rotary honest against the reference.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from benchlib import attention_flops, cuda_synchronized, providers, record

from glm5v_kernels import rotary_1d, rotary_2d, varlen_attention, varlen_plan
from glm5v_kernels._backend import use_backend
from glm5v_kernels.ops.attention import reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
NORM_EPS = 1e-6
MODES = ("fwd", "fwd+bwd")
FUSED_PROVIDERS = ("glm5v", "unfused", "sdpa_padded", "flex", "flash_attn")
RAW_PROVIDERS = ("glm5v", "flash_attn")
FUSED_TARGET = 1.3  # fwd+bwd, ours vs the best unfused pipeline
RAW_TARGET = 0.9  # raw attention, ours vs flash-attn 2 varlen
FUSED_TARGET_TEXT = "fwd+bwd >= 1.3x faster than the best unfused pipeline (torch norm + rotary + attention)"
RAW_TARGET_TEXT = "raw attention (no norm, no rotary) >= 0.9x of flash-attn 2 varlen"
BACKEND_NOTE = ("triton kernel" if ON_GPU else
                "torch reference (CPU: varlen_attention on CPU tensors runs the reference path, not the kernel)")


# --------------------------------------------------------------------------------------------
# Packs: sequence lengths, cu_seqlens and rotary positions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pack:
    """A packed batch on the host.

    lengths: the B sequence lengths; cu_seqlens: (B + 1,) int32 boundaries; positions: (T, 2)
    (row, col) patch positions for images (2D rotary) or (T,) token positions for text (1D rotary).
    """

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    causal: bool

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)


@dataclass(frozen=True)
class Case:
    """A pack and the attention shape run over it: q (T, heads_q, head_dim), k and v (T, heads_kv, head_dim)."""

    pack: Pack
    heads_q: int
    heads_kv: int
    head_dim: int


def cu_seqlens_from_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """lengths (B,) -> cu_seqlens (B + 1,) int32, starting at 0."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + int(length))
    return torch.tensor(bounds, dtype=torch.int32)


def random_image_grids(num_images: int, min_tokens: int, max_tokens: int, seed: int) -> list[tuple[int, int]]:
    """(rows, cols) patch grids of `num_images` images of min_tokens..max_tokens patches each,
    aspect ratios between 1:2 and 2:1, drawn with a fixed seed."""
    rng = random.Random(seed)
    grids = []
    for _ in range(num_images):
        tokens = rng.randint(min_tokens, max_tokens)
        aspect = 2.0 ** rng.uniform(-1.0, 1.0)  # rows / cols
        rows = max(1, round((tokens * aspect) ** 0.5))
        cols = min(max(-(-min_tokens // rows), tokens // rows), max_tokens // rows)
        grids.append((rows, cols))
    return grids


def image_pack(grids: Sequence[tuple[int, int]]) -> Pack:
    """Pack images of the given (rows, cols) patch grids: one sequence per image, row-major patches,
    positions (T, 2) = each patch's (row, col), the layout `rotary_2d` takes."""
    positions = []
    for rows, cols in grids:
        row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        positions.append(torch.stack((row.reshape(-1), col.reshape(-1)), dim=1))
    lengths = tuple(rows * cols for rows, cols in grids)
    return Pack(lengths, cu_seqlens_from_lengths(lengths), torch.cat(positions), causal=False)


def random_document_lengths(target_tokens: int, min_len: int, max_len: int, seed: int) -> list[int]:
    """Document lengths in [min_len, max_len] drawn with a fixed seed until the next one would pass
    target_tokens; the remainder becomes a last document when it is at least min_len long."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while True:
        length = rng.randint(min_len, max_len)
        if sum(lengths) + length > target_tokens:
            break
        lengths.append(length)
    remainder = target_tokens - sum(lengths)
    if remainder >= min_len:
        lengths.append(remainder)
    return lengths


def text_pack(lengths: Sequence[int]) -> Pack:
    """Pack causal documents: positions (T,) restart at 0 in each document (1D rotary)."""
    positions = torch.cat([torch.arange(length) for length in lengths])
    return Pack(tuple(int(x) for x in lengths), cu_seqlens_from_lengths(lengths), positions, causal=True)


def rotary_tables(pack: Pack, rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, rot_dim // 2) float32: 2D rotary for image packs, 1D for text packs."""
    if pack.positions.ndim == 2:
        return rotary_2d(pack.positions, rot_dim)
    return rotary_1d(pack.positions, rot_dim)


def build_cases() -> dict[str, Case]:
    """The GPU cases, by the name used in the bench groups."""
    many_images = image_pack(random_image_grids(64, 256, 1024, seed=0))
    big_images = image_pack([(64, 64)] * 8)
    documents = text_pack(random_document_lengths(32 * 1024, 512, 8192, seed=0))
    return {
        "naflex-64img-256to1024/h16-d64": Case(many_images, 16, 16, 64),
        "naflex-64img-256to1024/h16-d80": Case(many_images, 16, 16, 80),
        "naflex-8img-4096/h16-d64": Case(big_images, 16, 16, 64),
        "naflex-8img-4096/h16-d80": Case(big_images, 16, 16, 80),
        "llm-docs-512to8192-32k-causal/hq32-hkv8-d128": Case(documents, 32, 8, 128),
    }


def build_cpu_cases() -> dict[str, Case]:
    """The one small case that runs on a machine without CUDA."""
    return {"cpu-8img-64to196/h4-d64": Case(image_pack(random_image_grids(8, 64, 196, seed=0)), 4, 4, 64)}


CASES = build_cases() if ON_GPU else build_cpu_cases()


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Tensors of one case on the bench device.

    q (T, Hq, D), k and v (T, Hkv, D), q_norm_weight and k_norm_weight (D,) in `dtype`;
    cos and sin (T, D // 2) float32 (ours) and cos_peer, sin_peer the same tables in `dtype` (for
    the torch pipelines); cu_seqlens (B + 1,) int32 on the device; grad_out (T, Hq, D).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_norm_weight: torch.Tensor
    k_norm_weight: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cos_peer: torch.Tensor
    sin_peer: torch.Tensor
    cu_seqlens: torch.Tensor
    grad_out: torch.Tensor

    def leaves(self, fused: bool) -> tuple[torch.Tensor, ...]:
        """The tensors gradients are taken with respect to."""
        if fused:
            return self.q, self.k, self.v, self.q_norm_weight, self.k_norm_weight
        return self.q, self.k, self.v


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, requires_grad: bool, seed: int = 0) -> Inputs:
    """Random inputs (fixed seed, so every provider of a group sees the same numbers)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    total, d = case.pack.total_tokens, case.head_dim

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=generator, device=device) * scale + shift
        return t.to(dtype).requires_grad_(requires_grad)

    q = randn(total, case.heads_q, d)
    k = randn(total, case.heads_kv, d)
    v = randn(total, case.heads_kv, d)
    q_norm_weight = randn(d, scale=0.1, shift=1.0)
    k_norm_weight = randn(d, scale=0.1, shift=1.0)
    cos, sin = (t.to(device) for t in rotary_tables(case.pack, d))
    grad_out = torch.randn(total, case.heads_q, d, generator=generator, device=device).to(dtype)
    return Inputs(q, k, v, q_norm_weight, k_norm_weight, cos, sin, cos.to(dtype), sin.to(dtype),
                  case.pack.cu_seqlens.to(device), grad_out)


# --------------------------------------------------------------------------------------------
# The torch pipelines (peers)
# --------------------------------------------------------------------------------------------


def torch_rms_norm_rotary(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) -> F.rms_norm over D with weight (D,), then rotate-half rotary on the first
    2·cos.shape[1] channels with cos, sin (T, rot_dim // 2) in x's dtype; the rest passes through."""
    x = F.rms_norm(x, (x.shape[-1],), weight, NORM_EPS)
    half = cos.shape[-1]
    first, second, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * c - second * s, second * c + first * s, rest), dim=-1)


def sdpa_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                      causal: bool) -> torch.Tensor:
    """q (T, Hq, D), k and v (T, Hkv, D) -> (T, Hq, D): SDPA on each sequence in a python loop
    (host-side lengths, no device sync)."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        out = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                             vs.transpose(0, 1)[None], is_causal=causal, enable_gqa=gqa)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


@dataclass(frozen=True)
class PaddedLayout:
    """Where each packed token lands in a (B, max_len) padded batch.

    token_slots: (T,) int64 flat index b·max_len + position; attn_mask: bool, (B, 1, 1, max_len)
    (key is a real token) or, causal, (B, 1, max_len, max_len) (real key at or before the query).
    Padded query rows always see at least one real key, so no row is fully masked.
    """

    batch: int
    max_len: int
    token_slots: torch.Tensor
    attn_mask: torch.Tensor


def padded_layout(lengths: Sequence[int], causal: bool, device: torch.device) -> PaddedLayout:
    batch, max_len = len(lengths), max(lengths)
    slots = torch.cat([b * max_len + torch.arange(length) for b, length in enumerate(lengths)])
    key_is_real = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, max_len)
    mask = key_is_real[:, None, None, :]
    if causal:
        mask = mask & torch.ones(max_len, max_len, dtype=torch.bool).tril()
    return PaddedLayout(batch, max_len, slots.to(device), mask.to(device))


def sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:
    """q (T, Hq, D), k and v (T, Hkv, D) -> (T, Hq, D): pad to (B, H, max_len, D), one masked SDPA
    call (k and v repeated to Hq heads: the memory-efficient kernel takes a mask but not GQA), unpad."""
    group = q.shape[1] // k.shape[1]

    def pad(x: torch.Tensor) -> torch.Tensor:
        flat = x.new_zeros(layout.batch * layout.max_len, *x.shape[1:]).index_copy(0, layout.token_slots, x)
        return flat.view(layout.batch, layout.max_len, *x.shape[1:]).transpose(1, 2)

    keys, values = pad(k), pad(v)
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(pad(q), keys, values, attn_mask=layout.attn_mask)
    return out.transpose(1, 2).reshape(layout.batch * layout.max_len, *q.shape[1:]).index_select(0, layout.token_slots)


def flex_document_mask(lengths: Sequence[int], causal: bool, device: torch.device):
    """FlexAttention BlockMask over the packed sequence: a query sees the keys of its own document
    (and, causal, only those at or before it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)

    def same_document(batch, head, q_idx, kv_idx):
        return document[q_idx] == document[kv_idx]

    def same_document_causal(batch, head, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    total = int(sum(lengths))
    return create_block_mask(same_document_causal if causal else same_document, None, None, total, total,
                             device=device, _compile=device.type == "cuda")


def flex_packed(flex_fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """q (T, Hq, D), k and v (T, Hkv, D) -> (T, Hq, D) through flex_fn over one (1, H, T, D) batch."""
    out = flex_fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask,
                  enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def compiled_flex_attention() -> Callable:
    """torch.compile(flex_attention) with room for one compiled graph per case and mode (dynamo's
    default recompile limit of 8 would drop later cases back to the unfused eager path)."""
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(flex_attention, dynamic=False)


def import_flash_attn():
    """flash_attn (flash-attention 2), or a skip saying why it is not there."""
    try:
        import flash_attn
    except Exception as exc:  # ImportError, or a broken CUDA build
        pytest.skip(f"flash_attn is not importable here ({type(exc).__name__}: {exc})")
    return flash_attn


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


def make_forward(provider: str, case: Case, inputs: Inputs, fused: bool) -> tuple[Callable[[], torch.Tensor], dict]:
    """The forward of `provider` as a closure returning out (T, Hq, D), built with everything a
    trainer would prepare once per batch outside it (plan, padding layout, block mask, tables);
    and the extra_info entries that describe the provider."""
    pack = case.pack
    q, k, v = inputs.q, inputs.k, inputs.v

    if provider == "glm5v":
        plan = varlen_plan(pack.cu_seqlens, pack.max_seqlen, device=DEVICE)
        norm_rotary = dict(qk_norm="rms", q_norm_weight=inputs.q_norm_weight, k_norm_weight=inputs.k_norm_weight,
                           norm_eps=NORM_EPS, rotary_cos=inputs.cos, rotary_sin=inputs.sin) if fused else {}

        def glm5v_forward() -> torch.Tensor:
            with use_backend("triton" if ON_GPU else "torch"):  # never the Triton interpreter here
                return varlen_attention(q, k, v, plan.cu_seqlens, pack.max_seqlen, causal=pack.causal, plan=plan,
                                        **norm_rotary)
        return glm5v_forward, {"backend": BACKEND_NOTE}

    def prepare() -> tuple[torch.Tensor, torch.Tensor]:
        """Norm + rotary of q and k in torch (fused groups), or q and k as they are (raw group)."""
        if not fused:
            return q, k
        return (torch_rms_norm_rotary(q, inputs.q_norm_weight, inputs.cos_peer, inputs.sin_peer),
                torch_rms_norm_rotary(k, inputs.k_norm_weight, inputs.cos_peer, inputs.sin_peer))

    info = {"norm_rotary": "torch (F.rms_norm + rotate-half rotary, in the input dtype)" if fused else None}
    if provider == "unfused":
        def unfused_forward() -> torch.Tensor:
            qn, kn = prepare()
            return sdpa_per_sequence(qn, kn, v, pack.lengths, pack.causal)
        return unfused_forward, {**info, "attention": "F.scaled_dot_product_attention per sequence (python loop)"}

    if provider == "sdpa_padded":
        layout = padded_layout(pack.lengths, pack.causal, DEVICE)

        def padded_forward() -> torch.Tensor:
            qn, kn = prepare()
            return sdpa_padded(qn, kn, v, layout)
        return padded_forward, {**info, "attention": "F.scaled_dot_product_attention on a padded batch + mask",
                                "padded_tokens": layout.batch * layout.max_len}

    if provider == "flex":
        block_mask = flex_document_mask(pack.lengths, pack.causal, DEVICE)
        flex_fn = compiled_flex_attention()

        def flex_forward() -> torch.Tensor:
            qn, kn = prepare()
            return flex_packed(flex_fn, qn, kn, v, block_mask)
        return flex_forward, {**info, "attention": "torch.compile(flex_attention) with a document block mask"}

    if provider == "flash_attn":
        flash_attn = import_flash_attn()
        cu_seqlens = inputs.cu_seqlens

        def flash_forward() -> torch.Tensor:
            qn, kn = prepare()
            return flash_attn.flash_attn_varlen_func(qn, kn, v, cu_seqlens, cu_seqlens, pack.max_seqlen,
                                                     pack.max_seqlen, causal=pack.causal)
        return flash_forward, {**info, "attention": "flash_attn.flash_attn_varlen_func",
                               "flash_attn_version": getattr(flash_attn, "__version__", None)}

    raise ValueError(f"unknown provider {provider!r}")


def timed_step(forward: Callable[[], torch.Tensor], mode: str, inputs: Inputs, fused: bool) -> Callable[[], None]:
    """The function pytest-benchmark times: the forward, or the forward and the gradients of all
    leaves under inputs.grad_out (taken with autograd.grad, so nothing accumulates across rounds)."""
    if mode == "fwd":
        def forward_only() -> None:
            forward()
        return forward_only
    leaves = inputs.leaves(fused)

    def forward_backward() -> None:
        torch.autograd.grad(forward(), leaves, inputs.grad_out)
    return forward_backward


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """‖out − expected‖ / ‖expected‖ in float32."""
    out, expected = out.detach().float(), expected.detach().float()
    return float(torch.linalg.vector_norm(out - expected) / torch.linalg.vector_norm(expected))


def reference_output(case: Case, inputs: Inputs, fused: bool) -> torch.Tensor:
    """The float reference's out (T, Hq, D) for the same inputs (fp32 math, no autograd)."""
    extras = dict(qk_norm_kind="rms", q_norm_weight=inputs.q_norm_weight.detach(),
                  k_norm_weight=inputs.k_norm_weight.detach(), norm_eps=NORM_EPS, rotary_cos=inputs.cos,
                  rotary_sin=inputs.sin) if fused else {}
    with torch.no_grad():
        out, _ = reference.varlen_attention(inputs.q.detach(), inputs.k.detach(), inputs.v.detach(), inputs.cu_seqlens,
                                            causal=case.pack.causal, **extras)
    return out


def tolerance(dtype: torch.dtype) -> float:
    """Relative-error bound of a provider's output against the reference (norm and rotary in dtype)."""
    return 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def run_bench(benchmark, provider: str, case_name: str, mode: str, fused: bool) -> None:
    case = CASES[case_name]
    inputs = make_inputs(case, DTYPE, DEVICE, requires_grad=mode == "fwd+bwd")
    forward, provider_info = make_forward(provider, case, inputs, fused)
    step = timed_step(forward, mode, inputs, fused)

    # Warm up (compiles, autotunes) and check the output, outside the timed rounds; a peer that
    # cannot run the case (unsupported head dim, out of memory) skips with its error.
    failure = None
    try:
        with torch.no_grad():
            out = forward()
        step()
    except Exception as exc:
        if provider == "glm5v":
            raise
        failure = f"{provider} cannot run {case_name} ({mode}): {type(exc).__name__}: {str(exc)[:300]}"
    if failure is not None:  # skipped outside the except block, so the failed call's tensors are freed
        if ON_GPU:
            torch.cuda.empty_cache()
        pytest.skip(failure)
    error = relative_error(out, reference_output(case, inputs, fused))
    assert error <= tolerance(DTYPE), f"{provider} disagrees with the reference: relative error {error:.3g}"
    del out

    baseline_memory = None
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        baseline_memory = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    benchmark(cuda_synchronized(step))
    peak_memory = torch.cuda.max_memory_allocated() if ON_GPU else None

    pack = case.pack
    flops = attention_flops(pack.lengths, case.heads_q, case.head_dim, causal=pack.causal)
    if mode == "fwd+bwd":
        flops += attention_flops(pack.lengths, case.heads_q, case.head_dim, causal=pack.causal, backward=True)
    ours = provider == "glm5v"
    if fused:
        group = f"attention/{case_name}/{mode}/{str(DTYPE).removeprefix('torch.')}"
        target_ratio = FUSED_TARGET if ours and mode == "fwd+bwd" and ON_GPU else None
        target_text = FUSED_TARGET_TEXT if mode == "fwd+bwd" else None
    else:
        group = f"attention-raw/{case_name}/{mode}/{str(DTYPE).removeprefix('torch.')}"
        target_ratio = RAW_TARGET if ours else None
        target_text = RAW_TARGET_TEXT
    extra = dict(
        dtype=DTYPE, mode=mode, sequences=len(pack.lengths), max_seqlen=pack.max_seqlen,
        heads_q=case.heads_q, heads_kv=case.heads_kv, head_dim=case.head_dim, causal=pack.causal,
        qk_norm="rms" if fused else None,
        rotary=("2d" if pack.positions.ndim == 2 else "1d") if fused else None,
        flops_counted="attention only: 4*H*D*sum(L^2) fwd (halved causal), bwd 2.5x fwd",
        output_relative_error=error, target=target_text, **provider_info,
    )
    if baseline_memory is not None:
        extra["memory_at_start_mib"] = round(baseline_memory / 2**20, 2)
        extra["peak_memory_above_start_mib"] = round((peak_memory - baseline_memory) / 2**20, 2)
    if not ON_GPU:
        extra["note"] = ("CPU machine: this times the torch reference path of varlen_attention against torch "
                         "pipelines on a small case; it says nothing about the Triton kernel")
    record(benchmark, group=group, provider=provider, ours=ours, flops=flops, items=pack.total_tokens,
           item_name="tokens", peak_memory=peak_memory, target_ratio=target_ratio, **extra)


# --------------------------------------------------------------------------------------------
# Benches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("provider", providers(*FUSED_PROVIDERS, gpu_only=("flex", "flash_attn")))
def test_varlen_attention_qk_norm_rotary(benchmark, provider, case_name, mode):
    """Norm + rotary + attention: ours fused against the torch pipelines."""
    run_bench(benchmark, provider, case_name, mode, fused=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("provider", providers(*RAW_PROVIDERS, gpu_only=RAW_PROVIDERS))
def test_varlen_attention_raw(benchmark, provider, case_name, mode):
    """Attention alone (no norm, no rotary): ours against flash-attn 2 varlen."""
    run_bench(benchmark, provider, case_name, mode, fused=False)


# A small check, on CPU in fp32 on every machine, that the peers' masks, padding and GQA handling
# compute the same function as the reference (the GPU shapes are only checked where a GPU runs).
AGREEMENT_CASES = {
    "images-2d-rotary": Case(image_pack([(3, 5), (1, 1), (8, 7), (4, 16)]), 4, 4, 32),
    "documents-causal-gqa-1d-rotary": Case(text_pack([17, 1, 63, 40]), 4, 2, 32),
}


@pytest.mark.parametrize("case_name", list(AGREEMENT_CASES))
@pytest.mark.parametrize("provider", ["unfused", "sdpa_padded", "flex"])
def test_peer_pipelines_match_reference_on_cpu(provider, case_name):
    case = AGREEMENT_CASES[case_name]
    pack = case.pack
    inputs = make_inputs(case, torch.float32, torch.device("cpu"), requires_grad=False)
    qn = torch_rms_norm_rotary(inputs.q, inputs.q_norm_weight, inputs.cos_peer, inputs.sin_peer)
    kn = torch_rms_norm_rotary(inputs.k, inputs.k_norm_weight, inputs.cos_peer, inputs.sin_peer)
    if provider == "unfused":
        out = sdpa_per_sequence(qn, kn, inputs.v, pack.lengths, pack.causal)
    elif provider == "sdpa_padded":
        out = sdpa_padded(qn, kn, inputs.v, padded_layout(pack.lengths, pack.causal, torch.device("cpu")))
    else:
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = flex_document_mask(pack.lengths, pack.causal, torch.device("cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # eager flex on CPU warns that it is unfused
            out = flex_packed(flex_attention, qn, kn, inputs.v, block_mask)
    error = relative_error(out, reference_output(case, inputs, fused=True))
    assert error < 1e-5, f"{provider} on {case_name}: relative error {error:.3g} against the reference"
