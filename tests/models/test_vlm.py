"""VLM: the packed fused forward against the same model written out per document and unfused
(visual rows substituted by a Python loop, full logits, F.cross_entropy on the trained targets,
the MMTP head called per document with the whole pack's counts as normalizers): losses and
gradients; the visual-token count check; target counts from the definition; bad configs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glm5v.data.tokenizer import IMAGE, ByteTokenizer
from glm5v.models.cogvit import cogvit_tiny
from glm5v.models.llm import llm_tiny
from glm5v.models.vlm import VLM, VLMConfig, vlm_tiny
from glm5v_kernels.data import NaFlexProcessor, PackedImages, pack_images
from glm5v_kernels.testing import assert_close

TOK = ByteTokenizer()
IMAGE_ID = TOK.token_id(IMAGE)
TOL = 2e-5


def make_pack(seed=0):
    """Three documents (two with an image of a different grid, one text-only): ids with each
    image's merged-token run of <|image|>, random labels (some ignored, some pointing at the image
    token) and the packed images."""
    rng = np.random.default_rng(seed)
    processor = NaFlexProcessor(patch_size=14, merge_size=2, max_num_patches=24)
    pictures = [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8), rng.integers(0, 256, (60, 30, 3), dtype=np.uint8)]
    images = pack_images(pictures, processor)
    merged = (images.spatial_shapes.prod(1) // 4).tolist()
    documents = []
    for n in merged + [0]:
        ids = list(rng.integers(0, 256, 5)) + [IMAGE_ID] * n + list(rng.integers(0, 256, 9))
        documents.append(ids)
    ids = torch.tensor([i for d in documents for i in d])
    labels = torch.randint(0, 256, ids.shape)
    labels[torch.rand(ids.shape) < 0.3] = -100
    labels[3] = IMAGE_ID  # a target that is the image token itself: never trained
    cu = torch.tensor(np.cumsum([0] + [len(d) for d in documents]), dtype=torch.int32)
    return ids, labels, cu, images


def reference(model: VLM, ids, labels, cu, images):
    """(main loss, MMTP loss) per document and unfused; the MMTP depths get the pack's counts."""
    config = model.config
    merged = model.vision(images).merged
    embeds = model.llm.embed_tokens.weight[ids].clone()
    row = 0
    for t in range(len(ids)):  # the k-th <|image|> position takes the k-th merged token
        if ids[t] == IMAGE_ID:
            embeds[t] = merged[row]
            row += 1
    is_visual = ids == IMAGE_ID
    trained = labels.clone()
    trained[is_visual | (labels == IMAGE_ID)] = -100
    counts = []  # each MMTP depth's trained targets over the whole pack
    bounds = cu.tolist()
    for k in range(1, config.num_mtp_depths + 1):
        counts.append(sum(int((trained[s + k:e] != -100).sum()) for s, e in zip(bounds[:-1], bounds[1:])))
    main_sum, mtp = 0.0, 0.0
    for s, e in zip(bounds[:-1], bounds[1:]):
        doc_cu = torch.tensor([0, e - s], dtype=torch.int32)
        out = model.llm(cu_seqlens=doc_cu, inputs_embeds=embeds[s:e])
        logits = out.hidden @ model.llm.output_weight.T
        main_sum = main_sum + F.cross_entropy(logits, trained[s:e], ignore_index=-100, reduction="sum")
        visual = merged[int(is_visual[:s].sum()):int(is_visual[:e].sum())]
        mtp = mtp + model.mtp(out.prenorm[None], ids[None, s:e], trained[None, s:e], is_visual[None, s:e],
                              visual_embeds=visual, normalizers=torch.tensor(counts, dtype=torch.float32),
                              **out.block_kwargs).loss
    return main_sum / (trained != -100).sum(), mtp


