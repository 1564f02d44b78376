"""nn.MMTPHead against the same head written out unfused in plain torch (per-document shifting
by a Python loop, full logits, F.cross_entropy, argmax): loss, per-depth losses and accuracies,
and the gradient of every parameter and input, for each visual_input variant, on the CPU path
and with the Triton kernels (under the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glm5v_kernels._backend import use_backend
from glm5v_kernels.nn import MMTPHead
from glm5v_kernels.testing import assert_close

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_BACKEND = "triton" if ON_GPU else "interpret"
# The kernel path's fp32 dots may run as tf32 on a GPU.
TOL = 5e-4 if ON_GPU else 2e-5
H, V, IMAGE_ID, IGNORE = 32, 96, 7, -100


class Block(nn.Module):
    """A residual MLP standing in for a transformer block; `gate` checks that block_kwargs arrive."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(H)
        self.up = nn.Linear(H, 2 * H)
        self.down = nn.Linear(2 * H, H)

    def forward(self, x, gate=1.0):
        return x + gate * self.down(F.gelu(self.up(self.norm(x))))


def make_head(visual_input, num_depths=2):
    embedding = nn.Embedding(V, H)
    output_weight = nn.Parameter(torch.randn(V, H) / H**0.5)
    head = MMTPHead(H, num_depths, lambda k: Block(), embedding, output_weight, nn.RMSNorm(H), IMAGE_ID,
                    loss_weight=0.3, visual_input=visual_input)
    with torch.no_grad():  # non-trivial norm gains, so a swapped norm would show
        for p in head.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return head.to(DEVICE)


def make_batch(batch, length, bounds):
    """A sequence with image runs (ids IMAGE_ID, labels ignored on them), labels = next token within
    each document."""
    ids = torch.randint(0, V, (batch, length))
    ids[ids == IMAGE_ID] = IMAGE_ID + 1
    is_visual = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(0, length - 6, ()))
        is_visual[b, start:start + 5] = True
    ids[is_visual] = IMAGE_ID
    labels = torch.full_like(ids, IGNORE)
    for b in range(batch):
        for s, e in bounds:
            labels[b, s:e - 1] = ids[b, s + 1:e]
    labels[labels == IMAGE_ID] = IGNORE
    visual_embeds = torch.randn(int(is_visual.sum()), H)
    return [x.to(DEVICE) for x in (ids, labels, is_visual, visual_embeds)]


def unfused(head, hidden, ids, labels, is_visual, visual_embeds, bounds, **block_kwargs):
    """(loss, per-depth losses, per-depth accuracies) computed directly from the definitions."""
    batch, length, _ = hidden.shape
    weight = head.embedding.weight
    flat_ids, flat_labels, flat_visual = ids.reshape(-1), labels.reshape(-1), is_visual.reshape(-1)
    documents = [(b * length + s, b * length + e) for b in range(batch) for s, e in bounds]
    if head.visual_input == "embedding":
        full = weight[torch.where(flat_visual, IMAGE_ID, flat_ids)].clone()
        full[flat_visual] = visual_embeds
    h_prev = hidden.reshape(-1, H)
    losses, accuracies = [], []
    for k in range(1, head.num_depths + 1):
        source = torch.arange(batch * length, device=DEVICE)
        inside = torch.zeros(batch * length, dtype=torch.bool, device=DEVICE)
        for s, e in documents:
            for t in range(s, e):
                if t + k < e:
                    source[t], inside[t] = t + k, True
        ids_k = torch.where(inside, flat_ids[source], 0)
        labels_k = torch.where(inside, flat_labels[source], IGNORE)
        visual_k = inside & flat_visual[source]
        if head.visual_input == "embedding":
            e_k = torch.where(inside[:, None], full[source], 0.0)
        else:
            e_k = weight[torch.where(visual_k, IMAGE_ID, ids_k)]
            if head.visual_input == "mask":
                e_k = torch.where(visual_k[:, None], head.mask_embedding, e_k)
        labels_k = torch.where(visual_k | (labels_k == IMAGE_ID), IGNORE, labels_k)
        x = torch.cat([head.embed_norms[k - 1](e_k), head.hidden_norms[k - 1](h_prev)], -1)
        x = head.projections[k - 1](x).reshape(batch, length, H)
        h_prev = head.blocks[k - 1](x, **block_kwargs).reshape(-1, H)
        logits = head.final_norm(h_prev) @ head.output_weight.T
        losses.append(F.cross_entropy(logits, labels_k, ignore_index=IGNORE))
        valid = labels_k != IGNORE
        accuracies.append((logits.argmax(-1) == labels_k)[valid].float().mean())
    losses = torch.stack(losses)
    return 0.3 / head.num_depths * losses.sum(), losses.detach(), torch.stack(accuracies)


