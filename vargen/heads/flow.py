"""Flow matching for continuous tokens: the path, the time law and the solvers of xAR
(arXiv:2502.20388), and a per-token flow head.

Path (SiT / xAR convention, t = 1 at noise): x_t = (1 - t) x_0 + t eps, velocity v = eps - x_0.
Training times are logit-normal, t = sigmoid(N(0, 1)) (:func:`logit_normal`). Two users:

- the xAR backbone itself (:class:`vargen.models.xar.XAR`, ``denoiser: backbone``, the paper's
  design): the transformer predicts the velocity of a whole entity and these solvers integrate it;
- :class:`FlowHead` (``denoiser: head``): MAR's split with a flow loss instead of DDPM, a small
  AdaLN MLP (the MAR head's ``EpsNet``, time fed as 1000 t, zero-initialised so v = 0 at init)
  that models each token alone given its condition vector z.

Solvers (as OliverRensu/xAR ``models/sampler.py``):

- :func:`euler_maruyama` (default): the reverse SDE with diffusion g(t)^2 = 2 t, drift
  v - (g^2 / 2) score, the score from the velocity, score = -(x + (1 - t) v) / t, on the grid
  linspace(1, 0.04, n) then 0: n - 1 stochastic steps and a last deterministic step 0.04 -> 0.
  Its last step leaves a bias that more steps do not remove, small for wide targets and large
  for narrow ones (std of N(m, s^2) at many steps: -1.5% at s = 0.5, -2% at 0.4, -3% at 0.3,
  -22% at 0.1).
- :func:`euler_ode`: dx/dt = v on the uniform grid linspace(1, 0, n + 1); converges as 1/n.

``DEFAULT_STEPS`` keeps the std of a 1-D Gaussian target N(1.5, 0.5^2) within 2% with the exact
velocity (SDE 50 steps: -1.4%; ODE 100 steps: -1.6%; 25 ODE steps gave -5%; tests/test_xar.py).

Temperature (one meaning for every sampler here and for the MAR head, :mod:`vargen.heads.diffusion`):
tau multiplies every Gaussian draw of the sampler, the start noise x_1 = tau eps and each step's
injected noise. The solvers are affine in those draws when the velocity is affine in x, as it is
for a Gaussian target, so there a sample is m + tau (x - m) with x a tau = 1 sample and m the
noise-free output: the spread about the mean scales by exactly tau (tested for the ODE, the SDE
and the MAR head's chain). For other targets tau < 1 concentrates samples, MAR's use of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vargen.heads.diffusion import EpsNet
from vargen.registry import HEADS

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x, t) -> v, same shape as x
SOLVERS = ("sde", "ode")
DEFAULT_STEPS = {"sde": 50, "ode": 100}  # the xAR reference evaluates L/H with 50 SDE steps
SDE_LAST_T = 0.04  # where the reference's stochastic steps stop


def logit_normal(shape, device, mean: float = 0.0, std: float = 1.0, generator=None) -> torch.Tensor:
    """Training times t = sigmoid(mean + std * N(0, 1)) of the given shape (xAR / SD3)."""
    u = torch.randn(shape, device=device, generator=generator)
    return torch.sigmoid(mean + std * u)


def sde_time_grid(steps: int) -> list[float]:
    """The reference's Euler-Maruyama grid: linspace(1, 0.04, steps) then 0 (steps + 1 points)."""
    if steps < 2:
        raise ValueError(f"the SDE needs at least 2 steps (its last step is 0.04 -> 0), got {steps}")
    return torch.linspace(1.0, SDE_LAST_T, steps, dtype=torch.float64).tolist() + [0.0]


def euler_ode(velocity: Velocity, x1: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0 in ``steps`` uniform Euler steps (``steps`` calls)."""
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = x1
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * velocity(x, t)
    return x


def euler_maruyama(
    velocity: Velocity, x1: torch.Tensor, steps: int, generator, temperature: float = 1.0
) -> torch.Tensor:
    """The reverse SDE with g(t)^2 = 2 t on :func:`sde_time_grid` (``steps`` velocity calls):
    x <- x + dt (v - t score) + temperature sqrt(2 t |dt|) xi, the last step (0.04 -> 0) without
    noise. ``x1`` is the start state (already scaled by the temperature)."""
    ts = sde_time_grid(steps)
    x = x1
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t
        v = velocity(x, t)
        score = -(x + (1.0 - t) * v) / t  # -E[eps | x_t] / t, with E[eps | x_t] = x + (1 - t) v
        x = x + dt * (v - t * score)  # drift v - (g^2 / 2) score, g^2 = 2 t
        if i < steps - 1:
            xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + temperature * (2.0 * t * abs(dt)) ** 0.5 * xi
    return x


def integrate(velocity: Velocity, eps: torch.Tensor, steps: int, solver: str, generator, temperature=1.0):
    """x_0 from unit start noise ``eps``: x_1 = temperature * eps, then ``solver`` (sde | ode)."""
    if solver not in SOLVERS:
        raise ValueError(f"flow solver must be one of {SOLVERS}, got {solver!r}")
    x1 = temperature * eps
    if solver == "sde":
        return euler_maruyama(velocity, x1, steps, generator, temperature)
    return euler_ode(velocity, x1, steps)


@dataclass
class FlowHeadConfig:
    name: str = "flow"
    width: int = 128
    depth: int = 3
    num_sampling_steps: int = 50
    batch_mul: int = 4  # each (z, target) pair repeated with fresh t and eps (MAR's trick)
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    sde: bool = True  # sampler: Euler-Maruyama SDE (true, xAR's) or the Euler ODE (false)


class FlowHead(nn.Module):
    """Per-token flow head (MAR's split, see the module docstring): each token is drawn alone
    given its z, so the tokens of one entity are conditionally independent."""

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
        t = logit_normal((x0.shape[0], 1), x0.device, self.cfg.logit_normal_mean, self.cfg.logit_normal_std)
        eps = torch.randn_like(x0)
        x_t = (1 - t) * x0 + t * eps  # (mN, C)
        return F.mse_loss(self.velocity(x_t, t[:, 0], cond), eps - x0)

    @torch.no_grad()
    def sample(self, cond_NW, generator, num_steps=None, temperature=1.0, cfg_scale=1.0, cond_uncond_NW=None):
        """:func:`integrate` from eps ~ N(0, I) (drawn first); CFG mixes velocities, both halves share x."""
        steps = int(num_steps or self.num_sampling_steps)
        kw = {"generator": generator, "device": cond_NW.device, "dtype": cond_NW.dtype}
        eps = torch.randn((cond_NW.shape[0], self.token_dim), **kw)
        guided = cond_uncond_NW is not None and cfg_scale != 1.0

        def v(x, t):
            if not guided:
                return self.velocity(x, t, cond_NW)
            v_c, v_u = self.velocity(torch.cat([x, x]), t, torch.cat([cond_NW, cond_uncond_NW])).chunk(2)
            return v_u + cfg_scale * (v_c - v_u)

        return integrate(v, eps, steps, "sde" if self.cfg.sde else "ode", generator, temperature)


@HEADS.register("flow", FlowHeadConfig)
def build_flow_head(cfg, token_dim: int, cond_dim: int) -> FlowHead:
    return FlowHead(FlowHeadConfig(**dict(cfg)), token_dim, cond_dim)
