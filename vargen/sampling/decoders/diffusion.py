"""Sampling a diffusion denoiser (:mod:`vargen.models.diffusion_unet`): DDIM / DDPM and FKC-CFG.

- ``ddim``: DDIM (eta = 0, Song et al. 2021 eq. 12) to DDPM ancestral (eta = 1) on the evenly
  respaced grid linspace(T-1, 0, steps), with classifier-free guidance in eps space,
  eps_u + cfg_scale (eps_c - eps_u) (Ho & Salimans 2022; 1 = off), and the TS-DPM
  exposure-bias time shift (``time_shift.window`` > 0; see :mod:`vargen.diffusion.time_shift`).
- ``fkc_cfg``: Feynman-Kac corrected CFG (Skreta et al. 2025) on DDPM ancestral steps: K
  particles per label share the label, carry log-weights and are resampled within their
  group; one particle per label is returned (:func:`vargen.diffusion.fkc.fkc_cfg_ddpm`).

Counting (stats): the conditional and null-class rows of a guided step run as ONE batched
call, which counts as one ``target_forwards`` (the project's convention); ``net_evals`` counts
the rows pushed through the network (2 per sample per guided step, K particles each), so
``net_evals / images`` is the per-image network-evaluation count (NFE) that budgets compare.
``fkc_cfg`` adds ``particles`` (particles simulated, K per label), ``resamples`` (group
resampling events) and ``min_ess`` (a list, the smallest group ESS of each batch). All counts
add up over the batches of :func:`vargen.sampling.generate.generate`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from vargen.diffusion.denoiser import predict_eps
from vargen.diffusion.fkc import RESAMPLERS, fkc_cfg_ddpm
from vargen.diffusion.loops import ddim_sample
from vargen.diffusion.time_shift import ExposureBiasTimeShift, calibrate_window
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler


@dataclass
class TimeShiftConfig:
    window: int = 0  # TS-DPM window on the full training grid; 0 = off (the base sampler, bit for bit);
    # -1 = chosen for the model's schedule, image size and step count by calibrate_window
    cutoff: int = 300  # shift only at steps t > cutoff
    variance: str = "paper"  # paper (1 - abar) | corrected (abar data_var + 1 - abar)
    data_var: float = 1.0  # per-entry Var(x0) in model space, for variance=corrected
    mode: str = "canonical"  # canonical | pndm_target | adm_target


@dataclass
class DDIMSamplerConfig:
    name: str = "ddim"
    steps: int = 50
    eta: float = 0.0  # 0 = DDIM, 1 = DDPM ancestral
    cfg_scale: float = 1.0  # eps-space guidance with the null class; 1 = off
    time_shift: TimeShiftConfig = field(default_factory=TimeShiftConfig)


@dataclass
class FKCCFGSamplerConfig:
    name: str = "fkc_cfg"
    steps: int = 50
    cfg_scale: float = 2.0  # w of the target p(x|c)^w p(x)^(1-w)
    particles: int = 4  # K per label
    resampler: str = "systematic"  # systematic | multinomial
    ess_threshold: float = 1.0  # resample a group when ESS < threshold K; >= 1: every step
    backend: str = "auto"  # weight-update kernel: auto | triton | interpret | torch (vargen_kernels.dispatch)


def _model_dtype(model):
    return next(model.parameters()).dtype


def guided_eps_fn(model, cond_B: torch.Tensor, cfg_scale: float, stats: dict):
    """(x (B, ...), t_B) -> guided eps; both branches in one batched call when guided."""

    def eps(x, t_B):
        if cfg_scale == 1.0:
            stats["net_evals"] += x.shape[0]
            return predict_eps(model, x, t_B, cond_B)
        e_c, e_u = _pair(model, x, t_B, cond_B, stats)
        return e_u + cfg_scale * (e_c - e_u)

    return eps


def _pair(model, x, t_B, cond_B, stats):
    """(eps_c, eps_u) from one call on 2B rows (rows B.. carry the null class)."""
    e = predict_eps(model, torch.cat([x, x]), torch.cat([t_B, t_B]), model.guidance_labels(cond_B))
    stats["net_evals"] += 2 * x.shape[0]
    return e.chunk(2)


_WINDOWS: dict = {}  # calibrated windows, per schedule / image size / steps / shift settings


def resolve_window(ts: ExposureBiasTimeShift, abar, num_entries: int, steps: int, eta: float):
    """``ts`` with window = -1 replaced by :func:`calibrate_window`'s choice (memoised)."""
    a = abar.detach().double().cpu()
    key = (a.numpy().tobytes(), num_entries, steps, eta, ts.cutoff, ts.variance, ts.data_var, ts.mode)
    if key not in _WINDOWS:
        _WINDOWS[key] = calibrate_window(
            a, num_entries, steps, cutoff=ts.cutoff, variance=ts.variance, data_var=ts.data_var,
            mode=ts.mode, eta=eta,
        )[0]  # fmt: skip
    return dataclasses.replace(ts, window=_WINDOWS[key])