CASES = [
    pytest.param(1, 40, [(0, 9), (9, 10), (10, 26), (26, 40)], id="packed-4-docs"),
    pytest.param(2, 18, [(0, 18)], id="batch-2"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["torch", KERNEL_BACKEND])
@pytest.mark.parametrize("visual_input", ["placeholder", "mask", "embedding"])
@pytest.mark.parametrize("batch,length,bounds", CASES)
def test_head_matches_unfused_reference(batch, length, bounds, visual_input, backend):
    head = make_head(visual_input)
    ids, labels, is_visual, visual_embeds = make_batch(batch, length, bounds)
    hidden = torch.randn(batch, length, H, device=DEVICE, requires_grad=True)
    visual_embeds.requires_grad_()
    cu = torch.tensor([b for b, _ in bounds] + [bounds[-1][1]]) if batch == 1 else None
    with use_backend(backend):
        out = head(hidden, ids, labels, is_visual, visual_embeds=visual_embeds, cu_seqlens=cu, gate=0.7)
    inputs = [hidden, visual_embeds] + list(head.parameters())
    grads = torch.autograd.grad(out.loss, inputs, allow_unused=True)

    loss, losses, accuracies = unfused(head, hidden, ids, labels, is_visual, visual_embeds, bounds, gate=0.7)
    expected_grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    assert_close(out.loss, loss, tol=TOL, name="loss")
    assert_close(out.depth_losses, losses, tol=TOL, name="depth losses")
    assert torch.equal(out.depth_accuracies, accuracies)
    names = ["hidden", "visual_embeds"] + [n for n, _ in head.named_parameters()]
    for name, g, e in zip(names, grads, expected_grads):
        if e is None:  # e.g. visual_embeds when the variant does not read them
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        assert_close(g, e, tol=TOL, name=f"d{name}")


@pytest.mark.parametrize("visual_input", ["placeholder", "mask"])
def test_visual_ids_are_never_read(visual_input):
    """The depth inputs at visual positions are the placeholder row / the mask vector, whatever id
    the sequence holds there; with "embedding" they are the visual embeddings."""
    head = make_head(visual_input)
    ids, labels, is_visual, visual_embeds = make_batch(1, 30, [(0, 30)])
    hidden = torch.randn(1, 30, H, device=DEVICE)
    before = head(hidden, ids, labels, is_visual).loss
    other = ids.clone()
    other[is_visual] = torch.randint(0, V, (int(is_visual.sum()),), device=DEVICE)
    assert torch.equal(head(hidden, other, labels, is_visual).loss, before)


def test_embedding_variant_reads_visual_embeds():
    head = make_head("embedding")
    ids, labels, is_visual, visual_embeds = make_batch(1, 30, [(0, 30)])
    hidden = torch.randn(1, 30, H, device=DEVICE)
    a = head(hidden, ids, labels, is_visual, visual_embeds=visual_embeds).loss
    b = head(hidden, ids, labels, is_visual, visual_embeds=visual_embeds + 1.0).loss
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="visual_embeds"):
        head(hidden, ids, labels, is_visual)


def test_normalizers_make_parts_sum_to_the_whole():
    """Two packed halves, each with the whole batch's per-depth valid counts as normalizers: their
    losses and gradients add up to those of the whole batch in one call."""
    head = make_head("placeholder")
    bounds = [(0, 9), (9, 10), (10, 26), (26, 40)]
    ids, labels, is_visual, _ = make_batch(1, 40, bounds)
    hidden = torch.randn(1, 40, H, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 9, 10, 26, 40])
    whole = head(hidden, ids, labels, is_visual, cu_seqlens=cu)
    expected = torch.autograd.grad(whole.loss, [hidden, head.projections[0].weight])
    counts = []  # each depth's valid targets over the whole batch, counted from the definition
    for k in range(1, head.num_depths + 1):
        valid = [t for s, e in bounds for t in range(s, e - k)
                 if labels[0, t + k] != IGNORE and not is_visual[0, t + k] and labels[0, t + k] != IMAGE_ID]
        counts.append(len(valid))
    normalizers = torch.tensor(counts, dtype=torch.float32, device=DEVICE)
    total = 0
    for (start, end), cu_part in (((0, 10), torch.tensor([0, 9, 10])), ((10, 40), torch.tensor([0, 16, 30]))):
        part = head(hidden[:, start:end], ids[:, start:end], labels[:, start:end], is_visual[:, start:end],
                    cu_seqlens=cu_part, normalizers=normalizers)
        total = total + part.loss
    assert_close(total, whole.loss, tol=TOL, name="loss")
    for g, e in zip(torch.autograd.grad(total, [hidden, head.projections[0].weight]), expected):
        assert_close(g, e, tol=TOL, name="grad")
    with pytest.raises(ValueError, match="normalizers"):
        head(hidden, ids, labels, is_visual, cu_seqlens=cu, normalizers=torch.ones(3))


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(num_depths=0), "num_depths", id="no-depths"),
    pytest.param(dict(visual_input="image"), "visual_input", id="unknown-variant"),
    pytest.param(dict(image_token_id=V), "image_token_id", id="image-id-out-of-vocab"),
    pytest.param(dict(output_weight=nn.Parameter(torch.randn(V, H + 1))), "output_weight", id="head-shape"),
])
def test_bad_configuration_raises(kwargs, match):
    args = dict(hidden_size=H, num_depths=2, block_factory=lambda k: Block(), embedding=nn.Embedding(V, H),
                output_weight=nn.Parameter(torch.randn(V, H)), final_norm=nn.RMSNorm(H), image_token_id=IMAGE_ID)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MMTPHead(**args)
