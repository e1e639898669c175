"""TarFlow and its inverses (spec models.md 3d, 4f): float64 invariants on tiny random flows."""

from __future__ import annotations

import math

import pytest
import torch

from tests.toys import tiny_tarflow
from vargen.models.tarflow import TarFlow, TarFlowConfig, build_tarflow
from vargen.registry import SAMPLERS
from vargen.sampling.base import SamplerContext
from vargen.sampling.decoders import tarflow as ts

T, CP = 16, 4  # 8x8 gray images, patch 2


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest: tiny tensors, one intra-op thread
    yield


def data(B=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, CP, generator=g, dtype=dtype)
    return x, torch.tensor([0, 2, 3])[:B]  # 3 = the null class


def plans(m, method, segments=1, **kw):
    return [ts.BlockPlan(method, segments, **kw)] * len(m.blocks)


def test_builder_validates_and_shapes():
    with pytest.raises(ValueError, match="num_classes"):
        build_tarflow({"name": "tarflow", "channels": 1, "resolution": 8})
    m = build_tarflow({"name": "tarflow", "channels": 3, "resolution": 8, "num_classes": 2})
    img = torch.rand(2, 3, 8, 8)
    x = m.to_tokens(img)
    assert x.shape == (2, 16, 12) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(m.to_images(x), img, atol=1e-6)


def test_fresh_model_is_identity_and_flip_is_involution():
    m = tiny_tarflow(std=0)
    x, c = data()
    z, logdet = m(x, c)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(3, dtype=torch.float64))
    for i, block in enumerate(m.blocks):
        null = block.cond_emb(torch.tensor([block.null_class]))[0]
        assert torch.allclose(null, block.class_emb.mean(0), atol=1e-15)  # mean-embedding null class
        assert torch.equal(block.permute(block.permute(x)), x)
        assert torch.equal(block.permute(x), x.flip(1) if i % 2 else x)


def test_reverse_of_forward_is_identity():
    m = tiny_tarflow(blocks=3)
    x, c = data()
    z, _ = m(x, c)
    assert (z - x).abs().max() > 1e-2  # a non-trivial flow
    xr, _ = ts.invert_tarflow(m, z, c, plans(m, "sequential"))
    assert (xr - x).abs().max() < 1e-10


def test_logdet_equals_autograd_log_abs_det():
    m = tiny_tarflow()
    x, c = data(B=1)
    _, logdet = m(x, c)
    J = torch.autograd.functional.jacobian(lambda v: m(v.view(1, T, CP), c)[0].flatten(), x.flatten())
    _, logabsdet = torch.linalg.slogdet(J)
    assert abs(logdet.item() * T * CP - logabsdet.item()) < 1e-10
    assert abs(logabsdet.item()) > 1e-3


def test_each_block_is_causal_in_its_permuted_order():
    m = tiny_tarflow()
    x, c = data(B=1)
    for block in m.blocks:

        def f(u, block=block):
            a, b = block.shifted_params(u.view(1, T, CP), c)
            return ((u.view(1, T, CP) - b) * torch.exp(-a)).flatten()

        J = torch.autograd.functional.jacobian(f, block.permute(x).flatten()).view(T, CP, T, CP)
        tok = J.abs().amax(dim=(1, 3))  # (T_out, T_in)
        assert tok.triu(1).max() == 0  # dz_i / du_j = 0 for j > i
        assert tok.tril(-1).max() > 1e-3  # and the flow does couple tokens


@pytest.mark.parametrize("guidance", [None, 1.5])
def test_jacobi_and_gs_jacobi_equal_sequential(guidance):
    m = tiny_tarflow(blocks=3)
    x, c = data()
    z, _ = m(x, c)
    ref, _ = ts.invert_tarflow(m, z, c, plans(m, "sequential"), guidance=guidance)
    if guidance is None:
        assert (ref - x).abs().max() < 1e-10
    for method, segments in [("jacobi", 1), ("gs_jacobi", 4), ("gs_jacobi", 5)]:
        out, infos = ts.invert_tarflow(m, z, c, plans(m, method, segments), tol=1e-13, guidance=guidance)
        assert (out - ref).abs().max() < 1e-10, (method, segments)
        size = math.ceil((T - 1) / segments)
        for info in infos:
            assert info["iterations"] <= T
            assert all(k <= size for k in info["segment_iterations"])


