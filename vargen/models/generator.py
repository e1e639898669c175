"""The contract samplers rely on, shared by every generator model.

Samplers use these members instead of a model's internals:

- :attr:`Generator.device`: where the model's parameters live;
- :meth:`Generator.guidance_labels`: the rows of one batched classifier-free-guidance call
  (the labels, then as many null-class rows), for samplers that need both halves (the fused
  logits warpers mix them themselves);
- :meth:`Generator.forward_guided`: ``cfg_scale`` -> the mixed output ``u + s (c - u)`` of one
  batched call (DiT's ``forward_with_cfg``);
- :meth:`Generator.attach_tokenizer`: the tokenizer, for models that read it;
- :func:`drop_labels`: label dropout to the null class in training (what guidance needs).

Token-AR models additionally expose ``next_token_model`` (the module drawn token by token,
with ``logits``, ``new_ragged_cache``, ``forward_window`` and ``token_embeddings``) and
``completion_logits(ids_BN, cond_B)`` (None when the drawn ids are the output; else the logits
that complete them, CTF's stage 2): the speculative samplers (SD, SJD, GSD) draw from every
model that has them (:func:`vargen.sampling.decoders.ar.complete`).

The default sampler of a model is declared where it is registered:
``MODELS.register(name, schema, samplers=(default, ...))`` lists the samplers that can draw
from it, the first being the default.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_labels(labels_B: torch.Tensor, null_class: int, p: float) -> torch.Tensor:
    """Labels replaced by ``null_class`` with probability ``p`` each (training for guidance);
    the draw uses the global RNG like the rest of training."""
    if p <= 0:
        return labels_B
    drop_B = torch.rand(labels_B.shape, device=labels_B.device) < p
    return torch.where(drop_B, torch.full_like(labels_B, null_class), labels_B)


def guidance_labels(cond_B: torch.Tensor, null_class: int, guided: bool = True) -> torch.Tensor:
    """(2B,) the labels then B null-class rows when ``guided`` (the rows of one batched
    guidance call), else ``cond_B`` itself."""
    if not guided:
        return cond_B
    return torch.cat([cond_B, torch.full_like(cond_B, null_class)])


class Generator(nn.Module):
    """Base class of the generator models (see the module docstring)."""

    null_class: int

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' float dtype: what a sampler draws its noise in."""
        return next(self.parameters()).dtype

    def attach_tokenizer(self, tokenizer) -> None:
        """Called with the tokenizer the model was trained on, before training or sampling;
        models that read it (VAR's scales, CTF's coarse labels, TokenBridge's check) override this."""

    def guidance_labels(self, cond_B: torch.Tensor, guided: bool = True) -> torch.Tensor:
        """(2B,) the labels then B null-class rows when ``guided``, else ``cond_B`` itself."""
        return guidance_labels(cond_B, self.null_class, guided)

    def forward_guided(self, fn, *inputs: torch.Tensor, cond_B: torch.Tensor, cfg_scale: float):
        """``fn(*inputs, cond)`` guided with ``cfg_scale``: one call on the 2B rows (inputs
        repeated, labels then null class), mixed as u + s (c - u); one call on B rows at s = 1."""
        if cfg_scale == 1.0:
            return fn(*inputs, cond_B)
        both = fn(*(torch.cat([x, x]) for x in inputs), self.guidance_labels(cond_B))
        c, u = both.chunk(2)
        return u + cfg_scale * (c - u)
