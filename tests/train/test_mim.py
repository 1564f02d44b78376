"""CogViT stage 1, multi-teacher masked distillation (glm5v/train/mim.py), on the embedded photos on
the CPU with the tiny student and tiny random teachers built offline."""

from __future__ import annotations

import dataclasses
import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from glm5v.data.embedded import load_photos
from glm5v.models.cogvit import CogViT
from glm5v.train.loop import step_random
from glm5v.train.mim import (
    FeatureStandardizer,
    MIMConfig,
    MIMModel,
    TeacherSpec,
    load_teacher,
    mask_tokens,
    teacher_targets,
    teacher_views,
    train_mim,
)
from glm5v.train.stage import draw_batch

pytest.importorskip("transformers")
pytest.importorskip("skimage")


def mim_config(tmp_path: Path, **overrides) -> MIMConfig:
    return MIMConfig(out=str(tmp_path), progress=False, **overrides)


@pytest.fixture(scope="module")
def thirty_steps(tmp_path_factory):
    config = mim_config(tmp_path_factory.mktemp("mim"), steps=30, checkpoint_every=0)
    return config, train_mim(config)


def test_losses_fall_on_the_embedded_photos(thirty_steps):
    _, result = thirty_steps
    losses = np.array(result.losses)
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.85 * losses[:5].mean()


def test_run_writes_log_plot_teachers_and_checkpoint(thirty_steps):
    config, result = thirty_steps
    records = [json.loads(line) for line in result.log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(30))
    for r in records:  # the total is the weighted sum of the teachers' losses (weights 1)
        assert r["loss"] == pytest.approx(r["loss_siglip"] + r["loss_dino"], rel=1e-5)
        assert r["tokens"] <= config.batch_tokens
    assert result.plot.exists() and result.checkpoint.name == "checkpoint-00000030"
    teachers = json.loads((Path(config.out) / "teachers.json").read_text())
    assert [t["name"] for t in teachers] == ["siglip", "dino"]
    assert all("not a real distillation" in t["source"] for t in teachers)


def expected_count(n: int, ratio: Fraction) -> int:
    """round(ratio · n), halves up, in exact arithmetic."""
    return int(ratio * n + Fraction(1, 2))