def test_after_k_jacobi_iterations_tokens_0_to_k_are_exact():
    m = tiny_tarflow()
    block = m.blocks[1]
    x, c = data()
    z = block(x, c)[0]
    zp = block.permute(z)
    exact, _ = ts.invert_block_sequential(block, zp, c)
    for k in (1, 3, 7):
        u, info = ts.invert_block_jacobi(block, zp, c, max_iters=k, tol=0.0)
        assert info["iterations"] == k
        assert (u[:, : k + 1] - exact[:, : k + 1]).abs().max() < 1e-12
        assert (u[:, k + 1] - exact[:, k + 1]).abs().max() > 1e-8  # the next one is not yet


def test_cache_carries_the_blocks_tables_and_changes_no_value():
    """new_cache stores the permuted positions and the class table once per inversion; a pass
    through the cache gives the same (a, b), bit for bit, as one that rebuilds them."""
    m = tiny_tarflow(std=0.05)
    x, c = data()
    block = m.blocks[1]  # flipped
    cache = block.new_cache(3)
    pos_TD, table = cache.weights
    assert torch.equal(pos_TD, block.pos_emb.flip(0)) and torch.equal(table[c], block.cond_emb(c))
    with torch.no_grad():
        cached = block.params_joint(x[:, :-1], c, cache)
        plain = block.params_joint(x[:, :-1], c)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("window,every", [(0, 1), (5, 1), (5, 2)])
def test_uncapped_fast_commit_matches_the_general_path(window, every):
    """Without a cap the committed run is read as one count on the device; a cap that never binds
    (the host-side per-token bookkeeping) must commit the same tokens, pass for pass."""
    m = tiny_tarflow(std=0.05)
    x, c = data()
    zp = m.blocks[1].permute(x)
    kw = dict(window=window, tol=1e-7, guidance=0.5, check_every=every)
    u0, i0 = ts.invert_block_jacobi(m.blocks[1], zp, c, **kw)
    u1, i1 = ts.invert_block_jacobi(m.blocks[1], zp, c, max_iters=10**6, **kw)
    assert torch.equal(u0, u1) and i0 == i1
    assert i0["passes"] < T - 1  # tol committed runs: the count path was exercised


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_single_token_segments_reproduce_sequential_bit_for_bit(guidance):
    m = tiny_tarflow()
    x, c = data()
    z, _ = m(x, c)
    seq, _ = ts.invert_tarflow(m, z, c, plans(m, "sequential"), guidance=guidance)
    gs, infos = ts.invert_tarflow(m, z, c, plans(m, "gs_jacobi", T), guidance=guidance)
    assert torch.equal(seq, gs)
    assert all(info["passes"] == T - 1 for info in infos)


def test_gs_segments_attend_to_keys_values_of_final_values():
    """A segment stopped early (cap 1) must leave K/V of its FINAL values for later segments."""
    m = tiny_tarflow()
    block = m.blocks[0]
    x, c = data()
    zp = block.permute(block(x, c)[0])
    u, info = ts.invert_block_gs_jacobi(block, zp, c, segments=4, max_iters=1, tol=0.0)
    assert info["segment_iterations"] == [1, 1, 1, 1] and info["passes"] == 4 + 3  # 3 recomputes
    ref = zp.clone()  # z-init; one Jacobi step per segment, with a clean full pass for the prefix
    for s in (0, 4, 8, 12):
        e = min(s + 4, T - 1)
        a, b = block.shifted_params(ref, c)
        ref[:, s + 1 : e + 1] = zp[:, s + 1 : e + 1] * torch.exp(a[:, s + 1 : e + 1]) + b[:, s + 1 : e + 1]
    assert (u - ref).abs().max() < 1e-12


