"""CogViT stage 2, NaFlex SigLIP (glm5v/train/contrastive.py), on the embedded photos and their
captions on the CPU with the tiny towers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from glm5v.data.embedded import load_photos
from glm5v.data.tokenizer import ByteTokenizer
from glm5v.models.cogvit import CogViT
from glm5v.train.contrastive import (
    SigLIPConfig,
    SigLIPModel,
    TextConfig,
    encode_captions,
    load_stage1_student,
    segment_mean,
    train_siglip,
)
from glm5v.train.loop import step_random
from glm5v.train.mim import MIMConfig, train_mim
from glm5v.train.stage import draw_batch

from .test_mim import assert_resume_replays

pytest.importorskip("skimage")


def siglip_config(tmp_path, **overrides) -> SigLIPConfig:
    return SigLIPConfig(out=str(tmp_path), progress=False, **overrides)


def test_losses_fall_on_the_embedded_photos(tmp_path):
    result = train_siglip(siglip_config(tmp_path, steps=20, checkpoint_every=0))
    losses = np.array(result.losses)
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.6 * losses[:5].mean()
    records = [json.loads(line) for line in result.log.read_text().splitlines()]
    assert records[0]["logit_scale"] == pytest.approx(10.0) and records[0]["logit_bias"] == -10.0
    assert records[-1]["logit_scale"] != pytest.approx(10.0) and records[-1]["logit_bias"] != -10.0  # they train
    assert all(r["tokens"] <= 1024 for r in records) and result.plot.exists()


@pytest.fixture(scope="module")
def batch():
    config = SigLIPConfig()
    photos = load_photos()
    packed, views = draw_batch(photos, config.processor(), 700, step_random(0, 1), config.views,
                               max_images=len(photos))
    return packed, [v.caption for v in views]


def test_a_batch_holds_distinct_photos(batch):
    packed, captions = batch
    assert packed.num_images == len(captions) >= 2 and len(set(captions)) == len(captions)


def test_loss_matches_a_float64_siglip_of_the_embeddings(batch):
    packed, captions = batch
    torch.manual_seed(0)
    model = SigLIPModel(CogViT(SigLIPConfig().student_config()), TextConfig(), ByteTokenizer())
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10
    image_emb, text_emb = model(packed, captions)
    assert image_emb.shape == text_emb.shape == (len(captions), 64)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(len(captions)))
    from glm5v_kernels import siglip_loss

    loss = siglip_loss(image_emb, text_emb, model.logit_scale, model.logit_bias)
    logits = math.exp(model.logit_scale.item()) * image_emb.double() @ text_emb.double().T + model.logit_bias.item()
    labels = 2 * torch.eye(len(captions), dtype=torch.float64) - 1
    expected = -torch.nn.functional.logsigmoid(labels * logits).sum() / len(captions)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    # image i's embedding is the projected mean of its own patch features, whatever else is packed
    features = model.vision(packed).features
    a, b = packed.cu_seqlens[1].item(), packed.cu_seqlens[2].item()
    alone = torch.nn.functional.normalize(model.image_proj(features[a:b].mean(0)), dim=-1)
    torch.testing.assert_close(image_emb[1], alone, rtol=1e-5, atol=1e-6)


def test_segment_mean_and_caption_packing():
    x = torch.randn(10, 3)
    cu = torch.tensor([0, 1, 4, 10], dtype=torch.int32)
    expected = torch.stack([x[a:b].mean(0) for a, b in zip(cu[:-1], cu[1:])])
    torch.testing.assert_close(segment_mean(x, cu), expected)
    ids, cu = encode_captions(["a cat", "thé"], ByteTokenizer(), max_tokens=8)
    assert cu.tolist() == [0, 5, 9] and bytes(ids[:5].tolist()) == b"a cat"
    assert bytes(ids[5:].tolist()).decode() == "thé"  # 4 bytes: é is two
    with pytest.raises(ValueError, match="caption 0 .* has 9 tokens; captions need 1 to 8"):
        encode_captions(["123456789"], ByteTokenizer(), max_tokens=8)


def test_resume_continues_the_uninterrupted_trajectory(tmp_path):
    assert_resume_replays(train_siglip, siglip_config(tmp_path, batch_tokens=512))


def test_starts_from_a_stage1_checkpoint(tmp_path):
    stage1 = train_mim(MIMConfig(out=str(tmp_path / "mim"), steps=1, batch_tokens=256, progress=False))
    from safetensors.torch import load_file

    student = {k.removeprefix("student."): v for k, v in load_file(stage1.checkpoint / "model.safetensors").items()
               if k.startswith("student.")}
    vision = CogViT(SigLIPConfig().student_config())
    load_stage1_student(vision, stage1.checkpoint)
    assert all(torch.equal(vision.state_dict()[k], v) for k, v in student.items())
    fresh = train_siglip(siglip_config(tmp_path / "fresh", steps=1, batch_tokens=256))
    init = train_siglip(siglip_config(tmp_path / "init", steps=1, batch_tokens=256, init=str(stage1.checkpoint)))
    assert init.losses != fresh.losses  # the same batch through other image-tower weights
    with pytest.raises(ValueError, match="not a stage-1 checkpoint"):
        load_stage1_student(vision, fresh.checkpoint)
    with pytest.raises(ValueError, match="does not fit"):
        load_stage1_student(CogViT(dataclasses.replace(SigLIPConfig().student_config(), depth=3)), stage1.checkpoint)
    with pytest.raises(ValueError, match="neither"):
        load_stage1_student(vision, tmp_path / "missing")


def test_bad_input(tmp_path, batch):
    packed, captions = batch
    model = SigLIPModel(CogViT(SigLIPConfig().student_config()), TextConfig(), ByteTokenizer())
    with pytest.raises(ValueError, match=f"got {len(captions) - 1} captions for {len(captions)} images"):
        model(packed, captions[:-1])
    with pytest.raises(ValueError, match="a single string"):
        model(packed, "a photo")
    with pytest.raises(ValueError, match="caption 1 .* captions need 1 to"):
        model(packed, [captions[0], ""] + captions[2:])
    with pytest.raises(ValueError, match="dataset is empty"):
        train_siglip(siglip_config(tmp_path), samples=[])
    with pytest.raises(ValueError, match="images_per_step"):
        SigLIPConfig(batch_tokens=16, images_per_step=5)
    with pytest.raises(TypeError, match="SigLIPConfig"):
        train_siglip(MIMConfig())


def distributed_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        config = SigLIPConfig(out=out, steps=2, batch_tokens=256, images_per_step=2, checkpoint_every=0,
                              progress=False)
        result = train_siglip(config)
        torch.save({"losses": result.losses, "checkpoint": result.checkpoint, "weights": result.model.state_dict()},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_stay_in_step(tmp_path, monkeypatch):
    """Under torch.distributed: each rank draws its own batch, the loss is DistributedSigLIPLoss and
    the gradients are averaged, so the replicas stay equal; rank 0 alone writes log and checkpoint."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    # the spawned processes import this module by the name pytest gave it, from the tests folder
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"] and np.isfinite(ranks[0]["losses"]).all()
    assert ranks[0]["checkpoint"].name == "checkpoint-00000002" and ranks[1]["checkpoint"] is None
    records = [json.loads(line) for line in (tmp_path / "siglip.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and all(r["images"] == 2 for r in records)
    assert records[0]["loss"] == pytest.approx(ranks[0]["losses"][0])
    saved = load_file(ranks[0]["checkpoint"] / "model.safetensors")
    for r in ranks:  # both replicas hold the weights rank 0 saved
        assert r["weights"].keys() == saved.keys() and all(torch.equal(r["weights"][k], saved[k]) for k in saved)
    assert not torch.equal(saved["logit_bias"], torch.tensor(-10.0))  # and they trained
