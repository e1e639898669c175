"""TTS-VAR: test-time search over a next-scale model (Chen et al., NeurIPS 2025, arXiv:2507.18537).

Follows ali-vilab/TTS-VAR (``utils_model.py::cus_autoregressive_infer_cfg_dino``). Per
requested label the search
starts ``b_0 * N`` candidates and walks the scales with a descending batch schedule
``b_k * N`` (``b_k`` candidates *survive* scale k). Where the schedule drops
(``b_k < b_{k-1}``), scale k is decoded with the ``b_{k-1} * N`` surviving candidates
first, and only then is every candidate's image (decoded from ``f_hat`` after scales
0..k) looked at and ``b_k * N`` kept: the reference's order (it samples scale ``si`` with
``bs_sis[si-1]`` rows, decodes, then clusters or resamples to ``bs_sis[si]``). Selecting
before scale k instead would judge scale-0 images of 1x1 tokens, whose reward does not
predict the final one.

- **clustering** (diversity search) at coarse scales, ``k / (K - 1) < switch``: features of
  each image (default: the dataset's FID feature net's last conv map as patch tokens),
  reduced to a PCA "layout map" (per image: centre the tokens, project them on their
  first principal component) or mean-pooled; k-means into ``b_k * N`` clusters; keep the
  member nearest each centroid (distinct indices, one per cluster);
- **resampling** (potential selection) at fine scales: a reward ``s`` on the images is
  appended to each candidate's history, a potential ``phi`` is read from it (VALUE = s,
  DIFF = s - s_prev, MAX and SUM over the history), and ``b_k * N`` indices are drawn
  multinomially with replacement with weights ``exp(lam * phi)`` (importance resampling
  toward ``p(x) exp(lam r(x))``); weights that are not finite or sum to zero fall back to
  uniform.

After the last scale the candidate with the highest reward wins (the rewards of a
resampling at the last scale are reused: they score the same final images). Candidates' state
(ids, summed codes, next input, KV cache, labels, reward history) is gathered by batch
index (:meth:`VARState.gather`); every label's candidates sit in one batch, so the model
runs one forward per scale for all labels together.

Defaults: the reference's schedule (8, 8, 6, 6, 6, 4, 2, 2, 2, 1, 1, 1, 1) over Infinity's
13 scales is resampled to our K scales (scale k takes entry round(12 k / (K - 1))), and
its split (clustering at scales 2 and 5 of 12, resampling at 6 and 9) becomes
``switch = 0.5``. Where the reference differs: it asserts that only VALUE is used and
never records a history; here all four potentials run on a recorded history. With a
constant schedule nothing is selected, and with N = 1 the output equals plain sampling
(same generator, same ids); a constant schedule of N is best-of-N (:class:`BestOfN`), and
so is (M, ..., M, 1) with resampling at the last scale and a large ``lam``: the M full
images are scored, then one is drawn (the argmax).

Compute is counted per network, in rows pushed through it: ``candidate_forwards``
(candidates through the AR model, summed over scales), ``ar_rows`` (the same with the
unconditional rows of guidance), ``token_forwards`` (candidates weighted by the scale's
token count, a FLOP proxy), ``decoded_images`` (tokenizer decodes), ``feature_images``
(feature-net passes for clustering) and ``reward_images`` (reward-net passes);
``network_passes`` sums ``ar_rows`` and the three image counts. On small models the
decodes and the reward dominate, so wall time is reported beside the counts:
``seconds`` in all and ``seconds_ar``, ``seconds_decode``, ``seconds_features``,
``seconds_reward``. ``target_forwards`` counts batched model calls.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from vargen.eval.feature_net import get_feature_net
from vargen.registry import SAMPLERS
from vargen.sampling.base import Sampler
from vargen.sampling.decoders.var import decode_scale, start_state
from vargen.sampling.stats import new_stats

REFERENCE_SCHEDULE = (8, 8, 6, 6, 6, 4, 2, 2, 2, 1, 1, 1, 1)  # b_k / N over Infinity's 13 scales
POTENTIALS = ("value", "diff", "max", "sum")
COUNTS = (
    "candidate_forwards",
    "ar_rows",
    "token_forwards",
    "decoded_images",
    "feature_images",
    "reward_images",
)
TIMES = ("seconds_ar", "seconds_decode", "seconds_features", "seconds_reward")


def default_schedule(num_scales: int) -> list[int]:
    """The reference's schedule shape resampled to ``num_scales`` scales (multiples of N)."""
    last = len(REFERENCE_SCHEDULE) - 1
    if num_scales == 1:
        return [REFERENCE_SCHEDULE[-1]]
    return [REFERENCE_SCHEDULE[round(last * k / (num_scales - 1))] for k in range(num_scales)]


