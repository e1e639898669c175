"""The equal-rows fast path of :meth:`ARTransformer.forward_window` (every row at one length L:
slice writes, sliced rotary tables, a view of a causal mask table) against the ragged path it
short-cuts: bit-identical logits and cache contents, on equal rows and on rows that drift apart
and back, and the same tokens from the speculative samplers (fp32, the fast path's dtype)."""

import pytest
import torch

from vargen.models.ar import ARConfig, ARTransformer
from vargen.sampling.speculative.draft import sample_speculative
from vargen.sampling.speculative.gsd import gsd_ratio
from vargen.sampling.speculative.jacobi import sample_jacobi
from vargen.sampling.speculative.verify import window_inputs

V, CLASSES = 40, 5


def model(seed=0, dim=32, depth=2):
    torch.manual_seed(seed)  # weight init uses the global RNG (test data only)
    cfg = ARConfig(vocab_size=V, grid=[4, 4], num_classes=CLASSES, dim=dim, depth=depth, heads=4)
    m = ARTransformer(cfg).eval()
    for p in m.parameters():  # not the init's near-identity scales: every weight matters
        p.data.normal_(0, 0.3)
    return m


def caches(m, B, W):
    """A cache that may take the fast path and one that may not, both on torch attention."""
    fast, ragged = m.new_ragged_cache(B, W), m.new_ragged_cache(B, W)
    ragged.equal_rows = False
    fast.backend = ragged.backend = "torch"
    return fast, ragged


@pytest.mark.parametrize("equal", [True, False])
def test_fast_path_equals_ragged_path(equal):
    """Windows of widths 1..4 with rollbacks that keep the rows equal (equal=True) or let them
    drift apart and meet again: logits, lengths and every cache slot agree bit for bit, and
    the fast path really ran (and, with drifting rows, the ragged one too)."""
    m = model()
    g = torch.Generator().manual_seed(0)
    B, N, Wmax = 3, m.num_tokens, 4
    ids = torch.randint(V, (B, N + Wmax), generator=g)
    cond = torch.randint(CLASSES + 1, (B,), generator=g)
    fast, ragged = caches(m, B, Wmax)
    starts = []
    with torch.inference_mode():
        for it in range(40):
            W = 1 + it % Wmax
            start = fast.length_B.clone()
            x = window_inputs(ids, start, W)
            out = m.forward_window(x, cond, fast)  # (B, W, V)
            starts.append(fast.start)
            want = m.forward_window(x, cond, ragged)
            assert ragged.start is None
            assert torch.equal(out, want), (it, W, start.tolist())
            keep = torch.randint(0, W + 1, (1 if equal or it % 3 == 0 else B,), generator=g)
            length = (start + keep).clamp(max=N)
            if length.min() >= N:
                length = torch.zeros(B, dtype=torch.long)  # start over (position 0 again)
            fast.rollback(length.expand(B))
            ragged.rollback(length.expand(B))
    for a, b in zip(fast.k + fast.v, ragged.k + ragged.v):
        assert torch.equal(a, b)
    assert torch.equal(fast.length_B, ragged.length_B)
    taken = [s is not None for s in starts]
    assert all(taken) if equal else (any(taken) and not all(taken))
    assert 0 in starts  # a window at position 0 (the class token) took the fast path


def test_fast_path_equals_full_recompute():
    """Equal-rows windows agree with the full forward at every position (to float rounding)."""
    m = model(1)
    g = torch.Generator().manual_seed(1)
    B, N = 2, m.num_tokens
    ids = torch.randint(V, (B, N), generator=g)
    cond = torch.tensor([1, CLASSES])  # a class and the null class (CFG rows)
    with torch.inference_mode():
        full = m.logits(ids[:, : N - 1], cond)  # (B, N, V)
        fast, _ = caches(m, B, 3)
        L = 0
        while L < N:
            out = m.forward_window(window_inputs(ids, torch.full((B,), L), 3), cond, fast)
            assert fast.start == L
            n = min(3, N - L)
            torch.testing.assert_close(out[:, :n], full[:, L : L + n], atol=1e-5, rtol=1e-5)
            L += 1 + L % 2  # keep 1 or 2 of the 3 positions
            fast.rollback(torch.full((B,), L))


def no_fast_path(monkeypatch):
    new = ARTransformer.new_ragged_cache

    def ragged_only(self, batch, window):
        cache = new(self, batch, window)
        cache.equal_rows = False
        return cache

    monkeypatch.setattr(ARTransformer, "new_ragged_cache", ragged_only)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", ["sjd", "gsd", "sd"])
def test_samplers_draw_the_same_tokens(monkeypatch, method, batch):
    """SJD, GSD and SD (draft) in fp32 with CFG: the same ids with and without the fast path
    (batch 1 takes it in every window, batch 3 whenever its rows meet)."""
    target, draft = model(2), model(3, dim=16, depth=1)
    cond = torch.arange(batch) % CLASSES
    emb = target.tok_emb.weight.detach()

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        kw = {"cfg_scale": 2.0, "temperature": 0.7, "backend": "torch"}
        if method == "sd":
            return sample_speculative(target=target, draft=draft, cond_B=cond, gamma=3, generator=g, **kw)
        if method == "gsd":
            kw["ratio_fn"] = lambda p, q, x: gsd_ratio(p, q, x, group=6, delta=0.3, dist=8.0, emb_VD=emb)
        return sample_jacobi(target, cond, generator=g, window=4, **kw)

    seeds = range(3)
    fast = [run(s) for s in seeds]
    with monkeypatch.context() as mp:
        no_fast_path(mp)
        ragged = [run(s) for s in seeds]
    for (ids_f, st_f), (ids_r, st_r) in zip(fast, ragged):
        assert torch.equal(ids_f, ids_r)
        assert st_f["target_forwards"] == st_r["target_forwards"]
    assert sum(st["accepted"] for _, st in fast) > 0
