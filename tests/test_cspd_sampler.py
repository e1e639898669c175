"""CSpD on xAR models (entity token, MAR head): exact in distribution (with and without
guidance), full acceptance for an identical draft, ragged rows filled, seeded, and reachable from
sample.py."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from vargen.models.xar import XAR, XARConfig
from vargen.sampling.cspd_sampler import sample_cspd
from vargen.sampling.xar_sampling import sample_xar


def _xar(seed, dim=32):
    torch.manual_seed(seed)
    cfg = XARConfig(
        grid=[1, 3],
        code_dim=1,
        num_classes=2,
        entity="token",
        dim=dim,
        depth=1,
        heads=2,
        head={"name": "mar_diffusion", "width": 32, "depth": 2, "num_sampling_steps": 8},
    )
    return XAR(cfg)


def _toy_batch(n, g):
    """Three correlated 1-D tokens whose law depends on the class (also given the earlier tokens,
    so guidance changes every token after the first)."""
    y = torch.randint(0, 2, (n,), generator=g)
    sign = torch.where(y == 0, 1.0, -1.0)[:, None]
    a = sign + 0.5 * torch.randn(n, 1, generator=g)
    x1 = -a + 0.5 * sign + 0.3 * torch.randn(n, 1, generator=g)
    x = torch.stack([a, x1, 0.5 * a * a - 0.3 * sign], 1)  # (n, 3, 1)
    return x, y


@pytest.fixture(scope="module")
def target():
    """A toy xAR + MAR head trained to a sane denoiser (random heads make the chain explode)."""
    torch.set_num_threads(1)
    model, g = _xar(0), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        x, y = _toy_batch(256, g)
        loss = model.loss(x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _draft_near(target, noise, seed=1):
    """A draft that differs from the target by weight noise: partial acceptance."""
    import copy

    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return draft


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_identical_draft_accepts_everything(target, cfg_scale):
    model = target
    y = torch.tensor([0, 1, 1, 0])
    g = torch.Generator().manual_seed(0)
    out, st = sample_cspd(model, model, y, generator=g, gamma=2, cfg_scale=cfg_scale)
    assert out.shape == (4, 3, 1) and st["acceptance"] == 1.0
    assert st["target_forwards"] == 1  # 3 tokens per row: 2 accepted drafts + the bonus token
    assert st["positions_computed"] == (2 if cfg_scale != 1.0 else 1) * 4 * 3  # a CFG pair: one call


def test_full_prefill_is_plain_target_sampling(target):
    """prefill = 1: every token is drawn by the target alone, one call per token, no drafts."""
    y = torch.tensor([0, 1, 1])
    g = torch.Generator().manual_seed(0)
    out, st = sample_cspd(target, _draft_near(target, 1e-3), y, generator=g, prefill=1.0, cfg_scale=2.0)
    assert st["draft_forwards"] == 0 and st["proposed"] == 0 and st["target_forwards"] == 3
    assert torch.isfinite(out).all() and out.shape == (3, 3, 1)


def test_seeded_and_every_row_filled(target):
    draft = _draft_near(target, 1e-3)
    y = torch.tensor([0, 1, 0, 1, 1])
    a, st = sample_cspd(target, draft, y, generator=torch.Generator().manual_seed(3), gamma=3)
    b, _ = sample_cspd(target, draft, y, generator=torch.Generator().manual_seed(3), gamma=3)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert 0 < st["acceptance"] < 1 and st["tokens"] == 15


@pytest.mark.parametrize("gamma,prefill", [(1, 0.0), (3, 0.0), (2, 0.34)])
def test_cspd_matches_the_target_sampler_in_distribution(target, gamma, prefill):
    """Two-sample KS on every token: CSpD with a different draft vs the target's own sampler
    (with token pre-filling: the first of the 3 tokens drawn by the target alone)."""
    draft = _draft_near(target, 1e-3)
    n = 4000
    y = torch.zeros(n, dtype=torch.long)
    ref, _ = sample_xar(target, y, generator=torch.Generator().manual_seed(10))
    g = torch.Generator().manual_seed(11)
    out, st = sample_cspd(target, draft, y, generator=g, gamma=gamma, prefill=prefill)
    assert 0.3 < st["acceptance"] < 0.9  # the draft really differs; the residual is exercised
    for i in range(3):
        assert sps.ks_2samp(out[:, i, 0].numpy(), ref[:, i, 0].numpy()).pvalue > 1e-3
    # and the test has power: the other class's samples are told apart
    own, _ = sample_xar(target, 1 - y, generator=torch.Generator().manual_seed(12))
    pv = [sps.ks_2samp(own[:, i, 0].numpy(), ref[:, i, 0].numpy()).pvalue for i in range(3)]
    assert np.min(pv) < 1e-6


def test_guided_cspd_matches_the_guided_target_sampler(target):
    """With cfg_scale > 1 both chains are guided on xAR's ramp: CSpD is distributed as the
    target's ``xar`` sampler with the same cfg_scale (two-sample KS on every token), and the KS
    test tells that sampler apart from the one at another cfg_scale."""
    draft = _draft_near(target, 1e-3)
    n, w = 3000, 3.0
    y = torch.zeros(n, dtype=torch.long)
    ref, st_ref = sample_xar(target, y, generator=torch.Generator().manual_seed(20), cfg_scale=w)
    out, st = sample_cspd(target, draft, y, generator=torch.Generator().manual_seed(21), gamma=3, cfg_scale=w)
    assert 0.3 < st["acceptance"] < 0.9 and st["ar_unfilled"] == 0
    assert st["target_forwards"] <= st_ref["target_forwards"] == 3  # a CFG pair is one call in both
    for i in range(3):
        assert sps.ks_2samp(out[:, i, 0].numpy(), ref[:, i, 0].numpy()).pvalue > 1e-3
    other, _ = sample_xar(target, y, generator=torch.Generator().manual_seed(22), cfg_scale=1.0)
    pv = [sps.ks_2samp(other[:, i, 0].numpy(), ref[:, i, 0].numpy()).pvalue for i in (1, 2)]
    assert np.min(pv) < 1e-6


def test_sample_py_runs_cspd_with_a_draft_checkpoint(tmp_path, capsys):
    import json

    import sample
    from vargen.train.tasks import run

    from .conftest import task_config

    torch.manual_seed(0)
    kl = {"name": "kl", "hidden": [8, 16], "code_dim": 4}
    run(task_config("tokenizer", tmp_path / "kl", dict(steps=5, batch_size=16), model=kl), log=lambda m: None)
    head = {"name": "mar_diffusion", "width": 16, "depth": 1, "num_sampling_steps": 5}
    for name, dim in (("target", 32), ("draft", 16)):
        model = {"name": "xar", "entity": "token", "dim": dim, "depth": 1, "heads": 2, "head": head}
        cfg = task_config(
            "generator",
            tmp_path / name,
            dict(steps=5, batch_size=16),
            tokenizer_ckpt=str(tmp_path / "kl"),
            model=model,
        )
        run(cfg, log=lambda m: None)
    out = tmp_path / "s"
    argv = ["--ckpt", str(tmp_path / "target"), f"out={out}", "num_samples=6", "progress=false"]
    assert sample.main(argv + ["sampler.name=cspd", f"sampler.draft_ckpt={tmp_path / 'draft'}"]) == 0
    metrics = json.load(open(out / "metrics.json"))
    assert 0 <= metrics["stats.acceptance"] <= 1 and metrics["stats.draft_forwards"] > 0
    guided = argv + ["sampler.name=cspd", f"sampler.draft_ckpt={tmp_path / 'draft'}", "sampler.cfg_scale=2.0"]
    guided += [f"out={tmp_path / 's_guided'}"]  # a second call never overwrites the first's samples
    assert sample.main(guided) == 0  # guidance is accepted from the config
    assert sample.main(argv + ["sampler.name=cspd"]) != 0  # no draft: a clear error, no samples
    assert "sampler.draft_ckpt" in capsys.readouterr().err
