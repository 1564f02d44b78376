"""train_sft on the CPU: the loss falls on the embedded photos, the run log and plot are written, a
resumed run replays the uninterrupted one exactly, resume guards, and --vit-init loads a CogViT
checkpoint written under a prefix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm5v.data.embedded import ViewConfig, load_photos
from glm5v.data.sft import SFTDataConfig
from glm5v.models.cogvit import CogViT, cogvit_tiny
from glm5v.models.vlm import VLM, vlm_tiny
from glm5v.train.sft import SFTConfig, load_vit_init, train_sft

DATA = SFTDataConfig(samples_per_step=4, max_pack_tokens=256, views=ViewConfig(min_side=24, max_side=96))


def config(tmp_path, **overrides) -> SFTConfig:
    return SFTConfig(**{"out": str(tmp_path / "run"), "data": DATA, "progress": False, "vit_recompute": "none",
                        **overrides})


def test_loss_falls_and_the_run_is_logged(tmp_path):
    result = train_sft(config(tmp_path, steps=20, checkpoint_every=0, vit_recompute="selective"),
                       photos=load_photos()[:8])
    assert len(result.losses) == len(result.main_losses) == len(result.mtp_losses) == 20
    first, last = sum(result.main_losses[:3]) / 3, sum(result.main_losses[-3:]) / 3
    assert last < first - 1.0, result.main_losses
    for depth in range(2):
        assert result.mtp_losses[-1][depth] < result.mtp_losses[0][depth] - 0.5
    for total, main, depths in zip(result.losses, result.main_losses, result.mtp_losses):
        assert total == pytest.approx(main + 0.1 / 2 * sum(depths))
    assert all(0 <= a <= 1 for step in result.mtp_accuracies for a in step)
    records = [json.loads(line) for line in result.log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(20))
    assert records[-1]["main_loss"] == pytest.approx(result.main_losses[-1])
    assert {"mtp1_loss", "mtp2_loss", "mtp1_accuracy", "lr"} <= records[0].keys()
    assert result.plot is None or result.plot.stat().st_size > 0
    assert result.checkpoint.name == "checkpoint-00000020"
    assert result.tokens_per_second > 0 and result.peak_memory_bytes > 0


def test_resume_replays_the_same_trajectory(tmp_path):
    photos = load_photos()[:5]
    whole = train_sft(config(tmp_path / "a", steps=4, checkpoint_every=2, visual_input="mask"), photos=photos)
    first = train_sft(config(tmp_path / "b", steps=2, checkpoint_every=2, visual_input="mask"), photos=photos)
    rest = train_sft(config(tmp_path / "b", steps=4, checkpoint_every=2, visual_input="mask", resume=True),
                     photos=photos)
    assert rest.start_step == 2
    assert first.losses + rest.losses == whole.losses
    assert rest.mtp_losses == whole.mtp_losses[2:]
    a, b = load_file(whole.checkpoint / "model.safetensors"), load_file(rest.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in rest.log.read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="other settings"):
        train_sft(config(tmp_path / "b", steps=5, visual_input="placeholder", resume=True), photos=photos)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_sft(config(tmp_path / "b", steps=5, visual_input="mask"), photos=photos)
    with pytest.raises(ValueError, match="no checkpoint"):
        train_sft(config(tmp_path / "c", resume=True), photos=photos)


def test_vit_init_loads_a_prefixed_cogvit(tmp_path):
    """A stage checkpoint: the student under "student." (with a mask token and a merger to another
    width) beside a head; the tower is loaded, the mismatched merger kept fresh."""
    torch.manual_seed(3)
    student = CogViT(cogvit_tiny(mask_token=True))
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state["heads.0.weight"] = torch.randn(4, 4)
    folder = tmp_path / "checkpoint-00000010"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    model = VLM(vlm_tiny())
    merger_before = model.vision.merger.proj.weight.clone()
    fresh = load_vit_init(model, folder)
    assert fresh and all(name.startswith("merger.") for name in fresh)
    for name, value in model.vision.state_dict().items():
        if not name.startswith("merger."):
            assert torch.equal(value, student.state_dict()[name]), name
    assert torch.equal(model.vision.merger.proj.weight, merger_before)
    del state["student.blocks.1.attn.qkv.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.weight"):
        load_vit_init(VLM(vlm_tiny()), folder)
    with pytest.raises(ValueError, match="vit_init"):
        load_vit_init(VLM(vlm_tiny()), tmp_path / "nowhere")


def test_command_line(tmp_path, capsys):
    from glm5v.cli import main

    out = tmp_path / "cli"
    assert main(["train", "sft", "--steps", "2", "--out", str(out), "--mtp-depths", "1", "--visual-input",
                 "embedding", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "main loss" in printed and "checkpoint-00000002" in printed
    records = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "mtp1_loss" in records[0] and "mtp2_loss" not in records[0]
    assert main(["train", "sft", "--steps", "2", "--out", str(out)]) == 2  # holds checkpoints, no --resume


@pytest.mark.parametrize("overrides,match", [
    pytest.param(dict(model="huge"), "model", id="model"),
    pytest.param(dict(visual_input="pixels"), "visual_input", id="variant"),
    pytest.param(dict(vit_recompute="some"), "vit_recompute", id="recompute"),
    pytest.param(dict(steps=0), "steps", id="steps"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        SFTConfig(**overrides)
