"""xAR: the backbone-flow design (the paper's: joint denoising of an entity, causality, cached
solver = uncached recompute, a trained toy's within-entity correlation), the per-token head design
(MAR's: block causality, cache = full recompute), the CFG ramp, the ODE / SDE solvers and the
temperature against an analytic Gaussian, noisy context, and a trained model's FID."""

import math

import pytest
import torch

from vargen.heads.flow import DEFAULT_STEPS, FlowHead, FlowHeadConfig, euler_maruyama, integrate
from vargen.models.xar import XAR, XARConfig, cfg_ramp
from vargen.sampling.decoders.xar import sample_xar

KINDS = ["token", "cell", "subsample", "scale", "image"]


def _model(entity, head="flow", noisy_context=True, denoiser="head"):
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
        denoiser=denoiser,
        head={"name": head, "width": 32, "depth": 1, "num_sampling_steps": 4},
    )
    model = XAR(cfg).eval()
    with torch.no_grad():  # leave adaLN-Zero's identity start: attention must carry information
        for blk in model.blocks:
            blk.ada[-1].weight.normal_(std=0.1)
        if denoiser == "backbone":  # and the zero output layers: the velocity must depend on x
            model.out_ada[-1].weight.normal_(std=0.1)
            model.out.weight.normal_(std=0.1)
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


@pytest.mark.parametrize("solver", ["ode", "sde"])
def test_solvers_recover_a_gaussian_target_at_the_default_steps(solver):
    """Exact velocity of N(1.5, 0.5^2): mean and std within 2% at DEFAULT_STEPS (25 ODE steps: -5%)."""
    mu, s = 1.5, 0.5
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(50_000, 1, generator=g, dtype=torch.float64)
    x = integrate(_gaussian_velocity(mu, s), eps, DEFAULT_STEPS[solver], solver, g)
    assert abs(x.mean().item() / mu - 1) < 0.02
    assert abs(x.std().item() / s - 1) < 0.02, x.std().item() / s
    # and a wrong velocity (the target's mean off by 0.3) is detected at this tolerance
    x_bad = integrate(_gaussian_velocity(mu + 0.3, s), eps, DEFAULT_STEPS[solver], solver, g)
    assert abs(x_bad.mean().item() - mu) > 0.2


def test_sde_is_the_reference_euler_maruyama():
    """One step written out: grid linspace(1, 0.04, n) then 0, drift v - t score, noise sqrt(2 t |dt|),
    the last step (0.04 -> 0) without noise."""
    v = _gaussian_velocity(0.3, 0.7)
    x1 = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = euler_maruyama(v, x1, 3, torch.Generator().manual_seed(2), temperature=0.8)
    g = torch.Generator().manual_seed(2)
    x = x1
    for i, (t, t_next) in enumerate(((1.0, 0.52), (0.52, 0.04), (0.04, 0.0))):
        vel = v(x, t)
        x = x + (t_next - t) * (vel + (x + (1 - t) * vel))  # -t score = x + (1 - t) v
        if i < 2:
            x = x + 0.8 * math.sqrt(2 * t * abs(t_next - t)) * torch.randn(
                5, 2, generator=g, dtype=torch.float64
            )
    torch.testing.assert_close(got, x)


@pytest.mark.parametrize("solver", ["ode", "sde"])
def test_temperature_scales_a_gaussian_targets_spread_exactly(solver):
    """tau multiplies every Gaussian draw: with an affine (Gaussian-target) velocity the sample at
    tau is m + tau (x_1 - m), m the noise-free (tau = 0) output, draw for draw."""
    v = _gaussian_velocity(1.5, 0.5)
    eps = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {
        tau: integrate(v, eps, 20, solver, torch.Generator().manual_seed(1), tau) for tau in (0.0, 0.6, 1.0)
    }
    m = out[0.0]
    torch.testing.assert_close(out[0.6], m + 0.6 * (out[1.0] - m))
    assert (out[1.0] - m).std() > 0.3  # the draws do reach the sample


def test_flow_head_sample_uses_the_temperature_for_start_and_injected_noise():
    head = FlowHead(FlowHeadConfig(width=8, depth=1, sde=True, num_sampling_steps=6), token_dim=2, cond_dim=4)
    head.velocity = lambda x, t, c: _gaussian_velocity(1.0, 0.5)(x, t)
    z = torch.zeros(500, 4, dtype=torch.float64)
    out = {tau: head.sample(z, torch.Generator().manual_seed(3), temperature=tau) for tau in (0.0, 0.5, 1.0)}
    torch.testing.assert_close(out[0.5], out[0.0] + 0.5 * (out[1.0] - out[0.0]))


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


# ---------------------------------------------------------------- backbone flow (xAR's design)
def _flow(kind, **kw):
    return _model(kind, denoiser="backbone", **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_backbone_perturbing_one_token_moves_its_entity_and_nothing_before(kind):
    """models.md 1c: one token of entity i changes every output of i (joint denoising) and
    none of the entities before i; its time t_i likewise acts on entities >= i only."""
    model = _flow(kind)
    B, E = 2, model.num_entities
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, model.length, 3, generator=g)
    t = torch.rand(B, model.length, generator=g)
    y = torch.tensor([0, 2])
    base = model.prefix_velocity(x, t, y)
    for i in range(E):
        a, b = model.starts[i], model.starts[i + 1]
        x2 = x.clone()
        x2[:, a] += 1.0  # the entity's first token only
        out = model.prefix_velocity(x2, t, y)
        assert torch.equal(out[:, :a], base[:, :a])
        moved = (out[:, a:b] - base[:, a:b]).abs().amax(-1)  # (B, n_i): per token
        assert (moved > 1e-5).all(), moved
        t2 = t.clone()
        t2[:, a:b] = 0.9
        out = model.prefix_velocity(x, t2, y)
        assert torch.equal(out[:, :a], base[:, :a])
        assert ((out[:, a:b] - base[:, a:b]).abs().amax(-1) > 1e-5).all()


