"""Stage 1 of CogViT pretraining: masked distillation from several frozen teachers.

Per step: a batch of augmented variable-size views packed by NaFlex up to `batch_tokens` patches;
exactly round(mask_ratio · n) of the n patch tokens of every image (half rounds up) replaced by
CogViT's learned mask token, chosen at random per step; every teacher sees the unmasked views;
one MLP head per teacher maps the student's features to that teacher's width; loss = Σ_teachers
weight · MSE(head(student features), standardised teacher features) over the masked tokens only.

Teacher views: each teacher gets the very pixels the student got (the packed view, unpatchified),
resized (bicubic, antialiased) to the student's patch grid times the teacher's patch size and
normalised with the teacher's mean and std, so the teacher's grid IS the student's grid: token i
of the student and token i of the teacher cover the same piece of the picture, with no resizing
of features.

Target standardisation (so the teachers weigh evenly whatever their feature scales): per teacher
and per channel, running mean and variance buffers over all tokens of each batch, updated with
momentum (`target_momentum`, an exponential moving average; the first batch sets them), and the
targets are (feature − mean) / sqrt(var + 1e-6). This is a per-channel diagonal standardisation,
not PHI-S (which would rotate the features with a Hadamard matrix and scale them isotropically).
The buffers live in the trained module, so checkpoints carry them and a resume continues exactly.

Default teachers (no paths given): tiny random SigLIP2 and DINOv2 vision models built from configs,
offline. They demonstrate the mechanics of the stage on any machine; distilling random features is
not a real distillation. `TeacherSpec(path=...)` (`--teacher-siglip` / `--teacher-dino`) loads
local transformers checkpoints for real use.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glm5v.data.embedded import Sample
from glm5v.models.cogvit import CogViT
from glm5v.models.teachers import VisionTeacher
from glm5v.train.loop import step_generator, step_random
from glm5v.train.stage import (
    StageConfig,
    StageResult,
    draw_batch,
    load_samples,
    rank_seed,
    run_stage,
    seeded,
    to_device,
)
from glm5v_kernels.data import NaFlexProcessor, PackedImages

logger = logging.getLogger(__name__)

SIGLIP_NORMALISATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_FAMILY_NORMALISATION = {
    "SiglipVisionModel": SIGLIP_NORMALISATION, "Siglip2VisionModel": SIGLIP_NORMALISATION,
    "Dinov2Model": IMAGENET_NORMALISATION, "Dinov2WithRegistersModel": IMAGENET_NORMALISATION,
    "DINOv3ViTModel": IMAGENET_NORMALISATION,
}


def _random_siglip():
    import transformers

    return transformers.Siglip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=2, patch_size=16, num_patches=64)


def _random_dino():
    import transformers

    return transformers.Dinov2Config(hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=2,
                                     patch_size=14, image_size=112)


# name -> config of the tiny random teacher used when no checkpoint is given
RANDOM_TEACHERS = {"siglip": _random_siglip, "dino": _random_dino}


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher: name (also its loss's name in the log); path: a local transformers checkpoint
    directory (SigLIP, SigLIP2, DINOv2, DINOv3), or None for the tiny random teacher of that name
    ("siglip" or "dino"); weight: its loss's weight in the sum."""

    name: str
    path: str | None = None
    weight: float = 1.0

    def __post_init__(self):
        if self.path is None and self.name not in RANDOM_TEACHERS:
            raise ValueError(f"teacher {self.name!r} has no path; random teachers are {sorted(RANDOM_TEACHERS)}")
        if not self.weight > 0:
            raise ValueError(f"teacher {self.name!r}: weight must be > 0, got {self.weight}")


@dataclass(frozen=True)
class MIMConfig(StageConfig):
    """Stage-1 settings: StageConfig's plus mask_ratio (fraction of each image's tokens masked),
    teachers, and target_momentum (of the running mean/var that standardise each teacher's
    features)."""

    out: str = "runs/cogvit-mim"
    mask_ratio: float = 0.35
    teachers: tuple[TeacherSpec, ...] = (TeacherSpec("siglip"), TeacherSpec("dino"))
    target_momentum: float = 0.99

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not self.teachers:
            raise ValueError("teachers must name at least one teacher")
        if not all(isinstance(t, TeacherSpec) for t in self.teachers):
            raise TypeError("teachers must be TeacherSpec instances")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be distinct, got {names}")
        if not 0 <= self.target_momentum < 1:
            raise ValueError(f"target_momentum must be in [0, 1), got {self.target_momentum}")


