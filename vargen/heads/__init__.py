"""Heads: small modules that own their loss and their sampler (ARCHITECTURE.md "Head").

``diffusion``: MAR's per-token diffusion head over a continuous token (xAR, CSpD).
``dimwise``: TokenBridge's dimension-wise autoregressive head over a token's channels.
"""

from vargen.heads import diffusion  # noqa: F401  (register)
from vargen.heads.diffusion import DiffusionHead, DiffusionHeadConfig
from vargen.heads.dimwise import DimwiseARHead, DimwiseHeadConfig, channel_order_by_error, guide_features

__all__ = [
    "DiffusionHead",
    "DiffusionHeadConfig",
    "DimwiseARHead",
    "DimwiseHeadConfig",
    "channel_order_by_error",
    "guide_features",
]