@pytest.mark.parametrize("kind", KINDS)
def test_backbone_cached_solver_equals_uncached_recompute(kind):
    """Guided SDE sampling through the KV cache (clean entity committed on the next entity's first
    step) equals recomputing [clean entities < e (t = 0), noisy e] at every step."""
    model = _flow(kind)
    y = torch.tensor([0, 1, 2])
    kw = dict(cfg_scale=2.0, num_steps=4, temperature=0.9)
    a, st = sample_xar(model, y, generator=torch.Generator().manual_seed(1), **kw)
    b, _ = sample_xar(model, y, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert a.shape == (3, 16, 3) and a.abs().amax() > 0.1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert st["target_forwards"] == st["solver_steps"] == 4 * model.num_entities
    assert st["ar_steps"] == model.num_entities


@pytest.mark.parametrize("kind", ["cell", "scale"])
def test_teacher_forced_training_forward_is_the_samplers_computation(kind):
    """noisy_context=false: the noisy half of [clean, noisy] gives, for every entity e, the
    velocity of [clean entities < e, noisy e], what the sampler evaluates."""
    model = _flow(kind, noisy_context=False)
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(2, model.length, 3, generator=g), torch.randn(2, model.length, 3, generator=g)
    t_BL = torch.rand(2, model.num_entities, generator=g)[:, model.entity_L]
    y = torch.tensor([1, 2])
    tf = model.teacher_forced_velocity(x, xt, t_BL, y)
    for e in range(model.num_entities):
        a, b = model.starts[e], model.starts[e + 1]
        seq = torch.cat([x[:, :a], xt[:, a:b]], dim=1)
        t = torch.cat([torch.zeros(2, a), t_BL[:, a:b]], dim=1)
        torch.testing.assert_close(tf[:, a:b], model.prefix_velocity(seq, t, y)[:, a:b], atol=1e-5, rtol=1e-5)


def test_backbone_times_are_logit_normal_per_sample_and_entity():
    from scipy.stats import kstest, norm

    model = _flow("cell")
    t = model.entity_times(4000, "cpu", generator=torch.Generator().manual_seed(0))  # (B, E)
    assert t.shape == (4000, 4) and ((t > 0) & (t < 1)).all()
    logit = torch.log(t / (1 - t)).flatten().double().numpy()
    assert kstest(logit, norm.cdf).pvalue > 0.01
    assert abs(torch.corrcoef(t[:, :2].T)[0, 1]) < 0.05  # independent across entities


def _joint_toy(kind, denoiser, steps=80):
    """Train on tokens that are equal within an entity (value +-1 + 0.1 noise per entity)."""
    torch.manual_seed(0)
    grid = [2, 2] if kind == "image" else [2, 4]
    head = {"name": "flow", "width": 32, "depth": 2, "num_sampling_steps": 20}
    cfg = XARConfig(
        grid=grid,
        code_dim=1,
        num_classes=1,
        entity=kind,
        cell=2,
        dim=32,
        depth=2,
        heads=2,
        class_dropout=0.0,
        denoiser=denoiser,
        head=head,
    )
    model = XAR(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sizes = model.sizes
    for _ in range(steps):
        sign = torch.randint(0, 2, (64, len(sizes))).float() * 2 - 1  # one value per entity
        vals = sign + 0.1 * torch.randn(64, len(sizes))
        x_BL1 = torch.repeat_interleave(vals, torch.tensor(sizes), dim=1)[..., None]  # entity order
        loss = model.loss(model.entities.unclusterify(x_BL1), torch.zeros(64, dtype=torch.long))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    y = torch.zeros(400, dtype=torch.long)
    x, _ = sample_xar(model, y, generator=torch.Generator().manual_seed(0), num_steps=20)
    x_BL = model.entities.clusterify(x)[..., 0]
    a = model.starts[-1] - model.sizes[-1]
    return torch.corrcoef(x_BL[:, [a, a + 1]].T)[0, 1].item()  # two tokens of the last entity


@pytest.mark.parametrize("kind", ["image", "cell"])
def test_joint_toy_tokens_of_an_entity_come_out_correlated(one_thread, kind):
    """issue 19: tokens equal within an entity are generated with correlation >= 0.9 by the
    backbone flow; MAR's per-token head draws them independently given the context (~0)."""
    corr = _joint_toy(kind, "backbone")
    print(f"{kind}: within-entity correlation {corr:.3f}")
    assert corr >= 0.9


def test_a_checkpoint_config_without_denoiser_rebuilds_the_per_token_head_model():
    """Checkpoints from before ``denoiser`` existed were the head design (LATER_MODEL_KEYS)."""
    import dataclasses

    from vargen.checkpoint import with_later_keys

    known = {f.name for f in dataclasses.fields(XARConfig)}
    old = {"name": "xar", "entity": "token"}
    assert with_later_keys(old, known)["denoiser"] == "head"
    assert with_later_keys({**old, "denoiser": "backbone"}, known)["denoiser"] == "backbone"
    assert XARConfig().denoiser == "backbone"  # while new configs get the paper's design
