"""Packed multimodal SFT data: one-image conversations, packed several to a pack, packs spread over
data-parallel ranks.

A conversation is laid out as

    <|user|> <|begin_of_image|> <|image|> × N <|end_of_image|> question <|assistant|> answer <|endoftext|>

with N the image's merged token count (its NaFlex patch grid over merge_size²), and trained only
on the assistant's tokens: labels[t] = ids[t + 1] where position t + 1 holds a token of the answer
or the closing <|endoftext|>, -100 elsewhere (the label convention of `DecoderLM.loss`).

The embedded default asks questions about augmented views of the embedded photos whose answers are
facts true of the view the model is shown: what the photo shows (its caption), its size in
patches and pixels as packed, its orientation (portrait, landscape or square, from the packed
grid), its dominant colour (`dominant_colour`, computed from its pixels) and how many image tokens
it takes. Object counts are not asked: none of the photos comes with a count we can vouch for.

A step draws its conversations from the rng it is given (`step_random(seed, step)` in the
trainer), packs them into the fewest packs of at most `max_pack_tokens` LLM tokens (a multiple
of the number of ranks, so every rank runs as many micro-batches) with their costs balanced
(`plan_microbatches`), and gives each rank an equal number of packs balanced on the LLM and the
ViT cost at once (`balanced_partition` on `vlm_sample_costs`). Every rank computes the same plan.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from glm5v._checks import check_ints
from glm5v.data.embedded import Sample, ViewConfig, augmented_view
from glm5v.data.tokenizer import ASSISTANT, BEGIN_OF_IMAGE, END_OF_IMAGE, ENDOFTEXT, IMAGE, USER, Tokenizer
from glm5v_kernels.data import (
    NaFlexProcessor,
    PackedImages,
    TransformerDims,
    balanced_partition,
    pack_images,
    plan_microbatches,
    vlm_sample_costs,
)

IGNORE_INDEX = -100

# Hue ranges (degrees, upper bound excluded) of the chromatic colour names; red wraps around 0.
HUE_NAMES = ((15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (260, "blue"), (345, "purple"), (360, "red"))
COLOUR_NAMES = ("black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple")


def colour_names(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) indices into COLOUR_NAMES: black when the brightest channel is
    below 64; white (brightest >= 200) or grey when the chroma (max − min) is below a fifth of the
    brightest channel; else the name of the hue (HSV hue, as `colorsys.rgb_to_hsv` defines it)."""
    rgb = pixels.astype(np.float64)
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    r, g, b = np.moveaxis(rgb, -1, 0)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, (g - b) / safe, np.where(high == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    degrees = (hue / 6 % 1.0) * 360
    bounds = np.array([bound for bound, _ in HUE_NAMES])
    chromatic = np.array([COLOUR_NAMES.index(name) for _, name in HUE_NAMES])[np.searchsorted(bounds, degrees,
                                                                                              side="right")
                                                                               .clip(max=len(bounds) - 1)]
    grey = np.where(high >= 200, COLOUR_NAMES.index("white"), COLOUR_NAMES.index("grey"))
    names = np.where(5 * chroma < high, grey, chromatic)
    return np.where(high < 64, COLOUR_NAMES.index("black"), names)


def dominant_colour(image: np.ndarray) -> str:
    """The COLOUR_NAMES entry most pixels of an (H, W, 3) uint8 image fall in (ties: the first)."""
    counts = np.bincount(colour_names(image).reshape(-1), minlength=len(COLOUR_NAMES))
    return COLOUR_NAMES[int(np.argmax(counts))]


@dataclass(frozen=True)
class Conversation:
    """One SFT sample: image (H, W, 3) uint8, the view the model sees (`name`: its source photo),
    one question about it and the answer."""

    name: str
    image: np.ndarray
    question: str
    answer: str


def photo_facts(sample: Sample, processor: NaFlexProcessor) -> list[tuple[str, str]]:
    """(question, answer) pairs true of sample.image as `processor` packs it."""
    height, width = processor.target_size(*sample.image.shape[:2])
    p, m = processor.patch_size, processor.merge_size
    rows, cols = height // p, width // p
    orientation = "square" if rows == cols else "portrait" if rows > cols else "landscape"
    caption = sample.caption[:1].upper() + sample.caption[1:]
    return [
        ("What is in this picture?", f"{caption}."),
        ("How large is this picture?",
         f"{rows} by {cols} patches of {p} pixels, {height} by {width} pixels (height by width)."),
        ("Is this picture portrait, landscape or square?", f"It is {orientation}."),
        ("What is the dominant colour of this picture?", f"Mostly {dominant_colour(sample.image)}."),
        ("How many image tokens does this picture take?",
         f"{rows * cols // (m * m)} tokens, a {rows // m} by {cols // m} grid."),
    ]


def encode_conversation(conversation: Conversation, tokenizer: Tokenizer,
                        num_image_tokens: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation in the layout of the module docstring."""
    special = tokenizer.token_id
    prompt = ([special(USER), special(BEGIN_OF_IMAGE)] + [special(IMAGE)] * num_image_tokens
              + [special(END_OF_IMAGE)] + tokenizer.encode(conversation.question) + [special(ASSISTANT)])
    reply = tokenizer.encode(conversation.answer) + [special(ENDOFTEXT)]
    ids = prompt + reply
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + reply + [IGNORE_INDEX]
    return ids, labels


@dataclass
class SFTPack:
    """One micro-batch: input_ids, labels (T,) int64; cu_seqlens (D + 1,) int32 LLM document
    boundaries; images: the D images (PackedImages, its own cu_seqlens over the ViT patches), in
    document order; conversations: the indices of its conversations in the step's plan."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    images: PackedImages
    conversations: list[int]

    def to(self, device) -> SFTPack:
        """Tokens and patches on `device`; the boundaries stay on the CPU (read on the host)."""
        images = self.images
        images = PackedImages(images.patches.to(device), images.cu_seqlens, images.spatial_shapes,
                              images.position_ids.to(device), images.max_seqlen)
        return SFTPack(self.input_ids.to(device), self.labels.to(device), self.cu_seqlens, images, self.conversations)


@dataclass
class StepPlan:
    """One step's global batch: its conversations with their (ids, labels) and (rows, cols) patch
    grids; costs (n, 2): LLM and ViT cost of each (`vlm_sample_costs`); packs: conversation
    indices of each pack; ranks: pack indices of each rank."""

    conversations: list[Conversation]
    encoded: list[tuple[list[int], list[int]]]
    grids: list[tuple[int, int]]
    costs: np.ndarray
    packs: list[list[int]]
    ranks: list[list[int]]


@dataclass(frozen=True)
class SFTDataConfig:
    """samples_per_step: conversations in a step's global batch; max_pack_tokens: LLM tokens of a
    pack at most; max_image_tokens: NaFlex patch budget of one image; views: how the augmented
    views are drawn."""

    samples_per_step: int = 8
    max_pack_tokens: int = 384
    max_image_tokens: int = 64
    views: ViewConfig = ViewConfig(min_side=32, max_side=192)

    def __post_init__(self):
        check_ints(self, ("samples_per_step", "max_pack_tokens", "max_image_tokens"))


class SFTData:
    """Conversations about `photos` drawn per step and packed for `world` ranks (module docstring).

    tokenizer: the LLM's; patch_size and merge_size: the ViT's; llm_dims, vit_dims: what the
    costs are computed with."""

    def __init__(self, photos: Sequence[Sample], tokenizer: Tokenizer, config: SFTDataConfig, *, patch_size: int,
                 merge_size: int, llm_dims: TransformerDims, vit_dims: TransformerDims):
        if not photos:
            raise ValueError("photos must not be empty")
        self.photos, self.tokenizer, self.config = list(photos), tokenizer, config
        self.processor = NaFlexProcessor(patch_size=patch_size, merge_size=merge_size,
                                         max_num_patches=config.max_image_tokens)
        self.llm_dims, self.vit_dims = llm_dims, vit_dims

    def conversation(self, rng: random.Random) -> Conversation:
        """A random view of a random photo and one random fact about it."""
        photo = self.photos[rng.randrange(len(self.photos))]
        view = Sample(photo.name, photo.caption, augmented_view(photo.image, rng, self.config.views))
        question, answer = rng.choice(photo_facts(view, self.processor))
        return Conversation(photo.name, view.image, question, answer)

    def plan(self, rng: random.Random, world: int = 1) -> StepPlan:
        """A step's global batch drawn from rng, packed and spread over `world` ranks."""
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"world must be an int >= 1, got {world!r}")
        if self.config.samples_per_step < world:
            raise ValueError(f"samples_per_step ({self.config.samples_per_step}) must be at least the number of "
                             f"ranks ({world}): every rank needs a pack")
        conversations = [self.conversation(rng) for _ in range(self.config.samples_per_step)]
        p, m = self.processor.patch_size, self.processor.merge_size
        grids = [tuple(side // p for side in self.processor.target_size(*c.image.shape[:2])) for c in conversations]
        encoded = [encode_conversation(c, self.tokenizer, rows * cols // (m * m))
                   for c, (rows, cols) in zip(conversations, grids)]
        lengths = [len(ids) for ids, _ in encoded]
        if max(lengths) > self.config.max_pack_tokens:
            raise ValueError(f"a conversation of {max(lengths)} tokens does not fit max_pack_tokens "
                             f"({self.config.max_pack_tokens})")
        costs = vlm_sample_costs(lengths, [[rows * cols] for rows, cols in grids], llm_dims=self.llm_dims,
                                 vit_dims=self.vit_dims)
        packs = plan_microbatches(costs, lengths, self.config.max_pack_tokens, multiple_of=world)
        pack_costs = np.stack([costs[pack].sum(axis=0) for pack in packs])
        ranks = balanced_partition(pack_costs, world, equal_size=True).parts
        return StepPlan(conversations, encoded, grids, costs, packs, ranks)

    def pack(self, plan: StepPlan, index: int) -> SFTPack:
        """Pack `index` of a plan as tensors (on the CPU)."""
        members = plan.packs[index]
        ids = [i for c in members for i in plan.encoded[c][0]]
        labels = [t for c in members for t in plan.encoded[c][1]]
        bounds = np.cumsum([0] + [len(plan.encoded[c][0]) for c in members])
        images = pack_images([plan.conversations[c].image for c in members], self.processor)
        return SFTPack(torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64),
                       torch.tensor(bounds, dtype=torch.int32), images, list(members))

    def rank_packs(self, plan: StepPlan, rank: int = 0) -> list[SFTPack]:
        """The packs of one rank, as tensors."""
        if not 0 <= rank < len(plan.ranks):
            raise ValueError(f"rank must be in [0, {len(plan.ranks)}), got {rank}")
        return [self.pack(plan, index) for index in plan.ranks[rank]]