def test_initial_guess_changes_iterations_never_the_result():
    m = tiny_tarflow(std=0.005, blocks=3)  # near-identity blocks converge in a few iterations
    x, c = data()
    z, _ = m(x, c)
    out_z, info_z = ts.invert_tarflow(m, z, c, plans(m, "jacobi", init="z"), tol=1e-14)
    out_0, info_0 = ts.invert_tarflow(m, z, c, plans(m, "jacobi", init="zero"), tol=1e-14)
    assert [i["iterations"] for i in info_z] != [i["iterations"] for i in info_0]
    assert (out_z - x).abs().max() < 1e-10 and (out_0 - x).abs().max() < 1e-10
    # tol is per element (max |delta|), stricter than the former ||delta||_F / (B C_p) at 1e-8
    _, info = ts.invert_tarflow(m, z, c, plans(m, "jacobi"), tol=1e-7)
    assert max(i["iterations"] for i in info) <= 5  # n_iter << T - 1: the paper's speed-up


@pytest.mark.parametrize("w", [None, 1.5])
def test_cached_sequential_inverse_equals_naive_recompute(w):
    """Also pins the guidance: a <- a + g_i (a - a_null), annealed g_i = i / (T - 1) w."""
    m = tiny_tarflow()
    block = m.blocks[1]
    x, c = data()
    zp = block.permute(block(x, c)[0])
    cached, _ = ts.invert_block_sequential(block, zp, c, guidance=w)
    naive = zp.clone()
    null = torch.full_like(c, block.null_class)
    for i in range(1, T):  # recompute the whole prefix for every token
        a, b = block.shifted_params(naive, c)
        if w is not None:
            a_u, b_u = block.shifted_params(naive, null)
            g = i / (T - 1) * w
            a, b = a + g * (a - a_u), b + g * (b - b_u)
        naive[:, i] = zp[:, i] * torch.exp(a[:, i]) + b[:, i]
    assert (cached - naive).abs().max() < 1e-12


def test_guidance_weight_zero_equals_conditional_and_nonzero_differs():
    m = tiny_tarflow()
    x, c = data()
    z, _ = m(x, c)
    cond, _ = ts.invert_tarflow(m, z, c, plans(m, "sequential"))
    for method in ("sequential", "jacobi"):
        g0, _ = ts.invert_tarflow(m, z, c, plans(m, method), guidance=0.0, tol=1e-13)
        assert (g0 - cond).abs().max() < 1e-12
    g2, _ = ts.invert_tarflow(m, z, c, plans(m, "sequential"), guidance=2.0)
    assert (g2[:2] - cond[:2]).abs().max() > 1e-4  # real labels move
    assert (g2[2] - cond[2]).abs().max() < 1e-12  # the null class guides against itself


def test_inactive_clamp_changes_nothing():
    m = tiny_tarflow(std=0.05)
    x, c = data()
    z = 0.1 * x
    for block in m.blocks:  # every block's input and output, hence every solution, is inside
        assert z.abs().max() < 3
        z, _ = block(z, c)
    assert z.abs().max() < 3
    ref, _ = ts.invert_tarflow(m, z, c, plans(m, "sequential"))
    out, _ = ts.invert_tarflow(m, z, c, plans(m, "gs_jacobi", 4), tol=1e-13, clamp=3.0)
    assert (out - ref).abs().max() < 1e-10


def test_tweedie_on_gaussian_model_is_posterior_mean():
    m = tiny_tarflow(std=0)  # identity flow: the model density is N(0, I)
    x, c = data()
    s2 = m.cfg.noise_std**2
    # noisy x ~ N(0, 1) = clean N(0, 1 - s2) + noise N(0, s2): E[clean | x] = (1 - s2) x
    assert torch.allclose(m.denoise(x, c), (1 - s2) * x, atol=1e-12)


