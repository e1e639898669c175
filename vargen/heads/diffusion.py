"""MAR's per-token diffusion head ("DiffLoss", SimpleMLPAdaLN; MAR, arXiv:2406.11838, sec. 3).

A head owns its loss and its sampler (MAR's split): the backbone gives one condition
vector z per token (``cond_NW``); the head models p(x | z) for that token's continuous
latent x (``(N, C)``) with a small DDPM.

Choices (deviations from the reference code):
- Variance is **fixed**, not learned: the posterior variance beta~_t of the respaced chain,
  with ADM's "clipped" value at the last step (beta~ of the second step), so the loss is
  the plain eps-MSE (MAR's learned-range variance + VLB term is optional).
- The **last reverse step is stochastic**: x0 = mean + tau * sigma * xi. ADM (and MAR's
  released sampler) return the mean at t = 0, which makes the density of x0 degenerate and
  breaks the continuous speculative-decoding ratio test (CSpD needs p(x0) of every step).
- The x0 prediction is clamped to [-clip_x0, clip_x0] (default 5: the tokens are normalised
  per channel) before the posterior mean, as ADM's ``clip_denoised`` does for images. MAR does
  not clip; without it an under-trained head's chain explodes (1/sqrt(abar_T) ~ 2e4 multiplies
  the eps error at the first step). ``clip_x0: 0`` restores MAR's rule.
- CFG mixes eps only, and both halves share the noise, so the chain is run on one x. The
  scale may differ per row (a (N,) tensor): xAR's ramp gives each position its own scale, and
  CSpD runs positions at different places of the ramp in one chain.

Temperature tau means what it means for the flow samplers (:mod:`vargen.heads.flow`): it
multiplies every Gaussian draw, the start x_T = tau eps (in :meth:`DiffusionHead.reverse_trajectory`)
and each step's noise (tau sigma xi). MAR's code scales only the step noise; the two differ only
through what x_T still contributes to x_0, little after the cosine chain's nearly pure-noise start,
and with x_T scaled too a Gaussian target's spread scales by exactly tau for every solver
(tests/test_mar_head.py). At tau = 1 nothing changes.

Noise order of :meth:`DiffusionHead.sample` (documented because :meth:`reverse_trajectory`
must reproduce it): first x_T ~ N(0, I) of shape (N, C) from the generator, then one
(N, C) normal draw per reverse step, from the noisiest step to the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vargen.registry import HEADS


@dataclass
class DiffusionHeadConfig:
    name: str = "mar_diffusion"
    width: int = 128  # W of the MLP (MAR: 1024)
    depth: int = 3  # residual blocks (MAR: 3)
    num_train_steps: int = 1000  # cosine schedule length T
    num_sampling_steps: int = 100  # respaced ancestral steps S
    diffusion_batch_mul: int = 4  # each (z, target) pair repeated with fresh t and eps
    clip_x0: float = 5.0  # clamp the x0 prediction to [-clip_x0, clip_x0] while sampling; 0 = off (MAR)


def cosine_alpha_bar(num_steps: int) -> torch.Tensor:
    """alpha_bar_t for t = 1..T of IDDPM's cosine schedule (Nichol & Dhariwal eq. 17), float64."""

    def f(t):
        return math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), 0.999) for i in range(num_steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)  # (T,)


