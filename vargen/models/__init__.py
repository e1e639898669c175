"""Generator models: next-token AR transformer, TarFlow (and later next-scale, xAR, MDM)."""

from vargen.models import ar, tarflow  # noqa: F401  (register)
from vargen.models.ar import ARConfig, ARTransformer
from vargen.models.blocks import KVCache, attention
from vargen.models.tarflow import TarFlow, TarFlowConfig

__all__ = ["ARConfig", "ARTransformer", "KVCache", "TarFlow", "TarFlowConfig", "attention"]
