"""Per-token output heads for continuous tokens (MAR diffusion head; xAR flow head)."""

from vargen.heads import diffusion  # noqa: F401  (register)
from vargen.heads.diffusion import DiffusionHead, DiffusionHeadConfig

__all__ = ["DiffusionHead", "DiffusionHeadConfig"]
