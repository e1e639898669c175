"""Sampler ``minority``: minority guidance (Um et al., ICLR'24) on a trained image denoiser.

Ancestral DDPM (``eta=1``) or DDIM (``eta=0``) on ``steps`` evenly respaced steps of the
denoiser's grid (:func:`vargen.diffusion.loops.ddim_sample`), with the score-form guidance of
arXiv:2301.12334 toward the minority level c* (``level``; -1 = L-1, the rarest):

    eps_tilde = eps_theta(x_t, t) - sqrt(1 - abar_t) w grad_x log p_psi(c* | x_t, t),

the gradient taken by autograd through the noisy level classifier (``classifier_ckpt``, trained by
the ``minority_classifier`` task). v- and x0-models are converted to eps first (denoiser.py). The
reference repo shifts the ancestral mean by Sigma_t w grad instead (ADM's form); the score form is
the one that also holds for DDIM. ``cfg_scale`` != 1 adds classifier-free guidance on the class
labels (one batched forward of both branches per step); the minority gradient is added on top.
The classifier's ``abar`` must equal the denoiser's (same grid), else the sampler stops.

Stats, as the ``ddim`` sampler counts them (decoders/diffusion.py): ``target_forwards`` (denoiser
calls; a guided step's two branches are one batched call), ``net_evals`` (rows through the
network), ``classifier_forwards`` (classifier forward + backward passes, one per step when
w != 0), ``seconds``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vargen.diffusion.loops import ddim_sample
from vargen.diffusion.minority import guided_eps_fn as minority_eps_fn
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.decoders.diffusion import guided_eps_fn as cfg_eps_fn


@dataclass
class MinorityConfig:
    name: str = "minority"
    classifier_ckpt: str = ""  # a minority_classifier run trained for this denoiser's grid
    level: int = -1  # target level c*; negative counts from the top (-1 = L-1, the rarest)
    w: float = 1.0  # guidance scale; 0 = plain sampling
    steps: int = 250  # respaced steps (the paper: 250 ancestral steps on LSUN)
    eta: float = 1.0  # 1 = ancestral DDPM, 0 = DDIM
    cfg_scale: float = 1.0  # classifier-free guidance on the class labels; 1 = conditional only


def check_classifier(classifier, denoiser, level: int) -> int:
    """The target level in [0, L-1]; raises if the classifier was trained on another grid."""
    T_c, T_d = classifier.abar.shape[0], denoiser.abar.shape[0]
    if T_c != T_d or not torch.allclose(classifier.abar.cpu().double(), denoiser.abar.cpu().double()):
        raise ValueError(
            f"sampler.classifier_ckpt: the classifier was trained on a {T_c}-step noise grid that differs "
            f"from the denoiser's {T_d}-step grid; train it for this denoiser (task minority_classifier)"
        )
    L = classifier.num_levels
    if not -L <= level < L:
        raise ValueError(f"sampler.level={level} is outside [-{L}, {L - 1}] for a {L}-level classifier")
    return level % L


@torch.no_grad()
def sample_minority(
    denoiser,
    classifier,
    cond_B,
    generator,
    *,
    level=-1,
    w=1.0,
    steps=250,
    eta=1.0,
    cfg_scale=1.0,
    shape=None,
):
    """Images (B, C, H, W) in [0, 1] drawn with minority guidance, and stats.

    ``shape`` (C, H, W) defaults to the denoiser's config; a denoiser without ``x_to_data`` (the
    analytic ones, whose state is float64) returns model-space samples. ``cond_B`` (B,) labels.
    """
    t0 = time.perf_counter()
    if classifier is None and w != 0:
        raise ValueError("sample_minority: w != 0 needs a classifier")
    if classifier is not None:
        level = check_classifier(classifier, denoiser, level)
    is_net = isinstance(denoiser, torch.nn.Module)
    dtype = next(denoiser.parameters()).dtype if is_net else torch.float64
    if shape is None:
        shape = (denoiser.cfg.channels, denoiser.cfg.resolution, denoiser.cfg.resolution)
    stats = {"net_evals": 0, "classifier_forwards": 0}
    model_eps = cfg_eps_fn(denoiser, cond_B, cfg_scale, stats)  # (x, t_B) -> eps, CFG in eps space

    def grad_fn(x, t: int, c: int):
        stats["classifier_forwards"] += 1
        t_B = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return classifier.grad_log_prob(x, t_B, c)  # (B, C, H, W)

    eps_fn = minority_eps_fn(model_eps, "eps", grad_fn, level, w, denoiser.abar)
    x0, st = ddim_sample(eps_fn, (cond_B.shape[0], *shape), steps, generator, denoiser.abar, eta, dtype=dtype)
    stats.update(target_forwards=st["target_forwards"], seconds=time.perf_counter() - t0)
    return (denoiser.x_to_data(x0) if hasattr(denoiser, "x_to_data") else x0), stats


@SAMPLERS.register("minority", MinorityConfig)
class MinoritySampler(Sampler):
    """Minority guidance (:func:`sample_minority`); :meth:`setup` loads ``classifier_ckpt``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.w != 0 and not cfg.classifier_ckpt:
            raise ValueError(
                "sampler.classifier_ckpt must name a trained minority_classifier run (or set sampler.w=0)"
            )
        if cfg.steps < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {cfg.steps}")
        if not 0.0 <= cfg.eta <= 1.0:
            raise ValueError(f"sampler.eta must be in [0, 1], got {cfg.eta}")
        self.classifier = None

    def setup(self, ctx):
        if not self.cfg.classifier_ckpt:
            return
        clf, clf_cfg = ctx.load(self.cfg.classifier_ckpt)
        if clf_cfg.task != "minority_classifier":
            raise ValueError(
                f"sampler.classifier_ckpt {self.cfg.classifier_ckpt} holds a '{clf_cfg.task}' checkpoint, "
                "not a minority_classifier"
            )
        self.classifier = clf.eval().requires_grad_(False)

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        if self.cfg.classifier_ckpt and self.classifier is None:
            raise RuntimeError("the minority sampler loads its classifier in setup(ctx): call it first")
        keys = ("level", "w", "steps", "eta", "cfg_scale")
        return sample_minority(model, self.classifier, cond_B, generator, **{k: self.cfg[k] for k in keys})
