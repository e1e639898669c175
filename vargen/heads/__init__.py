"""Heads: small modules that own their loss and their sampler (MAR's split of backbone and head).

``diffusion``: MAR's per-token diffusion head over a continuous token (xAR, CSpD).
``flow``: xAR's flow-matching head (Euler ODE / Euler-Maruyama SDE sampler).
``dimwise``: TokenBridge's dimension-wise autoregressive head over a token's channels.
"""

from vargen.heads import diffusion, flow  # noqa: F401  (register)
from vargen.heads.diffusion import DiffusionHead, DiffusionHeadConfig
from vargen.heads.dimwise import DimwiseARHead, DimwiseHeadConfig, channel_order_by_error, guide_features
from vargen.heads.flow import FlowHead, FlowHeadConfig

__all__ = [
    "DiffusionHead",
    "DiffusionHeadConfig",
    "DimwiseARHead",
    "DimwiseHeadConfig",
    "FlowHead",
    "FlowHeadConfig",
    "channel_order_by_error",
    "guide_features",
]
