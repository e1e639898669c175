"""Samplers: each takes a model, a condition and an explicit torch.Generator, and returns
tokens plus a stats record (forwards, tokens, acceptance, seconds)."""

from vargen.sampling import (  # noqa: F401  (register)
    ar_decode,
    cspd_sampler,
    ctf_decode,
    diffusion_sampling,
    jacobi,
    mdm_sampling,
    minority_sampling,
    speculative,
    tarflow_sampling,
    token_shuffle_decode,
    tokenbridge_decode,
    tts_var,
    var_decode,
    xar_sampling,
)
from vargen.sampling.ar_decode import new_stats, sample_ar
from vargen.sampling.tarflow_sampling import sample_tarflow
from vargen.sampling.var_decode import sample_var

__all__ = ["new_stats", "sample_ar", "sample_tarflow", "sample_var"]
