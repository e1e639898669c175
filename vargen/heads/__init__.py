"""Heads: small modules that own their loss and their sampler (ARCHITECTURE.md "Head").

``dimwise``: TokenBridge's dimension-wise autoregressive head over a token's channels.
"""

from vargen.heads.dimwise import DimwiseARHead, DimwiseHeadConfig, channel_order_by_error, guide_features

__all__ = ["DimwiseARHead", "DimwiseHeadConfig", "channel_order_by_error", "guide_features"]
