"""TarFlow: a normalizing flow made of causal transformer blocks over pixel patches.

TarFlow (Zhai et al. 2024, "Normalizing Flows are Capable Generative Models",
arXiv:2412.06329). Images in [0, 1] are mapped to [-1, 1] and patchified into
T = (H/p)(W/p) tokens of C_p = C p^2 values. ``num_blocks`` flow blocks follow; block b
reads the tokens in its own order, identity for even b and flipped for odd b, so the
autoregressive direction alternates. In that order a block is an affine autoregressive
flow (MAF / IAF):

    (a_i, b_i) = f(u_<i)       a causal transformer whose output is shifted right by one
    z_i = (u_i - b_i) exp(-a_i)                    x -> z (training, one parallel pass)
    u_i = z_i exp(a_i) + b_i                       z -> x (sampling, token by token)

so the Jacobian is triangular and log|det| = -sum(a). The output projection starts at
zero, which makes a fresh model the identity flow. The architecture is apple/ml-tarflow's
MetaBlock (pre-LN layers, the residual stream straight into proj_out): with its weights
copied in, the forward agrees to float32 rounding and the KV-cached inverse bit for bit
(tests/test_tarflow_reference.py); ``final_norm`` adds a LayerNorm before proj_out (the photos
zoo model was trained with it). Class conditioning adds a learned per-block class embedding to
every token; the null class (index ``num_classes``, used for dropped labels and the unconditional
guidance stream) takes the MEAN class embedding.

The model never samples: :mod:`vargen.sampling.decoders.tarflow` inverts the blocks with
:meth:`FlowBlock.params` and a :class:`~vargen.nn.kv_cache.KVCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from vargen.models.generator import Generator, drop_labels
from vargen.nn import KVCache, RaggedKVCache, attention
from vargen.registry import MODELS


@dataclass
class TarFlowConfig:
    name: str = "tarflow"
    channels: int = 0  # 0 = taken from the dataset by the training task
    resolution: int = 0  # 0 = taken from the dataset
    num_classes: int = 0  # 0 = taken from the dataset (1 for an unconditional set)
    patch_size: int = 2  # 16x16 digits -> T = 64 tokens of C_p = 4
    dim: int = 64
    layers_per_block: int = 2
    num_blocks: int = 4
    heads: int = 4
    noise_std: float = 0.05  # Gaussian noise augmentation in training; also the Tweedie sigma
    class_dropout: float = 0.1  # label -> null class in training, for guidance
    # An extra LayerNorm on the last layer's output, before proj_out. apple/ml-tarflow has none
    # (its MetaBlock feeds the residual stream straight into proj_out); models trained before
    # issue 20 had it, and their checkpoints load with it (checkpoint.LATER_MODEL_KEYS).
    final_norm: bool = False


class _Layer(nn.Module):
    """Pre-LN transformer layer: causal MHSA and a GELU MLP (x4), as in TarFlow."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(
        self, x_BLD, cache: KVCache | RaggedKVCache | None, layer: int, mask_B1LS=None, inv_temp_B=None
    ):
        """``inv_temp_B``: per-row 1 / attention temperature (scores q.k / (sqrt(d) tau)), or None
        for tau = 1; keys and values (and so the cache) do not depend on it."""
        B, L, D = x_BLD.shape
        qkv = self.qkv(self.norm1(x_BLD)).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3x (B, H, L, d)
        if inv_temp_B is not None:
            q = q * inv_temp_B.to(q.dtype)[:, None, None, None]  # (B, H, L, d)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, S, d): finished prefix + these L
        # (B, H, L, d); without a ragged mask query t sees keys <= S - L + t
        y = attention(q, k, v, mask_TS=mask_B1LS, causal=mask_B1LS is None)
        x_BLD = x_BLD + self.proj(y.transpose(1, 2).reshape(B, L, D))
        return x_BLD + self.mlp(self.norm2(x_BLD))


