"""VAR-style next-scale transformer over multi-scale ids (Tian et al. 2024, arXiv:2404.02905).

An image is K id maps, coarse to fine (sides s_1 < ... < s_K, from a multi-scale residual
tokenizer such as VAT); the sequence is their concatenation, L = sum_k s_k^2 tokens.
Follows FoundationVision/VAR ``models/var.py``.

Inputs (VAR ``idxBl_to_var_input``): scale 1's input is the start token(s), class
embedding + ``pos_start``; scale k + 1's input is ``down(f_hat_k, s_{k+1})``, the running
sum of the embedded, upsampled, phi-convolved codes of scales 1..k, area-downsampled to
the next scale and mapped by ``word_embed`` (Linear D -> C). The quantizer builds those
inputs (:meth:`MultiScaleResidualQuantizer.next_scale_inputs` for teacher forcing,
``next_input`` while sampling; a test pins that the two agree), so the model needs the
tokenizer: :meth:`attach_tokenizer` (the generator task and ``sample.py`` call it). The
tokenizer is held outside the module tree: it is neither trained nor saved with the model.

Every position adds a learned absolute position embedding (per scale, concatenated) and a
level embedding (its scale index). Attention is block-causal: a query of level i sees keys
of level <= i, bidirectional inside a scale. Blocks are pre-norm with affine-free
LayerNorm and AdaLN from the class embedding (6 vectors per block: shift, scale and gate
for attention and MLP), zero-initialised as in DiT's adaLN-Zero, so every block starts as
the identity. An AdaLN layer (shift, scale) precedes the head, as VAR's
``AdaLNBeforeHead``. Labels are replaced by the null class with p = class_dropout.

The model never samples: :mod:`vargen.sampling.decoders.var` runs one forward per scale
(:meth:`forward_scale` with a :class:`KVCache`) and draws ids with its own generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vargen.models.generator import Generator, drop_labels
from vargen.nn import AdaLNBlock, KVCache, modulate
from vargen.registry import MODELS


@dataclass
class VARConfig:
    name: str = "var"
    vocab_size: int = 0  # 0 = taken from the tokenizer by the training task
    scales: list[int] = field(default_factory=list)  # scale sides; empty = from the tokenizer
    code_dim: int = 0  # D of the tokenizer's codes (input width); 0 = from the tokenizer
    num_classes: int = 0  # 0 = taken from the dataset
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    class_dropout: float = 0.1  # label -> null class in training, for CFG
    # VAR's attn_l2_norm: cosine attention, q and k unit-normalised, logits times a learned per-head
    # scale (init 4, at most 100). VAR's default is on; ours is off because every trained digits /
    # photos VAR (the zoo, the benchmarks' results and the trained-model tests) was trained without it.
    attn_l2_norm: bool = False


class NextScaleTransformer(Generator):
    token_kind = "multiscale_ids"

    def __init__(self, cfg: VARConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or not cfg.scales or cfg.code_dim <= 0 or cfg.num_classes <= 0:
            raise ValueError(
                f"var needs vocab_size, scales, code_dim and num_classes (got {cfg.vocab_size}, "
                f"{list(cfg.scales)}, {cfg.code_dim}, {cfg.num_classes}); the generator task fills "
                "them from a multi-scale tokenizer such as vat"
            )
        if list(cfg.scales) != sorted(set(cfg.scales)):
            raise ValueError(f"model.scales={list(cfg.scales)} must be strictly increasing")
        self.cfg = cfg
        self.vocab_size, self.num_classes, self.null_class = cfg.vocab_size, cfg.num_classes, cfg.num_classes
        self.scales = [int(s) for s in cfg.scales]
        self.scale_lengths = [s * s for s in self.scales]  # n_k
        self.num_tokens = sum(self.scale_lengths)  # L
        starts = [0]
        for n in self.scale_lengths:
            starts.append(starts[-1] + n)
        self.scale_starts = starts  # scale k occupies positions starts[k]:starts[k+1]
        C = cfg.dim
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: null class
        self.pos_start = nn.Parameter(torch.randn(1, self.scale_lengths[0], C) * 0.02)
        self.pos_1LC = nn.Parameter(torch.randn(1, self.num_tokens, C) * 0.02)
        self.lvl_emb = nn.Embedding(len(self.scales), C)
        self.word_embed = nn.Linear(cfg.code_dim, C)
        self.blocks = nn.ModuleList(
            AdaLNBlock(C, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.attn_l2_norm) for _ in range(cfg.depth)
        )
        self.head_norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = nn.Linear(C, cfg.vocab_size)
        level_L = torch.cat([torch.full((n,), k) for k, n in enumerate(self.scale_lengths)])
        self.register_buffer("level_L", level_L, persistent=False)
        self.register_buffer("mask_LL", level_L[:, None] >= level_L[None, :], persistent=False)
        self._init_weights()
        self._tokenizer: tuple = ()  # (tokenizer,) once attached; a tuple keeps it out of the module tree

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero (DiT): every block starts as the identity
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * self.cfg.depth))
        nn.init.zeros_(self.head_ada[-1].weight)
        nn.init.zeros_(self.head_ada[-1].bias)

    # ------------------------------------------------------------------ tokenizer link
    def attach_tokenizer(self, tokenizer) -> None:
        """Give the model the quantizer that turns ids into next-scale inputs."""
        q = tokenizer.quantizer
        if list(q.scales) != self.scales or q.dim != self.cfg.code_dim or q.vocab_size != self.vocab_size:
            raise ValueError(
                f"tokenizer (scales {list(q.scales)}, code_dim {q.dim}, vocab {q.vocab_size}) does not match "
                f"the model (scales {self.scales}, code_dim {self.cfg.code_dim}, vocab {self.vocab_size})"
            )
        self._tokenizer = (tokenizer,)

    @property
    def tokenizer(self):
        """The attached tokenizer (its quantizer builds inputs; its decoder makes images)."""
        if not self._tokenizer:
            raise RuntimeError("call model.attach_tokenizer(tokenizer) first: next-scale inputs come from it")
        return self._tokenizer[0]

    @property
    def quantizer(self):
        return self.tokenizer.quantizer

    def split_scales(self, ids_BL: torch.Tensor) -> list[torch.Tensor]:
        """Concatenated ids (B, L) -> a list of (B, n_k), coarse to fine."""
        if ids_BL.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} ids per image, got {ids_BL.shape[1]}")
        return list(ids_BL.split(self.scale_lengths, dim=1))

    # ------------------------------------------------------------------ forward passes
    def class_condition(self, cond_B: torch.Tensor) -> torch.Tensor:
        return self.cls_emb(cond_B)  # (B, C)

    def embed_scale(self, k: int, tokens_BnD: torch.Tensor | None, cond_BC: torch.Tensor) -> torch.Tensor:
        """Input embeddings of scale k: start tokens for k = 0, else word_embed(down(f_hat))."""
        a, b = self.scale_starts[k], self.scale_starts[k + 1]
        if k == 0:
            x = cond_BC[:, None] + self.pos_start  # (B, n_1, C)
        else:
            x = self.word_embed(tokens_BnD.to(self.word_embed.weight.dtype))  # (B, n_k, C)
        return x + self.pos_1LC[:, a:b] + self.lvl_emb(self.level_L[a:b])  # (B, n_k, C)

    def _run(self, x_BTC, cond_BC, cache: KVCache | None, mask_TS):
        for i, blk in enumerate(self.blocks):
            x_BTC = blk(x_BTC, cond_BC, cache, i, mask_TS)
        if cache is not None:
            cache.advance(x_BTC.shape[1])
        shift, scale = self.head_ada(cond_BC).chunk(2, dim=-1)  # (B, C) x 2
        return self.head(modulate(self.head_norm(x_BTC), shift, scale))  # (B, T, V)

    def forward_scale(self, k: int, tokens_BnD, cond_B: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached forward of scale k (after scales 0..k-1 are in ``cache``): logits (B, n_k, V).

        A query may attend to every cached key (all of an earlier scale or this one), so
        no mask is needed: block causality comes from the order of the calls.
        """
        if cache.length != self.scale_starts[k]:
            raise ValueError(f"scale {k} needs a cache of length {self.scale_starts[k]}, got {cache.length}")
        cond_BC = self.class_condition(cond_B)
        return self._run(self.embed_scale(k, tokens_BnD, cond_BC), cond_BC, cache, None)

    def teacher_forced_inputs(self, ids_list: list[torch.Tensor], cond_BC: torch.Tensor) -> torch.Tensor:
        """The whole input sequence (B, L, C), built from ids exactly as the sampler builds it."""
        with torch.no_grad():
            nxt = self.quantizer.next_scale_inputs(ids_list)  # (B, L - n_1, D)
        parts = [self.embed_scale(0, None, cond_BC)]
        for k in range(1, len(self.scales)):
            a, b = (
                self.scale_starts[k] - self.scale_lengths[0],
                self.scale_starts[k + 1] - self.scale_lengths[0],
            )
            parts.append(self.embed_scale(k, nxt[:, a:b], cond_BC))
        return torch.cat(parts, dim=1)  # (B, L, C)

    def forward(self, ids_BL: torch.Tensor, cond_B: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) for every id, block-causal over scales."""
        cond_BC = self.class_condition(cond_B)
        x_BLC = self.teacher_forced_inputs(self.split_scales(ids_BL), cond_BC)
        return self._run(x_BLC, cond_BC, None, self.mask_LL)

    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        p = self.pos_1LC
        c = self.cfg
        return KVCache(
            c.depth, batch, c.heads, self.num_tokens, c.dim // c.heads, device or p.device, dtype or p.dtype
        )

    # ------------------------------------------------------------------ training
    def loss(self, ids_BL: torch.Tensor, labels_B: torch.Tensor) -> dict:
        """Cross-entropy over all L ids (every scale weighted by its token count, as VAR)."""
        if self.training:
            labels_B = drop_labels(labels_B, self.null_class, self.cfg.class_dropout)
        logits_BLV = self(ids_BL, labels_B)
        nll_BL = F.cross_entropy(logits_BLV.flatten(0, 1).float(), ids_BL.flatten(), reduction="none")
        nll_BL = nll_BL.view_as(ids_BL)
        out = {"loss": nll_BL.mean(), "acc": (logits_BLV.argmax(-1) == ids_BL).float().mean().detach()}
        # the last scale's NLL is the one that decides detail; log it on its own
        out["nll_last_scale"] = nll_BL[:, self.scale_starts[-2] :].mean().detach()
        return out


@MODELS.register("var", VARConfig, samplers=("var", "tts_var", "best_of_n"))
def build_var(cfg) -> NextScaleTransformer:
    fields = dict(cfg)
    fields["scales"] = [int(s) for s in fields.get("scales", [])]
    return NextScaleTransformer(VARConfig(**fields))
