"""The fused speculative verification: Triton kernel (CPU interpreter) vs the torch reference,
and the reference vs the samplers' pre-kernel verification code, draw for draw."""

import os

# Must precede the first `import triton` (vargen_kernels imports it): see vargen_kernels.dispatch.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.toys import verify_case  # noqa: E402
from vargen.sampling.speculative.verify import accept_and_correct  # noqa: E402
from vargen_kernels import dispatch  # noqa: E402
from vargen_kernels.speculative_verify import verify, verify_reference  # noqa: E402


@pytest.fixture
def interpreter():
    pytest.importorskip("triton")
    if not dispatch.interpret_requested():
        pytest.skip("TRITON_INTERPRET is off, so the kernel cannot run on CPU")


def _check(args, ratio_Bg=None):
    ref = verify_reference(*args, ratio_Bg=ratio_Bg)
    ker = verify(*args, ratio_Bg=ratio_Bg, backend="interpret")
    for name, r, k in zip(("n", "z", "y", "cap"), ref, ker):
        assert k.dtype == torch.int64 and k.shape == r.shape, name
        assert torch.equal(k, r), (name, k, r)
    return ref


@pytest.mark.parametrize("B,W,V", [(1, 4, 16), (4, 3, 33), (3, 1, 9), (5, 5, 7)])
def test_kernel_matches_reference(interpreter, B, W, V):
    """Random windows, ragged rooms (0 .. W+1: capped rows, rows with no room at all)."""
    n, z, y, cap = _check(verify_case(B, W, V, seed=B * 100 + W * 10 + V))
    assert (n <= cap).all()


def test_kernel_all_accepted_and_all_rejected(interpreter):
    """q = p accepts every draft (z is the bonus sample y_n); uniforms at 1 - 2**-24 and ratios
    below one reject the first draft (z is a residual draw, never a token the residual lacks)."""
    args = verify_case(3, 4, 20, seed=1, q_equals_p=True, room=10)
    n, z, y, cap = _check(args)
    assert torch.equal(n, cap) and torch.equal(cap, torch.full((3,), 3))
    assert torch.equal(z, y[:, 3])
    p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV = verify_case(3, 4, 20, seed=2, room=10)
    a_Bg = torch.full_like(a_Bg, 1 - 2**-24)
    n, z, y, cap = _check((p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV))
    ratio_B = p_BWV[:, 0].gather(1, x_Bg[:, :1])[:, 0] / q_BgV[:, 0].gather(1, x_Bg[:, :1])[:, 0]
    assert torch.equal(n == 0, ratio_B < 1 - 2**-24)
    res_BV = (p_BWV[:, 0] - q_BgV[:, 0]).clamp(min=0)
    rows = n == 0
    assert (res_BV[rows].gather(1, z[rows, None]) > 0).all()


def test_kernel_zero_probability_drafts_and_given_ratio(interpreter):
    """Drafts with p(x) = 0 are always rejected; a given ratio (GSD) replaces p/q, and with p = q
    a rejection's residual has no mass, so it falls back to p."""
    p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV = verify_case(4, 3, 12, seed=3, room=9)
    x_Bg[:, 0] = (p_BWV[:, 0] == 0).float().argmax(-1)  # a zero-probability token per row
    assert (p_BWV[:, 0].gather(1, x_Bg[:, :1]) == 0).all()
    n, z, *_ = _check((p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV))
    assert (n == 0).all() and (p_BWV[:, 0].gather(1, z[:, None]) > 0).all()
    args = verify_case(4, 3, 12, seed=4, q_equals_p=True, room=9)
    ratio_Bg = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.5], [float("nan"), 1.0]])
    n, z, y, _ = _check(args, ratio_Bg)
    assert n[0] == 0 and n[3] == 0 and n[1] == 1  # NaN rejects, as torch's clamp + compare
    assert (args[0][torch.arange(4), n].gather(1, z[:, None]) > 0).all()


def test_kernel_strided_views_and_empty_batch(interpreter):
    """Views with a strided window axis (p at the draft positions of a longer buffer); B = 0."""
    p_BWV, q_BgV, x_Bg, room_B, u_BWV, a_Bg, u_res_BV = verify_case(2, 6, 10, seed=5)
    q_wide = torch.cat([q_BgV, q_BgV], -1)[..., :10]  # rows of stride 2V
    s = slice(0, 4, 2)  # drafts 0 and 2 before window positions 0, 2, 4
    _check((p_BWV[:, ::2], q_wide[:, s], x_Bg[:, s], room_B, u_BWV[:, ::2], a_Bg[:, s], u_res_BV))
    empty = verify_case(0, 3, 5, seed=6)
    assert all(t.shape[0] == 0 for t in verify(*empty, backend="interpret"))


def test_kernel_mode_mismatch_is_a_clear_error(interpreter):
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        verify(*verify_case(1, 2, 4, seed=7), backend="triton")


def test_shape_errors():
    args = list(verify_case(2, 3, 5, seed=8))
    args[5] = args[5][:, :1]
    with pytest.raises(ValueError, match="a_Bg"):
        verify(*args, backend="torch")


