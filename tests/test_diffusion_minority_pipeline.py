"""Minority guidance pipeline: image minority scores, the noisy level classifier, the ``minority``
sampler (spec 3), on exact analytic denoisers of image-shaped data and end to end on digits."""

import pytest
import torch

from vargen.diffusion.analytic import GaussianMixtureDenoiser
from vargen.diffusion.loops import ddim_sample
from vargen.diffusion.minority import assign_levels, minority_score, minority_scores, quantile_levels
from vargen.diffusion.schedules import linear_alphas_cumprod
from vargen.models.minority_classifier import NoisyClassifierConfig, NoisyLevelClassifier
from vargen.sampling.decoders.minority import check_classifier, sample_minority

ABAR = linear_alphas_cumprod()
W, MU, VAR = torch.tensor([0.85, 0.15]), torch.tensor([-1.0, 2.0]), torch.tensor([0.25, 0.25])
GMM = GaussianMixtureDenoiser(W, MU, VAR, ABAR)
SHAPE = (1, 8, 8)


def _gmm_images(n, g):
    """n images (n, 1, 8, 8) in model space, every pixel iid from the mixture."""
    comp = torch.multinomial(W, n * 64, replacement=True, generator=g)
    return (MU[comp] + VAR[comp].sqrt() * torch.randn(n * 64, generator=g)).reshape(n, *SHAPE).double()


def _ranks(v):
    return v.argsort().argsort().double()


def test_single_gaussian_l2_score_is_analytic_and_ranks_like_minus_log_p():
    """Spec 3c: for N(0, v0) Tweedie is linear, x0_hat = k x_t, so the L2 score has mean
    (1 - k sqrt(abar))^2 x0^2 + k^2 (1 - abar), increasing in -log p(x0): Spearman = 1."""
    v0, t = 0.5, 605
    den = GaussianMixtureDenoiser([1.0], [0.0], [v0], ABAR)
    x0 = torch.linspace(-3, 3, 41, dtype=torch.float64).reshape(41, 1, 1, 1)  # images in model space
    s = minority_scores((x0 + 1) / 2, den, torch.Generator().manual_seed(0), t=t, n_iter=400, clip=False)
    a = ABAR[t]
    k = a.sqrt() * v0 / (a * v0 + 1 - a)
    expected = (1 - k * a.sqrt()) ** 2 * x0.flatten() ** 2 + k**2 * (1 - a)
    assert torch.allclose(s, expected, rtol=0.03, atol=0.01)
    neg_logp = x0.flatten() ** 2  # up to a constant and a positive factor
    half = x0.flatten() >= 0  # ties of -log p at +-x0 make ranks ambiguous; one side is strict
    assert torch.corrcoef(torch.stack([_ranks(s[half]), _ranks(neg_logp[half])]))[0, 1] == pytest.approx(1.0)


def test_image_scores_equal_the_library_score_draw_for_draw_and_perceptual_of_identity_is_l2():
    g = torch.Generator().manual_seed(1)
    x0 = _gmm_images(12, g).clamp(-1, 1)
    ref = minority_score(
        x0, lambda x, t: _x0_hat(x, t).clamp(-1, 1), ABAR, 605, torch.Generator().manual_seed(5)
    )
    s = minority_scores((x0 + 1) / 2, GMM, torch.Generator().manual_seed(5), batch_size=12)
    assert torch.allclose(s, ref)
    # batching draws the noise per batch: a different but equally valid estimate, same size
    s_b = minority_scores((x0 + 1) / 2, GMM, torch.Generator().manual_seed(5), batch_size=5)
    assert s_b.shape == s.shape and not torch.allclose(s_b, s)
    # perceptual with the identity feature map on [0, 1] images is the model-space L2 / 4
    perc = minority_scores(
        (x0 + 1) / 2,
        GMM,
        torch.Generator().manual_seed(5),
        batch_size=12,
        distance="perceptual",
        feature_net=lambda im: im.flatten(1),
    )
    assert torch.allclose(perc, s / 4)
    with pytest.raises(ValueError, match="outside the denoiser's grid"):
        minority_scores((x0 + 1) / 2, GMM, g, t=1000)


def _x0_hat(x_t, t):
    from vargen.diffusion.denoiser import predict_x0

    return predict_x0(GMM, x_t, torch.full((x_t.shape[0],), t))


def test_levels_of_gmm_images_rise_with_the_minor_component():
    """Spec 3c (GMM): no monotonicity, but images with more minor-component pixels score higher;
    quantile labels are balanced within 1 and held-out images get levels from the same thresholds."""
    g = torch.Generator().manual_seed(2)
    x0 = _gmm_images(800, g)
    s = minority_scores((x0 + 1) / 2, GMM, g, clip=False)
    labels, q = quantile_levels(s, 4)
    assert (torch.bincount(labels, minlength=4) - 200).abs().max() <= 1
    assert torch.equal(assign_levels(s, q), labels)
    minor = (x0 > 0.5).flatten(1).sum(1).double()  # minor-component pixels per image
    means = [minor[labels == k].mean() for k in range(4)]
    assert means[0] < means[1] < means[2] < means[3]