def selection_plan(schedule: list[int], switch: float) -> dict[int, str]:
    """Scale index -> "cluster" | "resample" for every scale where the schedule drops."""
    K = len(schedule)
    plan = {}
    for k in range(1, K):
        if schedule[k] < schedule[k - 1]:
            plan[k] = "cluster" if k / (K - 1) < switch else "resample"
    return plan


def check_schedule(schedule: list[int], num_scales: int) -> None:
    if len(schedule) != num_scales:
        raise ValueError(f"sampler.schedule has {len(schedule)} entries; the model has {num_scales} scales")
    if min(schedule) < 1 or any(b > a for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"sampler.schedule={list(schedule)} must be positive and non-increasing")


# ---------------------------------------------------------------------- selection rules


def layout_map(tokens_MTC: torch.Tensor) -> torch.Tensor:
    """Per image: centre its T tokens, project them on their first principal component: (M, T).

    A principal direction has no sign; the sign is fixed so that the largest-magnitude
    entry of each map is positive, which makes equal layouts give equal maps.
    """
    x = tokens_MTC.double() - tokens_MTC.double().mean(1, keepdim=True)  # (M, T, C)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (M, min(T, C), C)
    proj = (x @ vh[:, 0, :, None]).squeeze(-1)  # (M, T)
    peak = proj.gather(1, proj.abs().argmax(1, keepdim=True))  # (M, 1)
    return (proj * torch.where(peak < 0, -1.0, 1.0)).float()


