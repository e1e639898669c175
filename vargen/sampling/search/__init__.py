"""Test-time search over candidates scored by a reward (TTS-VAR, best-of-N)."""

from vargen.sampling.search import tts_var  # noqa: F401  (register)
