"""End to end on digits: trained tokenizer + next-token model -> samples -> FID.

Uses the session-scoped ``trained_pipeline`` (tiny models trained through the real
training tasks), so every check here is about trained weights, not random ones.
"""

import json
import math

import numpy as np
import pytest
import torch

from vargen.checkpoint import load_component, load_tokenizer_for
from vargen.eval import FIDEvaluator, classify_accuracy, get_feature_net
from vargen.io import read_log
from vargen.models.ar import ARTransformer
from vargen.sampling.decoders.ar import sample_ar
from vargen.sampling.generate import class_labels, generate

from .conftest import DIGITS


@pytest.fixture(scope="module")
def models(trained_pipeline):
    gen, gen_cfg = load_component(str(trained_pipeline["ar"]))
    tok = load_tokenizer_for(gen_cfg)
    return gen, tok, gen_cfg


@pytest.fixture(scope="module")
def fid_train():
    return FIDEvaluator.for_dataset(DIGITS, split="train")


def _samples(model, tok, n, seed, **kw):
    labels = class_labels(n, model.num_classes, [])
    sampler = lambda m, c, g: sample_ar(m, c, generator=g, **kw)  # noqa: E731
    images, _, stats = generate(model, tok, labels, sampler, torch.Generator().manual_seed(seed), 250)
    return images, labels, stats


def test_training_logs_report_reconstruction_and_codebook_usage(trained_pipeline):
    rows = read_log(trained_pipeline["vq"])
    assert rows and {"recon_mse", "codebook_usage", "perplexity"} <= set(rows[-1])
    ev = json.load(open(trained_pipeline["vq"] / "eval.json"))
    assert ev["heldout_recon_mse"] < 0.01 and ev["codebook_usage"] > 0.5
    ar_rows = read_log(trained_pipeline["ar"])
    assert ar_rows[-1]["loss"] < 0.8 * math.log(64)  # well below a uniform guess over 64 codes


def test_trained_model_scores_far_below_untrained(models, fid_train):
    gen, tok, _ = models
    trained, _, stats = _samples(gen, tok, 500, seed=0, cfg_scale=1.5)
    torch.manual_seed(1)
    untrained_model = ARTransformer(gen.cfg).eval()
    untrained, _, _ = _samples(untrained_model, tok, 500, seed=0, cfg_scale=1.5)
    fid_trained, fid_untrained = fid_train.score(trained), fid_train.score(untrained)
    assert stats["target_forwards"] == 2 * gen.num_tokens  # 2 batches of 250, one forward per token
    assert fid_trained * 4 < fid_untrained, (fid_trained, fid_untrained)


def test_class_conditional_samples_are_recognised(models):
    gen, tok, _ = models
    images, labels, _ = _samples(gen, tok, 300, seed=1, cfg_scale=3.0)
    net = get_feature_net(DIGITS)
    acc = classify_accuracy(net, images, labels)
    assert acc > 0.5, acc  # chance is 0.1


def test_sample_cli_writes_grid_npz_and_is_deterministic(trained_pipeline, tmp_path):
    import sample

    ckpt = str(trained_pipeline["ar"])
    args = ["num_samples=20", "batch_size=8", "progress=false", "sampler.top_k=8", "sampler.cfg_scale=2.0"]
    assert sample.main(["--ckpt", ckpt, f"out={tmp_path / 'a'}", "seed=3", *args]) == 0
    assert sample.main(["--ckpt", ckpt, f"out={tmp_path / 'b'}", "seed=3", *args]) == 0
    assert sample.main(["--ckpt", ckpt, f"out={tmp_path / 'c'}", "seed=4", "fid=true", *args]) == 0
    a, b, c = (np.load(tmp_path / d / "samples.npz") for d in "abc")
    assert a["images"].shape == (20, 16, 16, 1) and a["images"].dtype == np.uint8
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["ids"], b["ids"])
    assert not np.array_equal(a["ids"], c["ids"])
    assert (tmp_path / "a" / "samples.png").stat().st_size > 0
    metrics = json.load(open(tmp_path / "c" / "metrics.json"))
    assert metrics["fid"] > 0 and metrics["stats.target_forwards"] == 3 * 16


def test_sample_cli_rejects_bad_input(trained_pipeline, tmp_path, capsys):
    import sample

    assert sample.main(["--ckpt", str(trained_pipeline["ar"]), "sampler.topk=3"]) == 2
    assert "sampler.top_k" in capsys.readouterr().err
    assert sample.main(["--ckpt", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
    assert sample.main(["--ckpt", str(trained_pipeline["vq"])]) == 1  # a tokenizer, not a generator
    assert "generator" in capsys.readouterr().err