def cluster_select(features_MF: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k distinct indices: k-means (k-means++ init, ``seed``), the member nearest each centroid.

    A cluster left without members (only possible with duplicate points) takes the
    not-yet-chosen point nearest its centroid, so k distinct indices always come back.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    M = features_MF.shape[0]
    if not 1 <= k <= M:
        raise ValueError(f"cannot keep {k} of {M} candidates by clustering")
    x = features_MF.detach().double().cpu().numpy().reshape(M, -1)
    if k == M:
        return torch.arange(M)
    with warnings.catch_warnings():  # duplicate candidates (coarse scales) are handled below
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, random_state=seed, n_init=1).fit(x)
    dist = ((x[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)  # (M, k)
    chosen: list[int] = []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        members = members[~np.isin(members, chosen)]
        if members.size == 0:
            members = np.setdiff1d(np.arange(M), chosen)
        chosen.append(int(members[dist[members, c].argmin()]))
    return torch.tensor(chosen)


def potential(history_MH: torch.Tensor, kind: str) -> torch.Tensor:
    """phi (M,) from rewards recorded at the scored scales, oldest first (H >= 1 columns).

    VALUE = latest reward; DIFF = latest - the one before (0 before the first record);
    MAX and SUM over the whole history.
    """
    if kind == "value":
        return history_MH[:, -1]
    if kind == "diff":
        prev = history_MH[:, -2] if history_MH.shape[1] > 1 else torch.zeros_like(history_MH[:, -1])
        return history_MH[:, -1] - prev
    if kind == "max":
        return history_MH.max(1).values
    if kind == "sum":
        return history_MH.sum(1)
    raise ValueError(f"sampler.potential must be one of {POTENTIALS}, got '{kind}'")


def resampling_weights(phi_M: torch.Tensor, lam: float) -> torch.Tensor:
    """softmax(lam * phi) (M,); uniform when that is not a finite distribution."""
    w = torch.softmax(lam * phi_M.double(), dim=0)
    if not torch.isfinite(w).all() or w.sum() <= 0:
        return torch.full_like(w, 1.0 / w.numel())
    return w


def resample_select(phi_M: torch.Tensor, k: int, lam: float, generator: torch.Generator) -> torch.Tensor:
    """k indices drawn with replacement with probabilities softmax(lam * phi)."""
    w = resampling_weights(phi_M, lam).to(generator.device)
    return torch.multinomial(w, k, replacement=True, generator=generator).cpu()


# ---------------------------------------------------------------------- rewards and features


def _import_callable(spec: str, key: str) -> Callable:
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"{key}='{spec}' must be 'classifier' or 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}='{spec}': cannot import it ({e})") from None


class ClassifierReward:
    """log p(requested class | image) under the dataset's FID feature net (offline)."""

    def __init__(self, net):
        self.net = net

    @torch.no_grad()
    def __call__(self, images, labels):
        logp = torch.log_softmax(self.net.logits(images.to(next(self.net.parameters()).device)), -1)
        return logp.gather(1, labels.to(logp.device)[:, None]).squeeze(1).cpu()  # (M,)


class ClassifierPatchTokens:
    """Patch tokens (M, h*w, C) of the dataset's FID feature net: clustering features."""

    def __init__(self, net):
        self.net = net

    @torch.no_grad()
    def __call__(self, images):
        return self.net.patch_tokens(images.to(next(self.net.parameters()).device)).cpu()


# ---------------------------------------------------------------------- the sampler


@dataclass
class TTSVARConfig:
    name: str = "tts_var"
    n: int = 2  # N: the schedule is in multiples of N; N candidates reach the last scale
    schedule: list[int] = field(default_factory=list)  # b_k per scale; empty = the reference's shape
    switch: float = 0.5  # a drop at k / (K - 1) < switch clusters, later drops resample
    features: str = "layout"  # layout (PCA first-component map) | pool (mean of patch tokens)
    feature_net: str = "classifier"  # or 'package.module:function', images -> (M, T, C) or (M, F)
    reward: str = "classifier"  # or 'package.module:function', (images, labels) -> scores (M,)
    potential: str = "value"  # value | diff | max | sum
    lam: float = 10.0  # weights exp(lam * potential)
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@SAMPLERS.register("tts_var", TTSVARConfig)
class TTSVAR(Sampler):
    """A sampler ``(model, cond_B, generator) -> (ids per scale, stats)`` searching per label.

    ``cfg`` a :class:`TTSVARConfig` (or its validated section); ``reward_fn`` / ``feature_fn``
    override the config's; where it says 'classifier', :meth:`setup` takes the feature net of
    the run's dataset."""

    def __init__(
        self, cfg: TTSVARConfig, reward_fn: Callable | None = None, feature_fn: Callable | None = None
    ):
        if cfg.n < 1:
            raise ValueError(f"sampler.n must be >= 1, got {cfg.n}")
        if cfg.features not in ("layout", "pool"):
            raise ValueError(f"sampler.features must be 'layout' or 'pool', got '{cfg.features}'")
        potential(torch.zeros(1, 1), cfg.potential)  # validates the name
        super().__init__(cfg)
        self.reward_fn = reward_fn or (
            None if cfg.reward == "classifier" else _import_callable(cfg.reward, "reward")
        )
        self.feature_fn = feature_fn or (
            None if cfg.feature_net == "classifier" else _import_callable(cfg.feature_net, "feature_net")
        )

    def setup(self, ctx) -> None:
        """Use the feature net of the run's dataset where the config says 'classifier'."""
        if self.reward_fn is None or self.feature_fn is None:
            net = get_feature_net(dict(ctx.run_cfg.data), ctx.device)
            self.reward_fn = self.reward_fn or ClassifierReward(net)
            self.feature_fn = self.feature_fn or ClassifierPatchTokens(net)

    def schedule(self, num_scales: int) -> list[int]:
        """b_k per scale, in multiples of N: the configured one or the reference's shape."""
        return list(self.cfg.schedule) or default_schedule(num_scales)

    def _features(self, images) -> torch.Tensor:
        f = self.feature_fn(images)
        if f.dim() == 3:  # patch tokens
            f = layout_map(f) if self.cfg.features == "layout" else f.mean(1)
        return f  # (M, F)

    @torch.no_grad()
    def __call__(self, model, cond_B: torch.Tensor, generator: torch.Generator, progress=False, slots=0):
        if self.reward_fn is None or self.feature_fn is None:
            raise RuntimeError("TTS-VAR needs a reward and features: pass them, or call setup(ctx)")
        c = self.cfg
        t0 = time.perf_counter()
        K, B = len(model.scales), cond_B.shape[0]
        per_n = self.schedule(K)
        check_schedule(per_n, K)
        sizes = [b * c.n for b in per_n]  # candidates per label at each scale
        plan = selection_plan(per_n, c.switch)
        warp = dict(cfg_scale=c.cfg_scale, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        tok = model.tokenizer
        state = start_state(model, cond_B.repeat_interleave(sizes[0]), c.cfg_scale)
        history = torch.zeros(B * sizes[0], 0)  # rewards recorded at resampling scales
        stats = {**new_stats(), **{key: 0 for key in COUNTS}, **{key: 0.0 for key in TIMES}}

        def timed(key, fn, *args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            stats[key] += time.perf_counter() - t
            return out

        def images_now():
            stats["decoded_images"] += state.batch
            return timed("seconds_decode", lambda: tok.decode_latent(state.f_hat).clamp(0, 1))

        def rewards(images):
            stats["reward_images"] += state.batch
            return timed("seconds_reward", lambda: self.reward_fn(images, state.cond_B).float().cpu())

        final_reward = None  # rewards of the final images, when a last-scale resampling scored them
        for k in tqdm(range(K), desc="scales", disable=not progress, leave=False):
            stats["candidate_forwards"] += state.batch  # sizes[k - 1]: selection comes after the decode
            stats["ar_rows"] += state.batch * (2 if state.guided else 1)
            stats["token_forwards"] += state.batch * model.scale_lengths[k]
            stats["target_forwards"] += 1
            timed("seconds_ar", decode_scale, model, state, generator, **warp)
            if k not in plan:
                continue
            M, keep = sizes[k - 1], sizes[k]  # keep `keep` of each label's M candidates
            images = images_now()  # scales 0..k
            if plan[k] == "cluster":
                stats["feature_images"] += state.batch
                feats = timed("seconds_features", self._features, images).view(B, M, -1)
                picks = [
                    cluster_select(feats[g], keep, int(torch.randint(2**31 - 1, (), generator=generator)))
                    for g in range(B)
                ]
            else:
                history = torch.cat([history, rewards(images)[:, None]], dim=1)
                phi = potential(history, c.potential).view(B, M)
                picks = [resample_select(phi[g], keep, c.lam, generator) for g in range(B)]
            index = torch.cat([g * M + p for g, p in enumerate(picks)])  # (B * keep,)
            state, history = state.gather(index), history[index]
            if k == K - 1 and plan[k] == "resample":
                final_reward = history[:, -1]
        M = sizes[-1]
        if M > 1:  # the final pick: the highest reward among each label's last candidates
            if final_reward is None:
                final_reward = rewards(images_now())
            best = final_reward.view(B, M).argmax(1) + torch.arange(B) * M  # (B,)
            state = state.gather(best)
        stats["network_passes"] = sum(
            stats[key] for key in ("ar_rows", "decoded_images", "feature_images", "reward_images")
        )
        stats["tokens"] = stats["accepted"] = stats["proposed"] = B * model.num_tokens
        stats["seconds"] = time.perf_counter() - t0
        return state.ids, stats


@dataclass
class BestOfNConfig:
    name: str = "best_of_n"
    n: int = 8  # candidates per label; the highest reward wins
    reward: str = "classifier"  # or 'package.module:function', (images, labels) -> scores (M,)
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@SAMPLERS.register("best_of_n", BestOfNConfig)
class BestOfN(TTSVAR):
    """Best-of-N: TTS-VAR with the constant schedule N, ..., N (no selection, the final pick)."""

    def __init__(self, cfg: BestOfNConfig, reward_fn: Callable | None = None):
        if cfg.n < 1:
            raise ValueError(f"sampler.n must be >= 1, got {cfg.n}")
        warp = dict(cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        search = TTSVARConfig(n=1, reward=cfg.reward, **warp)
        super().__init__(search, reward_fn, feature_fn=lambda images: images.flatten(1))  # never clusters
        self.n = cfg.n

    def schedule(self, num_scales: int) -> list[int]:
        return [self.n] * num_scales