def timestep_embedding(t_N: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer) timesteps, as in DiT/MAR."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_N.device) / half)  # (half,)
    args = t_N.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """LN -> modulate(shift, scale) -> Linear -> SiLU -> Linear; gate * h + residual."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x_NW, y_NW):
        shift, scale, gate = self.ada(y_NW).chunk(3, dim=-1)  # 3 x (N, W)
        return x_NW + gate * self.mlp(modulate(self.norm(x_NW), shift, scale))


class EpsNet(nn.Module):
    """SimpleMLPAdaLN: eps(x_t, t, z); adaLN and output layers zero-initialised (eps = 0 at init)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        for lin in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x_NC, t_N, cond_NW):
        y_NW = self.time_embed(timestep_embedding(t_N, 256).to(x_NC.dtype)) + self.cond_embed(cond_NW)
        h_NW = self.input_proj(x_NC)
        for blk in self.blocks:
            h_NW = blk(h_NW, y_NW)
        shift, scale = self.final_ada(y_NW).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h_NW), shift, scale))  # (N, C)

    def modulations(self, t_S: torch.Tensor, cond_RW: torch.Tensor) -> list:
        """Everything of :meth:`forward` that depends on (t, cond) only, for the S timesteps of a
        reverse chain at once: per step, each block's (shift, 1 + scale, gate) and the final
        (shift, 1 + scale), (R, W) each. A chain calls this once and :meth:`forward_modulated`
        per step, so the time embedding and depth + 4 of the 3 depth + 6 linears leave its
        sequential loop (batch 1 is per-op overhead: ~half the ops of a step). The same
        function as :meth:`forward` up to float rounding (a linear over S R rows rounds as it
        likes, not as S calls over R rows)."""
        temb_SW = self.time_embed(timestep_embedding(t_S, 256).to(cond_RW.dtype))  # (S, W)
        y_SRW = temb_SW[:, None] + self.cond_embed(cond_RW)[None]  # (S, R, W)
        per_block = []
        for blk in self.blocks:
            shift, scale, gate = blk.ada(y_SRW).chunk(3, dim=-1)  # 3 x (S, R, W)
            per_block.append((shift.unbind(0), (1 + scale).unbind(0), gate.unbind(0)))
        shift, scale = self.final_ada(y_SRW).chunk(2, dim=-1)
        final = (shift.unbind(0), (1 + scale).unbind(0))
        return [
            ([(sh[k], sc[k], ga[k]) for sh, sc, ga in per_block], (final[0][k], final[1][k]))
            for k in range(len(t_S))
        ]

    def forward_modulated(self, x_RC: torch.Tensor, step) -> torch.Tensor:
        """:meth:`forward` at one step of :meth:`modulations` (functional calls: no module
        dispatch per layer)."""
        h_RW = F.linear(x_RC, self.input_proj.weight, self.input_proj.bias)
        W = (self.width,)
        for blk, (shift, scale1, gate) in zip(self.blocks, step[0]):
            n = F.layer_norm(h_RW, W, blk.norm.weight, blk.norm.bias, blk.norm.eps)
            l1, l2 = blk.mlp[0], blk.mlp[2]
            a = F.silu(F.linear(torch.addcmul(shift, n, scale1), l1.weight, l1.bias))
            m = F.linear(a, l2.weight, l2.bias)
            h_RW = torch.addcmul(h_RW, gate, m)
        shift, scale1 = step[1]
        n = F.layer_norm(h_RW, W, None, None, self.final_norm.eps)
        return F.linear(torch.addcmul(shift, n, scale1), self.out.weight, self.out.bias)  # (R, C)


def _guided(eps_c, eps_u, w, plain_N1=None):
    """Classifier-free guidance eps_u + w (eps_c - eps_u), w a float or (N, 1) per row; rows
    marked in ``plain_N1`` (w == 1) take eps_c itself, so a per-row scale equals per-row scalar
    calls. (N, C)"""
    mixed = eps_u + w * (eps_c - eps_u)
    return mixed if plain_N1 is None else torch.where(plain_N1, eps_c, mixed)


