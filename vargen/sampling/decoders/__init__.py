"""Per-model decoders: the sampler each model family is drawn with (its registered default)
and the model-specific variants (DDIM's FKC-CFG, minority guidance)."""

from vargen.sampling.decoders import (  # noqa: F401  (register)
    ar,
    ctf,
    diffusion,
    mdm,
    minority,
    tarflow,
    token_shuffle,
    tokenbridge,
    var,
    xar,
)