def _classifier(L=4, width=16):
    clf = NoisyLevelClassifier(
        NoisyClassifierConfig(
            channels=1, resolution=8, num_levels=L, num_steps=1000, width=width, time_dim=32
        )
    )
    clf.abar.copy_(ABAR)
    return clf


def test_classifier_loss_is_cross_entropy_at_q_sample_of_its_own_grid():
    torch.manual_seed(3)
    clf = _classifier()
    clf.abar.copy_(ABAR.flip(0))  # its own grid, not the default one
    x0, y = torch.randn(6, *SHAPE), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(4)
    out = clf.loss(x0, y)
    torch.manual_seed(4)
    t_B = torch.randint(0, 1000, (6,))
    a = clf.abar[t_B].float().view(-1, 1, 1, 1)
    logits = clf(a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0), t_B)
    assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(logits, y))
    assert out["acc"] == (logits.argmax(-1) == y).float().mean()
    grad = clf.grad_log_prob(x0, t_B, 2)
    x = x0.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(clf(x, t_B).log_softmax(-1)[:, 2].sum(), x)
    assert torch.allclose(grad, ref)


def test_sampler_rejects_a_classifier_of_another_grid_and_bad_levels():
    clf = _classifier()
    assert check_classifier(clf, GMM, -1) == 3 and check_classifier(clf, GMM, 1) == 1
    with pytest.raises(ValueError, match="sampler.level"):
        check_classifier(clf, GMM, 4)
    other = GaussianMixtureDenoiser(W, MU, VAR, linear_alphas_cumprod(500))
    with pytest.raises(ValueError, match="classifier_ckpt.*500-step"):
        check_classifier(clf, other, -1)
    clf.abar.copy_(linear_alphas_cumprod(1000, beta_end=0.03))
    with pytest.raises(ValueError, match="differs"):
        check_classifier(clf, GMM, -1)


def test_w0_is_plain_ddpm_draw_for_draw():
    cond = torch.zeros(16, dtype=torch.long)
    x, st = sample_minority(
        GMM, _classifier(), cond, torch.Generator().manual_seed(6), w=0.0, steps=20, shape=SHAPE
    )
    ref, _ = ddim_sample(
        lambda x, t: GMM(x, t), (16, *SHAPE), 20, torch.Generator().manual_seed(6), abar=ABAR, eta=1.0
    )
    assert torch.equal(x, ref)
    assert st["target_forwards"] == 20 and st["classifier_forwards"] == 0 and st["net_evals"] == 320


