"""DDPM on digits end to end: trained through the pixel_generator task, sampled by sample.py
(ddim and fkc_cfg), scored by FID against an untrained model; reproducibility; time shift off."""

import json
import os

import numpy as np
import pytest
import torch

import sample
from vargen.checkpoint import load_component
from vargen.diffusion.time_shift import ExposureBiasTimeShift
from vargen.eval import FIDEvaluator
from vargen.models.diffusion_unet import DiffusionUNet
from vargen.sampling.decoders.diffusion import sample_ddim
from vargen.sampling.generate import class_labels
from vargen.train.tasks import run

from .conftest import DIGITS, task_config


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = task_config(
        "pixel_generator",
        out,
        dict(steps=200, batch_size=32, lr=3e-3),
        model={
            "name": "ddpm_unet",
            "block_out_channels": [16, 16],
            "prediction": "v",
        },  # v: FID ~67 at 200 steps, eps ~800
    )
    run(cfg, log=lambda m: None)
    model, _ = load_component(str(out))
    yield out, model
    torch.set_num_threads(before)


def _sample_py(ckpt, out, *over):
    rc = sample.main(["--ckpt", str(ckpt), f"out={out}", "progress=false", *over])
    assert rc == 0
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f), np.load(os.path.join(out, "samples.npz"))["images"]


def test_trained_ddpm_scores_far_below_untrained(ddpm, tmp_path):
    ckpt, model = ddpm
    common = ["fid=true", "fid_split=train"]
    m_ddim, _ = _sample_py(
        ckpt, tmp_path / "ddim", *common, "num_samples=200", "batch_size=200", "sampler.steps=10"
    )
    m_fkc, _ = _sample_py(  # batch_size 64: two batches, the counts add up
        ckpt,
        tmp_path / "fkc",
        *common,
        "num_samples=100",
        "sampler.name=fkc_cfg",
        "sampler.steps=6",
        "sampler.particles=2",
        "sampler.cfg_scale=1.5",
    )
    untrained = DiffusionUNet(model.cfg).eval()
    noise, _ = sample_ddim(
        untrained, class_labels(200, 10, []), generator=torch.Generator().manual_seed(0), steps=10
    )
    fid_untrained = FIDEvaluator.for_dataset(DIGITS, split="train").score(noise)
    assert m_ddim["stats.target_forwards"] == 10 and m_ddim["stats.net_evals"] == 200 * 10
    assert m_fkc["stats.net_evals"] == 100 * 2 * 2 * 6 and m_fkc["stats.particles"] == 100 * 2
    assert len(m_fkc["stats.min_ess"]) == 2 and all(1 <= e <= 2 for e in m_fkc["stats.min_ess"])
    assert m_ddim["fid"] * 2 < fid_untrained, (m_ddim["fid"], fid_untrained)
    assert m_fkc["fid"] * 2 < fid_untrained, (m_fkc["fid"], fid_untrained)


def test_same_seed_same_images(ddpm, tmp_path):
    ckpt, _ = ddpm
    fkc = ["num_samples=10", "sampler.name=fkc_cfg", "sampler.steps=4", "sampler.particles=3"]
    _, a = _sample_py(ckpt, tmp_path / "a", *fkc)
    _, b = _sample_py(ckpt, tmp_path / "b", *fkc)
    _, c = _sample_py(ckpt, tmp_path / "c", *fkc, "seed=1")
    _, d = _sample_py(ckpt, tmp_path / "d", "num_samples=10", "sampler.steps=4", "sampler.eta=1.0")
    _, e = _sample_py(ckpt, tmp_path / "e", "num_samples=10", "sampler.steps=4", "sampler.eta=1.0")
    assert np.array_equal(a, b) and not np.array_equal(a, c) and np.array_equal(d, e)


def test_time_shift_window_zero_is_the_base_sampler_bit_for_bit(ddpm):
    _, model = ddpm
    labels = class_labels(8, 10, [])
    kw = dict(steps=10, eta=1.0, cfg_scale=1.5)
    base, _ = sample_ddim(model, labels, generator=torch.Generator().manual_seed(2), **kw)
    off, st = sample_ddim(
        model,
        labels,
        generator=torch.Generator().manual_seed(2),
        time_shift=ExposureBiasTimeShift(window=0),
        **kw,
    )
    on, st_on = sample_ddim(
        model,
        labels,
        generator=torch.Generator().manual_seed(2),
        time_shift=ExposureBiasTimeShift(window=80, cutoff=300),
        **kw,
    )
    assert torch.equal(base, off) and st["shifted_steps"] == 0
    assert st_on["shifted_steps"] > 0 and not torch.equal(base, on)


def test_bad_sampler_config_fails_naming_the_key(ddpm, tmp_path, capsys):
    ckpt, _ = ddpm
    assert sample.main(["--ckpt", str(ckpt), f"out={tmp_path}", "sampler.time_shift.windw=3"]) == 2
    assert "sampler.time_shift.windw" in capsys.readouterr().err
    assert sample.main(["--ckpt", str(ckpt), f"out={tmp_path}", "sampler.time_shift.mode=adm"]) == 1
    assert "time_shift.mode" in capsys.readouterr().err
