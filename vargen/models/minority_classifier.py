"""The noisy minority-level classifier p_psi(c | x_t, t) of minority guidance (Um et al., ICLR'24).

Spec 3a.3: cross-entropy on (q_sample(x0, t), c) with t uniform on the denoiser's grid. The
reference freezes ADM's ImageNet noisy-classifier encoder and trains a small attention-pool head;
at 16x16 a small conv net trained from scratch does the job: conv stages (3x3 conv, time-FiLM,
SiLU, 2x down) to <= 4x4, then linear logits over the L levels from the flattened map. Not a
global pool: on digits the minority score depends on *where* the ink is (a linear model of the
pixels predicts the level well above chance; a translation-invariant pooled net reached chance).
No normalisation: a per-sample GroupNorm would remove the image's mean intensity.

The classifier carries what a sampler needs to check it against a denoiser, as buffers in its
weights file: ``abar`` (T,) float64, the VP grid it was trained on (copied from the denoiser), and
``thresholds`` (L,) float64, the minority-score quantiles q_k that define the levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vargen.heads.diffusion import timestep_embedding
from vargen.registry import MODELS


@dataclass
class NoisyClassifierConfig:
    name: str = "noisy_classifier"
    channels: int = 0  # filled from the dataset
    resolution: int = 0  # filled from the dataset
    num_levels: int = 0  # L, filled by the minority_classifier task
    num_steps: int = 0  # T of the denoiser's grid, filled by the task
    width: int = 32  # channels of every conv stage
    time_dim: int = 64  # timestep embedding width


class _Stage(nn.Module):
    """3x3 conv -> FiLM by the time embedding -> SiLU -> 2x average pool."""

    def __init__(self, c_in: int, width: int, time_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * width)

    def forward(self, x_BCHW: torch.Tensor, temb_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(temb_BD)[:, :, None, None].chunk(2, dim=1)  # (B, W, 1, 1) each
        h = self.conv(x_BCHW) * (1 + scale) + shift  # (B, W, H, W)
        return F.avg_pool2d(F.silu(h), 2)  # (B, W, H/2, W/2)


class NoisyLevelClassifier(nn.Module):
    """Logits (B, L) of the minority level of x_t (B, C, H, W) in model space at steps t_B (B,)."""

    def __init__(self, cfg: NoisyClassifierConfig):
        super().__init__()
        for key in ("channels", "resolution", "num_levels", "num_steps"):
            if getattr(cfg, key) <= 0:
                raise ValueError(
                    f"noisy_classifier: model.{key} is {getattr(cfg, key)}; it is filled in by the "
                    "minority_classifier task (train it with train.py task=minority_classifier)"
                )
        self.cfg = cfg
        self.num_levels, self.num_steps = cfg.num_levels, cfg.num_steps
        self.register_buffer("abar", torch.ones(cfg.num_steps, dtype=torch.float64))  # (T,) set by the task
        self.register_buffer("thresholds", torch.zeros(cfg.num_levels, dtype=torch.float64))  # (L,)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )
        stages, c, side = [], cfg.channels, cfg.resolution
        while side > 4:
            stages.append(_Stage(c, cfg.width, cfg.time_dim))
            c, side = cfg.width, side // 2
        self.stages = nn.ModuleList(stages)
        self.out = nn.Linear(c * side * side, cfg.num_levels)

    def forward(self, x_t: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t_B, self.cfg.time_dim))  # (B, D)
        h = x_t
        for stage in self.stages:
            h = stage(h, temb)
        return self.out(h.flatten(1))  # (B, L)

    def q_sample(self, x0: torch.Tensor, t_B: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.abar[t_B].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, x0: torch.Tensor, level_B: torch.Tensor) -> dict:
        """Cross-entropy and accuracy on (q_sample(x0, t), level), t ~ U{0..T-1} (spec 3a.3)."""
        t_B = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        logits = self(self.q_sample(x0, t_B, torch.randn_like(x0)), t_B)  # (B, L)
        return {
            "loss": F.cross_entropy(logits, level_B),
            "acc": (logits.argmax(-1) == level_B).float().mean().detach(),
        }

    def grad_log_prob(self, x_t: torch.Tensor, t_B: torch.Tensor, level: int) -> torch.Tensor:
        """grad_x log p_psi(level | x_t, t), shaped like x_t, by autograd (works under no_grad)."""
        with torch.enable_grad():
            x = x_t.detach().to(self.out.weight.dtype).requires_grad_(True)
            logp = self(x, t_B).log_softmax(-1)[:, level].sum()
            (grad,) = torch.autograd.grad(logp, x)
        return grad.to(x_t.dtype)


@MODELS.register("noisy_classifier", NoisyClassifierConfig)
def build_noisy_classifier(cfg) -> NoisyLevelClassifier:
    return NoisyLevelClassifier(NoisyClassifierConfig(**dict(cfg)))
