"""FID in the feature space of the per-dataset classifier, and that classifier's cache.

The digits feature net is trained once per session (~10 s on 2 cores) into a temporary
VARGEN_CACHE, so these tests never read or write the user's ~/.cache/vargen.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vargen.data import build_dataset
from vargen.eval import (
    FIDEvaluator,
    classify_accuracy,
    compute_fid,
    feature_net_path,
    get_feature_net,
    load_feature_net,
    train_feature_net,
)
from vargen.eval import feature_net as feature_net_module
from vargen.registry import FEATURE_NETS

DIGITS = {"name": "digits", "resolution": 16, "heldout_fraction": 0.15, "split_seed": 0}
SHAPES = {
    "name": "shapes",
    "resolution": 32,
    "num_images": 6000,
    "seed": 0,
    "heldout_fraction": 0.15,
    "split_seed": 0,
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("vargen-cache")
        mp.setenv("VARGEN_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def digits():
    return build_dataset(DIGITS)


@pytest.fixture(scope="session")
def digits_net(cache_dir):
    return get_feature_net(DIGITS)


def _blur(images):
    return F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)  # 3x3 box


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_feature_net_classifies_digits(digits_net, digits):
    assert classify_accuracy(digits_net, digits.heldout_images, digits.heldout_labels) > 0.9


def test_fid_ranks_heldout_far_below_blur_and_noise(digits_net, digits):
    held = digits.heldout_images  # (270, 1, 16, 16)
    noise = torch.rand(held.shape, generator=torch.Generator().manual_seed(0))
    fid_held = compute_fid(digits.train_images, held, digits_net)
    fid_blur = compute_fid(digits.train_images, _blur(held), digits_net)
    fid_noise = compute_fid(digits.train_images, noise, digits_net)
    # Measured: 21.7, 115.7, 1978.
    assert 4 * fid_held < fid_blur
    assert 20 * fid_held < fid_noise


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric(digits_net, digits):
    held, train = digits.heldout_images, digits.train_images
    assert abs(compute_fid(held, held, digits_net)) < 1e-3
    forward, backward = compute_fid(held, train, digits_net), compute_fid(train, held, digits_net)
    assert forward == pytest.approx(backward, rel=1e-4)


def test_evaluator_with_cached_real_stats_equals_one_shot(digits_net, digits):
    held, train = digits.heldout_images, digits.train_images
    one_shot = compute_fid(train, held, digits_net)
    evaluator = FIDEvaluator(train, digits_net)
    first = evaluator.score(held)
    evaluator.score(_blur(held))  # a different fake set in between must not leak into the next
    assert first == pytest.approx(one_shot, rel=1e-9)
    assert evaluator.score(held) == first
    assert FIDEvaluator.for_dataset(DIGITS).score(held) == pytest.approx(one_shot, rel=1e-9)


def test_training_is_deterministic_and_leaves_global_rng_alone(digits):
    rng = torch.get_rng_state()
    a = train_feature_net(digits, steps=40, seed=3)
    b = train_feature_net(digits, steps=40, seed=3)
    c = train_feature_net(digits, steps=40, seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert torch.equal(torch.get_rng_state(), rng)


def test_cache_file_holds_the_same_weights(digits_net, cache_dir):
    path = feature_net_path(DIGITS)
    assert path.parent == cache_dir / "feature_nets" and path.name.startswith("digits-")
    assert _same_weights(load_feature_net(path), digits_net)
    assert get_feature_net(dict(DIGITS)) is digits_net  # memoised in-process
    assert feature_net_path({"name": "digits"}) == path  # defaults filled before hashing


def test_corrupt_cache_file_is_retrained_and_rewritten(cache_dir, monkeypatch):
    first = get_feature_net(DIGITS, steps=40)
    path = feature_net_path(DIGITS, steps=40)
    path.write_bytes(b"not a safetensors file")
    monkeypatch.setattr(feature_net_module, "_MEMO", {})
    with pytest.warns(UserWarning, match="unreadable"):
        again = get_feature_net(DIGITS, steps=40)
    assert _same_weights(first, again)
    assert _same_weights(load_feature_net(path), first)


def test_loads_a_trainer_written_file(digits_net, tmp_path):
    path = tmp_path / "model.safetensors"
    meta = {"config": json.dumps({"task": "feature_net", "model": digits_net.config}), "step": "600"}
    save_file(digits_net.state_dict(), str(path), metadata=meta)
    assert _same_weights(load_feature_net(path), digits_net)
    save_file(digits_net.state_dict(), str(path))
    with pytest.raises(ValueError, match="no 'config'"):
        load_feature_net(path)


def test_builder_needs_the_dataset_fields():
    with pytest.raises(ValueError, match="channels=0"):
        FEATURE_NETS.build({"name": "classifier"})
    net = FEATURE_NETS.build({"name": "classifier", "channels": 3, "resolution": 32, "num_classes": 6})
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, net.num_features)


def test_bad_images_fail_with_a_helpful_message(digits_net, digits):
    train = digits.train_images
    with pytest.raises(ValueError, match=r"differ in shape: real .* \(1, 16, 16\), fake .* \(3, 16, 16\)"):
        compute_fid(train, torch.rand(8, 3, 16, 16), digits_net)
    with pytest.raises(ValueError, match=r"expects images \(N, 1, 16, 16\), got \(4, 1, 8, 8\)"):
        compute_fid(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), digits_net)
    with pytest.raises(ValueError, match="clamp"):
        compute_fid(train, train[:8] * 1.5, digits_net)
    with pytest.raises(ValueError, match="float in"):
        compute_fid(train, (train[:8] * 255).to(torch.uint8), digits_net)
    with pytest.raises(ValueError, match="exactly one"):
        compute_fid(train, train)


def test_feature_net_accepts_uint8(digits_net, digits):
    x = (digits.heldout_images[:16] * 255).round().to(torch.uint8)  # (16, 1, 16, 16)
    assert torch.equal(digits_net(x), digits_net(x.float() / 255))


def test_inception_needs_a_local_weights_file(digits, tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05.pth"):
        compute_fid(digits.train_images, digits.heldout_images, inception_weights=missing)


def test_shapes_feature_net_recognises_shapes(cache_dir):
    shapes = build_dataset(SHAPES)
    net = get_feature_net(SHAPES)  # ~15 s on 2 cores (3 s of it rendering)
    assert classify_accuracy(net, shapes.heldout_images, shapes.heldout_labels) > 0.8
