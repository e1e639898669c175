"""Datasets: seeded splits, procedural shapes, user image folders and their errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from vargen.data import DATASETS, DataError, build_dataset, check_images
from vargen.data.shapes import SHAPES, render_shapes

from .conftest import DIGITS


def test_digits_split_is_fixed_disjoint_and_complete():
    d = build_dataset(DIGITS)
    assert d.train_images.shape[1:] == (1, 16, 16) and d.num_classes == 10
    assert len(d.train_images) + len(d.heldout_images) == 1797
    assert 0.0 <= d.train_images.min() and d.train_images.max() <= 1.0
    # another split seed gives another split; the same seed the same one
    other = build_dataset({**DIGITS, "split_seed": 1})
    assert not torch.equal(other.heldout_images, d.heldout_images)
    again = DATASETS.build(DIGITS)  # rebuilt from scratch, not the memoised copy
    assert torch.equal(again.heldout_labels, d.heldout_labels)
    # no held-out image also appears in train
    tr = {tuple(x.flatten().tolist()) for x in d.train_images}
    dup = sum(tuple(x.flatten().tolist()) in tr for x in d.heldout_images)
    assert dup <= 2  # sklearn digits has a couple of exact duplicates across writers


def test_shapes_render_deterministic_and_balanced():
    a, la = render_shapes(120, 32, seed=3)
    b, lb = render_shapes(120, 32, seed=3)
    c, _ = render_shapes(120, 32, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (120, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    counts = torch.bincount(la, minlength=len(SHAPES))
    assert counts.min() > 5
    # the shape covers part of the image: pixels differ from the background corner colour
    corner = a[:, :, :1, :1]
    assert ((a - corner).abs().sum(1) > 0.1).float().mean(dim=(1, 2)).min() > 0.03


def _write(path, arr):
    Image.fromarray(arr).save(path)


def test_imagefolder_classes_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ["cats", "dogs"]:
        (tmp_path / "cls" / cls).mkdir(parents=True)
        for i in range(5):
            _write(tmp_path / "cls" / cls / f"{i}.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    d = build_dataset(
        {
            "name": "imagefolder",
            "root": str(tmp_path / "cls"),
            "resolution": 8,
            "channels": 3,
            "heldout_fraction": 0.2,
            "split_seed": 0,
            "max_images": 0,
        }
    )
    assert d.class_names == ["cats", "dogs"] and d.num_classes == 2
    assert d.train_images.shape[1:] == (3, 8, 8)
    assert sorted(torch.cat([d.train_labels, d.heldout_labels]).tolist()) == [0] * 5 + [1] * 5
    (tmp_path / "flat").mkdir()
    for i in range(4):
        _write(tmp_path / "flat" / f"{i}.jpg", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    d = build_dataset(
        {
            "name": "imagefolder",
            "root": str(tmp_path / "flat"),
            "resolution": 16,
            "channels": 1,
            "heldout_fraction": 0.25,
            "split_seed": 0,
            "max_images": 0,
        }
    )
    assert d.num_classes == 1 and d.train_images.shape == (3, 1, 16, 16)


def test_imagefolder_missing_or_empty_folder_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    base = {
        "name": "imagefolder",
        "resolution": 8,
        "channels": 3,
        "heldout_fraction": 0.2,
        "split_seed": 0,
        "max_images": 0,
    }
    with pytest.raises(DataError, match=str(missing)):
        build_dataset({**base, "root": str(missing)})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images.*empty"):
        build_dataset({**base, "root": str(tmp_path / "empty")})


def test_wrong_image_size_is_reported():
    with pytest.raises(DataError, match=r"expected \(N, 1, 16, 16\)"):
        check_images(torch.zeros(2, 1, 32, 32), 16, 1, "tokenizer")
