"""Token-Shuffle next-token model (arXiv 2504.17789).

The LlamaGen model (`ar.py`) run on merged tokens: the ids of each s x s window are embedded, compressed
and concatenated into one token (`TokenShuffle`), the causal transformer runs over (h/s)(w/s) merged
tokens after the class token, and the output at window t is split back into s^2 features
(`TokenUnshuffle`) that go through the shared output head to predict the s^2 ids of window t+1.
Loss: plain cross-entropy averaged over sub-tokens. Window s is configurable (default 2); the merge
order defaults to the paper's compress-then-concatenate ("compress_first"), with the third-party
concatenate-then-project ("concat_first") as an option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vargen.models.ar import ARConfig, ARTransformer
from vargen.models.token_shuffle_ops import TokenShuffle, TokenUnshuffle, shuffle_windows, unshuffle_windows
from vargen.registry import MODELS


@dataclass
class TokenShuffleConfig(ARConfig):
    name: str = "token_shuffle"
    window: int = 2
    shuffle_order: str = "compress_first"


class TokenShuffleAR(ARTransformer):
    """Sequence positions are windows: `num_tokens` is the merged count M, `num_image_tokens` = h*w."""

    def __init__(self, cfg: TokenShuffleConfig):
        h, w, s = cfg.grid[0], cfg.grid[1], cfg.window
        if min(h, w) > 0 and (s < 1 or h % s or w % s):
            raise ValueError(f"model.window: s={s} must divide the token grid {h}x{w}")
        super().__init__(dataclasses.replace(cfg, grid=[h // s, w // s]))
        self.s, self.full_grid, self.num_image_tokens = s, (h, w), h * w
        self.shuffle = TokenShuffle(cfg.dim, (h, w), s, cfg.shuffle_order)
        self.unshuffle = TokenUnshuffle(cfg.dim, s)

    def group(self, ids_BN):
        """Raster ids (B, h*w) -> window-grouped ids (B, M, s*s)."""
        return shuffle_windows(ids_BN.unsqueeze(-1), *self.full_grid, self.s)

    def ungroup(self, x_BMK):
        """(B, M, s*s[, V]) window-grouped -> raster (B, h*w[, V])."""
        b, m = x_BMK.shape[:2]
        flat = x_BMK.reshape(b, m, -1)
        out = unshuffle_windows(flat, *self.full_grid, self.s)  # (B, N, V or 1)
        return out if x_BMK.dim() == 4 else out[..., 0]

    def embed(self, ids_BtK, cond_B, start: int):
        parts = []
        if start == 0:
            parts.append(self.cls_emb(cond_B)[:, None])  # (B, 1, D)
        if ids_BtK is not None and ids_BtK.shape[1] > 0:
            parts.append(self.shuffle.merge(self.tok_emb(ids_BtK)))  # (B, t, D)
        return torch.cat(parts, dim=1)

    def _run(self, x_BTC, start, cache):
        T = x_BTC.shape[1]
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        for i, blk in enumerate(self.blocks):
            x_BTC = blk(x_BTC, cos, sin, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.head(self.unshuffle(self.norm(x_BTC)))  # (B, T, s*s, V)

    def forward(self, ids_BN, cond_B):
        logits_BMKV = self.logits(self.group(ids_BN)[:, :-1], cond_B)  # (B, M, s*s, V)
        return self.ungroup(logits_BMKV)  # (B, N, V) in raster order


@MODELS.register("token_shuffle", TokenShuffleConfig, samplers=("token_shuffle",))
def build_token_shuffle(cfg) -> TokenShuffleAR:
    return TokenShuffleAR(TokenShuffleConfig(**dict(cfg)))