@pytest.mark.parametrize("visual_input", ["placeholder", "embedding"])
def test_matches_per_document_unfused_reference(visual_input):
    torch.manual_seed(0)
    model = VLM(vlm_tiny(mtp_visual_input=visual_input, mtp_loss_weight=0.3))
    ids, labels, cu, images = make_pack()
    out = model(ids, labels, cu, images)
    params = [model.vision.patch_embed.weight, model.vision.merger.downsample.weight, model.llm.embed_tokens.weight,
              model.llm.layers[0].self_attn.qkv.weight, model.mtp.projections[1].weight]
    grads = torch.autograd.grad(out.loss, params)

    main, mtp = reference(model, ids, labels, cu, images)
    expected = torch.autograd.grad(main + mtp, params)
    assert_close(out.main_loss, main, tol=TOL, name="main loss")
    assert_close(out.mtp_loss, mtp, tol=TOL, name="mtp loss")
    assert_close(out.loss, main + mtp, tol=TOL, name="loss")
    assert out.depth_losses.shape == out.depth_accuracies.shape == (2,)
    for name, g, e in zip(["patch_embed", "merger", "embed_tokens", "qkv", "mtp projection"], grads, expected):
        assert torch.count_nonzero(e) > 0, name
        assert_close(g, e, tol=TOL, name=f"d{name}")


def test_target_counts_and_normalizers():
    """target_counts matches a count from the definition, and splitting a pack in two with the
    whole pack's counts as normalizers adds up to the whole pack's loss."""
    torch.manual_seed(1)
    model = VLM(vlm_tiny())
    ids, labels, cu, images = make_pack(1)
    counts = model.target_counts(ids, labels, cu)
    trained = labels.masked_fill((ids == IMAGE_ID) | (labels == IMAGE_ID), -100)
    bounds = cu.tolist()
    expected = [int((trained != -100).sum())] + [
        sum(int((trained[s + k:e] != -100).sum()) for s, e in zip(bounds[:-1], bounds[1:])) for k in (1, 2)]
    assert counts.tolist() == expected
    whole = model(ids, labels, cu, images).loss
    # the first document (with the first image) alone, then the rest
    first = images.cu_seqlens[1].item()
    one = PackedImages(images.patches[:first], images.cu_seqlens[:2], images.spatial_shapes[:1],
                       images.position_ids[:first], int(images.cu_seqlens[1]))
    rest = PackedImages(images.patches[first:], images.cu_seqlens[1:] - first, images.spatial_shapes[1:],
                        images.position_ids[first:], images.max_seqlen)
    split = bounds[1]
    normalizers = counts.float()
    a = model(ids[:split], labels[:split], cu[:2], one, normalizers=normalizers)
    b = model(ids[split:], labels[split:], cu[1:] - split, rest, normalizers=normalizers)
    assert_close(a.loss + b.loss, whole, tol=TOL, name="split loss")


def test_visual_token_count_mismatch_raises():
    model = VLM(vlm_tiny())
    ids, labels, cu, images = make_pack()
    drop = int(torch.nonzero(ids == IMAGE_ID)[0])
    keep = torch.arange(len(ids)) != drop
    short_cu = cu.clone()
    short_cu[1:] -= 1
    with pytest.raises(ValueError, match=r"<\|image\|> positions"):
        model(ids[keep], labels[keep], short_cu, images)
    with pytest.raises(ValueError, match="positions"):
        model(ids, labels, cu, None)


@pytest.mark.parametrize("overrides,match", [
    pytest.param(dict(vision=cogvit_tiny()), "out_hidden_size", id="merger-width"),
    pytest.param(dict(vision=cogvit_tiny(merge_size=None, out_hidden_size=64)), "merger", id="no-merger"),
    pytest.param(dict(num_mtp_depths=-1), "num_mtp_depths", id="depths"),
    pytest.param(dict(mtp_visual_input="pixels"), "mtp_visual_input", id="variant"),
    pytest.param(dict(image_token_id=10_000), "image_token_id", id="image-id"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(vlm_tiny(), **overrides)


def test_without_mtp_head_the_loss_is_the_main_loss():
    torch.manual_seed(2)
    model = VLM(VLMConfig(vision=cogvit_tiny(out_hidden_size=64), llm=llm_tiny(), num_mtp_depths=0))
    assert model.mtp is None
    out = model(*make_pack())
    assert torch.equal(out.loss.detach(), out.main_loss) and out.depth_losses.numel() == 0
