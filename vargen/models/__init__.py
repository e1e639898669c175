"""Generator models: next-token AR transformer (and later next-scale, xAR, TarFlow, MDM)."""

from vargen.models import ar  # noqa: F401  (register)
from vargen.models.ar import ARConfig, ARTransformer
from vargen.models.blocks import KVCache, attention

__all__ = ["ARConfig", "ARTransformer", "KVCache", "attention"]
