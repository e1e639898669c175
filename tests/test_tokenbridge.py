"""TokenBridge quantizer (spec tokenizers.md §1c) and its dimension-wise AR head."""

import math

import pytest
import torch

from vargen.tokenizers.tokenbridge import DimQuantConfig, DimQuantizer

REFERENCE = dict(levels=64, std_range=3.0, lo=-5.0, hi=5.0)


def test_reference_table_values():
    q = DimQuantizer(DimQuantConfig(**REFERENCE))
    c = q.values.double()
    assert (c[1:] > c[:-1]).all()
    torch.testing.assert_close(c, -c.flip(0), atol=1e-6, rtol=0)
    assert c[0].item() == pytest.approx(-2.437, abs=1e-3)
    assert c[32].item() == pytest.approx(0.0196, abs=1e-4)
    assert q.boundaries[0].item() == -3.0 and q.boundaries[-1].item() == 3.0


@pytest.mark.parametrize("bins", ["gaussian", "uniform"])
@pytest.mark.parametrize("assign", ["nearest", "bin"])
@pytest.mark.parametrize("levels", [8, 64])
def test_round_trip_every_index(bins, assign, levels):
    q = DimQuantizer(DimQuantConfig(**{**REFERENCE, "levels": levels}, bins=bins, assign=assign))
    idx = torch.arange(levels)
    assert torch.equal(q.quantize(q.dequantize(idx)), idx)


@pytest.mark.parametrize("bins", ["gaussian", "uniform"])
def test_indices_monotone_and_out_of_range_to_end_bins(bins):
    q = DimQuantizer(DimQuantConfig(**REFERENCE, bins=bins))
    x = torch.linspace(-7, 7, 20001)
    idx = q.quantize(x)
    assert (idx[1:] >= idx[:-1]).all()
    assert idx.min() == 0 and idx.max() == 63 and len(idx.unique()) == 64
    assert (q.quantize(torch.tensor([-5.01, -100.0])) == 0).all()
    assert (q.quantize(torch.tensor([5.01, 100.0])) == 63).all()


def test_exact_error_bound_reference():
    q = DimQuantizer(DimQuantConfig(**REFERENCE))
    bound = q.error_bound()
    # spec §1c: edge term 0.563 normalised = 0.94 latent dominates the interior half-gap 0.221
    assert bound == pytest.approx(0.563 * 10 / 6, abs=2e-3)
    x = torch.linspace(-5, 5, 200001)
    err = (x - q.dequantize(q.quantize(x))).abs()
    assert err.max().item() <= bound + 1e-5
    assert err.max().item() == pytest.approx(bound, abs=1e-3)  # attained at x = lo: the bound is tight
    interior_half_gap = ((q.values[1:] - q.values[:-1]) / 2).max().item() * q.scale
    assert err.max().item() > interior_half_gap + 0.3  # "half a bin" does not hold at the edges
    z = torch.randn(100000, generator=torch.Generator().manual_seed(0))
    assert (z - q.dequantize(q.quantize(z))).abs().mean().item() < 0.05


def test_default_range_is_the_reference_and_beats_identity_normalisation_on_gaussian_data():
    """On N(0, 1) latents the default (reference) +-5 has ~6x lower MSE than +-3 = +-r, which
    clips everything beyond 3 sd (issue 20: 6.56e-4 vs 3.98e-3 at 64 levels)."""
    assert (DimQuantConfig().lo, DimQuantConfig().hi) == (-5.0, 5.0)
    z = torch.randn(400000, generator=torch.Generator().manual_seed(0))

    def mse(**kw):
        q = DimQuantizer(DimQuantConfig(levels=64, **kw))
        return (z - q.dequantize(q.quantize(z))).pow(2).mean().item()

    default, narrow = mse(), mse(lo=-3.0, hi=3.0)
    assert default == pytest.approx(6.56e-4, rel=0.05) and narrow == pytest.approx(3.98e-3, rel=0.1)
    assert default < narrow / 4


@pytest.mark.parametrize(
    "key,value",
    [("levels", 1), ("std_range", 0.0), ("lo", 6.0), ("bins", "log"), ("assign", "round")],
)
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        DimQuantizer(DimQuantConfig(**{**REFERENCE, key: value}))


# ---- dimension-wise AR head ----

from vargen.heads.dimwise import DimwiseARHead, DimwiseHeadConfig, channel_order_by_error  # noqa: E402

ORDER = [3, 0, 5, 1, 4, 2]


