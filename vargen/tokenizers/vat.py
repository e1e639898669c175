"""Variational tokenizer (VAT, arXiv:2412.02202) transferred to 2-D images.

VAT's authors published no code (sparse-mvs-2/VAT holds a README and figures only), so this
keeps the paper's Gaussian mapping on a conv latent and quantizes it with VAR's
multi-scale quantizer (arXiv:2404.02905, :mod:`vargen.tokenizers.msrq`):

1. conv encoder (``vq._encoder``) -> mean and log-variance heads (B, D, h, w), one conv
   with 2D output channels split in two;
2. Gaussian mapping: in training (``loss`` in train mode) ``z = mu + sigma * eps`` with
   ``eps`` from the global RNG (``torch.randn_like``, so a run is reproducible from the
   global seed), otherwise ``z = mu``; ``encode`` always uses ``mu``, so tokens are
   deterministic; KL(N(mu, sigma^2) || N(0, I)) keeps ``z`` near the unit Gaussian the
   shared codebook is initialised from;
3. multi-scale residual quantization of ``z`` (scales s_1 < ... < s_K = h, one shared
   codebook, phi, area-down, bicubic-up, straight-through, commitment loss);
4. conv decoder (``vq._decoder``) from ``f_hat``.

Loss = MSE in [-1, 1] pixel space (4x ``recon_mse``) + the quantizer's loss + kl_weight *
KL. The KL is reported per latent element (mean over B, D, h, w), so ``kl_weight`` does
not depend on the latent size. The paper's perceptual and GAN terms are left out: they
need pretrained nets and matter at 256px, not for 16-32px test sets. The log-variance is
clamped to [-30, 20] as in latent diffusion's ``DiagonalGaussianDistribution``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vargen.data.base import check_images
from vargen.registry import TOKENIZERS
from vargen.tokenizers.msrq import MultiScaleResidualQuantizer
from vargen.tokenizers.vq import VQConfig, _check, _decoder, _encoder


@dataclass
class VATConfig:
    name: str = "vat"
    channels: int = 0  # image channels; 0 = filled in from the dataset by the training task
    resolution: int = 0  # image side in pixels; 0 = filled in from the dataset
    hidden: list[int] = field(default_factory=lambda: [32, 64])  # widths, one stage per entry
    downsample: int = 4  # stride of the latent grid, a power of 2
    res_blocks: int = 1  # residual blocks per stage (>= 1)
    code_dim: int = 16  # D: width of the Gaussian latent and of the codes
    scales: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # sides, last = resolution / downsample
    codebook_size: int = 256  # V: one codebook shared by every scale
    codebook_std: float = 1.0  # codes start as N(0, std^2) draws
    zero_code: bool = False  # pin code 0 to the zero vector
    kl_weight: float = 1e-4  # lambda_KL (1e-6 .. 1e-4, to tune)
    beta: float = 0.25  # commitment weight
    phi_ratio: float = 0.5  # phi(h) = (1 - r) h + r conv(h); 0 = identity
    phi_share: int = 4  # number of shared phi convs; 0 = one per scale
    up_mode: str = "bicubic"  # "bicubic" (VAR) or "nearest"
    ema_decay: float = 0.99  # EMA codebook; 0 = learn it by the codebook loss
    dead_code_threshold: float = 1.0  # restart codes whose EMA usage falls below; 0 = never


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element, averaged: >= 0, exactly 0 at (0, 0)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()


def gaussian_sample(mu: torch.Tensor, logvar: torch.Tensor, sample: bool) -> torch.Tensor:
    """Reparameterised draw ``mu + exp(logvar / 2) * eps`` (global RNG) or ``mu`` itself."""
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu) if sample else mu


class GaussianConvAutoencoder(nn.Module):
    """Conv encoder to a diagonal Gaussian posterior and conv decoder, images in [0, 1].

    Shared by the VAT and KL tokenizers; subclasses build ``encoder`` (2D output channels:
    mean and log-variance) and ``decoder`` and set ``cfg`` (channels, resolution).
    """

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [0, 1] -> (mu, logvar), each (B, D, h, w)."""
        check_images(images, self.cfg.resolution, self.cfg.channels, type(self).__name__)
        mu, logvar = self.encoder(images * 2 - 1).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, D, h, w) -> images (B, C, H, W), [0, 1] scale but not clamped."""
        return (self.decoder(z) + 1) / 2


class VATokenizer(GaussianConvAutoencoder):
    """Images (B, C, H, W) in [0, 1] <-> multi-scale ids: a list of (B, s_k^2) per scale."""

    def __init__(self, cfg: VATConfig):
        super().__init__()
        shared = VQConfig.__dataclass_fields__.keys() & VATConfig.__dataclass_fields__.keys() - {"name"}
        vq_fields = {k: getattr(cfg, k) for k in shared}
        _check(VQConfig(**vq_fields))  # the shared conv-net fields, same messages as "vq"
        side = cfg.resolution // cfg.downsample
        if not cfg.scales or cfg.scales[-1] != side:
            raise ValueError(
                f"tokenizer.scales={list(cfg.scales)} must end at the latent side "
                f"resolution / downsample = {side}"
            )
        if cfg.kl_weight < 0:
            raise ValueError(f"tokenizer.kl_weight must be >= 0, got {cfg.kl_weight}")
        self.cfg = cfg
        n_down = int(math.log2(cfg.downsample))
        hidden = list(cfg.hidden)
        self.encoder = _encoder(cfg.channels, hidden, n_down, cfg.res_blocks, 2 * cfg.code_dim)
        self.decoder = _decoder(cfg.channels, hidden, n_down, cfg.res_blocks, cfg.code_dim)
        self.quantizer = MultiScaleResidualQuantizer.from_config(cfg, ndim=2)
        self.vocab_size = cfg.codebook_size

    @property
    def tokens_spec(self) -> dict:
        scales = list(self.quantizer.scales)
        return {
            "kind": "multiscale_ids",
            "scales": scales,
            "vocab_size": self.vocab_size,
            "code_dim": self.cfg.code_dim,
            "num_tokens": self.quantizer.num_tokens,
        }

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images -> ids per scale, (B, s_k^2) int64 each, from the posterior mean."""
        return self.quantizer.quantize(self.posterior(images)[0])[1]

    @torch.no_grad()
    def decode(self, ids_list: list[torch.Tensor]) -> torch.Tensor:
        """Ids per scale -> images (B, C, H, W) clamped to [0, 1]."""
        return self.decode_latent(self.quantizer.ids_to_fhat(ids_list)).clamp(0, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Same as :meth:`loss`, so that ``DistributedDataParallel(tokenizer)(images)`` trains it."""
        return self.loss(images, labels)

    def loss(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Training objective on images (B, C, H, W) in [0, 1]; labels are ignored.

        In training mode ``z`` is a reparameterised sample and the codebook takes its EMA
        step; in eval mode ``z = mu`` and nothing changes.
        """
        mu, logvar = self.posterior(images)  # (B, D, h, w) x 2
        z = gaussian_sample(mu, logvar, self.training)
        f_hat, _, q = self.quantizer.quantize(z, update_codebook=self.training)
        recon_mse = F.mse_loss(self.decode_latent(f_hat).float(), images)
        kl = gaussian_kl(mu.float(), logvar.float())
        total = 4 * recon_mse + q["loss"] + self.cfg.kl_weight * kl
        return {
            "loss": total,
            "recon_mse": recon_mse.detach(),
            "kl": kl.detach(),
            "commit": q["commit"],
            "codebook_usage": q["codebook_usage"],
        }


@TOKENIZERS.register("vat", VATConfig)
def build_vat(cfg) -> VATokenizer:
    """Build from a (validated) ``tokenizer`` config section; missing fields take defaults."""
    fields = {k: cfg[k] for k in VATConfig.__dataclass_fields__ if k in cfg}
    for key in ("hidden", "scales"):
        if key in fields:
            fields[key] = [int(v) for v in fields[key]]
    return VATokenizer(VATConfig(**fields))