@dataclass
class Teacher:
    """A loaded teacher: the frozen model, its loss weight, and the (mean, std) per channel its
    inputs are normalised with."""

    name: str
    model: VisionTeacher
    weight: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


def load_teacher(spec: TeacherSpec, seed: int) -> Teacher:
    """The teacher of a spec: a local checkpoint (normalisation from its preprocessor_config.json,
    else its family's), or the tiny random one built with weights drawn from seed."""
    if spec.path is None:
        model = seeded(seed, lambda: VisionTeacher.from_config(RANDOM_TEACHERS[spec.name]()))
        source = "random tiny model (demonstrates the mechanics; not a real distillation)"
    else:
        model, source = VisionTeacher.from_pretrained(spec.path), str(spec.path)
    if int(getattr(model.model.config, "num_channels", 3)) != 3:
        raise ValueError(f"teacher {spec.name!r} takes {model.model.config.num_channels} channels; views are RGB")
    mean, std = _FAMILY_NORMALISATION[model.family]
    preprocessor = Path(spec.path) / "preprocessor_config.json" if spec.path is not None else None
    if preprocessor is not None and preprocessor.is_file():
        settings = json.loads(preprocessor.read_text())
        mean, std = tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
    return Teacher(spec.name, model, spec.weight, mean, std, source)


def teacher_views(images: PackedImages, processor: NaFlexProcessor, teacher: Teacher) -> list[torch.Tensor]:
    """The teacher's input for every packed image: (3, P·h, P·w) for the student's (h, w) grid and
    the teacher's patch size P, the same pixels as the student's view (un-normalised from the
    packed patches, resized bicubic with antialias when P differs, re-normalised for the teacher)."""
    p, tp = processor.patch_size, teacher.model.patch_size
    patches = images.patches
    to_unit = (torch.tensor(processor.image_std).view(3, 1, 1), torch.tensor(processor.image_mean).view(3, 1, 1))
    mean, std = torch.tensor(teacher.mean).view(3, 1, 1), torch.tensor(teacher.std).view(3, 1, 1)
    views = []
    bounds = images.cu_seqlens.tolist()
    for (h, w), a, b in zip(images.spatial_shapes.tolist(), bounds[:-1], bounds[1:]):
        pixels = patches[a:b].view(h, w, p, p, 3).permute(4, 0, 2, 1, 3).reshape(3, h * p, w * p)
        pixels = pixels * to_unit[0].to(pixels) + to_unit[1].to(pixels)  # back to [0, 1]
        if tp != p:
            pixels = F.interpolate(pixels[None], size=(h * tp, w * tp), mode="bicubic", antialias=True,
                                   align_corners=False)[0].clamp(0, 1)
        views.append((pixels - mean.to(pixels)) / std.to(pixels))
    return views


