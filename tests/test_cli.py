"""The `glm5v` command (glm5v/cli.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm5v.cli import environment_report, main
from glm5v_kernels.data import NaFlexProcessor, pack_images

Image = pytest.importorskip("PIL.Image")


def test_env_reports_the_machine(capsys):
    report = environment_report()
    assert report["torch"] == torch.__version__
    assert report["host extension"].startswith("built")
    assert main(["env"]) == 0
    assert "host extension" in capsys.readouterr().out


def test_pack_files_saves_what_pack_images_gives(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (70, 130, 3), dtype=np.uint8), rng.integers(0, 256, (90, 40), dtype=np.uint8)]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(array).save(paths[-1])
    out = tmp_path / "packed.pt"
    assert main(["pack", *map(str, paths), "--max-num-patches", "30", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 images" in printed and str(paths[0]) in printed
    saved = torch.load(out)
    expected = pack_images(arrays, NaFlexProcessor(max_num_patches=30))
    assert torch.equal(saved["patches"], expected.patches)
    assert torch.equal(saved["position_ids"], expected.position_ids)


def test_pack_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["pack", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "missing.png"), "--max-num-patches", "0"]) == 2
    assert "max_num_patches" in capsys.readouterr().err
