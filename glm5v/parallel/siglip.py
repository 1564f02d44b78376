"""SigLIP loss over data-parallel ranks: images stay put, text blocks travel around a ring.

Each of the W ranks holds B image and B text embeddings. Rank r computes its images against its
own texts (positives on the diagonal) and then against every other rank's text block (no
positives), receiving the blocks one hop at a time from its ring neighbour; the (B, W·B) logits
are never formed (each block goes through the tile-wise `glm5v_kernels.siglip_loss`) and the
texts are never all-gathered at once, only passed on. In backward every hop runs in reverse,
so the gradient of a text block computed on rank r flows back, hop by hop, to the rank that owns
it, picking up on its way the contributions of the ranks it passed.

Loss convention (the one DDP / FSDP gradient averaging expects): rank r returns

    L_r = −(1/B)·Σ_{i on r} Σ_{j on any rank} log σ(l_ij·z_ij)

so the mean of L_r over the ranks is the single-process loss on the concatenated batch (W·B
images, summed over W·B texts, averaged over the images), and parameter gradients averaged over
the ranks equal the single-process gradients. The gradient each rank sees on its own embeddings
is that of Σ_r L_r, i.e. W times the single-process one, which the averaging divides back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from glm5v_kernels import siglip_loss


def _ring_exchange(tensor: torch.Tensor, group: dist.ProcessGroup, forward: bool) -> torch.Tensor:
    """Send `tensor` to the next rank and return the previous rank's (forward), or the reverse."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    step = 1 if forward else -1
    send_to = dist.get_global_rank(group, (rank + step) % world)
    recv_from = dist.get_global_rank(group, (rank - step) % world)
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, send_to, group), dist.P2POp(dist.irecv, received, recv_from, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingShift(torch.autograd.Function):
    """One hop of the ring: forward receives the previous rank's block, backward sends the
    block's gradient back to it (and receives the next rank's)."""

    @staticmethod
    def forward(ctx, block: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _ring_exchange(block.contiguous(), group, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ring_exchange(grad.contiguous(), ctx.group, forward=False), None


class DistributedSigLIPLoss(nn.Module):
    """SigLIP loss of the global batch, each rank passing its local (B, D) embeddings.

    forward(image_emb (B, D), text_emb (B, D), logit_scale, logit_bias) -> this rank's term L_r
    (a 0-dim float32 tensor; see the module docstring: the global loss is the mean over ranks).
    logit_scale is the log of the temperature, as in `glm5v_kernels.siglip_loss`. Every rank must
    pass the same B and D; with check_batch_sizes (the default) a small all_gather of the shapes
    checks that on every call and raises ValueError on mismatch (turn it off to save the host
    sync it costs on a GPU). group: the process group of the data-parallel ranks (default WORLD).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, check_batch_sizes: bool = True):
        super().__init__()
        self.group = group
        self.check_batch_sizes = check_batch_sizes

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
        if not isinstance(image_emb, torch.Tensor) or not isinstance(text_emb, torch.Tensor):
            raise TypeError("image_emb and text_emb must be torch.Tensors")
        if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
            raise ValueError(f"image_emb and text_emb must both have shape (B, D) on every rank, got "
                             f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedSigLIPLoss needs an initialised torch.distributed process group "
                               "(call torch.distributed.init_process_group first); for one process use "
                               "glm5v_kernels.siglip_loss")
        group = self.group if self.group is not None else dist.group.WORLD
        if self.check_batch_sizes:
            self._check_shapes(image_emb, group)
        # The own block first, then one hop per other rank: after k hops this rank holds the
        # text block of rank (r − k) mod W.
        loss = siglip_loss(image_emb, text_emb, logit_scale, logit_bias)
        block = text_emb
        for _ in range(dist.get_world_size(group) - 1):
            block = _RingShift.apply(block, group)
            loss = loss + siglip_loss(image_emb, block, logit_scale, logit_bias, positives="none")
        return loss

    @staticmethod
    def _check_shapes(image_emb: torch.Tensor, group: dist.ProcessGroup) -> None:
        mine = torch.tensor(image_emb.shape, dtype=torch.int64, device=image_emb.device)
        shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shapes, mine, group=group)
        shapes = [tuple(s.tolist()) for s in shapes]
        if len(set(shapes)) != 1:
            raise ValueError(f"every rank must pass embeddings of one shape (B, D); the ranks passed {shapes}")
