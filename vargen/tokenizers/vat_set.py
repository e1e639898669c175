"""VAT's own 1-D form (arXiv:2412.02202, spec sec. 4 (a)): an unordered set (B, N, C) ->
multi-scale ids along a token axis -> a reconstructed set (B, N_out, C).

No reference code exists (the VAT repo holds only a README), so this is built from the
abstract and figure as the spec reads them:

1. **In-context encoder** (TiTok-style, not cross-attention): M learnable latent tokens
   are concatenated with the linearly embedded set and run through non-causal
   :class:`vargen.nn.blocks.Block` s with zero rotary angle (cos 1, sin 0); only the
   M latent outputs are kept. The set tokens carry no position, so the result does not
   depend on the order of the set (any position must be in the features themselves).
2. **Gaussian mapping**: mean / log-variance heads (B, M, D), reparameterised sample in
   training (global RNG), the mean otherwise; KL to N(0, I) as in :mod:`vat`.
3. **1-D residual quantization** along the token axis (``MultiScaleResidualQuantizer``
   with ``ndim=1``: area-down, linear-up, phi as 3-tap convs, one shared codebook),
   token counts r_1 < ... < r_K = M.
4. **Decoder** (VAT decodes to triplane tokens for meshes; here a generic set): the
   quantized latents, given a learnt position along the token axis, are concatenated with
   N_out learnable query tokens; the same kind of non-causal blocks run and the query
   outputs are projected to C. The set is compared with the input by the symmetric
   Chamfer distance (squared L2, mean of both directions), which needs no matching and
   accepts N_out != N.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vargen.nn import Block, RMSNorm
from vargen.tokenizers.msrq import MultiScaleResidualQuantizer
from vargen.tokenizers.vat import gaussian_kl, gaussian_sample


@dataclass
class VATSetConfig:
    in_dim: int = 3  # C: features per set element
    num_outputs: int = 64  # N_out: elements of the reconstructed set
    width: int = 64  # transformer width
    depth: int = 2  # blocks in the encoder and in the decoder
    heads: int = 4
    code_dim: int = 8  # D
    scales: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # token counts, last = M
    codebook_size: int = 64
    codebook_std: float = 1.0
    zero_code: bool = False  # a fixed all-zero code (the restricted, monotone-energy configuration)
    kl_weight: float = 1e-4
    beta: float = 0.25
    phi_ratio: float = 0.5
    phi_share: int = 4
    up_mode: str = "linear"  # "linear" or "nearest" along the token axis
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0


def chamfer(a_BNC: torch.Tensor, b_BMC: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance (squared L2), averaged over points and batch."""
    exact = "donot_use_mm_for_euclid_dist"  # |a - b| directly: 0 for equal points, no cancellation
    d2 = torch.cdist(a_BNC.float(), b_BMC.float(), compute_mode=exact).pow(2)  # (B, N, M)
    return 0.5 * (d2.min(2).values.mean() + d2.min(1).values.mean())


