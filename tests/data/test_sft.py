"""Packed SFT data: the conversation layout and its labels (assistant tokens only), the facts the
answers state recomputed independently from the pixels and the packed patch grids (colorsys for
the colours), packs under the token cap, spread evenly and balanced over ranks, and the same plan
from the same random stream."""

from __future__ import annotations

import colorsys
import random
from collections import Counter

import numpy as np
import pytest

from glm5v.data.embedded import ViewConfig, load_photos
from glm5v.data.sft import COLOUR_NAMES, Conversation, SFTData, SFTDataConfig, encode_conversation
from glm5v.data.tokenizer import ASSISTANT, BEGIN_OF_IMAGE, END_OF_IMAGE, ENDOFTEXT, IMAGE, USER, ByteTokenizer
from glm5v_kernels.data import TransformerDims, balanced_partition

TOK = ByteTokenizer()
PATCH, MERGE = 14, 2
DIMS = dict(llm_dims=TransformerDims(64, 128, 4, 2), vit_dims=TransformerDims(64, 128, 4))


def make_data(**overrides) -> SFTData:
    config = SFTDataConfig(**{"views": ViewConfig(min_side=24, max_side=80), **overrides})
    return SFTData(load_photos(), TOK, config, patch_size=PATCH, merge_size=MERGE, **DIMS)


def test_layout_and_labels_only_on_assistant_tokens():
    conversation = Conversation("cat", np.zeros((28, 28, 3), np.uint8), "What is this?", "A cat, été.")
    ids, labels = encode_conversation(conversation, TOK, num_image_tokens=3)
    expected = (f"{USER}{BEGIN_OF_IMAGE}{IMAGE * 3}{END_OF_IMAGE}What is this?{ASSISTANT}A cat, été.{ENDOFTEXT}")
    assert TOK.decode(ids) == expected
    assert len(labels) == len(ids)
    reply_start = ids.index(TOK.token_id(ASSISTANT)) + 1
    for t, label in enumerate(labels):
        # trained exactly where the next token is the assistant's: answer and closing token
        if reply_start <= t + 1 < len(ids):
            assert label == ids[t + 1]
        else:
            assert label == -100
    assert TOK.decode([label for label in labels if label != -100]) == f"A cat, été.{ENDOFTEXT}"


def colour_of(pixel) -> str:
    """The colour bucket of one pixel, from colorsys (the documented rule, written independently)."""
    r, g, b = (int(v) for v in pixel)
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    if max(r, g, b) < 64:
        return "black"
    if s < 0.2:
        return "white" if max(r, g, b) >= 200 else "grey"
    degrees = h * 360
    for bound, name in ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (260, "blue"), (345, "purple")):
        if degrees < bound:
            return name
    return "red"


def test_answers_are_true_of_the_packed_views():
    data = make_data(samples_per_step=40, max_pack_tokens=400)
    plan = data.plan(random.Random(3), world=1)
    seen = set()
    for index in range(len(plan.packs)):
        pack = data.pack(plan, index)
        for slot, c in enumerate(pack.conversations):
            conversation = plan.conversations[c]
            rows, cols = pack.images.spatial_shapes[slot].tolist()  # the grid as actually packed
            question, answer = conversation.question, conversation.answer
            seen.add(question)
            photo = next(p for p in load_photos() if p.name == conversation.name)
            if question == "What is in this picture?":
                assert answer.lower() == photo.caption.lower() + "."
            elif question == "How large is this picture?":
                assert answer == (f"{rows} by {cols} patches of {PATCH} pixels, {rows * PATCH} by {cols * PATCH} "
                                  "pixels (height by width).")
            elif question.startswith("Is this picture portrait"):
                want = "square" if rows == cols else "portrait" if rows > cols else "landscape"
                assert answer == f"It is {want}."
            elif question.startswith("What is the dominant colour"):
                counts = Counter(colour_of(p) for p in conversation.image.reshape(-1, 3))
                top = max(counts.values())
                # ties go to the first name in COLOUR_NAMES
                want = next(name for name in COLOUR_NAMES if counts.get(name) == top)
                assert answer == f"Mostly {want}."
            else:
                assert question == "How many image tokens does this picture take?"
                n = rows * cols // MERGE**2
                assert answer == f"{n} tokens, a {rows // MERGE} by {cols // MERGE} grid."
                start = pack.cu_seqlens[slot].item()
                document = pack.input_ids[start:pack.cu_seqlens[slot + 1]].tolist()
                assert document.count(TOK.token_id(IMAGE)) == n
    assert len(seen) == 5  # every kind of question came up


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packs_respect_the_cap_and_are_balanced_over_ranks(world):
    data = make_data(samples_per_step=9, max_pack_tokens=200)
    plan = data.plan(random.Random(world), world=world)
    lengths = [len(ids) for ids, _ in plan.encoded]
    assert sorted(i for pack in plan.packs for i in pack) == list(range(9))
    assert all(sum(lengths[i] for i in pack) <= 200 for pack in plan.packs)
    assert len(plan.packs) % world == 0 and all(plan.packs)
    assert sorted(i for rank in plan.ranks for i in rank) == list(range(len(plan.packs)))
    assert len({len(rank) for rank in plan.ranks}) == 1  # every rank runs as many micro-batches
    pack_costs = np.stack([plan.costs[pack].sum(0) for pack in plan.packs])

    def worst(parts):  # largest load on either key over its mean
        loads = np.stack([pack_costs[part].sum(0) for part in parts])
        return (loads / loads.mean(0)).max()

    round_robin = [list(range(r, len(plan.packs), world)) for r in range(world)]
    assert worst(plan.ranks) <= worst(round_robin) + 1e-9
    assert plan.ranks == balanced_partition(pack_costs, world, equal_size=True).parts
    for rank in range(world):
        for pack in data.rank_packs(plan, rank):
            bounds = pack.cu_seqlens.tolist()
            assert bounds[-1] == len(pack.input_ids) == len(pack.labels) <= 200
            assert pack.images.num_images == len(pack.conversations) == len(bounds) - 1
            image_tokens = int((pack.input_ids == TOK.token_id(IMAGE)).sum())
            assert image_tokens * MERGE**2 == pack.images.patches.shape[0]
            for slot, c in enumerate(pack.conversations):
                assert pack.input_ids[bounds[slot]:bounds[slot + 1]].tolist() == plan.encoded[c][0]


def test_same_stream_same_plan_and_bad_input():
    data = make_data(samples_per_step=5)
    a, b = data.plan(random.Random(7), 2), data.plan(random.Random(7), 2)
    assert a.encoded == b.encoded and a.packs == b.packs and a.ranks == b.ranks
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.conversations, b.conversations))
    assert data.plan(random.Random(8), 2).encoded != a.encoded
    with pytest.raises(ValueError, match="samples_per_step"):
        data.plan(random.Random(0), world=6)
    with pytest.raises(ValueError, match="max_pack_tokens"):
        make_data(max_pack_tokens=20).plan(random.Random(0))
    with pytest.raises(ValueError, match="samples_per_step"):
        SFTDataConfig(samples_per_step=0)
