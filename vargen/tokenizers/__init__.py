"""Image tokenizers: images (B, C, H, W) in [0, 1] <-> discrete tokens.

Importing this package registers every tokenizer in ``vargen.registry.TOKENIZERS``:
``vq`` (ids (B, N)), ``vat`` (variational, multi-scale ids: a list of (B, s_k^2)) and
``kl`` (continuous Gaussian-latent tokens (B, N, D)).
"""

from vargen.tokenizers.kl import KLConfig, KLTokenizer, build_kl  # registers "kl"
from vargen.tokenizers.tokenbridge import DimQuantConfig, DimQuantizer, build_tokenbridge  # "tokenbridge"
from vargen.tokenizers.vat import VATConfig, VATokenizer, build_vat  # registers "vat"
from vargen.tokenizers.vq import VQConfig, VQTokenizer, build_vq  # registers "vq"

__all__ = [
    "KLConfig",
    "KLTokenizer",
    "build_kl",
    "DimQuantConfig",
    "DimQuantizer",
    "build_tokenbridge",
    "VATConfig",
    "VATokenizer",
    "VQConfig",
    "VQTokenizer",
    "build_vat",
    "build_vq",
]