@torch.no_grad()
def sample_ddim(
    model, cond_B, *, generator, steps=50, eta=0.0, cfg_scale=1.0, time_shift=None, progress=False
):
    """Images (B, C, H, W) in [0, 1] and stats; ``time_shift`` an ExposureBiasTimeShift or None."""
    t0 = time.perf_counter()
    cfg = model.cfg
    shape = (cond_B.shape[0], cfg.channels, cfg.resolution, cfg.resolution)
    stats = {"net_evals": 0}
    eps = guided_eps_fn(model, cond_B, cfg_scale, stats)
    if time_shift is not None and time_shift.window < 0:
        time_shift = resolve_window(time_shift, model.abar, shape[1] * shape[2] * shape[3], steps, eta)
        stats["time_shift_window"] = time_shift.window
    ts = time_shift if time_shift is not None and time_shift.window > 0 else None
    x, st = ddim_sample(eps, shape, steps, generator, model.abar, eta, ts, dtype=_model_dtype(model))
    stats.update(st, seconds=time.perf_counter() - t0)
    return model.x_to_data(x), stats


@torch.no_grad()
def sample_fkc_cfg(
    model,
    cond_B,
    *,
    generator,
    steps=50,
    cfg_scale=2.0,
    particles=4,
    resampler="systematic",
    ess_threshold=1.0,
    progress=False,
    backend="auto",
):
    """One FKC-CFG image per label (B, C, H, W) in [0, 1] from B groups of ``particles``;
    ``backend``: how the weight update runs (:func:`vargen_kernels.fkc.fkc_update`)."""
    t0 = time.perf_counter()
    cfg = model.cfg
    cond_N = cond_B.repeat_interleave(particles)  # (B K,): group b = rows b K .. b K + K - 1
    stats = {"net_evals": 0}

    def pair(x, t_B):
        if cfg_scale == 1.0:  # w = 1: the weights vanish, no null branch is needed
            stats["net_evals"] += x.shape[0]
            e = predict_eps(model, x, t_B, cond_N)
            return e, e
        return _pair(model, x, t_B, cond_N, stats)

    shape = (cond_N.shape[0], cfg.channels, cfg.resolution, cfg.resolution)
    x, st = fkc_cfg_ddpm(
        pair,
        shape,
        particles,
        model.abar,
        steps,
        cfg_scale,
        generator,
        resampler,
        ess_threshold,
        dtype=_model_dtype(model),
        backend=backend,
    )
    stats.update(st, min_ess=[st["min_ess"]], seconds=time.perf_counter() - t0)  # a list: one per batch
    return model.x_to_data(x), stats


def _check_steps(steps: int):
    if steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {steps}")


@SAMPLERS.register("ddim", DDIMSamplerConfig)
class DDIMSampler(Sampler):
    """DDIM / DDPM with guidance and the optional time shift (:func:`sample_ddim`)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        _check_steps(cfg.steps)
        self.time_shift = ExposureBiasTimeShift(**dict(cfg.time_shift))  # validates variance / mode / window

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        c = self.cfg
        return sample_ddim(
            model, cond_B, generator=generator, steps=c.steps, eta=c.eta, cfg_scale=c.cfg_scale,
            time_shift=self.time_shift,
        )  # fmt: skip


@SAMPLERS.register("fkc_cfg", FKCCFGSamplerConfig)
class FKCCFGSampler(Sampler):
    """Feynman-Kac corrected guidance, one particle group per label (:func:`sample_fkc_cfg`)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        _check_steps(cfg.steps)
        if cfg.resampler not in RESAMPLERS:
            raise ValueError(f"sampler.resampler must be one of {sorted(RESAMPLERS)}, got {cfg.resampler!r}")
        if cfg.particles < 1:
            raise ValueError(f"sampler.particles must be >= 1, got {cfg.particles}")

    def __call__(self, model, cond_B, generator, progress=False, slots=0):
        return sample_fkc_cfg(model, cond_B, generator=generator, **self.options())


__all__ = ["sample_ddim", "sample_fkc_cfg"]
