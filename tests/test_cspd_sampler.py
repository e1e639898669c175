"""CSpD on xAR models (entity token, MAR head): exact in distribution (with and without
guidance), full acceptance for an identical draft, ragged rows filled, seeded, and reachable from
sample.py."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from vargen.models.xar import XAR, XARConfig
from vargen.sampling.decoders.xar import sample_xar
from vargen.sampling.speculative.cspd import sample_cspd


def _xar(seed, dim=32):
    torch.manual_seed(seed)
    cfg = XARConfig(
        grid=[1, 3],
        code_dim=1,
        num_classes=2,
        entity="token",
        denoiser="head",
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
        model = {
            "name": "xar",
            "entity": "token",
            "denoiser": "head",
            "dim": dim,
            "depth": 1,
            "heads": 2,
            "head": head,
        }
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


@pytest.mark.parametrize(
    "cfg_scale,verify,slots,prefill",
    [(1.0, "last", 0, 0.34), (2.0, "last", 2, 0.0), (1.0, "path", 3, 0.0), (2.0, "path", 0, 0.34)],
)
def test_kv_cached_cspd_equals_the_recompute_path(target, cfg_scale, verify, slots, prefill):
    """float64: the KV-cached backbones (ragged cache rolled back after each verification, rows
    refilled under continuous batching) draw the same tokens from the same generator as the full
    recompute through ``entity_conditions``, and compute fewer token-rows."""
    import copy

    tgt = copy.deepcopy(target).double()
    drf = _draft_near(target, 1e-2 if verify == "path" else 1e-3).double()  # path accepts more
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0] * 2)
    kw = dict(gamma=2, prefill=prefill, cfg_scale=cfg_scale, verify=verify, slots=slots)
    a, sa = sample_cspd(tgt, drf, y, generator=torch.Generator().manual_seed(5), **kw)
    b, sb = sample_cspd(tgt, drf, y, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert a.dtype == torch.float64 and torch.allclose(a, b, atol=1e-9, rtol=0)
    assert (sa["accepted"], sa["target_forwards"]) == (sb["accepted"], sb["target_forwards"])
    assert 0 < sa["accepted"] < sa["proposed"]  # both acceptance and rejection were exercised
    assert sa["positions_computed"] < sb["positions_computed"]


def test_continuous_batching_is_seeded_and_in_input_order(target):
    """slots < N: rows are refilled; the same seed and slots give the same tokens, and each
    output row belongs to its own input (its class): identical-draft CSpD is plain target
    sampling, so class 0 and class 1 rows keep their classes' first-token means apart."""
    draft = _draft_near(target, 1e-3)
    y = torch.tensor([0, 1] * 30)
    a, st = sample_cspd(target, draft, y, generator=torch.Generator().manual_seed(4), gamma=2, slots=7)
    b, _ = sample_cspd(target, draft, y, generator=torch.Generator().manual_seed(4), gamma=2, slots=7)
    assert torch.equal(a, b) and torch.isfinite(a).all() and st["tokens"] == 60 * 3
    assert a[y == 0, 0, 0].mean() > 0.5 and a[y == 1, 0, 0].mean() < -0.5  # toy: token 0 ~ +-1 by class
    assert st["target_calls_per_image"] < 3  # speculation saves target calls per image


@pytest.mark.parametrize("verify,variance", [("last", ""), ("path", ""), ("path", "beta")])
def test_cspd_under_refilling_matches_the_target_sampler(target, verify, variance):
    """Continuous batching (slots 64 of 2000: ~30 refills per slot) stays exact: two-sample KS on
    every token against the target's own ``xar`` sampler (with the same head variance)."""
    draft = _draft_near(target, 1e-2 if verify == "path" else 1e-3)  # path verification accepts more
    n = 2000
    y = torch.zeros(n, dtype=torch.long)
    old = target.head.sample_variance
    try:
        target.head.sample_variance = variance or old
        ref, _ = sample_xar(target, y, generator=torch.Generator().manual_seed(30))
        g = torch.Generator().manual_seed(31)
        out, st = sample_cspd(
            target, draft, y, generator=g, gamma=2, slots=64, verify=verify, variance=variance, K=4
        )
    finally:
        target.head.sample_variance = old
    assert 0.2 < st["acceptance"] < 0.95 and st["ar_unfilled"] == 0
    for i in range(3):
        assert sps.ks_2samp(out[:, i, 0].numpy(), ref[:, i, 0].numpy()).pvalue > 1e-3