def _head(order=ORDER, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = DimwiseHeadConfig(channels=6, levels=16, cond_dim=12, width=32, depth=2, heads=4, order=order, **kw)
    head = DimwiseARHead(cfg).eval()
    # move the zero-initialised AdaLN layers off zero so that every path carries signal
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return head


def test_head_causality_by_perturbation():
    head = _head()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 12, generator=g)
    q = torch.randint(0, 16, (5, 6), generator=g)
    base = head(z, q)  # (M, C, B), generation order
    for k, ch in enumerate(ORDER):
        q2 = q.clone()
        q2[:, ch] = (q2[:, ch] + 7) % 16
        pert = head(z, q2)
        torch.testing.assert_close(pert[:, : k + 1], base[:, : k + 1], atol=1e-6, rtol=0)
        if k + 1 < len(ORDER):  # the next channel does see it
            assert (pert[:, k + 1] - base[:, k + 1]).abs().max() > 1e-4


def test_head_initial_loss_close_to_log_levels():
    torch.manual_seed(0)
    head = DimwiseARHead(DimwiseHeadConfig(channels=6, levels=64, cond_dim=12, width=32))
    z = torch.randn(256, 12)
    q = torch.randint(0, 64, (256, 6))
    loss = head.loss(z, q).item()
    assert abs(loss - math.log(64)) < 0.05


def test_head_cached_sampling_matches_teacher_forced_greedy():
    """KV-cached channel-by-channel decoding == greedy decoding through the uncached forward."""
    head = _head()
    z = torch.randn(7, 12, generator=torch.Generator().manual_seed(2))
    sampled = head.sample(z, generator=torch.Generator().manual_seed(0), temperature=1e-5)
    q = torch.zeros(7, 6, dtype=torch.long)
    for k, ch in enumerate(ORDER):
        q[:, ch] = head(z, q)[:, k].argmax(-1)
    assert torch.equal(sampled, q)


def test_head_sampling_is_seeded_and_uses_order_inverse():
    head = _head()
    assert torch.equal(head.order[head.inverse], torch.arange(6))
    assert torch.equal(head.inverse[head.order], torch.arange(6))
    z = torch.randn(4, 12)
    a = head.sample(z, generator=torch.Generator().manual_seed(3))
    b = head.sample(z, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 6) and a.max() < 16


def test_head_learns_a_conditional_distribution(one_thread):
    """Trained on q_c = f(z) with channel 0 a deterministic copy of channel 3, the head fits it."""
    torch.manual_seed(0)
    head = DimwiseARHead(
        DimwiseHeadConfig(channels=4, levels=8, cond_dim=4, width=32, depth=2, order=[3, 0, 1, 2])
    )
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        z = torch.randn(128, 4, generator=g)
        q = torch.randint(0, 8, (128, 4), generator=g)
        q[:, 0] = q[:, 3]  # channel 0 is predictable only from channel 3, generated before it
        loss = head.loss(z, q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    out = head.sample(torch.randn(500, 4, generator=g), generator=torch.Generator().manual_seed(1))
    assert (out[:, 0] == out[:, 3]).float().mean() > 0.9
    counts = torch.bincount(out[:, 1], minlength=8).double()  # channel 1 is uniform noise
    chi2 = ((counts - 62.5) ** 2 / 62.5).sum().item()
    assert chi2 < 24.3  # chi-square, 7 dof, p = 0.001


def test_channel_order_by_error_ranks_known_weights():
    weights = torch.tensor([0.5, 3.0, 0.1, 1.0])
    tokens = torch.randn(64, 9, 4, generator=torch.Generator().manual_seed(0))
    assert channel_order_by_error(tokens, lambda t: t * weights) == [1, 3, 0, 2]


def test_head_bad_order_names_the_key():
    with pytest.raises(ValueError, match="head.order"):
        DimwiseARHead(DimwiseHeadConfig(channels=3, order=[0, 0, 1]))


# ---- backbone + sampler ----

from vargen.models.tokenbridge_ar import TokenBridgeAR, TokenBridgeARConfig  # noqa: E402
from vargen.sampling.decoders.tokenbridge import sample_tokenbridge  # noqa: E402


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = TokenBridgeARConfig(vocab_size=16, code_dim=4, grid=[2, 3], num_classes=3, dim=32, depth=2)
    return TokenBridgeAR(cfg).eval()


def test_backbone_is_causal_and_feeds_dequantized_latents():
    model = _model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (2, 6, 4), generator=g)
    labels = torch.tensor([0, 2])
    z = model.features(model.embed(ids, labels, 0), 0, None)  # (B, 7, D): class token + 6 tokens
    ids2 = ids.clone()
    ids2[:, 3, 1] = (ids2[:, 3, 1] + 5) % 16
    z2 = model.features(model.embed(ids2, labels, 0), 0, None)
    torch.testing.assert_close(z2[:, :4], z[:, :4], atol=1e-6, rtol=0)  # positions <= 3 unaffected
    assert (z2[:, 4:] - z[:, 4:]).abs().max() > 1e-4
    x = model.embed(ids[:, :1], None, 1)  # the input is Linear(dequantize(ids))
    torch.testing.assert_close(x, model.tok_in(model.quantizer.dequantize(ids[:, :1])))


