"""Image tokenizers: images (B, C, H, W) in [0, 1] <-> discrete token ids (B, N).

Importing this package registers every tokenizer in ``vargen.registry.TOKENIZERS``.
"""

from vargen.tokenizers.vq import VQConfig, VQTokenizer, build_vq  # registers "vq"

__all__ = ["VQConfig", "VQTokenizer", "build_vq"]
