"""Minority guidance (Um et al., ICLR'24): minority score, quantile levels, guided sampling.

Minority score of clean x0 (spec 3a.1): mean over n_iter noisings at step t of d(x0, x0_hat(x_t)),
with d = squared L2 or a perceptual distance (any callable (B, ...) x2 -> (B,), e.g. the
digits feature net). Levels are quantile bins (higher = more unique). Guidance toward level c*
(score form): eps_tilde = eps - sqrt(1 - abar_t) w grad log p(c* | x_t, t) (a v-model is
converted to eps first, see denoiser.py). ``minority_scores`` scores images (N, C, H, W) in [0, 1]
under a trained image denoiser; the noisy level classifier is in vargen/models/minority_classifier.py.
``QuadratureOracle`` gives the exact classifier gradient for 1-D data by quadrature, for tests
without training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vargen.diffusion.denoiser import predict_x0, to_eps


def minority_score(x0, x0_hat_fn, abar, t: int, generator, n_iter: int = 5, distance=None):
    """(B,) mean distance between x0 (B, ...) and its Tweedie reconstruction from x_t."""
    a = abar[t].to(x0.device)
    total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for _ in range(n_iter):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=generator.device)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise.to(x0.device)
        rec = x0_hat_fn(x_t, t)
        d = ((x0 - rec) ** 2).flatten(1).sum(1) if distance is None else distance(x0, rec)
        total += d.double()
    return total / n_iter


def minority_scores(
    images01: torch.Tensor,
    denoiser,
    generator: torch.Generator,
    t: int = 605,
    n_iter: int = 5,
    distance: str | Callable = "l2",
    feature_net=None,
    batch_size: int = 256,
    clip: bool = True,
) -> torch.Tensor:
    """(N,) minority scores of images (N, C, H, W) in [0, 1] under a trained image denoiser.

    Images go to model space with ``denoiser.data_to_x`` (x = 2 image - 1 for a denoiser without
    one, e.g. the analytic ones, with ``x_to_data`` its inverse); x0_hat is the Tweedie estimate at step
    ``t`` (clamped to [-1, 1] when ``clip``, as the reference's clipped ``pred_xstart``), in
    batches of ``batch_size`` with noise from ``generator``. ``distance``: ``"l2"`` (squared L2 in
    model space), ``"perceptual"`` (squared L2 between ``feature_net`` features of both images in
    [0, 1], e.g. the dataset's FID feature net) or any callable (B, ...) x2 -> (B,) on model space.
    """
    if not 0 <= t < denoiser.abar.shape[0]:
        raise ValueError(
            f"minority score step t={t} is outside the denoiser's grid [0, {denoiser.abar.shape[0]})"
        )
    if distance == "perceptual":
        if feature_net is None:
            raise ValueError("distance 'perceptual' needs a feature_net (e.g. vargen.eval.get_feature_net)")
        x_to_data = getattr(denoiser, "x_to_data", lambda x: (x + 1) / 2)

        def distance(x0, rec):
            f0, f1 = feature_net(x_to_data(x0).clamp(0, 1)), feature_net(x_to_data(rec).clamp(0, 1))
            return ((f0 - f1) ** 2).sum(1)  # (B,)

    elif distance == "l2":
        distance = None
    elif not callable(distance):
        raise ValueError(f"distance must be 'l2', 'perceptual' or a callable, got {distance!r}")
    data_to_x = getattr(denoiser, "data_to_x", lambda im: 2 * im - 1)
    params = list(denoiser.parameters()) if isinstance(denoiser, torch.nn.Module) else []
    device = params[0].device if params else torch.device("cpu")

    @torch.no_grad()
    def x0_hat(x_t, step):
        t_B = torch.full((x_t.shape[0],), step, dtype=torch.long, device=x_t.device)
        rec = predict_x0(denoiser, x_t, t_B)
        return rec.clamp(-1, 1) if clip else rec

    out = []
    for i in range(0, images01.shape[0], batch_size):
        x0 = data_to_x(images01[i : i + batch_size].to(device))  # (b, C, H, W) model space
        out.append(minority_score(x0, x0_hat, denoiser.abar, t, generator, n_iter, distance).cpu())
    return torch.cat(out)  # (N,) float64


def quantile_levels(scores: torch.Tensor, num_levels: int):
    """Labels in [0, L-1] (label k: q_{k-1} < l <= q_k, q_k = quantile((k+1)/L)) and thresholds (L,)."""
    q = torch.quantile(scores.double(), torch.arange(1, num_levels + 1, dtype=torch.float64) / num_levels)
    return assign_levels(scores, q), q


def assign_levels(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(thresholds, scores.double().contiguous()).clamp(max=len(thresholds) - 1)


class QuadratureOracle:
    """Exact grad_x log p(c | x_t, t) for 1-D data with density on a grid (spec 3c):
    (sqrt(abar)/(1-abar)) (E[x0 | x_t, x0 in A_c] - E[x0 | x_t])."""

    def __init__(self, grid, density, grid_levels, abar):
        self.grid, self.logp0 = grid.double(), density.double().clamp_min(1e-300).log()
        self.levels, self.abar = grid_levels, abar

    def grad_log_p(self, x: torch.Tensor, t: int, level: int) -> torch.Tensor:
        a = self.abar[t]
        loglik = -0.5 * (x.reshape(-1, 1) - a.sqrt() * self.grid) ** 2 / (1 - a)  # (N, G)
        post = torch.softmax(self.logp0 + loglik, dim=1)  # (N, G) p(x0 | x_t)
        mask = (self.levels == level).double()
        post_c = post * mask / (post * mask).sum(1, keepdim=True).clamp_min(1e-300)
        diff = (post_c * self.grid).sum(1) - (post * self.grid).sum(1)
        return (a.sqrt() / (1 - a) * diff).reshape(x.shape)


def guided_eps_fn(
    model_fn: Callable, kind: str, grad_fn: Callable, level: int, w: float, abar: torch.Tensor
) -> Callable:
    """An eps function (x, t (B,) long) -> eps with minority guidance toward ``level`` at scale w."""

    def eps(x, t_B):
        t = int(t_B[0])
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        e = to_eps(model_fn(x, t_B), kind, x, a, s)
        return e if w == 0 else e - s * w * grad_fn(x, t, level)

    return eps
