"""`glm5v demo`: the whole recipe on the embedded photos with the tiny models, in a few minutes on
a laptop CPU, and `glm5v experiment mmtp-variants`: the three MMTP visual-input designs of the
paper's Figure 2 trained side by side.

The demo packs the photos (NaFlex, C++ host kernel), then runs stage 1 (multi-teacher masked
distillation), stage 2 (NaFlex SigLIP, started from stage 1's student) and SFT of the VLM with
MMTP (its ViT started from stage 2), and writes a summary table (first and last loss, tokens per
second, peak memory and which kernel path ran) next to each stage's log and loss plot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from glm5v._checks import check_ints
from glm5v.data.embedded import load_photos
from glm5v.train.contrastive import SigLIPConfig, train_siglip
from glm5v.train.loop import latest_checkpoint, plot_losses
from glm5v.train.mim import MIMConfig, train_mim
from glm5v.train.sft import SFTConfig, train_sft
from glm5v_kernels.data import NaFlexProcessor, pack_images

VISUAL_INPUTS = ("embedding", "mask", "placeholder")


@dataclass(frozen=True)
class DemoConfig:
    """out: folder of every stage's run; *_steps: optimizer steps per stage (smoke: 2 each, for CI);
    seed: weights and data of every stage; progress: progress bars; device: "cpu", "cuda" or None."""

    out: str = "runs/demo"
    mim_steps: int = 120
    siglip_steps: int = 120
    sft_steps: int = 200
    seed: int = 0
    progress: bool = True
    device: str | None = None

    def __post_init__(self):
        check_ints(self, ("mim_steps", "siglip_steps", "sft_steps"))

    @classmethod
    def smoke(cls, **overrides) -> DemoConfig:
        return dataclasses.replace(cls(mim_steps=2, siglip_steps=2, sft_steps=2), **overrides)


@dataclass
class StageSummary:
    """One row of the demo's table. tokens_per_second: ViT patches for the CogViT stages, LLM
    tokens for SFT; peak_memory_bytes: peak CUDA memory allocated, or the process's peak resident
    memory over the stage on CPU (peak_memory_kind says which)."""

    stage: str
    steps: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    peak_memory_kind: str
    kernel_path: str
    log: str | None = None
    plot: str | None = None


def kernel_path(device: torch.device) -> str:
    """What runs the fused ops for tensors on `device` (glm5v_kernels' default dispatch)."""
    return "Triton kernels (CUDA)" if device.type == "cuda" else "PyTorch reference (CPU)"


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory over the block: CUDA bytes allocated, or on Linux the process's resident set
    (its high-water mark reset at the start through /proc/self/clear_refs)."""
    found = {"bytes": 0, "kind": ""}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield found
        found.update(bytes=torch.cuda.max_memory_allocated(device), kind="CUDA allocated")
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    yield found
    found.update(bytes=_status_bytes("VmHWM") or 0, kind="process resident (CPU)")


def _log_tokens(log: Path | None) -> int:
    if log is None or not Path(log).exists():
        return 0
    return sum(int(json.loads(line).get("tokens", 0)) for line in Path(log).read_text().splitlines())


def _run_stage(name: str, device: torch.device, run: Callable[[], object]) -> tuple[object, StageSummary]:
    with peak_memory(device) as peak:
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
    losses = list(result.losses)
    tokens = getattr(result, "tokens_per_second", None)
    if tokens is None:
        tokens = _log_tokens(result.log) / seconds
    summary = StageSummary(name, len(losses), losses[0] if losses else None, losses[-1] if losses else None, seconds,
                           tokens, peak["bytes"], peak["kind"], kernel_path(device),
                           str(result.log) if result.log else None, str(result.plot) if result.plot else None)
    return result, summary


def pack_photos(device: torch.device) -> StageSummary:
    """NaFlex-pack the embedded photos once (the data pipeline's C++ host kernel)."""
    photos = load_photos()
    processor = NaFlexProcessor(patch_size=14, merge_size=2, max_num_patches=256)
    with peak_memory(torch.device("cpu")) as peak:
        start = time.perf_counter()
        packed = pack_images([p.image for p in photos], processor)
        seconds = time.perf_counter() - start
    return StageSummary(f"pack {packed.num_images} photos", 1, None, None, seconds, packed.patches.shape[0] / seconds,
                        peak["bytes"], peak["kind"], "C++ host kernel (CPU)")


def run_demo(config: DemoConfig = DemoConfig()) -> list[StageSummary]:
    """Run the recipe end to end; writes out/<stage>/ runs and out/summary.{json,md}."""
    out = Path(config.out)
    shared = dict(seed=config.seed, progress=config.progress, device=config.device)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = [pack_photos(device)]
    _, row = _run_stage("stage 1: masked distillation", device, lambda: train_mim(
        MIMConfig(steps=config.mim_steps, out=str(out / "cogvit-mim"), checkpoint_every=0, **shared)))
    rows.append(row)
    _, row = _run_stage("stage 2: NaFlex SigLIP", device, lambda: train_siglip(
        SigLIPConfig(steps=config.siglip_steps, out=str(out / "cogvit-siglip"), checkpoint_every=0,
                     init=str(latest_checkpoint(out / "cogvit-mim")), **shared)))
    rows.append(row)
    _, row = _run_stage("SFT with MMTP", device, lambda: train_sft(
        SFTConfig(steps=config.sft_steps, out=str(out / "sft"), checkpoint_every=0,
                  vit_init=str(latest_checkpoint(out / "cogvit-siglip")), **shared)))
    rows.append(row)
    write_summary(rows, out)
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary_table(rows: list[StageSummary]) -> str:
    """The rows as a markdown table."""
    lines = ["| stage | steps | first loss | last loss | tokens/s | peak memory | kernel path | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        memory = f"{r.peak_memory_bytes / 2**20:.0f} MiB" if r.peak_memory_bytes else "-"
        lines.append(f"| {r.stage} | {r.steps} | {_cell(r.first_loss, '.4f')} | {_cell(r.last_loss, '.4f')} | "
                     f"{r.tokens_per_second:,.0f} | {memory} | {r.kernel_path} | {r.seconds:.1f} s |")
    return "\n".join(lines)


def write_summary(rows: list[StageSummary], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    (out / "summary.md").write_text(summary_table(rows) + "\n")


# -- glm5v experiment mmtp-variants --------------------------------------------------------------------


@dataclass(frozen=True)
class MMTPVariantsConfig:
    """The tiny VLM trained with each MMTP visual input ("embedding", "mask", "placeholder") for the
    same steps, seed and data; out: the runs, the table and the plot."""

    out: str = "runs/mmtp-variants"
    steps: int = 60
    num_mtp_depths: int = 2
    seed: int = 0
    progress: bool = True
    device: str | None = None


@dataclass
class VariantResult:
    """visual_input's per-step main and MTP losses (the MTP loss: mean over the depths)."""

    visual_input: str
    main_losses: list[float]
    mtp_losses: list[float]

    def tail(self, values: list[float], n: int = 10) -> float:
        tail = values[-n:]
        return sum(tail) / len(tail)


def run_mmtp_variants(config: MMTPVariantsConfig = MMTPVariantsConfig()) -> list[VariantResult]:
    """Train one run per visual input; write out/variants.md (mean of the last 10 steps' losses)
    and out/variants.png (main and MTP losses against the step)."""
    out = Path(config.out)
    results = []
    for visual_input in VISUAL_INPUTS:
        result = train_sft(SFTConfig(steps=config.steps, num_mtp_depths=config.num_mtp_depths,
                                     visual_input=visual_input, seed=config.seed, out=str(out / visual_input),
                                     checkpoint_every=0, progress=config.progress, device=config.device))
        results.append(VariantResult(visual_input, list(result.main_losses),
                                     [sum(depths) / len(depths) for depths in result.mtp_losses]))
    lines = ["| visual input | main loss (last 10 steps) | MTP loss (last 10 steps) | main loss (first step) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r.visual_input} | {r.tail(r.main_losses):.4f} | {r.tail(r.mtp_losses):.4f} | "
              f"{r.main_losses[0]:.4f} |" for r in results]
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    records = [{"step": step, **{f"{r.visual_input} main_loss": r.main_losses[step] for r in results},
                **{f"{r.visual_input} mtp_loss": r.mtp_losses[step] for r in results}}
               for step in range(config.steps)]
    plot_losses(records, out / "variants.png", f"MMTP visual inputs, {config.steps} steps")
    return results
