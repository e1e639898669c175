"""The fused ragged-window attention: Triton kernel (CPU interpreter) vs the torch reference
(SDPA with the cache's materialised mask), in the models' windowed forwards and a sampler."""

import os

# Must precede the first `import triton` (vargen_kernels imports it): see vargen_kernels.dispatch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vargen_kernels import dispatch  # noqa: E402
from vargen_kernels.ragged_attention import (  # noqa: E402
    ragged_attention,
    ragged_attention_reference,
    ragged_window_mask,
)


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    if not dispatch.interpret_requested():
        pytest.skip("TRITON_INTERPRET is off, so the kernel cannot run on CPU")


def _qkv(B, H, W, S, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, W, d), (B, H, S, d), (B, H, S, d))  # q, k, v
    return tuple(torch.randn(*s, generator=g, dtype=dtype) for s in shapes)


@pytest.mark.parametrize(
    "H,W,d,lengths",
    [
        (1, 1, 4, [0]),  # batch of one, window 1, length 0 (only slot 0 visible)
        (2, 1, 8, [1, 5, 33]),  # window 1 (a draft step), rows of different lengths
        (2, 4, 12, [0, 1, 17, 40]),  # d not a power of two; rows spanning several slot blocks
        (3, 9, 16, [2, 30, 7]),  # a wide verification window
    ],
)
def test_kernel_matches_reference(interpreter, H, W, d, lengths):
    L = torch.tensor(lengths)
    S = int(L.max()) + W + 3  # a few slots past every row's window (the cache's wider bound)
    q, k, v = _qkv(len(lengths), H, W, S, d, seed=W * 10 + d)
    ref = ragged_attention_reference(q, k, v, L)
    out = ragged_attention(q, k, v, L, backend="interpret")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_masked_slots_never_read(interpreter):
    """Slots past a row's window (stale entries of a rolled-back cache) do not enter, even as NaN;
    the reference, given the same slots zeroed, agrees. A strided q (the models' transposed
    view) is read in place."""
    B, H, W, S, d = 3, 2, 3, 24, 8
    L = torch.tensor([0, 6, 20])
    q, k, v = _qkv(B, H, W, S, d, seed=1)
    stale = torch.arange(S)[None, :] >= (L + W)[:, None]  # (B, S)
    k_nan = k.masked_fill(stale[:, None, :, None], float("nan"))
    v_nan = v.masked_fill(stale[:, None, :, None], float("nan"))
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    out = ragged_attention(q_t, k_nan, v_nan, L, backend="interpret")
    ref = ragged_attention_reference(q, k.masked_fill(stale[:, None, :, None], 0), v, L)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the in-window causal mask matters: a query's own later slots changed, its output is not
    v2 = v.clone()
    v2[0, :, 2] += 100  # row 0 (L = 0): slot 2 is visible only to query 2
    out2 = ragged_attention(q, k, v2, L, backend="interpret")
    torch.testing.assert_close(out2[0, :, :2], out[0, :, :2], rtol=1e-5, atol=1e-5)
    assert (out2[0, :, 2] - out[0, :, 2]).abs().max() > 1


def test_float64_and_the_cache_mask(interpreter):
    """fp64 inputs accumulate in fp64; the reference's mask is the RaggedKVCache's."""
    from vargen.nn.kv_cache import RaggedKVCache

    L = torch.tensor([3, 0, 11])
    q, k, v = _qkv(3, 2, 4, 16, 8, seed=2, dtype=torch.float64)
    out = ragged_attention(q, k, v, L, backend="interpret")
    torch.testing.assert_close(out, ragged_attention_reference(q, k, v, L), rtol=1e-13, atol=1e-13)
    cache = RaggedKVCache(1, 3, 2, 20, 8, "cpu", torch.float32)
    cache.length_B = L
    assert torch.equal(cache.begin(4, used=16), ragged_window_mask(L, 4, 16))
    with pytest.raises(ValueError, match="length_B"):
        ragged_attention(q, k, v, L[:2], backend="torch")


def test_autograd_takes_the_reference():
    q, k, v = _qkv(2, 1, 2, 5, 4, seed=3)
    q.requires_grad_(True)
    ragged_attention(q, k, v, torch.tensor([0, 3])).sum().backward()  # the kernel has no backward
    assert q.grad is not None


def test_windowed_forwards_equal_under_interpreter_and_reference(interpreter):
    """ARTransformer.forward_window (both the prepared-weight path and the module path) and
    XAR.forward_window on ragged caches (rows at different lengths after a rollback): the same
    outputs with the interpreted kernel as with SDPA on the materialised mask."""
    from tests.test_cspd_sampler import _xar
    from vargen.models.ar import ARConfig, ARTransformer

    torch.manual_seed(0)
    ar = ARTransformer(ARConfig(vocab_size=12, grid=[2, 3], num_classes=2, dim=32, depth=2, heads=2)).eval()
    ids, cond = torch.randint(12, (3, 7)), torch.tensor([0, 1, 1])
    xar = _xar(0).eval()
    ctx, xcond = torch.randn(3, 3, 1), torch.tensor([1, 0, 1])
    for model, run in (
        (ar, lambda c, w: ar.forward_window(ids[:, :w], cond, c)),
        (ar.double(), lambda c, w: ar.forward_window(ids[:, :w], cond, c)),  # the module path
        (xar, lambda c, w: xar.forward_window(ctx[:, :w], xcond, c)),
    ):
        outs = []
        for backend in ("interpret", "torch"):
            cache = model.new_ragged_cache(3, 3)
            cache.backend = backend
            with torch.no_grad():
                run(cache, 3)
                cache.rollback(torch.tensor([1, 3, 2]))
                outs.append(run(cache, 2))  # ragged: windows at 1, 3 and 2
        tol = 1e-10 if outs[1].dtype == torch.float64 else 1e-5
        torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)


def test_speculative_sampler_equal_under_interpreter_and_reference(interpreter):
    """sample_speculative with KV-cached windows: the same ids with the interpreted attention (and
    verification) kernels as with the references."""
    from vargen.models.ar import ARConfig, ARTransformer
    from vargen.sampling.speculative.draft import sample_speculative

    torch.manual_seed(0)
    cfg = dict(vocab_size=16, grid=[2, 2], num_classes=2, dim=32, depth=1, heads=2)
    target, draft = (ARTransformer(ARConfig(**cfg)).eval() for _ in range(2))
    cond = torch.tensor([0, 1, 1])
    ids = [
        sample_speculative(
            target, draft, cond, generator=torch.Generator().manual_seed(2), gamma=2, slots=2, backend=b
        )
        for b in ("interpret", "torch")
    ]
    assert torch.equal(ids[0][0], ids[1][0])
    assert ids[0][1]["accepted"] == ids[1][1]["accepted"]
