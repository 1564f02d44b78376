"""The mtp family in plain PyTorch: the specification and the CPU path.

Linear cross-entropy. For a row i with target t (not ``ignore_index``) and the logits
``u = hidden[i] · Wᵀ + b`` (float32; ``z = softcap · tanh(u / softcap)`` when a softcap is given,
else ``z = u``):

    lse  = log Σ_j exp(z_j)
    loss = lse − (1 − ε)·z_t − (ε / V)·Σ_j z_j + z_loss · lse²

(ε = label_smoothing; the smoothing term is F.cross_entropy's: the mean over the classes of
−log p_j). Ignored rows have loss 0 and no gradient. Row i's gradient with respect to the
logits u, given the upstream gradient g_i of its loss, is

    du_j = g_i · [(1 + 2·z_loss·lse)·p_j − (1 − ε)·[j = t] − ε / V] · (1 − (z_j / softcap)²)

with p_j = exp(z_j − lse) (the last factor only with a softcap). From it dhidden = du · W,
dW = duᵀ · hidden, db = Σ_i du.

The functions here walk the rows and the vocabulary in chunks, so the (N, V) logits never exist
at once: peak extra memory is a few (row chunk × vocab chunk) float32 buffers plus the float32
gradients, which is what makes the CPU path usable at a real vocabulary size.

Embeddings: :func:`embed_with_placeholder` gathers ``weight[where(is_visual, placeholder_id, ids)]``
(optionally RMS-normalised); :func:`merge_visual_embeddings` scatters visual embeddings into their
positions; :func:`shift_within_documents` is the packed-document-aware left shift of ``mtp_roll``.
"""

from __future__ import annotations

import torch

# Chunk sizes of the CPU path: a 512 × 4096 float32 logits chunk is 8 MiB.
ROW_CHUNK = 512
VOCAB_CHUNK = 4096


def _capped(u: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return u if softcap is None else softcap * torch.tanh(u / softcap)


def _logits_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int,
                  softcap: float | None) -> torch.Tensor:
    """Float32 logits of the rows h (already float32) against vocabulary rows [v0, v1)."""
    u = h @ weight[v0:v1].float().T
    if bias is not None:
        u = u + bias[v0:v1].float()
    return _capped(u, softcap)


