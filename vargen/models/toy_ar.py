"""An enumerable autoregressive model given by tables, for exactness checks of token samplers.

A sampler that claims to draw from the target's joint distribution (speculative sampling, SJD,
group-exact GSD) can only be checked against that joint when it is computable: with ``vocab``
tokens and ``length`` positions there are ``vocab ** length`` sequences, each with an exact
probability (:meth:`ToyAR.joint`). The tests compare empirical frequencies with it by
chi-square, and ``benchmarks.speculative`` measures GSD's total-variation distance on it.
"""

from __future__ import annotations

import torch


class ToyAR:
    """An AR model given by tables: logits of token t = ``tables[t][prefix index]``, (V**t, V) each.

    It implements the part of the model contract token samplers use without a cache
    (``logits(ids_Bn, cond_B)``, ``num_tokens``, ``vocab_size``, ``null_class``; the class is
    ignored), so samplers run on it with ``use_cache=False`` (full recompute).
    ``zero_frac`` > 0 makes about that fraction of tokens impossible (p = 0; never a whole row,
    token 0 stays possible), the case where exactness bugs show as forbidden sequences.
    """

    null_class = 0

    def __init__(
        self, seed: int, zero_frac: float = 0.0, scale: float = 1.5, vocab: int = 6, length: int = 3
    ):
        g = torch.Generator().manual_seed(seed)
        self.num_tokens, self.vocab_size = length, vocab
        self.tables = []
        for t in range(length):
            tab_PV = torch.randn(vocab**t, vocab, generator=g) * scale  # P = vocab**t prefixes
            if zero_frac:
                dead_PV = torch.rand(vocab**t, vocab, generator=g) < zero_frac
                dead_PV[:, 0] = False
                tab_PV = tab_PV.masked_fill(dead_PV, float("-inf"))
            self.tables.append(tab_PV)

    def logits(self, ids_Bn: torch.Tensor, cond_B: torch.Tensor) -> torch.Tensor:
        """Next-token logits after every prefix of ``ids_Bn`` (the empty one included), (B, n+1, V)."""
        B, n = ids_Bn.shape
        out, idx_B = [], torch.zeros(B, dtype=torch.long)
        for t in range(n + 1):
            out.append(self.tables[t][idx_B])
            if t < n:
                idx_B = idx_B * self.vocab_size + ids_Bn[:, t]
        return torch.stack(out, 1)  # (B, n+1, V)

    def joint(self) -> torch.Tensor:
        """Exact probability of every sequence, (V**T,) in lexicographic order (see :meth:`index`)."""
        probs = torch.ones(1, dtype=torch.float64)
        for t in range(self.num_tokens):
            cond_PV = torch.softmax(self.tables[t].double(), -1)
            probs = (probs[:, None] * cond_PV).reshape(-1)
        return probs

    def index(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Each full sequence's position in :meth:`joint`, (B,)."""
        code_B = torch.zeros(ids_BT.shape[0], dtype=torch.long)
        for t in range(self.num_tokens):
            code_B = code_B * self.vocab_size + ids_BT[:, t]
        return code_B
