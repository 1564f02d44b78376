"""What every `glm5v train ...` loop shares: the learning-rate schedule, per-step random streams,
checkpoints (safetensors, optimizer state included) that resume to the exact same trajectory,
the run log (jsonl, progress bar, PNG curves) and NVTX ranges.

Exact resume rests on one rule: everything random in step `s` draws from `step_generator(seed, s)`
/ `step_random(seed, s)`, never from a global stream, so a resumed run replays step `s` exactly as
the uninterrupted run did; the checkpoint holds the model, the optimizer and the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from glm5v_kernels.optim import Muon, muon_param_groups

CHECKPOINT_PREFIX = "checkpoint-"


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warmup over warmup_steps to 1, then a
    cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def muon_with_adamw(model: torch.nn.Module, lr: float, adamw_lr: float, weight_decay: float = 0.0) -> Muon:
    """Muon on the hidden matrices at lr, AdamW on the rest (embeddings, heads, norms, biases) at
    adamw_lr (`muon_param_groups`); every group remembers its "base_lr" for `set_lr`."""
    groups = muon_param_groups(model, weight_decay=weight_decay, base_lr=lr)
    for group in groups[1:]:
        group["base_lr"] = adamw_lr
    return Muon(groups, lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Every group's lr = its "base_lr" × multiplier; returns the first group's."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The torch random stream of one training step."""
    return torch.Generator(device=device).manual_seed(_step_seed(seed, step))


def step_random(seed: int, step: int) -> random.Random:
    """The Python random stream of one training step."""
    return random.Random(_step_seed(seed, step))


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range (visible in Nsight Systems) on CUDA machines; nothing elsewhere."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


# -- checkpoints ------------------------------------------------------------------------------------


def _to_json(value):
    """Optimizer settings as JSON: dtypes and tuples (betas) are tagged so they come back as such."""
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value):
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
        if "__tuple__" in value:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (its tensors by flat key, the rest as JSON-able data)."""
    tensors, per_param = {}, {}
    for index, entries in state["state"].items():
        per_param[str(index)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                per_param[str(index)][name] = value
    return tensors, _to_json({"state": per_param, "param_groups": state["param_groups"]})


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    rest = _from_json(rest)
    state = {int(index): dict(entries) for index, entries in rest["state"].items()}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: a DTensor (FSDP2 shard) is gathered, a collective every rank
    of its mesh must join."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def _like(full: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """A loaded whole tensor laid out like `current`: this rank's shard where current is a DTensor
    (cut locally, every rank read the same file), the tensor itself otherwise."""
    if isinstance(current, DTensor) and tuple(full.shape) == tuple(current.shape):
        return distribute_tensor(full.to(current.device), current.device_mesh, current.placements,
                                 src_data_rank=None)
    return full


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None) -> Path:
    """Write out_dir/checkpoint-<step>/ (model.safetensors, optimizer.safetensors, trainer.json)
    after the optimizer step `step` (the number of steps done). Returns the folder.

    FSDP2 (DTensor) parameters and optimizer state are saved whole: every rank must call this
    (their shards are gathered) and rank 0 writes."""
    from safetensors.torch import save_file

    folder = Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"
    weights = {name: _full(t) for name, t in model.state_dict().items()}
    seen = set()
    for name, t in weights.items():  # tied weights (one tensor under two names) are stored twice
        if t.untyped_storage().data_ptr() in seen:
            weights[name] = t.clone()
        seen.add(t.untyped_storage().data_ptr())
    state = optimizer.state_dict()
    state["state"] = {index: {name: _full(v) if isinstance(v, torch.Tensor) else v for name, v in entries.items()}
                      for index, entries in state["state"].items()}
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors")
    tensors, rest = _flatten_optimizer(state)
    save_file(tensors, folder / "optimizer.safetensors")
    (folder / "trainer.json").write_text(json.dumps({"step": step, "optimizer": rest, "extra": extra or {}}))
    return folder


def trajectory_settings(config, resumable: Collection[str]) -> dict:
    """The settings of a dataclass config that shape a run's trajectory (all but `resumable`, the
    ones a resumed run may change), as JSON values; saved in every checkpoint's extra."""
    settings = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return {k: v for k, v in settings.items() if k not in resumable}


def checkpoint_to_resume(out_dir: str | Path, resume: bool, settings: dict) -> Path | None:
    """The checks of a run that starts: with resume, the latest checkpoint in out_dir, which must
    have been written with the same trajectory `settings` (checked before any weights load:
    other settings may mean other shapes); without, out_dir must hold no checkpoint yet (a fresh
    run would mix its checkpoints with an older run's). Returns the checkpoint to load, or None."""
    out_dir = Path(out_dir)
    previous = latest_checkpoint(out_dir) if out_dir.exists() else None
    if not resume:
        if previous is not None:
            raise ValueError(f"{str(out_dir)!r} already holds checkpoints ({previous.name}): resume it or choose "
                             "another out")
        return None
    if previous is None:
        raise ValueError(f"resume: no checkpoint in {str(out_dir)!r}")
    written = json.loads((previous / "trainer.json").read_text())["extra"].get("settings", {})
    changed = sorted(k for k in settings if written.get(k) != settings[k])
    if changed:
        raise ValueError(f"resume: {previous} was written with other settings ({', '.join(changed)}); the resumed "
                         "run would not continue its trajectory")
    return previous


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    folders = sorted(Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*"))
    return folders[-1] if folders else None


def load_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore model and optimizer from a checkpoint folder; returns (steps done, extra)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "trainer.json").exists():
        raise ValueError(f"{folder} is not a checkpoint folder (no trainer.json)")
    meta = json.loads((folder / "trainer.json").read_text())
    device = next(model.parameters()).device
    current = model.state_dict()
    weights = load_file(folder / "model.safetensors", device=str(device))
    model.load_state_dict({name: _like(t, current[name]) if name in current else t for name, t in weights.items()})
    state = _unflatten_optimizer(load_file(folder / "optimizer.safetensors"), meta["optimizer"])
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state's indices
    state["state"] = {index: {name: _like(v, params[index]) if isinstance(v, torch.Tensor) else v
                              for name, v in entries.items()} for index, entries in state["state"].items()}
    optimizer.load_state_dict(state)
    return int(meta["step"]), meta["extra"]


# -- the run log ------------------------------------------------------------------------------------


@dataclass
class RunLog:
    """Appends one JSON line per logged step to out_dir/<name>.jsonl, shows a progress bar (tqdm,
    when installed and enabled), and on close draws every logged metric whose name contains
    "loss" against the step into out_dir/<name>.png."""

    out_dir: Path
    name: str
    total_steps: int
    start_step: int = 0
    progress: bool = True

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / f"{self.name}.jsonl"
        if self.start_step == 0:
            self.path.write_text("")
        else:  # a resumed run keeps the lines of the steps it did not redo
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < self.start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._bar = None
        if self.progress:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.name, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def log(self, step: int, **metrics: float) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._bar is not None:
            self._bar.update(step + 1 - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if "loss" in k})

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def close(self) -> Path | None:
        """Finish the bar and write the PNG; returns its path (None without matplotlib)."""
        if self._bar is not None:
            self._bar.close()
        return plot_losses(self.records(), self.out_dir / f"{self.name}.png", self.name)


def plot_losses(records: list[dict], path: Path, title: str) -> Path | None:
    """Every metric whose name contains "loss", against the step, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted({k for r in records for k in r if "loss" in k})
    figure, axes = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        axes.plot([p[0] for p in points], [p[1] for p in points], label=key)
    axes.set_xlabel("step")
    axes.set_title(title)
    if keys:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
