"""xAR backbone, flow head and sampler: block causality, cache = full recompute, the CFG ramp,
the ODE / SDE sampler against an analytic Gaussian, noisy context, and a trained model's FID."""

import math

import pytest
import torch

from vargen.heads.flow import FlowHead, FlowHeadConfig, euler_maruyama, euler_ode
from vargen.models.xar import XAR, XARConfig, cfg_ramp
from vargen.sampling.decoders.xar import sample_xar

KINDS = ["token", "cell", "subsample", "scale", "image"]


def _model(entity, head="flow", noisy_context=True):
    torch.manual_seed(0)
    cfg = XARConfig(
        grid=[4, 4],
        code_dim=3,
        num_classes=3,
        entity=entity,
        dim=32,
        depth=2,
        heads=2,
        noisy_context=noisy_context,
        head={"name": head, "width": 32, "depth": 1, "num_sampling_steps": 4},
    )
    model = XAR(cfg).eval()
    with torch.no_grad():  # leave adaLN-Zero's identity start: attention must carry information
        for blk in model.blocks:
            blk.ada[-1].weight.normal_(std=0.1)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_entity_conditions_are_block_causal(kind):
    model = _model(kind)
    B, E = 2, model.num_entities
    x = torch.randn(B, model.length, 3)
    t = torch.zeros(B, E)
    y = torch.tensor([0, 2])
    base = model.conditions(x, t, y)
    for j in range(E):
        a, b = model.starts[j], model.starts[j + 1]
        x2 = x.clone()
        x2[:, a:b] += 1.0
        out = model.conditions(x2, t, y)
        # entity j's tokens are context for entities > j only
        torch.testing.assert_close(out[:, : model.starts[j + 1]], base[:, : model.starts[j + 1]])
        if j + 1 < E:
            assert (out[:, model.starts[j + 1] :] - base[:, model.starts[j + 1] :]).abs().amax() > 1e-4
        # the context time of entity j acts on the same positions as its tokens
        t2 = t.clone()
        t2[:, j] = 0.7
        out = model.conditions(x, t2, y)
        torch.testing.assert_close(out[:, : model.starts[j + 1]], base[:, : model.starts[j + 1]])
        if j + 1 < E:
            assert (out[:, model.starts[j + 1] :] - base[:, model.starts[j + 1] :]).abs().amax() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_cached_entity_forwards_equal_full_recompute(kind):
    model = _model(kind)
    B = 3
    x = torch.randn(B, model.length, 3)
    y = torch.tensor([0, 1, 2])
    full = model.conditions(x, torch.zeros(B, model.num_entities), y)
    cache, parts = model.new_cache(B), []
    for e in range(model.num_entities):
        prev = None if e == 0 else x[:, model.starts[e - 1] : model.starts[e]]
        parts.append(model.forward_entity(e, prev, y, cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_rope_positions_are_grid_positions_in_entity_order(kind):
    model = _model(kind)
    rows, cols = model.grid_positions()  # (L,) each
    assert rows.shape == (model.length,)
    pos = torch.stack([rows, cols], -1)[None].double()  # (1, L, 2)
    raster = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(
        1, 16, 2
    )
    if kind == "scale":  # the finest scale is the grid; a coarse cell sits at the centre of its block
        torch.testing.assert_close(pos[:, -16:], raster.double())
        torch.testing.assert_close(pos[0, 0], torch.tensor([1.5, 1.5], dtype=torch.float64))
    else:  # unclusterify puts every position back on its own raster cell
        torch.testing.assert_close(model.entities.unclusterify(pos), raster.double())


def test_entity_conditions_of_raster_tokens_use_clean_context():
    model = _model("cell")
    tokens = torch.randn(2, 16, 3)
    y = torch.tensor([1, 2])
    x = model.entities.clusterify(tokens)
    want = model.conditions(x, torch.zeros(2, model.num_entities), y)
    torch.testing.assert_close(model.entity_conditions(tokens, y), want)


def test_cfg_ramp_endpoints():
    assert cfg_ramp(0, 4, 3.0) == 1.0 and cfg_ramp(3, 4, 3.0) == 3.0
    assert cfg_ramp(1, 3, 3.0) == pytest.approx(2.0)
    assert cfg_ramp(0, 1, 3.0) == 3.0  # one entity (image): it is the last one


@pytest.mark.parametrize("head", ["flow", "mar_diffusion"])
def test_guidance_weight_one_is_the_conditional_branch(head):
    model = _model("cell", head=head)
    z = torch.randn(5, 32)
    a = model.head.sample(z, torch.Generator().manual_seed(0), 4, 1.0, 1.0, torch.randn(5, 32))
    b = model.head.sample(z, torch.Generator().manual_seed(0), 4, 1.0, 1.0, None)
    torch.testing.assert_close(a, b)


def test_sampler_is_seeded_and_counts_one_forward_per_entity():
    model = _model("subsample")
    y = torch.tensor([0, 1, 2, 0])
    a, stats = sample_xar(model, y, generator=torch.Generator().manual_seed(1), cfg_scale=2.0)
    b, _ = sample_xar(model, y, generator=torch.Generator().manual_seed(1), cfg_scale=2.0)
    assert a.shape == (4, 16, 3) and torch.equal(a, b)
    assert stats["target_forwards"] == model.num_entities == 4
    # first entity unguided (1 head eval per step), the others guided (2)
    assert stats["head_evals"] == 4 * (1 + 2 * 3)


def test_flow_head_starts_at_zero_velocity():
    head = FlowHead(FlowHeadConfig(width=16, depth=2), token_dim=3, cond_dim=8)
    v = head.velocity(torch.randn(6, 3), torch.rand(6), torch.randn(6, 8))
    assert torch.equal(v, torch.zeros(6, 3))


def test_flow_loss_is_zero_for_the_oracle_velocity():
    torch.manual_seed(0)
    head = FlowHead(FlowHeadConfig(width=16, depth=1, batch_mul=2), token_dim=3, cond_dim=8)
    x0, z = torch.randn(5, 3), torch.randn(5, 8)
    rep = x0.repeat(2, 1)  # the loss repeats each pair batch_mul times
    head.velocity = lambda x, t, c: (x - rep) / t[:, None]  # = eps - x0 on the linear path
    assert head.loss(x0, z).item() < 1e-10
    head.velocity = lambda x, t, c: (x - 0.9 * rep) / t[:, None]  # a slightly wrong oracle
    assert head.loss(x0, z).item() > 1e-3


def _gaussian_velocity(mu, s):
    """Exact velocity of the linear path from N(mu, s^2) (t = 1 noise): E[eps - x0 | x_t]."""

    def v(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        return t / var * r - (mu + (1 - t) * s**2 / var * r)

    return v


@pytest.mark.parametrize("sde", [False, True])
def test_euler_sampler_recovers_a_gaussian_target(sde):
    mu, s = 1.5, 0.4
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(40000, 1, generator=g, dtype=torch.float64)
    v = _gaussian_velocity(mu, s)
    x = euler_maruyama(v, x1, 200, g) if sde else euler_ode(v, x1, 200)
    assert abs(x.mean().item() - mu) < 0.01
    assert abs(x.std().item() - s) < 0.01
    # and a wrong velocity (the target's mean off by 0.3) is detected at this tolerance
    x_bad = euler_ode(_gaussian_velocity(mu + 0.3, s), x1, 200)
    assert abs(x_bad.mean().item() - mu) > 0.2


def test_noisy_context_times_per_sample_and_entity():
    on = _model("cell", noisy_context=True).context_times(64, "cpu")
    assert on.shape == (64, 4) and (on > 0).all() and (on < 1).all()
    assert on.std() > 0.2 and (on[:, 0] != on[:, 1]).all()
    off = _model("cell", noisy_context=False).context_times(64, "cpu")
    assert torch.equal(off, torch.zeros(64, 4))


def test_loss_reaches_backbone_through_either_head():
    for head in ("flow", "mar_diffusion"):
        model = _model("cell", head=head).train()
        x, y = torch.randn(8, 16, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):  # zero-initialised head output and adaLN: the backbone learns from step 3
            opt.zero_grad()
            out = model.loss(x, y)
            out["loss"].backward()
            assert math.isfinite(out["loss"].item()) and model.head.net.out.weight.grad.abs().sum() > 0
            opt.step()
        assert model.tok_in.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def trained_xar(tmp_path_factory):
    """A KL tokenizer and an xAR (cells, flow head) trained on digits through the real tasks."""
    from vargen.train.tasks import run

    from .conftest import task_config

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("xar")
    torch.manual_seed(0)
    kl = {"name": "kl", "hidden": [16, 32], "code_dim": 8}
    run(task_config("tokenizer", root / "kl", dict(steps=150, batch_size=64, lr=3e-3), model=kl), log=print)
    model = {"name": "xar", "entity": "cell", "dim": 48, "depth": 2, "heads": 4}
    model["head"] = {"name": "flow", "width": 64, "depth": 2, "num_sampling_steps": 10}
    train = dict(steps=250, batch_size=64, lr=2e-3)
    run(
        task_config("generator", root / "xar", train, tokenizer_ckpt=str(root / "kl"), model=model), log=print
    )
    return root


def test_trained_xar_samples_beat_an_untrained_one(trained_xar, tmp_path):
    import json

    import sample
    from vargen.checkpoint import load_component, load_tokenizer_for
    from vargen.eval import FIDEvaluator
    from vargen.registry import MODELS
    from vargen.sampling.generate import class_labels, generate

    out = tmp_path / "samples"
    argv = ["--ckpt", str(trained_xar / "xar"), f"out={out}", "num_samples=200", "fid=true", "progress=false"]
    assert sample.main(argv) == 0
    fid = json.load(open(out / "metrics.json"))["fid"]
    model, cfg = load_component(str(trained_xar / "xar"))
    torch.manual_seed(0)
    untrained = MODELS.build(cfg.model).eval()
    labels = class_labels(200, model.num_classes, [])
    images, _, _ = generate(
        untrained,
        load_tokenizer_for(cfg),
        labels,
        lambda m, c, g: sample_xar(m, c, generator=g),
        torch.Generator().manual_seed(0),
        200,
    )
    fid_untrained = FIDEvaluator.for_dataset(dict(cfg.data), split="heldout").score(images)
    print(f"xAR FID trained {fid:.1f} vs untrained {fid_untrained:.1f}")
    assert fid < 0.6 * fid_untrained, (fid, fid_untrained)