def test_trained_classifier_guidance_raises_the_target_level_fraction(one_thread):
    """A tiny classifier trained on GMM images (4 levels), used through the sampler: the fraction
    of samples whose minority level (scored with the exact denoiser) is the top one rises with w."""
    g = torch.Generator().manual_seed(7)
    x = _gmm_images(1500, g).float()
    levels, q = quantile_levels(minority_scores((x + 1) / 2, GMM, g, clip=False), 4)
    torch.manual_seed(0)
    clf = _classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(200):
        idx = torch.randint(len(x), (128,))
        loss = clf.loss(x[idx], levels[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval().requires_grad_(False)
    fracs = []
    for w in (0.0, 1.0, 3.0):
        cond = torch.zeros(300, dtype=torch.long)
        xs, st = sample_minority(GMM, clf, cond, torch.Generator().manual_seed(8), w=w, steps=40, shape=SHAPE)
        s = minority_scores((xs + 1) / 2, GMM, torch.Generator().manual_seed(9), clip=False)
        fracs.append((assign_levels(s, q) == 3).double().mean().item())
        assert st["classifier_forwards"] == (0 if w == 0 else 40)
    # 300 samples: binomial std <= 0.03; the unguided 40-step chain gives ~0.1
    assert fracs[1] > fracs[0] + 0.2 and fracs[2] > fracs[1] + 0.1


# --------------------------------------------------------------------------------------
# End to end on digits: pixel_generator (ddpm_unet) -> minority_classifier -> sample.py
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minority_runs(tmp_path_factory):
    """A tiny DDPM and its level classifier, trained through train.py's tasks (shared)."""
    from vargen.train.tasks import run

    from .conftest import task_config

    root = tmp_path_factory.mktemp("minority")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    ddpm = {"name": "ddpm_unet", "block_out_channels": [16, 32], "norm_groups": 8}
    run(
        task_config("pixel_generator", root / "ddpm", dict(steps=150, batch_size=32, lr=3e-3), model=ddpm),
        log=print,
    )
    clf = {"name": "noisy_classifier", "width": 32, "time_dim": 32}
    cfg = task_config(
        "minority_classifier",
        root / "mino",
        dict(steps=300, batch_size=64, lr=3e-3),
        denoiser_ckpt=str(root / "ddpm"),
        num_levels=5,
        n_iter=2,
        model=clf,
    )
    run(cfg, log=print)
    torch.set_num_threads(before)
    return root


def test_classifier_task_records_grid_thresholds_and_denoiser_hash(minority_runs):
    import json

    from vargen.checkpoint import CheckpointError, file_sha256, load_component
    from vargen.train.minority_task import load_denoiser_for

    clf, cfg = load_component(str(minority_runs / "mino"))
    den, _ = load_component(str(minority_runs / "ddpm"))
    ev = json.loads((minority_runs / "mino" / "eval.json").read_text())
    assert torch.equal(clf.abar, den.abar) and cfg.denoiser_sha256 == file_sha256(
        str(minority_runs / "ddpm" / "model.safetensors")
    )
    assert torch.allclose(clf.thresholds, torch.tensor(ev["thresholds"], dtype=torch.float64))
    assert bool((clf.thresholds.diff() > 0).all()) and ev["score_step"] == 605
    assert 0.0 <= ev["heldout_acc"] <= 1.0 and ev["chance_acc"] == 0.2
    cfg.denoiser_sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="changed since the classifier was trained"):
        load_denoiser_for(cfg)


def test_sample_py_minority_guidance_raises_the_mean_minority_score(minority_runs, one_thread, capsys):
    """Guided (w=5, rarest level) vs unguided samples of the same seed: the mean minority score
    under the same denoiser rises by many standard errors. Both runs draw the same x_T and step
    noises (the classifier draws nothing) and are scored with the same noise, so the per-sample
    differences are paired (seen: 87.7 -> 98.0, paired SE 1.5)."""
    import numpy as np

    import sample as sample_cli
    from vargen.checkpoint import load_component

    den, _ = load_component(str(minority_runs / "ddpm"))
    scores = {}
    for w in (0.0, 5.0):
        out = minority_runs / f"samples_w{w}"
        args = [
            "--ckpt",
            str(minority_runs / "ddpm"),
            "sampler.name=minority",
            f"sampler.w={w}",
            "sampler.steps=10",
        ]
        args += [f"sampler.classifier_ckpt={minority_runs / 'mino'}", "num_samples=100", "batch_size=100"]
        assert sample_cli.main([*args, f"out={out}", "progress=false"]) == 0
        images = torch.from_numpy(np.load(out / "samples.npz")["images"]).permute(0, 3, 1, 2).float() / 255
        scores[w] = minority_scores(images, den, torch.Generator().manual_seed(0))  # (100,)
        metrics = (out / "metrics.json").read_text()
        assert '"stats.classifier_forwards": ' + ("0" if w == 0 else "10") in metrics
    diff = scores[5.0] - scores[0.0]  # (100,) paired
    assert diff.mean() > 4 * diff.std() / 10
    bad = [
        "--ckpt",
        str(minority_runs / "ddpm"),
        "sampler.name=minority",
        f"sampler.classifier_ckpt={minority_runs / 'ddpm'}",
    ]
    assert sample_cli.main([*bad, "num_samples=2", f"out={minority_runs / 'bad'}"]) == 1
    assert "not a minority_classifier" in capsys.readouterr().err


def test_classifier_task_fails_before_work_on_bad_distance_or_missing_denoiser(tmp_path):
    from vargen.checkpoint import CheckpointError
    from vargen.train.tasks import run

    from .conftest import task_config

    base = dict(denoiser_ckpt=str(tmp_path / "nothing"), model={"name": "noisy_classifier"})
    with pytest.raises(ValueError, match="'distance'"):
        run(task_config("minority_classifier", tmp_path / "a", {}, distance="lpips", **base))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        run(task_config("minority_classifier", tmp_path / "b", {}, **base))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_w0_equals_the_ddim_sampler_with_cfg_draw_for_draw(minority_runs):
    """At w = 0 the minority sampler is the ``ddim`` sampler (same grid, eta, CFG, noise draws)."""
    from vargen.checkpoint import load_component
    from vargen.sampling.decoders.diffusion import sample_ddim

    den, _ = load_component(str(minority_runs / "ddpm"))
    clf, _ = load_component(str(minority_runs / "mino"))
    cond = torch.arange(8) % 10
    kw = dict(steps=8, eta=1.0, cfg_scale=2.0)
    x, st = sample_minority(den, clf, cond, torch.Generator().manual_seed(3), w=0.0, **kw)
    ref, st_ref = sample_ddim(den, cond, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(x, ref)
    assert st["target_forwards"] == st_ref["target_forwards"] == 8 and st["net_evals"] == st_ref["net_evals"]
    g, _ = sample_minority(den, clf, cond, torch.Generator().manual_seed(3), w=2.0, **kw)
    assert not torch.allclose(g, ref)
