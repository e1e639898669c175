"""Task ``minority_classifier``: the noisy level classifier of minority guidance (Um et al., ICLR'24).

Given a trained image denoiser (``denoiser_ckpt``, checked by sha256 like a generator's tokenizer):

1. the minority score of every training and held-out image (spec 3a.1): mean over ``n_iter``
   noisings at ``score_step`` of d(x0, clipped Tweedie x0_hat), d = squared L2 in model space or
   ``perceptual`` (squared L2 between the dataset feature net's penultimate features);
2. ``num_levels`` quantile thresholds of the training scores and the level labels (spec 3a.2;
   held-out images are labelled with the training thresholds);
3. the classifier p_psi(c | x_t, t) (``model``, default ``noisy_classifier``) trained by the shared
   fit loop on (model-space images, levels); its weights carry the denoiser's ``abar`` and the
   thresholds as buffers, so the ``minority`` sampler can check it against the model it guides.

eval.json: held-out loss / accuracy at uniform t, accuracy at t = 0, the score step and thresholds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from vargen import distributed as D
from vargen.checkpoint import file_sha256, load_checked, model_registry, resolve_weights_path
from vargen.config import RunConfig, component
from vargen.data import build_dataset
from vargen.diffusion.minority import assign_levels, minority_scores, quantile_levels
from vargen.eval.feature_net import get_feature_net
from vargen.registry import TASKS
from vargen.train.loop import fit, heldout_metrics
from vargen.train.tasks import _device

DISTANCES = ("l2", "perceptual")


@dataclass
class MinorityClassifierRun(RunConfig):
    task: str = "minority_classifier"
    model: dict = component("MODELS", {"name": "noisy_classifier"})
    denoiser_ckpt: str = "???"  # weights file or run directory of a trained image denoiser (ddpm_unet)
    denoiser_sha256: str = ""  # filled in at training time
    num_levels: int = 10  # L quantile levels (spec: 100 for LSUN; 10 for ~1500 digits)
    score_step: int = 605  # spec 3a: index 60 of a 100-step respacing of 1000; clamped to the grid
    n_iter: int = 5  # noisings averaged per score
    distance: str = "l2"  # l2 | perceptual
    score_batch: int = 256


def load_denoiser_for(cls_cfg, device="cpu"):
    """The denoiser a classifier was trained with, verified against the recorded hash."""
    path = cls_cfg.denoiser_ckpt
    den, den_cfg = load_checked(path, cls_cfg.denoiser_sha256, "denoiser", "classifier", device)
    if not hasattr(den, "abar") or not hasattr(den, "prediction"):
        raise ValueError(f"denoiser_ckpt {path} holds a '{den_cfg.model.name}', not a diffusion denoiser")
    return den, den_cfg


@torch.no_grad()
def _accuracy_at(model, x, y, t: int, device, batch: int = 512) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].to(device)
        t_B = torch.full((xb.shape[0],), t, dtype=torch.long, device=device)
        correct += (model(xb, t_B).argmax(-1).cpu() == y[i : i + batch]).sum().item()
    return correct / max(1, x.shape[0])


@TASKS.register("minority_classifier", MinorityClassifierRun)
def run_minority_classifier(cfg, log=print):
    if cfg.distance not in DISTANCES:
        raise ValueError(f"config key 'distance' must be one of {DISTANCES}, got {cfg.distance!r}")
    if cfg.num_levels < 2 or cfg.n_iter < 1:
        raise ValueError(
            f"config keys 'num_levels' (>= 2) and 'n_iter' (>= 1): got {cfg.num_levels}, {cfg.n_iter}"
        )
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    cfg.denoiser_sha256 = file_sha256(resolve_weights_path(cfg.denoiser_ckpt))
    den, den_cfg = load_denoiser_for(cfg, device)
    data = build_dataset(cfg.data)
    shape = (den_cfg.model.get("channels"), den_cfg.model.get("resolution"))
    if shape != (data.channels, data.resolution):
        raise ValueError(
            f"denoiser_ckpt models (channels, resolution) = {shape}; the dataset has "
            f"{(data.channels, data.resolution)}: use the data config the denoiser was trained on"
        )
    T = den.abar.shape[0]
    step = min(max(cfg.score_step, 0), T - 1)
    feats = None
    if cfg.distance == "perceptual":
        feats = get_feature_net(cfg.data, device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    kw = dict(t=step, n_iter=cfg.n_iter, distance=cfg.distance, feature_net=feats, batch_size=cfg.score_batch)
    scores = minority_scores(data.train_images, den, g, **kw)  # (N,)
    held_scores = minority_scores(data.heldout_images, den, g, **kw)  # (M,)
    levels, q = quantile_levels(scores, cfg.num_levels)  # (N,), (L,)
    held_levels = assign_levels(held_scores, q)  # (M,)
    log(f"[{cfg.task}] minority scores at step {step}/{T}: mean {scores.mean():.4g}, thresholds {q.tolist()}")

    cfg.model.channels, cfg.model.resolution = data.channels, data.resolution
    cfg.model.num_levels, cfg.model.num_steps = cfg.num_levels, T
    model = model_registry(MinorityClassifierRun).build(cfg.model)
    model.abar.copy_(den.abar.cpu())
    model.thresholds.copy_(q)
    x_train, x_held = den.data_to_x(data.train_images), den.data_to_x(data.heldout_images)
    del den
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{cfg.task}] {n_params / 1e6:.2f}M parameters, {cfg.num_levels} levels")
    fit(model, x_train, levels, cfg, device, cfg.task, log, (x_held, held_levels))

    metrics = heldout_metrics(model, x_held, held_levels, device)
    metrics["heldout_acc_t0"] = _accuracy_at(model, x_held, held_levels, 0, device)
    metrics["chance_acc"] = 1.0 / cfg.num_levels
    log(f"[{cfg.task}] eval: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    metrics.update(
        score_step=step,
        distance=cfg.distance,
        train_score_mean=float(scores.mean()),
        heldout_score_mean=float(held_scores.mean()),
        thresholds=q.tolist(),
    )
    if D.world()[0] == 0:
        with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return model
