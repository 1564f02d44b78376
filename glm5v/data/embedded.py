"""The embedded default dataset: real photos that ship with scikit-image and scikit-learn, so every
`glm5v` command runs out of the box with no download; and `folder_dataset` for a user's images.

`load_photos()` gives the photos as uint8 (H, W, 3) arrays with a caption derived from their name;
`augmented_views(...)` turns them into many variable-size samples (random crops, flips, scales),
the NaFlex workload in miniature.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Sample:
    """One image with its caption: image (H, W, 3) uint8."""

    name: str
    caption: str
    image: np.ndarray


# (name, caption, loader name in skimage.data); all ship inside scikit-image's wheel.
_SKIMAGE_PHOTOS = (
    ("astronaut", "a photo of an astronaut in a spacesuit", "astronaut"),
    ("camera", "a black and white photo of a man with a camera", "camera"),
    ("cat", "a photo of a cat", "chelsea"),
    ("coffee", "a photo of a cup of coffee", "coffee"),
    ("coins", "a photo of coins", "coins"),
    ("rocket", "a photo of a rocket on a launch pad", "rocket"),
    ("moon", "a photo of the surface of the moon", "moon"),
    ("page", "a scanned page of text", "page"),
    ("text", "a photo of text", "text"),
    ("clock", "a photo of a clock", "clock"),
    ("brick", "a photo of a brick wall", "brick"),
    ("grass", "a photo of grass", "grass"),
    ("gravel", "a photo of gravel", "gravel"),
    ("hubble", "a photo of galaxies in deep space", "hubble_deep_field"),
    ("immunohistochemistry", "a microscope image of stained tissue", "immunohistochemistry"),
    ("motorcycle", "a photo of a motorcycle", "stereo_motorcycle"),
    ("retina", "a photo of a retina", "retina"),
    ("colorwheel", "a colour wheel", "colorwheel"),
)
# scikit-learn's two sample photos (sklearn/datasets/images).
_SKLEARN_PHOTOS = (("china", "a photo of a temple in china"), ("flower", "a photo of a flower"))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Any of the shipped layouts (grey, boolean, RGB, RGBA) -> contiguous uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 or bool image, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


def _skimage_loader(attribute: str) -> Callable[[], np.ndarray]:
    def load():
        import skimage.data

        image = getattr(skimage.data, attribute)()
        return image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
    return load


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[Sample, ...]:
    """All embedded photos, loaded once: 18 from scikit-image and 2 from scikit-learn."""
    from sklearn.datasets import load_sample_images

    samples = [Sample(name, caption, as_rgb(_skimage_loader(attr)())) for name, caption, attr in _SKIMAGE_PHOTOS]
    bundle = load_sample_images()
    by_name = {Path(f).stem: image for f, image in zip(bundle.filenames, bundle.images)}
    samples += [Sample(name, caption, as_rgb(by_name[name])) for name, caption in _SKLEARN_PHOTOS]
    return tuple(samples)


@dataclass(frozen=True)
class ViewConfig:
    """How `augmented_views` draws a view: the kept fraction of each side of a random crop, the
    longest side after rescaling (pixels), and the probability of a horizontal flip."""

    min_crop: float = 0.5
    min_side: int = 64
    max_side: int = 512
    flip_probability: float = 0.5

    def __post_init__(self):
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"min_crop must be in (0, 1], got {self.min_crop}")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(f"need 1 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")


def augmented_view(image: np.ndarray, rng: random.Random, config: ViewConfig = ViewConfig()) -> np.ndarray:
    """A random crop of `image` (each side keeps a fraction in [min_crop, 1]), maybe flipped,
    rescaled (antialiased bicubic) so its longest side is in [min_side, max_side]."""
    from PIL import Image

    height, width = image.shape[:2]
    crop_h = max(1, round(height * rng.uniform(config.min_crop, 1.0)))
    crop_w = max(1, round(width * rng.uniform(config.min_crop, 1.0)))
    top, left = rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)
    view = image[top: top + crop_h, left: left + crop_w]
    if rng.random() < config.flip_probability:
        view = view[:, ::-1]
    longest = rng.randint(config.min_side, config.max_side)
    scale = longest / max(crop_h, crop_w)
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(view)).resize(size, Image.Resampling.BICUBIC))


def augmented_views(samples: Sequence[Sample], num_views: int, seed: int,
                    config: ViewConfig = ViewConfig()) -> list[Sample]:
    """num_views samples cycling through `samples`, each a fresh `augmented_view` keeping its
    source's caption; the same seed gives the same views."""
    if not samples:
        raise ValueError("samples must not be empty")
    if num_views < 0:
        raise ValueError(f"num_views must be >= 0, got {num_views}")
    rng = random.Random(seed)
    return [Sample(s.name, s.caption, augmented_view(s.image, rng, config))
            for s in (samples[i % len(samples)] for i in range(num_views))]


def folder_dataset(path: str | Path, captions: str = "captions.jsonl") -> list[Sample]:
    """The images in a folder (sorted by name), with captions from a sidecar jsonl file of
    {"file": name, "caption": text} lines; images without a caption get their file stem."""
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--data must be a folder of images, got {str(folder)!r}")
    by_file = {}
    sidecar = folder / captions
    if sidecar.exists():
        for number, line in enumerate(sidecar.read_text().splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not {"file", "caption"} <= record.keys():
                    raise ValueError(f"{sidecar}:{number}: each line needs 'file' and 'caption', got {sorted(record)}")
                by_file[record["file"]] = record["caption"]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    samples = []
    for file in files:
        with Image.open(file) as image:
            pixels = as_rgb(np.asarray(image.convert("RGB")))
        samples.append(Sample(file.stem, by_file.get(file.name, file.stem), pixels))
    return samples
