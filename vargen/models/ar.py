"""LlamaGen-style next-token transformer over a tokenizer's grid of discrete ids.

Sequence layout (LlamaGen, Sun et al. 2024): position 0 holds the class embedding (a
prefix token with zero rotary angle), positions 1..N-1 hold image tokens 0..N-2; the
output at position i predicts image token i. Classes live in one embedding table with
an extra row ``num_classes`` for the null class of classifier-free guidance; in training
labels are replaced by the null class with probability ``class_dropout``.

The model never samples: samplers call :meth:`forward_step` with a :class:`KVCache`
(or :meth:`logits` for a full recompute) and draw tokens with their own generator.
Speculative samplers, whose rows commit different numbers of tokens per call, use
:meth:`forward_window` with a :class:`RaggedKVCache` (one length per row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vargen.models.generator import Generator, drop_labels
from vargen.nn import (
    Block,
    KVCache,
    RaggedKVCache,
    RMSNorm,
    gpt2_init_,
    rope_2d_table,
    rope_pair_tables,
)
from vargen.registry import MODELS


@dataclass
class ARConfig:
    name: str = "llamagen"
    vocab_size: int = 0  # 0 = taken from the tokenizer by the training task
    grid: list[int] = field(default_factory=lambda: [0, 0])  # token grid (h, w); 0 = from the tokenizer
    num_classes: int = 0  # 0 = taken from the dataset (1 for an unconditional set)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.667  # SwiGLU hidden = mlp_ratio * dim (LLaMA: 8/3)
    dropout: float = 0.0
    class_dropout: float = 0.1  # label -> null class in training, for CFG
    rope_base: float = 10000.0


class ARTransformer(Generator):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or min(cfg.grid) <= 0 or cfg.num_classes <= 0:
            raise ValueError(
                f"llamagen needs vocab_size, grid and num_classes > 0 (got {cfg.vocab_size}, "
                f"{cfg.grid}, {cfg.num_classes}); the generator task fills them from the tokenizer"
            )
        self.cfg = cfg
        self.vocab_size, self.num_classes = cfg.vocab_size, cfg.num_classes
        self.num_tokens = cfg.grid[0] * cfg.grid[1]
        self.null_class = cfg.num_classes
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: null class
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_2d_table(cfg.grid[0], cfg.grid[1], cfg.dim // cfg.heads, 1, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (1 + N, d/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        cos_pairs, sin_pairs, swap = rope_pair_tables(cos, sin)  # for Block.forward_cached
        self.register_buffer("rope_cos_pairs", cos_pairs, persistent=False)  # (1 + N, d)
        self.register_buffer("rope_sin_pairs", sin_pairs, persistent=False)
        self.register_buffer("rope_swap", swap, persistent=False)  # (d, d)
        gpt2_init_(self, cfg.depth)
        self._compiled_step = None  # see compile_decode
        self._compiled_window = None  # see compile_decode
        self._decode_cache = None  # (key, weights): see prepared_decode_weights

    # ------------------------------------------------------------------ forward passes
    def _run(self, x_BTC, start: int, cache: KVCache | None):
        T = x_BTC.shape[1]
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, d/2)
        for i, blk in enumerate(self.blocks):
            x_BTC = blk(x_BTC, cos, sin, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.head(self.norm(x_BTC))  # (B, T, V)

    def embed(self, ids_Bt: torch.Tensor | None, cond_B: torch.Tensor | None, start: int):
        """Input embeddings for positions start..start+t (class token at position 0)."""
        parts = []
        if start == 0:
            parts.append(F.embedding(cond_B, self.cls_emb.weight)[:, None])  # (B, 1, C)
        if ids_Bt is not None and ids_Bt.shape[1] > 0:
            parts.append(F.embedding(ids_Bt, self.tok_emb.weight))  # (B, t, C)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def logits(self, ids_Bn: torch.Tensor, cond_B: torch.Tensor):
        """Full (uncached) forward: logits (B, n+1, V) for tokens 0..n given ids 0..n-1.

        ``ids_Bn`` may be any prefix (n <= N-1); with n = N-1 it is teacher forcing.
        """
        return self._run(self.embed(ids_Bn, cond_B, 0), 0, None)

    def forward_step(self, ids_Bt: torch.Tensor | None, cond_B: torch.Tensor | None, cache: KVCache):
        """Cached forward of new inputs after ``cache.length`` positions; returns (B, t', V).

        On an empty cache pass ``cond_B`` (the class token is prepended) and optionally a
        prefix of ids; afterwards pass only the new ids.
        """
        start = cache.length
        x_BTC = self.embed(ids_Bt, cond_B if start == 0 else None, start)
        if self._module_path(x_BTC):
            return self._run(x_BTC, start, cache)  # the module path: dropout, fp32 upcasts
        # Block.forward_cached: the same math as _run with fewer ops (decoding is overhead-bound)
        T = x_BTC.shape[1]
        rope = (
            self.rope_cos_pairs[start : start + T],
            self.rope_sin_pairs[start : start + T],
            self.rope_swap,
        )
        step = self._compiled_step or self._cached_blocks
        if cache.weights is None:
            cache.weights = self.prepared_decode_weights()
        logits_BTV = step(x_BTC, rope, cache, cache.weights)
        cache.advance(T)
        return logits_BTV

    def _module_path(self, x_BTC) -> bool:
        """Whether cached forwards must run the modules (dropout in training, 16-bit
        activations, a subclass with its own output map) instead of the prepared-weight path."""
        return (
            (self.training and self.cfg.dropout > 0)
            or x_BTC.dtype != torch.float32
            or type(self)._run is not ARTransformer._run
        )

    def _cached_blocks(self, x_BTC, rope, cache: KVCache, weights):
        """Blocks and head of :meth:`forward_step` on embeddings (what :meth:`compile_decode` compiles)."""
        *block_w, head_w = weights
        for i, blk in enumerate(self.blocks):
            x_BTC = blk.forward_cached(x_BTC, rope, cache, i, block_w[i])
        return self._head(x_BTC, head_w)  # (B, T, V)

    def _head(self, x_BTC, head_w):
        """Final RMSNorm and output map of the fast paths, as one 2D product: (B, T, V)."""
        B, T, C = x_BTC.shape
        n = self.norm
        return torch.mm(F.rms_norm(x_BTC.view(B * T, C), (C,), n.weight, n.eps), head_w).view(B, T, -1)

    def compile_decode(self, enable: bool = True) -> ARTransformer:
        """Run the blocks of :meth:`forward_step` and of :meth:`forward_window`'s fast path
        (the speculative samplers' windows) through ``torch.compile`` (dynamic shapes: the cache
        length and batches > 1 vary without recompiling; batch 1 and each window width compile
        on their own, lazily, on first use). Off by default: on CPU it fuses the small ops around
        the matrix products (speed-ups in the README, "Benchmarks", and
        ``benchmarks/compile_window.py``), but compiling takes minutes per shape, which only a
        long sampling run repays."""
        self._compiled_step = torch.compile(self._cached_blocks, dynamic=True) if enable else None
        self._compiled_window = torch.compile(self._window_blocks, dynamic=True) if enable else None
        return self

    def decode_weights(self) -> list:
        """Per block :meth:`Block.decode_weights`, then the head as an (in, out) matrix."""
        head = self.head.weight
        head_w = head.detach().t().contiguous() if head.device.type == "cpu" else head.t()
        return [blk.decode_weights() for blk in self.blocks] + [head_w]

    def prepared_decode_weights(self) -> list:
        """:meth:`decode_weights`, kept on the model and rebuilt only when a weight changed.

        :meth:`forward_step` and :meth:`forward_window` put them on each new cache (the weights
        cannot change during a run without making its cached keys and values stale too). On CPU
        they are a copy of the weights (transposed: 20 ms for the 5M weights of a width-256,
        6-layer model, ~10% of a 64-token batch-1 decode), so they are kept across runs, keyed
        on every parameter's identity, storage and version counter: an optimizer step, a
        ``load_state_dict``, ``.to()`` or any in-place edit of a parameter (``p.add_`` under
        ``no_grad``) rebuilds them. Not seen: in-place edits through ``p.data``, which bypass the
        version counter; call :meth:`clear_decode_weights` after those (it also frees the copy,
        which otherwise lives as long as the model). Built outside inference
        mode (normal tensors, usable under ``no_grad`` or with autograd on the inputs).
        Parameters made in inference mode have no version counter: then nothing is kept."""
        params = list(self.parameters())  # a superset of what decode_weights copies: no list to keep in step
        if any(p.is_inference() for p in params):
            self._decode_cache = None
            return self.decode_weights()
        key = tuple((id(p), p.data_ptr(), p._version) for p in params)
        if self._decode_cache is None or self._decode_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._decode_cache = (key, self.decode_weights())
        return self._decode_cache[1]

    def clear_decode_weights(self) -> None:
        """Drop the weights :meth:`prepared_decode_weights` keeps (after editing ``p.data``)."""
        self._decode_cache = None

    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        p = self.tok_emb.weight
        c = self.cfg
        return KVCache(
            c.depth, batch, c.heads, self.num_tokens, c.dim // c.heads, device or p.device, dtype or p.dtype
        )

    def forward_window(self, ids_BW: torch.Tensor, cond_B: torch.Tensor, cache: RaggedKVCache):
        """Cached forward of W new inputs per row at that row's positions L_b .. L_b+W-1, where
        L_b = ``cache.length_B[b]``; returns logits (B, W, V) and advances every length by W.

        ``ids_BW[b, j]`` is the input at position L_b + j, i.e. image token L_b + j - 1; at
        position 0 the class embedding of ``cond_B`` is used instead (its id is ignored). Output
        j predicts image token L_b + j, as :meth:`logits` does at that position. Positions past
        the sequence get the last position's rotary angle: their outputs are meaningless, and
        no in-sequence query ever attends to them.

        When every row has the same length L (``cache.start``, read on the CPU: see
        :class:`RaggedKVCache`) the window is a plain cached block, as in :meth:`forward_step`:
        one embedding lookup, rotary tables sliced at L (no per-row gathers), slice writes to
        the cache. The same numbers as the ragged path, bit for bit (tested).
        """
        B, W = ids_BW.shape
        mask_B1WS = cache.begin(W)
        L = cache.start
        R = self.rope_cos.shape[0]  # 1 + N positions with their own angle
        if L is not None and L + W <= R:
            first = L == 0  # the class token stands at position 0: no id goes in there
            x_BWC = self.embed(ids_BW[:, 1:] if first else ids_BW, cond_B if first else None, L)  # (B, W, C)
            rope_W = slice(L, L + W)  # every row's positions
        else:
            pos_BW = cache.positions(W)  # (B, W)
            x_BWC = torch.where(
                (pos_BW == 0)[..., None], self.cls_emb(cond_B)[:, None], self.tok_emb(ids_BW)
            )  # (B, W, C)
            rope_W = pos_BW.clamp(max=R - 1)  # (B, W)
        if self._module_path(x_BWC):
            cos, sin = self.rope_cos[rope_W], self.rope_sin[rope_W]  # ([B,] W, d/2)
            if cos.dim() == 3:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, W, d/2)
            for i, blk in enumerate(self.blocks):
                x_BWC = blk(x_BWC, cos, sin, cache, i, mask_B1WS)
            cache.advance(W)
            return self.head(self.norm(x_BWC))  # (B, W, V)
        # the fast path of forward_step, with per-row rotary angles and the ragged mask
        cos, sin = self.rope_cos_pairs[rope_W], self.rope_sin_pairs[rope_W]  # ([B,] W, d)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, W, d): against (B, H, W, d)
        rope = (cos, sin, self.rope_swap)
        if cache.weights is None:
            cache.weights = self.prepared_decode_weights()
        window = self._compiled_window or self._window_blocks
        logits_BWV = window(x_BWC, rope, mask_B1WS, cache, cache.weights)
        cache.advance(W)
        return logits_BWV

    def _window_blocks(self, x_BWC, rope, mask_B1WS, cache: RaggedKVCache, weights):
        """Blocks and head of :meth:`forward_window`'s fast path on embeddings, per-row rotary
        tables ``rope`` and the ragged mask (what :meth:`compile_decode` compiles for windows)."""
        *block_w, head_w = weights
        for i, blk in enumerate(self.blocks):
            x_BWC = blk.forward_cached(x_BWC, rope, cache, i, block_w[i], mask_B1WS)
        return self._head(x_BWC, head_w)  # (B, W, V)

    def new_ragged_cache(self, batch: int, window: int) -> RaggedKVCache:
        """An empty :class:`RaggedKVCache` for windows of up to ``window`` positions."""
        p = self.tok_emb.weight
        c = self.cfg
        cache = RaggedKVCache(
            c.depth, batch, c.heads, self.num_tokens + window, c.dim // c.heads, p.device, p.dtype
        )
        cache.equal_rows = True  # forward_window runs windows of equal rows as plain blocks
        return cache

    def forward(self, ids_BN, cond_B):
        return self.logits(ids_BN[:, :-1], cond_B)  # (B, N, V)

    # ------------------------------------------------------------------ sampler contract
    @property
    def next_token_model(self) -> ARTransformer:
        """The module the speculative samplers draw token by token: this model."""
        return self

    def completion_logits(self, ids_BN, cond_B):
        """None: the drawn ids are the model's output (CTF overrides this)."""
        return None

    def token_embeddings(self) -> torch.Tensor:
        """(V, D) input embeddings of the ids (GSD's embedding-distance filter)."""
        return self.tok_emb.weight.detach()

    # ------------------------------------------------------------------ training
    def loss(self, ids_BN: torch.Tensor, labels_B: torch.Tensor) -> dict:
        """Next-token cross-entropy; labels dropped to the null class with p=class_dropout."""
        if self.training:
            labels_B = drop_labels(labels_B, self.null_class, self.cfg.class_dropout)
        logits_BNV = self(ids_BN, labels_B)
        loss = F.cross_entropy(logits_BNV.flatten(0, 1).float(), ids_BN.flatten())
        acc = (logits_BNV.argmax(-1) == ids_BN).float().mean()
        return {"loss": loss, "acc": acc.detach()}


@MODELS.register("llamagen", ARConfig, samplers=("ar", "speculative", "sjd", "gsd"))
def build_llamagen(cfg) -> ARTransformer:
    return ARTransformer(ARConfig(**dict(cfg)))
