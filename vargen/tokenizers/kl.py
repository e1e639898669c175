"""Continuous KL autoencoder: image -> (B, N, D) Gaussian latent tokens -> image.

The tokenizer of continuous-token generators (xAR, MAR heads, TokenBridge's post-hoc
quantization). Same conv encoder/decoder as the VQ tokenizer (``vq._encoder`` /
``vq._decoder``); the encoder outputs a mean and a log-variance per latent element
(latent diffusion's ``DiagonalGaussianDistribution``, log-variance clamped to [-30, 20]).
Training decodes a reparameterised sample ``mu + sigma * eps`` (global RNG, so a run is
reproducible from its seed); ``encode`` returns the mean, so tokens are deterministic.

Loss = 4 * recon_mse (MSE in [-1, 1] pixel space) + kl_weight * KL, the KL averaged per
latent element so ``kl_weight`` does not depend on the latent size.

Token normalisation. Generators want tokens of roughly unit scale per channel (MAR and
LDM multiply by one global scale factor measured on data; TokenBridge's Gaussian-quantile
bins assume N(0, 1) per channel). The tokenizer keeps running per-channel mean and std of
``mu`` over training batches (BatchNorm-style buffers, momentum ``stats_momentum``, no
gradient), and ``encode`` returns ``(mu - mean) / std``; ``decode`` inverts it. The
buffers are part of the checkpoint, so a resumed run continues them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

from vargen.registry import TOKENIZERS
from vargen.tokenizers.vat import GaussianConvAutoencoder, gaussian_kl, gaussian_sample
from vargen.tokenizers.vq import VQConfig, _check, _decoder, _encoder


@dataclass
class KLConfig:
    name: str = "kl"
    channels: int = 0  # image channels; 0 = filled in from the dataset by the training task
    resolution: int = 0  # image side in pixels; 0 = filled in from the dataset
    hidden: list[int] = field(default_factory=lambda: [32, 64])  # widths, one stage per entry
    downsample: int = 4  # stride of the latent grid, a power of 2
    res_blocks: int = 1  # residual blocks per stage (>= 1)
    code_dim: int = 8  # D: channels of a latent token
    kl_weight: float = 1e-4  # lambda_KL on the per-element KL
    stats_momentum: float = 0.01  # running per-channel mean/std of mu (0 = frozen at 0 / 1)


class KLTokenizer(GaussianConvAutoencoder):
    """Images (B, C, H, W) in [0, 1] <-> continuous tokens (B, N, D), N = h * w raster order."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        shared = VQConfig.__dataclass_fields__.keys() & KLConfig.__dataclass_fields__.keys() - {"name"}
        _check(VQConfig(**{k: getattr(cfg, k) for k in shared}))  # same messages as "vq"
        if cfg.kl_weight < 0:
            raise ValueError(f"tokenizer.kl_weight must be >= 0, got {cfg.kl_weight}")
        if not 0 <= cfg.stats_momentum <= 1:
            raise ValueError(f"tokenizer.stats_momentum must be in [0, 1], got {cfg.stats_momentum}")
        self.cfg = cfg
        n_down = int(math.log2(cfg.downsample))
        hidden = list(cfg.hidden)
        self.encoder = _encoder(cfg.channels, hidden, n_down, cfg.res_blocks, 2 * cfg.code_dim)
        self.decoder = _decoder(cfg.channels, hidden, n_down, cfg.res_blocks, cfg.code_dim)
        self.side = cfg.resolution // cfg.downsample
        self.register_buffer("latent_mean", torch.zeros(cfg.code_dim))
        self.register_buffer("latent_std", torch.ones(cfg.code_dim))

    @property
    def tokens_spec(self) -> dict:
        return {
            "kind": "continuous",
            "grid": [self.side, self.side],
            "code_dim": self.cfg.code_dim,
            "vocab_size": 0,
            "num_tokens": self.side * self.side,
        }

    def normalize(self, z_BDhw: torch.Tensor) -> torch.Tensor:
        """Unnormalised latent (B, D, h, w) -> tokens (B, N, D) of about unit scale."""
        tokens = rearrange(z_BDhw, "b d h w -> b (h w) d")
        return (tokens - self.latent_mean) / self.latent_std

    def denormalize(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> unnormalised latent (B, D, h, w)."""
        z = tokens_BND * self.latent_std + self.latent_mean
        return rearrange(z, "b (h w) d -> b d h w", h=self.side, w=self.side)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> normalised tokens (B, N, D) from the posterior mean."""
        return self.normalize(self.posterior(images)[0])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, N, D) -> images (B, C, H, W) clamped to [0, 1]."""
        return self.decode_latent(self.denormalize(tokens)).clamp(0, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Same as :meth:`loss`, so that ``DistributedDataParallel(tokenizer)(images)`` trains it."""
        return self.loss(images, labels)

    @torch.no_grad()
    def _update_stats(self, mu: torch.Tensor) -> None:
        m = self.cfg.stats_momentum
        if m == 0:
            return
        flat = mu.detach().float().transpose(0, 1).flatten(1)  # (D, B*h*w)
        self.latent_mean.lerp_(flat.mean(1), m)
        self.latent_std.lerp_(flat.std(1).clamp_min(1e-4), m)

    def loss(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Training objective on images (B, C, H, W) in [0, 1]; labels are ignored."""
        mu, logvar = self.posterior(images)  # (B, D, h, w) x 2
        if self.training:
            self._update_stats(mu)
        z = gaussian_sample(mu, logvar, self.training)
        recon_mse = F.mse_loss(self.decode_latent(z).float(), images)
        kl = gaussian_kl(mu.float(), logvar.float())
        return {
            "loss": 4 * recon_mse + self.cfg.kl_weight * kl,
            "recon_mse": recon_mse.detach(),
            "kl": kl.detach(),
        }


@TOKENIZERS.register("kl", KLConfig)
def build_kl(cfg) -> KLTokenizer:
    """Build from a (validated) ``tokenizer`` config section; missing fields take defaults."""
    fields = {k: cfg[k] for k in KLConfig.__dataclass_fields__ if k in cfg}
    if "hidden" in fields:
        fields["hidden"] = [int(v) for v in fields["hidden"]]
    return KLTokenizer(KLConfig(**fields))
