"""Multi-scale residual quantizer (VAR, Tian et al. 2024, arXiv:2404.02905), 2-D and 1-D.

A latent ``f`` (2-D: (B, D, S, S); 1-D: a set of tokens (B, M, D)) becomes K lists of
ids, one per scale, coarse to fine, as in FoundationVision/VAR ``models/quant.py``
(arXiv:2404.02905, Algorithms 1 and 2). With ``f_rest = f`` and ``f_hat = 0``, for
scale k of side s_k (2-D, s_k * s_k ids) or length r_k (1-D, r_k ids):

1. area-down the residual to the scale: ``d_k = down(f_rest, s_k)``;
2. nearest code (squared L2) per position -> ids (B, n_k), row-major in 2-D;
3. ``h_k = phi_k(up(codebook[ids], S))``: bicubic up in 2-D (as VAR), linear in 1-D
   (``F.interpolate`` has no 1-D cubic), ``nearest`` on request; no resampling when the
   scale already has the full size (VAR skips it at the last scale);
4. ``f_hat += h_k`` and ``f_rest -= h_k``.

``phi(h) = (1 - ratio) h + ratio conv3x3(h)`` (VAR's ``quant_resi`` with ratio 0.5; a
3-tap Conv1d in 1-D); ``phi_ratio == 0`` makes phi the identity. The sharing rule is
VAR's (``PhiPartiallyShared``): ``phi_share`` convs (0 = one per scale, 1 = a single one)
sit at ticks ``linspace(1/(3n), 1 - 1/(3n), n)`` when n = 4 and ``linspace(1/(2n), 1 - 1/(2n), n)``
otherwise, and scale k uses the conv whose tick is nearest ``k / (K - 1)`` (the first on a
tie). Only ``min(n, K)`` convs are built: for n > K VAR's rule already gives every scale a
conv of its own, and the idle ones would only trip DDP.

Loss (VAR): mean over scales of ``beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2``
with ``f_hat_k`` the accumulation after k scales; the second term trains phi and, when
``ema_decay == 0``, the codebook (the codebook loss). The returned latent is
straight-through: forward value ``f_hat`` exactly (``f - sg(f)`` is exactly zero, so
:meth:`ids_to_fhat` reproduces it bit for bit; VAR's ``(f_hat - sg(f)) + f`` rounds),
gradient copied to ``f``.

Codebook: one table shared by every scale, initialised from N(0, codebook_std^2) because
the VAT latent is regularised toward N(0, I) (:mod:`vargen.tokenizers.vat`). With
``ema_decay > 0`` it is an EMA buffer updated from the down-sampled residuals of all
scales pooled, with Jukebox-style dead-code restarts: the same statistics, RNG use and
all-reduce as ``VQTokenizer._update_codebook`` in ``vq.py`` (that one is a method bound to
the VQ config, so it is restated here with the zero-code pin). ``zero_code`` pins code 0
to the zero vector: with phi = identity, every s_k dividing S, area-down and nearest-up,
the mean squared residual then never increases across scales (per block, the change is
the block size times ``|d - c|^2 - |d|^2 <= 0``, the zero code being a candidate);
:meth:`residual_energies` exposes it for the test. Without the zero code, or with VAR's
default quantizer (phi convs, bicubic, non-divisible scales), it fails, so
it is no general invariant.

Next-scale model inputs (VAR ``idxBl_to_var_input`` / ``get_next_autoregressive_input``):
the input for scale k + 1 is ``down(f_hat after k scales, s_{k+1})`` as tokens;
:meth:`next_scale_inputs` gives all of them at once (teacher forcing) and
:meth:`next_input` one step at a time (sampling); the two agree exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vargen.tokenizers.vq import _USAGE_DECAY_NO_EMA, _distributed

_UP_MODES = {1: ("linear", "nearest"), 2: ("bicubic", "nearest")}


class Phi(nn.Module):
    """VAR's residual mix ``(1 - ratio) h + ratio conv(h)``, 3x3 in 2-D, 3 taps in 1-D."""

    def __init__(self, dim: int, ratio: float, ndim: int):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv1d
        self.conv = conv(dim, dim, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio  # (B, D, *S)


def phi_index(k: int, num_scales: int, num_phi: int) -> int:
    """Which of ``num_phi`` shared convs scale k uses: the tick nearest k / (K - 1) (VAR).

    VAR's ticks are ``linspace(1/(3n), 1 - 1/(3n), n)`` for n = 4 and ``linspace(1/(2n), ...)``
    for every other n; for n = 1, 2 and n >= K both place scales the same way.
    """
    edge = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi  # VAR's expressions: same rounding
    ticks = np.linspace(edge, 1 - edge, num_phi)  # numpy, as VAR: exact ties resolve as there
    at = k / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(ticks - at)))