def test_crm_igm_and_policy():
    m = tiny_tarflow(blocks=3)
    images = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    met = ts.crm_igm(m, images)
    for k in ("crm", "igm_z", "igm_zero"):
        assert met[k].shape == (3,) and torch.isfinite(met[k]).all()
    meas = [  # sampling order: converged from both inits / capped from z only / capped from both
        {"z": {"passes": 4, "forced": 0, "max_iters": 6}, "zero": {"passes": 5, "forced": 0, "max_iters": 6}},
        {"z": {"passes": 7, "forced": 3, "max_iters": 6}, "zero": {"passes": 6, "forced": 0, "max_iters": 6}},
        {"z": {"passes": 7, "forced": 2, "max_iters": 6}, "zero": {"passes": 7, "forced": 1, "max_iters": 6}},
    ]
    pol = ts.choose_policy(meas, gs_segments=4, gs_max_iters=9, window=3)
    assert [(p.method, p.init, p.max_iters, p.window) for p in pol] == [
        ("jacobi", "z", 6, 3),
        ("jacobi", "zero", 6, 3),
        ("gs_jacobi", "z", 9, 3),
    ]
    stack = ts.stack_policy(3, [0], 8, 32, 10, "z")
    assert [(p.method, p.segments, p.max_iters) for p in stack] == [
        ("gs_jacobi", 8, 32),
        ("jacobi", 1, 10),
        ("jacobi", 1, 10),
    ]


def test_samples_finite_in_range_and_seeded():
    m = tiny_tarflow(std=0.05, dtype=torch.float32)
    c = torch.tensor([0, 1, 2, 3])
    run = SAMPLERS.build({**vars(ts.TarFlowSamplerConfig()), "method": "gs_jacobi", "cfg_scale": 2.0})
    a, stats = run(m, c, torch.Generator().manual_seed(0))
    b, _ = run(m, c, torch.Generator().manual_seed(0))
    d, _ = run(m, c, torch.Generator().manual_seed(1))
    assert a.shape == (4, 1, 8, 8) and torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, d)
    for k in ("target_forwards", "draft_forwards", "tokens", "accepted", "proposed", "seconds"):
        assert k in stats
    assert stats["target_forwards"] == sum(stats["passes_per_block"]) <= stats["baseline_passes"]
    assert len(stats["iterations_per_block"]) == 2
    stack = SAMPLERS.build({**vars(ts.TarFlowSamplerConfig()), "gs_blocks": [1], "max_iters": 3})
    _, stats = stack(m, c, torch.Generator().manual_seed(0))
    assert [p["method"] for p in stats["plans"]] == ["jacobi", "gs_jacobi"]
    assert stats["iterations_per_block"][0] <= 3


# ---------------------------------------------------------------- frozen-prefix windows (issue 16)
@pytest.mark.parametrize("guidance", [None, 1.5])
@pytest.mark.parametrize("window", [1, 3, 5, 0, 40])
def test_windowed_jacobi_equals_sequential(window, guidance):
    """tol 0 commits a token early only when its update is exactly zero: the windowed solve
    is the sequential solution (float64: to rounding; window 1 IS the sequential loop)."""
    m = tiny_tarflow(blocks=3)
    x, c = data()
    z, _ = m(x, c)
    seq, _ = ts.invert_tarflow(m, z, c, plans(m, "sequential"), guidance=guidance)
    for method, segments in [("jacobi", 1), ("gs_jacobi", 4)]:
        pl = plans(m, method, segments, window=window)
        out, infos = ts.invert_tarflow(m, z, c, pl, tol=0.0, guidance=guidance)
        if window == 1:
            assert torch.equal(out, seq)
        assert (out - seq).abs().max() < 1e-12, (method, window)
        for info in infos:
            assert info["forced"] == 0 and info["iterations"] <= T - 1


@pytest.mark.parametrize("window", [1, 4, 0])
def test_windowed_jacobi_float32_within_1e5_of_sequential(window):
    m = tiny_tarflow(std=0.05, blocks=3, dtype=torch.float32)
    x, c = data()
    z, _ = m(x.float(), c)
    seq, _ = ts.invert_tarflow(m, z, c, plans(m, "sequential"), guidance=1.0)
    for tol in (0.0, 1e-6):
        out, _ = ts.invert_tarflow(m, z, c, plans(m, "jacobi", window=window), tol=tol, guidance=1.0)
        assert (out - seq).abs().max() < 1e-5, (window, tol)


