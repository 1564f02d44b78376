"""`glm5v demo --smoke` and `glm5v experiment mmtp-variants` end to end on the embedded photos."""

from __future__ import annotations

import json
import math
from pathlib import Path

from glm5v.cli import main
from glm5v.train.demo import VISUAL_INPUTS, MMTPVariantsConfig, run_mmtp_variants


def test_demo_smoke_runs_every_stage(tmp_path, capsys):
    assert main(["demo", "--smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["stage"].split(":")[0] for r in rows] == ["pack 20 photos", "stage 1", "stage 2", "SFT with MMTP"]
    for row in rows[1:]:
        assert row["steps"] == 2 and math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])
        assert row["tokens_per_second"] > 0 and row["peak_memory_bytes"] > 0
        assert row["kernel_path"] == "PyTorch reference (CPU)"
        assert Path(row["log"]).exists() and Path(row["plot"]).exists()
    for stage in ("cogvit-mim", "cogvit-siglip", "sft"):
        assert list((tmp_path / stage).glob("checkpoint-*")), stage
        assert list((tmp_path / stage).glob("*.png")), stage
    printed = capsys.readouterr().out
    assert "| SFT with MMTP | 2 |" in printed and (tmp_path / "summary.md").read_text().strip() in printed


def test_mmtp_variants_table_and_plot(tmp_path):
    results = run_mmtp_variants(MMTPVariantsConfig(out=str(tmp_path), steps=3, progress=False))
    assert [r.visual_input for r in results] == list(VISUAL_INPUTS)
    # same seed and data: the main branch sees the same first batch, whatever the MTP input
    assert len({r.main_losses[0] for r in results}) == 1
    table = (tmp_path / "variants.md").read_text()
    assert all(f"| {name} |" in table for name in VISUAL_INPUTS)
    assert (tmp_path / "variants.png").exists()
