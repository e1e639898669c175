"""Coarse-to-fine token prediction (CTF, arXiv 2503.16194).

One model holds both stages and is trained by `train.py` as a generator on VQ ids, with one loss sum
(stage 1 + stage 2; the two stages share no parameters, so this equals training them independently
on the same batches, our reading of the paper):

* coarse labels: k-means over the VQ codebook (`ctf_labels.kmeans`, K = `num_coarse`, seeded),
  computed when the tokenizer is attached and stored as a persistent buffer `coarse_of` (V,);
* stage 1: the spine's LlamaGen model over the K coarse labels (next-token CE);
* stage 2: a bidirectional transformer reading the whole coarse sequence and the class token and
  predicting every fine id in one pass (CE on the true fine ids given the true coarse labels).
  `mask_to_cluster` (the paper is silent) restricts each position's fine logits to the members of
  its coarse cluster, in training and sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vargen.models.ar import ARConfig, ARTransformer
from vargen.models.generator import Generator
from vargen.nn import Block, RMSNorm, rope_2d_table
from vargen.registry import MODELS
from vargen.tokenizers.ctf_labels import cluster_mask, kmeans


@dataclass
class CTFConfig:
    name: str = "ctf"
    vocab_size: int = 0  # filled from the tokenizer
    grid: list[int] = field(default_factory=lambda: [0, 0])
    num_classes: int = 0
    num_coarse: int = 16  # K
    kmeans_seed: int = 0
    dim: int = 64
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0
    class_dropout: float = 0.1
    stage2_dim: int = 64
    stage2_depth: int = 2
    mask_to_cluster: bool = True


class Stage2(nn.Module):
    """Bidirectional transformer: coarse ids (B, N) + class -> fine logits (B, N, V)."""

    def __init__(self, cfg: CTFConfig):
        super().__init__()
        self.coarse_emb = nn.Embedding(cfg.num_coarse, cfg.stage2_dim)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.stage2_dim)
        self.blocks = nn.ModuleList(
            Block(cfg.stage2_dim, cfg.heads, dropout=cfg.dropout) for _ in range(cfg.stage2_depth)
        )
        self.norm = RMSNorm(cfg.stage2_dim)
        self.head = nn.Linear(cfg.stage2_dim, cfg.vocab_size)
        cos, sin = rope_2d_table(cfg.grid[0], cfg.grid[1], cfg.stage2_dim // cfg.heads, 1)
        self.register_buffer("rope_cos", cos, persistent=False)  # (1 + N, d/2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, coarse_BN, cond_B):
        x = torch.cat([self.cls_emb(cond_B)[:, None], self.coarse_emb(coarse_BN)], 1)  # (B, 1+N, C)
        full = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)  # no causal mask
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin, mask_TS=full)
        return self.head(self.norm(x[:, 1:]))  # (B, N, V)


class CTF(Generator):
    def __init__(self, cfg: CTFConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or min(cfg.grid) <= 0 or cfg.num_classes <= 0:
            raise ValueError("ctf needs vocab_size, grid and num_classes > 0; the generator task fills them")
        if not 1 <= cfg.num_coarse <= cfg.vocab_size:
            raise ValueError(f"model.num_coarse: K={cfg.num_coarse} must lie in [1, {cfg.vocab_size}]")
        self.cfg = cfg
        self.vocab_size, self.num_classes, self.null_class = cfg.vocab_size, cfg.num_classes, cfg.num_classes
        self.stage1 = ARTransformer(
            ARConfig(
                vocab_size=cfg.num_coarse,
                grid=list(cfg.grid),
                num_classes=cfg.num_classes,
                dim=cfg.dim,
                depth=cfg.depth,
                heads=cfg.heads,
                dropout=cfg.dropout,
                class_dropout=cfg.class_dropout,
            )
        )
        self.stage2 = Stage2(cfg)
        self.register_buffer("coarse_of", torch.zeros(cfg.vocab_size, dtype=torch.long))  # (V,)

    def attach_tokenizer(self, tok):
        """Coarse labels from the VQ codebook (only once: a loaded checkpoint keeps its labels)."""
        if self.coarse_of.any():
            return
        _, labels = kmeans(tok.codebook.detach().cpu().float(), self.cfg.num_coarse, self.cfg.kmeans_seed)
        self.coarse_of.copy_(labels)

    def fine_logits(self, coarse_BN, cond_B):
        logits_BNV = self.stage2(coarse_BN, cond_B).float()
        if self.cfg.mask_to_cluster:
            allowed_BNV = cluster_mask(self.coarse_of, self.cfg.num_coarse)[coarse_BN]
            logits_BNV = logits_BNV.masked_fill(~allowed_BNV, float("-inf"))
        return logits_BNV

    @property
    def next_token_model(self) -> ARTransformer:
        """Stage 1, drawn token by token (what SD / SJD / GSD accelerate)."""
        return self.stage1

    def completion_logits(self, coarse_BN, cond_B):
        """Stage 2's fine logits (B, N, V) given a coarse sequence: the rest of a draw."""
        return self.fine_logits(coarse_BN, cond_B)

    def loss(self, ids_BN, labels_B) -> dict:
        coarse_BN = self.coarse_of[ids_BN]
        s1 = self.stage1.loss(coarse_BN, labels_B)["loss"]
        s2 = F.cross_entropy(self.fine_logits(coarse_BN, labels_B).flatten(0, 1), ids_BN.flatten())
        return {"loss": s1 + s2, "stage1_loss": s1.detach(), "stage2_loss": s2.detach()}


@MODELS.register("ctf", CTFConfig, samplers=("ctf", "speculative", "sjd", "gsd"))
def build_ctf(cfg) -> CTF:
    return CTF(CTFConfig(**dict(cfg)))