class FlowBlock(nn.Module):
    """One TarFlow MetaBlock. Every method except :meth:`forward` works in permuted order."""

    def __init__(self, cfg: TarFlowConfig, num_tokens: int, token_dim: int, flip: bool):
        super().__init__()
        self.flip, self.null_class = flip, cfg.num_classes
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.proj_in = nn.Linear(token_dim, cfg.dim)
        self.pos_emb = nn.Parameter(torch.randn(num_tokens, cfg.dim) * 0.02)  # raster order
        self.class_emb = nn.Parameter(torch.randn(cfg.num_classes, cfg.dim) * 0.02)
        self.layers = nn.ModuleList(_Layer(cfg.dim, cfg.heads) for _ in range(cfg.layers_per_block))
        self.norm = nn.LayerNorm(cfg.dim) if cfg.final_norm else nn.Identity()
        self.proj_out = nn.Linear(cfg.dim, 2 * token_dim)  # rows [:C_p] -> a, [C_p:] -> b
        nn.init.zeros_(self.proj_out.weight)  # identity flow at init (TarFlow)
        nn.init.zeros_(self.proj_out.bias)

    def permute(self, x_BTC):
        """pi_b: identity or flip of the token axis; both are involutions, so pi^-1 = pi."""
        return x_BTC.flip(1) if self.flip else x_BTC

    def cond_emb(self, cond_B):
        """Class embeddings (B, D); the null class gets the mean of the class embeddings."""
        return self._class_table()[cond_B]

    def _class_table(self):
        """(K+1, D): the class embeddings and, last, the null class's (their mean)."""
        return torch.cat([self.class_emb, self.class_emb.mean(0, keepdim=True)])

    def _tables(self):
        """What every pass reads and no pass changes: positions in permuted order (T, D) and the
        class table (K+1, D)."""
        return self.pos_emb.flip(0) if self.flip else self.pos_emb, self._class_table()

    def new_cache(self, batch: int, window: int = 0) -> KVCache | RaggedKVCache:
        """A KV cache for ``batch`` rows; ``window`` > 0: a ragged one for windows that wide.

        The cache carries the block's :meth:`_tables` for its inversion (``cache.weights``), so
        a pass does not re-flip the positions or re-average the class table (a sequential step
        spent ~15% of its time there on one CPU thread); the values are the same."""
        p = self.proj_in.weight
        depth, T = len(self.layers), self.num_tokens
        if window > 0:
            cache = RaggedKVCache(depth, batch, self.heads, T + window, self.head_dim, p.device, p.dtype)
        else:
            cache = KVCache(depth, batch, self.heads, T, self.head_dim, p.device, p.dtype)
        cache.weights = self._tables()
        return cache

    def params(self, u_BLC, cond_B, cache: KVCache | RaggedKVCache | None = None, attn_temp_B=None):
        """(a, b), each (B, L, C_p): :meth:`params_joint` split into the log-scale and shift halves."""
        return self.params_joint(u_BLC, cond_B, cache, attn_temp_B).chunk(2, dim=-1)

    def params_joint(self, u_BLC, cond_B, cache: KVCache | RaggedKVCache | None = None, attn_temp_B=None):
        """(a | b) as one (B, L, 2 C_p) tensor, a = [..., :C_p], for tokens start+1 .. start+L of the
        permuted sequence (one tensor: a sampler's elementwise guidance mix runs once, not twice).

        ``attn_temp_B`` (B,): per-row attention temperature (TarFlow's ``attn_temp`` of the
        unguided stream), None = 1 in every row.

        ``u_BLC`` holds the permuted tokens start .. start+L-1 with ``start = cache.length``
        (0 without a cache). Their keys/values are written after the cache's valid prefix
        but the cache is NOT advanced: a Jacobi solver re-runs a segment until it settles
        and advances only once the written keys/values belong to the final values. With a
        :class:`RaggedKVCache` each row starts at its own ``length_B`` (continuous batching);
        window positions past the last token (padding) reuse its position embedding and give
        meaningless outputs, which cannot reach the real positions before them (causal).
        """
        L = u_BLC.shape[1]
        # positions in permuted order (T, D), class table (K+1, D): the cache's copy (new_cache)
        pos_TD, table = self._tables() if cache is None or cache.weights is None else cache.weights
        mask = None
        if isinstance(cache, RaggedKVCache):
            mask = cache.begin(L)  # (B, 1, L, S)
            pos_BL = cache.length_B[:, None] + torch.arange(L, device=u_BLC.device)
            pos = pos_TD[pos_BL.clamp(max=self.num_tokens - 1)]  # (B, L, D)
        else:
            start = 0 if cache is None else cache.length
            pos = pos_TD[start : start + L]  # (L, D)
            if cache is not None and L > 1:  # bottom-right causal mask, built once for every layer
                mask = torch.ones(L, start + L, dtype=torch.bool, device=u_BLC.device).tril(start)
        h = self.proj_in(u_BLC) + pos + table[cond_B][:, None]  # (B, L, D)
        inv_temp_B = None if attn_temp_B is None else 1.0 / attn_temp_B
        for i, layer in enumerate(self.layers):
            h = layer(h, cache, i, mask, inv_temp_B)
        return self.proj_out(self.norm(h))  # (B, L, 2 C_p)

    def shifted_params(self, u_BTC, cond_B):
        """(a, b), each (B, T, C_p), for all tokens: token i depends on u_<i, token 0 gets (0, 0)."""
        a, b = self.params(u_BTC[:, :-1], cond_B)  # tokens 1..T-1 from inputs 0..T-2
        zero = a.new_zeros(a.shape[0], 1, a.shape[2])
        return torch.cat([zero, a], dim=1), torch.cat([zero, b], dim=1)

    def forward(self, x_BTC, cond_B):
        """x -> z in raster order; returns (z_BTC, logdet_B) with logdet per dimension."""
        u = self.permute(x_BTC)
        a, b = self.shifted_params(u, cond_B)
        z = (u - b) * torch.exp(-a)  # (B, T, C_p)
        return self.permute(z), -a.mean(dim=(1, 2))


