"""Masked (absorbing) discrete diffusion model over a tokenizer's grid of ids (SEDD / MDLM style).

A bidirectional transformer reads the N ids, some replaced by the mask token (id V), after a
class token (an extra row ``num_classes`` is the null class of classifier-free guidance; labels
are dropped to it with probability ``class_dropout`` in training) and predicts
p0(x_i = v | unmasked context) for every position as a softmax over the V real tokens (never the
mask). With SEDD's log-linear schedule the concrete score of a masked position is
r(t) p0 (vargen/diffusion/absorbing.py), so the model has no time input (RADD, Ou et al. 2024).

Training loss: the continuous-time ELBO of masked diffusion (MDLM, Sahoo et al. 2024, eq. 10)
with the masking probability 1 - alpha_t = (1 - eps) t of the log-linear schedule:

    NELBO = E_{t ~ U(0,1)} E_{x_t} [ -alpha_t' / (1 - alpha_t) sum_{i masked} -log p0(x0_i | x_t) ]
          = E_t [ (1/t) sum_{i masked} -log p0(x0_i | x_t) ],

since -alpha_t' / (1 - alpha_t) = (1 - eps) / ((1 - eps) t) = 1/t. Only masked positions enter.
t is drawn on [eps, 1] with antithetic (low-discrepancy) spacing over the batch; the loss is
divided by N (nats per token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vargen.models.generator import Generator, drop_labels
from vargen.nn import Block, RMSNorm, gpt2_init_, rope_2d_table
from vargen.registry import MODELS


@dataclass
class MDMConfig:
    name: str = "mdm"
    vocab_size: int = 0  # 0 = taken from the tokenizer by the training task; the mask is id vocab_size
    grid: list[int] = field(default_factory=lambda: [0, 0])  # token grid (h, w); 0 = from the tokenizer
    num_classes: int = 0  # 0 = taken from the dataset
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.667
    dropout: float = 0.0
    class_dropout: float = 0.1  # label -> null class in training, for CFG
    eps: float = 1e-3  # log-linear schedule: sigma_bar(t) = -log(1 - (1 - eps) t); sampling ends at t = eps
    rope_base: float = 10000.0


class MaskedDiffusionTransformer(Generator):
    token_kind = "ids"

    def __init__(self, cfg: MDMConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or min(cfg.grid) <= 0 or cfg.num_classes <= 0:
            raise ValueError(
                f"mdm needs vocab_size, grid and num_classes > 0 (got {cfg.vocab_size}, {cfg.grid}, "
                f"{cfg.num_classes}); the generator task fills them from the tokenizer"
            )
        if not 0 < cfg.eps < 1:
            raise ValueError(f"mdm eps must be in (0, 1), got {cfg.eps}")
        self.cfg = cfg
        self.vocab_size, self.num_classes, self.eps = cfg.vocab_size, cfg.num_classes, cfg.eps
        self.mask_id = cfg.vocab_size
        self.num_tokens = cfg.grid[0] * cfg.grid[1]
        self.null_class = cfg.num_classes
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, cfg.dim)  # last row: the mask token
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: null class
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # real tokens only, never the mask
        cos, sin = rope_2d_table(cfg.grid[0], cfg.grid[1], cfg.dim // cfg.heads, 1, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (1 + N, d/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        gpt2_init_(self, cfg.depth)

    def logits(self, x_BN: torch.Tensor, cond_B: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V) of p0 at every position; ``x_BN`` holds ids in [0, V] (V = mask)."""
        h = torch.cat([self.cls_emb(cond_B)[:, None], self.tok_emb(x_BN)], dim=1)  # (B, 1+N, C)
        T = h.shape[1]
        full = torch.ones(T, T, dtype=torch.bool, device=h.device)  # bidirectional: all may attend
        for blk in self.blocks:
            h = blk(h, self.rope_cos, self.rope_sin, mask_TS=full)
        return self.head(self.norm(h[:, 1:]))  # (B, N, V)

    def forward(self, x_BN, cond_B):
        return self.logits(x_BN, cond_B)

    @torch.no_grad()
    def log_p0(self, x_BN, cond_B, cfg_scale: float = 1.0, temperature: float = 1.0):
        """log p0 (B, N, V) for sampling: CFG on logits (one batched call of 2B rows), then
        temperature, then log-softmax."""
        logits = self.forward_guided(self.logits, x_BN, cond_B=cond_B, cfg_scale=cfg_scale)  # (B, N, V)
        return torch.log_softmax(logits.float() / temperature, -1)

    def loss(self, ids_BN: torch.Tensor, labels_B: torch.Tensor) -> dict:
        """ELBO-weighted cross-entropy on masked positions (module docstring)."""
        B, N = ids_BN.shape
        if self.training:
            labels_B = drop_labels(labels_B, self.null_class, self.cfg.class_dropout)
        u = (torch.rand(1, device=ids_BN.device) + torch.arange(B, device=ids_BN.device) / B) % 1  # (B,)
        t_B = self.eps + (1 - self.eps) * u
        masked = torch.rand(B, N, device=ids_BN.device) < ((1 - self.eps) * t_B)[:, None]  # (B, N)
        x_BN = torch.where(masked, torch.full_like(ids_BN, self.mask_id), ids_BN)
        logits = self(x_BN, labels_B)  # (B, N, V)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), ids_BN.flatten(), reduction="none").view(B, N)
        m = masked.float()
        loss = ((ce * m).sum(1) / t_B).mean() / N
        n_masked = m.sum().clamp_min(1)
        acc = ((logits.argmax(-1) == ids_BN).float() * m).sum() / n_masked
        return {"loss": loss, "masked_ce": ((ce * m).sum() / n_masked).detach(), "acc": acc.detach()}


@MODELS.register("mdm", MDMConfig, samplers=("mdm",))
def build_mdm(cfg) -> MaskedDiffusionTransformer:
    return MaskedDiffusionTransformer(MDMConfig(**dict(cfg)))
