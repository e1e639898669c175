"""Samplers (:mod:`vargen.sampling.base`: the protocol every registered sampler implements).

- :mod:`vargen.sampling.decoders`: one decoder per model family (next-token, next-scale, CTF,
  Token-Shuffle, TokenBridge, xAR, TarFlow, masked diffusion / LSD, pixel diffusion, minority);
- :mod:`vargen.sampling.speculative`: acceleration methods for token-AR models (draft-model SD,
  SJD, GSD) and for xAR's continuous tokens (CSpD), on shared verification machinery;
- :mod:`vargen.sampling.search`: test-time search over candidates (TTS-VAR, best-of-N);
- :mod:`vargen.sampling.stats`: the stats record; :mod:`vargen.sampling.generate`: checkpoint
  -> images (what ``sample.py`` and the API run).

Each sampler takes a model, labels and an explicit torch.Generator and returns its output plus
a stats record (forwards, tokens, acceptance, seconds).
"""

from vargen.sampling import decoders, search, speculative  # noqa: F401  (register)
from vargen.sampling.decoders.ar import sample_ar
from vargen.sampling.decoders.tarflow import sample_tarflow
from vargen.sampling.decoders.var import sample_var
from vargen.sampling.stats import new_stats

__all__ = ["new_stats", "sample_ar", "sample_tarflow", "sample_var"]
