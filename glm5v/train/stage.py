"""What the two CogViT pretraining stages (mim.py, contrastive.py) share: the common settings, the
data (embedded photos or a folder, augmented variable-size views packed by NaFlex up to a token
budget), the student, and the run itself (Muon + AdamW, cosine schedule with warmup, NVTX ranges,
run log, checkpoints, exact resume).

A stage supplies a model (an nn.Module holding everything that trains and every buffer that must
survive a resume) and `step_loss(step) -> (loss, metrics)`, which draws its batch and masks from
`step_random(seed, step)` / `step_generator(seed, step)` only, so that a resumed run replays the
uninterrupted one exactly (see glm5v/train/loop.py).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from glm5v._checks import check_ints
from glm5v.data.embedded import Sample, ViewConfig, augmented_view, folder_dataset, load_photos
from glm5v.models.cogvit import CogViTConfig, cogvit_l, cogvit_tiny
from glm5v.train.loop import (
    RunLog,
    checkpoint_to_resume,
    cosine_with_warmup,
    load_checkpoint,
    muon_with_adamw,
    nvtx_range,
    save_checkpoint,
    set_lr,
    trajectory_settings,
)
from glm5v_kernels.data import NaFlexProcessor, PackedImages, pack_images

MODEL_CONFIGS: dict[str, Callable[..., CogViTConfig]] = {"tiny": cogvit_tiny, "l": cogvit_l}
# Settings that change nothing in the trajectory of the steps already taken: a resumed run may
# change them (--steps extends a run; the schedule then follows the new total).
_RESUMABLE_CHANGES = {"steps", "out", "resume", "progress", "checkpoint_every", "device"}


@dataclass(frozen=True)
class StageConfig:
    """Settings both stages share.

    model: CogViT config name ("tiny": `cogvit_tiny`, for CPU runs and tests; "l": `cogvit_l`).
    steps: optimizer steps. batch_tokens: patches per step, summed over the images of a batch
    (views are drawn until the next would overflow it). max_image_tokens: NaFlex budget of one
    image (capped at batch_tokens, so a view always fits). views: how the augmented views are
    drawn. lr: Muon's learning rate (hidden matrices); adamw_lr: the AdamW groups' (embeddings,
    norms, biases, heads' vectors); both follow `cosine_with_warmup(warmup_steps, min_lr_ratio)`.
    seed: initial weights and every per-step random stream. out: folder of the run log and
    checkpoints. data: a folder of images with a captions.jsonl sidecar (None: the embedded
    photos). checkpoint_every: steps between checkpoints (0: only at the end). resume: continue
    from the latest checkpoint in out. recompute: activation recompute of the student's blocks.
    device: "cpu", "cuda", or None (cuda when available).
    """

    model: str = "tiny"
    steps: int = 20
    batch_tokens: int = 1024
    max_image_tokens: int = 256
    views: ViewConfig = ViewConfig(min_side=64, max_side=384)
    lr: float = 0.02
    adamw_lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    seed: int = 0
    out: str = "runs/cogvit"
    data: str | None = None
    checkpoint_every: int = 10
    resume: bool = False
    recompute: str = "none"
    progress: bool = True
    device: str | None = None

    def __post_init__(self):
        if self.model not in MODEL_CONFIGS:
            raise ValueError(f"model must be one of {sorted(MODEL_CONFIGS)}, got {self.model!r}")
        check_ints(self, ("steps", "batch_tokens", "max_image_tokens"))
        check_ints(self, ("warmup_steps", "checkpoint_every", "seed"), minimum=0)
        if not self.lr > 0 or not self.adamw_lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"lr and adamw_lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.adamw_lr}, "
                             f"{self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        merge = self.student_config().merge_size or 1
        if self.batch_tokens < merge * merge:
            raise ValueError(f"batch_tokens must hold one image of at least merge_size² = {merge * merge} patches, "
                             f"got {self.batch_tokens}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or None, got {self.device!r}")

    def student_config(self) -> CogViTConfig:
        """The student: the named CogViT with a mask token (stage 1 needs it; stage 2 keeps it so
        a stage-1 checkpoint loads as is)."""
        return MODEL_CONFIGS[self.model](mask_token=True, recompute=self.recompute)

    def processor(self) -> NaFlexProcessor:
        student = self.student_config()
        return NaFlexProcessor(patch_size=student.patch_size, merge_size=student.merge_size or 1,
                               max_num_patches=min(self.max_image_tokens, self.batch_tokens))

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_samples(config: StageConfig, samples: Sequence[Sample] | None = None) -> list[Sample]:
    """The training images: `samples` when given, else config.data's folder, else the embedded photos."""
    if samples is None:
        samples = folder_dataset(config.data) if config.data is not None else load_photos()
    samples = list(samples)
    if not samples:
        raise ValueError("the dataset is empty: a step needs at least one image")
    return samples


def draw_batch(samples: Sequence[Sample], processor: NaFlexProcessor, batch_tokens: int, rng: random.Random,
               views: ViewConfig, max_images: int | None = None) -> tuple[PackedImages, list[Sample]]:
    """Augmented views of the samples, in an order shuffled by rng (cycling through them again
    when max_images allows), added while their NaFlex patches fit batch_tokens; at least one view
    (the processor's budget must not exceed batch_tokens). Returns the packed views (T patches,
    T <= batch_tokens) and the views themselves (their sources' names and captions)."""
    if not samples:
        raise ValueError("samples is empty: a batch needs at least one image")
    if processor.max_num_patches > batch_tokens:
        raise ValueError(f"the processor's max_num_patches ({processor.max_num_patches}) exceeds batch_tokens "
                         f"({batch_tokens}): a single view could overflow the batch")
    order = list(range(len(samples)))
    rng.shuffle(order)
    chosen, total = [], 0
    for index in itertools.islice(itertools.cycle(order), max_images):
        image = augmented_view(samples[index].image, rng, views)
        rows, cols = (side // processor.patch_size for side in processor.target_size(*image.shape[:2]))
        if total + rows * cols > batch_tokens:
            break
        chosen.append(Sample(samples[index].name, samples[index].caption, image))
        total += rows * cols
    return pack_images([s.image for s in chosen], processor), chosen


def to_device(images: PackedImages, device: torch.device) -> PackedImages:
    """patches and position_ids on device; cu_seqlens and spatial_shapes stay on the host, where
    CogViT reads them (no device sync)."""
    return PackedImages(images.patches.to(device), images.cu_seqlens, images.spatial_shapes,
                        images.position_ids.to(device), images.max_seqlen)


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """build() with the global torch random stream seeded (and restored after): reproducible
    initial weights for the student, its heads and the random teachers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def rank_seed(seed: int) -> int:
    """The seed of this rank's data and masks: seed itself in one process; under torch.distributed
    each rank draws its own batches (seed offset by the rank)."""
    distributed = dist.is_available() and dist.is_initialized()
    return seed + 1_000_003 * dist.get_rank() if distributed else seed


@dataclass
class StageResult:
    """model: the trained module. losses: the loss of every step this call ran (steps start_step … steps − 1; under
    torch.distributed the mean over the ranks); checkpoint: the last checkpoint written; log /
    plot: the jsonl run log and its PNG (plot: None without matplotlib). Under torch.distributed
    rank 0 writes them, and the other ranks get None for all three."""

    model: nn.Module
    losses: list[float]
    start_step: int
    checkpoint: Path | None
    log: Path | None
    plot: Path | None


def _average_gradients(model: nn.Module) -> None:
    """Data parallelism without a wrapper: every rank holds the whole model, gradients are averaged."""
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def run_stage(config: StageConfig, name: str, model: nn.Module,
              step_loss: Callable[[int], tuple[torch.Tensor, dict[str, float]]]) -> StageResult:
    """Train `model` for config.steps steps of `step_loss` and write out/<name>.jsonl, .png and
    out/checkpoint-<step>/ folders. With config.resume, continue from the latest checkpoint in
    out (its settings must match those that shape the trajectory); without, out must not hold
    checkpoints yet (a fresh run would mix its checkpoints with an older run's)."""
    out = Path(config.out)
    optimizer = muon_with_adamw(model, config.lr, config.adamw_lr, config.weight_decay)
    settings = trajectory_settings(config, _RESUMABLE_CHANGES)
    start, previous = 0, checkpoint_to_resume(out, config.resume, settings)
    if previous is not None:
        start, _ = load_checkpoint(previous, model, optimizer)
    extra = {"settings": settings}
    distributed = dist.is_available() and dist.is_initialized()
    main = not distributed or dist.get_rank() == 0  # the one process that writes the log and checkpoints
    log = RunLog(out, name, total_steps=config.steps, start_step=start, progress=config.progress) if main else None
    losses, checkpoint = [], previous
    model.train()
    for step in range(start, config.steps):
        began = time.perf_counter()
        lr = set_lr(optimizer, cosine_with_warmup(step, config.steps, config.warmup_steps, config.min_lr_ratio))
        with nvtx_range(f"{name}/forward"):
            loss, metrics = step_loss(step)
        with nvtx_range(f"{name}/backward"):
            loss.backward()
        with nvtx_range(f"{name}/optimizer"):
            if distributed:
                _average_gradients(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if distributed:  # the global loss: the mean of the ranks' losses
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
        if main:
            log.log(step, loss=losses[-1], lr=lr, seconds=time.perf_counter() - began, **metrics)
        done = step + 1
        if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
            if main:
                checkpoint = save_checkpoint(out, done, model, optimizer, extra)
    if distributed:
        dist.barrier()  # the checkpoint is complete before any rank goes on
    return StageResult(model, losses, start, checkpoint, log.path if main else None, log.close() if main else None)
