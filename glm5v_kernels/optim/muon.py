"""Muon with an AdamW companion in one optimizer.

Parameter groups with ``use_muon=True`` get Muon: Nesterov momentum, then the momentum update
orthogonalised by Newton–Schulz (`glm5v_kernels.newton_schulz`), scaled by `adjust_lr`, with
decoupled weight decay. Every other group gets AdamW. `muon_param_groups(model)` builds the
usual split (hidden matrices to Muon; embeddings, heads, norms, biases to AdamW).

Shapes: 2-D weights are orthogonalised as they are; 3-D weights (stacked experts or heads) per
slice; 4-D and larger (convolutions) flattened to (out, -1). A group's ``split_sizes`` (along
dim 0) orthogonalises blocks of a fused weight separately, e.g. the q, k, v blocks of a fused QKV
projection. Updates of the same shape are stacked and orthogonalised in one batched call.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from glm5v_kernels.ops.muon import newton_schulz

ADJUST_LR = ("original", "match_rms_adamw", None)


def adjusted_lr(lr: float, rows: int, cols: int, adjust_lr: str | None) -> float:
    """The learning rate of one orthogonalised (rows, cols) block."""
    if adjust_lr == "original":  # Keller Jordan's Muon
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":  # Moonlight: the update RMS of AdamW, so its lr/wd carry over
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others.

    Distributed: FSDP2 parameters (DTensors sharded on dim 0 of a 1-D mesh) are handled as they
    come: each parameter's update is gathered to one owner rank (round-robin), orthogonalised
    there with the other same-shape updates it owns in one batched call, and its rows scattered
    back. Replicated parameters (DDP) orthogonalise everything on every rank unless
    `replicated_group` names their process group: then each rank orthogonalises a round-robin
    share and broadcasts it. Either way the result equals single-process Muon.

    State: ``momentum_buffer`` for Muon parameters (as in torch.optim.Muon); ``step``,
    ``exp_avg``, ``exp_avg_sq`` for AdamW parameters (as in torch.optim.AdamW).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_coefficients="jordan",
                 ns_dtype: torch.dtype | None = None, adjust_lr: str | None = "original", eps: float = 1e-7,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8, replicated_group=None):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"adjust_lr must be one of {ADJUST_LR}, got {adjust_lr!r}")
        if not all(0.0 <= b < 1.0 for b in adamw_betas) or len(adamw_betas) != 2:
            raise ValueError(f"adamw_betas must be two floats in [0, 1), got {adamw_betas}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, ns_dtype=ns_dtype, adjust_lr=adjust_lr, eps=eps,
                        adamw_betas=adamw_betas, adamw_eps=adamw_eps, use_muon=False, split_sizes=None)
        super().__init__(params, defaults)
        self.replicated_group = replicated_group
        if not any(group["use_muon"] for group in self.param_groups):
            raise ValueError("no parameter group has use_muon=True, so Muon would run AdamW only; build the groups "
                             "with glm5v_kernels.optim.muon_param_groups(model)")
        names = _parameter_labels(self.param_groups)
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"parameter {names[p]} has shape {tuple(p.shape)}: Muon needs matrices (2-D or "
                                     "more); put it in a group without use_muon (AdamW)")
                _check_split(p, group["split_sizes"], names[p])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        updates = []
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            updates.append(p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        layout = _Layout.of(params, self.replicated_group)
        gathered = {i: layout.gather(i, u) for i, u in enumerate(updates)}
        deltas = _scaled_directions({i: u for i, u in gathered.items() if u is not None}, group)
        for i, p in enumerate(params):
            delta = layout.distribute(i, deltas.get(i), updates[i])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            _local(p).sub_(delta.to(p.dtype))

    def _adamw_group(self, group) -> None:
        beta1, beta2 = group["adamw_betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["adamw_eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))


def _scaled_directions(updates: dict[int, torch.Tensor], group) -> dict[int, torch.Tensor]:
    """Full updates -> lr-scaled orthogonal directions of the same shapes; blocks of one shape
    across all updates go through Newton–Schulz in one batched call."""
    blocks = [(i, block) for i, update in updates.items() for block in _blocks(update, group["split_sizes"])]
    by_shape = defaultdict(list)
    for j, (_, block) in enumerate(blocks):
        by_shape[(block.shape, block.dtype, block.device)].append(j)
    orthogonal: list[torch.Tensor | None] = [None] * len(blocks)
    for indices in by_shape.values():
        result = newton_schulz(torch.stack([blocks[j][1] for j in indices]), steps=group["ns_steps"],
                               coefficients=group["ns_coefficients"], eps=group["eps"], dtype=group["ns_dtype"])
        for j, r in zip(indices, result.unbind(0)):
            orthogonal[j] = r * adjusted_lr(group["lr"], r.shape[-2], r.shape[-1], group["adjust_lr"])
    per_update = defaultdict(list)
    for (i, _), r in zip(blocks, orthogonal):
        per_update[i].append(r.reshape(r.shape[0], -1) if group["split_sizes"] else r)
    return {i: torch.cat(parts).reshape(updates[i].shape) for i, parts in per_update.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


class _Layout:
    """Where each parameter's full update lives and how its direction gets back.

    local: one process, or replicated parameters without a process group: everything is local.
    replicated: identical parameters on every rank of a group (DDP); parameter i is
        orthogonalised by rank i % world and broadcast from it.
    sharded: FSDP2 DTensors sharded on dim 0 over a 1-D mesh; parameter i's row shards are
        gathered to rank i % world, orthogonalised there and its rows scattered back.
    """

    def __init__(self, kind: str, group=None):
        import torch.distributed as dist

        self.kind, self.group = kind, group
        self.world = dist.get_world_size(group) if kind != "local" else 1
        self.rank = dist.get_rank(group) if kind != "local" else 0

    @classmethod
    def of(cls, params, replicated_group) -> _Layout:
        sharded = [_is_dtensor(p) for p in params]
        if any(sharded):
            if not all(sharded):
                raise ValueError("a Muon group mixes DTensor (FSDP2) and plain parameters; keep them in separate "
                                 "groups")
            meshes = {id(p.device_mesh) for p in params}
            for p in params:
                from torch.distributed.tensor import Shard

                if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                    raise ValueError(f"Muon supports DTensor parameters sharded on dim 0 of a 1-D mesh (FSDP2), got "
                                     f"placements {p.placements} on a {p.device_mesh.ndim}-D mesh")
            if len(meshes) != 1:
                raise ValueError("the DTensor parameters of a Muon group must share one device mesh")
            return cls("sharded", params[0].device_mesh.get_group())
        if replicated_group is not None:
            return cls("replicated", replicated_group)
        return cls("local")

    def owns(self, i: int) -> bool:
        return i % self.world == self.rank

    def _owner(self, i: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.group, i % self.world)

    def _row_chunks(self, rows: int) -> tuple[int, list[tuple[int, int]]]:
        """Padded chunk length and the (start, end) rows of every rank, as Shard(0) splits them."""
        chunk = -(-rows // self.world)
        return chunk, [(min(r * chunk, rows), min((r + 1) * chunk, rows)) for r in range(self.world)]

    def gather(self, i: int, update: torch.Tensor) -> torch.Tensor | None:
        """Parameter i's full update on its owner, None elsewhere (every rank calls it)."""
        if self.kind != "sharded":
            return update if self.owns(i) else None
        import torch.distributed as dist

        chunk, spans = self._row_chunks(update.shape[0])
        padded = _pad_rows(update.to_local(), chunk)
        pieces = [torch.empty_like(padded) for _ in range(self.world)] if self.owns(i) else None
        dist.gather(padded, pieces, dst=self._owner(i), group=self.group)
        if pieces is None:
            return None
        return torch.cat([piece[: end - start] for piece, (start, end) in zip(pieces, spans)])

    def distribute(self, i: int, delta: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
        """This rank's part of parameter i's direction."""
        if self.kind == "local":
            return delta
        import torch.distributed as dist

        if self.kind == "replicated":
            if delta is None:
                delta = torch.empty_like(update)
            dist.broadcast(delta, src=self._owner(i), group=self.group)
            return delta
        local = update.to_local()
        chunk, spans = self._row_chunks(update.shape[0])
        received = local.new_empty((chunk, *local.shape[1:]))
        pieces = None
        if self.owns(i):
            pieces = [_pad_rows(delta[start:end], chunk) for start, end in spans]
        dist.scatter(received, pieces, src=self._owner(i), group=self.group)
        return received[: local.shape[0]]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _blocks(update: torch.Tensor, split_sizes: Sequence[int] | None) -> list[torch.Tensor]:
    """The matrices (or stacks of matrices) one update is orthogonalised as."""
    if split_sizes:
        return [block.reshape(block.shape[0], -1) for block in update.split(list(split_sizes), dim=0)]
    if update.ndim >= 4:  # convolutions: (out, in * kernel)
        return [update.reshape(update.shape[0], -1)]
    return [update]  # 2-D, or 3-D stacked matrices orthogonalised per slice


def _check_split(p: torch.Tensor, split_sizes, name: str) -> None:
    if split_sizes is None:
        return
    if not all(isinstance(s, int) and s > 0 for s in split_sizes) or sum(split_sizes) != p.shape[0]:
        raise ValueError(f"split_sizes {tuple(split_sizes)} must be positive ints summing to dim 0 of {name} "
                         f"(shape {tuple(p.shape)})")


def _parameter_labels(groups) -> dict[torch.Tensor, str]:
    """Names from named parameter groups (as muon_param_groups builds), else group and index."""
    labels = {}
    for g, group in enumerate(groups):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            labels[p] = repr(names[i]) if names else f"group {g} param {i}"
    return labels


DEFAULT_ADAMW_NAMES = ("embed", "lm_head", "output_head", "head.weight", "pos_", "position", "patch", "cls_token",
                       "mask_token", "norm")


def muon_param_groups(model: nn.Module, exclude: Iterable[str] = DEFAULT_ADAMW_NAMES, **muon_options) -> list[dict]:
    """[{"params": hidden matrices, "use_muon": True, **muon_options}, {"params": the rest}], with the
    parameters named (torch's named parameter groups), so errors and state dicts carry the names.

    AdamW gets: parameters with fewer than 2 dims (biases, norm gains), weights of nn.Embedding
    modules, and parameters whose name contains any string of `exclude` (embeddings, output
    heads, patch and position embeddings, norms by default). Each parameter is listed once, even
    when tied."""
    exclude = tuple(exclude)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    muon, adamw = [], []
    for name, p in model.named_parameters():  # named_parameters skips tied duplicates
        if not p.requires_grad:
            continue
        to_adamw = p.ndim < 2 or id(p) in embedding_weights or any(pattern in name for pattern in exclude)
        (adamw if to_adamw else muon).append((name, p))
    groups = [{"params": muon, "use_muon": True, **muon_options}]
    if adamw:
        groups.append({"params": adamw, "use_muon": False})
    return groups
