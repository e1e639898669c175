"""The fused CSpD last-step kernels (ratio + acceptance, residual proposals): Triton kernels
(CPU interpreter) vs the torch references, and the CSpD sampler under both."""

import os

# Must precede the first `import triton` (vargen_kernels imports it): see vargen_kernels.dispatch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vargen_kernels import dispatch  # noqa: E402
from vargen_kernels.cspd_ratio import (  # noqa: E402
    cspd_accept,
    cspd_accept_reference,
    cspd_propose,
    cspd_propose_reference,
)


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    if not dispatch.interpret_requested():
        pytest.skip("TRITON_INTERPRET is off, so the kernel cannot run on CPU")


def _window(B, g, C, seed, spread=0.3, dtype=torch.float32):
    """Drafts, target / draft last-step means near them, per-token stds (B, g, 1), zero log
    Sigma, uniforms and caps from 0 to g."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x0 = r(B, g, C)
    mp, mq = x0 + spread * r(B, g, C), x0 + spread * r(B, g, C)
    sp = 0.5 + torch.rand(B, g, 1, generator=gen, dtype=dtype)
    sq = 0.5 + torch.rand(B, g, 1, generator=gen, dtype=dtype)
    ls = torch.zeros(B, g, dtype=dtype)
    u = torch.rand(B, g, generator=gen)
    cap = torch.arange(B) % (g + 1)
    return x0, mp, sp, mq, sq, ls, u, cap


def _both(args, **kw):
    return cspd_accept_reference(*args), cspd_accept(*args, backend="interpret", **kw)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 16), (7, 4, 16), (5, 6, 3)])
def test_accept_matches_reference(interpreter, shape):
    """Batch of one up to many rows, one to six drafts, C not a power of two; caps 0..g."""
    args = _window(*shape, seed=shape[0] * 10 + shape[1])
    (lr_r, n_r), (lr_k, n_k) = _both(args)
    assert n_k.dtype == torch.int64 and lr_k.shape == lr_r.shape == shape[:2]
    torch.testing.assert_close(lr_k, lr_r, rtol=1e-5, atol=1e-5)
    assert torch.equal(n_k, n_r)


def test_accept_exercises_partial_acceptance_and_full_stds(interpreter):
    """Many rows, every count 0..g reached; per-dimension stds (B, g, C), non-zero log Sigma
    (paper mode), non-contiguous drafts."""
    x0, mp, sp, mq, sq, ls, u, _ = _window(24, 4, 8, seed=3, spread=0.2)
    sp, sq = (
        sp.expand(-1, -1, 8).clone(),
        sq.expand(-1, -1, 8) * (1 + 0.1 * torch.rand(24, 4, 8, generator=torch.Generator().manual_seed(5))),
    )
    ls = 0.1 * torch.randn(24, 4, generator=torch.Generator().manual_seed(4))
    x0 = torch.cat([x0, x0], -1)[..., ::2]  # stride 2 in C
    args = (x0, mp, sp, mq, sq, ls, u, torch.full((24,), 4))
    (lr_r, n_r), (lr_k, n_k) = _both(args)
    torch.testing.assert_close(lr_k, lr_r, rtol=1e-5, atol=1e-5)
    assert torch.equal(n_k, n_r)
    assert set(n_r.tolist()) == {0, 1, 2, 3, 4}


def test_accept_edge_cases(interpreter):
    x0, mp, sp, mq, sq, ls, u, cap = _window(4, 3, 5, seed=5)
    full = torch.full((4,), 3)
    # all accepted: identical Gaussians give log r = 0 >= log u
    (lr_r, n_r), (lr_k, n_k) = _both((x0, mp, sp, mp, sp, ls, u, full))
    assert torch.equal(n_k, full) and torch.equal(n_r, full) and lr_k.abs().max() == 0
    # all rejected: a far target mean, and a zero-density factor (log Sigma = -inf)
    (_, n_r), (_, n_k) = _both((x0, mp + 50, sp, mq, sq, ls, u, full))
    assert torch.equal(n_k, torch.zeros(4, dtype=torch.long)) and torch.equal(n_r, n_k)
    inf = torch.full_like(ls, float("-inf"))
    (lr_r, n_r), (lr_k, n_k) = _both((x0, mp, sp, mq, sq, inf, u, full))
    assert n_k.sum() == 0 and n_r.sum() == 0 and torch.equal(lr_k, lr_r)
    # caps: accepted drafts never exceed them
    (_, n_r), (_, n_k) = _both((x0, mp, sp, mp, sp, ls, u, torch.tensor([0, 1, 2, 3])))
    assert n_k.tolist() == n_r.tolist() == [0, 1, 2, 3]
    # empty window (g = 0) and an empty batch
    e = _window(3, 0, 5, seed=6)
    (lr_r, n_r), (lr_k, n_k) = _both(e)
    assert lr_k.shape == (3, 0) and n_k.tolist() == n_r.tolist() == [0, 0, 0]
    lr, n = cspd_accept(*(t[:0] for t in _window(2, 2, 5, seed=7)), backend="interpret")
    assert lr.shape == (0, 2) and n.shape == (0,)
    with pytest.raises(ValueError, match="u_Bg"):
        cspd_accept(x0, mp, sp, mq, sq, ls, u[:, :1], cap, backend="torch")


def test_accept_float64(interpreter):
    args = _window(6, 3, 4, seed=8, dtype=torch.float64)
    (lr_r, n_r), (lr_k, n_k) = _both(args)
    assert lr_k.dtype == torch.float64
    torch.testing.assert_close(lr_k, lr_r, rtol=1e-13, atol=1e-13)
    assert torch.equal(n_k, n_r)


def _proposal(K, B, C, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    mp, mq = r(B, C), r(B, C)
    sp = 0.5 + torch.rand(B, 1, generator=gen, dtype=dtype)
    sq = 0.5 + torch.rand(B, C, generator=gen, dtype=dtype)
    return mp, sp, mq, sq, 0.2 * r(B), r(K, B, C)


@pytest.mark.parametrize("shape", [(1, 1, 1), (16, 1, 4), (16, 5, 64), (3, 4, 7)])
def test_propose_matches_reference(interpreter, shape):
    """One proposal of one row to several programs' worth (K B > the rows per program)."""
    args = _proposal(*shape, seed=sum(shape))
    (y_r, l_r), (y_k, l_k) = cspd_propose_reference(*args), cspd_propose(*args, backend="interpret")
    assert y_k.shape == shape and l_k.shape == shape[:2]
    torch.testing.assert_close(y_k, y_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l_k, l_r, rtol=1e-5, atol=1e-4)


