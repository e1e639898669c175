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


def _folder_cfg(root, **over):
    base = {"name": "imagefolder", "root": str(root), "resolution": 8, "channels": 3}
    return {**base, "heldout_fraction": 0.2, "split_seed": 0, "max_images": 0, **over}


def _all_images(d):
    return torch.cat([d.train_images, d.heldout_images]), torch.cat([d.train_labels, d.heldout_labels])


def test_imagefolder_reads_every_pil_mode_correctly(tmp_path):
    """16-bit gray is scaled by 65535 (not clipped to white), palette expanded, alpha
    composited on white, EXIF orientation applied."""
    cases = tmp_path / "cases"
    for name in ["i16", "palette", "la", "rgba", "exif"]:
        (cases / name).mkdir(parents=True)
    Image.fromarray(np.full((12, 12), round(0.34 * 65535), dtype=np.uint16)).save(cases / "i16" / "a.png")
    with Image.open(cases / "i16" / "a.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    pal = Image.new("P", (12, 12))
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.save(cases / "palette" / "a.png")  # every pixel is index 0: red
    Image.fromarray(np.stack([np.zeros((12, 12), np.uint8)] * 2, -1), mode="LA").save(cases / "la" / "a.png")
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., 3] = 128  # black at half opacity over white: about 0.5
    Image.fromarray(rgba, mode="RGBA").save(cases / "rgba" / "a.png")
    top_dark = np.zeros((12, 12, 3), np.uint8)
    top_dark[6:] = 255
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    Image.fromarray(top_dark).save(cases / "exif" / "a.png", exif=exif)
    for name in ["i16", "palette", "la", "rgba", "exif"]:  # a second image per class for the split
        Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(cases / name / "b.png")
    d = build_dataset(_folder_cfg(cases, heldout_fraction=0.1))
    x, y = _all_images(d)
    first = {d.class_names[int(k)]: img for img, k in zip(x, y) if img.abs().sum() > 0}
    assert first["i16"].mean().item() == pytest.approx(0.34, abs=0.01)
    assert first["palette"][:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert first["la"].min().item() == 1.0  # fully transparent black -> white
    assert first["rgba"].mean().item() == pytest.approx(0.5, abs=0.01)
    assert first["exif"][:, :3].mean() > 0.9 and first["exif"][:, 5:].mean() < 0.1  # bright half now on top


def test_imagefolder_reports_what_it_skipped_and_counts_per_class(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in [("cats", 4), ("dogs", 3)]:
        (tmp_path / cls).mkdir()
        for i in range(n):
            _write(tmp_path / cls / f"{i}.png", rng.integers(0, 255, (10, 10, 3), dtype=np.uint8))
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "cats" / "notes.txt").write_text("x")
    (tmp_path / "dogs" / "puppies").mkdir()
    _write(tmp_path / "dogs" / "puppies" / "p.png", rng.integers(0, 255, (10, 10, 3), dtype=np.uint8))
    d = build_dataset(_folder_cfg(tmp_path))
    assert d.num_classes == 2 and len(d.train_images) + len(d.heldout_images) == 7
    assert "7 images in 2 class(es)" in d.report and "cats 4, dogs 3" in d.report
    assert "1 unreadable image(s): cats/broken.png" in d.report
    assert "1 non-image file(s): cats/notes.txt" in d.report
    assert "1 nested folder(s) (not read): dogs/puppies" in d.report
    (tmp_path / "birds").mkdir()
    with pytest.raises(DataError, match="class folder .*birds holds no images.*remove it"):
        DATASETS.build(_folder_cfg(tmp_path))  # not the memoised copy


def test_imagefolder_max_images_keeps_every_class(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in [("a", 10), ("b", 5), ("c", 5)]:
        (tmp_path / cls).mkdir()
        for i in range(n):
            _write(tmp_path / cls / f"{i}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    d = build_dataset(_folder_cfg(tmp_path, max_images=8))
    _, y = _all_images(d)
    assert d.num_classes == 3 and torch.bincount(y).tolist() == [4, 2, 2]
    with pytest.raises(DataError, match="max_images=2 is fewer than the 3 classes"):
        build_dataset(_folder_cfg(tmp_path, max_images=2))
