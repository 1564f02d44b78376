"""`glm5v train cogvit-mim` and `glm5v train cogvit-siglip` (glm5v/cli.py) end to end into a tmp dir."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from glm5v.cli import main

pytest.importorskip("skimage")
pytest.importorskip("transformers")

BUDGET = ["--batch-tokens", "256", "--checkpoint-every", "2", "--no-progress"]
SMALL = ["--steps", "3", *BUDGET]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_stages_run_resume_and_chain(tmp_path, capsys):
    mim = tmp_path / "mim"
    assert main(["train", "cogvit-mim", "--out", str(mim), "--seed", "1", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "steps 0-2: loss" in printed and str(mim / "checkpoint-00000003") in printed
    assert [r["step"] for r in records(mim / "mim.jsonl")] == [0, 1, 2]
    assert (mim / "mim.png").stat().st_size > 0
    assert {p.name for p in mim.glob("checkpoint-*")} == {"checkpoint-00000002", "checkpoint-00000003"}
    weights = load_file(mim / "checkpoint-00000003" / "model.safetensors")
    assert any(k.startswith("student.blocks.") for k in weights) and "heads.dino.2.weight" in weights
    assert (mim / "checkpoint-00000003" / "optimizer.safetensors").exists()

    # --resume with more steps continues from step 3
    assert main(["train", "cogvit-mim", "--out", str(mim), "--seed", "1", "--resume", "--steps", "4", *BUDGET]) == 0
    assert [r["step"] for r in records(mim / "mim.jsonl")] == [0, 1, 2, 3]
    assert "steps 3-3" in capsys.readouterr().out

    siglip = tmp_path / "siglip"
    assert main(["train", "cogvit-siglip", "--out", str(siglip), "--init", str(mim / "checkpoint-00000004"),
                 *SMALL]) == 0
    lines = records(siglip / "siglip.jsonl")
    assert len(lines) == 3 and lines[0]["loss"] > 0 and (siglip / "siglip.png").exists()
    assert (siglip / "checkpoint-00000003" / "model.safetensors").exists()


def test_siglip_on_a_folder_of_images(tmp_path):
    import numpy as np
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("red.png", (90, 60)), ("noise.png", (50, 120)), ("bars.png", (70, 70))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(data / name)
    (data / "captions.jsonl").write_text(json.dumps({"file": "red.png", "caption": "a red square"}) + "\n")
    assert main(["train", "cogvit-siglip", "--data", str(data), "--out", str(tmp_path / "run"), *SMALL]) == 0
    assert all(1 <= r["images"] <= 3 for r in records(tmp_path / "run" / "siglip.jsonl"))


def test_bad_input_exits_with_a_message(tmp_path, capsys):
    assert main(["train", "cogvit-siglip", "--out", str(tmp_path), "--resume", *SMALL]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "cogvit-mim", "--out", str(tmp_path), "--data", str(tmp_path / "nowhere"), *SMALL]) == 2
    assert "--data must be a folder" in capsys.readouterr().err
    assert main(["train", "cogvit-mim", "--out", str(tmp_path), "--teacher-dino", str(tmp_path), *SMALL]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "cogvit-mim", "--config", "huge"])
