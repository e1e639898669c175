"""The photos dataset: held-out pixels never seen in training, determinism, classes, grayscale."""

import pytest
import torch

from vargen.data import build_dataset
from vargen.data.photos import PHOTOS, PhotosConfig, build_photos, load_photo, photo_split_boxes

SMALL = {**PhotosConfig().__dict__, "resolution": 16, "train_per_class": 6, "heldout_per_class": 3}
GRAY = [
    i for i, (name, _) in enumerate(PHOTOS) if name in ("brick", "grass", "gravel", "camera", "coins", "moon")
]


@pytest.fixture(scope="module")
def photos():
    return {name: load_photo(f) for name, f in PHOTOS}


def test_at_least_twelve_classes_with_their_photo_names():
    data = build_photos(SMALL)
    assert data.num_classes == len(PHOTOS) >= 12
    assert data.class_names[0] == "astronaut" and "hubble_deep_field" in data.class_names


def test_heldout_and_training_crops_never_share_a_source_pixel(photos):
    g = torch.Generator().manual_seed(0)
    cfg = {**SMALL, "train_per_class": 200, "heldout_per_class": 200}
    for name, photo in photos.items():
        h, w = photo.shape[1:]
        train, held, split = photo_split_boxes(h, w, cfg, g)
        # columns [left, left + side): every training crop ends at or before the strip, every
        # held-out crop starts inside it, and all crops stay inside the photo
        assert int((train[:, 1] + train[:, 2]).max()) <= split, name
        assert int(held[:, 1].min()) >= split, name
        for boxes in (train, held):
            assert int((boxes[:, 0] + boxes[:, 2]).max()) <= h and int((boxes[:, 1] + boxes[:, 2]).max()) <= w
            assert int(boxes[:, :2].min()) >= 0


def test_same_seed_same_crops_and_another_seed_other_crops():
    a, b = build_photos(SMALL), build_photos(SMALL)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.heldout_images, b.heldout_images)
    c = build_photos({**SMALL, "seed": 1})
    assert not torch.equal(a.train_images, c.train_images)


def test_every_class_in_both_splits_with_the_configured_counts():
    data = build_photos(SMALL)
    n = data.num_classes
    assert torch.equal(
        torch.bincount(data.train_labels, minlength=n), torch.full((n,), SMALL["train_per_class"])
    )
    assert torch.equal(
        torch.bincount(data.heldout_labels, minlength=n), torch.full((n,), SMALL["heldout_per_class"])
    )
    assert data.train_images.shape[1:] == (3, 16, 16)
    assert 0.0 <= float(data.train_images.min()) and float(data.train_images.max()) <= 1.0


def test_grayscale_sources_come_out_as_three_equal_channels():
    data = build_photos(SMALL)
    for split in ("train", "heldout"):
        x, y = data.split(split)
        gray = torch.isin(y, torch.tensor(GRAY))
        assert gray.any() and (~gray).any()
        assert torch.equal(x[gray, 0], x[gray, 1]) and torch.equal(x[gray, 1], x[gray, 2])
        colour = x[~gray]
        assert (colour[:, 0] - colour[:, 1]).abs().amax(dim=(1, 2)).gt(0.02).float().mean() > 0.5


def test_registered_and_bad_scales_fail_with_a_message():
    assert build_dataset(SMALL).train_images.shape[0] == SMALL["train_per_class"] * len(PHOTOS)
    with pytest.raises(Exception, match="scale_min"):
        build_photos({**SMALL, "scale_min": 0.5, "scale_max": 0.2})
