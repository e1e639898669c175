"""TokenBridge generator: next-token backbone on dequantized latents + dimension-wise AR head.

TokenBridge (arXiv 2503.16430) feeds the backbone the *dequantized
continuous latent* of each token through a linear projection (not index embeddings), and
predicts the next token's C quantized channels with the dimension-wise AR head
(:mod:`vargen.heads.dimwise`). The reference backbone is MAR (bidirectional, masked, random
order); ours is the library's next-token LlamaGen backbone (class token at
position 0, 2-D RoPE, causal): position t's feature z_t conditions the head for token t.

Quantizer settings must match the tokenizer's: ``vocab_size`` (= levels) and ``code_dim``
(= channels), ``lo``, ``hi``, ``std_range`` and ``bins`` are filled from its tokens_spec by
the generator task, and checked again in :meth:`attach_tokenizer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vargen.heads.dimwise import DimwiseARHead, DimwiseHeadConfig
from vargen.models.generator import Generator, drop_labels
from vargen.nn import Block, KVCache, RMSNorm, rope_2d_table
from vargen.registry import MODELS
from vargen.tokenizers.tokenbridge import DimQuantConfig, DimQuantizer


@dataclass
class TokenBridgeARConfig:
    name: str = "tokenbridge_ar"
    vocab_size: int = 0  # levels per channel; 0 = from the tokenizer
    code_dim: int = 0  # channels per token; 0 = from the tokenizer
    grid: list[int] = field(default_factory=lambda: [0, 0])
    num_classes: int = 0
    lo: float = -5.0  # quantizer range, must equal the tokenizer's (filled from it)
    hi: float = 5.0
    std_range: float = 3.0
    bins: str = "gaussian"
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.667
    dropout: float = 0.0
    class_dropout: float = 0.1
    rope_base: float = 10000.0
    head_width: int = 64
    head_depth: int = 2
    head_heads: int = 4
    channel_order: list[int] = field(default_factory=list)  # [] = 0..C-1


class TokenBridgeAR(Generator):
    token_kind = "dim_ids"

    def __init__(self, cfg: TokenBridgeARConfig):
        super().__init__()
        if cfg.vocab_size <= 1 or cfg.code_dim <= 0 or min(cfg.grid) <= 0 or cfg.num_classes <= 0:
            raise ValueError(
                f"tokenbridge_ar needs vocab_size, code_dim, grid and num_classes (got {cfg.vocab_size}, "
                f"{cfg.code_dim}, {cfg.grid}, {cfg.num_classes}); the generator task fills them from a "
                "tokenbridge tokenizer"
            )
        self.cfg = cfg
        self.num_classes, self.null_class = cfg.num_classes, cfg.num_classes
        self.num_tokens = cfg.grid[0] * cfg.grid[1]
        self.quantizer = DimQuantizer(
            DimQuantConfig(cfg.vocab_size, cfg.std_range, cfg.lo, cfg.hi, cfg.bins, "nearest")
        )
        self.tok_in = nn.Linear(cfg.code_dim, cfg.dim)  # dequantized latent -> width
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: null class
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.dim)
        self.head = DimwiseARHead(
            DimwiseHeadConfig(
                cfg.code_dim,
                cfg.vocab_size,
                cfg.dim,
                cfg.head_width,
                cfg.head_depth,
                cfg.head_heads,
                order=list(cfg.channel_order),
            )
        )
        cos, sin = rope_2d_table(cfg.grid[0], cfg.grid[1], cfg.dim // cfg.heads, 1, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (1 + N, d/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if name.startswith("head."):
                continue
            if name.endswith(("proj.weight", "w2.weight")):  # GPT-2 residual scaling
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.depth))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def attach_tokenizer(self, tok) -> None:
        """Fail early when the tokenizer quantizes differently from what this model dequantizes."""
        tq = tok.quantizer.cfg
        for key in ("lo", "hi", "std_range", "bins"):
            if getattr(tq, key) != getattr(self.cfg, key):
                raise ValueError(f"model.{key}={getattr(self.cfg, key)} differs from the tokenizer's {key}")

    def embed(self, ids_BtC: torch.Tensor | None, cond_B: torch.Tensor | None, start: int):
        parts = []
        if start == 0:
            parts.append(self.cls_emb(cond_B)[:, None])  # (B, 1, D)
        if ids_BtC is not None and ids_BtC.shape[1] > 0:
            parts.append(self.tok_in(self.quantizer.dequantize(ids_BtC)))  # (B, t, D)
        return torch.cat(parts, dim=1)

    def features(self, x_BTD, start: int, cache: KVCache | None):
        """Backbone features for positions start..start+T-1; feature t conditions token t's head."""
        T = x_BTD.shape[1]
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        for i, blk in enumerate(self.blocks):
            x_BTD = blk(x_BTD, cos, sin, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm(x_BTD)  # (B, T, D)

    def forward_step(self, ids_BtC, cond_B, cache: KVCache):
        start = cache.length
        return self.features(self.embed(ids_BtC, cond_B if start == 0 else None, start), start, cache)

    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        p, c = self.tok_in.weight, self.cfg
        return KVCache(
            c.depth, batch, c.heads, self.num_tokens, c.dim // c.heads, device or p.device, dtype or p.dtype
        )

    def loss(self, ids_BNC: torch.Tensor, labels_B: torch.Tensor) -> dict:
        """Head cross-entropy over all tokens and channels (teacher forcing, labels dropped for CFG)."""
        if self.training:
            labels_B = drop_labels(labels_B, self.null_class, self.cfg.class_dropout)
        z_BND = self.features(self.embed(ids_BNC[:, :-1], labels_B, 0), 0, None)  # (B, N, D)
        loss = self.head.loss(z_BND.flatten(0, 1), ids_BNC.flatten(0, 1))
        return {"loss": loss}


@MODELS.register("tokenbridge_ar", TokenBridgeARConfig, samplers=("tokenbridge",))
def build_tokenbridge_ar(cfg) -> TokenBridgeAR:
    fields = dict(cfg)
    for key in ("grid", "channel_order"):
        if key in fields:
            fields[key] = [int(v) for v in fields[key]]
    return TokenBridgeAR(TokenBridgeARConfig(**fields))