def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) ->

    loss (N,) float32 (0 at ignored rows), lse (N,) float32 (of every row, ignored ones too: the
    backward needs finite values everywhere), correct (N,) bool (the target holds the largest
    logit; False at ignored rows).
    """
    n, v = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0).long()
    loss = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros_like(loss)
    correct = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    for r0 in range(0, n, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, n)
        h = hidden[r0:r1].float()
        t = safe_targets[r0:r1]
        row_max = torch.full((r1 - r0,), -torch.inf, device=hidden.device)
        sum_exp = torch.zeros(r1 - r0, device=hidden.device)
        sum_z = torch.zeros(r1 - r0, device=hidden.device)
        z_t = torch.zeros(r1 - r0, device=hidden.device)
        for v0 in range(0, v, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, v)
            z = _logits_chunk(h, weight, bias, v0, v1, softcap)
            # The target logit taken from the same logits as the max, so `correct` compares like with like.
            in_chunk = (t >= v0) & (t < v1)
            z_t = z_t + torch.where(in_chunk, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
            new_max = torch.maximum(row_max, z.amax(-1))
            sum_z = sum_z + z.sum(-1)
            sum_exp = sum_exp * torch.exp(row_max - new_max) + z.sub_(new_max[:, None]).exp_().sum(-1)
            row_max = new_max
            del z
        chunk_lse = row_max + torch.log(sum_exp)
        chunk_loss = chunk_lse - (1.0 - label_smoothing) * z_t - (label_smoothing / v) * sum_z
        chunk_loss = chunk_loss + z_loss * chunk_lse * chunk_lse
        ok = valid[r0:r1]
        loss[r0:r1] = torch.where(ok, chunk_loss, 0.0)
        lse[r0:r1] = chunk_lse
        correct[r0:r1] = ok & (z_t >= row_max)
    return loss, lse, correct


def linear_cross_entropy_backward(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor,
                                  ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
                                  need_hidden: bool, need_weight: bool, need_bias: bool,
                                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """grad_loss (N,) (the gradient of each row's loss) -> (dhidden (N, H), dweight (V, H), dbias (V,)),
    in the inputs' dtypes, accumulated in float32; None for a gradient not asked for. The logits
    are recomputed chunk by chunk from the saved lse (N,) of :func:`linear_cross_entropy_forward`."""
    n, v = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0).long()
    row_grad = torch.where(valid, grad_loss.float(), 0.0)
    dhidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    dbias = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_bias else None
    for r0 in range(0, n, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, n)
        h = hidden[r0:r1].float()
        g = row_grad[r0:r1, None]
        row_lse = lse[r0:r1, None]
        # dℓ/dp scale: 1 + 2·z_loss·lse (z-loss) per row, and −(1 − ε) at the target.
        p_scale = 1.0 + 2.0 * z_loss * row_lse
        t = safe_targets[r0:r1]
        for v0 in range(0, v, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, v)
            z = _logits_chunk(h, weight, bias, v0, v1, softcap)
            cap_grad = 1.0 - (z / softcap) ** 2 if softcap is not None else None
            # In place from here on: one (rows × vocab chunk) buffer becomes the logit gradient.
            du = z.sub_(row_lse).exp_().mul_(p_scale).sub_(label_smoothing / v)
            in_chunk = (t >= v0) & (t < v1)
            du.scatter_add_(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None],
                            torch.where(in_chunk, label_smoothing - 1.0, 0.0)[:, None])
            if cap_grad is not None:
                du.mul_(cap_grad)
            du.mul_(g)
            if dhidden is not None:
                dhidden[r0:r1].addmm_(du, weight[v0:v1].float())
            if dweight is not None:
                dweight[v0:v1].addmm_(du.T, h)
            if dbias is not None:
                dbias[v0:v1] += du.sum(0)
            del z, du, cap_grad
    return (None if dhidden is None else dhidden.to(hidden.dtype),
            None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))


def rms_norm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · norm_weight over the last dimension, computed in float32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()


def embed_with_placeholder(input_ids: torch.Tensor, weight: torch.Tensor, is_visual: torch.Tensor,
                           placeholder_id: int, norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """input_ids (...), weight (V, D), is_visual (...) bool -> (..., D) in weight's dtype: row
    placeholder_id at visual positions, row input_ids elsewhere, RMS-normalised when norm_weight (D,)
    is given. CPU autograd accumulates the embedding gradient serially, so it is deterministic."""
    rows = torch.where(is_visual, placeholder_id, input_ids.long())
    out = torch.nn.functional.embedding(rows, weight)
    if norm_weight is None:
        return out
    return rms_norm(out, norm_weight, eps).to(weight.dtype)


def merge_visual_embeddings(text_embeds: torch.Tensor, visual_embeds: torch.Tensor,
                            is_visual: torch.Tensor) -> torch.Tensor:
    """text_embeds (..., D), visual_embeds (M, D), is_visual (...) with M True entries -> (..., D):
    the k-th visual position (in row-major order) takes visual_embeds[k], the others keep text_embeds.

    The visual row of each position comes from a running count of the mask, so no host sync is
    needed; the backward into visual_embeds receives exactly one gradient row per visual row.
    """
    if visual_embeds.shape[0] == 0:  # no visual position (the caller checked the count)
        return text_embeds.clone()
    flat = is_visual.reshape(-1)
    source = (torch.cumsum(flat.long(), 0) - 1).clamp(0, visual_embeds.shape[0] - 1)
    gathered = visual_embeds.to(text_embeds.dtype)[source].reshape(text_embeds.shape)
    return torch.where(is_visual[..., None], gathered, text_embeds)


def document_ends(length: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """For each of `length` positions, the end (exclusive) of its packed document: cu_seqlens[j + 1]
    for the document j holding it, or `length` when there are no documents."""
    positions = torch.arange(length, device=device)
    if cu_seqlens is None:
        return torch.full((length,), length, device=device, dtype=torch.long)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    doc = torch.searchsorted(cu, positions, right=True)  # position in [cu[j], cu[j+1]) -> j + 1
    return cu[doc.clamp(max=cu.numel() - 1)]


def shift_within_documents(x: torch.Tensor, k: int, cu_seqlens: torch.Tensor | None, fill) -> torch.Tensor:
    """x (B, T, ...) -> y with y[:, t] = x[:, t + k] when t + k is in t's document, else `fill`.

    Without cu_seqlens each row of the batch is one document; with cu_seqlens (D + 1,) the rows
    (B must be 1) hold packed documents [cu[j], cu[j+1]).
    """
    length = x.shape[1]
    ends = document_ends(length, cu_seqlens, x.device)
    inside = torch.arange(length, device=x.device) + k < ends
    rolled = torch.roll(x, -k, dims=1)
    inside = inside.reshape((1, length) + (1,) * (x.ndim - 2))
    return torch.where(inside, rolled, torch.as_tensor(fill, dtype=x.dtype, device=x.device))