def test_paper_mode_is_bit_identical_to_exact_with_fixed_variance_heads(target):
    """The documented behaviour: both heads share the fixed step variances, so the paper's
    variance factor Sigma = prod sigma_q / sigma_p is exactly 1 and ``mode="paper"`` draws the
    very same tokens as ``mode="exact"``."""
    draft = _draft_near(target, 1e-3)
    y = torch.tensor([0, 1, 0, 1])
    a, sa = sample_cspd(target, draft, y, generator=torch.Generator().manual_seed(6), gamma=2)
    b, sb = sample_cspd(target, draft, y, generator=torch.Generator().manual_seed(6), gamma=2, mode="paper")
    assert torch.equal(a, b) and sa["accepted"] == sb["accepted"]


def test_bad_verify_is_rejected(target):
    with pytest.raises(ValueError, match="sampler.verify"):
        sample_cspd(target, target, torch.tensor([0]), generator=torch.Generator(), verify="bogus")


def test_path_verification_accepts_an_identical_draft(target):
    """verify="path": with draft = target the path ratio is 1 (up to rounding), every draft passes."""
    y = torch.tensor([0, 1, 1, 0])
    g = torch.Generator().manual_seed(7)
    _, st = sample_cspd(target, target, y, generator=g, gamma=2, verify="path", prefill=0.0)
    assert st["acceptance"] == 1.0 and st["alpha"] == 1.0 and st["target_forwards"] == 1


@pytest.mark.parametrize("fast", [0, 1])  # 0: no gamma pays, the plain xar sampler runs
def test_cspd_by_cost_draws_what_the_chosen_plan_draws(target, monkeypatch, fast):
    """speculate_by=cost (cost_plan.py): the plan's gamma, or the plain xar sampler of the very
    target CSpD follows (the config's step variance, here beta, set on the head for that call)."""
    from tests.toys import ScriptedClock
    from vargen.registry import SAMPLERS
    from vargen.sampling.base import SamplerContext
    from vargen.sampling.speculative import cost_plan

    real = cost_plan.choose_width
    secs = [1.0, 0.5 if fast else 1.5, 2.0]  # plain, gamma 1, gamma 2
    monkeypatch.setattr(cost_plan, "choose_width", lambda *a, **k: real(*a, clock=ScriptedClock(secs), **k))
    draft = _draft_near(target, 0.02)
    opts = {"verify": "path", "variance": "beta", "cfg_scale": 2.0, "prefill": 0.0}
    cfg = {"name": "cspd", "draft_ckpt": "d", "speculate_by": "cost", "cost_gammas": [1, 2], **opts}
    sampler = SAMPLERS.build(cfg)
    sampler.setup(SamplerContext(target, loader=lambda ckpt, device: (draft, None)))
    y = torch.tensor([0, 1, 1])
    out, st = sampler(target, y, torch.Generator().manual_seed(5), slots=2)
    g = torch.Generator().manual_seed(5)
    if fast:
        want, _ = sample_cspd(target, draft, y, generator=g, gamma=1, slots=2, **opts)
    else:
        assert target.head.sample_variance != "beta"
        target.head.sample_variance = "beta"
        try:
            want = torch.cat(
                [sample_xar(target, y[i : i + 2], generator=g, cfg_scale=2.0)[0] for i in (0, 2)]
            )
        finally:
            target.head.sample_variance = "beta_tilde"
    assert torch.equal(out, want) and st["plan_widths"] == [fast]
    assert target.head.sample_variance == "beta_tilde"  # the plain sampler restored the head
