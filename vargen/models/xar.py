"""xAR: next-X prediction over continuous tokens (Ren et al. 2025, arXiv:2502.20388).

The KL tokenizer's latent (B, N, C) is grouped into entities (:mod:`vargen.models.entities`:
token, k x k cell, subsample, scale or the whole image) and put in entity order, L positions.
Attention is block-causal (bidirectional inside an entity, causal across). Two designs, chosen
by ``denoiser``:

``denoiser: backbone`` (default; xAR as the paper and OliverRensu/xAR build it). The whole
transformer is the flow model. The positions of entity e carry e's tokens x_t (noisy while e is
generated, clean once it is context), projected to the width, plus a learned position embedding
(entity order) and 2D RoPE; each entity's time enters through AdaLN, with the class: condition
= class embedding + embedding of floor(1000 t), per position. The backbone's output projection
gives the velocity v = eps - x_0 of every token of the entity, so the tokens of an entity are
denoised jointly (one token's noise reaches all of the entity's outputs). Sampling entity e
runs a flow solver (:mod:`vargen.heads.flow`) whose every step is one backbone forward over
e's n_e positions against a KV cache of the clean earlier entities (t = 0); the clean entity
e - 1 rides along in the first step of entity e and its keys/values are committed then, as in
the reference. Training (noisy context learning): one time t ~ logit-normal per (sample,
entity), every entity noised at its own t, all fed at once, velocity MSE on every token: the
context is as noisy as it happens to be. ``noisy_context: false`` is the teacher-forcing
ablation: the sequence is [clean entities (t = 0), noisy entities], noisy entity e attending to
the clean entities < e and to itself, exactly what the sampler computes.

``denoiser: head`` (MAR's design, kept for CSpD and MAR-style models; not xAR's). The backbone
predicts one condition vector z per position of entity e from the class and the entities
before e; a per-token head (``head:``, HEADS ``flow`` or ``mar_diffusion``) owns the loss and
the sampler of p(x | z), so the tokens of an entity are conditionally independent given the
context. One backbone forward per entity while sampling. The positions of entity 0 carry a
learned start embedding, those of entity e > 0 entity e - 1's tokens (for ``scale`` upsampled
nearest to e's side, as VAR feeds the previous scale) plus an entity embedding and the
embedding of the context's noise time; blocks are conditioned on the class only. Noisy context
here: every (sample, entity) gets t ~ U(0, 1) and the context is x_t on the head's path, with t
embedded; sampling feeds the clean generated entities with t = 0. Only this design has
:meth:`XAR.entity_conditions`, :meth:`XAR.forward_entity` and :meth:`XAR.forward_window`.

Blocks are VAR's AdaLN-Zero blocks (:class:`vargen.nn.blocks.AdaLNBlock`; per position in the
backbone design), which also give the KV cache. Positions: 2D RoPE at each position's place on
the token grid, permuted to entity order (for ``scale`` the centre of a coarse cell on the fine
grid, so scales share one coordinate frame); queries and keys are rotated before the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vargen.config import component
from vargen.heads.diffusion import timestep_embedding
from vargen.heads.flow import logit_normal
from vargen.models.entities import Entities
from vargen.models.generator import Generator, drop_labels
from vargen.nn import AdaLNBlock, KVCache, RaggedKVCache, apply_rope, attention, modulate, rope_2d_angles
from vargen.registry import HEADS, MODELS


@dataclass
class XARConfig:
    name: str = "xar"
    grid: list[int] = field(default_factory=lambda: [0, 0])  # filled from the tokenizer
    code_dim: int = 0  # C, filled from the tokenizer
    num_classes: int = 0  # filled from the dataset
    entity: str = "cell"  # token | cell | subsample | scale | image
    cell: int = 2  # side of a cell entity
    stride: int = 2  # subsample stride
    entity_scales: list[int] = field(default_factory=lambda: [1, 2, 4])  # scale entity sides
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    class_dropout: float = 0.1
    noisy_context: bool = True  # false = teacher forcing on clean context
    # backbone: the transformer denoises each entity (xAR); head: MAR's per-token head (``head``)
    denoiser: str = "backbone"
    head: dict = component("HEADS", {"name": "flow"})  # denoiser: head only


DENOISERS = ("backbone", "head")


class EntityAdaLNBlock(AdaLNBlock):
    """:class:`AdaLNBlock` with one condition per position, (B, T, C): each entity has its own time."""

    def forward(self, x_BTC, cond_BTC, cache: KVCache | None, layer: int, mask_TS, rope=None):
        B, T, C = x_BTC.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond_BTC).chunk(6, dim=-1)  # 6x (B, T, C)
        h = self.norm1(x_BTC) * (1 + sc1) + sh1  # (B, T, C)
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x (B,H,T,d)
        if rope is not None:  # rotate before caching: cached keys keep their own positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, S, d): the cached entities + these positions
        y = attention(q, k, v, mask_TS=mask_TS, cache=cache)  # (B, H, T, d)
        x_BTC = x_BTC + g1 * self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        h = self.norm2(x_BTC) * (1 + sc2) + sh2
        return x_BTC + g2 * self.drop(self.mlp(h))  # (B, T, C)


class XAR(Generator):
    token_kind = "continuous"

    def __init__(self, cfg: XARConfig):
        super().__init__()
        if min(cfg.grid) <= 0 or cfg.code_dim <= 0 or cfg.num_classes <= 0:
            raise ValueError(
                "xar needs grid, code_dim and num_classes (the generator task fills them from a "
                f"continuous tokenizer such as kl); got {list(cfg.grid)}, {cfg.code_dim}, {cfg.num_classes}"
            )
        self.cfg = cfg
        self.entities = Entities(cfg.entity, list(cfg.grid), cfg.cell, cfg.stride, list(cfg.entity_scales))
        self.sizes = list(self.entities.sizes)  # n_e
        self.starts = [0]
        for n in self.sizes:
            self.starts.append(self.starts[-1] + n)
        self.num_entities, self.length = len(self.sizes), self.starts[-1]  # E, L
        self.num_classes, self.null_class = cfg.num_classes, cfg.num_classes
        if cfg.denoiser not in DENOISERS:
            raise ValueError(f"model.denoiser must be one of {DENOISERS}, got {cfg.denoiser!r}")
        self.backbone_flow = cfg.denoiser == "backbone"
        C, D = cfg.dim, cfg.code_dim
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: null class
        if self.backbone_flow:
            self.pos_1LC = nn.Parameter(torch.randn(1, self.length, C) * 0.02)  # entity order
            block = EntityAdaLNBlock
        else:
            self.start_1nC = nn.Parameter(torch.randn(1, self.sizes[0], C) * 0.02)
            self.ent_emb = nn.Embedding(self.num_entities, C)
            block = AdaLNBlock
        self.tok_in = nn.Linear(D, C)
        self.time_in = nn.Sequential(nn.Linear(256, C), nn.SiLU(), nn.Linear(C, C))
        self.blocks = nn.ModuleList(block(C, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        for blk in self.blocks:  # adaLN-Zero (DiT): every block starts as the identity
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        self.out_norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.out_ada = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        nn.init.zeros_(self.out_ada[-1].weight)
        nn.init.zeros_(self.out_ada[-1].bias)
        if self.backbone_flow:  # the output projection is the velocity (zero: v = 0 at init)
            self.out = nn.Linear(C, D)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
            self.head = None
        else:
            self.head = HEADS.build(cfg.head, token_dim=D, cond_dim=C)
        cos, sin = rope_2d_angles(*self.grid_positions(), C // cfg.heads)  # (L, d/2) each
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        ent_L = self.entities.entity_index()  # (L,)
        self.register_buffer("entity_L", ent_L, persistent=False)
        self.register_buffer("mask_LL", ent_L[:, None] >= ent_L[None, :], persistent=False)
        self.register_buffer("pos_L", torch.arange(self.length), persistent=False)

    # ------------------------------------------------------------------ inputs
    def grid_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) on the token grid of every position in entity order, (L,) each."""
        h, w = self.cfg.grid
        if self.cfg.entity != "scale":
            raster = self.entities.perm  # entity-order position -> raster index
            return (raster // w).float(), (raster % w).float()
        rows, cols = [], []
        for s in self.cfg.entity_scales:  # cell centres of an s x s map on the h x w grid
            r = (torch.arange(s, dtype=torch.float64) + 0.5) * h / s - 0.5
            c = (torch.arange(s, dtype=torch.float64) + 0.5) * w / s - 0.5
            rows.append(r[:, None].expand(s, s).reshape(-1))
            cols.append(c[None, :].expand(s, s).reshape(-1))
        return torch.cat(rows), torch.cat(cols)

    def context_for(self, e: int, prev_BnD: torch.Tensor) -> torch.Tensor:
        """Entity e - 1's tokens laid out on entity e's positions: (B, n_e, D)."""
        if self.cfg.entity != "scale":
            return prev_BnD  # equal entity sizes
        B, _, D = prev_BnD.shape
        s_prev, s = self.cfg.entity_scales[e - 1], self.cfg.entity_scales[e]
        img = prev_BnD.transpose(1, 2).reshape(B, D, s_prev, s_prev)
        return F.interpolate(img, size=(s, s), mode="nearest").flatten(2).transpose(1, 2)  # (B, s*s, D)

    def embed_entity(self, e: int, prev_BnD: torch.Tensor | None, t_B: torch.Tensor | None, B: int):
        """Input embeddings (B, n_e, C) of entity e's positions; t_B is the context's noise time."""
        a, b = self.starts[e], self.starts[e + 1]
        if e == 0:
            x = self.start_1nC.expand(B, -1, -1)
        else:
            x = self.tok_in(self.context_for(e, prev_BnD))  # (B, n_e, C)
            t_emb = self.time_in(timestep_embedding(1000.0 * t_B, 256).to(x.dtype))  # (B, C)
            x = x + t_emb[:, None]
        return x + self.ent_emb(self.entity_L[a:b])  # (B, n_e, C); positions enter through RoPE

    def _run(self, x_BTC, cond_BC, cache: KVCache | None, mask_TS, start: int = 0):
        T = x_BTC.shape[1]
        rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])  # (T, d/2) x 2
        for i, blk in enumerate(self.blocks):
            x_BTC = blk(x_BTC, cond_BC, cache, i, mask_TS, rope)
        if cache is not None:
            cache.advance(x_BTC.shape[1])
        shift, scale = self.out_ada(cond_BC).chunk(2, dim=-1)
        return modulate(self.out_norm(x_BTC), shift, scale)  # (B, T, C): head conditions z

    def conditions(self, ctx_BLD: torch.Tensor, t_BE: torch.Tensor, cond_B: torch.Tensor) -> torch.Tensor:
        """Teacher-forced conditions (B, L, C) from context tokens in entity order and their times."""
        B = ctx_BLD.shape[0]
        parts = [self.embed_entity(0, None, None, B)]
        for e in range(1, self.num_entities):
            prev = ctx_BLD[:, self.starts[e - 1] : self.starts[e]]
            parts.append(self.embed_entity(e, prev, t_BE[:, e - 1], B))
        return self._run(torch.cat(parts, dim=1), self.cls_emb(cond_B), None, self.mask_LL)

    def entity_conditions(self, tokens_BNC: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Head conditions (B, L, C) for every position in entity order, clean context (t = 0).

        Entity e's conditions depend only on the class and entities < e. For ``entity: token``
        L = N and position i is raster token i.
        """
        self._need_head("entity_conditions")
        x_BLD = self.entities.clusterify(tokens_BNC)
        t_BE = x_BLD.new_zeros(x_BLD.shape[0], self.num_entities)
        return self.conditions(x_BLD, t_BE, labels_B)

    # ------------------------------------------------------------------ sampling
    def _need_head(self, what: str):
        if self.backbone_flow:
            raise ValueError(f"XAR.{what} belongs to the per-token head design (model.denoiser: head)")

    def new_cache(self, batch: int) -> KVCache:
        c, p = self.cfg, self.cls_emb.weight
        return KVCache(c.depth, batch, c.heads, self.length, c.dim // c.heads, p.device, p.dtype)

    def forward_entity(self, e: int, prev_BnD, cond_B: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached forward of entity e (entities < e already in ``cache``): conditions (B, n_e, C)."""
        self._need_head("forward_entity")
        if cache.length != self.starts[e]:
            raise ValueError(f"entity {e} needs a cache of length {self.starts[e]}, got {cache.length}")
        B = cond_B.shape[0]
        t_B = torch.zeros(B, device=cond_B.device)
        x = self.embed_entity(e, prev_BnD, t_B, B)
        return self._run(x, self.cls_emb(cond_B), cache, None, start=self.starts[e])

    def new_ragged_cache(self, batch: int, window: int) -> RaggedKVCache:
        """An empty :class:`RaggedKVCache` for windows of up to ``window`` positions past L."""
        self._need_head("new_ragged_cache")
        c, p = self.cfg, self.cls_emb.weight
        return RaggedKVCache(
            c.depth, batch, c.heads, self.length + window, c.dim // c.heads, p.device, p.dtype
        )

    def forward_window(self, ctx_BWD: torch.Tensor, cond_B: torch.Tensor, cache: RaggedKVCache, used=None):
        """Cached forward of W positions per row, L_b .. L_b+W-1 with L_b = ``cache.length_B[b]``
        (``entity: token`` only, where position i is raster token i): conditions (B, W, C).

        ``ctx_BWD[b, j]`` is the token at position L_b + j - 1 (the context of position L_b + j);
        position 0 takes the start embedding instead. Same inputs as :meth:`entity_conditions`
        (clean context, t = 0), so output j equals its row at position L_b + j. Positions past
        L get the last position's rotary angle and entity embedding: their outputs are
        meaningless and no in-sequence query attends to them. ``used`` is passed to
        :meth:`RaggedKVCache.begin` (a host-side bound that spares a sync).
        """
        self._need_head("forward_window")
        if self.cfg.entity != "token":
            raise ValueError("forward_window needs entity: token (one position per entity)")
        B, W, _ = ctx_BWD.shape
        pos_BW = (cache.length_B[:, None] + torch.arange(W, device=ctx_BWD.device)).clamp(max=self.length - 1)
        t_emb = self.time_in(timestep_embedding(ctx_BWD.new_zeros(1), 256).to(ctx_BWD.dtype))  # (1, C)
        x_tok = self.tok_in(ctx_BWD) + t_emb  # (B, W, C), as embed_entity for e > 0
        x_BWC = torch.where((pos_BW == 0)[..., None], self.start_1nC[:, 0], x_tok)
        x_BWC = x_BWC + self.ent_emb(self.entity_L[pos_BW])  # (B, W, C)
        mask_B1WS = cache.begin(W, used)
        rope = (self.rope_cos[pos_BW][:, None], self.rope_sin[pos_BW][:, None])  # (B, 1, W, d/2) x 2
        cond_BC = self.cls_emb(cond_B)
        for i, blk in enumerate(self.blocks):
            x_BWC = blk(x_BWC, cond_BC, cache, i, mask_B1WS, rope)
        cache.advance(W)
        shift, scale = self.out_ada(cond_BC).chunk(2, dim=-1)
        return modulate(self.out_norm(x_BWC), shift, scale)  # (B, W, C)

    # ------------------------------------------------------------------ backbone flow (xAR)
    def _flow_cond(self, labels_B: torch.Tensor, t_BT: torch.Tensor) -> torch.Tensor:
        """AdaLN condition (B, T, C) per position: class embedding + embedding of floor(1000 t)."""
        B, T = t_BT.shape
        steps = torch.floor(1000.0 * t_BT.double()).flatten()  # the reference embeds integer steps
        t_emb = self.time_in(timestep_embedding(steps, 256).to(self.cls_emb.weight.dtype))
        return self.cls_emb(labels_B)[:, None] + t_emb.view(B, T, -1)  # (B, T, C)

    def flow_forward(self, x_BTD, t_BT, labels_B, pos_T, mask_TS, cache: KVCache | None = None):
        """Velocity (B, T, D) of tokens ``x_BTD`` at positions ``pos_T`` (entity order) and times
        ``t_BT``; ``mask_TS`` over the cached positions and these (None: attend to all)."""
        h = self.tok_in(x_BTD) + self.pos_1LC[:, pos_T]  # (B, T, C)
        cond_BTC = self._flow_cond(labels_B, t_BT)
        rope = (self.rope_cos[pos_T], self.rope_sin[pos_T])  # (T, d/2) x 2
        for i, blk in enumerate(self.blocks):
            h = blk(h, cond_BTC, cache, i, mask_TS, rope)
        shift, scale = self.out_ada(cond_BTC).chunk(2, dim=-1)
        return self.out(self.out_norm(h) * (1 + scale) + shift)  # (B, T, D)

    def prefix_velocity(self, x_BTD, t_BT, labels_B) -> torch.Tensor:
        """Uncached velocity of the first T positions (whole entities), block-causal: the
        reference a cached solver step must equal (clean earlier entities at t = 0 included)."""
        T = x_BTD.shape[1]
        return self.flow_forward(x_BTD, t_BT, labels_B, self.pos_L[:T], self.mask_LL[:T, :T])

    def teacher_forced_velocity(self, x_BLD, xt_BLD, t_BL, labels_B) -> torch.Tensor:
        """Velocity (B, L, D) of every noisy entity given the clean entities before it (t = 0):
        one forward over [clean, noisy] (2L positions); noisy entity e attends to the clean
        entities < e and to itself, the clean half is block-causal among itself."""
        L = self.length
        ent = self.entity_L
        a, b = ent[:, None], ent[None, :]  # query, key entity
        mask = torch.cat([torch.cat([b <= a, torch.zeros_like(a == b)], 1), torch.cat([b < a, a == b], 1)])
        x = torch.cat([x_BLD, xt_BLD], dim=1)  # (B, 2L, D)
        t = torch.cat([torch.zeros_like(t_BL), t_BL], dim=1)  # (B, 2L)
        pos = torch.cat([self.pos_L, self.pos_L])
        return self.flow_forward(x, t, labels_B, pos, mask)[:, L:]

    def denoise_step(self, e: int, x_BnD, t: float, labels_B, cache: KVCache, prev_BmD=None) -> torch.Tensor:
        """One solver evaluation of entity e at time t: velocity (B, n_e, D), KV-cached.

        The cache holds the clean entities < e (t = 0). On entity e's first step (e > 0) pass the
        clean entity e - 1 as ``prev_BmD``: it runs in the same forward at t = 0 (its rows do not
        see entity e) and its keys/values are committed to the cache (reference sampler). Later
        steps feed the n_e positions alone; their keys/values are written past the committed
        length and overwritten by the next step.
        """
        a, b = self.starts[e], self.starts[e + 1]
        B, n, _ = x_BnD.shape
        t_Bn = x_BnD.new_full((B, n), float(t))
        if prev_BmD is None:
            if cache.length != a:
                raise ValueError(f"entity {e} needs a cache of length {a}, got {cache.length}")
            return self.flow_forward(x_BnD, t_Bn, labels_B, self.pos_L[a:b], None, cache)
        a0 = self.starts[e - 1]
        if cache.length != a0:
            raise ValueError(f"entity {e} with entity {e - 1} alongside needs a cache of length {a0}")
        m = prev_BmD.shape[1]
        x = torch.cat([prev_BmD, x_BnD], dim=1)  # (B, m + n, D)
        t_BT = torch.cat([t_Bn.new_zeros(B, m), t_Bn], dim=1)
        v = self.flow_forward(x, t_BT, labels_B, self.pos_L[a0:b], self.mask_LL[a0:b, :b], cache)
        cache.advance(m)
        return v[:, m:]  # (B, n, D)

    def entity_times(self, B: int, device, generator=None) -> torch.Tensor:
        """(B, E) training time of each entity, logit-normal per (sample, entity) (reference)."""
        return logit_normal((B, self.num_entities), device, generator=generator)

    # ------------------------------------------------------------------ training
    def context_times(self, B: int, device) -> torch.Tensor:
        """(B, E) noise time of each context entity (head design): U(0, 1) with noisy context, else 0."""
        if self.cfg.noisy_context:
            return torch.rand(B, self.num_entities, device=device)
        return torch.zeros(B, self.num_entities, device=device)

    def loss(self, tokens_BNC: torch.Tensor, labels_B: torch.Tensor) -> dict:
        if self.training:
            labels_B = drop_labels(labels_B, self.null_class, self.cfg.class_dropout)
        x_BLD = self.entities.clusterify(tokens_BNC)
        if self.backbone_flow:
            t_BL = self.entity_times(x_BLD.shape[0], x_BLD.device)[:, self.entity_L]  # (B, L)
            eps = torch.randn_like(x_BLD)
            xt_BLD = (1 - t_BL[..., None]) * x_BLD + t_BL[..., None] * eps
            if self.cfg.noisy_context:  # every entity at its own time is the others' context
                v = self.flow_forward(xt_BLD, t_BL, labels_B, self.pos_L, self.mask_LL)
            else:
                v = self.teacher_forced_velocity(x_BLD, xt_BLD, t_BL, labels_B)
            return {"loss": F.mse_loss(v, eps - x_BLD)}
        t_BE = self.context_times(x_BLD.shape[0], x_BLD.device)
        t_BL1 = t_BE[:, self.entity_L, None]  # (B, L, 1)
        ctx_BLD = (1 - t_BL1) * x_BLD + t_BL1 * torch.randn_like(x_BLD)  # the head's own path
        z_BLC = self.conditions(ctx_BLD, t_BE, labels_B)
        loss = self.head.loss(x_BLD.flatten(0, 1), z_BLC.flatten(0, 1))
        return {"loss": loss}


def cfg_ramp(e: int, num_entities: int, w: float) -> float:
    """Guidance of entity e: 1 at the first entity, w at the last, linear between (xAR).

    A single entity (``image``) gets w: it is the last one, and the only one.
    """
    if num_entities == 1:
        return w
    return 1.0 + (w - 1.0) * e / (num_entities - 1)


@MODELS.register("xar", XARConfig, samplers=("xar", "cspd"))
def build_xar(cfg) -> XAR:
    fields = dict(cfg)
    fields["head"] = dict(fields.get("head") or {"name": "flow"})
    return XAR(XARConfig(**fields))


__all__ = ["XAR", "XARConfig", "cfg_ramp"]
