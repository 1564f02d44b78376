"""train_sft under FSDP2 on 2 CPU processes (gloo): each rank runs half the packs of the same
global batches, and the losses, MMTP depth losses and trained weights equal those of one process
running every pack, to fp32 rounding. The 2-process run stops after 2 steps and resumes from its
checkpoint (gathered on save, re-sharded on load, optimizer state included) for the third."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from glm5v.data.embedded import ViewConfig, load_photos
from glm5v.data.sft import SFTDataConfig
from glm5v.train.sft import SFTConfig, train_sft

WORLD = 2
PHOTOS = 6


def config(out: str, steps: int, resume: bool = False) -> SFTConfig:
    data = SFTDataConfig(samples_per_step=6, max_pack_tokens=200, views=ViewConfig(min_side=24, max_side=96))
    return SFTConfig(steps=steps, out=out, data=data, resume=resume, warmup_steps=1, checkpoint_every=2,
                     progress=False)


def worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    photos = load_photos()[:PHOTOS]
    first = train_sft(config(out, 2), photos=photos)
    rest = train_sft(config(out, 3, resume=True), photos=photos)
    torch.save({"losses": first.losses + rest.losses, "mtp": first.mtp_losses + rest.mtp_losses,
                "main": first.main_losses + rest.main_losses}, f"{out}/rank{rank}.pt")
    dist.barrier()  # both ranks are done communicating
    # Leave without interpreter teardown (gloo's threads may abort it; see test_muon_distributed).
    os._exit(0)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    single = train_sft(config(str(tmp_path / "single"), 3), photos=load_photos()[:PHOTOS])
    out = tmp_path / "fsdp"
    mp.spawn(worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    expected = torch.tensor(single.losses, dtype=torch.float64)
    for rank in range(WORLD):
        got = torch.load(out / f"rank{rank}.pt")
        error = ((torch.tensor(got["losses"]) - expected).abs() / expected).max().item()
        assert error < 1e-5, (rank, got["losses"], single.losses)
        assert torch.allclose(torch.tensor(got["main"]), torch.tensor(single.main_losses), rtol=1e-5, atol=0)
        assert torch.allclose(torch.tensor(got["mtp"]), torch.tensor(single.mtp_losses), rtol=1e-5, atol=0)
    a = load_file(single.checkpoint / "model.safetensors")
    b = load_file(out / single.checkpoint.name / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(b[name], a[name], rtol=0, atol=2e-5), (name, (b[name] - a[name]).abs().max())
    weight_error = max((b[name] - a[name]).abs().max().item() for name in a)
    print(f"FSDP2 vs one process: loss max relative error {error:.2e}, weights max abs error {weight_error:.2e}")