class TarFlow(Generator):
    def __init__(self, cfg: TarFlowConfig):
        super().__init__()
        if cfg.channels <= 0 or cfg.resolution <= 0 or cfg.num_classes <= 0:
            raise ValueError(
                f"tarflow needs channels, resolution and num_classes > 0 (got {cfg.channels}, "
                f"{cfg.resolution}, {cfg.num_classes}); the training task fills them from the dataset"
            )
        if cfg.resolution % cfg.patch_size:
            raise ValueError(f"resolution {cfg.resolution} not divisible by patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.num_classes = self.null_class = cfg.num_classes
        self.grid = cfg.resolution // cfg.patch_size
        self.num_tokens = self.grid**2  # T
        self.token_dim = cfg.channels * cfg.patch_size**2  # C_p
        self.blocks = nn.ModuleList(
            FlowBlock(cfg, self.num_tokens, self.token_dim, flip=bool(i % 2)) for i in range(cfg.num_blocks)
        )

    # ------------------------------------------------------------------ pixels <-> tokens
    def patchify(self, x_BCHW):
        """(B, C, H, W) -> (B, T, C p^2), tokens in raster order."""
        B, C, p, g = x_BCHW.shape[0], x_BCHW.shape[1], self.cfg.patch_size, self.grid
        x = x_BCHW.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, p, p)
        return x.reshape(B, g * g, C * p * p)

    def unpatchify(self, x_BTC):
        B, C, p, g = x_BTC.shape[0], self.cfg.channels, self.cfg.patch_size, self.grid
        x = x_BTC.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, g, p, g, p)
        return x.reshape(B, C, g * p, g * p)

    def to_tokens(self, images_BCHW):
        """Images in [0, 1] -> model-space tokens in [-1, 1], (B, T, C_p)."""
        return self.patchify(images_BCHW * 2 - 1)

    def to_images(self, x_BTC):
        """Model-space tokens -> images (B, C, H, W) clamped to [0, 1]."""
        return ((self.unpatchify(x_BTC) + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ the flow
    def forward(self, x_BTC, cond_B):
        """x -> z through all blocks; returns (z_BTC, logdet_B), log|det J| / (T C_p)."""
        logdet_B = x_BTC.new_zeros(x_BTC.shape[0])
        for block in self.blocks:
            x_BTC, ld = block(x_BTC, cond_B)
            logdet_B = logdet_B + ld
        return x_BTC, logdet_B

    def nll(self, x_BTC, cond_B):
        """Negative log density per sample and dimension (nats), prior N(0, I)."""
        z, logdet_B = self(x_BTC, cond_B)
        return 0.5 * z.pow(2).mean(dim=(1, 2)) + 0.5 * math.log(2 * math.pi) - logdet_B

    def loss(self, images_BCHW, labels_B) -> dict:
        """TarFlow objective 0.5 mean(z^2) - mean(logdet) (NLL per dim up to a constant).

        In training the tokens get Gaussian noise of std ``noise_std`` and labels drop to
        the null class with p = ``class_dropout`` (both from the global RNG, as the trainer
        seeds it). ``bpd`` is the continuous density of the (noisy) image in bits per 8-bit
        dimension: [-1, 1] holds 256 bins of width 1/128, so bpd = (NLL + log 128) / log 2.
        It is not a discrete-data bound (that needs uniform dequantization).
        """
        x = self.to_tokens(images_BCHW)  # (B, T, C_p)
        if self.training:
            if self.cfg.noise_std > 0:
                x = x + self.cfg.noise_std * torch.randn_like(x)
            labels_B = drop_labels(labels_B, self.null_class, self.cfg.class_dropout)
        z, logdet_B = self(x, labels_B)
        prior = 0.5 * z.pow(2).mean()
        loss = prior - logdet_B.mean()
        bpd = (loss.detach() + 0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)
        return {"loss": loss, "bpd": bpd, "logdet": logdet_B.mean().detach(), "prior": prior.detach()}

    def denoise(self, x_BTC, cond_B):
        """Tweedie step x + sigma^2 grad log p(x) with sigma = ``noise_std`` (TarFlow, arXiv 2412.06329).

        The model learned the density of data plus N(0, sigma^2) noise, so this is the
        posterior mean of the clean tokens given the sampled (noisy) ones.
        """
        sigma2 = self.cfg.noise_std**2
        with torch.enable_grad():
            x = x_BTC.detach().requires_grad_(True)
            nll_sum = self.nll(x, cond_B).sum() * x[0].numel()  # sum over batch and dims
            (grad,) = torch.autograd.grad(nll_sum, x)
        return (x_BTC - sigma2 * grad).detach()

    @torch.no_grad()
    def init_output_(self, std: float, generator: torch.Generator):
        """Overwrite every block's zero-initialised proj_out weight with N(0, std^2).

        A fresh TarFlow is the identity flow; tests use this to get a non-trivial one.
        """
        for block in self.blocks:
            w = block.proj_out.weight
            noise = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=generator.device)
            w.copy_(std * noise.to(w.device))


@MODELS.register("tarflow", TarFlowConfig, samplers=("tarflow",))
def build_tarflow(cfg) -> TarFlow:
    return TarFlow(TarFlowConfig(**dict(cfg)))


__all__ = ["FlowBlock", "TarFlow", "TarFlowConfig", "build_tarflow"]
