"""Acceleration by speculation: draft-model SD (:mod:`.draft`), speculative Jacobi decoding
(:mod:`.jacobi`), grouped speculative decoding (:mod:`.gsd`) on the shared machinery of
:mod:`.verify`, and continuous speculative decoding for xAR (:mod:`.cspd`, verification math
in :mod:`.cspd_verify`). SD / SJD / GSD draw from any model of the token-AR contract
(:mod:`vargen.models.generator`)."""

from vargen.sampling.speculative import cspd, draft, gsd, jacobi  # noqa: F401  (register)
