"""Supervised fine-tuning of the VLM with MMTP on packed multimodal conversations.

`train_sft(SFTConfig(...)) -> SFTResult` is the whole stage, callable from Python; `glm5v train
sft` wraps it. One process by default; under torchrun (torch.distributed initialised before the
call) every transformer block and then the root are FSDP2-sharded over a 1-D mesh of all ranks.

A step: the global batch of `glm5v.data.sft` (its conversations drawn from `step_random(seed,
step)`, packed, packs spread over the ranks); each rank runs its packs as micro-batches,
accumulating gradients, with every loss term normalised by the global batch's trained-target
count over the ranks (so the rank-averaged gradient is the single-process gradient of the whole
batch's mean loss, whatever the split); then one Muon (+ AdamW) step under a cosine schedule
with warmup. The ViT gets the activation-memory policy (`vit_recompute`). Checkpoints hold model,
optimizer and step; `resume` continues the same trajectory exactly (loop.py's rule).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from glm5v._checks import check_ints
from glm5v.data.embedded import Sample, load_photos
from glm5v.data.sft import SFTData, SFTDataConfig
from glm5v.data.tokenizer import ByteTokenizer
from glm5v.models.cogvit import RECOMPUTE, CogViTBlock
from glm5v.models.llm import DecoderBlock
from glm5v.models.vlm import VLM, VLMConfig, vlm_tiny
from glm5v.parallel.fsdp import data_parallel_mesh, shard_blocks
from glm5v.train.loop import (
    RunLog,
    checkpoint_to_resume,
    cosine_with_warmup,
    load_checkpoint,
    muon_with_adamw,
    nvtx_range,
    save_checkpoint,
    set_lr,
    step_random,
    trajectory_settings,
)
from glm5v_kernels.data import TransformerDims

MODEL_CONFIGS: dict[str, Callable[..., VLMConfig]] = {"tiny": vlm_tiny}
# Settings that leave the trajectory of the steps already taken as it was: a resumed run may change
# them (--steps extends a run; the schedule then follows the new total).
RESUMABLE_CHANGES = frozenset({"steps", "out", "resume", "progress", "checkpoint_every", "device"})


@dataclass(frozen=True)
class SFTConfig:
    """model: VLM preset ("tiny": `vlm_tiny`); num_mtp_depths, visual_input, mtp_loss_weight: the
    MMTP head (VLMConfig's); steps: optimizer steps; data: the packed conversations of a step
    (`SFTDataConfig`); lr: Muon's learning rate (hidden matrices), adamw_lr: the AdamW groups'
    (embeddings, heads, norms, biases), both on `cosine_with_warmup(warmup_steps, min_lr_ratio)`;
    seed: initial weights and every per-step random stream; out: folder of the run log and the
    checkpoints; checkpoint_every: steps between checkpoints (0: only at the end); resume:
    continue from the latest checkpoint in out; vit_recompute: the ViT blocks' activation recompute
    ("none", "selective", "full"); vit_init: a checkpoint folder (or its model.safetensors) holding a
    CogViT (e.g. from `glm5v train cogvit-*`) to start the ViT from; progress: a progress bar;
    device: "cpu", "cuda" or None (cuda when available)."""

    model: str = "tiny"
    num_mtp_depths: int = 2
    visual_input: str = "placeholder"
    mtp_loss_weight: float = 0.1
    steps: int = 20
    data: SFTDataConfig = SFTDataConfig()
    lr: float = 0.02
    adamw_lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    seed: int = 0
    out: str = "runs/sft"
    checkpoint_every: int = 10
    resume: bool = False
    vit_recompute: str = "selective"
    vit_init: str | None = None
    progress: bool = True
    device: str | None = None

    def __post_init__(self):
        if self.model not in MODEL_CONFIGS:
            raise ValueError(f"model must be one of {sorted(MODEL_CONFIGS)}, got {self.model!r}")
        check_ints(self, ("steps",))
        check_ints(self, ("warmup_steps", "checkpoint_every", "seed"), minimum=0)
        if not isinstance(self.data, SFTDataConfig):
            raise TypeError(f"data must be an SFTDataConfig, got {type(self.data).__name__}")
        if not self.lr > 0 or not self.adamw_lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"lr and adamw_lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.adamw_lr}, "
                             f"{self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.vit_recompute not in RECOMPUTE:
            raise ValueError(f"vit_recompute must be one of {RECOMPUTE}, got {self.vit_recompute!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or None, got {self.device!r}")
        self.vlm_config()  # checks the MMTP settings

    def vlm_config(self) -> VLMConfig:
        return MODEL_CONFIGS[self.model](num_mtp_depths=self.num_mtp_depths, mtp_visual_input=self.visual_input,
                                         mtp_loss_weight=self.mtp_loss_weight)


@dataclass
class SFTResult:
    """Per step run by this call (steps start_step … config.steps − 1), global over the ranks:
    losses (the trained total), main_losses, mtp_losses (K per step, each depth's loss),
    mtp_accuracies (K per step, each depth's top-1 accuracy). tokens_per_second: LLM tokens of the
    global batches (image tokens included) per second of training, patches_per_second: ViT
    patches likewise; peak_memory_bytes: peak CUDA memory allocated on this rank's GPU, or the
    process's peak resident memory on a CPU run (peak_memory_kind says which). checkpoint: the
    last checkpoint; log, plot: the jsonl log and its PNG (rank 0; None elsewhere or without
    matplotlib)."""

    start_step: int
    losses: list[float] = field(default_factory=list)
    main_losses: list[float] = field(default_factory=list)
    mtp_losses: list[list[float]] = field(default_factory=list)
    mtp_accuracies: list[list[float]] = field(default_factory=list)
    tokens_per_second: float = 0.0
    patches_per_second: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    checkpoint: Path | None = None
    log: Path | None = None
    plot: Path | None = None


def transformer_dims(config: VLMConfig) -> tuple[TransformerDims, TransformerDims]:
    """(LLM, ViT) dims for `vlm_sample_costs`."""
    llm, vit = config.llm, config.vision
    return (TransformerDims(llm.hidden_size, llm.mlp_hidden, llm.num_heads, llm.num_kv_heads),
            TransformerDims(vit.width, vit.mlp_hidden, vit.num_heads))


def load_vit_init(model: VLM, path: str | Path) -> list[str]:
    """Copy a CogViT's weights into model.vision from a checkpoint (a folder holding
    model.safetensors, or the file), under whatever prefix the checkpoint's module gave them
    (e.g. "student."). Every tower weight must be there with its shape; the merger's weights are
    taken where their shapes match (a stage-1/2 merger may map to another width) and kept fresh
    otherwise. Returns the names of the vision weights left at their initial values."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"vit_init: no model.safetensors at {str(path)!r}")
    state = load_file(file)
    anchor = "patch_embed.weight"
    prefixes = [key[: -len(anchor)] for key in state if key.endswith(anchor) and "teacher" not in key]
    if len(prefixes) != 1:
        raise ValueError(f"vit_init: {file} must hold exactly one CogViT (one '*{anchor}'), found {len(prefixes)}")
    prefix = prefixes[0]
    own = model.vision.state_dict()
    loaded, fresh = {}, []
    for name, value in own.items():
        source = state.get(prefix + name)
        if source is not None and source.shape == value.shape:
            loaded[name] = source
        elif name.startswith("merger."):
            fresh.append(name)
        else:
            found = "missing" if source is None else f"shape {tuple(source.shape)}"
            raise ValueError(f"vit_init: {file} has no {prefix + name} of shape {tuple(value.shape)} ({found}); "
                             "it must come from a CogViT of the same shape as the VLM's")
    model.vision.load_state_dict(loaded, strict=False)
    return fresh


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max resident"


def train_sft(config: SFTConfig, photos: Sequence[Sample] | None = None) -> SFTResult:
    """Run the SFT stage (module docstring) on conversations about `photos` (default: the embedded
    photos) and write out/sft.jsonl, out/sft.png and out/checkpoint-<step>/ folders. With
    config.resume, continue from the latest checkpoint in out (written with the same
    trajectory settings); without, out must not hold checkpoints yet."""
    if not isinstance(config, SFTConfig):
        raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(config.out)
    vlm_config = config.vlm_config()
    llm_dims, vit_dims = transformer_dims(vlm_config)
    data = SFTData(load_photos() if photos is None else photos, ByteTokenizer(), config.data,
                   patch_size=vlm_config.vision.patch_size, merge_size=vlm_config.vision.merge_size,
                   llm_dims=llm_dims, vit_dims=vit_dims)

    with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank and every resume
        torch.manual_seed(config.seed)
        model = VLM(vlm_config)
    if config.vit_init is not None:
        load_vit_init(model, config.vit_init)
    if config.vit_recompute != "none":
        model.vision.apply_memory_policy(config.vit_recompute)
    model.to(device)
    if distributed:
        shard_blocks(model, (CogViTBlock, DecoderBlock), data_parallel_mesh(device))
    optimizer = muon_with_adamw(model, config.lr, config.adamw_lr, config.weight_decay)

    settings = trajectory_settings(config, RESUMABLE_CHANGES)
    start, previous = 0, checkpoint_to_resume(out, config.resume, settings)
    if previous is not None:
        start, _ = load_checkpoint(previous, model, optimizer)
    if distributed:
        dist.barrier()  # no rank looks for checkpoints after another has started writing them
    log = None
    if rank == 0:
        log = RunLog(out, "sft", total_steps=config.steps, start_step=start, progress=config.progress)
    result = SFTResult(start_step=start, checkpoint=previous)
    depths = vlm_config.num_mtp_depths
    tokens = patches = 0
    elapsed = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for step in range(start, config.steps):
        began = time.perf_counter()
        lr = set_lr(optimizer, cosine_with_warmup(step, config.steps, config.warmup_steps, config.min_lr_ratio))
        with nvtx_range("sft/data"):
            plan = data.plan(step_random(config.seed, step), world)
            packs = [pack.to(device) for pack in data.rank_packs(plan, rank)]
            counts = [model.target_counts(p.input_ids, p.labels, p.cu_seqlens).double() for p in packs]
            total = torch.stack(counts).sum(0)
            if distributed:
                dist.all_reduce(total)
            normalizers = total.clamp(min=1) / world
        # this rank's share of the step's metrics: main, the MMTP depths' losses, their correct counts
        sums = torch.zeros(1 + 2 * depths, dtype=torch.float64, device=device)
        for pack, count in zip(packs, counts):
            with nvtx_range("sft/forward"):
                output = model(pack.input_ids, pack.labels, pack.cu_seqlens, pack.images,
                               normalizers=normalizers.float())
            with nvtx_range("sft/backward"):
                output.loss.backward()
            sums += torch.cat([output.main_loss[None], output.depth_losses,
                               output.depth_accuracies * count[1:]]).double()
        with nvtx_range("sft/optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if distributed:
            dist.all_reduce(sums)
        main = float(sums[0]) / world
        depth_losses = [float(v) / world for v in sums[1:1 + depths]]
        accuracies = (sums[1 + depths:] / total[1:].clamp(min=1)).tolist()
        mtp = config.mtp_loss_weight / max(depths, 1) * sum(depth_losses)
        elapsed += time.perf_counter() - began
        tokens += sum(len(ids) for ids, _ in plan.encoded)
        patches += sum(rows * cols for rows, cols in plan.grids)
        result.losses.append(main + mtp)
        result.main_losses.append(main)
        result.mtp_losses.append(depth_losses)
        result.mtp_accuracies.append(accuracies)
        if log is not None:
            log.log(step, loss=main + mtp, main_loss=main, mtp_loss=mtp, lr=lr, seconds=time.perf_counter() - began,
                    **{f"mtp{k + 1}_loss": v for k, v in enumerate(depth_losses)},
                    **{f"mtp{k + 1}_accuracy": v for k, v in enumerate(accuracies)})
        done = step + 1
        if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
            result.checkpoint = save_checkpoint(out, done, model, optimizer, {"settings": settings})
    if distributed:
        dist.barrier()  # the checkpoint is on disk before any rank returns
    result.tokens_per_second = tokens / elapsed if elapsed else 0.0
    result.patches_per_second = patches / elapsed if elapsed else 0.0
    result.peak_memory_bytes, result.peak_memory_kind = _peak_memory(device)
    if log is not None:
        result.log, result.plot = log.path, log.close()
    return result