class DiffusionHead(nn.Module):
    """Per-token DDPM head: eps-MSE loss, respaced ancestral sampler with temperature and CFG."""

    def __init__(self, cfg: DiffusionHeadConfig, token_dim: int, cond_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_dim = token_dim
        self.num_sampling_steps = int(cfg.num_sampling_steps)
        self.net = EpsNet(token_dim, cond_dim, cfg.width, cfg.depth)
        abar = cosine_alpha_bar(cfg.num_train_steps)  # (T,)
        self.register_buffer("alpha_bar", abar.float(), persistent=False)
        self._respaced = {}
        # reverse-step variance while sampling (:meth:`schedule`): a sampling choice, not a config
        # field, so trained runs keep their config; CSpD's ``variance`` and benchmarks set it
        self.sample_variance = "beta_tilde"

    def schedule(self, num_steps: int, variance: str | None = None):
        """Respaced chain on ``num_steps`` evenly spaced training timesteps (ADM's space_timesteps).

        Returns (t_S, abar_S, coef_x0_S, coef_xt_S, std_S) in float64, index 0 = least noisy.
        ``variance`` (default ``self.sample_variance``): ``beta_tilde``, the posterior variance with ADM's
        clipped value at the last step; or ``beta``, DDPM's upper bound sigma^2 = beta. They
        differ at the last steps only: at the second-to-last step (t_1 -> t_0) beta_tilde is
        ~(1 - abar_0) ~ 4e-5 (std 0.0064) where beta is ~(1 - abar_1) (std 0.078 at 25 steps):
        the chain's big final jump then keeps noise of that size (a different sampler of the
        same model; CSpD's path verification accepts far more with it, see cspd_sampler).
        """
        variance = variance or self.sample_variance
        if variance not in ("beta_tilde", "beta"):
            raise ValueError(f"head variance must be beta_tilde or beta, got {variance!r}")
        key = (num_steps, variance)
        if key not in self._respaced:
            T = self.cfg.num_train_steps
            t_S = torch.linspace(0, T - 1, num_steps, dtype=torch.float64).round().long()  # (S,)
            abar = cosine_alpha_bar(T)[t_S]  # (S,)
            abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
            beta = 1 - abar / abar_prev  # respaced betas
            # posterior q(x_{t-1} | x_t, x0) (DDPM eq. 7)
            coef_x0 = beta * abar_prev.sqrt() / (1 - abar)
            coef_xt = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
            var = beta * (1 - abar_prev) / (1 - abar)
            var[0] = var[1] if num_steps > 1 else beta[0]  # ADM's clipped log-variance: never 0
            if variance == "beta":
                var = beta.clone()
            self._respaced[key] = (t_S, abar, coef_x0, coef_xt, var.sqrt())
        return self._respaced[key]

    def loss(self, target_NC: torch.Tensor, cond_NW: torch.Tensor) -> torch.Tensor:
        """eps-prediction MSE at uniform t; each pair repeated ``diffusion_batch_mul`` times."""
        m = self.cfg.diffusion_batch_mul
        x0 = target_NC.repeat(m, 1)  # (mN, C)
        cond = cond_NW.repeat(m, 1)  # (mN, W)
        t = torch.randint(0, self.cfg.num_train_steps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        abar = self.alpha_bar[t][:, None]  # (mN, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        return F.mse_loss(self.net(x_t, t, cond), eps)

    def _eps(self, x_NC, t_int, cond_NW, cfg_scale, cond_uncond_NW):
        """Guided eps: eps_u + w (eps_c - eps_u); w a float or a (N,) tensor (one scale per row).

        Rows with w == 1 take eps_c itself, so a per-row scale equals per-row scalar calls.
        ``t_int`` is one timestep for every row, or a (N,) tensor of per-row timesteps.
        """
        if torch.is_tensor(t_int) and t_int.dim() == 1:
            t_N = t_int
        else:
            t_N = torch.full((x_NC.shape[0],), int(t_int), device=x_NC.device)
        per_row = torch.is_tensor(cfg_scale)
        if cond_uncond_NW is None or (not per_row and cfg_scale == 1.0):
            return self.net(x_NC, t_N, cond_NW)
        eps_2N = self.net(
            torch.cat([x_NC, x_NC]), torch.cat([t_N, t_N]), torch.cat([cond_NW, cond_uncond_NW])
        )
        eps_c, eps_u = eps_2N.chunk(2)
        if not per_row:
            return _guided(eps_c, eps_u, cfg_scale)
        w_N1 = cfg_scale.to(eps_c)[:, None]  # (N, 1)
        return _guided(eps_c, eps_u, w_N1, w_N1 == 1.0)

    def _step_mean(self, x, eps, i, sched):
        """Posterior mean of reverse step i (0 = last) from x at t_S[i] and its eps; ``i`` an int
        or, with (S, 1, 1) coefficient tables in ``sched``, broadcast over a whole path."""
        sq1m, sqa, c0, ct = sched  # sqrt(1 - abar), sqrt(abar), posterior coefficients
        x0_pred = (x - sq1m[i] * eps) / sqa[i]
        if self.cfg.clip_x0 > 0:  # near t = T, 1 / sqrt(abar) ~ 2e4 amplifies any eps error
            x0_pred = x0_pred.clamp(-self.cfg.clip_x0, self.cfg.clip_x0)
        return c0[i] * x0_pred + ct[i] * x  # (N, C)

    def _chain_eps(self, t_chain, cond_NW, cfg_scale, cond_uncond_NW):
        """eps(x, k) at step k of a reverse chain whose timesteps are ``t_chain`` (noisiest
        first), guided as :meth:`_eps`. An :class:`EpsNet` does its (t, cond)-only work for every
        step here, once (:meth:`EpsNet.modulations`); any other net (an oracle in the tests) is
        called per step through :meth:`_eps`, the reference this path equals up to rounding."""
        per_row = torch.is_tensor(cfg_scale)
        if not isinstance(self.net, EpsNet):
            return lambda x, k: self._eps(x, t_chain[k], cond_NW, cfg_scale, cond_uncond_NW)
        net = self.net
        if cond_uncond_NW is None or (not per_row and cfg_scale == 1.0):
            steps = net.modulations(t_chain, cond_NW)
            return lambda x, k: net.forward_modulated(x, steps[k])
        steps = net.modulations(t_chain, torch.cat([cond_NW, cond_uncond_NW]))  # (2N rows)
        if per_row:
            w_N1 = cfg_scale.to(cond_NW)[:, None]  # (N, 1)
            plain_N1 = w_N1 == 1.0

        def eps(x, k):
            eps_c, eps_u = net.forward_modulated(torch.cat([x, x]), steps[k]).chunk(2)
            return _guided(eps_c, eps_u, w_N1, plain_N1) if per_row else _guided(eps_c, eps_u, cfg_scale)

        return eps

    def reverse_trajectory(
        self,
        cond_NW,
        x_T_NC,
        noises_SNC,
        temperature=1.0,
        cfg_scale=1.0,
        cond_uncond_NW=None,
        return_path=False,
        variance=None,
    ) -> dict:
        """The ancestral chain from the caller's x_T with the caller's per-step noises.

        ``x_T_NC`` is unit noise: the chain starts at ``temperature * x_T_NC`` (module docstring).
        noises_SNC[k] is used at the k-th reverse step (k = 0 noisiest, S-1 last). The last
        step is stochastic: x0 = mean_last + std_last * noises_SNC[-1]; sum_log_std sums
        log(temperature * sigma) over the S-1 earlier steps and the C dims (-inf at temperature 0).
        ``cfg_scale`` is a float or a (N,) tensor of per-row guidance scales (with
        ``cond_uncond_NW``); under guidance ``mean_last`` is the guided mean, the mean of the
        Gaussian the last step actually samples. ``return_path`` adds ``path`` (S, N, C), the
        state each step starts from (temperature * x_T first), and ``means`` (S, N, C), each step's mean:
        the draft's side of CSpD's path verification (:meth:`path_means`). ``variance``: see
        :meth:`schedule`.
        """
        S = noises_SNC.shape[0]
        t_S, abar_S, c0_S, ct_S, std_S = self.schedule(S, variance)
        # per step k (chain order): x0 = (x - a_k eps) / b_k, clamped; mean = c0_k x0 + ct_k x
        a_S = [math.sqrt(1 - a) for a in abar_S.flip(0).tolist()]
        inv_b_S = [1 / math.sqrt(a) for a in abar_S.flip(0).tolist()]
        c0_k, ct_k = c0_S.flip(0).tolist(), ct_S.flip(0).tolist()
        std_k = [temperature * s for s in std_S.flip(0).tolist()]
        if torch.is_tensor(cfg_scale) and bool((cfg_scale == 1.0).all()):
            cfg_scale = 1.0  # no guided row: the plain conditional chain
        eps_at = self._chain_eps(t_S.flip(0).to(x_T_NC.device), cond_NW, cfg_scale, cond_uncond_NW)
        clip = self.cfg.clip_x0
        x = temperature * x_T_NC if temperature != 1.0 else x_T_NC  # (N, C)
        path, means = [], []
        for k in range(S):
            x0 = torch.add(x, eps_at(x, k), alpha=-a_S[k]).mul_(inv_b_S[k])  # (N, C)
            if clip > 0:  # near t = T, 1 / sqrt(abar) ~ 2e4 amplifies any eps error
                x0.clamp_(-clip, clip)
            mean = torch.add(x0.mul_(c0_k[k]), x, alpha=ct_k[k])  # (N, C)
            if return_path:
                path.append(x)
                means.append(mean)
            if k < S - 1:
                x = torch.add(mean, noises_SNC[k], alpha=std_k[k])
        # isotropic Gaussian steps: the log-det term is C log(std) per row and step
        logs = [math.log(s) if s > 0 else -math.inf for s in std_k[:-1]]
        std = std_k[-1]
        std_last = torch.full((x.shape[0], 1), std, dtype=x.dtype, device=x.device)
        out = {
            "x0": torch.add(mean, noises_SNC[-1], alpha=std),
            "mean_last": mean,
            "std_last": std_last,
            "sum_log_std": x.new_full((x.shape[0],), x.shape[1] * math.fsum(logs) if logs else 0.0),
        }
        if return_path:
            out["path"], out["means"] = torch.stack(path), torch.stack(means)  # (S, N, C) each
        return out

    def step_stds(self, num_steps: int, temperature: float = 1.0, variance=None) -> torch.Tensor:
        """(S,) std of each reverse step in chain order (k = 0 noisiest), float64."""
        return temperature * self.schedule(num_steps, variance)[4].flip(0)

    def path_means(self, cond_NW, path_SNC, cfg_scale=1.0, cond_uncond_NW=None) -> torch.Tensor:
        """Every step's mean (S, N, C) along a given path (states as ``reverse_trajectory``'s
        ``path``), in ONE batched network call over the S N (state, timestep) pairs: the step
        densities of this head along another head's chain, CSpD's path verification."""
        S, N, C = path_SNC.shape
        t_S, abar_S, c0_S, ct_S, _ = self.schedule(S)
        flip = lambda v: v.flip(0).to(path_SNC)[:, None, None]  # noqa: E731  chain order, (S, 1, 1)
        sched = (flip((1 - abar_S).sqrt()), flip(abar_S.sqrt()), flip(c0_S), flip(ct_S))
        t_SN = t_S.flip(0).to(path_SNC.device)[:, None].expand(S, N).reshape(S * N)
        rep = lambda z: None if z is None else z.repeat(S, 1)  # noqa: E731  (S N, W)
        w = cfg_scale.repeat(S) if torch.is_tensor(cfg_scale) else cfg_scale
        if torch.is_tensor(w) and bool((w == 1.0).all()):
            w = 1.0
        eps = self._eps(path_SNC.reshape(S * N, C), t_SN, rep(cond_NW), w, rep(cond_uncond_NW))
        return self._step_mean(path_SNC, eps.view(S, N, C), slice(None), sched)  # (S, N, C)

    @torch.no_grad()
    def sample(self, cond_NW, generator, num_steps=None, temperature=1.0, cfg_scale=1.0, cond_uncond_NW=None):
        """Respaced ancestral sampling; noise order as in the module docstring."""
        S = int(num_steps or self.num_sampling_steps)
        shape = (cond_NW.shape[0], self.token_dim)
        kw = {"generator": generator, "device": cond_NW.device, "dtype": cond_NW.dtype}
        x_T = torch.randn(shape, **kw)
        noises = torch.stack([torch.randn(shape, **kw) for _ in range(S)])  # (S, N, C)
        out = self.reverse_trajectory(cond_NW, x_T, noises, temperature, cfg_scale, cond_uncond_NW)
        return out["x0"]


@HEADS.register("mar_diffusion", DiffusionHeadConfig)
def build_diffusion_head(cfg, token_dim: int, cond_dim: int) -> DiffusionHead:
    return DiffusionHead(DiffusionHeadConfig(**dict(cfg)), token_dim, cond_dim)