def test_model_initial_loss_close_to_log_levels():
    model = _model().train()
    ids = torch.randint(0, 16, (32, 6, 4), generator=torch.Generator().manual_seed(0))
    loss = model.loss(ids, torch.randint(0, 3, (32,)))["loss"].item()
    assert abs(loss - math.log(16)) < 0.05


def test_sampler_cache_matches_uncached_greedy_and_is_seeded():
    model = _model()
    labels = torch.tensor([1, 0, 2])
    for w in (1.0, 2.5):
        ids, stats = sample_tokenbridge(
            model, labels, generator=torch.Generator().manual_seed(0), cfg_scale=w, temperature=1e-5
        )
        assert stats["target_forwards"] == 6 and stats["head_steps"] == 24 and ids.shape == (3, 6, 4)
        ref = torch.zeros(3, 6, 4, dtype=torch.long)
        for t in range(6):  # uncached backbone, guided features, greedy head
            zc = model.features(model.embed(ref[:, :t], labels, 0), 0, None)[:, t]
            zu = model.features(model.embed(ref[:, :t], torch.full_like(labels, 3), 0), 0, None)[:, t]
            z = zu + w * (zc - zu)
            q = torch.zeros(3, 4, dtype=torch.long)
            for k, ch in enumerate(model.head.order.tolist()):
                q[:, ch] = model.head(z, q)[:, k].argmax(-1)
            ref[:, t] = q
        assert torch.equal(ids, ref)
    a, _ = sample_tokenbridge(model, labels, generator=torch.Generator().manual_seed(4), cfg_scale=2.0)
    b, _ = sample_tokenbridge(model, labels, generator=torch.Generator().manual_seed(4), cfg_scale=2.0)
    assert torch.equal(a, b)


def test_pipeline_train_py_tasks_and_sampler(tmp_path, one_thread):
    """kl -> tokenbridge (no training) -> tokenbridge_ar through the real tasks, then the sampler."""
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.sampling.generate import default_sampler
    from vargen.train.tasks import run

    from .conftest import task_config

    torch.manual_seed(0)
    quiet = dict(log=lambda m: None)
    kl_model = {"name": "kl", "hidden": [16, 32], "code_dim": 8}
    run(task_config("tokenizer", tmp_path / "kl", dict(steps=30, batch_size=32), model=kl_model), **quiet)
    tb_model = {"name": "tokenbridge", "kl_ckpt": str(tmp_path / "kl"), "levels": 16, "lo": -4.0, "hi": 4.0}
    tok = run(task_config("tokenbridge", tmp_path / "tb", {}, model=tb_model), **quiet)
    assert tok.tokens_spec["kind"] == "dim_ids"
    gen_model = {"name": "tokenbridge_ar", "dim": 32, "depth": 1, "head_width": 32, "head_depth": 1}
    gen_cfg = task_config(
        "generator",
        tmp_path / "gen",
        dict(steps=10, batch_size=32),
        tokenizer_ckpt=str(tmp_path / "tb"),
        model=gen_model,
    )
    run(gen_cfg, **quiet)
    model, cfg = load_component(str(tmp_path / "gen"))
    assert model.cfg.vocab_size == 16 and model.cfg.code_dim == 8
    assert (model.cfg.lo, model.cfg.hi) == (-4.0, 4.0)  # the range is filled from the tokenizer
    tok = load_tokenizer_for(cfg)
    ids, stats = sample_tokenbridge(
        model, torch.arange(4), generator=torch.Generator().manual_seed(0), cfg_scale=2.0
    )
    images = tok.decode(ids)
    assert images.shape == (4, 1, 16, 16) and stats["target_forwards"] == 16
    assert default_sampler(str(tmp_path / "gen")) == "tokenbridge"
