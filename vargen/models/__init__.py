"""Generator models: next-token AR transformer, next-scale (VAR) transformer, TarFlow."""

from vargen.models import (  # noqa: F401  (register)
    ar,
    ctf,
    diffusion_unet,
    lsd_student,
    mdm,
    minority_classifier,
    tarflow,
    token_shuffle,
    tokenbridge_ar,
    var,
    xar,
)
from vargen.models.ar import ARConfig, ARTransformer
from vargen.models.tarflow import TarFlow, TarFlowConfig
from vargen.models.var import NextScaleTransformer, VARConfig
from vargen.nn import KVCache, attention

__all__ = [
    "ARConfig",
    "ARTransformer",
    "KVCache",
    "NextScaleTransformer",
    "TarFlow",
    "TarFlowConfig",
    "VARConfig",
    "attention",
]
