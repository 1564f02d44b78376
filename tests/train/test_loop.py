"""The trainer layer's shared loop pieces (glm5v/train/loop.py): schedule, per-step random streams,
checkpoints that resume to the same trajectory, and the run log."""

from __future__ import annotations

import json

import pytest
import torch

from glm5v.train.loop import (
    RunLog,
    cosine_with_warmup,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_generator,
)
from glm5v_kernels.optim import Muon, muon_param_groups


def test_cosine_with_warmup():
    assert [cosine_with_warmup(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert cosine_with_warmup(2, 10, 2) == pytest.approx(1.0)
    assert cosine_with_warmup(6, 10, 2) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cosine_with_warmup(10, 10, 2) == pytest.approx(0.1)
    assert cosine_with_warmup(50, 10, 2) == pytest.approx(0.1)


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    return model, Muon(muon_param_groups(model), lr=0.05, ns_dtype=torch.float32)


def train(model, optimizer, steps, seed=3):
    losses = []
    for step in steps:
        generator = step_generator(seed, step)
        x = torch.randn(32, 12, generator=generator)
        y = torch.randint(0, 3, (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_resume_replays_the_uninterrupted_trajectory(tmp_path):
    model, optimizer = model_and_optimizer()
    uninterrupted = train(model, optimizer, range(6))

    model, optimizer = model_and_optimizer()
    first = train(model, optimizer, range(3))
    save_checkpoint(tmp_path, 3, model, optimizer, extra={"data_seed": 3})
    model, optimizer = model_and_optimizer()  # a fresh process would start here
    done, extra = load_checkpoint(latest_checkpoint(tmp_path), model, optimizer)
    assert done == 3 and extra == {"data_seed": 3}
    assert first + train(model, optimizer, range(done, 6)) == uninterrupted
    assert optimizer.param_groups[0]["ns_dtype"] is torch.float32  # settings survive the JSON round trip


def test_latest_checkpoint_and_bad_folder(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, optimizer = model_and_optimizer()
    for step in (2, 10):
        save_checkpoint(tmp_path, step, model, optimizer)
    assert latest_checkpoint(tmp_path).name.endswith("00000010")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(tmp_path, model, optimizer)


def test_run_log_writes_lines_keeps_them_on_resume_and_plots(tmp_path):
    log = RunLog(tmp_path, "stage", total_steps=4, progress=False)
    for step in range(4):
        log.log(step, loss=1.0 / (step + 1), lr=0.1)
    assert log.close().exists()
    resumed = RunLog(tmp_path, "stage", total_steps=4, start_step=2, progress=False)
    resumed.log(2, loss=9.0)
    lines = [json.loads(line) for line in (tmp_path / "stage.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2] and lines[-1]["loss"] == 9.0