def test_mask_counts_are_exact_per_image_and_random_per_step():
    lengths = [1, 2, 3, 4, 7, 20, 57, 100]
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    masks = [mask_tokens(cu_seqlens, 0.35, torch.Generator().manual_seed(s)) for s in range(400)]
    for mask in masks[:20]:
        counts = [int(mask[a:b].sum()) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        assert counts == [expected_count(n, Fraction(35, 100)) for n in lengths]
    assert torch.equal(masks[0], mask_tokens(cu_seqlens, 0.35, torch.Generator().manual_seed(0)))
    assert not torch.equal(masks[0], masks[1])
    # every token of an image is equally likely: 100-token image, 35 masked -> frequency 0.35 each
    frequency = torch.stack(masks).double().mean(0)[cu_seqlens[-2]:]
    assert (frequency - 0.35).abs().max() < 0.1


def test_masked_counts_logged_match_the_batches(thirty_steps):
    config, result = thirty_steps
    records = [json.loads(line) for line in result.log.read_text().splitlines()]
    for step in (0, 7):
        packed, _ = draw_batch(load_photos(), config.processor(), config.batch_tokens, step_random(config.seed, step),
                               config.views)
        sizes = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
        assert records[step]["masked"] == sum(expected_count(n, Fraction(35, 100)) for n in sizes)
        assert records[step]["tokens"] == sum(sizes)


@pytest.fixture(scope="module")
def teachers():
    return {spec.name: load_teacher(spec, seed=1) for spec in MIMConfig().teachers}


@pytest.fixture(scope="module")
def batch():
    config = MIMConfig()
    return draw_batch(load_photos(), config.processor(), 600, step_random(0, 3), config.views)[0], config.processor()


def test_teacher_views_show_the_student_pixels_on_its_grid(teachers, batch):
    packed, processor = batch
    p = processor.patch_size
    bounds = packed.cu_seqlens.tolist()
    for name in ("dino", "siglip"):  # patch 14 (the student's): the same pixels; patch 16: resized
        teacher = teachers[name]
        tp = teacher.model.patch_size
        mean, std = torch.tensor(teacher.mean).view(3, 1, 1), torch.tensor(teacher.std).view(3, 1, 1)
        views = teacher_views(packed, processor, teacher)
        for view, (h, w), a, b in zip(views, packed.spatial_shapes.tolist(), bounds[:-1], bounds[1:]):
            assert view.shape == (3, h * tp, w * tp)
            unit = view * std + mean  # the teacher's normalisation undone: pixels in [0, 1]
            cells = unit.view(3, h, tp, w, tp).mean((2, 4))  # mean colour of every grid cell
            student = (packed.patches[a:b].view(h, w, p * p, 3).mean(2) * 0.5 + 0.5).permute(2, 0, 1)
            if tp == p:
                rows = unit.view(3, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
                torch.testing.assert_close(rows, packed.patches[a:b] * 0.5 + 0.5, rtol=0, atol=1e-6)
            else:  # a resize keeps each cell's mean colour up to the filter's reach into neighbours
                assert (cells - student).abs().mean() < 0.02
        targets = teacher_targets(teacher, views, packed.spatial_shapes.tolist())
        own = teacher.model(views)  # the teacher on its own grid: no resizing took place
        assert own.grids == [tuple(g) for g in packed.spatial_shapes.tolist()]
        torch.testing.assert_close(targets, own.features, rtol=0, atol=0)


def test_standardizer_tracks_a_momentum_average():
    torch.manual_seed(0)
    norm = FeatureStandardizer(5, momentum=0.9)
    batches = [torch.randn(40, 5, dtype=torch.float64).float() * (i + 1) + i for i in range(3)]
    mean, var = None, None
    for x in batches:
        out = norm(x)
        m, v = x.double().mean(0), x.double().var(0, unbiased=False)
        mean, var = (m, v) if mean is None else (0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * v)
        torch.testing.assert_close(out.double(), (x.double() - mean) / torch.sqrt(var + 1e-6), rtol=1e-5, atol=1e-5)
    norm.eval()
    frozen = norm.mean.clone()
    norm(batches[0] + 100)
    assert torch.equal(norm.mean, frozen)  # eval mode reads the buffers, never updates them


def test_loss_is_the_masked_mse_against_standardized_targets(batch):
    packed, _ = batch
    torch.manual_seed(0)
    model = MIMModel(CogViT(MIMConfig().student_config()), {"a": 6}, momentum=0.5)
    mask = mask_tokens(packed.cu_seqlens, 0.35, torch.Generator().manual_seed(1))
    target = torch.randn(packed.patches.shape[0], 6) * 3 + 1
    loss = model(packed, mask, {"a": target})["a"]
    with torch.no_grad():
        predicted = model.heads["a"](model.student(packed, mask).features)
    standardized = (target.double() - target.double().mean(0)) / torch.sqrt(target.double().var(0, unbiased=False)
                                                                             + 1e-6)
    expected = ((predicted.double() - standardized)[mask] ** 2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def assert_resume_replays(train, config):
    """4 uninterrupted steps vs a run stopped after its step-2 checkpoint and resumed in a fresh
    model and optimizer: the same losses bit for bit, the same log and the same final weights."""
    from safetensors.torch import load_file

    out = Path(config.out)
    straight = train(dataclasses.replace(config, out=str(out / "straight"), steps=4, checkpoint_every=2))
    first = train(dataclasses.replace(config, out=str(out / "resumed"), steps=4, checkpoint_every=2))
    shutil.rmtree(out / "resumed" / "checkpoint-00000004")  # as if killed after the step-2 checkpoint
    resumed = train(dataclasses.replace(config, out=str(out / "resumed"), steps=4, checkpoint_every=2, resume=True))
    assert resumed.start_step == 2 and len(resumed.losses) == 2
    assert first.losses[:2] + resumed.losses == straight.losses
    assert resumed.log.read_text() != "" and [json.loads(line)["loss"] for line in
                                               resumed.log.read_text().splitlines()] == straight.losses
    a, b = load_file(straight.checkpoint / "model.safetensors"), load_file(resumed.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight


def test_resume_continues_the_uninterrupted_trajectory(tmp_path):
    assert_resume_replays(train_mim, mim_config(tmp_path, batch_tokens=512))


def test_resume_and_fresh_runs_guard_their_folder(tmp_path):
    config = mim_config(tmp_path, steps=1, batch_tokens=256)
    with pytest.raises(ValueError, match="no checkpoint"):
        train_mim(dataclasses.replace(config, resume=True))
    train_mim(config)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_mim(config)
    with pytest.raises(ValueError, match="other settings .*mask_ratio"):
        train_mim(dataclasses.replace(config, resume=True, steps=2, mask_ratio=0.5))


def test_bad_input(tmp_path, teachers, batch):
    packed, processor = batch
    views = teacher_views(packed, processor, teachers["dino"])
    turned = [v.transpose(1, 2) if v.shape[1] != v.shape[2] else v for v in views]  # another picture's shape
    with pytest.raises(ValueError, match="cannot show the same picture"):
        teacher_targets(teachers["dino"], turned, packed.spatial_shapes.tolist())
    with pytest.raises(ValueError, match="dataset is empty"):
        train_mim(mim_config(tmp_path), samples=[])
    with pytest.raises(ValueError, match="samples is empty"):
        draw_batch([], processor, 256, step_random(0, 0), MIMConfig().views)
    with pytest.raises(ValueError, match="no token is masked"):
        MIMModel(CogViT(MIMConfig().student_config()), {"a": 4}, 0.9)(
            packed, torch.zeros(packed.patches.shape[0], dtype=torch.bool), {"a": torch.randn(len(packed.patches), 4)})
    with pytest.raises(ValueError, match="mask_ratio"):
        MIMConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="distinct"):
        MIMConfig(teachers=(TeacherSpec("dino"), TeacherSpec("dino")))
    with pytest.raises(ValueError, match="random teachers are"):
        TeacherSpec("clip")
    with pytest.raises(ValueError, match="batch_tokens must hold one image"):
        MIMConfig(batch_tokens=3)
    with pytest.raises(ValueError, match="config.json"):
        train_mim(mim_config(tmp_path, teachers=(TeacherSpec("dino", path=str(tmp_path / "missing")),)))
    with pytest.raises(TypeError, match="MIMConfig"):
        train_mim(object())