class MultiScaleResidualQuantizer(nn.Module):
    """Latent (2-D (B, D, S, S) or 1-D (B, M, D)) <-> K id tensors (B, n_k), coarse to fine.

    ``scales`` are sides s_k in 2-D (n_k = s_k^2) or token counts r_k in 1-D (n_k = r_k),
    increasing, the last equal to the latent's side S or length M.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        scales: list[int],
        *,
        ndim: int = 2,
        up_mode: str | None = None,
        phi_ratio: float = 0.5,
        phi_share: int = 4,
        beta: float = 0.25,
        codebook_std: float = 1.0,
        zero_code: bool = False,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1.0,
    ):
        super().__init__()
        scales = [int(s) for s in scales]
        if ndim not in _UP_MODES:
            raise ValueError(f"ndim must be 1 or 2, got {ndim}")
        up_mode = up_mode or _UP_MODES[ndim][0]
        if up_mode not in _UP_MODES[ndim]:
            raise ValueError(f"up_mode for {ndim}-D must be one of {_UP_MODES[ndim]}, got {up_mode!r}")
        if not scales or scales[0] < 1 or any(a >= b for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must be positive and strictly increasing, got {scales}")
        if not 0 <= phi_ratio <= 1 or phi_share < 0:
            raise ValueError(f"phi_ratio must be in [0, 1] and phi_share >= 0, got {phi_ratio}, {phi_share}")
        if not 0 <= ema_decay < 1 or beta < 0 or dead_code_threshold < 0 or codebook_size < 2:
            raise ValueError(
                "need 0 <= ema_decay < 1, beta >= 0, dead_code_threshold >= 0, codebook_size >= 2"
            )
        self.dim, self.vocab_size, self.scales, self.ndim = dim, codebook_size, scales, ndim
        self.up_mode, self.beta = up_mode, beta
        self.ema_decay, self.dead_code_threshold = ema_decay, dead_code_threshold
        # At most one conv per scale: with fewer scales than shared convs VAR's rule gives
        # every scale its own conv anyway, and idle convs would trip DDP's unused-parameter check.
        num_phi = 0 if phi_ratio == 0 else min(phi_share or len(scales), len(scales))
        self.phis = nn.ModuleList(Phi(dim, phi_ratio, ndim) for _ in range(num_phi))
        codes = torch.randn(codebook_size, dim) * codebook_std  # (V, D) ~ N(0, std^2)
        mask = torch.ones(codebook_size)
        if zero_code:
            mask[0] = 0.0
        self.register_buffer("code_mask", mask)  # (V,) 0 pins a code to the zero vector
        self.use_ema = ema_decay > 0
        if self.use_ema:
            self.register_buffer("codebook", codes)  # (V, D) = ema_sum / ema_count
            self.register_buffer("ema_sum", codes.clone())  # (V, D)
        else:
            self.codebook = nn.Parameter(codes)  # (V, D)
        self.register_buffer("ema_count", torch.ones(codebook_size))  # (V,) usage counts

    @classmethod
    def from_config(cls, cfg, ndim: int) -> MultiScaleResidualQuantizer:
        """Build from a tokenizer config that carries the quantizer's fields (VAT, VAT-set)."""
        return cls(
            cfg.code_dim,
            cfg.codebook_size,
            list(cfg.scales),
            ndim=ndim,
            up_mode=cfg.up_mode,
            phi_ratio=cfg.phi_ratio,
            phi_share=cfg.phi_share,
            beta=cfg.beta,
            codebook_std=cfg.codebook_std,
            zero_code=cfg.zero_code,
            ema_decay=cfg.ema_decay,
            dead_code_threshold=cfg.dead_code_threshold,
        )

    @property
    def num_tokens(self) -> int:
        return sum(s**self.ndim for s in self.scales)

    # ------------------------------------------------------------------ layout helpers

    def _resample(self, x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
        if x.shape[-1] == size:
            return x
        return F.interpolate(x, size=(size,) * self.ndim, mode=mode)  # (B, D, *size)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, *s) -> tokens (B, n, D), row-major over the grid."""
        return x.flatten(2).transpose(1, 2)

    def _codes(self) -> torch.Tensor:
        return self.codebook * self.code_mask[:, None]  # (V, D), code 0 zero when pinned

    def _embed_up(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """Ids (B, n_k) of scale k -> its contribution h_k (B, D, *S) to f_hat."""
        s, full = self.scales[k], self.scales[-1]
        if ids.dim() != 2 or ids.shape[1] != s**self.ndim:
            raise ValueError(f"ids of scale {k} must have shape (B, {s**self.ndim}), got {tuple(ids.shape)}")
        h = self._codes()[ids].transpose(1, 2)  # (B, D, n_k)
        h = h.reshape(*h.shape[:2], *(s,) * self.ndim)  # (B, D, *s)
        h = self._resample(h, full, self.up_mode)  # (B, D, *S)
        if self.phis:
            h = self.phis[phi_index(k, len(self.scales), len(self.phis))](h)
        return h

    def _channels_first(self, f: torch.Tensor) -> torch.Tensor:
        """Validate the latent and return it as (B, D, *S) float32."""
        if self.ndim == 1:
            if f.dim() != 3 or f.shape[1] != self.scales[-1] or f.shape[2] != self.dim:
                raise ValueError(
                    f"1-D latent must be (B, {self.scales[-1]}, {self.dim}), got {tuple(f.shape)}"
                )
            return f.float().transpose(1, 2)  # (B, D, M)
        S = self.scales[-1]
        if f.dim() != 4 or tuple(f.shape[1:]) != (self.dim, S, S):
            raise ValueError(f"2-D latent must be (B, {self.dim}, {S}, {S}), got {tuple(f.shape)}")
        return f.float()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, *S) back to the caller's layout: unchanged in 2-D, (B, M, D) in 1-D."""
        return x.transpose(1, 2) if self.ndim == 1 else x

    # ------------------------------------------------------------------ quantisation

    @torch.no_grad()
    def _nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (R, D) -> ids (R,) of their nearest codes in squared L2."""
        codes = self._codes().float()  # (V, D)
        dist2 = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ codes.T + codes.pow(2).sum(1)  # (R, V)
        return dist2.argmin(1)

    def _steps(self, x: torch.Tensor):
        """The residual loop on x (B, D, *S): (ids per scale, h_k per scale, looked-up rows)."""
        f_rest = x.detach()
        ids_list, h_list, rows = [], [], []
        for k, s in enumerate(self.scales):
            d = self._rows(self._resample(f_rest, s, "area"))  # (B, n_k, D)
            ids = self._nearest(d.reshape(-1, self.dim)).view(x.shape[0], -1)  # (B, n_k)
            h = self._embed_up(ids, k)  # (B, D, *S)
            f_rest = f_rest - h.detach()
            ids_list.append(ids)
            h_list.append(h)
            rows.append(d.reshape(-1, self.dim))
        return ids_list, h_list, rows

    def quantize(self, f: torch.Tensor, update_codebook: bool = False):
        """Latent -> (straight-through f_hat in f's layout, ids per scale, losses).

        ``losses``: ``loss`` (beta * commit + the f_hat term, averaged over scales),
        ``commit`` (mean over scales of |sg(f_hat_k) - f|^2) and ``codebook_usage`` (the
        fraction of codes hit in this batch, all scales together). ``update_codebook``
        applies the EMA step and dead-code restarts (only the training loss asks for it).
        """
        with torch.autocast(f.device.type, enabled=False):
            x = self._channels_first(f)  # (B, D, *S)
            ids_list, h_list, rows = self._steps(x)
            f_hat, commit, fit = None, x.new_zeros(()), x.new_zeros(())
            for h in h_list:
                f_hat = h if f_hat is None else f_hat + h  # (B, D, *S)
                commit = commit + F.mse_loss(f_hat.detach(), x)
                fit = fit + F.mse_loss(f_hat, x.detach())
            K = len(self.scales)
            all_ids = torch.cat([i.reshape(-1) for i in ids_list])  # (sum_k B n_k,)
            if update_codebook:
                self._update_codebook(torch.cat(rows), all_ids)
            losses = {
                "loss": (self.beta * commit + fit) / K,
                "commit": (commit / K).detach(),
                "codebook_usage": (torch.bincount(all_ids, minlength=self.vocab_size) > 0).float().mean(),
            }
            f_ste = f_hat.detach() + (x - x.detach())  # value f_hat exactly, gradient to f
        return self._layout(f_ste).to(f.dtype), ids_list, losses

    def ids_to_fhat(self, ids_list: list[torch.Tensor]) -> torch.Tensor:
        """Ids per scale -> f_hat in the latent's layout, bit-identical to :meth:`quantize`'s."""
        if len(ids_list) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} id tensors, got {len(ids_list)}")
        f_hat = None
        for k, ids in enumerate(ids_list):
            h = self._embed_up(ids, k)  # (B, D, *S)
            f_hat = h if f_hat is None else f_hat + h
        return self._layout(f_hat)

    @torch.no_grad()
    def residual_energies(self, f: torch.Tensor) -> list[float]:
        """Mean squared residual before any scale and after each: K + 1 floats."""
        x = self._channels_first(f)
        energies = [float(x.pow(2).mean())]
        for h in self._steps(x)[1]:
            x = x - h
            energies.append(float(x.pow(2).mean()))
        return energies

    # ------------------------------------------------------------------ next-scale inputs

    def next_input(self, f_hat: torch.Tensor | None, ids: torch.Tensor, k: int):
        """One sampling step: add scale k's ids to f_hat (channels-first (B, D, *S), None at
        k = 0); return the new f_hat and the next scale's input tokens (B, n_{k+1}, D),
        ``down(f_hat, s_{k+1})``, or None after the last scale."""
        h = self._embed_up(ids, k)
        f_hat = h if f_hat is None else f_hat + h  # (B, D, *S)
        if k + 1 == len(self.scales):
            return f_hat, None
        return f_hat, self._rows(self._resample(f_hat, self.scales[k + 1], "area"))

    def next_scale_inputs(self, ids_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher forcing: inputs of scales 2..K concatenated, (B, sum_{k>=2} n_k, D).

        Scale 1's input is the model's start token (class embedding in VAR), not derived
        from ids; token j of scale k + 1 is position j of ``down(f_hat_k, s_{k+1})``.
        """
        f_hat, inputs = None, []
        for k, ids in enumerate(ids_list[:-1]):
            f_hat, x_next = self.next_input(f_hat, ids, k)
            inputs.append(x_next)
        if not inputs:
            return ids_list[0].new_zeros((ids_list[0].shape[0], 0, self.dim), dtype=torch.float32)
        return torch.cat(inputs, dim=1)

    # ------------------------------------------------------------------ codebook learning

    @torch.no_grad()
    def _update_codebook(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """EMA step and dead-code restarts from looked-up rows (R, D) and their ids (R,)."""
        onehot = F.one_hot(ids, self.vocab_size).float()  # (R, V)
        stats = torch.cat([onehot.sum(0)[:, None], onehot.T @ rows], dim=1)  # (V, 1 + D)
        if _distributed():
            dist.all_reduce(stats)  # every rank applies the same update
        counts, sums = stats[:, 0], stats[:, 1:]
        decay = self.ema_decay if self.use_ema else _USAGE_DECAY_NO_EMA
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        if self.use_ema:
            self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
            self.codebook.copy_(self.ema_sum / self.ema_count.clamp_min(1e-5)[:, None])
        if self.dead_code_threshold <= 0:
            return
        pick = torch.randint(rows.shape[0], (self.vocab_size,)).to(rows.device)  # global CPU RNG
        candidates = rows[pick].contiguous()  # (V, D)
        if _distributed():
            dist.broadcast(candidates, src=0)
        dead = (self.ema_count < self.dead_code_threshold) & (self.code_mask > 0)  # (V,)
        self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))
        self.ema_count.masked_fill_(dead, self.dead_code_threshold)
        if self.use_ema:
            self.ema_sum.copy_(
                torch.where(dead[:, None], candidates * self.dead_code_threshold, self.ema_sum)
            )