def _zero_rope(tokens: int, head_dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, head_dim / 2) of angle 0: attention without rotary positions."""
    cos = torch.ones(tokens, head_dim // 2, device=like.device)
    return cos, torch.zeros_like(cos)


class _InContext(nn.Module):
    """Blocks over [prefix tokens, inputs] with full attention; returns the prefix outputs."""

    def __init__(self, width: int, depth: int, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = RMSNorm(width)
        self.head_dim = width // heads

    def forward(self, prefix_BPC: torch.Tensor, x_BNC: torch.Tensor) -> torch.Tensor:
        h = torch.cat([prefix_BPC, x_BNC], dim=1)  # (B, P + N, W)
        T = h.shape[1]
        cos, sin = _zero_rope(T, self.head_dim, h)
        full = torch.ones(T, T, dtype=torch.bool, device=h.device)  # non-causal
        for block in self.blocks:
            h = block(h, cos, sin, mask_TS=full)
        return self.norm(h[:, : prefix_BPC.shape[1]])  # (B, P, W)


class VATSet(nn.Module):
    """Sets (B, N, C) <-> 1-D multi-scale ids (a list of (B, r_k)) -> sets (B, N_out, C)."""

    def __init__(self, cfg: VATSetConfig):
        super().__init__()
        if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 2:
            raise ValueError(f"width {cfg.width} must split into {cfg.heads} heads of even size")
        if min(cfg.in_dim, cfg.num_outputs, cfg.depth) < 1 or cfg.kl_weight < 0:
            raise ValueError("in_dim, num_outputs, depth >= 1 and kl_weight >= 0 are required")
        self.cfg = cfg
        self.quantizer = MultiScaleResidualQuantizer.from_config(cfg, ndim=1)
        M, W = self.quantizer.scales[-1], cfg.width
        self.latents = nn.Parameter(torch.randn(M, W) * 0.02)  # (M, W) learnable latent tokens
        self.embed_in = nn.Linear(cfg.in_dim, W)
        self.encoder = _InContext(W, cfg.depth, cfg.heads)
        self.to_gaussian = nn.Linear(W, 2 * cfg.code_dim)
        self.embed_code = nn.Linear(cfg.code_dim, W)
        self.code_pos = nn.Parameter(torch.randn(M, W) * 0.02)  # (M, W) position on the token axis
        self.queries = nn.Parameter(torch.randn(cfg.num_outputs, W) * 0.02)  # (N_out, W)
        self.decoder = _InContext(W, cfg.depth, cfg.heads)
        self.to_out = nn.Linear(W, cfg.in_dim)
        self.vocab_size = cfg.codebook_size

    @property
    def tokens_spec(self) -> dict:
        return {
            "kind": "multiscale_ids_1d",
            "scales": list(self.quantizer.scales),
            "vocab_size": self.vocab_size,
            "num_tokens": self.quantizer.num_tokens,
        }

    def posterior(self, x_BNC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Set (B, N, C) -> (mu, logvar), each (B, M, D); invariant to the set's order."""
        if x_BNC.dim() != 3 or x_BNC.shape[2] != self.cfg.in_dim:
            raise ValueError(f"sets must be (B, N, {self.cfg.in_dim}), got {tuple(x_BNC.shape)}")
        latents = self.latents.expand(x_BNC.shape[0], -1, -1)  # (B, M, W)
        mu, logvar = self.to_gaussian(self.encoder(latents, self.embed_in(x_BNC))).chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_latent(self, f_hat_BMD: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, M, D) -> set (B, N_out, C)."""
        queries = self.queries.expand(f_hat_BMD.shape[0], -1, -1)  # (B, N_out, W)
        codes = self.embed_code(f_hat_BMD) + self.code_pos  # (B, M, W)
        return self.to_out(self.decoder(queries, codes))  # (B, N_out, C)

    @torch.no_grad()
    def encode(self, x_BNC: torch.Tensor) -> list[torch.Tensor]:
        """Set -> ids per scale, (B, r_k) int64 each, from the posterior mean."""
        return self.quantizer.quantize(self.posterior(x_BNC)[0])[1]

    @torch.no_grad()
    def decode(self, ids_list: list[torch.Tensor]) -> torch.Tensor:
        """Ids per scale -> set (B, N_out, C)."""
        return self.decode_latent(self.quantizer.ids_to_fhat(ids_list))

    def forward(self, x_BNC: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return self.loss(x_BNC, labels)

    def loss(self, x_BNC: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Chamfer + quantizer loss + kl_weight * KL; sampling and EMA only in train mode."""
        mu, logvar = self.posterior(x_BNC)  # (B, M, D) x 2
        z = gaussian_sample(mu, logvar, self.training)
        f_hat, _, q = self.quantizer.quantize(z, update_codebook=self.training)
        rec = chamfer(self.decode_latent(f_hat), x_BNC)
        kl = gaussian_kl(mu.float(), logvar.float())
        return {
            "loss": rec + q["loss"] + self.cfg.kl_weight * kl,
            "chamfer": rec.detach(),
            "kl": kl.detach(),
            "commit": q["commit"],
            "codebook_usage": q["codebook_usage"],
        }
