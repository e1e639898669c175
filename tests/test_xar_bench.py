"""benchmarks/xar.py without training: the workload switch and its variants, and the photos
run's one-time encoding of the training crops (reused only for the same tokenizer and images)."""

import pytest
import torch
from torch import nn

from benchmarks import xar as bench
from vargen.models.entities import KINDS


def test_default_workload_is_digits_and_unknown_variants_are_refused():
    assert bench.parse_args([]).workload == "digits"
    assert bench.parse_args(["--workload", "photos", "--only", "xar.scale"]).only == ["xar.scale"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--workload", "photos", "--only", "mar_head"])  # a digits-only variant
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "xar.nope"])


def test_photos_variants_cover_the_comparisons():
    def entity(over):
        return next(o.split("=", 1)[1] for o in over if o.startswith("model.entity="))

    head = {k for k, over in bench.PHOTOS_VARIANTS.items() if "model.denoiser=head" in over}
    backbone = {k: entity(v) for k, v in bench.PHOTOS_VARIANTS.items() if k not in head}
    assert "model.denoiser=backbone" in bench.PHOTOS_MODEL  # the paper's design unless a variant says head
    noisy = {e for k, e in backbone.items() if "model.noisy_context=false" not in bench.PHOTOS_VARIANTS[k]}
    assert noisy == set(KINDS)
    assert entity(bench.PHOTOS_VARIANTS["xar.teacher_forcing"]) == "cell"
    assert "model.noisy_context=false" in bench.PHOTOS_VARIANTS["xar.teacher_forcing"]
    assert "cell" in {entity(bench.PHOTOS_VARIANTS[k]) for k in head}


class FakeTokenizer(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def encode(self, x):
        return x.flatten(1) * self.scale


def test_encode_once_reuses_only_the_same_tokenizer_and_images():
    from vargen.train import tasks

    real, calls = tasks.encode_all, []

    def counting(tok, images, device, batch=256):
        calls.append(len(images))
        return real(tok, images, device, batch)

    tasks.encode_all = counting
    try:
        x, y = torch.rand(5, 1, 2, 2), torch.rand(5, 1, 2, 2)
        with bench._encode_once():
            a = tasks.encode_all(FakeTokenizer(2), x, "cpu")
            b = tasks.encode_all(FakeTokenizer(2), x.clone(), "cpu")  # same bytes, new tensors
            assert len(calls) == 1 and torch.equal(a, b)
            tasks.encode_all(FakeTokenizer(3), x, "cpu")  # other weights
            tasks.encode_all(FakeTokenizer(2), y, "cpu")  # other images
            assert len(calls) == 3
        assert tasks.encode_all is counting  # restored on exit
    finally:
        tasks.encode_all = real
