"""The ragged KV cache of the speculative samplers: ``forward_window`` equals full recompute at
every row's positions, and cached SD / SJD / GSD draw exactly the tokens of their full-recompute
versions from the same generator (float64 models, so no argmax can flip on rounding)."""

import pytest
import torch

from tests.toys import LLAMAGEN_CLASSES as CLASSES
from tests.toys import LLAMAGEN_VOCAB as V
from tests.toys import tiny_llamagen
from vargen.sampling.speculative.draft import sample_speculative
from vargen.sampling.speculative.gsd import gsd_ratio
from vargen.sampling.speculative.jacobi import sample_jacobi
from vargen.sampling.speculative.verify import window_inputs


@pytest.fixture(scope="module")
def models():
    return tiny_llamagen(0), tiny_llamagen(1, dim=8, depth=1)


def test_forward_window_equals_full_recompute_per_row(models):
    model, _ = models
    g = torch.Generator().manual_seed(0)
    B, N, W = 5, model.num_tokens, 3
    ids = torch.randint(V, (B, N), generator=g)
    cond = torch.randint(CLASSES, (B,), generator=g)
    full = model.logits(ids[:, : N - 1], cond)  # (B, N, V)
    cache = model.new_ragged_cache(B, N)
    seen = torch.zeros(B, N, dtype=torch.bool)
    for _ in range(N):  # ragged windows from per-row lengths, then random per-row rollbacks
        start = cache.length_B.clone()
        out = model.forward_window(window_inputs(ids, start, W), cond, cache)  # (B, W, V)
        pos = start[:, None] + torch.arange(W)
        ok = pos < N
        ref = full.gather(1, pos.clamp(max=N - 1)[..., None].expand(B, W, V))
        assert torch.allclose(out[ok], ref[ok], atol=1e-5, rtol=0)
        seen[torch.arange(B)[:, None].expand(B, W)[ok], pos[ok]] = True
        cache.rollback((start + torch.randint(1, W + 1, (B,), generator=g)).clamp(max=N))
    assert seen.all()  # every position of every row was checked


SEEDS = range(6)


def draw(fn, seed, **kw):
    return fn(generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("gamma", [1, 3])
def test_cached_speculative_draws_the_same_tokens(models, gamma, cfg_scale):
    target, draft = models
    cond = torch.arange(8) % CLASSES
    warp = {"cfg_scale": cfg_scale, "top_k": 12}
    for seed in SEEDS:
        kw = dict(target=target, draft=draft, cond_B=cond, gamma=gamma, **warp)
        ids_c, st_c = draw(sample_speculative, seed, use_cache=True, **kw)
        ids_r, st_r = draw(sample_speculative, seed, use_cache=False, **kw)
        assert torch.equal(ids_c, ids_r)
        assert (st_c["accepted"], st_c["target_forwards"]) == (st_r["accepted"], st_r["target_forwards"])
        assert st_c["positions_computed"] < st_r["positions_computed"]
    assert 0 < st_c["accepted"] < st_c["proposed"]  # both branches of the test were exercised


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
@pytest.mark.parametrize("method", ["sjd", "gsd"])
def test_cached_jacobi_draws_the_same_tokens(models, method, cfg_scale):
    target, _ = models
    cond = torch.arange(8) % CLASSES
    emb = target.tok_emb.weight.detach()
    kw = {"model": target, "cond_B": cond, "window": 4, "cfg_scale": cfg_scale, "temperature": 0.5}
    if method == "gsd":
        kw["ratio_fn"] = lambda p, q, x: gsd_ratio(p, q, x, group=6, delta=0.3, dist=8.0, emb_VD=emb)
    accepted = 0
    for seed in SEEDS:
        ids_c, st_c = draw(sample_jacobi, seed, use_cache=True, **kw)
        ids_r, st_r = draw(sample_jacobi, seed, use_cache=False, **kw)
        assert torch.equal(ids_c, ids_r)
        assert (st_c["accepted"], st_c["target_forwards"]) == (st_r["accepted"], st_r["target_forwards"])
        accepted += st_c["accepted"]
    assert accepted > 0  # Jacobi drafts were accepted, so ragged rollbacks happened
