"""Samplers: each takes a model, a condition and an explicit torch.Generator, and returns
tokens plus a stats record (forwards, tokens, acceptance, seconds)."""

from vargen.sampling import ar_decode  # noqa: F401  (register)
from vargen.sampling.ar_decode import new_stats, sample_ar

__all__ = ["new_stats", "sample_ar"]
