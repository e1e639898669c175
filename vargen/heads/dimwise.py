"""TokenBridge's dimension-wise autoregressive head (arXiv 2503.16430).

Given a backbone feature z (one per token position) the head models the C quantized channels of
that token autoregressively, p(q | z) = prod_k p(q_{o_k} | z, q_{o_1}, ..., q_{o_{k-1}}), with o
a channel order:

- sequence [Linear(z), E_1(q_{o_1}), ..., E_{C-1}(q_{o_{C-1}})] (C positions): one embedding
  table per channel position, plus a learned positional embedding;
- AdaLN condition per position = Linear(z) + a learned per-position embedding;
- ``depth`` causal AdaLN blocks, gates zero-initialised (adaLN-Zero), AdaLN final layer;
- C separate linear output heads: position k predicts channel o_{k+1}'s level;
- loss: cross-entropy over all positions and channels, teacher-forced.

Channel order. The reference hard-codes a "frequency-based" order for MAR's KL-16
([8, 1, 10, ...]) with no derivation. Here ``order``
is configurable; :func:`channel_order_by_error` computes one from data with a documented rule:
channels sorted by their share of the reconstruction error, largest first, where a channel's
share is the pixel MSE caused by replacing that channel alone by its data mean. The
structurally important channels are thus generated first, which is the paper's stated aim.

Sampling: channel by channel with a KV cache and temperature (no top-k, as the reference);
classifier-free guidance is applied to the backbone features before they reach the head
(:func:`guide_features`), not to the head's logits (the reference's choice).

Not done from the reference: qk-norm in the head's attention (its blocks use it; at our sizes
the logits stay small without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DimwiseHeadConfig:
    channels: int = 8  # C: channels per token (the KL tokenizer's code_dim)
    levels: int = 64  # B: levels per channel
    cond_dim: int = 64  # width of the backbone feature z
    width: int = 64  # head transformer width
    depth: int = 2  # causal AdaLN blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    order: list[int] = field(default_factory=list)  # channel order; [] = 0..C-1


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class _CausalAdaLNBlock(nn.Module):
    """x + g1 * attn(mod(LN(x))); x + g2 * mlp(mod(LN(x))); modulation per position."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: the block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x_MTD, cond_MTD, cache: list | None, layer: int):
        M, T, D = x_MTD.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond_MTD).chunk(6, dim=-1)  # 6x (M, T, D)
        h = _modulate(self.norm1(x_MTD), sh1, sc1)
        q, k, v = self.qkv(h).view(M, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (M, H, T, d)
        if cache is not None:  # one new position attends to all cached (earlier) ones: causal
            if len(cache) > layer:
                k = torch.cat([cache[layer][0], k], dim=2)  # (M, H, S, d)
                v = torch.cat([cache[layer][1], v], dim=2)
                cache[layer] = (k, v)
            else:
                cache.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (M, H, T, d)
        x_MTD = x_MTD + g1 * self.proj(y.transpose(1, 2).reshape(M, T, D))
        return x_MTD + g2 * self.mlp(_modulate(self.norm2(x_MTD), sh2, sc2))  # (M, T, D)


class DimwiseARHead(nn.Module):
    """Features z (M, cond_dim) -> per-channel level logits (M, C, B), autoregressive over channels."""

    def __init__(self, cfg: DimwiseHeadConfig):
        super().__init__()
        C = cfg.channels
        if C < 1 or cfg.levels < 2:
            raise ValueError(f"head.channels must be >= 1 and head.levels >= 2, got {C}, {cfg.levels}")
        if cfg.width % cfg.heads:
            raise ValueError(f"head.width={cfg.width} must be divisible by head.heads={cfg.heads}")
        order = list(cfg.order) or list(range(C))
        if sorted(order) != list(range(C)):
            raise ValueError(f"head.order={list(cfg.order)} must be a permutation of 0..{C - 1}")
        self.cfg, self.C, self.B = cfg, C, cfg.levels
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)  # (C,)
        self.register_buffer("inverse", torch.argsort(self.order), persistent=False)  # inv[order] = id
        D = cfg.width
        self.z_in = nn.Linear(cfg.cond_dim, D)  # first input position
        self.z_cond = nn.Linear(cfg.cond_dim, D)  # AdaLN condition
        self.embed = nn.Parameter(torch.randn(max(C - 1, 1), cfg.levels, D) * 0.02)  # E_k, one per channel
        self.pos = nn.Parameter(torch.randn(C, D) * 0.02)
        self.cond_pos = nn.Parameter(torch.randn(C, D) * 0.02)
        self.blocks = nn.ModuleList(_CausalAdaLNBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        nn.init.zeros_(self.final_ada[1].weight)
        nn.init.zeros_(self.final_ada[1].bias)
        self.out = nn.Parameter(torch.randn(C, D, cfg.levels) * 0.02 / math.sqrt(D))  # C separate heads
        self.out_bias = nn.Parameter(torch.zeros(C, cfg.levels))

    def _logits(self, h_MTD, cond_MTD, start: int) -> torch.Tensor:
        """Hidden states at positions start..start+T-1 -> logits (M, T, B) from their own heads."""
        T = h_MTD.shape[1]
        shift, scale = self.final_ada(cond_MTD).chunk(2, dim=-1)
        h = _modulate(self.final_norm(h_MTD), shift, scale)  # (M, T, D)
        W, b = self.out[start : start + T], self.out_bias[start : start + T]  # (T, D, B), (T, B)
        return torch.einsum("mtd,tdb->mtb", h, W) + b

    def forward(self, z_MZ: torch.Tensor, q_MC: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (M, C, B) in *generation order*: [:, k] predicts channel order[k]."""
        C = self.C
        q_ord = q_MC[:, self.order]  # (M, C) levels in generation order
        x = self.z_in(z_MZ)[:, None]  # (M, 1, D)
        if C > 1:
            emb = self.embed[torch.arange(C - 1, device=q_MC.device), q_ord[:, : C - 1]]  # (M, C-1, D)
            x = torch.cat([x, emb], dim=1)  # (M, C, D)
        x = x + self.pos
        cond = self.z_cond(z_MZ)[:, None] + self.cond_pos  # (M, C, D)
        for blk in self.blocks:
            x = blk(x, cond, None, 0)
        return self._logits(x, cond, 0)

    def loss(self, z_MZ: torch.Tensor, q_MC: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over positions and channels (teacher forcing)."""
        logits = self(z_MZ, q_MC)  # (M, C, B)
        return F.cross_entropy(logits.flatten(0, 1).float(), q_MC[:, self.order].flatten())

    @torch.no_grad()
    def sample(
        self, z_MZ: torch.Tensor, *, generator: torch.Generator, temperature: float = 1.0
    ) -> torch.Tensor:
        """Levels (M, C) in channel order 0..C-1, drawn channel by channel with a KV cache.

        ``z_MZ`` is the (already guided, see :func:`guide_features`) backbone feature. One
        multinomial draw per channel step from ``generator``, in generation order.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        M, C = z_MZ.shape[0], self.C
        cache: list = []  # per layer (K, V), (M, H, k, d) after k channel steps
        cond_all = self.z_cond(z_MZ)[:, None] + self.cond_pos  # (M, C, D)
        x = (self.z_in(z_MZ) + self.pos[0])[:, None]  # (M, 1, D)
        out = torch.empty(M, C, dtype=torch.long, device=z_MZ.device)
        for k in range(C):
            cond = cond_all[:, k : k + 1]  # (M, 1, D)
            h = x
            for layer, blk in enumerate(self.blocks):
                h = blk(h, cond, cache, layer)
            probs = torch.softmax(self._logits(h, cond, k)[:, 0].float() / temperature, dim=-1)  # (M, B)
            level = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (M,)
            out[:, k] = level
            if k + 1 < C:
                x = (self.embed[k, level] + self.pos[k + 1])[:, None]  # (M, 1, D)
        return out[:, self.inverse]  # back to channel order 0..C-1


def guide_features(z_cond: torch.Tensor, z_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on backbone features: z_u + w (z_c - z_u) (TokenBridge)."""
    return z_uncond + scale * (z_cond - z_uncond)


@torch.no_grad()
def channel_order_by_error(
    tokens_NC: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor]
) -> list[int]:
    """Channels sorted by their share of the reconstruction error, largest first.

    ``tokens_NC`` are continuous tokens (..., C) of real images and ``decode`` maps tokens of
    that shape to images. A channel's share is the pixel MSE between decode(tokens) and the
    decode of the same tokens with that channel alone replaced by its data mean.
    """
    ref = decode(tokens_NC)
    mean_C = tokens_NC.flatten(0, -2).mean(0)  # (C,)
    errors = []
    for c in range(tokens_NC.shape[-1]):
        ablated = tokens_NC.clone()
        ablated[..., c] = mean_C[c]
        errors.append(F.mse_loss(decode(ablated), ref).item())
    return sorted(range(len(errors)), key=lambda c: -errors[c])
