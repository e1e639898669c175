"""Layers shared by tokenizers and models (below both): attention, RMSNorm, 2D RoPE, KV caches
and transformer blocks. Nothing here is registered; it imports only torch."""

from vargen.nn.attention import SelfAttention, attention
from vargen.nn.blocks import AdaLNBlock, Block, SwiGLU, gpt2_init_, modulate
from vargen.nn.kv_cache import KVCache, RaggedKVCache
from vargen.nn.norm import RMSNorm
from vargen.nn.rope import apply_rope, rope_2d_angles, rope_2d_table, rope_pair_tables, rotate_pairs

__all__ = [
    "AdaLNBlock",
    "Block",
    "KVCache",
    "RMSNorm",
    "RaggedKVCache",
    "SelfAttention",
    "SwiGLU",
    "apply_rope",
    "attention",
    "gpt2_init_",
    "modulate",
    "rope_2d_angles",
    "rope_2d_table",
    "rope_pair_tables",
    "rotate_pairs",
]
