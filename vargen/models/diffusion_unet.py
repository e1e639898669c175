"""A small class-conditional DDPM on pixels: diffusers' ``UNet2DModel`` behind the Denoiser protocol.

DDPM (Ho et al. 2020): data x0 = 2 image - 1 in [-1, 1], discrete VP grid t in {0..T-1} with
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4). Training draws t uniformly and regresses
the declared target with MSE (eq. 14 for eps; x0; or v = sqrt(abar) eps - sqrt(1 - abar) x0,
Salimans & Ho 2022 eq. 4). Labels drop to the null class (index ``num_classes``, its own
learned embedding) with p = ``class_dropout``, so one network gives both branches of
classifier-free guidance (Ho & Salimans 2022).

The model implements :class:`vargen.diffusion.denoiser.Denoiser` (``prediction``, ``abar``,
``__call__(x_t, t_B, cond_B)``, ``num_classes``, ``null_class``); the samplers live in
:mod:`vargen.sampling.decoders.diffusion`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vargen.diffusion.schedules import cosine_alphas_cumprod, linear_alphas_cumprod
from vargen.models.generator import Generator, drop_labels
from vargen.registry import MODELS

BETA_SCHEDULES = {"linear": linear_alphas_cumprod, "cosine": cosine_alphas_cumprod}
TARGETS = ("eps", "x0", "v")


@dataclass
class DiffusionUNetConfig:
    name: str = "ddpm_unet"
    channels: int = 0  # 0 = taken from the dataset by the training task
    resolution: int = 0  # 0 = taken from the dataset
    num_classes: int = 0  # 0 = taken from the dataset
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # one per resolution level
    layers_per_block: int = 1
    attention: bool = False  # self-attention in the lowest-resolution down/up blocks
    norm_groups: int = 8
    prediction: str = "eps"  # eps | v | x0: what the network regresses
    timesteps: int = 1000  # T of the discrete training grid
    beta_schedule: str = "linear"  # linear (DDPM) | cosine (improved DDPM)
    class_dropout: float = 0.1  # label -> null class in training, for guidance


class DiffusionUNet(Generator):
    def __init__(self, cfg: DiffusionUNetConfig):
        super().__init__()
        if cfg.channels <= 0 or cfg.resolution <= 0 or cfg.num_classes <= 0:
            raise ValueError(
                f"ddpm_unet needs channels, resolution and num_classes > 0 (got {cfg.channels}, "
                f"{cfg.resolution}, {cfg.num_classes}); the training task fills them from the dataset"
            )
        if cfg.prediction not in TARGETS:
            raise ValueError(f"model.prediction must be one of {TARGETS}, got {cfg.prediction!r}")
        if cfg.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"model.beta_schedule must be one of {sorted(BETA_SCHEDULES)}, got {cfg.beta_schedule!r}"
            )
        if any(c % cfg.norm_groups for c in cfg.block_out_channels):
            raise ValueError(
                f"model.block_out_channels {cfg.block_out_channels} must be divisible by norm_groups"
            )
        from diffusers import UNet2DModel

        self.cfg = cfg
        self.prediction = cfg.prediction
        self.num_classes = self.null_class = cfg.num_classes
        levels = len(cfg.block_out_channels)
        down = ["DownBlock2D"] * levels
        if cfg.attention:
            down[-1] = "AttnDownBlock2D"
        self.unet = UNet2DModel(
            sample_size=cfg.resolution,
            in_channels=cfg.channels,
            out_channels=cfg.channels,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
            num_class_embeds=cfg.num_classes + 1,  # + the null class
            norm_num_groups=cfg.norm_groups,
            attention_head_dim=cfg.block_out_channels[-1] // 4,
        )
        abar = BETA_SCHEDULES[cfg.beta_schedule](cfg.timesteps)
        self.register_buffer("abar", abar, persistent=False)  # (T,) float64, rebuilt from the config

    # ------------------------------------------------------------------ data <-> model space
    @staticmethod
    def data_to_x(images01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model space [-1, 1]."""
        return images01 * 2 - 1

    @staticmethod
    def x_to_data(x: torch.Tensor) -> torch.Tensor:
        """Model space -> images clamped to [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ the denoiser
    def forward(
        self, x_t: torch.Tensor, t_B: torch.Tensor, cond_B: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The declared prediction (B, C, H, W) at per-sample steps t_B (B,); cond None = null class."""
        if cond_B is None:
            cond_B = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
        return self.unet(x_t, t_B.to(x_t.device), class_labels=cond_B.to(x_t.device)).sample

    def noise(self, x0: torch.Tensor, t_B: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        a = self.abar[t_B].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def loss(self, images01: torch.Tensor, labels_B: torch.Tensor) -> dict:
        """MSE on the declared target at t ~ U{0..T-1} (global RNG, as the trainer seeds it)."""
        x0 = self.data_to_x(images01)  # (B, C, H, W)
        B = x0.shape[0]
        if self.training:
            labels_B = drop_labels(labels_B, self.null_class, self.cfg.class_dropout)
        t_B = torch.randint(0, self.cfg.timesteps, (B,), device=x0.device)
        eps = torch.randn_like(x0)
        x_t = self.noise(x0, t_B, eps)
        a = self.abar[t_B].to(x0.dtype).view(-1, 1, 1, 1)
        target = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        return {"loss": F.mse_loss(self(x_t, t_B, labels_B), target)}


@MODELS.register("ddpm_unet", DiffusionUNetConfig, samplers=("ddim", "fkc_cfg", "minority"))
def build_diffusion_unet(cfg) -> DiffusionUNet:
    return DiffusionUNet(DiffusionUNetConfig(**dict(cfg)))


__all__ = ["DiffusionUNet", "DiffusionUNetConfig", "build_diffusion_unet"]
