"""Flow-matching head for continuous tokens (xAR, arXiv:2502.20388).

Like MAR's diffusion head (:mod:`vargen.heads.diffusion`) this head owns its loss and its
sampler; the backbone only gives a condition vector z per token. The path is the linear
(rectified-flow) one with t = 1 at noise: x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0.
Training draws t from a logit-normal (SD3 / xAR), sampling integrates from t = 1 to t = 0 with
Euler (ODE) or Euler-Maruyama (SDE). The network is the same zero-initialised AdaLN MLP as the
MAR head (``EpsNet``, time fed as 1000 t), so the head predicts v = 0 at initialisation.

The SDE uses the marginal-preserving reverse drift v - (g^2 / 2) * score with g(t)^2 = t
(SiT's choice up to scale), the score from the velocity as score = -(x + (1 - t) v) / t, and
no noise on the last step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vargen.heads.diffusion import EpsNet
from vargen.registry import HEADS

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x_NC, t) -> v_NC


@dataclass
class FlowHeadConfig:
    name: str = "flow"
    width: int = 128
    depth: int = 3
    num_sampling_steps: int = 25
    batch_mul: int = 4  # each (z, target) pair repeated with fresh t and eps (MAR's trick)
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    sde: bool = False  # sampler: Euler ODE (false) or Euler-Maruyama SDE (true)


def euler_ode(velocity: Velocity, x1_NC: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0 in ``steps`` uniform Euler steps."""
    x, h = x1_NC, 1.0 / steps
    for i in range(steps):
        t = 1.0 - i * h
        x = x - h * velocity(x, t)
    return x


def euler_maruyama(velocity: Velocity, x1_NC: torch.Tensor, steps: int, generator) -> torch.Tensor:
    """Reverse SDE with g(t)^2 = t: x <- x - h (v - t/2 * score) + sqrt(t h) xi; last step noiseless."""
    x, h = x1_NC, 1.0 / steps
    for i in range(steps):
        t = 1.0 - i * h
        v = velocity(x, t)
        score = -(x + (1.0 - t) * v) / t  # -E[eps | x_t] / t, with E[eps | x_t] = x + (1 - t) v
        x = x - h * (v - 0.5 * t * score)
        if i < steps - 1:
            xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(t * h) * xi
    return x


class FlowHead(nn.Module):
    def __init__(self, cfg: FlowHeadConfig, token_dim: int, cond_dim: int):
        super().__init__()
        if cfg.num_sampling_steps < 1 or cfg.batch_mul < 1:
            raise ValueError("head.num_sampling_steps and head.batch_mul must be >= 1")
        self.cfg, self.token_dim = cfg, token_dim
        self.num_sampling_steps = int(cfg.num_sampling_steps)
        self.net = EpsNet(token_dim, cond_dim, cfg.width, cfg.depth)

    def velocity(self, x_NC, t: torch.Tensor | float, cond_NW) -> torch.Tensor:
        t_N = torch.as_tensor(t, dtype=x_NC.dtype, device=x_NC.device).expand(x_NC.shape[0])
        return self.net(x_NC, 1000.0 * t_N, cond_NW)  # (N, C)

    def loss(self, target_NC: torch.Tensor, cond_NW: torch.Tensor) -> torch.Tensor:
        """Velocity MSE on the linear path, t ~ logit-normal."""
        m = self.cfg.batch_mul
        x0, cond = target_NC.repeat(m, 1), cond_NW.repeat(m, 1)  # (mN, C), (mN, W)
        u = torch.randn(x0.shape[0], 1, device=x0.device, dtype=x0.dtype)
        t = torch.sigmoid(self.cfg.logit_normal_mean + self.cfg.logit_normal_std * u)  # (mN, 1)
        eps = torch.randn_like(x0)
        x_t = (1 - t) * x0 + t * eps
        return F.mse_loss(self.velocity(x_t, t[:, 0], cond), eps - x0)

    @torch.no_grad()
    def sample(self, cond_NW, generator, num_steps=None, temperature=1.0, cfg_scale=1.0, cond_uncond_NW=None):
        """x_1 = temperature * eps, then the ODE (or SDE); CFG mixes velocities, both halves share x."""
        steps = int(num_steps or self.num_sampling_steps)
        kw = {"generator": generator, "device": cond_NW.device, "dtype": cond_NW.dtype}
        x1 = temperature * torch.randn((cond_NW.shape[0], self.token_dim), **kw)
        guided = cond_uncond_NW is not None and cfg_scale != 1.0

        def v(x, t):
            if not guided:
                return self.velocity(x, t, cond_NW)
            v_c, v_u = self.velocity(torch.cat([x, x]), t, torch.cat([cond_NW, cond_uncond_NW])).chunk(2)
            return v_u + cfg_scale * (v_c - v_u)

        if self.cfg.sde:
            return euler_maruyama(v, x1, steps, generator)
        return euler_ode(v, x1, steps)


@HEADS.register("flow", FlowHeadConfig)
def build_flow_head(cfg, token_dim: int, cond_dim: int) -> FlowHead:
    return FlowHead(FlowHeadConfig(**dict(cfg)), token_dim, cond_dim)