def teacher_targets(teacher: Teacher, views: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(T, teacher width) features of the views on the student's grids, image by image, row-major
    (the packed order). A view whose grid cannot show the same picture as the student's raises."""
    return teacher.model(list(views), grids=[tuple(g) for g in grids]).features


def mask_tokens(cu_seqlens: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(T,) bool: exactly floor(ratio · n + 1/2) of the n tokens of every image masked, chosen
    uniformly at random from generator. cu_seqlens (n_images + 1,) on the CPU."""
    starts = cu_seqlens.long()
    lengths, total = starts.diff(), int(starts[-1])
    counts = torch.floor(ratio * lengths.double() + 0.5).long()
    image = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths, output_size=total)
    scores = torch.rand(total, generator=generator, dtype=torch.float64)
    order = torch.argsort(image.double() + scores)  # by image, then by a random score inside it
    rank = torch.empty(total, dtype=torch.long)
    rank[order] = torch.arange(total) - starts[image[order]]
    return rank < counts[image]


class FeatureStandardizer(nn.Module):
    """(T, C) features -> (features − running mean) / sqrt(running var + eps), per channel. In
    training mode each call first folds the batch's statistics into the buffers (momentum EMA;
    the first batch sets them)."""

    def __init__(self, channels: int, momentum: float, eps: float = 1e-6):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                mean, var = x.float().mean(0), x.float().var(0, unbiased=False)
                keep = self.momentum if self.batches.item() > 0 else 0.0
                self.mean.lerp_(mean, 1 - keep)
                self.var.lerp_(var, 1 - keep)
                self.batches += 1
        return (x.float() - self.mean) * torch.rsqrt(self.var + self.eps)


class MIMModel(nn.Module):
    """Everything stage 1 trains: the student, one MLP head per teacher (student width -> student
    width -> teacher width) and the teachers' standardisers (buffers)."""

    def __init__(self, student: CogViT, teacher_widths: dict[str, int], momentum: float):
        super().__init__()
        width = student.config.width
        self.student = student
        self.heads = nn.ModuleDict({name: nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, c))
                                    for name, c in teacher_widths.items()})
        self.standardizers = nn.ModuleDict({name: FeatureStandardizer(c, momentum)
                                            for name, c in teacher_widths.items()})

    def forward(self, images: PackedImages, mask: torch.Tensor,
                targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """images with T patches, mask (T,) bool (at least one True), targets: teacher name ->
        (T, teacher width) raw features. Returns teacher name -> MSE over the masked tokens."""
        if not bool(mask.any()):
            raise ValueError("no token is masked: raise mask_ratio or use larger images")
        predicted = self.student(images, mask).features[mask]
        return {name: F.mse_loss(self.heads[name](predicted).float(), self.standardizers[name](target)[mask])
                for name, target in targets.items()}


def train_mim(config: MIMConfig, samples: Sequence[Sample] | None = None) -> StageResult:
    """Run stage 1 (see the module docstring) on `samples`, config.data's folder or the embedded
    photos. Writes out/mim.jsonl (loss, per-teacher losses, lr, tokens per step), out/mim.png,
    out/teachers.json and out/checkpoint-<step>/."""
    if not isinstance(config, MIMConfig):
        raise TypeError(f"config must be a MIMConfig, got {type(config).__name__}")
    samples = load_samples(config, samples)
    device, processor = config.torch_device(), config.processor()
    teachers = [load_teacher(spec, config.seed + 1 + i) for i, spec in enumerate(config.teachers)]
    for teacher in teachers:
        teacher.model.to(device)
        if teacher.source.startswith("random"):
            logger.warning("teacher %r is a %s", teacher.name, teacher.source)
    student = seeded(config.seed, lambda: CogViT(config.student_config()))
    model = seeded(config.seed, lambda: MIMModel(student, {t.name: t.model.hidden_size for t in teachers},
                                                 config.target_momentum)).to(device)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    (Path(config.out) / "teachers.json").write_text(json.dumps(
        [{"name": t.name, "source": t.source, "family": t.model.family, "width": t.model.hidden_size,
          "patch_size": t.model.patch_size, "weight": t.weight, "image_mean": t.mean, "image_std": t.std,
          "targets": "per-channel running mean/var (momentum EMA)"} for t in teachers], indent=1))

    data_seed = rank_seed(config.seed)

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        packed, _ = draw_batch(samples, processor, config.batch_tokens, step_random(data_seed, step), config.views)
        mask = mask_tokens(packed.cu_seqlens, config.mask_ratio, step_generator(data_seed, step))
        grids = packed.spatial_shapes.tolist()
        targets = {t.name: teacher_targets(t, [v.to(device) for v in teacher_views(packed, processor, t)], grids)
                   for t in teachers}
        losses = model(to_device(packed, device), mask.to(device), targets)
        loss = sum(t.weight * losses[t.name] for t in teachers)
        metrics = {f"loss_{name}": value.item() for name, value in losses.items()}
        metrics.update(tokens=packed.patches.shape[0], images=packed.num_images, masked=int(mask.sum()))
        return loss, metrics

    return run_stage(config, "mim", model, step_loss)


__all__ = ["MIMConfig", "MIMModel", "Teacher", "TeacherSpec", "FeatureStandardizer", "load_teacher", "mask_tokens",
           "teacher_targets", "teacher_views", "train_mim"]