@pytest.mark.parametrize("window", [1, 4, 6, 0])
def test_token_rows_and_passes_exact_counts(window):
    """Two cases with a closed form, L = T - 1 inputs: (1) tol < 0 commits only the token the
    guarantee makes exact: L passes over min(W, L - c) inputs each; (2) the identity flow
    from the z-init never moves a token: every pass commits its whole window."""
    L, W = T - 1, window or T - 1
    m = tiny_tarflow(blocks=2)
    x, c = data()
    zp = m.blocks[0].permute(x)
    _, info = ts.invert_block_jacobi(m.blocks[0], zp, c, window=window, tol=-1.0)
    assert info["passes"] == L and info["syncs"] == 0
    assert info["token_rows"] == sum(min(W, L - i) for i in range(L))
    ident = tiny_tarflow(std=0).blocks[0]
    _, info = ts.invert_block_jacobi(ident, zp, c, window=window, tol=0.0)
    assert info["passes"] == math.ceil(L / W) and info["token_rows"] == L
    assert info["syncs"] == (info["passes"] if W > 1 else 0)  # a 1-token window has nothing to check


def test_check_every_reads_convergence_on_the_host_only_every_k_passes():
    """Identity flow, z-init, L = 15, window 4, a read every 2nd pass: unread passes commit
    one token (windows [0,4) [1,5) [5,9) [6,10) [10,14) [11,15)), read ones the whole window."""
    ident = tiny_tarflow(std=0).blocks[0]
    zp, c = data()
    u, info = ts.invert_block_jacobi(ident, zp, c, window=4, tol=0.0, check_every=2)
    assert (info["passes"], info["token_rows"], info["syncs"]) == (6, 24, 3)
    assert torch.equal(u, zp)


def test_stop_threshold_is_per_element_independent_of_batch_size():
    """The same row alone and repeated 8 times commits at the same passes (a threshold like
    ||delta||_F / (B C) would loosen by sqrt(8) and stop the batch of 8 earlier)."""
    m = tiny_tarflow(std=0.05, blocks=2)
    x, c = data(B=1)
    zp = m.blocks[1].permute(m(x, c)[0])
    for tol in (1e-3, 1e-4, 1e-5):
        u1, i1 = ts.invert_block_jacobi(m.blocks[1], zp, c, tol=tol)
        u8, i8 = ts.invert_block_jacobi(m.blocks[1], zp.repeat(8, 1, 1), c.repeat(8), tol=tol)
        assert (i1["passes"], i1["token_rows"]) == (i8["passes"], i8["token_rows"]), tol
        assert i1["passes"] < T - 1  # the threshold did commit tokens early
        assert (u8 - u1).abs().max() < 1e-12


def test_calibration_picks_jacobi_where_it_converges_and_gs_where_the_cap_bites():
    m = tiny_tarflow(std=0.005, blocks=3)
    with torch.no_grad():
        # a strongly coupled block: Jacobi crawls (x20: without a final norm, x100 blew its output
        # up so far that the next block's near-identity weights coupled its tokens as strongly)
        m.blocks[1].proj_out.weight.mul_(20.0)
    labels = torch.tensor([0, 1, 2, 0])
    plans_, cal = ts.calibrate_policy(m, labels, torch.Generator().manual_seed(0), max_iters=6, tol=1e-6)
    assert [p.method for p in plans_] == ["jacobi", "gs_jacobi", "jacobi"]  # sampling order
    hard = cal["measured"][1]
    assert all(hard[i]["forced"] > 0 for i in ts.INITS)
    assert all(cal["measured"][j][p.init]["forced"] == 0 for j, p in ((0, plans_[0]), (2, plans_[2])))
    assert len(cal["passes"]) == 3


