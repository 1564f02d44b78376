"""The embedded default dataset (glm5v/data/embedded.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from glm5v.data.embedded import ViewConfig, as_rgb, augmented_views, folder_dataset, load_photos


def test_photos_ship_with_the_packages():
    photos = load_photos()
    assert len(photos) == 20 and len({p.name for p in photos}) == 20
    for photo in photos:
        assert photo.image.dtype == np.uint8 and photo.image.ndim == 3 and photo.image.shape[2] == 3
        assert photo.caption and photo.image.std() > 0  # a real picture, not a blank
    assert len({p.image.shape[:2] for p in photos}) >= 8  # varied sizes and aspect ratios


def test_augmented_views_are_varied_bounded_and_reproducible():
    photos = load_photos()[:4]
    config = ViewConfig(min_side=32, max_side=96)
    views = augmented_views(photos, 12, seed=5, config=config)
    again = augmented_views(photos, 12, seed=5, config=config)
    assert [v.name for v in views] == [photos[i % 4].name for i in range(12)]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(views, again))
    assert all(32 <= max(v.image.shape[:2]) <= 96 for v in views)
    assert len({v.image.shape for v in views}) > 6
    assert not np.array_equal(views[0].image, augmented_views(photos, 1, seed=6, config=config)[0].image)


def test_as_rgb_layouts():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(as_rgb(grey)[:, :, 2], grey)
    assert as_rgb(np.ones((2, 2), bool)).max() == 255
    assert as_rgb(np.zeros((2, 2, 4), np.uint8)).shape == (2, 2, 3)
    with pytest.raises(TypeError, match="uint8"):
        as_rgb(np.zeros((2, 2), np.float32))


def test_folder_dataset_reads_sidecar_captions(tmp_path):
    for name, size in (("b.png", (20, 10)), ("a.jpg", (8, 8))):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "b.png", "caption": "a red bar"}) + "\n")
    samples = folder_dataset(tmp_path)
    assert [(s.name, s.caption, s.image.shape) for s in samples] == [("a", "a", (8, 8, 3)),
                                                                     ("b", "a red bar", (10, 20, 3))]
    with pytest.raises(ValueError, match="folder"):
        folder_dataset(tmp_path / "missing")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"name": "b.png"}) + "\n")
    with pytest.raises(ValueError, match="'file' and 'caption'"):
        folder_dataset(tmp_path)
