"""Convolutional VQ autoencoder: image -> (h, w) grid of discrete ids -> image.

VQ-VAE (van den Oord et al. 2017, arXiv:1711.00937, eq. 3): each encoder output is replaced by
its nearest code (squared L2; cosine with ``l2_normalized``, ViT-VQGAN arXiv:2110.04627 sec. 3.2),
gradients pass by the straight-through estimator ``zq = z + sg(e - z)``, and a commitment term
``beta * |z - sg(e)|^2`` keeps the encoder near its codes. With ``ema_decay > 0`` the codebook is a
buffer updated by exponential moving averages (arXiv:1711.00937 appendix A.1), else a parameter
learnt by ``|sg(z) - e|^2``. Codes used less than ``dead_code_threshold`` times per batch are
moved onto random encoder outputs (Jukebox, arXiv:2005.00341 sec. 3.1); counts start at 1, so
this also initialises the codebook from data.

Determinism: the buffers change only in :meth:`VQTokenizer.loss` in training mode; restart
candidates come from torch's global CPU generator (drawn every step), and under
``torch.distributed`` counts and sums are all-reduced and candidates broadcast from rank 0, so
every rank keeps bit-identical buffers (every rank must call ``loss`` equally often). Counts use
a one-hot matmul because CUDA ``index_add_`` is not deterministic.

The network is a small hand-written conv net rather than diffusers' Encoder/Decoder, which are
built for 256px latents and whose arguments shift between releases: stage ``i`` runs
``res_blocks`` residual blocks at width ``hidden[i]``, then a stride-2 conv until
``log2(downsample)`` stages have downsampled; the decoder mirrors it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vargen.data.base import check_images
from vargen.registry import TOKENIZERS

_USAGE_DECAY_NO_EMA = 0.99  # decay of the usage counts when the codebook is learnt by loss


@dataclass
class VQConfig:
    name: str = "vq"
    channels: int = 0  # image channels; 0 = filled in from the dataset by the training task
    resolution: int = 0  # image side in pixels; 0 = filled in from the dataset
    hidden: list[int] = field(default_factory=lambda: [32, 64])  # widths, one stage per entry
    downsample: int = 4  # stride of the token grid, a power of 2 (log2 of it stride-2 stages)
    res_blocks: int = 1  # residual blocks per stage (>= 1)
    codebook_size: int = 128  # V: the token vocabulary
    code_dim: int = 16  # D: width of the quantised latent
    beta: float = 0.25  # weight of the commitment loss
    ema_decay: float = 0.99  # EMA codebook updates; 0 = learn the codebook by the codebook loss
    dead_code_threshold: float = 1.0  # restart codes whose EMA usage count falls below; 0 = never
    l2_normalized: bool = False  # match unit-norm latents to unit-norm codes (cosine)


def _check(cfg: VQConfig) -> None:
    """Raise ValueError naming the offending field of a tokenizer config."""
    if cfg.channels <= 0 or cfg.resolution <= 0:
        raise ValueError(
            f"tokenizer channels={cfg.channels}, resolution={cfg.resolution}: both must be set (> 0); "
            "the training task fills them in from the dataset, otherwise set tokenizer.channels "
            "and tokenizer.resolution"
        )
    d = cfg.downsample
    if d < 1 or d & (d - 1):
        raise ValueError(f"tokenizer.downsample must be a power of 2, got {d}")
    if cfg.resolution % d:
        raise ValueError(
            f"tokenizer.resolution={cfg.resolution} is not divisible by tokenizer.downsample={d}"
        )
    n_down = int(math.log2(d))
    if len(cfg.hidden) < max(n_down, 1) or min(cfg.hidden) <= 0:
        raise ValueError(
            f"tokenizer.hidden={list(cfg.hidden)} needs at least log2(downsample)={n_down} positive "
            "widths (one per stride-2 stage) and at least one"
        )
    if cfg.res_blocks < 1 or cfg.codebook_size < 2 or cfg.code_dim < 1:
        raise ValueError("tokenizer.res_blocks >= 1, codebook_size >= 2 and code_dim >= 1 are required")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"tokenizer.ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.beta < 0 or cfg.dead_code_threshold < 0:
        raise ValueError("tokenizer.beta and tokenizer.dead_code_threshold must be >= 0")


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(ch, 8), ch)  # 8 groups (fewer when ch is not a multiple of 8)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv) x 2, 1x1 conv skip if widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)  # (B, cin, H, W) -> (B, cout, H, W)


def _encoder(c: int, hidden: list[int], n_down: int, res_blocks: int, code_dim: int) -> nn.Sequential:
    """(B, c, H, W) -> (B, code_dim, H / 2**n_down, W / 2**n_down)."""
    layers: list[nn.Module] = [nn.Conv2d(c, hidden[0], 3, padding=1)]
    prev = hidden[0]
    for i, ch in enumerate(hidden):  # stage i runs at H / 2**i (until n_down stages have downsampled)
        for _ in range(res_blocks):
            layers.append(ResBlock(prev, ch))
            prev = ch
        if i < n_down:
            layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
    layers += [ResBlock(prev, prev), _norm(prev), nn.SiLU(), nn.Conv2d(prev, code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(c: int, hidden: list[int], n_down: int, res_blocks: int, code_dim: int) -> nn.Sequential:
    """(B, code_dim, h, w) -> (B, c, h * 2**n_down, w * 2**n_down), the encoder in reverse."""
    prev = hidden[-1]
    layers: list[nn.Module] = [nn.Conv2d(code_dim, prev, 3, padding=1), ResBlock(prev, prev)]
    for i in reversed(range(len(hidden))):
        if i < n_down:
            layers += [
                nn.Upsample(scale_factor=2.0, mode="nearest"),
                nn.Conv2d(prev, hidden[i], 3, padding=1),
            ]
            prev = hidden[i]
        for _ in range(res_blocks):
            layers.append(ResBlock(prev, hidden[i]))
            prev = hidden[i]
    layers += [_norm(prev), nn.SiLU(), nn.Conv2d(prev, c, 3, padding=1)]
    return nn.Sequential(*layers)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VQTokenizer(nn.Module):
    """Images (B, C, H, W) in [0, 1] <-> ids (B, h * w) in [0, V), row-major over the grid."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        n_down = int(math.log2(cfg.downsample))
        side = cfg.resolution // cfg.downsample
        self.grid = (side, side)
        self.vocab_size = cfg.codebook_size
        hidden = list(cfg.hidden)
        self.encoder = _encoder(cfg.channels, hidden, n_down, cfg.res_blocks, cfg.code_dim)
        self.decoder = _decoder(cfg.channels, hidden, n_down, cfg.res_blocks, cfg.code_dim)
        codes = torch.randn(cfg.codebook_size, cfg.code_dim)  # (V, D)
        self.use_ema = cfg.ema_decay > 0
        if self.use_ema:
            self.register_buffer("codebook", codes)  # (V, D) = ema_sum / ema_count
            self.register_buffer("ema_sum", codes.clone())  # (V, D)
        else:
            self.codebook = nn.Parameter(codes)  # (V, D)
        # One pseudo-observation per initial code; unused codes fall below the default
        # threshold after the first training step and restart onto encoder outputs.
        self.register_buffer("ema_count", torch.ones(cfg.codebook_size))  # (V,)

    @property
    def tokens_spec(self) -> dict:
        h, w = self.grid
        return {"kind": "ids", "grid": (h, w), "vocab_size": self.vocab_size, "num_tokens": h * w}

    # ------------------------------------------------------------------ latents <-> ids

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()  # (B, D, h, w); the lookup and codebook statistics run in fp32
        return F.normalize(z, dim=1) if self.cfg.l2_normalized else z

    def _lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prepared z, its nearest codes, their ids): (B, D, h, w), (B, D, h, w), (B, N)."""
        with torch.autocast(z.device.type, enabled=False):
            z = self._prepare(z)  # (B, D, h, w)
            with torch.no_grad():
                flat = rearrange(z, "b d h w -> (b h w) d")  # (M, D), M = B * h * w
                codes = self.codebook.float()  # (V, D)
                if self.cfg.l2_normalized:
                    codes = F.normalize(codes, dim=1)
                dist2 = (
                    flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.T + codes.pow(2).sum(1)
                )  # (M, V) squared L2
                ids = rearrange(dist2.argmin(1), "(b n) -> b n", b=z.shape[0])  # (B, N) int64
            return z, self.embed_ids(ids), ids

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, D, h, w) -> (straight-through quantised latent (B, D, h, w), ids (B, N)).

        The forward value is the nearest code; the backward pass copies the gradient to z.
        """
        z, codes, ids = self._lookup(z)  # (B, D, h, w), (B, D, h, w), (B, N)
        return z + (codes - z).detach(), ids

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, N) -> code vectors (B, D, h, w) (unit-norm when ``l2_normalized``)."""
        h, w = self.grid
        if ids.dim() != 2 or ids.shape[1] != h * w:
            raise ValueError(f"ids must have shape (B, {h * w}), got {tuple(ids.shape)}")
        codes = self.codebook[ids]  # (B, N, D)
        if self.cfg.l2_normalized:
            codes = F.normalize(codes, dim=-1)
        return rearrange(codes, "b (h w) d -> b d h w", h=h, w=w)  # (B, D, h, w)

    # ------------------------------------------------------------------ images <-> latents

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> pre-quantisation latent (B, D, h, w)."""
        check_images(images, self.cfg.resolution, self.cfg.channels, "VQTokenizer")
        return self.encoder(images * 2 - 1)  # (B, D, h, w)

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        """Latent (B, D, h, w) -> images (B, C, H, W), [0, 1] scale but not clamped."""
        return (self.decoder(zq) + 1) / 2  # (B, C, H, W)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> ids (B, h * w) int64. Never updates the codebook."""
        return self._lookup(self.encode_latent(images))[2]  # (B, N)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, h * w) -> images (B, C, H, W) clamped to [0, 1]."""
        return self.decode_latent(self.embed_ids(ids)).clamp(0, 1)  # (B, C, H, W)

    # ------------------------------------------------------------------ training

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Same as :meth:`loss`, so that ``DistributedDataParallel(tokenizer)(images)`` trains it."""
        return self.loss(images, labels)

    def loss(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Training objective on a batch (B, C, H, W) in [0, 1]; labels are ignored.

        ``loss`` = MSE in the [-1, 1] space the networks work in (4x ``recon_mse``) + beta *
        ``commit`` (+ the codebook loss when ``ema_decay == 0``). ``recon_mse`` is in [0, 1]
        pixel units. In training mode this also updates the EMA codebook and restarts dead
        codes (see the module docstring).
        """
        z, codes, ids = self._lookup(self.encode_latent(images))  # (B, D, h, w) x 2, (B, N)
        recon = self.decode_latent(z + (codes - z).detach())  # (B, C, H, W)
        recon_mse = F.mse_loss(recon.float(), images)
        commit = F.mse_loss(z, codes.detach())
        total = 4 * recon_mse + self.cfg.beta * commit
        if not self.use_ema:
            total = total + F.mse_loss(codes, z.detach())  # moves codes toward their latents
        onehot = F.one_hot(ids.flatten(), self.vocab_size).float()  # (M, V)
        counts = onehot.sum(0)  # (V,) latents per code in this batch (this rank)
        if self.training:
            self._update_codebook(rearrange(z.detach(), "b d h w -> (b h w) d"), onehot)
        p = counts / counts.sum()  # (V,)
        return {
            "loss": total,
            "recon_mse": recon_mse.detach(),
            "commit": commit.detach(),
            "codebook_usage": (counts > 0).float().mean(),
            "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()),
        }

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, onehot: torch.Tensor) -> None:
        """EMA step and dead-code restarts from latents (M, D) and their assignments (M, V)."""
        with torch.autocast(flat.device.type, enabled=False):
            stats = torch.cat([onehot.sum(0)[:, None], onehot.T @ flat], dim=1)  # (V, 1 + D)
            if _distributed():
                dist.all_reduce(stats)  # sum over ranks: every rank applies the same update
            counts, sums = stats[:, 0], stats[:, 1:]  # (V,), (V, D)
            decay = self.cfg.ema_decay if self.use_ema else _USAGE_DECAY_NO_EMA
            self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)  # (V,)
            if self.use_ema:
                self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)  # (V, D)
                self.codebook.copy_(self.ema_sum / self.ema_count.clamp_min(1e-5)[:, None])  # (V, D)
            threshold = self.cfg.dead_code_threshold
            if threshold <= 0:
                return
            pick = torch.randint(flat.shape[0], (self.vocab_size,)).to(flat.device)  # (V,) global CPU RNG
            candidates = flat[pick].contiguous()  # (V, D) random latents of this batch
            if _distributed():
                dist.broadcast(candidates, src=0)  # restart onto rank 0's latents everywhere
            dead = self.ema_count < threshold  # (V,) bool
            self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))  # (V, D)
            self.ema_count.masked_fill_(dead, threshold)  # (V,)
            if self.use_ema:
                self.ema_sum.copy_(torch.where(dead[:, None], candidates * threshold, self.ema_sum))


@TOKENIZERS.register("vq", VQConfig)
def build_vq(cfg) -> VQTokenizer:
    """Build from a (validated) ``tokenizer`` config section; missing fields take defaults."""
    fields = {k: cfg[k] for k in VQConfig.__dataclass_fields__ if k in cfg}
    if "hidden" in fields:
        fields["hidden"] = [int(h) for h in fields["hidden"]]
    return VQTokenizer(VQConfig(**fields))