def test_auto_sampler_records_plan_and_window_stats():
    m = tiny_tarflow(std=0.05, dtype=torch.float32)
    c = torch.tensor([0, 1, 2, 3])
    cfg = {**vars(ts.TarFlowSamplerConfig()), "method": "auto", "window": 4, "cfg_scale": 1.5, "calib": 4}
    run = SAMPLERS.build(cfg)
    run.setup(SamplerContext(m))  # auto: the policy is measured for the run's model
    a, stats = run(m, c, torch.Generator().manual_seed(0))
    b, _ = run(m, c, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert [p["method"] for p in stats["plans"]] == ["jacobi", "jacobi"] and stats["plans"][0]["window"] == 4
    assert len(stats["calibration_passes"]) == 2
    assert stats["positions_computed"] == 4 * stats["token_rows"] == 4 * sum(stats["token_rows_per_block"])
    assert stats["images"] == 4 and stats["syncs"] <= stats["target_forwards"]
    seq, s_seq = SAMPLERS.build({**cfg, "method": "sequential"})(m, c, torch.Generator().manual_seed(0))
    assert s_seq["token_rows"] == 2 * (T - 1) and s_seq["syncs"] == 0
    assert (seq - a).abs().max() < 1e-4


# ---------------------------------------------------------------- continuous batching (issue 16)
@pytest.mark.parametrize("guidance", [1.0, 2.5])
@pytest.mark.parametrize("window", [1, 4, 0])
def test_continuous_jacobi_stays_exact_under_refilling(window, guidance):
    """7 rows through 1, 3 or 8 slots: rows finish, slots refill and the batch shrinks at the
    end, yet with tol 0 every image is the sequential one from the same noise."""
    m = tiny_tarflow(std=0.1, blocks=3)
    c = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    ref, _ = ts.sample_tarflow(m, c, generator=torch.Generator().manual_seed(0), cfg_scale=guidance)
    for slots in (1, 3, 8):
        out, st = ts.sample_tarflow_continuous(
            m,
            c,
            generator=torch.Generator().manual_seed(0),
            slots=slots,
            window=window,
            tol=0.0,
            cfg_scale=guidance,
        )
        assert (out - ref).abs().max() < 1e-12, slots
        assert st["target_calls_per_image"] <= 3 * (T - 1)


def test_continuous_rows_are_independent_of_slots_and_keep_calls_per_image():
    """A row's passes and result do not depend on its slot or neighbours: model calls per image
    are the same with 1, 5 or 16 slots, below the batch-synchronous loop where a batch of 16
    runs until its slowest row converges."""
    m = tiny_tarflow(std=0.1, blocks=2)
    c = torch.arange(24) % 4
    kw = dict(window=0, tol=1e-4, cfg_scale=1.5)
    res = {}
    for slots in (1, 5, 16):
        res[slots] = ts.sample_tarflow_continuous(
            m, c, generator=torch.Generator().manual_seed(0), slots=slots, **kw
        )
    again, _ = ts.sample_tarflow_continuous(m, c, generator=torch.Generator().manual_seed(0), slots=16, **kw)
    assert torch.equal(again, res[16][0])
    per_image = res[1][1]["target_calls_per_image"]
    for out, st in res.values():
        assert (out - res[1][0]).abs().max() < 1e-12
        assert st["target_calls_per_image"] == per_image
    assert res[16][1]["target_forwards"] < res[5][1]["target_forwards"] < res[1][1]["target_forwards"]
    calls = 0
    for i in (0, 16):  # the batch-synchronous sampler, batches of 16: calls per image = passes
        _, st = ts.sample_tarflow(
            m, c[i : i + 16], generator=torch.Generator().manual_seed(i), method="jacobi", **kw
        )
        calls += st["target_forwards"] * len(c[i : i + 16])
    assert calls / len(c) > 1.1 * per_image


def test_continuous_exact_counts_and_builder():
    m = tiny_tarflow(std=0.1, blocks=2)
    c = torch.arange(5) % 3
    eager, st = ts.sample_tarflow_continuous(
        m, c, generator=torch.Generator().manual_seed(0), slots=2, tol=-1.0
    )
    assert st["passes_per_block"] == [(T - 1) * 3] * 2  # 15 passes per row, slots of 2, 2, 1 rows
    assert st["target_calls_per_image"] == 2 * (T - 1) and st["row_passes"] == 2 * 5 * (T - 1)
    assert st["syncs"] == 2 * (T - 1) * 3  # the finished rows, read every pass (check_every=1)
    lazy, st4 = ts.sample_tarflow_continuous(
        m, c, generator=torch.Generator().manual_seed(0), slots=2, tol=-1.0, check_every=4
    )  # rows finish at pass 15, are seen at pass 16
    assert st4["passes_per_block"] == [16 * 3] * 2
    assert st4["syncs"] == 2 * 4 * 3  # reads at passes 4, 8, 12, 16
    assert (lazy - eager).abs().max() < 1e-12
    mixed = [ts.BlockPlan("sequential"), ts.BlockPlan("gs_jacobi", 4, max_iters=2)]  # chunks of slots
    ref, _ = ts.sample_tarflow(m, c[:2], generator=torch.Generator().manual_seed(0), policy=mixed, tol=0.0)
    out, st = ts.sample_tarflow_continuous(
        m, c, generator=torch.Generator().manual_seed(0), slots=2, policy=mixed, tol=0.0
    )
    assert st["passes_per_block"][0] == (T - 1) * 3 and st["row_passes"] > 5 * (T - 1)
    assert (out[:2] - ref).abs().max() < 1e-12  # the first chunk is the batch-synchronous run
    base = {**vars(ts.TarFlowSamplerConfig()), "window": 4}
    flags = {meth: SAMPLERS.build({**base, "method": meth}).continuous for meth in ts.METHODS + ("auto",)}
    assert flags == {"sequential": False, "jacobi": True, "gs_jacobi": False, "auto": True}
    run = SAMPLERS.build({**base, "method": "jacobi"})
    imgs, st = run(m, c, torch.Generator().manual_seed(0), slots=2)
    assert imgs.shape == (5, 1, 8, 8) and st["images"] == 5 and st["slots"] == 2
    with pytest.raises(ValueError, match="continuous"):
        SAMPLERS.build({**base, "method": "sequential"})(m, c, torch.Generator().manual_seed(0), slots=2)


@pytest.mark.parametrize("guidance", [None, 1.5])
def test_one_slot_fast_path_equals_the_ragged_path(guidance):
    """Batch 1 (one slot, read every pass) runs the plain-cache path: the same commits, passes,
    token rows and values as the ragged continuous path, and the sequential result at tol 0."""
    m = tiny_tarflow(std=0.1, blocks=2)
    block, c = m.blocks[1], torch.tensor([0, 2, 1])
    zp = block.permute(torch.randn(3, T, CP, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    seq = torch.cat(
        [
            ts.invert_block_sequential(block, zp[i : i + 1], c[i : i + 1], guidance=guidance)[0]
            for i in range(3)
        ]
    )
    for window in (1, 3, 0):
        for tol in (0.0, 1e-4, -1.0):
            kw = dict(slots=1, window=window, tol=tol, guidance=guidance, check_every=1)
            fast, i_fast = ts.invert_block_continuous(block, zp, c, **kw)
            ragged, i_rag = ts.invert_block_continuous(block, zp, c, one_slot_fast=False, **kw)
            assert (fast - ragged).abs().max() < 1e-12, (window, tol)
            for key in ("passes", "row_passes", "token_rows", "forced"):
                assert i_fast[key] == i_rag[key], (key, window, tol)
            if tol <= 0:
                assert (fast - seq).abs().max() < 1e-12
    assert i_fast["passes"] == 3 * (T - 1)  # tol < 0: the guaranteed token only


def test_cpu_jacobi_settings_stay_within_1e3_of_sequential():
    """The measured per-batch settings (JACOBI_CPU: window, tol, batching, per-block plans by cost) on
    a float32 flow whose blocks couple their tokens: every image within 1e-3 of the sequential one,
    fewer passes (no more where the plan was measured)."""
    m = tiny_tarflow(std=0.1, blocks=3, dtype=torch.float32)  # tol 0.1 would be 3e-2 off
    c = torch.arange(6) % 4
    ref, _ = ts.sample_tarflow(m, c, generator=torch.Generator().manual_seed(0), cfg_scale=1.5)
    assert ts.jacobi_cpu_setting(1) == ts.JACOBI_CPU[1] and ts.jacobi_cpu_setting(100) == ts.JACOBI_CPU[16]
    for batch in ts.JACOBI_CPU:
        kw = ts.jacobi_cpu_setting(batch)
        cont = kw.pop("continuous")
        windows, calib = kw.pop("windows", None), kw.pop("calib", batch)
        if kw.pop("policy", None) == "cost":  # per-block plans timed at this batch size
            from vargen.sampling.decoders.tarflow_cost import calibrate_cost

            labels, g_cal = torch.arange(calib) % 4, torch.Generator().manual_seed(1)
            kw["policy"], _ = calibrate_cost(
                m, labels, g_cal, batch=batch, windows=windows, tol=kw["tol"], guidance=0.5, reps=1
            )
        g = torch.Generator().manual_seed(0)
        if cont:
            out, st = ts.sample_tarflow_continuous(m, c, generator=g, slots=batch, cfg_scale=1.5, **kw)
        else:
            out, st = ts.sample_tarflow(m, c, generator=g, method="jacobi", cfg_scale=1.5, **kw)
        assert (out - ref).abs().max() < 1e-3, batch
        calls = st.get("target_calls_per_image", st["target_forwards"])
        # a measured plan may keep the sequential loop (T - 1 passes) on a block; Jacobi never needs more
        assert calls <= 3 * (T - 1) if "policy" in kw else calls < 3 * (T - 1), batch


@pytest.mark.slow
def test_loss_decreases_on_digits():
    from vargen.data import build_dataset

    data = build_dataset({"name": "digits", "resolution": 16, "heldout_fraction": 0.15, "split_seed": 0})
    images, labels = data.train_images[:32], data.train_labels[:32]
    torch.manual_seed(0)
    cfg = TarFlowConfig(
        channels=1, resolution=16, num_classes=data.num_classes, dim=32, layers_per_block=1, num_blocks=2
    )
    m = TarFlow(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        out = m.loss(images, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert set(out) == {"loss", "bpd", "logdet", "prior"}
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3
    assert math.isfinite(out["bpd"].item())


def test_checkpoint_without_final_norm_key_loads_as_trained_with_it(tmp_path):
    """Models trained before issue 20 had a LayerNorm before proj_out; their stored config has no
    ``final_norm`` key, so loading reads it as True (checkpoint.LATER_MODEL_KEYS) and rebuilds them."""
    from vargen.checkpoint import WEIGHTS, load_component, same_model_config, save_weights

    old = tiny_tarflow(dtype=torch.float32)
    old_model = dict(vars(old.cfg))
    assert old_model.pop("final_norm") is False  # the reference architecture is the default
    normed = TarFlow(TarFlowConfig(**{**old_model, "final_norm": True})).eval()
    normed.blocks[0].norm.weight.data.fill_(2.0)  # a norm that matters
    save_weights(
        str(tmp_path / WEIGHTS), normed, {"task": "pixel_generator", "model": old_model}, 1, "pixel_generator"
    )
    loaded, cfg = load_component(str(tmp_path))
    assert cfg.model.final_norm is True
    assert torch.equal(loaded.blocks[0].norm.weight, normed.blocks[0].norm.weight)
    x, c = data(dtype=torch.float32)
    assert torch.equal(loaded(x, c)[0], normed(x, c)[0])
    assert same_model_config(old_model, {**old_model, "final_norm": True})
    assert not same_model_config(old_model, {**old_model, "final_norm": False})