def test_propose_float64_and_empty(interpreter):
    args = _proposal(8, 3, 5, seed=9, dtype=torch.float64)
    (y_r, l_r), (y_k, l_k) = cspd_propose_reference(*args), cspd_propose(*args, backend="interpret")
    torch.testing.assert_close(y_k, y_r, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(l_k, l_r, rtol=1e-12, atol=1e-12)
    mp, sp, mq, sq, ls, e = _proposal(2, 3, 5, seed=10)
    y, lqp = cspd_propose(mp, sp, mq, sq, ls, e[:0], backend="interpret")
    assert y.shape == (0, 3, 5) and lqp.shape == (0, 3)
    # identical p and q with log Sigma = 0: q / p = 1 everywhere, so the residual accepts nothing
    _, lqp = cspd_propose(mp, sp, mp, sp, torch.zeros(3), e, backend="interpret")
    torch.testing.assert_close(lqp, torch.zeros(2, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cspd_sampler_equal_under_interpreter_and_reference(interpreter, dtype):
    """sample_cspd (verify="last", guidance, a near draft: acceptances, rejections and residual
    rounds; KV-cached windows whose attention runs the ragged-window kernel too) draws the same
    tokens with the interpreted kernels as with the references."""
    from tests.test_cspd_sampler import _draft_near, _xar
    from vargen.sampling.speculative.cspd import sample_cspd

    torch.set_num_threads(1)
    tgt = _xar(0).to(dtype).eval()
    drf = _draft_near(tgt, 2e-2)
    y = torch.tensor([0, 1, 1])
    out = {}
    for backend in ("interpret", "torch"):
        kw = dict(gamma=2, prefill=0.0, cfg_scale=2.0, slots=2, backend=backend)
        out[backend] = sample_cspd(tgt, drf, y, generator=torch.Generator().manual_seed(1), **kw)
    (a, sa), (b, sb) = out["interpret"], out["torch"]
    assert torch.isfinite(b).all() and sb["proposed"] > sb["accepted"] > 0  # both outcomes exercised
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert (sa["accepted"], sa["target_forwards"]) == (sb["accepted"], sb["target_forwards"])