def _frozen_accept_and_correct(p_BWV, q_BgV, x_Bg, ratio_Bg, room_B, generator):
    """The samplers' verification before the kernel existed (sample_probs inlined), frozen here:
    the dispatching :func:`accept_and_correct` must draw exactly what it drew."""

    def sample_probs(probs_XV):
        u = torch.rand(probs_XV.shape, generator=generator)
        return (probs_XV.log() - torch.log(-torch.log(u.clamp(2.0**-24, 1.0 - 2.0**-24)))).argmax(-1)

    B, W, V = p_BWV.shape
    g = W - 1
    y_BW = sample_probs(p_BWV)
    u_Bg = torch.rand(B, g, generator=generator)
    cap_B = (room_B - 1).clamp(min=0, max=g)
    acc_Bg = (u_Bg < ratio_Bg.clamp(max=1.0)) & (torch.arange(g)[None] < cap_B[:, None])
    n_B = acc_Bg.long().cumprod(1).sum(1)
    p_n = p_BWV.gather(1, n_B[:, None, None].expand(B, 1, V))[:, 0]
    res = p_n
    if g > 0:
        q_n = q_BgV.gather(1, n_B.clamp(max=g - 1)[:, None, None].expand(B, 1, V))[:, 0]
        r = (p_n - q_n).clamp(min=0)
        mass = r.sum(-1, keepdim=True)
        res = torch.where(mass > 1e-6, r / mass.clamp(min=1e-6), p_n)
    z_B = torch.where(n_B < cap_B, sample_probs(res), y_BW.gather(1, n_B[:, None])[:, 0])
    return n_B, z_B, y_BW, cap_B


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_accept_and_correct_draws_what_it_drew_before(interpreter, backend):
    for W in (1, 4):
        p_BWV, q_BgV, x_Bg, room_B, *_ = verify_case(6, W, 11, seed=W)
        ratio_Bg = (
            p_BWV[:, : W - 1].gather(2, x_Bg[..., None])[..., 0] / q_BgV.gather(2, x_Bg[..., None])[..., 0]
        )
        gen_old, gen = torch.Generator().manual_seed(W), torch.Generator().manual_seed(W)
        old = _frozen_accept_and_correct(p_BWV, q_BgV, x_Bg, ratio_Bg, room_B, gen_old)
        for ratio in (ratio_Bg, None):  # None: the token ratio, computed inside
            gen.manual_seed(W)
            new = accept_and_correct(p_BWV, q_BgV, x_Bg, ratio, room_B, gen, backend=backend)
            for o, k in zip(old, new):
                assert torch.equal(o, k)
            assert torch.equal(gen.get_state(), gen_old.get_state())  # the same draws consumed


def test_samplers_tokens_equal_under_interpreter_and_reference(interpreter):
    """SD (with a draft model), SJD and GSD's group-exact variant draw the same tokens whether
    the verification runs interpreted or as the reference, under warpers and CFG."""
    from vargen.models.ar import ARConfig, ARTransformer
    from vargen.sampling.speculative.draft import sample_speculative
    from vargen.sampling.speculative.gsd import exact_group_fns
    from vargen.sampling.speculative.jacobi import sample_jacobi

    torch.manual_seed(0)
    cfg = dict(vocab_size=12, grid=[2, 3], num_classes=3, dim=16, depth=1, heads=2)
    target, draft = (ARTransformer(ARConfig(**cfg)).eval() for _ in range(2))
    cond = torch.tensor([0, 2])
    warp = dict(cfg_scale=2.0, temperature=0.9, top_k=8)
    ratio_fn, residual_fn = exact_group_fns(2)
    runs = {
        "sd": lambda b, g: sample_speculative(target, draft, cond, generator=g, gamma=3, backend=b, **warp),
        "sjd": lambda b, g: sample_jacobi(target, cond, generator=g, window=4, backend=b, **warp),
        "gsd": lambda b, g: sample_jacobi(
            target, cond, generator=g, window=4, ratio_fn=ratio_fn, residual_fn=residual_fn, backend=b, **warp
        ),
    }
    for name, run in runs.items():
        ids = [run(b, torch.Generator().manual_seed(1))[0] for b in ("interpret", "torch")]
        assert torch.equal(*ids), name


@pytest.mark.parametrize("W", [1, 2, 5])
def test_bonus_only_verification_draws_the_same_n_and_z(W):
    """``all_y=False`` (SD) samples the target at position n alone from the same uniforms:
    the same n, z and cap as the whole window, on rooms that cap, accept all and reject."""
    for seed in range(4):
        args = verify_case(5, W, 17, seed=seed * 7 + W, q_equals_p=seed == 1)
        n, z, y, cap = verify_reference(*args)
        n1, z1, y1, cap1 = verify_reference(*args, all_y=False)
        assert y1 is None and torch.equal(n1, n) and torch.equal(z1, z) and torch.equal(cap1, cap)
